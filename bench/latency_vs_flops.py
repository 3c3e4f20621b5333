"""At equal measured int8 latency, what does searching against latency buy over searching against FLOPs?

  python -m bench.latency_vs_flops --teacher=teacher.keras --latency_table=table_int8.json \
      [--latency_table_x16=table_int8_x16.json] [--dataset=cifar10_mini] [--target_latency_ratio=0.6]

ResNet-20, three arms trained with the same recipe (KD from --teacher, `tas_keras.distill.distill`,
mode kd) after a TAS search of the same length:
  latency      --cost=latency at --target_latency_ratio of the full network's table latency;
  flops        --cost=flops at the FLOP target (of --flop_targets) whose searched shape's measured
               int8 latency is closest to the latency arm's: the two compare at equal measured latency;
  latency_x16  (with --latency_table_x16) the mobile preset's space: latency cost, widths multiples of 16.
Each trained shape is exported to int8 (`tas_keras.export.exporter.export_and_verify`: accuracy of the .tflite on
the test split) and all of them and the full teacher are timed interleaved with LiteRT at the table's
threads (each timed invoke right after an untimed one, as the table was made). Reported per arm:
measured latency, FLOPs, accuracy, and speed-up / FLOP reduction against the full network (1.0: the
latency fell as much as the FLOPs; goal >= 0.9 for the latency arm). For scale, the most that ratio can
be at the target latency: the best of 20,000 random shapes of each latency arm's space, by the table.

Every search and training runs in its own directory under --out and resumes; results go to --results
after every stage, so an interrupted run keeps what is done and continues when run again.
"""

import os
import pathlib
import tempfile

from absl import app, flags, logging
import numpy as np

from tas_keras.export.layer_latency import (REWARM, environment, measure_networks, spread, table_layout,
                                            table_model, time_interleaved)
from tas_keras.export.exporter import TFLITE_FILE, export_and_verify
from tas_keras import data
from tas_keras.cost import count_shape
from tas_keras.distill import distill
from tas_keras.latency import LatencyTable, predict_latency
from tas_keras.search import ARCH_FILE, run_search
from tas_keras.shapes import load_shape
from tas_keras.training import MODEL_FILE, read_json, write_json

MODEL = "resnet20"
GOAL = 0.9
BOUND_SAMPLES = 20000

_TEACHER = flags.DEFINE_string("teacher", None, "The full ResNet-20 (.keras) every arm distils from.", required=True)
_TABLE = flags.DEFINE_string("latency_table", None, "int8 latency table of ResNet-20's space (width multiple 1).",
                             required=True)
_TABLE_X16 = flags.DEFINE_string("latency_table_x16", None, "int8 table of the multiple-16 space: adds that arm.")
_OUT = flags.DEFINE_string("out", "runs/latency_vs_flops", "Directory of the searches and trainings.")
_RESULTS = flags.DEFINE_string("results", str(pathlib.Path(__file__).parent / "results" / "latency_vs_flops.json"),
                               "JSON path.")
_DATASET = flags.DEFINE_string("dataset", data.BUNDLED_DATASET, "Data of the searches and trainings.")
_MAX_TRAIN = flags.DEFINE_integer("max_train_examples", None, "Cap on training images.")
_TARGET = flags.DEFINE_float("target_latency_ratio", 0.6, "Latency arm's target (of the full table latency).")
_FLOP_TARGETS = flags.DEFINE_list("flop_targets", ["0.35", "0.45"], "FLOP targets searched for the flops arm.")
_SEARCH_EPOCHS = flags.DEFINE_integer("search_epochs", 10, "Epochs of every search.")
_DISTILL_EPOCHS = flags.DEFINE_integer("distill_epochs", 10, "KD epochs of every arm.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "KD batch size.")
_SEARCH_BATCH = flags.DEFINE_integer("search_batch_size", 64, "Search batch size (each half).")
_RUNS = flags.DEFINE_integer("runs", 300, "Timed invokes per model, interleaved.")
_NOTE = flags.DEFINE_string("note", "", "What else ran on the machine.")


def _search(name, **settings):
    out = os.path.join(_OUT.value, f"search_{name}")
    run_search(out, model_name=MODEL, dataset_name=_DATASET.value, epochs=_SEARCH_EPOCHS.value,
               batch_size=_SEARCH_BATCH.value, max_train_examples=_MAX_TRAIN.value, **settings)
    return os.path.join(out, ARCH_FILE)


def best_random_ratio(table, layout, target, samples, seed=0):
    """Over `samples` random shapes, the most FLOPs kept by one whose table latency is within `target` of
    the full network's: what speed-up / FLOP reduction the space allows at that latency."""
    space = layout.space
    full = space.full_shape()
    full_ms, full_flops = predict_latency(layout, full, table), count_shape(space, full).flops
    best, rng = None, np.random.default_rng(seed)
    for shape in (space.random_shape(rng) for _ in range(samples)):
        latency = predict_latency(layout, shape, table) / full_ms
        flops = count_shape(space, shape).flops / full_flops
        if latency <= target and (best is None or flops > best["flops_ratio"]):
            best = {"flops_ratio": round(flops, 4), "latency_ratio": round(latency, 4),
                    "speedup_per_flop_reduction": round(flops / latency, 3), **shape.point()}
    return best


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # TensorFlow logs lines per exported model otherwise
    table = LatencyTable.load(_TABLE.value)
    if table.quantize != "int8":
        raise app.UsageError(f"--latency_table must be an int8 table, got quantize={table.quantize}")
    # The table and timed units of each arm's search space (the flops arm searches the latency arm's space).
    model = table_model(MODEL)
    spaces = {"latency": (table, table_layout(MODEL, model))}
    if _TABLE_X16.value:
        spaces["latency_x16"] = (LatencyTable.load(_TABLE_X16.value), table_layout(MODEL, model, 16))
    space = spaces["latency"][1].space  # every arm's shape is a ResNet-20's: its FLOPs count in this space
    results = read_json(_RESULTS.value) if os.path.exists(_RESULTS.value) else {}
    results.update({
        "what": "ResNet-20: FLOP-searched vs latency-searched shapes at equal measured int8 latency, same KD recipe",
        "schedule": {"dataset": _DATASET.value, "max_train_examples": _MAX_TRAIN.value,
                     "search_epochs": _SEARCH_EPOCHS.value, "search_batch_size": _SEARCH_BATCH.value,
                     "distill_epochs": _DISTILL_EPOCHS.value, "batch_size": _BATCH.value, "kd": "alpha 0.9, T 4",
                     "teacher": os.path.abspath(_TEACHER.value)},
        "latency": {"quantize": "int8", "threads": table.threads, "runs": _RUNS.value, "rewarm": REWARM,
                    "table": os.path.abspath(_TABLE.value)},
        "goal_speedup_per_flop_reduction": GOAL, "note": _NOTE.value, "environment": environment()})

    arches = {"latency": _search("latency", cost_metric="latency", latency_table=_TABLE.value,
                                 target_ratio=_TARGET.value)}
    if "latency_x16" in spaces:
        arches["latency_x16"] = _search("latency_x16", cost_metric="latency", latency_table=_TABLE_X16.value,
                                        target_ratio=_TARGET.value, width_multiple=16)
    flop_arches = {float(t): _search(f"flops_{t}", target_ratio=float(t)) for t in _FLOP_TARGETS.value}

    # The flops arm: the FLOP target whose shape is closest in measured int8 latency to the latency arm's
    # (random weights: latency does not depend on them).
    if "selection" not in results:
        layout = spaces["latency"][1]
        shapes = [(name, load_shape(path)) for name, path in (
            [("latency", arches["latency"])] + [(f"flops_{t}", path) for t, path in flop_arches.items()])]
        with tempfile.TemporaryDirectory() as workdir:
            rows, load = measure_networks(table, layout, shapes, _RUNS.value, workdir)
        results["selection"] = {"load_average_at_start": load, "shapes": rows}
        write_json(_RESULTS.value, results)
    rows = {row["shape"]: row for row in results["selection"]["shapes"]}
    closest = min(flop_arches, key=lambda t: abs(rows[f"flops_{t}"]["measured_ms"] - rows["latency"]["measured_ms"]))
    arches["flops"] = flop_arches[closest]
    results["selection"]["flops_target_chosen"] = closest

    trained = results.setdefault("arms", {})
    common = dict(dataset_name=_DATASET.value)
    for name, arch_path in arches.items():
        if name in trained:
            continue
        out = os.path.join(_OUT.value, f"distill_{name}")
        metrics = distill(out, arch_path, _TEACHER.value, mode="kd", epochs=_DISTILL_EPOCHS.value,
                          batch_size=_BATCH.value, max_train_examples=_MAX_TRAIN.value, **common)
        export = export_and_verify(os.path.join(out, MODEL_FILE), os.path.join(_OUT.value, f"export_{name}"),
                                   quantize="int8", threads=table.threads, latency_runs=20, **common)
        shape = load_shape(arch_path)
        trained[name] = {**shape.point(), "flops": count_shape(space, shape).flops,
                         "search": shape.provenance,
                         "keras_accuracy": metrics["test_accuracy"],
                         "int8_accuracy": export["models"][0]["tflite"]["accuracy"],
                         "teacher_keras_accuracy": metrics["teacher_test_accuracy"],
                         "tflite": export["models"][0]["tflite"]["path"], "export_checks_passed": export["passed"]}
        write_json(_RESULTS.value, results)

    full_export = os.path.join(_OUT.value, "export_full")
    if not os.path.exists(os.path.join(full_export, TFLITE_FILE)):
        export_and_verify(_TEACHER.value, full_export, quantize="int8", threads=table.threads, latency_runs=20,
                          **common)
    names = list(trained)
    timed = [spread(samples) for samples in time_interleaved(
        [os.path.join(full_export, TFLITE_FILE)] + [trained[n]["tflite"] for n in names], table.threads, _RUNS.value)]
    full_flops = count_shape(space, space.full_shape()).flops
    results["full"] = {"flops": full_flops, "latency": timed[0]}
    for name, latency in zip(names, timed[1:]):
        arm = trained[name]
        speedup = timed[0]["ms"] / latency["ms"]
        flop_reduction = full_flops / arm["flops"]
        arm_table, layout = spaces.get(name, spaces["latency"])
        predicted = predict_latency(layout, load_shape(arches[name]), arm_table)
        arm.update(latency=latency, predicted_ms=round(predicted, 5),
                   latency_ratio=round(latency["ms"] / timed[0]["ms"], 4),
                   flops_ratio=round(arm["flops"] / full_flops, 4), speedup=round(speedup, 3),
                   speedup_per_flop_reduction=round(speedup / flop_reduction, 3))
    results["best_of_random_shapes"] = {
        name: {"samples": BOUND_SAMPLES, **best_random_ratio(arm_table, layout, _TARGET.value, BOUND_SAMPLES)}
        for name, (arm_table, layout) in spaces.items()}
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(_RESULTS.value, results)
    for name in names:
        arm = trained[name]
        print(f"{name:12s} latency x{arm['latency_ratio']:.3f} ({arm['latency']['ms']:.4f} ms)  FLOPs "
              f"x{arm['flops_ratio']:.3f}  int8 accuracy {arm['int8_accuracy']:.2%}  speed-up / FLOP reduction "
              f"{arm['speedup_per_flop_reduction']:.2f}")


if __name__ == "__main__":
    app.run(main)
