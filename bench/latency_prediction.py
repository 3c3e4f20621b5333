"""How well does a latency table predict the latency of a whole exported network?

  python -m bench.latency_prediction --model=mobilenet_v2 --image_size=128 --quantize=none,int8 --threads=1

For every quantisation: the latency table of the model's search space (`export.latency_table`'s
`make_table` on this machine, kept under --tables and continued when interrupted), then --shapes random
shapes of that space (every searchable slot's width drawn uniformly from its candidates, every stage's
depth from its choices) plus the full network, each derived with random weights, in the exported form
(uint8 pixels in, the normalisation inside, float output), converted as the table's quantisation (int8
calibrated on random pixels) and timed with LiteRT at --threads, all shapes interleaved (A B C ..., each
timed invoke right after an untimed one of the same model, as the table's units are timed: an app runs its
model back to back). The error of a shape is (predicted - measured) / measured, with the measured median;
the summary gives the median and p90 of |error| over the random shapes (goal: median <= 10%). Writes
--out (JSON: the command, date and commit) after every quantisation, so an interrupted run keeps what it
measured and skips it when run again. Run it on a quiet machine: other load skews both sides unequally.
"""

import datetime
import os
import pathlib
import sys
import tempfile

from absl import app, flags, logging
import numpy as np

from bench.provenance import commit
from tas_keras.export.layer_latency import (RUNS, environment, make_table, measure_networks, table_layout,
                                            table_model)
from tas_keras.latency import QUANTIZATIONS, LatencyTable
from tas_keras.training import read_json, write_json

GOAL = 0.10
RESULTS = pathlib.Path(__file__).parent / "results"

_MODEL = flags.DEFINE_string("model", "mobilenet_v2", "Registry name or .keras file.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Input side of a registry network.", lower_bound=1)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classes of a registry network.", lower_bound=1)
_QUANTIZE = flags.DEFINE_list("quantize", list(QUANTIZATIONS), "Table quantisations to check.")
_THREADS = flags.DEFINE_integer("threads", 1, "LiteRT threads.", lower_bound=1)
_MULTIPLE = flags.DEFINE_integer("width_multiple", 8, "Candidate widths are multiples of this.", lower_bound=1)
_GRID = flags.DEFINE_integer("grid", None, "Measure the table on this many widths per axis (default: every pair).",
                             lower_bound=2)
_TABLE_RUNS = flags.DEFINE_integer("table_runs", RUNS, "Timed invokes per table unit.", lower_bound=1)
_SHAPES = flags.DEFINE_integer("shapes", 20, "Random shapes (the full network is added).", lower_bound=1)
_RUNS = flags.DEFINE_integer("runs", 200, "Timed invokes per shape, interleaved.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the shapes.")
_NOTE = flags.DEFINE_string("note", "", "What else ran on the machine.")
_TABLES = flags.DEFINE_string("tables", str(RESULTS / "latency_tables"), "Directory of the tables.")
_OUT = flags.DEFINE_string("out", str(RESULTS / "latency_prediction_graph.json"), "JSON path.")


def random_shapes(space, count, seed):
    """`count` shapes drawn uniformly from the space's candidates and depth choices, then the full network."""
    rng = np.random.default_rng(seed)
    shapes = [(f"random_{index}", space.random_shape(rng)) for index in range(count)]
    return shapes + [("full", space.full_shape())]


def summary(rows):
    errors = np.array([abs(row["error"]) for row in rows if row["shape"] != "full"])
    signed = np.array([row["error"] for row in rows if row["shape"] != "full"])
    return {"shapes": len(errors), "median_abs_error": round(float(np.median(errors)), 4),
            "p90_abs_error": round(float(np.percentile(errors, 90)), 4),
            "max_abs_error": round(float(errors.max()), 4), "mean_error": round(float(signed.mean()), 4),
            "full_network_error": next(row["error"] for row in rows if row["shape"] == "full"),
            "meets_goal": bool(np.median(errors) <= GOAL)}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # TensorFlow logs lines per exported model otherwise
    model = table_model(_MODEL.value, _IMAGE_SIZE.value, _NUM_CLASSES.value)
    layout = table_layout(_MODEL.value, model, _MULTIPLE.value)
    side = "x".join(map(str, layout.input_shape[:2]))
    model_name = os.path.splitext(os.path.basename(_MODEL.value))[0]
    result = read_json(_OUT.value) if os.path.exists(_OUT.value) else {}
    result.update({"what": "latency-table prediction vs the measured exported .tflite of whole networks "
                           "(random weights)", "goal_median_abs_error": GOAL, "environment": environment()})
    results = result.setdefault("results", {})
    os.makedirs(_TABLES.value, exist_ok=True)
    for quantize in _QUANTIZE.value:
        key = f"{model_name}/{side}/x{_MULTIPLE.value}/{quantize}/{_THREADS.value}_threads"
        if key in results:
            continue
        name = (f"{model_name}_{side}_x{_MULTIPLE.value}_{quantize}_{_THREADS.value}thread"
                + (f"_grid{_GRID.value}" if _GRID.value else ""))
        table_path = os.path.join(_TABLES.value, f"{name}.json")
        make_table(table_path, models=[_MODEL.value], quantize=quantize, threads=_THREADS.value,
                   width_multiple=_MULTIPLE.value, num_classes=_NUM_CLASSES.value, image_size=_IMAGE_SIZE.value,
                   grid=_GRID.value, runs=_TABLE_RUNS.value, note=_NOTE.value)
        table = LatencyTable.load(table_path)
        with tempfile.TemporaryDirectory() as workdir:
            rows, load = measure_networks(table, layout, random_shapes(layout.space, _SHAPES.value, _SEED.value),
                                          _RUNS.value, workdir)
        results[key] = {"command": "python -m bench.latency_prediction " + " ".join(sys.argv[1:]),
                        "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit(),
                        "table": os.path.abspath(table_path), "table_made_for": table.describe(),
                        "runs": _RUNS.value, "seed": _SEED.value, "note": _NOTE.value,
                        "load_average_at_start": load, "summary": summary(rows), "shapes": rows}
        write_json(_OUT.value, result)
        print(key, results[key]["summary"])


if __name__ == "__main__":
    app.run(main)
