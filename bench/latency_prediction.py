"""How well does a latency table predict the latency of a whole exported network?

  python -m bench.latency_prediction --tables=fp32.json,int8.json [--models=resnet20,resnet56] [--shapes=20]

For every table (made by `python -m export.latency_table` on this machine) and every model: random
shapes of the table's search space (every width drawn uniformly from its conv's candidates, every
stage's depth from its choices) plus the full network, each built with random weights, exported to
.tflite as the table's quantisation (fp32, or int8 with float input and output like the pipeline's
export, calibrated on random images) and timed with LiteRT at the table's threads, all shapes of one
model interleaved (A B C ..., each timed invoke right after an untimed one of the same model, as the
table's layers are timed: an app runs its model back to back). The error of a shape is
(predicted - measured) / measured, with the measured median; the summary gives the median and p90 of |error| over the random shapes (goal:
median <= 10%). Writes --out (JSON) after every (table, model), so an interrupted run keeps what it
measured and skips it when run again.
"""

import os
import pathlib
import tempfile

from absl import app, flags, logging
import numpy as np

from tas_keras.export.layer_latency import environment, measure_networks
from tas_keras.latency import LatencyTable
from tas_keras.search_space import ArchConfig, random_shape
from tas_keras.training import read_json, write_json

GOAL = 0.10

_TABLES = flags.DEFINE_list("tables", None, "Latency tables to check (JSON).", required=True)
_MODELS = flags.DEFINE_list("models", ["resnet20", "resnet56"], "Networks to draw shapes of.")
_SHAPES = flags.DEFINE_integer("shapes", 20, "Random shapes per model (the full network is added).", lower_bound=1)
_RUNS = flags.DEFINE_integer("runs", 200, "Timed invokes per shape, interleaved.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the shapes.")
_NOTE = flags.DEFINE_string("note", "", "What else ran on the machine.")
_OUT = flags.DEFINE_string("out", str(pathlib.Path(__file__).parent / "results" / "latency_prediction.json"),
                           "JSON path.")


def random_shapes(model, width_multiple, count, seed):
    """`count` shapes of `model` drawn uniformly from the search space, then the full network."""
    full = ArchConfig.full(model)
    rng = np.random.default_rng(seed)
    return [(f"random_{index}", random_shape(full, rng, width_multiple)) for index in range(count)] + [("full", full)]


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
    result = read_json(_OUT.value) if os.path.exists(_OUT.value) else {}
    result.update({"what": "latency-table prediction vs the measured .tflite of whole networks (random weights)",
                   "goal_median_abs_error": GOAL, "environment": environment()})
    results = result.setdefault("results", {})
    for table_path in _TABLES.value:
        table = LatencyTable.load(table_path)
        for model in _MODELS.value:
            key = f"{model}/{table.quantize}/{table.threads}_threads"
            if key in results:
                continue
            shapes = random_shapes(model, table.content["space"]["width_multiple"], _SHAPES.value, _SEED.value)
            with tempfile.TemporaryDirectory() as workdir:
                rows, load = measure_networks(table, shapes, _RUNS.value, workdir)
            results[key] = {"table": os.path.abspath(table_path), "table_made_for": table.describe(),
                            "runs": _RUNS.value, "seed": _SEED.value, "note": _NOTE.value,
                            "load_average_at_start": load, "summary": summary(rows), "shapes": rows}
            write_json(_OUT.value, result)
            print(key, results[key]["summary"])


if __name__ == "__main__":
    app.run(main)
