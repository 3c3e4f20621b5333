"""Makes a latency table on this machine: every timed unit of a search space alone, timed with LiteRT.

For every geometry the search space needs (`tas_keras.latency.LatencyLayout.required_entries`) and every
(input width, output width) pair it needs (or, with `grid`, a grid of them), the unit is built alone as
Keras layers of the model's classes and settings (`LatencyLayout.unit_model`), converted the way the
network is (SavedModel -> TFLite, fp32, or int8 calibrated on random inputs with int8 inputs and outputs,
so no quantise/dequantise op is timed that the network does not have) and timed with LiteRT at batch 1
(XNNPACK, `threads`). All the pairs of one geometry and an "overhead" model (a 1x1 conv on one value:
the cost of an invoke itself) are timed interleaved, A B C ... per run after a warm-up; an entry is the
median of its runs minus the overhead's median, with the spread (p10, p90) recorded. The fixed cost is
the median of the exported form with (almost) nothing inside: uint8 pixels in, the normalisation, a
global pooling and a Dense to the logits out (float output, as the pipeline exports), which holds the
invoke overhead once and the input and output conversions.

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

from tas_keras.cost import count_shape
from tas_keras.derive import derive_model
from tas_keras.export import convert, verify
from tas_keras.latency import QUANTIZATIONS, TABLE_FORMAT, LatencyLayout, pair_key, predict_latency
from tas_keras.models.registry import build_model, image_size_for, is_model_file
from tas_keras.supernet import search_space
from tas_keras.training import read_json, write_json

RUNS = 200
WARMUP = 20
# One untimed invoke before every timed one: a layer is timed with its weights in the caches, as it
# runs inside a network invoked back to back (timed right after the other layers of its group instead,
# ResNet-20's layers summed to 13-25% less than the network measured the same way).
REWARM = 1
CALIBRATION_SAMPLES = 8
WORK_SUFFIX = ".work"
# The normalisation inside the exported form: its time does not depend on the statistics.
PIXEL_MEAN, PIXEL_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def table_model(model_name, image_size=None, num_classes=None):
    """The full network a table is made for: a registry network at `image_size` and `num_classes` (its
    defaults when None), or the model of a .keras file (which brings its own)."""
    if is_model_file(model_name):
        return build_model(model_name)
    size = image_size_for(model_name, image_size)
    return build_model(model_name, (size, size, 3) if size else None, num_classes)


def table_layout(model_name, model, width_multiple=1, add_mode=None):
    """The timed units of the search space `run_search` reads from `model` (the network `model_name`)."""
    return LatencyLayout(search_space(model_name, model, add_mode, width_multiple), model)


def exported_form(model):
    """`model` as the pipeline exports it: uint8 pixels in, the normalisation inside."""
    return convert.pixel_input_model(model, PIXEL_MEAN, PIXEL_STD)


def overhead_model():
    """A 1x1 conv on a single value: what invoking any model costs."""
    inputs = keras.Input((1, 1, 1), name="input")
    return keras.Model(inputs, keras.layers.Conv2D(1, 1)(inputs))


def rest_model(input_shape, num_classes):
    """The exported form with (almost) nothing inside: the network's fixed cost."""
    inputs = keras.Input(input_shape, name="input")
    return exported_form(keras.Model(inputs, keras.layers.Dense(num_classes)(
        keras.layers.GlobalAveragePooling2D()(inputs))))


def convert_model(model, quantize, path, integer_io=True):
    """Writes `model` as a .tflite file at `path` (atomically), converted as the network is; int8
    models are calibrated on random inputs (normal, or pixels for a uint8 input) and, with `integer_io`,
    take and give int8 (a uint8 input stays uint8)."""
    rng = np.random.default_rng(0)
    calibration = [rng.integers(0, 256, (CALIBRATION_SAMPLES, *x.shape[1:])).astype(np.uint8) if x.dtype == "uint8"
                   else rng.standard_normal((CALIBRATION_SAMPLES, *x.shape[1:])).astype(np.float32)
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
    return {"quantize": table["quantize"], "threads": table["threads"], **{
        key: table["space"][key] for key in ("width_multiple", "num_classes", "input_shape", "grid", "add_mode")},
        "runs": table["measurement"]["runs"], "warmup": table["measurement"]["warmup"]}


def _new_table(models, quantize, threads, width_multiple, num_classes, input_shape, grid, add_mode, runs, warmup,
               note):
    return {
        "format": TABLE_FORMAT,
        "quantize": quantize,
        "threads": threads,
        "space": {"models": sorted(models), "input_shape": list(input_shape), "num_classes": num_classes,
                  "width_multiple": width_multiple, "grid": grid, "add_mode": add_mode},
        "measurement": {
            "runtime": "LiteRT (ai_edge_litert.interpreter), XNNPACK, batch 1", "runs": runs, "warmup": warmup,
            "rewarm": REWARM,
            "method": "each geometry's width pairs and an overhead model (1x1 conv on one value) timed "
                      "interleaved, A B C ... per run, each timed invoke right after an untimed one; entry = "
                      "median - the overhead's median; fixed = median of the exported form (uint8 pixels, "
                      "normalisation, global pooling + Dense, float output)"},
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
        raise ValueError(f"{out} exists and is not a latency table of format {TABLE_FORMAT!r}; use another --out "
                         "or --overwrite")
    held, wanted = _settings(table), _settings(new)
    changed = sorted(key for key in wanted if held[key] != wanted[key])
    if changed:
        raise ValueError(f"{out} holds a table made with {', '.join(f'{k}={held[k]}' for k in changed)}, not "
                         f"{', '.join(f'{k}={wanted[k]}' for k in changed)}; use another --out or --overwrite")
    table["space"]["models"] = sorted(set(table["space"]["models"]) | set(new["space"]["models"]))
    table["complete"] = False
    return table


def grid_widths(widths, grid):
    """`grid` widths spread evenly over the sorted `widths`, the narrowest and the widest among them;
    all of them when `grid` is None or not smaller."""
    widths = sorted(widths)
    if not grid or len(widths) <= grid:
        return widths
    return [widths[i] for i in np.round(np.linspace(0, len(widths) - 1, grid)).astype(int)]


def measured_pairs(pairs, grid):
    """The pairs a table measures for a geometry needing `pairs`: all, or a grid of widths on each axis
    (along the diagonal when only equal widths are needed) between which the table interpolates."""
    if not grid:
        return set(pairs)
    if all(a == b for a, b in pairs):
        return {(w, w) for w in grid_widths({a for a, _ in pairs}, grid)}
    return {(a, b) for a in grid_widths({a for a, _ in pairs}, grid) for b in grid_widths({b for _, b in pairs}, grid)}


def _file_name(key):
    return key.replace("/", "_")


def make_table(out, models=("resnet20",), quantize="none", threads=1, width_multiple=1, num_classes=10,
               image_size=None, grid=None, add_mode=None, runs=RUNS, warmup=WARMUP, note="", overwrite=False,
               progress=None):
    """Measures (or completes) the latency table of the search spaces of `models` (registry names, built at
    `image_size` and `num_classes`, or .keras files) into `out` (JSON), at every width pair they need or,
    with `grid`, at `grid` widths per axis of every geometry.

    `progress(done, total)`, if given, is called as models are converted and timed. Returns the table.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if min(threads, runs, width_multiple) < 1 or warmup < 0 or (grid is not None and grid < 2):
        raise ValueError(f"threads, runs and width_multiple must be >= 1, warmup >= 0 and grid >= 2, got {threads}, "
                         f"{runs}, {width_multiple}, {warmup} and {grid}")
    layouts = {}
    for name in models:
        model = table_model(name, image_size, num_classes)
        layouts[name] = table_layout(name, model, width_multiple, add_mode)
    inputs = {(layout.input_shape, layout.num_classes) for layout in layouts.values()}
    if len(inputs) > 1:
        raise ValueError(f"the models of one table must take one input shape and give one number of classes, got "
                         f"{sorted(inputs)}")
    ((input_shape, classes),) = inputs
    needed, made_by = {}, {}
    for layout in layouts.values():
        for key, (geometry, pairs) in layout.required_entries().items():
            needed.setdefault(key, (geometry, set()))[1].update(pairs)
            made_by.setdefault(key, layout)
    table = _new_table(models, quantize, threads, width_multiple, classes, input_shape, grid, add_mode, runs, warmup,
                       note)
    if overwrite:
        shutil.rmtree(out + WORK_SUFFIX, ignore_errors=True)
    elif os.path.exists(out):
        table = _continued(out, table)
    work = os.path.join(out + WORK_SUFFIX, quantize)
    overhead = os.path.join(work, "overhead.tflite")
    if not os.path.exists(overhead):
        convert_model(overhead_model(), quantize, overhead)

    pending = {key: sorted(measured_pairs(pairs, grid) - {tuple(int(w) for w in pair.split("->"))
                                                          for pair in table["entries"].get(key, {}).get("times", {})})
               for key, (_, pairs) in sorted(needed.items())}
    total = sum(len(pairs) for pairs in pending.values()) + (table["fixed"] is None)
    done = 0
    logging.info("latency table %s: %d unit models to time (%s, %d thread(s))", out, total, quantize, threads)
    for key, pairs in pending.items():
        if not pairs:
            continue
        paths = []
        for a, b in pairs:
            path = os.path.join(work, _file_name(key), f"{a}-{b}.tflite")
            if not os.path.exists(path):
                convert_model(made_by[key].unit_model(key, a, b), quantize, path)
            paths.append(path)
            done += 1
            if progress:
                progress(done, total)
        base, *samples = time_interleaved([overhead, *paths], threads, runs, warmup)
        base_ms = float(np.median(base))
        geometry, needed_pairs = needed[key]
        entry = table["entries"].setdefault(key, {"geometry": geometry, "times": {}})
        entry["needs"] = {"in": sorted({a for a, _ in needed_pairs}), "out": sorted({b for _, b in needed_pairs}),
                          "pairs": len(needed_pairs)}
        entry.setdefault("overhead_ms", []).append(round(base_ms, 5))
        for (a, b), timed in zip(pairs, samples):
            entry["times"][pair_key(a, b)] = {**spread(timed, base_ms),
                                              "raw_median_ms": round(float(np.median(timed)), 5)}
        write_json(out, table)
        logging.info("%s: %d pairs timed (overhead %.4f ms)", key, len(pairs), base_ms)

    if table["fixed"] is None:
        rest = os.path.join(work, "rest.tflite")
        convert_model(rest_model(tuple(input_shape), classes), quantize, rest, integer_io=False)
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


def measure_networks(table, layout, shapes, runs, workdir):
    """The table's prediction and the measured latency of every (name, GraphShape) of `shapes` of the
    layout's space, derived from its model with random weights, in the exported form (uint8 pixels, the
    normalisation inside, float output), converted as the table's quantisation and timed interleaved at
    its threads; with the load average at the start."""
    paths = []
    for name, shape in shapes:
        paths.append(os.path.join(workdir, f"{name}.tflite"))
        derived = derive_model(layout.model, layout.space, shape, transfer_weights=False)
        convert_model(exported_form(derived), table.quantize, paths[-1], integer_io=False)
    load = os.getloadavg()
    samples = time_interleaved(paths, table.threads, runs)
    rows = []
    for (name, shape), timed in zip(shapes, samples):
        predicted = predict_latency(layout, shape, table)
        measured = spread(timed)
        rows.append({"shape": name, **shape.point(),
                     "mflops": round(count_shape(layout.space, shape).flops / 1e6, 3),
                     "predicted_ms": round(predicted, 5), "measured_ms": measured["ms"],
                     "measured_p10_ms": measured["p10_ms"], "measured_p90_ms": measured["p90_ms"],
                     "error": round(predicted / measured["ms"] - 1, 4)})
    return rows, [round(x, 2) for x in load]
