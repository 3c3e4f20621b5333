"""Training the pruned network (docs/design.md section 8): from scratch, from the teacher's weights, with KD."""

import logging
import os
import time

import keras
import tensorflow as tf

from tas_keras import data
from tas_keras import input_convention as conventions
from tas_keras.distribute import in_strategy_scope
from tas_keras.cost import count_model
from tas_keras.graph import load_model
from tas_keras.models.registry import image_side
from tas_keras.precision import in_dtype_policy
from tas_keras.runs import locking_stage, prepare_run_dir, read_json, write_json
from tas_keras.shapes import derive_network, load_shape, shape_space
from tas_keras.training import (CHECKPOINT_STEPS, MODEL_FILE, METRICS_FILE, check_fits_data,
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


@in_strategy_scope
@locking_stage
@in_dtype_policy
def distill(out, arch_path, teacher_path=None, mode="kd", dataset_name=data.BUNDLED_DATASET, data_dir=None,
            epochs=10, batch_size=256, learning_rate=0.1, alpha=0.9, temperature=4.0, seed=0,
            max_train_examples=None, overwrite=False, checkpoint_steps=CHECKPOINT_STEPS, image_size=None,
            streaming="auto", mixed_precision=None, input_convention=None):
    """Builds the plain network of the shape at `arch_path` (`tas_keras.shapes.load_shape`) and trains it
    by `mode`; writes model.keras (a plain functional float32 model of stock Keras layers), shape.json
    (its GraphShape, with the search's provenance) and metrics.json (test accuracy, FLOPs, params,
    reduction against the teacher, wall time). `image_size` and `streaming`: as `data.load_dataset`
    takes them.

    `mixed_precision`: None (float32), "mixed_bfloat16" or "mixed_float16" (`tas_keras.precision`); the
    teacher is loaded under it too, so it computes in it unless its file fixes its layers' dtypes.
    `input_convention`: how the images are fed (`tas_keras.input_convention`; the pruned network keeps
    the source model's layers, so a model holding its own preprocessing is fed raw pixels)."""
    # How the images are read (streaming) does not change the run.
    settings = {k: v for k, v in locals().items() if k not in ("out", "overwrite", "checkpoint_steps", "streaming")}
    settings.update(stage="distill", dataset_name=data.recorded_name(dataset_name))
    if input_convention is None:  # only when given, so the runs made before it was a setting still match
        del settings["input_convention"]
    conventions.check(input_convention)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if temperature <= 0:
        raise ValueError(f"KD temperature must be > 0, got {temperature!r}")
    pruned = load_shape(arch_path)
    if mode != "scratch" and not teacher_path:
        raise ValueError(f"mode {mode!r} needs --teacher")
    teacher = load_teacher(teacher_path) if teacher_path else None
    if teacher is not None:
        check_prunes_teacher(pruned, teacher, teacher_path, mode)
    dataset = data.load_dataset(dataset_name, data_dir=data_dir, max_train_examples=max_train_examples, seed=seed,
                                image_size=image_side(pruned.input_shape) if image_size is None else image_size,
                                streaming=streaming)
    check_fits_data(pruned.input_shape, pruned.num_classes, dataset)
    run, finished = prepare_run_dir(out, settings, overwrite, done_file=METRICS_FILE)
    if finished:
        logging.info("%s already holds this finished run; nothing to do", out)
        return read_json(os.path.join(out, METRICS_FILE))

    keras.utils.set_random_seed(seed)
    initialised = mode.startswith("init")
    student = derive_network(pruned, teacher if initialised else None, transfer_weights=initialised)
    dataset = conventions.feed(dataset, student, input_convention)
    trained = KnowledgeDistiller(teacher, student, alpha, temperature) if mode.endswith("kd") else student
    start = time.perf_counter()
    metrics = fit_classifier(trained, dataset, out, epochs, batch_size, learning_rate, seed,
                             checkpoint_steps, stage=f"{mode} training")
    metrics.update(evaluate_classifier(student, dataset, batch_size))
    cost = count_model(student)
    metrics.update(mode=mode, model=pruned.name, dataset=dataset.name, flops=cost.flops, params=cost.params,
                   arch_provenance=dict(pruned.provenance), wall_time_s=round(time.perf_counter() - start, 2))
    if teacher is not None:
        teacher_cost = count_model(teacher)
        metrics.update(evaluate_classifier(teacher, dataset, batch_size, prefix="teacher_"))
        metrics.update(teacher_flops=teacher_cost.flops, teacher_params=teacher_cost.params,
                       flops_reduction=1 - cost.flops / teacher_cost.flops,
                       params_reduction=1 - cost.params / teacher_cost.params)
    save_model(student, os.path.join(run, MODEL_FILE))
    pruned.save(os.path.join(run, SHAPE_FILE))
    write_json(os.path.join(run, METRICS_FILE), metrics)
    return metrics

