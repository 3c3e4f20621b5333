"""At equal measured int8 latency, what does searching against latency buy over searching against FLOPs?

  python -m bench.latency_vs_flops --model=mobilenet_v2 --image_size=128 \
      --dataset=../shared/data/imagenette2-224.zip --max_train_examples=2000

Any model the graph reader takes (a registry name built at --image_size, or a .keras file). Two arms
searched by TAS in the same space (candidate widths multiples of --width_multiple) for the same number of
epochs and trained with the same recipe. With --search_from=teacher, as `train.prune` prunes a trained
network: the teacher's channels ordered by importance (`prune.ordered_base`), each supernet starting from
those weights, and each searched shape initialised from them and trained with KD (mode init_kd), search
and KD at the job's learning rate from a trained network; with --search_from=scratch, from random
weights and KD alone (mode kd) at the reference's learning rate:
  latency  --cost=latency at --target_latency_ratio of the full network's table latency;
  flops    --cost=flops at the FLOP target (of --flop_targets) whose searched shape's measured int8
           latency is closest to the latency arm's: the two compare at equal measured latency.
The int8 latency table of the space (1 thread) is made first, on this machine, unless --latency_table
names one; then the teacher: the full network trained by `tas_keras.training.train_base` for
--teacher_epochs, unless --teacher names one. Each trained shape is exported to int8
(`export_and_verify`: accuracy of the .tflite on the test split) and all of them and the full teacher are
timed interleaved with LiteRT at the table's threads (each timed invoke right after an untimed one, as the
table was made). Reported per arm: measured latency, FLOPs, accuracy, and speed-up / FLOP reduction
against the full network (1.0: the latency fell as much as the FLOPs; goal >= 0.9 for the latency arm).
For scale, the most that ratio can be at the target latency: the best of --bound_samples random shapes of
the space, by the table.

Every stage runs in its own directory under --out and resumes; results go to --results after every stage,
so an interrupted run keeps what is done and continues when run again.
"""

import datetime
import os
import pathlib
import sys
import tempfile

from absl import app, flags, logging
import numpy as np

from bench.provenance import provenance
from tas_keras import data
from tas_keras.cost import count_shape
from tas_keras.distill import distill
from tas_keras.export.exporter import TFLITE_FILE, export_and_verify
from tas_keras.export.layer_latency import (REWARM, environment, make_table, measure_networks, spread, table_layout,
                                            table_model, time_interleaved)
from tas_keras.latency import LatencyTable, predict_latency
from tas_keras.prune import PruneConfig, ordered_base
from tas_keras.search import ARCH_FILE, run_search
from tas_keras.shapes import load_shape
from tas_keras.training import MODEL_FILE, read_json, train_base, write_json

GOAL = 0.9
RESULTS = pathlib.Path(__file__).parent / "results"

_MODEL = flags.DEFINE_string("model", "mobilenet_v2", "Registry name or .keras file.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 96, "Input side of a registry network.", lower_bound=1)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classes of a registry network (the dataset's).", lower_bound=1)
_MULTIPLE = flags.DEFINE_integer("width_multiple", 8, "Candidate widths are multiples of this.", lower_bound=1)
_DATASET = flags.DEFINE_string("dataset", data.BUNDLED_DATASET, "Data of the teacher, the searches and the KD.")
_MAX_TRAIN = flags.DEFINE_integer("max_train_examples", None, "Cap on training images.")
_TABLE = flags.DEFINE_string("latency_table", None, "int8 latency table of the space (default: made under "
                             "bench/results/latency_tables).")
_TEACHER = flags.DEFINE_string("teacher", None, "The trained full network (.keras) every arm distils from "
                               "(default: trained here).")
_TEACHER_EPOCHS = flags.DEFINE_integer("teacher_epochs", 10, "Epochs of the teacher, when trained here.")
_SEARCH_FROM = flags.DEFINE_enum("search_from", "teacher", ["teacher", "scratch"],
                                 "Every search's supernet starts from the teacher's weights, or from random ones.")
_TARGET = flags.DEFINE_float("target_latency_ratio", 0.6, "Latency arm's target (of the full table latency).")
_FLOP_TARGETS = flags.DEFINE_list("flop_targets", ["0.4", "0.5"], "FLOP targets searched for the flops arm.")
_SEARCH_EPOCHS = flags.DEFINE_integer("search_epochs", 8, "Epochs of every search.")
_DISTILL_EPOCHS = flags.DEFINE_integer("distill_epochs", 8, "KD epochs of every arm.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size of the teacher and the KD.")
_SEARCH_BATCH = flags.DEFINE_integer("search_batch_size", 64, "Search batch size (each half).")
_RUNS = flags.DEFINE_integer("runs", 300, "Timed invokes per model, interleaved.")
_BOUND_SAMPLES = flags.DEFINE_integer("bound_samples", 20000, "Random shapes of the bound.")
_OUT = flags.DEFINE_string("out", None, "Directory of the stages (default: runs/latency_vs_flops_<model>_<side>_"
                           "from_<search_from>).")
_RESULTS = flags.DEFINE_string("results", None, "JSON path (default: bench/results/, named as --out).")
_NOTE = flags.DEFINE_string("note", "", "What else ran on the machine.")


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


def _latency_table(name, side):
    if _TABLE.value:
        return _TABLE.value
    path = RESULTS / "latency_tables" / f"{name}_{side}_x{_MULTIPLE.value}_int8_1thread.json"
    make_table(str(path), models=[_MODEL.value], quantize="int8", threads=1, width_multiple=_MULTIPLE.value,
               num_classes=_NUM_CLASSES.value, image_size=_IMAGE_SIZE.value, note=_NOTE.value)
    return str(path)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # TensorFlow logs lines per exported model otherwise
    model = table_model(_MODEL.value, _IMAGE_SIZE.value, _NUM_CLASSES.value)
    layout = table_layout(_MODEL.value, model, _MULTIPLE.value)
    name = os.path.splitext(os.path.basename(_MODEL.value))[0]
    side = "x".join(map(str, layout.input_shape[:2]))
    run_name = f"latency_vs_flops_{name}_{side}_from_{_SEARCH_FROM.value}"
    out = _OUT.value or os.path.join("runs", run_name)
    results_path = _RESULTS.value or str(RESULTS / f"{run_name}.json")
    table_path = _latency_table(name, side)
    table = LatencyTable.load(table_path)
    if table.quantize != "int8":
        raise app.UsageError(f"--latency_table must be an int8 table, got quantize={table.quantize}")

    results = read_json(results_path) if os.path.exists(results_path) else {}
    results.update({
        "what": f"{name} at {side}: FLOP-searched vs latency-searched shapes at equal measured int8 latency, "
                "same KD recipe",
        "command": "python -m bench.latency_vs_flops " + " ".join(sys.argv[1:]),
        "schedule": {"dataset": data.recorded_name(_DATASET.value), "max_train_examples": _MAX_TRAIN.value,
                     "width_multiple": _MULTIPLE.value, "search_from": _SEARCH_FROM.value,
                     "search_epochs": _SEARCH_EPOCHS.value,
                     "search_batch_size": _SEARCH_BATCH.value, "distill_epochs": _DISTILL_EPOCHS.value,
                     "batch_size": _BATCH.value, "kd": "alpha 0.9, T 4"},
        "latency": {"quantize": "int8", "threads": table.threads, "runs": _RUNS.value, "rewarm": REWARM,
                    "table": os.path.relpath(table_path)},
        "goal_speedup_per_flop_reduction": GOAL, "note": _NOTE.value, "environment": environment()})
    results.setdefault("started", datetime.datetime.now().isoformat(timespec="seconds"))
    results.setdefault("code", []).append(provenance())  # every session's, as a run resumes across commits
    common = dict(dataset_name=_DATASET.value, image_size=_IMAGE_SIZE.value, max_train_examples=_MAX_TRAIN.value)

    teacher = _TEACHER.value
    if not teacher:
        teacher_out = os.path.join(out, "teacher")
        metrics = train_base(teacher_out, model_name=_MODEL.value, epochs=_TEACHER_EPOCHS.value,
                             batch_size=_BATCH.value, **common)
        teacher = os.path.join(teacher_out, MODEL_FILE)
        results["teacher"] = {"epochs": _TEACHER_EPOCHS.value, "test_accuracy": metrics["test_accuracy"]}
    results["schedule"]["teacher"] = os.path.relpath(teacher)
    from_trained, init_from, kd_teacher, distill_mode = {}, None, teacher, "kd"
    if _SEARCH_FROM.value == "teacher":
        dataset = data.load_dataset(_DATASET.value, image_size=_IMAGE_SIZE.value, max_train_examples=_MAX_TRAIN.value)
        kd_teacher = init_from = ordered_base(out, teacher, layout.space, dataset, _BATCH.value, None,
                                              check_base=True)
        from_trained, distill_mode = {"learning_rate": PruneConfig.from_trained_learning_rate}, "init_kd"
        results["schedule"].update(ordered_teacher=os.path.relpath(kd_teacher), **from_trained)
    results["schedule"]["distill_mode"] = distill_mode

    def search(arm, **settings):
        arm_out = os.path.join(out, f"search_{arm}")
        run_search(arm_out, model_name=_MODEL.value, epochs=_SEARCH_EPOCHS.value, batch_size=_SEARCH_BATCH.value,
                   width_multiple=_MULTIPLE.value, init_from=init_from, **from_trained, **common,
                   **settings)
        return os.path.join(arm_out, ARCH_FILE)

    shapes = {"latency": search("latency", cost_metric="latency", latency_table=table_path,
                                target_ratio=_TARGET.value)}
    flop_shapes = {float(t): search(f"flops_{t}", target_ratio=float(t)) for t in _FLOP_TARGETS.value}

    # The flops arm: the FLOP target whose shape is closest in measured int8 latency to the latency arm's
    # (random weights: latency does not depend on them).
    if "selection" not in results:
        searched = [("latency", shapes["latency"])] + [(f"flops_{t}", path) for t, path in flop_shapes.items()]
        with tempfile.TemporaryDirectory() as workdir:
            rows, load = measure_networks(table, layout, [(arm, load_shape(path)) for arm, path in searched]
                                          + [("full", layout.space.full_shape())], _RUNS.value, workdir)
        results["selection"] = {"load_average_at_start": load, "shapes": rows}
        write_json(results_path, results)
    rows = {row["shape"]: row for row in results["selection"]["shapes"]}
    closest = min(flop_shapes,
                  key=lambda t: abs(rows[f"flops_{t}"]["measured_ms"] - rows["latency"]["measured_ms"]))
    shapes["flops"] = flop_shapes[closest]
    results["selection"]["flops_target_chosen"] = closest


    trained = results.setdefault("arms", {})
    for arm, shape_path in shapes.items():
        if arm in trained:
            continue
        arm_out = os.path.join(out, f"distill_{arm}")
        metrics = distill(arm_out, arch_path=shape_path, teacher_path=kd_teacher, mode=distill_mode,
                          epochs=_DISTILL_EPOCHS.value, batch_size=_BATCH.value, **from_trained, **common)
        export = export_and_verify(os.path.join(out, f"export_{arm}"), model_path=os.path.join(arm_out, MODEL_FILE),
                                   quantize="int8", threads=table.threads, latency_runs=20,
                                   dataset_name=_DATASET.value)
        shape = load_shape(shape_path)
        trained[arm] = {**shape.point(), "flops": count_shape(layout.space, shape).flops,
                        "search": dict(shape.provenance), "keras_accuracy": metrics["test_accuracy"],
                        "int8_accuracy": export["models"][0]["tflite"]["accuracy"],
                        "teacher_keras_accuracy": metrics["teacher_test_accuracy"],
                        "tflite": os.path.relpath(export["models"][0]["tflite"]["path"]),
                        "export_checks_passed": export["passed"]}
        write_json(results_path, results)

    full_export = os.path.join(out, "export_full")
    if not os.path.exists(os.path.join(full_export, TFLITE_FILE)):
        export_and_verify(full_export, model_path=teacher, quantize="int8", threads=table.threads, latency_runs=20,
                          dataset_name=_DATASET.value)
    arms = list(trained)
    results["load_average_at_timing"] = [round(x, 2) for x in os.getloadavg()]
    timed = [spread(samples) for samples in time_interleaved(
        [os.path.join(full_export, TFLITE_FILE)] + [trained[arm]["tflite"] for arm in arms], table.threads,
        _RUNS.value)]
    full_flops = count_shape(layout.space, layout.space.full_shape()).flops
    results["full"] = {"flops": full_flops, "latency": timed[0]}
    for arm, latency in zip(arms, timed[1:]):
        row = trained[arm]
        speedup = timed[0]["ms"] / latency["ms"]
        predicted = predict_latency(layout, load_shape(shapes[arm]), table)
        row.update(latency=latency, predicted_ms=round(predicted, 5),
                   latency_ratio=round(latency["ms"] / timed[0]["ms"], 4),
                   flops_ratio=round(row["flops"] / full_flops, 4), speedup=round(speedup, 3),
                   speedup_per_flop_reduction=round(speedup * row["flops"] / full_flops, 3))
    results["best_of_random_shapes"] = {"samples": _BOUND_SAMPLES.value, **best_random_ratio(
        table, layout, _TARGET.value, _BOUND_SAMPLES.value)}
    results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    write_json(results_path, results)
    for arm in arms:
        row = trained[arm]
        print(f"{arm:8s} latency x{row['latency_ratio']:.3f} ({row['latency']['ms']:.4f} ms)  FLOPs "
              f"x{row['flops_ratio']:.3f}  int8 accuracy {row['int8_accuracy']:.2%}  speed-up / FLOP reduction "
              f"{row['speedup_per_flop_reduction']:.2f}")


if __name__ == "__main__":
    app.run(main)
