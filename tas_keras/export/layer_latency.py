"""Makes a latency table on this machine: every layer of a search space alone, timed with LiteRT.

For every geometry the search space needs (`tas_keras.latency.required_entries`) and every (input
width, output width) pair of candidates, the layer is built alone as a Keras model (the same layers
the network builder uses: Conv2D, BN, ReLU, the residual Add, the shortcut's pooling), converted the
way the network is (SavedModel -> TFLite, fp32, or int8 calibrated on random inputs with int8 inputs
and outputs, so no quantise/dequantise op is timed that the network does not have) and timed with
LiteRT at batch 1 (XNNPACK, `threads`). All the pairs of one geometry and an "overhead" model (a 1x1
conv on one value: the cost of an invoke itself) are timed interleaved, A B C ... per run after a
warm-up; an entry is the median of its runs minus the overhead's median, with the spread (p10, p90)
recorded. The fixed cost is the median of a model that only takes the image and gives the logits
(global pooling and a Dense on the image: float input and output, quantised as the network is), which
holds the invoke overhead once and the input and output conversions.

Resumable: converted models are kept in `<out>.work/` (each written atomically), and the table is
rewritten atomically after every geometry, so a killed run continues where it stopped; the work
directory is removed when the table is complete.
"""

import datetime
import importlib.metadata
import logging
import os
import platform
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from tas_keras.export import convert, verify
from tas_keras.cost import count_arch
from tas_keras.latency import CONV, QUANTIZATIONS, TABLE_FORMAT, pair_key, predict_latency, required_entries
from tas_keras.layers import BN_EPSILON, BN_MOMENTUM
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.search_space import ArchConfig
from tas_keras.training import read_json, write_json

RUNS = 200
WARMUP = 20
# One untimed invoke before every timed one: a layer is timed with its weights in the caches, as it
# runs inside a network invoked back to back (timed right after the other layers of its group instead,
# ResNet-20's layers summed to 13-25% less than the network measured the same way).
REWARM = 1
CALIBRATION_SAMPLES = 8
WORK_SUFFIX = ".work"


def layer_model(geometry, in_width, out_width):
    """One layer of the network alone (random weights: a layer's time does not depend on them)."""
    inputs = [keras.Input((*geometry.input_size, in_width), name="input")]
    x = inputs[0]
    if geometry.kind != CONV:
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, keras.layers.Dense(out_width)(x))
    if geometry.pool_first:
        x = keras.layers.AveragePooling2D(2, padding="same")(x)
    x = keras.layers.Conv2D(out_width, geometry.kernel, strides=geometry.stride, padding="same", use_bias=False)(x)
    if geometry.batch_norm:
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON)(x)
    if geometry.residual_add:
        # The other operand of the block's Add (the shortcut's output) is a second input; its name
        # sorts after "input", so the converter keeps the Keras input order for calibration.
        inputs.append(keras.Input((*geometry.output_size, out_width), name="residual"))
        x = keras.layers.Add()([inputs[1], x])
    if geometry.relu or geometry.residual_add:
        x = keras.layers.ReLU()(x)
    return keras.Model(inputs, x)


def overhead_model():
    """A 1x1 conv on a single value: what invoking any model costs."""
    inputs = keras.Input((1, 1, 1), name="input")
    return keras.Model(inputs, keras.layers.Conv2D(1, 1)(inputs))


def rest_model(input_shape, num_classes):
    """Image in, logits out and (almost) nothing in between: the network's fixed cost."""
    inputs = keras.Input(input_shape, name="input")
    return keras.Model(inputs, keras.layers.Dense(num_classes)(keras.layers.GlobalAveragePooling2D()(inputs)))


def convert_model(model, quantize, path, integer_io=True):
    """Writes `model` as a .tflite file at `path` (atomically), converted as the network is; int8
    models are calibrated on random normal inputs and, with `integer_io`, take and give int8."""
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((CALIBRATION_SAMPLES, *x.shape[1:])).astype(np.float32)
                   for x in model.inputs]
    with tempfile.TemporaryDirectory() as scratch:
        saved_model = os.path.join(scratch, "saved_model")
        convert.export_saved_model(model, saved_model)
        payload = convert.convert_tflite(saved_model, quantize, calibration if quantize == "int8" else None,
                                         int8_io=integer_io and quantize == "int8")
    convert.write_bytes(path, payload)


class TimedModel:
    """A .tflite model loaded with LiteRT (XNNPACK, `threads`), its inputs set to random values."""

    def __init__(self, path, threads, seed=0):
        self.interpreter = Interpreter(model_path=path, num_threads=threads)
        self.interpreter.allocate_tensors()
        rng = np.random.default_rng(seed)
        for detail in self.interpreter.get_input_details():
            dtype = np.dtype(detail["dtype"])
            if np.issubdtype(dtype, np.integer):
                values = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, detail["shape"], endpoint=True)
            else:
                values = rng.standard_normal(detail["shape"])
            self.interpreter.set_tensor(detail["index"], values.astype(dtype))


def spread(samples, minus=0.0):
    """The median (at least 0), p10 and p90 (ms) of invoke times, less `minus` (an overhead)."""
    samples = np.asarray(samples) - minus
    return {"ms": round(max(0.0, float(np.median(samples))), 5),
            "p10_ms": round(float(np.percentile(samples, 10)), 5),
            "p90_ms": round(float(np.percentile(samples, 90)), 5)}


def time_interleaved(paths, threads, runs, warmup=WARMUP):
    """Invoke times (ms) of the .tflite files `paths` (random inputs), timed interleaved A B C ..., every
    timed invoke right after an untimed one of the same model."""
    models = [TimedModel(path, threads, seed) for seed, path in enumerate(paths)]
    return verify.interleaved_latency(models, None, runs, warmup, REWARM)


def environment():
    """Where the table was measured."""
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "cpu": cpu,
            "system": platform.platform(), "ai_edge_litert": importlib.metadata.version("ai-edge-litert"),
            "tensorflow": tf.__version__, "keras": keras.__version__}


def _settings(table):
    """The settings a table was made with: a table is continued only with the same ones."""
    return {"quantize": table["quantize"], "threads": table["threads"],
            "width_multiple": table["space"]["width_multiple"], "num_classes": table["space"]["num_classes"],
            "input_shape": table["space"]["input_shape"], "runs": table["measurement"]["runs"],
            "warmup": table["measurement"]["warmup"]}


def _new_table(models, quantize, threads, width_multiple, num_classes, input_shape, runs, warmup, note):
    return {
        "format": TABLE_FORMAT,
        "quantize": quantize,
        "threads": threads,
        "space": {"models": sorted(models), "input_shape": list(input_shape), "num_classes": num_classes,
                  "width_multiple": width_multiple},
        "measurement": {
            "runtime": "LiteRT (ai_edge_litert.interpreter), XNNPACK, batch 1", "runs": runs, "warmup": warmup,
            "rewarm": REWARM,
            "method": "each geometry's width pairs and an overhead model (1x1 conv on one value) timed "
                      "interleaved, A B C ... per run, each timed invoke right after an untimed one; entry = median - the overhead's median; fixed = median "
                      "of an image-in, logits-out model (global pooling + Dense, float I/O)"},
        "environment": environment(),
        "note": note,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "fixed": None,
        "entries": {},
        "complete": False,
    }


def _continued(out, new):
    """The table at `out` to continue if it was made with the settings of `new`; a ValueError if not."""
    try:
        table = read_json(out)
    except (ValueError, OSError):
        table = {}
    if table.get("format") != TABLE_FORMAT:
        raise ValueError(f"{out} exists and is not a latency table; use another --out or --overwrite")
    held, wanted = _settings(table), _settings(new)
    changed = sorted(key for key in wanted if held[key] != wanted[key])
    if changed:
        raise ValueError(f"{out} holds a table made with {', '.join(f'{k}={held[k]}' for k in changed)}, not "
                         f"{', '.join(f'{k}={wanted[k]}' for k in changed)}; use another --out or --overwrite")
    table["space"]["models"] = sorted(set(table["space"]["models"]) | set(new["space"]["models"]))
    table["complete"] = False
    return table


def _file_name(key):
    return key.replace("/", "_")


def make_table(out, models=("resnet20",), quantize="none", threads=1, width_multiple=1, num_classes=10,
               input_shape=(32, 32, 3), runs=RUNS, warmup=WARMUP, note="", overwrite=False, progress=None):
    """Measures (or completes) the latency table of the search spaces of `models` into `out` (JSON).

    `progress(done, total)`, if given, is called as models are converted and timed. Returns the table.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if min(threads, runs, width_multiple) < 1 or warmup < 0:
        raise ValueError(f"threads, runs and width_multiple must be >= 1 and warmup >= 0, got {threads}, {runs}, "
                         f"{width_multiple} and {warmup}")
    needed = {}
    for model_name in models:
        full = ArchConfig.full(model_name, num_classes=num_classes, input_shape=input_shape)
        for geometry, pairs in required_entries(full, width_multiple).items():
            needed.setdefault(geometry, set()).update(pairs)
    table = _new_table(models, quantize, threads, width_multiple, num_classes, input_shape, runs, warmup, note)
    if overwrite:
        shutil.rmtree(out + WORK_SUFFIX, ignore_errors=True)
    elif os.path.exists(out):
        table = _continued(out, table)
    work = os.path.join(out + WORK_SUFFIX, quantize)
    overhead = os.path.join(work, "overhead.tflite")
    if not os.path.exists(overhead):
        convert_model(overhead_model(), quantize, overhead)

    pending = {geometry: sorted(pairs - {tuple(int(w) for w in key.split("->"))
                                         for key in table["entries"].get(geometry.key, {}).get("times", {})})
               for geometry, pairs in sorted(needed.items(), key=lambda item: item[0].key)}
    total = sum(len(pairs) for pairs in pending.values()) + (table["fixed"] is None)
    done = 0
    logging.info("latency table %s: %d layer models to time (%s, %d thread(s))", out, total, quantize, threads)
    for geometry, pairs in pending.items():
        if not pairs:
            continue
        paths = []
        for a, b in pairs:
            path = os.path.join(work, _file_name(geometry.key), f"{a}-{b}.tflite")
            if not os.path.exists(path):
                convert_model(layer_model(geometry, a, b), quantize, path)
            paths.append(path)
            done += 1
            if progress:
                progress(done, total)
        base, *samples = time_interleaved([overhead, *paths], threads, runs, warmup)
        base_ms = float(np.median(base))
        entry = table["entries"].setdefault(geometry.key, {"geometry": geometry.to_dict(), "times": {}})
        entry.setdefault("overhead_ms", []).append(round(base_ms, 5))
        for (a, b), timed in zip(pairs, samples):
            entry["times"][pair_key(a, b)] = {**spread(timed, base_ms),
                                              "raw_median_ms": round(float(np.median(timed)), 5)}
        write_json(out, table)
        logging.info("%s: %d pairs timed (overhead %.4f ms)", geometry.key, len(pairs), base_ms)

    if table["fixed"] is None:
        rest = os.path.join(work, "rest.tflite")
        convert_model(rest_model(tuple(input_shape), num_classes), quantize, rest, integer_io=False)
        base, timed = time_interleaved([overhead, rest], threads, runs, warmup)
        table["fixed"] = {**spread(timed), "overhead_ms": round(float(np.median(base)), 5)}
        done += 1
        if progress:
            progress(done, total)
    table["complete"] = True
    table["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    table["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(out, table)
    shutil.rmtree(out + WORK_SUFFIX, ignore_errors=True)
    return table


def measure_networks(table, shapes, runs, workdir):
    """The table's prediction and the measured latency of every (name, ArchConfig) of `shapes`, built
    with random weights, converted as the table's quantisation (float input and output, as the
    pipeline exports) and timed interleaved at its threads; with the load average at the start."""
    paths = []
    for name, arch in shapes:
        paths.append(os.path.join(workdir, f"{name}.tflite"))
        convert_model(CifarResNet(arch), table.quantize, paths[-1], integer_io=False)
    load = os.getloadavg()
    samples = time_interleaved(paths, table.threads, runs)
    rows = []
    for (name, arch), timed in zip(shapes, samples):
        predicted = predict_latency(arch, table)
        measured = spread(timed)
        rows.append({"shape": name, "widths": list(arch.widths), "stage_blocks": list(arch.stage_blocks),
                     "mflops": round(count_arch(arch).flops / 1e6, 3), "predicted_ms": round(predicted, 5),
                     "measured_ms": measured["ms"], "measured_p10_ms": measured["p10_ms"],
                     "measured_p90_ms": measured["p90_ms"], "error": round(predicted / measured["ms"] - 1, 4)})
    return rows, [round(x, 2) for x in load]
