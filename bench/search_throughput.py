"""Search throughput against plain training of the same network, same batch, same machine, one run.

  python -m bench.search_throughput --model=resnet20 --batch_size=128 --steps=30
  python -m bench.search_throughput --model=mobilenet_v2 --image_size=96 --batch_size=32 --steps=10
  python -m bench.search_throughput --model=resnet56 --mixed_precision=mixed_bfloat16   # on a GPU

`--model` is any name of the model registry (the CIFAR ResNets, resnet18/34, resnet50, mobilenet_v2)
or a .keras file; the search runs the supernet `train.search` runs (`tas_keras.supernet.build_supernet`:
the reference's independent Adds with every conv normalised for the CIFAR ResNets, tied otherwise). Both
run on synthetic in-memory batches, so only the model's compute is timed. A search step consumes a
search-train and a search-valid batch; "cost per image" compares seconds per image of the search
(train + valid images) with seconds per image of plain training: 1.0 means the search costs what
plain training costs per image. It is given for wall time (the fastest of the interleaved repeats)
and for the CPU time of the process, which the other jobs of a shared machine disturb less. Also
times the first fit of each (tracing and graph optimisation, before the first step runs), and one
backup of the whole search state (supernet, both optimizers) and its share of the training time at
the default interval. Writes bench/results/search_throughput_<model>.json
(search_throughput_<model>_<policy>.json under --mixed_precision, which both run under).
"""

import json
import os
import platform
import tempfile
import time

from absl import app, flags
import keras
import tensorflow as tf

from tas_keras.models.registry import build_model, is_model_file
from tas_keras.precision import MIXED_PRECISION, dtype_policy_scope
from tas_keras.search import TASSearchModel
from tas_keras.supernet import build_supernet
from tas_keras.runs import write_json
from tas_keras.configs import CHECKPOINT_STEPS
from tas_keras.training import TrainingCheckpoint, sgd

_MODEL = flags.DEFINE_string("model", "resnet20", "Network to compare: a registry name or a .keras file.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Input height and width (default: the registry's).")
_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classes of a registry model.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Images per batch (a search step takes two batches).")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per measurement, after a warm-up epoch.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Interleaved measurements of each (best is kept).")
_MIXED_PRECISION = flags.DEFINE_enum("mixed_precision", None, list(MIXED_PRECISION),
                                     "Time both under this dtype policy (default: float32).")
_OUT = flags.DEFINE_string("out", None, "JSON path (default bench/results/search_throughput_<model>.json).")


def _batches(image_shape, classes, batch_size, steps, seed):
    images = tf.random.stateless_normal((batch_size, *image_shape), [seed, 0])
    labels = tf.random.stateless_uniform((batch_size,), [seed, 1], maxval=classes, dtype=tf.int32)
    return tf.data.Dataset.from_tensors((images, labels)).repeat(steps)


def _first_fit_seconds(model, dataset):
    """Wall seconds of a model's first fit (two steps): tracing the step and optimising its graph, what a
    run waits for before its first step."""
    start = time.perf_counter()
    model.fit(dataset.take(2), epochs=1, verbose=0)
    return time.perf_counter() - start


def _timed_fit(model, dataset, steps):
    """(wall seconds, CPU seconds of this process) for `steps` steps of model.fit, after a two-step
    warm-up fit (so every repeat starts alike)."""
    model.fit(dataset.take(2), epochs=1, verbose=0)
    start, start_cpu = time.perf_counter(), time.process_time()
    model.fit(dataset.take(steps), epochs=1, verbose=0)
    return time.perf_counter() - start, time.process_time() - start_cpu


def _backup_seconds(model, repeats=3):
    """Fastest of `repeats` backups of the model's whole training state."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = TrainingCheckpoint(directory, steps_per_epoch=1)
        checkpoint.set_model(model)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            checkpoint.save()
            times.append(time.perf_counter() - start)
    return min(times)


def main(argv):
    del argv
    with dtype_policy_scope(_MIXED_PRECISION.value):
        _bench()


def _bench():
    name, batch, steps = _MODEL.value, _BATCH.value, _STEPS.value
    keras.utils.set_random_seed(0)
    if is_model_file(name):
        plain = build_model(name)
    else:
        size = _IMAGE_SIZE.value
        plain = build_model(name, size and (size, size, 3), _CLASSES.value)
    image_shape, classes = tuple(plain.inputs[0].shape[1:]), plain.outputs[0].shape[-1]
    plain.compile(optimizer=sgd(0.1, 10_000), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    plain_data = _batches(image_shape, classes, batch, steps + 2, 0)

    search = TASSearchModel(build_supernet(name, plain), target_ratio=0.5)
    search.compile(optimizer=sgd(0.1, 10_000), arch_optimizer=keras.optimizers.Adam(1e-3, 0.5, 0.999))
    search_data = tf.data.Dataset.zip((_batches(image_shape, classes, batch, steps + 2, 1),
                                       _batches(image_shape, classes, batch, steps + 2, 2)))

    plain_first_fit, search_first_fit = _first_fit_seconds(plain, plain_data), _first_fit_seconds(search, search_data)
    plain_runs, search_runs = [], []
    for _ in range(_REPEATS.value):  # interleaved, so background load hits both alike
        plain_runs.append(_timed_fit(plain, plain_data, steps))
        search_runs.append(_timed_fit(search, search_data, steps))
    (plain_times, plain_cpu), (search_times, search_cpu) = zip(*plain_runs), zip(*search_runs)
    plain_rate = batch * steps / min(plain_times)
    search_rate = 2 * batch * steps / min(search_times)
    backup = _backup_seconds(search)
    result = {
        "model": name, "mixed_precision": _MIXED_PRECISION.value, "image_shape": list(image_shape),
        "classes": classes, "add_mode": search.supernet.space.add_mode,
        "batch_size": batch, "steps": steps, "repeats": _REPEATS.value,
        "plain_images_per_second": round(plain_rate, 1),
        "search_images_per_second": round(search_rate, 1),
        "search_cost_per_image_vs_plain": round(plain_rate / search_rate, 3),
        "plain_seconds": [round(t, 2) for t in plain_times],
        "search_seconds": [round(t, 2) for t in search_times],
        # CPU time of this process: what other jobs on a shared machine disturb least.
        "search_cpu_cost_per_image_vs_plain": round(min(search_cpu) / (2 * min(plain_cpu)), 3),
        "plain_cpu_seconds": [round(t, 2) for t in plain_cpu],
        "search_cpu_seconds": [round(t, 2) for t in search_cpu],
        "plain_first_fit_seconds": round(plain_first_fit, 2),
        "search_first_fit_seconds": round(search_first_fit, 2),
        "backup_seconds": round(backup, 3),
        "backup_share_at_default_interval": round(backup / (CHECKPOINT_STEPS * min(search_times) / steps), 4),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, TF {tf.__version__}, Keras {keras.__version__}",
    }
    path = _OUT.value or os.path.join(os.path.dirname(__file__), "results",
                                      f"search_throughput_{plain.name if is_model_file(name) else name}"
                                      f"{'_' + _MIXED_PRECISION.value if _MIXED_PRECISION.value else ''}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)
