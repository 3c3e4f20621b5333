"""What every training stage shares: the reference SGD recipe, a resumable fit that stops when
training diverges, backups of the training state."""

import dataclasses
import logging
import math
import os
import time

import h5py
import keras
import numpy as np
import tensorflow as tf

from tas_keras.configs import CHECKPOINT_STEPS, TrainingConfig, configured_stage, recorded_as, recorded_when_given
from tas_keras.data import BUNDLED_DATASET
from tas_keras.cost import count_model
from tas_keras import input_convention as conventions
from tas_keras.models.registry import build_model, check_model_name, check_weights, image_side, is_model_file
from tas_keras.precision import float32_copy
from tas_keras.runs import prepare_run_dir, read_json, run_dir, write_json
from tas_keras.shapes import derive_network, load_shape

METRICS_FILE = "metrics.json"
MODEL_FILE = "model.keras"
EPOCHS_FILE = "epochs.json"
BACKUP_DIR = "backup"
CHECKPOINT_FILE = "latest.weights.h5"
PREVIOUS_CHECKPOINT_FILE = "previous.weights.h5"


def save_model(model, path):
    """Saves `model` as a float32 model, whatever dtype policy it was trained under."""
    tmp = path.removesuffix(".keras") + ".tmp.keras"
    float32_copy(model).save(tmp)
    os.replace(tmp, path)


def sgd(learning_rate, total_steps, momentum=0.9):
    """The reference recipe: SGD with Nesterov momentum, cosine decay to 0 over all steps."""
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, total_steps))
    return keras.optimizers.SGD(schedule, momentum=momentum, nesterov=True)


class EpochTimer(keras.callbacks.Callback):
    """Wall time of every epoch's training part (validation excluded), for throughput."""

    def __init__(self):
        super().__init__()
        self.durations = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_test_begin(self, logs=None):
        if hasattr(self, "_start"):
            self.durations.append(time.perf_counter() - self._start)
            del self._start

    def on_epoch_end(self, epoch, logs=None):
        self.on_test_begin()


def throughput(timer, images_per_epoch):
    """Images/s of the steady epochs (the first includes tracing when there are more)."""
    steady = timer.durations[1:] or timer.durations
    return images_per_epoch / float(np.median(steady)) if steady else None


def check_fits_data(input_shape, num_classes, dataset):
    """That a network taking `input_shape` images into `num_classes` classes fits `dataset`."""
    if num_classes != dataset.num_classes:
        raise ValueError(f"the shape has {num_classes} classes but {dataset.name} has {dataset.num_classes}")
    if tuple(input_shape) != tuple(dataset.image_shape):
        raise ValueError(f"the shape takes {tuple(input_shape)} inputs but {dataset.name} images are "
                         f"{tuple(dataset.image_shape)}")


def _cross_entropy():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _metrics(dataset):
    """(Pixel) accuracy, and for per-pixel labels the mean IoU over the classes (of the logits' argmax)."""
    accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    if not dataset.per_pixel_labels:
        return [accuracy]
    return [accuracy, keras.metrics.MeanIoU(dataset.num_classes, name="mean_iou", sparse_y_pred=False)]


def evaluate_classifier(model, dataset, batch_size, prefix=""):
    """Test-split accuracy (of pixels, for per-pixel labels, and then their mean IoU too) and loss (CE +
    the model's weight decay) of a trained model."""
    metrics = _metrics(dataset)
    model.compile(loss=_cross_entropy(), metrics=metrics)
    result = model.evaluate(dataset.test_batches(batch_size), return_dict=True, verbose=0)
    scores = {f"{prefix}test_{metric.name}": float(result[metric.name]) for metric in metrics}
    return {**scores, f"{prefix}test_loss": float(result["loss"])}


def chance_threshold(labels):
    """The accuracy a classifier that ignores its images reaches on `labels` (always the most frequent
    class; of masks [N, H, W], the most frequent pixel class), plus three standard errors of that rate
    over len(labels) images: a model at or below it is at chance."""
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel())
    rate = counts.max() / counts.sum()
    # Over images, not pixels: neighbouring pixels share their class, so an image is one observation.
    return float(rate + 3 * math.sqrt(rate * (1 - rate) / len(labels)))


def check_above_chance(model, dataset, batch_size, source, convention):
    """ValueError naming the likely causes when `model` scores at chance on the test split."""
    accuracy = evaluate_classifier(model, dataset, batch_size)["test_accuracy"]
    _, labels = dataset.test_pixels()
    if accuracy <= chance_threshold(labels):
        scored = "of the pixels of" if dataset.per_pixel_labels else "on"
        raise ValueError(
            f"{source} scores {accuracy:.1%} {scored} the {len(labels)} test images of {dataset.name}, no better than "
            f"chance: check how its images are fed (--input_convention; it was fed {convention!r}), the class "
            f"order (the data's classes in sorted order: {', '.join(dataset.class_names[:3])}, ...) and the image "
            f"size (--image_size); --nocheck_base prunes it anyway")
    return accuracy


class EpochLog(keras.callbacks.Callback):
    """Every epoch's logs, in a JSON list kept across resumed runs (`history`).

    Entries are keyed by epoch, so an epoch re-run after a resume replaces its entry.
    """

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.entries = {e["epoch"]: e for e in read_json(path)} if os.path.exists(path) else {}

    def entry(self, epoch, logs):
        return {"epoch": epoch, "logs": {k: float(v) for k, v in (logs or {}).items()}}

    def on_epoch_end(self, epoch, logs=None):
        self.entries[epoch] = self.entry(epoch, logs)
        write_json(self.path, self.history)

    @property
    def history(self):
        return [self.entries[e] for e in sorted(self.entries)]


class DivergenceError(RuntimeError):
    """Training produced a loss or a variable that is not finite (NaN or infinite)."""


class BackupError(ValueError):
    """A run's backups exist but none can be read."""


class _StepCounter(keras.callbacks.Callback):
    """Knows the global step (the optimizer's iteration count) after every batch."""

    def __init__(self, steps_per_epoch):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch

    def on_train_begin(self, logs=None):
        # Counted here rather than read from the optimizer every batch, which would wait for the device.
        self.step = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1  # one step per batch call: these models train with steps_per_execution=1


class StopOnDivergence(_StepCounter):
    """Raises DivergenceError at the first step whose logged values or whose variables (weights, BN
    statistics, the search's architecture weights and tau, the optimizer's state) are not finite,
    and at an epoch end whose validation values are not.

    keras.callbacks.TerminateOnNaN only ends `fit` (quietly, or with a bare RuntimeError) and checks
    the loss alone: the stage would go on to save a model full of NaN and exit 0. Placed before every
    other callback, this one also keeps a diverged step out of the backups and the epoch logs.
    """

    def __init__(self, stage, steps_per_epoch, advice, backup_dir):
        super().__init__(steps_per_epoch)
        self.stage, self.advice, self.backup_dir = stage, advice, backup_dir

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.variables = [v for v in [*self.model.variables, *self.model.optimizer.variables]
                          if keras.backend.is_float_dtype(v.dtype)]
        # One traced check of every variable: under a millisecond a step for a ResNet-20 on a CPU.
        self.all_finite = tf.function(lambda: tf.reduce_all([tf.reduce_all(tf.math.is_finite(v))
                                                             for v in self.variables]))

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        self.check_logs(logs)
        if not self.all_finite():
            bad = [v.path for v in self.variables if not np.isfinite(keras.ops.convert_to_numpy(v)).all()]
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise self.error(f"variables {shown} are not finite")

    def on_epoch_end(self, epoch, logs=None):
        self.check_logs(logs)

    def check_logs(self, logs):
        bad = {name: value for name, value in (logs or {}).items() if not math.isfinite(value)}
        if bad:
            raise self.error(", ".join(f"{name} = {value}" for name, value in bad.items()))

    def error(self, what):
        epoch, position = divmod(self.step - 1, self.steps_per_epoch)
        kept = (f"; {self.backup_dir} keeps the last training state before it"
                if os.path.exists(os.path.join(self.backup_dir, CHECKPOINT_FILE)) else "")
        return DivergenceError(f"{self.stage} diverged at epoch {epoch + 1}, step {position + 1} of "
                               f"{self.steps_per_epoch}: {what}. {self.advice}, and start afresh with "
                               f"--overwrite{kept}")


class TrainingCheckpoint(_StepCounter):
    """Backs up the whole training state every `every_steps` steps and at every epoch end: the
    model's weights, its optimizers' states and its other variables (the search's tau), as one Keras
    weights file.

    A new backup is written beside the last one and read back whole before it becomes
    latest.weights.h5, the last one previous.weights.h5: a backup cut short (a kill, a full disk)
    never replaces a good one, and a latest one damaged later still has the previous one behind it.

    The step is the optimizer's iteration count, so the epoch and the position in it follow from
    the file alone. The last step of an epoch is only backed up at the epoch end: a backup at an
    epoch boundary then means that every callback placed before this one has finished the epoch.
    """

    def __init__(self, directory, steps_per_epoch, every_steps=CHECKPOINT_STEPS):
        super().__init__(steps_per_epoch)
        if every_steps < 1:
            raise ValueError(f"checkpoint interval must be >= 1 step, got {every_steps!r}")
        self.path = os.path.join(directory, CHECKPOINT_FILE)
        self.previous_path = os.path.join(directory, PREVIOUS_CHECKPOINT_FILE)
        self.every_steps = every_steps

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.step % self.every_steps == 0 and self.step % self.steps_per_epoch:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        self.save()

    def save(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path.removesuffix(".weights.h5") + ".tmp.weights.h5"
        try:
            self.model.save_weights(tmp)
            read_backup(tmp)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        if os.path.exists(self.path):
            os.replace(self.path, self.previous_path)
        os.replace(tmp, self.path)


def read_backup(path):
    """Reads every array of a Keras weights file; h5py raises on a truncated or damaged one."""

    def read(name, item):
        if isinstance(item, h5py.Dataset):
            item[()]  # returns None: visititems stops at the first non-None value

    with h5py.File(path, "r") as backup:
        backup.visititems(read)


def restore_checkpoint(model, directory):
    """Loads the latest readable training state backed up in `directory`; returns the global step
    reached (0 without a backup).

    An unreadable latest backup falls back to the previous one, with a warning; BackupError, naming
    the files, when there are backups and none can be read."""
    unreadable = []
    for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE):
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        try:
            read_backup(path)
        except (OSError, RuntimeError, KeyError, ValueError) as error:
            logging.warning("cannot read the backup %s (%s)", path, error)
            unreadable.append(f"{path} ({error})")
            continue
        if unreadable:
            logging.warning("resuming from the previous backup %s instead", path)
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(path)
        return int(model.optimizer.iterations.numpy())
    if unreadable:
        raise BackupError(f"no readable backup to resume from: {'; '.join(unreadable)}. Start afresh with "
                          "--overwrite")
    return 0


def fit_resumable(model, batches, steps_per_epoch, epochs, out, callbacks, checkpoint_steps=CHECKPOINT_STEPS,
                  stage="training", advice="Try a lower --learning_rate", **fit_kwargs):
    """`model.fit` for `epochs` epochs that continues a killed run at the step where its last backup
    (in `out/backup`) left it: weights, optimizer states, epoch and position in the epoch.

    `batches(start_step)` must give the batches from global step `start_step` to the end of the run,
    each a function of its step alone (`data.train_pipeline`). An interrupted epoch is finished on its
    remaining batches first, so its logged metrics cover those batches only. Every worker of a
    cluster restores the chief's backup (the BackupAndRestore contract: `out` is on a shared
    filesystem) and writes its own. A step that diverges raises DivergenceError naming `stage` and
    giving `advice` (what to try), before any other callback or backup sees it.
    """
    step = restore_checkpoint(model, os.path.join(out, BACKUP_DIR))
    if step:
        logging.info("resuming %s at epoch %d, step %d of %d", out, step // steps_per_epoch + 1,
                     step % steps_per_epoch, steps_per_epoch)
    backup_dir = os.path.join(run_dir(out), BACKUP_DIR)
    callbacks = [StopOnDivergence(stage, steps_per_epoch, advice, backup_dir), *callbacks,
                 TrainingCheckpoint(backup_dir, steps_per_epoch, checkpoint_steps)]
    while step < epochs * steps_per_epoch:
        epoch, position = divmod(step, steps_per_epoch)
        # The rest of an interrupted epoch is a run of its own, then whole epochs to the end.
        last_epoch = epoch + 1 if position else epochs
        run_steps = steps_per_epoch - position if position else steps_per_epoch
        model.fit(batches(step), initial_epoch=epoch, epochs=last_epoch, steps_per_epoch=run_steps,
                  callbacks=callbacks, shuffle=False, verbose=2 if os.environ.get("CI") else 1, **fit_kwargs)
        step = last_epoch * steps_per_epoch


def fit_classifier(model, dataset, out, epochs, batch_size, learning_rate, seed,
                   checkpoint_steps=CHECKPOINT_STEPS, stage="training"):
    """Compiles `model` with the reference recipe and trains it, resuming from `out/backup`; a
    diverging step stops it (DivergenceError, naming `stage`).

    Returns the per-epoch history (of every epoch, resumed runs included: `out/epochs.json`), the
    epochs, the fit wall time, the training throughput of the epochs run here and the files the
    dataset skipped."""
    steps = dataset.train_size // batch_size

    def batches(start_step):
        return dataset.train_batches(batch_size, seed=seed, epochs=epochs, start_step=start_step)

    test = dataset.test_batches(batch_size)
    model.compile(optimizer=sgd(learning_rate, steps * epochs), loss=_cross_entropy(), metrics=_metrics(dataset))
    timer, log = EpochTimer(), EpochLog(os.path.join(run_dir(out), EPOCHS_FILE))
    callbacks = [keras.callbacks.TensorBoard(os.path.join(run_dir(out), "tensorboard")), timer, log]
    start = time.perf_counter()
    fit_resumable(model, batches, steps, epochs, out, callbacks, checkpoint_steps, stage=stage,
                  advice=f"Try a lower --learning_rate (this run: {learning_rate:g})", validation_data=test)
    wall = time.perf_counter() - start
    return {
        "epochs": epochs,
        "fit_wall_time_s": round(wall, 2),
        "train_images_per_second": throughput(timer, steps * batch_size),
        "files_skipped": dataset.files_skipped,
        "history": {name: [e["logs"][name] for e in log.history] for name in log.history[-1]["logs"]},
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseConfig(TrainingConfig):
    """The settings of training a full network or a shape from scratch (`train_base`).

    `model_name`: a registry name (`tas_keras.models.registry`), built at the dataset's image size and
    classes; or `arch_path`, a shape's file (`tas_keras.shapes.load_shape`) whose network is trained
    instead. `weights` (e.g. "imagenet", `registry.PRETRAINED`): start the registry network from those
    pretrained weights and a fresh classifier for the dataset's classes (transfer learning: fine-tuning,
    at a fine-tuning `learning_rate` such as 0.01). The data, run and schedule settings are
    `TrainingConfig`'s: a model holding its own preprocessing takes raw pixels (`input_convention`);
    `image_size` defaults for a shape to its input side.
    """

    stage = "base"

    model_name: str = recorded_as("model", "resnet20")
    arch_path: str = recorded_as("arch", None)
    dataset_name: object = recorded_as("dataset", BUNDLED_DATASET)
    weights: str = recorded_when_given(None)

    def validate(self):
        super().validate()
        if self.weights and self.arch_path:
            raise ValueError(f"pretrained weights ({self.weights!r}) are for a registry network, not the shape "
                             f"{self.arch_path}")
        if not self.arch_path:
            if is_model_file(self.model_name):
                raise ValueError(f"{self.model_name} is a trained model already: give it to train.prune as "
                                 "--model, or train a registry network")
            check_model_name(self.model_name)
            check_weights(self.model_name, self.weights)


@configured_stage(BaseConfig)
def train_base(out, config, overwrite):
    """Trains the full network `config.model_name`, or the shape at `config.arch_path`, from scratch or
    from its pretrained `config.weights` (`BaseConfig`); writes model.keras (float32) and metrics.json,
    which it returns, backing the training state up every `checkpoint_steps` steps and every epoch."""
    pruned = load_shape(config.arch_path) if config.arch_path else None
    image_size = image_side(pruned.input_shape) if pruned and config.image_size is None else config.image_size
    dataset = config.load_dataset(image_size)
    if pruned:
        check_fits_data(pruned.input_shape, pruned.num_classes, dataset)
    run, finished = prepare_run_dir(out, config.run_record(), overwrite, done_file=METRICS_FILE)
    if finished:
        logging.info("%s already holds this finished run; nothing to do", out)
        return read_json(os.path.join(out, METRICS_FILE))

    keras.utils.set_random_seed(config.seed)
    model = derive_network(pruned) if pruned else build_model(config.model_name, dataset.image_shape,
                                                              dataset.num_classes, weights=config.weights)
    dataset = conventions.feed(dataset, model, config.input_convention)
    start = time.perf_counter()
    metrics = fit_classifier(model, dataset, out, config.epochs, config.batch_size, config.learning_rate,
                             config.seed, config.checkpoint_steps, stage="base training")
    metrics.update(evaluate_classifier(model, dataset, config.batch_size))
    cost = count_model(model)
    metrics.update(model=pruned.name if pruned else config.model_name, dataset=dataset.name,
                   input_convention=conventions.resolve(model, config.input_convention), weights=config.weights,
                   train_examples=dataset.train_size, flops=cost.flops, params=cost.params,
                   wall_time_s=round(time.perf_counter() - start, 2))
    save_model(model, os.path.join(run, MODEL_FILE))
    write_json(os.path.join(run, METRICS_FILE), metrics)
    return metrics
