"""TAS search (docs/design.md sections 6-7): alternating weight and architecture updates under a cost target."""

import dataclasses
import logging
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tas_keras import plots
from tas_keras import input_convention as conventions
from tas_keras.configs import TrainingConfig, configured_stage, recorded_when_given
from tas_keras.cost import count_shape
from tas_keras.graph_space import ADD_MODES
from tas_keras.latency import LatencyLayout, LatencyTable, SupernetLatency, predict_latency
from tas_keras.models.registry import build_model, check_model_name, image_size_for, is_model_file
from tas_keras.runs import prepare_run_dir, read_json
from tas_keras.supernet import COST_METRICS, build_supernet, search_space
from tas_keras.training import EpochLog, fit_resumable, sgd

ARCH_FILE = "arch.json"
HISTORY_FILE = "history.json"
PLOT_FILE = "search.png"
CURVES_FILE = "curves.png"
COST_BANDS = ("code", "paper")
LATENCY = "latency"  # the cost measured by a latency table (tas_keras.latency), in ms
COSTS = (*COST_METRICS, LATENCY)
TAU_SCHEDULES = ("cosine", "linear")


def cost_band(target_ratio, tolerance, band):
    """The accepted (low, high) fraction of the base cost.

    "code" is the reference code's [R - t, R]; "paper" is the paper's [(1 - t) R, (1 + t) R].
    """
    if band == "code":
        return target_ratio - tolerance, target_ratio
    if band == "paper":
        return (1 - tolerance) * target_ratio, (1 + tolerance) * target_ratio
    raise ValueError(f"band must be one of {COST_BANDS}, got {band!r}")


def tau_at(epoch, epochs, schedule="cosine", tau_max=5.0, tau_min=0.1):
    """Gumbel temperature of `epoch` (0-based), annealed with progress epoch / epochs as the reference
    code does: tau_max at the first epoch, and the last epoch stays one step above tau_min."""
    progress = epoch / epochs
    if schedule == "cosine":
        return tau_min + (tau_max - tau_min) * (1 + math.cos(math.pi * progress)) / 2
    if schedule == "linear":
        return tau_max - (tau_max - tau_min) * progress
    raise ValueError(f"tau schedule must be one of {TAU_SCHEDULES}, got {schedule!r}")


# The reference's architecture step: Adam at 1e-3, constant, from the first step. Tuned for ~58,800
# architecture steps (600 CIFAR epochs), it barely moves a logit in the few hundred steps of a short
# search (bench/results/search_convergence_quick.json).
REFERENCE_ARCH_LEARNING_RATE = 1e-3
ARCH_DECAYS = ("cosine", "constant")
# The defaults that let a search of any length move its distributions (bench/search_convergence.py): the
# weights train alone for the first ARCH_WARMUP of the steps, then the architecture learning rate lets a
# logit travel ARCH_TRAVEL over the remaining steps, decayed by cosine. An entropy term in the architecture
# loss (its weight rising from 0 to `entropy_weight`) makes a short search's distributions sharp whatever
# the data says; it is off by default: on the pretrained EfficientNet-Lite0 the search without it pruned
# to networks no less accurate (bench/results/pretrained_lite0.json, docs/results.md).
ARCH_WARMUP = 0.3
ARCH_TRAVEL = 20.0
ENTROPY_WEIGHT = 0.0


def arch_learning_rate_for(steps, warmup_fraction, travel):
    """The Adam learning rate that lets an architecture logit travel up to `travel` over the steps after
    the warm-up (Adam moves a parameter by at most ~lr per step), never below the reference's 1e-3."""
    moving = max(1, round(steps * (1 - warmup_fraction)))
    return max(REFERENCE_ARCH_LEARNING_RATE, travel / moving)


@keras.saving.register_keras_serializable(package="tas_keras")
class ArchLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """The architecture optimizer's learning rate over its own steps (which start when the weights'
    warm-up ends, `ArchWarmup`): `peak`, constant or decayed by cosine to 0 at the last step so the
    argmax settles."""

    def __init__(self, peak, total_steps, decay="cosine"):
        if peak < 0:
            raise ValueError(f"architecture learning rate must be >= 0, got {peak!r}")
        if decay not in ARCH_DECAYS:
            raise ValueError(f"architecture decay must be one of {ARCH_DECAYS}, got {decay!r}")
        self.peak, self.total_steps, self.decay = peak, total_steps, decay

    def __call__(self, step):
        progress = tf.clip_by_value(tf.cast(step, tf.float32) / max(1, self.total_steps), 0.0, 1.0)
        return self.peak * (0.5 * (1 + tf.cos(np.pi * progress)) if self.decay == "cosine" else 1.0)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "decay": self.decay}


@keras.saving.register_keras_serializable(package="tas_keras")
class LinearRamp(keras.optimizers.schedules.LearningRateSchedule):
    """Rising linearly from 0 to `peak` over the architecture optimizer's `total_steps`: the weight of
    the entropy term, which makes the architecture decide."""

    def __init__(self, peak, total_steps):
        if peak < 0:
            raise ValueError(f"entropy weight must be >= 0, got {peak!r}")
        self.peak, self.total_steps = peak, total_steps

    def __call__(self, step):
        return self.peak * tf.clip_by_value(tf.cast(step, tf.float32) / max(1, self.total_steps), 0.0, 1.0)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps}


class ArchWarmup(keras.callbacks.Callback):
    """Turns the architecture step of a TASSearchModel on once the weights have trained alone for
    `warmup_steps` steps (also when a resumed search starts past them). The step is left out of the
    traced train function until then, rather than run at a zero rate: no forward and backward pass on
    the valid batch that would change nothing, and Adam's moments hold only applied gradients. (No
    tf.cond around an optimizer step, docs/design.md section 7: the train function is traced again.)"""

    def __init__(self, warmup_steps):
        super().__init__()
        self.warmup_steps = warmup_steps

    def _switch(self, on):
        if self.model.arch_step_on != on:
            self.model.arch_step_on = on
            self.model.make_train_function(force=True)

    def _warm(self):
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) >= self.warmup_steps

    def on_train_begin(self, logs=None):
        self._switch(self._warm())

    def on_train_batch_begin(self, batch, logs=None):
        if not self.model.arch_step_on and self._warm():
            self._switch(True)


def entropies(logit_vectors):
    """The entropy (nats) of softmax(v) for every logit vector v."""
    return tf.stack([-tf.reduce_sum(tf.nn.softmax(v) * tf.nn.log_softmax(v)) for v in logit_vectors])


def _entropy_and_top1(logit_vectors):
    if not logit_vectors:  # nothing to choose (a network without droppable blocks): decided
        return 0.0, 1.0
    top1 = [float(tf.reduce_max(tf.nn.softmax(v))) for v in logit_vectors]
    return float(tf.reduce_mean(entropies(logit_vectors))), float(np.mean(top1))


def convergence(supernet):
    """How decided the architecture is: the mean entropy (nats) and mean top-1 probability of the
    width distributions (convs with two or more candidates) and of the stage depth distributions."""
    width_entropy, width_top1 = _entropy_and_top1(
        [conv.alpha for conv in supernet.width_choices if conv.alpha is not None])
    depth_entropy, depth_top1 = _entropy_and_top1([mixer.beta for _, mixer in supernet.stages])
    return {"width_entropy": width_entropy, "width_top1": width_top1,
            "depth_entropy": depth_entropy, "depth_top1": depth_top1}


class TASSearchModel(keras.Model):
    """Trains a supernet's weights and architecture alternately, one batch pair per step.

    Each step: a weight update on a search-train batch (CE + coupled weight decay, the compiled SGD),
    then an architecture update on a search-valid batch (CE + cost_weight * L_cost + coupled decay
    of alpha/beta, `arch_optimizer`), each with its own architecture sample. L_cost is +log E(A) when
    the argmax network costs more than the band, -log E(A) when less, 0 inside.

    Args:
        supernet: a GraphSupernet.
        target_ratio: R, the fraction of the full network's cost to keep.
        cost_metric: "flops", "params" or "latency" (ms, from `latency_table`).
        cost_weight: lambda.
        tolerance: t, the band width (see `cost_band`).
        band: "code" or "paper".
        arch_weight_decay: coupled L2 on alpha/beta.
        seed: base seed of the architecture samples.
        sample_per_replica: under tf.distribute, every replica draws its own architecture sample (as
            the reference's multi-GPU runs did); False shares one sample, as a single device would draw.
        entropy_weight: None (the reference), or a schedule step -> weight (`LinearRamp`) of the mean
            entropy of all width and depth distributions, added to the architecture loss: a short
            search's noisy gradients leave the distributions flat, and this term makes them decide.
        latency: the SupernetLatency of a "latency" cost.
    """

    def __init__(self, supernet, target_ratio, cost_metric="flops", cost_weight=2.0, tolerance=0.05,
                 band="code", arch_weight_decay=1e-3, seed=0, sample_per_replica=True, entropy_weight=None,
                 latency=None, **kwargs):
        super().__init__(**kwargs)
        if not 0 < target_ratio < 1:
            raise ValueError(f"target_ratio must be in (0, 1), got {target_ratio!r}")
        if cost_metric not in COSTS:
            raise ValueError(f"cost_metric must be one of {COSTS}, got {cost_metric!r}")
        if (cost_metric == LATENCY) != (latency is not None):
            raise ValueError("a latency table is needed for the latency cost, and only for it")
        if not 0 <= tolerance < target_ratio:
            raise ValueError(f"tolerance must be in [0, target_ratio), got {tolerance!r}")
        self.supernet = supernet
        self.target_ratio, self.cost_metric, self.cost_weight = target_ratio, cost_metric, cost_weight
        self.tolerance, self.band, self.arch_weight_decay, self.seed = tolerance, band, arch_weight_decay, seed
        self.sample_per_replica, self.entropy_weight = sample_per_replica, entropy_weight
        self.arch_step_on = True  # ArchWarmup turns it off while the weights warm up
        self.latency = latency
        self.base_cost = self.latency.full_ms if self.latency else supernet.full_cost(cost_metric)
        low, high = cost_band(target_ratio, tolerance, band)
        self.cost_low, self.cost_high = low * self.base_cost, high * self.base_cost
        self.tau = keras.Variable(5.0, trainable=False, name="tau")
        self.arch_optimizer = None
        self.trackers = {name: keras.metrics.Mean(name=name) for name in (
            "loss", "valid_loss", "arch_loss", "cost_loss", "expected_cost_ratio", "argmax_cost_ratio")}
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.valid_accuracy = keras.metrics.SparseCategoricalAccuracy(name="valid_accuracy")
        self.cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self(tf.zeros((1, *supernet.image_shape)))

    def build(self, input_shape):
        """Nothing to do: the supernet is built (see `GraphSupernet.build`)."""
        del input_shape

    def compile(self, optimizer, arch_optimizer, **kwargs):
        """`arch_optimizer` is built here, so it exists in the distribution scope before fit.

        No compiled loss: Keras would build it by calling the model on a (train, valid) batch pair.
        """
        super().compile(optimizer=optimizer, **kwargs)
        # Keras wraps the compiled optimizer in a LossScaleOptimizer under mixed_float16 (float16
        # gradients underflow); the architecture step backpropagates through the same float16
        # activations, so its optimizer scales its loss too.
        if self.dtype_policy.name == "mixed_float16" and not isinstance(arch_optimizer,
                                                                         keras.optimizers.LossScaleOptimizer):
            arch_optimizer = keras.optimizers.LossScaleOptimizer(arch_optimizer)
        self.arch_optimizer = arch_optimizer
        # Built on the variables each one updates, so a backup restores into the same layout.
        self.optimizer.build(self.supernet.weight_variables)
        self.arch_optimizer.build(self.supernet.arch_variables)

    @property
    def metrics(self):
        return [*self.trackers.values(), self.accuracy, self.valid_accuracy]

    def argmax_sample(self):
        """The argmax shape as a sample: one width per conv (weight 1), one-hot depths."""
        widths = {conv.name: (tf.fill([2], conv.argmax_index()), tf.constant([1.0, 0.0]))
                  for conv in self.supernet.width_choices}
        depths = [tf.one_hot(tf.argmax(mixer.beta), len(mixer.depth_choices))
                  for _, mixer in self.supernet.stages]
        return widths, depths

    def call(self, images, training=False):
        return self.supernet(images, self.argmax_sample())

    def _step_seed(self, phase):
        """A stateless seed per (step, phase[, replica]): samples survive a resume unchanged."""
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(self.optimizer.iterations, tf.int64)])
        replica = tf.distribute.get_replica_context()
        if self.sample_per_replica and replica is not None:
            seed = tf.random.experimental.stateless_fold_in(seed, replica.replica_id_in_sync_group)
        return tf.random.experimental.stateless_fold_in(seed, phase)

    def cost_loss(self):
        """(L_cost, E(A), F(A)): the cost term's sign comes from the exact argmax cost."""
        if self.latency:
            expected, argmax = self.latency.expected(), self.latency.argmax()
        else:
            expected = self.supernet.expected_cost(self.cost_metric)
            argmax = tf.cast(self.supernet.argmax_cost(self.cost_metric), tf.float32)
        sign = tf.where(argmax > self.cost_high, 1.0, tf.where(argmax < self.cost_low, -1.0, 0.0))
        return sign * tf.math.log(expected), expected, argmax

    def train_step(self, batches):
        (images, labels), (valid_images, labels_valid) = batches
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        weights, arch_variables = self.supernet.weight_variables, self.supernet.arch_variables

        # Each tape watches only the variables its step updates: a tape records, and differentiates, every
        # op that reads a watched variable, and the other step's half made a third of the step's graph.
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch([v.value for v in weights])
            # The losses read float32 logits, whatever the supernet computes in (tas_keras.precision).
            logits = tf.cast(self.supernet(images, self.supernet.sample(self.tau, self._step_seed(0))),
                             tf.float32)
            # Keras losses come divided by the replica count (gradients are summed over replicas);
            # the weight decay and the cost term added by hand below must be divided too.
            loss = self.cross_entropy(labels, logits) + keras.ops.sum(self.supernet.losses) / replicas
            # Scaled inside the tape, or the gradient of the scaled loss is None (a LossScaleOptimizer's).
            scaled_loss = self.optimizer.scale_loss(loss)
        self.optimizer.apply(tape.gradient(scaled_loss, weights), weights)
        self.trackers["loss"].update_state(loss * replicas)
        self.accuracy.update_state(labels, logits)
        if not self.arch_step_on:
            return {m.name: m.result() for m in (self.trackers["loss"], self.accuracy)} | {"tau": self.tau.value}

        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch([v.value for v in arch_variables])
            valid_logits = tf.cast(self.supernet(valid_images, self.supernet.sample(self.tau, self._step_seed(1))),
                                   tf.float32)
            valid_loss = self.cross_entropy(labels_valid, valid_logits)
            cost_loss, expected, argmax = self.cost_loss()
            decay = 0.5 * self.arch_weight_decay * tf.add_n([tf.reduce_sum(v * v) for v in arch_variables])
            arch_loss = valid_loss + (self.cost_weight * cost_loss + decay) / replicas
            if self.entropy_weight is not None:
                entropy = tf.reduce_mean(entropies(arch_variables))
                arch_loss += self.entropy_weight(self.arch_optimizer.iterations) * entropy / replicas
            scaled_arch_loss = self.arch_optimizer.scale_loss(arch_loss)
        self.arch_optimizer.apply(tape.gradient(scaled_arch_loss, arch_variables), arch_variables)

        # Losses are per-replica values scaled by 1/replicas: report them unscaled.
        for name, value in (("valid_loss", valid_loss * replicas),
                            ("arch_loss", arch_loss * replicas), ("cost_loss", cost_loss),
                            ("expected_cost_ratio", expected / self.base_cost),
                            ("argmax_cost_ratio", argmax / self.base_cost)):
            self.trackers[name].update_state(value)
        self.valid_accuracy.update_state(labels_valid, valid_logits)
        return {**{m.name: m.result() for m in self.metrics}, "tau": self.tau.value}


class TauSchedule(keras.callbacks.Callback):
    """Sets the model's tau variable at every epoch start (a Python float would be frozen in the trace)."""

    def __init__(self, epochs, schedule="cosine", tau_max=5.0, tau_min=0.1):
        super().__init__()
        tau_at(0, epochs, schedule, tau_max, tau_min)  # validates the schedule name
        self.epochs, self.schedule, self.tau_max, self.tau_min = epochs, schedule, tau_max, tau_min

    def on_epoch_begin(self, epoch, logs=None):
        self.model.tau.assign(tau_at(epoch, self.epochs, self.schedule, self.tau_max, self.tau_min))


def _changes(now, before):
    """How many widths or depths (a dict by name) differ between two recorded shapes."""
    return sum(now[name] != before[name] for name in now)


class ArchHistory(EpochLog):
    """Records the argmax shape (its widths by slot and depths by stage) and the epoch's logs after every
    epoch into `history.json`.

    The logs gain how decided the architecture is (`convergence`, and how many widths and depths
    changed their argmax since the previous epoch), so the callbacks after this one (TensorBoard)
    record them too."""

    def entry(self, epoch, logs):
        supernet = self.model.supernet
        shape = supernet.derive()
        cost = count_shape(supernet.space, shape)
        recorded = shape.point()
        previous = self.entries.get(epoch - 1)
        decided = convergence(supernet)
        if previous is not None:
            decided["width_changes"] = _changes(recorded["widths"], previous["widths"])
            decided["depth_changes"] = _changes(recorded["depths"], previous["depths"])
        if logs is not None:
            logs.update(decided)
        latency = self.model.latency
        return {"epoch": epoch, **recorded, "flops": cost.flops, "params": cost.params,
                "tau": float(self.model.tau.numpy()), **({LATENCY: latency.shape_ms(shape)} if latency else {}),
                **super().entry(epoch, logs)}


def select_epoch(history, model, cost_metric):
    """The argmax shape of the last epoch whose cost is inside the band, else of the last epoch.

    The reference keeps the last epoch's argmax even when it has just left the band; a shape that
    meets the budget is what the user asked for.
    """
    in_band = [e for e in history if model.cost_low <= e[cost_metric] <= model.cost_high]
    return (in_band or history)[-1]


STABLE_EPOCHS = 3
# What a recorded shape holds; a CIFAR ResNet's search written before its shapes were GraphShapes kept its
# depths as stage_blocks (bench/results/ablation_state holds such runs).
SHAPE_KEYS = ("widths", "depths", "stage_blocks")


def decision_summary(history, arch):
    """Whether a finished search decided (issue 12's criteria), from its history.json entries and
    arch.json dict: the final mean top-1 probability and entropy of the width and depth
    distributions, the epochs after which the argmax changed, whether it held over the last
    STABLE_EPOCHS epochs, and whether the chosen shape is inside the band of the cost searched (FLOPs,
    parameters or latency)."""
    last = history[-1]["logs"]
    shapes = [{key: e[key] for key in SHAPE_KEYS if key in e} for e in history]
    provenance = arch["provenance"]
    low, high = cost_band(provenance["target_ratio"], provenance["tolerance"], provenance["band"])
    ratio = provenance[f"{provenance['cost_metric']}_ratio"]  # the band bounds the cost that was searched
    stable = len(history) >= STABLE_EPOCHS and all(s == shapes[-1] for s in shapes[-STABLE_EPOCHS:])
    in_band = low - 1e-9 <= ratio <= high + 1e-9
    return {
        "width_top1": round(last["width_top1"], 4), "width_entropy": round(last["width_entropy"], 4),
        "depth_top1": round(last["depth_top1"], 4), "depth_entropy": round(last["depth_entropy"], 4),
        "epochs_with_argmax_change": [e["epoch"] + 1 for e, now, before in zip(history[1:], shapes[1:], shapes)
                                      if now != before],
        f"argmax_stable_last_{STABLE_EPOCHS}_epochs": stable,
        "flops_ratio": round(provenance["flops_ratio"], 4), "cost": provenance["cost_metric"],
        "cost_ratio": round(ratio, 4), "in_band": in_band, "chosen_epoch": provenance["epoch"] + 1,
        **{key: arch[key] for key in SHAPE_KEYS[1:] if key in arch},
        "supernet_valid_accuracy": round(last["valid_accuracy"], 4),
        "arch_learning_rate": provenance["arch_learning_rate"], "wall_time_s": provenance["search_wall_time_s"],
        "decides": bool(last["width_top1"] >= 0.5 and stable and in_band),
    }


def search_batches(dataset, batch_size, epochs, seed):
    """(`batches(start_step)`, steps per epoch): (search-train, search-valid) batch pairs of all
    epochs from a global step on, from the per-class 50/50 split of the training set."""
    halves = dataset.search_halves(seed=seed)
    steps = min(half.train_size for half in halves) // batch_size

    def batches(start_step):
        return tf.data.Dataset.zip(tuple(
            half.train_batches(batch_size, seed=seed + offset, epochs=epochs, start_step=start_step,
                               steps_per_epoch=steps)
            for offset, half in enumerate(halves)))

    return batches, steps


def source_model(model_name, dataset):
    """The full network a search prunes: the registry network `model_name` at the dataset's image shape
    and classes, or the model of a .keras file, which must take the dataset's images and classes."""
    if not is_model_file(model_name):
        return build_model(model_name, dataset.image_shape, dataset.num_classes)
    model = build_model(model_name)
    image_shape, classes = tuple(model.inputs[0].shape[1:]), model.outputs[0].shape[-1]
    if (image_shape, classes) != (tuple(dataset.image_shape), dataset.num_classes):
        size = "x".join(map(str, image_shape))
        raise ValueError(f"{model_name} takes {size} images and gives {classes} classes; the dataset {dataset.name} "
                         f"has {'x'.join(map(str, dataset.image_shape))} images and {dataset.num_classes} classes")
    return model


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchConfig(TrainingConfig):
    """The settings of a search (`run_search`).

    `model_name` is a registry name (`tas_keras.models.registry`: built at the dataset's image size and
    classes) or a .keras file (the model as saved, which must fit the dataset). The supernet is
    `build_supernet(model_name, model, add_mode, width_multiple)`: the CIFAR ResNets with the
    reference's independent Adds, other models with tied Adds, unless `add_mode` says otherwise.
    `init_from`: a trained full network (.keras) the supernet starts from.

    The architecture optimizer is Adam with `ArchLearningRate(arch_learning_rate, warm-up of
    `arch_warmup` of the steps, `arch_decay`)`; `arch_learning_rate=None` scales it to the run's length
    (`arch_learning_rate_for`). After the warm-up the mean entropy of the architecture distributions
    enters the architecture loss with a weight rising linearly from 0 to `entropy_weight`. The
    reference code's step is `arch_learning_rate=1e-3, arch_warmup=0, arch_decay="constant",
    entropy_weight=0`.

    `cost_metric="latency"`: the cost is the latency of `latency_table` (a path, made by
    `python -m export.latency_table`), and `target_latency_ms`, if given, sets the target ratio
    (ms / the full network's table latency).

    `arch_start_full`: a logit added to the full width and depth of every distribution at the start
    (`GraphSupernet.start_full`; 0, the reference's start: random logits near 0). The data, run and
    schedule settings are `TrainingConfig`'s.
    """

    stage = "search"

    model_name: str = "resnet20"
    target_ratio: float = 0.5
    cost_metric: str = "flops"
    cost_weight: float = 2.0
    tolerance: float = 0.05
    band: str = "code"
    tau_schedule: str = "cosine"
    tau_max: float = 5.0
    tau_min: float = 0.1
    width_multiple: int = 1
    arch_learning_rate: float = None
    arch_warmup: float = ARCH_WARMUP
    arch_decay: str = "cosine"
    entropy_weight: float = ENTROPY_WEIGHT
    init_from: str = None
    latency_table: str = None
    target_latency_ms: float = None
    add_mode: str = recorded_when_given(None)
    arch_start_full: float = recorded_when_given(0.0)

    def validate(self):
        super().validate()
        if self.add_mode is not None and self.add_mode not in ADD_MODES:
            raise ValueError(f"add mode must be one of {ADD_MODES}, got {self.add_mode!r}")
        check_model_name(self.model_name)
        if not 0 < self.target_ratio < 1:
            raise ValueError(f"target ratio must be in (0, 1), got {self.target_ratio!r}")
        if not 0 <= self.tolerance < self.target_ratio:
            raise ValueError(f"tolerance must be in [0, target ratio), got {self.tolerance!r}")
        if self.cost_metric not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {self.cost_metric!r}")
        if self.cost_metric == LATENCY and not self.latency_table:
            raise ValueError("the latency cost needs a latency table (make one with `python -m export.latency_table`)")
        if self.cost_metric != LATENCY and (self.latency_table or self.target_latency_ms):
            raise ValueError(f"a latency table or target is for the latency cost, got cost {self.cost_metric!r}")
        cost_band(self.target_ratio, self.tolerance, self.band)
        tau_at(0, self.epochs, self.tau_schedule)
        if not 0 <= self.arch_warmup < 1:
            raise ValueError(f"architecture warm-up must be a fraction in [0, 1), got {self.arch_warmup!r}")
        if self.arch_decay not in ARCH_DECAYS:
            raise ValueError(f"architecture decay must be one of {ARCH_DECAYS}, got {self.arch_decay!r}")
        if self.entropy_weight < 0:
            raise ValueError(f"entropy weight must be >= 0, got {self.entropy_weight!r}")
        if self.arch_learning_rate is not None and self.arch_learning_rate < 0:
            raise ValueError(f"architecture learning rate must be >= 0, got {self.arch_learning_rate!r}")


@configured_stage(SearchConfig)
def run_search(out, config, overwrite):
    """Searches a shape of `config.model_name` keeping `config.target_ratio` of its cost (`SearchConfig`);
    writes arch.json, history.json, search.png, curves.png and TensorBoard logs to `out`, resuming an
    interrupted run from its backup (every `checkpoint_steps` steps and every epoch). arch.json is a
    GraphShape (`tas_keras.graph_space`) naming `model_name`, and `history.json` the argmax widths and
    depths of every epoch; returns arch.json's dict."""
    # The files a config names are checked when it runs: a config read back from a run.json stays valid.
    if is_model_file(config.model_name) and not os.path.exists(config.model_name):
        raise ValueError(f"model file {config.model_name!r} does not exist")
    if config.init_from and not os.path.exists(config.init_from):
        raise ValueError(f"--init_from: no such file {config.init_from!r}")
    table = config.latency_table and LatencyTable.load(config.latency_table)
    dataset = config.load_dataset(image_size_for(config.model_name, config.image_size))
    model = source_model(config.model_name, dataset)
    dataset = conventions.feed(dataset, model, config.input_convention)
    layout = table and LatencyLayout(
        search_space(config.model_name, model, config.add_mode, config.width_multiple), model)
    target_ratio = config.target_ratio
    if table:
        table.check_covers(layout)
        if config.target_latency_ms is not None:
            target_ratio = latency_target_ratio(config.target_latency_ms, layout, table)
    smaller_half = min(half.train_size for half in dataset.search_halves(seed=config.seed))  # split per class
    if config.batch_size > smaller_half:
        raise ValueError(f"batch_size {config.batch_size} is larger than the smaller search half ({smaller_half} "
                         "images): lower --batch_size or train on more images")
    run, finished = prepare_run_dir(out, config.run_record(), overwrite, done_file=ARCH_FILE)
    if finished:
        logging.info("%s already holds this finished search; nothing to do", out)
        return read_json(os.path.join(out, ARCH_FILE))

    keras.utils.set_random_seed(config.seed)  # after the source model: the seed fixes the supernet's start
    supernet = build_supernet(config.model_name, model, config.add_mode, config.width_multiple)
    if config.init_from:
        supernet.init_from_source(config.init_from)
    supernet.start_full(config.arch_start_full)
    batches, steps = search_batches(dataset, config.batch_size, config.epochs, config.seed)
    total = steps * config.epochs
    warmup_steps = round(total * config.arch_warmup)
    arch_steps = total - warmup_steps
    search = TASSearchModel(
        supernet, target_ratio, config.cost_metric, config.cost_weight, config.tolerance, config.band,
        seed=config.seed,
        entropy_weight=LinearRamp(config.entropy_weight, arch_steps) if config.entropy_weight else None,
        latency=table and SupernetLatency(supernet, layout, table))
    peak = config.arch_learning_rate if config.arch_learning_rate is not None else arch_learning_rate_for(
        total, config.arch_warmup, ARCH_TRAVEL)
    arch_rate = ArchLearningRate(peak, arch_steps, config.arch_decay)
    search.compile(optimizer=sgd(config.learning_rate, total),
                   arch_optimizer=keras.optimizers.Adam(arch_rate, beta_1=0.5, beta_2=0.999))
    history = ArchHistory(os.path.join(run, HISTORY_FILE))
    start = time.perf_counter()
    fit_resumable(search, batches, steps, config.epochs, out, [
        ArchWarmup(warmup_steps), TauSchedule(config.epochs, config.tau_schedule, config.tau_max, config.tau_min),
        history,
        keras.callbacks.TensorBoard(os.path.join(run, "tensorboard"))], config.checkpoint_steps, stage="search",
        advice=f"Try a lower --learning_rate ({config.learning_rate:g}) or --arch_learning_rate (this run: {peak:g})")
    wall = time.perf_counter() - start

    chosen = select_epoch(history.history, search, config.cost_metric)
    full_flops = supernet.full_cost("flops")
    space = supernet.space
    arch = space.shape(chosen["widths"], chosen["depths"], {
        "source": "tas_search", "target_ratio": target_ratio, "cost_metric": config.cost_metric, "band": config.band,
        "tolerance": config.tolerance,
        "epoch": chosen["epoch"], "flops": chosen["flops"], "params": chosen["params"],
        "flops_ratio": chosen["flops"] / full_flops, "params_ratio": chosen["params"] / supernet.full_cost("params"),
        "epochs": config.epochs, "seed": config.seed,
        "model": config.model_name, "dataset": dataset.name, "width_multiple": config.width_multiple,
        "arch_learning_rate": peak, "arch_warmup": config.arch_warmup, "arch_decay": config.arch_decay,
        "entropy_weight": config.entropy_weight, "arch_start_full": config.arch_start_full, "tau_max": config.tau_max,
        "search_wall_time_s": round(wall, 2),
        **(latency_provenance(chosen[LATENCY], search.latency, config.latency_table) if table else {})})
    plots.plot_search(history.history, space, [space.shape(e["widths"], e["depths"]) for e in history.history],
                      full_flops, os.path.join(run, PLOT_FILE))
    plots.plot_search_curves(history.history, os.path.join(run, CURVES_FILE))
    arch.save(os.path.join(run, ARCH_FILE))
    return arch.to_dict()


def latency_target_ratio(target_ms, layout, table):
    """The target ratio of a target in ms: its fraction of the full network's latency in `table`."""
    full_ms = predict_latency(layout, layout.space.full_shape(), table)
    if not 0 < target_ms < full_ms:
        raise ValueError(f"target latency {target_ms} ms must be in (0, {full_ms:.4f}), the full {layout.space.name}'s "
                         f"latency in {table.path}")
    return target_ms / full_ms


def latency_provenance(latency_ms, latency, table_path):
    """What arch.json records of a latency search: the predicted latency and the table it came from."""
    table = latency.table
    return {"latency_ms": latency_ms, "latency_ratio": latency_ms / latency.full_ms,
            "full_latency_ms": latency.full_ms,
            "latency_table": {"path": os.path.abspath(table_path), "quantize": table.quantize,
                              "threads": table.threads, "made_for": table.describe()}}
