"""Training the pruned network (docs/design.md section 8): from scratch, from the teacher's weights, with KD."""

import dataclasses
import logging
import os
import time

import keras
import tensorflow as tf

from tas_keras import input_convention as conventions
from tas_keras.configs import TrainingConfig, configured_stage
from tas_keras.cost import count_model
from tas_keras.graph import load_model
from tas_keras.models.registry import image_side
from tas_keras.runs import prepare_run_dir, read_json, write_json
from tas_keras.shapes import derive_network, load_shape, shape_space
from tas_keras.training import (MODEL_FILE, METRICS_FILE, check_fits_data,
                                evaluate_classifier, fit_classifier, save_model)

MODES = ("scratch", "init", "kd", "init_kd")
SHAPE_FILE = "shape.json"  # beside model.keras: the shape it was built from


class KnowledgeDistiller(keras.distillation.Distiller):
    """(1 - alpha) * CE + alpha * T^2 * KL(teacher || student), plus the student's weight decay.

    keras.distillation computes this mixture (student_loss_weight = 1 - alpha) with two caveats, both
    pinned by tests: LogitsDistillation's default loss="kl_divergence" resolves to the KL *function*,
    which its code does not recognise, so the KL is taken on raw scaled logits without T^2; a
    KLDivergence *instance* gets the softmax and the T^2. And the Distiller leaves out the student's
    regularisation losses, which carry the recipe's coupled weight decay.
    """

    def __init__(self, teacher, student, alpha=0.9, temperature=4.0, **kwargs):
        if not 0 <= alpha <= 1:
            raise ValueError(f"KD alpha must be in [0, 1], got {alpha!r}")
        super().__init__(teacher=teacher, student=student,
                         distillation_losses=keras.distillation.LogitsDistillation(
                             temperature=temperature, loss=keras.losses.KLDivergence()),
                         student_loss_weight=1.0 - alpha, **kwargs)
        self(keras.ops.zeros((1, *student.input_shape[1:])))  # BackupAndRestore needs a built model

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
        if not self.student.losses:
            return loss
        # Like the Keras losses above, per-replica values are divided by the replica count (SUM all-reduce).
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return loss + keras.ops.sum(self.student.losses) / replicas


def load_teacher(path):
    if not path or not os.path.exists(path):
        raise ValueError(f"--teacher: no such model file {path!r}")
    teacher = load_model(path)
    teacher.trainable = False
    return teacher


def model_interface(model):
    """(input shape, classes) of a classifier: what KD needs a teacher to share with its student."""
    return tuple(model.input_shape[1:]), model.output_shape[-1]


def check_prunes_teacher(pruned, teacher, teacher_path, mode):
    """A shape trained from a teacher must fit it: KD compares logits (same classes and input), and
    init copies the teacher's weights by layer name, so the shape must be a point of the teacher's own
    space. KD from a teacher of another depth or family is allowed."""
    shape, classes = model_interface(teacher)
    fits = (shape, classes) == (pruned.input_shape, pruned.num_classes)
    if fits and mode.startswith("init"):
        try:
            shape_space(pruned, teacher).validate(pruned)
        except ValueError:
            fits = False
    if not fits:
        raise ValueError(f"the shape is a {pruned.name} with {pruned.num_classes} classes on {pruned.input_shape} "
                         f"images but the teacher {teacher_path} is a {teacher.name} with {classes} classes on "
                         f"{shape} images: give a shape of the teacher's network")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig(TrainingConfig):
    """The settings of training a pruned shape (`distill`).

    `arch_path`: the shape's file (`tas_keras.shapes.load_shape`; given when the stage runs: train.prune's
    distill config has none); `teacher_path`: the unpruned network
    (.keras) that `mode` ("kd", "init", "init_kd"; "scratch" without one) trains it from. `alpha` and
    `temperature`: `KnowledgeDistiller`'s. The data, run and schedule settings are `TrainingConfig`'s:
    `image_size` defaults to the shape's input side; the teacher is loaded under `mixed_precision` too,
    so it computes in it unless its file fixes its layers' dtypes; the pruned network keeps the source
    model's layers, so a model holding its own preprocessing is fed raw pixels (`input_convention`).
    """

    stage = "distill"

    arch_path: str = None
    teacher_path: str = None
    mode: str = "kd"
    alpha: float = 0.9
    temperature: float = 4.0

    def validate(self):
        super().validate()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"KD alpha must be in [0, 1], got {self.alpha!r}")
        if self.temperature <= 0:
            raise ValueError(f"KD temperature must be > 0, got {self.temperature!r}")


@configured_stage(DistillConfig)
def distill(out, config, overwrite):
    """Builds the plain network of the shape at `config.arch_path` and trains it by `config.mode`
    (`DistillConfig`); writes model.keras (a plain functional float32 model of stock Keras layers),
    shape.json (its GraphShape, with the search's provenance) and metrics.json (test accuracy, FLOPs,
    params, reduction against the teacher, wall time), which it returns."""
    if config.arch_path is None:
        raise ValueError("a distillation needs the shape to train (arch_path)")
    pruned = load_shape(config.arch_path)
    if config.mode != "scratch" and not config.teacher_path:
        raise ValueError(f"mode {config.mode!r} needs --teacher")
    teacher = load_teacher(config.teacher_path) if config.teacher_path else None
    if teacher is not None:
        check_prunes_teacher(pruned, teacher, config.teacher_path, config.mode)
    image_size = image_side(pruned.input_shape) if config.image_size is None else config.image_size
    dataset = config.load_dataset(image_size)
    check_fits_data(pruned.input_shape, pruned.num_classes, dataset)
    run, finished = prepare_run_dir(out, config.run_record(), overwrite, done_file=METRICS_FILE)
    if finished:
        logging.info("%s already holds this finished run; nothing to do", out)
        return read_json(os.path.join(out, METRICS_FILE))

    keras.utils.set_random_seed(config.seed)
    initialised = config.mode.startswith("init")
    student = derive_network(pruned, teacher if initialised else None, transfer_weights=initialised)
    dataset = conventions.feed(dataset, student, config.input_convention)
    distilled = config.mode.endswith("kd")
    trained = KnowledgeDistiller(teacher, student, config.alpha, config.temperature) if distilled else student
    start = time.perf_counter()
    metrics = fit_classifier(trained, dataset, out, config.epochs, config.batch_size, config.learning_rate,
                             config.seed, config.checkpoint_steps, stage=f"{config.mode} training")
    metrics.update(evaluate_classifier(student, dataset, config.batch_size))
    cost = count_model(student)
    metrics.update(mode=config.mode, model=pruned.name, dataset=dataset.name, flops=cost.flops, params=cost.params,
                   arch_provenance=dict(pruned.provenance), wall_time_s=round(time.perf_counter() - start, 2))
    if teacher is not None:
        teacher_cost = count_model(teacher)
        metrics.update(evaluate_classifier(teacher, dataset, config.batch_size, prefix="teacher_"))
        metrics.update(teacher_flops=teacher_cost.flops, teacher_params=teacher_cost.params,
                       flops_reduction=1 - cost.flops / teacher_cost.flops,
                       params_reduction=1 - cost.params / teacher_cost.params)
    save_model(student, os.path.join(run, MODEL_FILE))
    pruned.save(os.path.join(run, SHAPE_FILE))
    write_json(os.path.join(run, METRICS_FILE), metrics)
    return metrics

