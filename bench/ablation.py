"""The paper's ablation at a schedule this CPU can run: pre-defined / random search / TAS shapes, each
trained from scratch, with Init and with KD, at matched FLOPs and an equal training budget, two seeds.

  python -m bench.ablation --runs=/work/runs/ablation --dataset=../shared/data/cifar10-jpeg.zip

The TAS poster's table (ResNet-32, CIFAR-100, ~59% of the FLOPs kept): pre-defined 68.18 / 68.57 /
68.95, random search 69.34 / 69.14 / 69.70, TAS 71.40 / 71.71 / 72.41 (scratch / w/ Init / w/ KD).

Every run has its own directory under --runs and resumes there (teacher, searches, random searches,
trainings), so a killed or stopped ablation continues where it was. After every finished training the
table is rewritten to bench/results/ablation_<model>.json and .md: every cell's runs, their mean and
range. The order fills the scratch and KD columns of both seeds first, then the Init column.
"""

import os
import platform

from absl import app, flags
import keras
import numpy as np
import tensorflow as tf

from tas_keras.baselines import make_baseline
from tas_keras.distill import distill
from tas_keras.search import decision_summary, run_search
from tas_keras.runs import read_json, write_json
from tas_keras.training import MODEL_FILE, train_base

_RUNS = flags.DEFINE_string("runs", None, "Directory of every run of the ablation.", required=True)
_DATASET = flags.DEFINE_string("dataset", "../shared/data/cifar10-jpeg.zip", "As the train CLIs' --dataset.")
_MODEL = flags.DEFINE_string("model", "resnet20", "The network the shapes prune.")
_TARGET = flags.DEFINE_float("target_flops_ratio", 0.6, "R: every shape keeps [R - 0.05, R] of the FLOPs.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "One search, random search and training per seed.")
_TEACHER_EPOCHS = flags.DEFINE_integer("teacher_epochs", 15, "Epochs of the unpruned teacher (seed 0).")
_SEARCH_EPOCHS = flags.DEFINE_integer("search_epochs", 15, "TAS search epochs.")
_SEARCH_BATCH = flags.DEFINE_integer("search_batch_size", 256, "TAS search batch (train and valid each).")
_RANDOM_TRIALS = flags.DEFINE_integer("random_candidates", 8, "Random shapes tried by the random search.")
_RANDOM_EPOCHS = flags.DEFINE_integer("random_epochs", 1, "Epochs of each random shape on the search-train half.")
_EPOCHS = flags.DEFINE_integer("epochs", 6, "Training epochs of every pruned network (every cell alike).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch of the teacher and of every pruned network.")
_OUT = flags.DEFINE_string("out", None, "Table path without extension (default bench/results/ablation_<model>).")

SHAPES = ("predefined", "random", "tas")
MODES = ("scratch", "init", "kd")
PAPER = {("predefined", "scratch"): 68.18, ("predefined", "init"): 68.57, ("predefined", "kd"): 68.95,
         ("random", "scratch"): 69.34, ("random", "init"): 69.14, ("random", "kd"): 69.70,
         ("tas", "scratch"): 71.40, ("tas", "init"): 71.71, ("tas", "kd"): 72.41}


def shape_paths(runs, seed, common):
    """arch.json of each shape for `seed`, making (or resuming) the searches that produce them."""
    target = _TARGET.value
    predefined = os.path.join(runs, "predefined")
    make_baseline(predefined, kind="predefined", model_name=_MODEL.value, target_ratio=target, **common)
    tas = os.path.join(runs, f"seed{seed}", "tas_search")
    run_search(tas, model_name=_MODEL.value, epochs=_SEARCH_EPOCHS.value, batch_size=_SEARCH_BATCH.value,
               target_ratio=target, seed=seed, **common)
    random = os.path.join(runs, f"seed{seed}", "random_search")
    make_baseline(random, kind="random", model_name=_MODEL.value, target_ratio=target, count=_RANDOM_TRIALS.value,
                  epochs=_RANDOM_EPOCHS.value, batch_size=_BATCH.value, seed=seed, **common)
    return {name: os.path.join(path, "arch.json") for name, path in
            (("predefined", predefined), ("random", random), ("tas", tas))}


def search_outcome(runs, seed):
    """Whether the TAS search of `seed` decided (`decision_summary`)."""
    directory = os.path.join(runs, f"seed{seed}", "tas_search")
    return decision_summary(read_json(os.path.join(directory, "history.json")),
                            read_json(os.path.join(directory, "arch.json")))


def table(cells, settings, teacher):
    """The JSON payload and the Markdown table: mean and range of every (shape, mode) over seeds."""
    summary = {}
    for shape in SHAPES:
        for mode in MODES:
            runs = [c for c in cells.values() if c["shape"] == shape and c["mode"] == mode]
            if runs:
                accuracy = [100 * c["test_accuracy"] for c in runs]
                summary[f"{shape}/{mode}"] = {
                    "seeds": [c["seed"] for c in runs], "mean": round(float(np.mean(accuracy)), 2),
                    "min": round(min(accuracy), 2), "max": round(max(accuracy), 2),
                    "flops_ratio": sorted({round(c["flops_ratio"], 4) for c in runs})}
    lines = ["| shape | FLOPs kept (per seed) | scratch | w/ Init | w/ KD |", "|---|---|---|---|---|"]
    for shape in SHAPES:
        row = [shape, ", ".join(f"{100 * r:.1f}%" for r in sorted({round(c["flops_ratio"], 4) for c in cells.values()
                                                                    if c["shape"] == shape}))]
        for mode in MODES:
            cell = summary.get(f"{shape}/{mode}")
            row.append("" if cell is None else f"{cell['mean']:.2f} ({cell['min']:.2f}-{cell['max']:.2f}, "
                       f"{len(cell['seeds'])} seed{'s' * (len(cell['seeds']) > 1)})")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Test accuracy (%) on the full test split, mean (min-max) over seeds; teacher {teacher:.2%}.",
              "The TAS poster (ResNet-32, CIFAR-100, ~59% FLOPs): " + "; ".join(
                  f"{s} {PAPER[(s, 'scratch')]}/{PAPER[(s, 'init')]}/{PAPER[(s, 'kd')]}" for s in SHAPES) + ".",
              f"Settings: {settings}"]
    return {"settings": settings, "teacher_test_accuracy": teacher, "summary": summary, "cells": cells}, lines


def main(argv):
    del argv
    runs, seeds = _RUNS.value, [int(s) for s in _SEEDS.value]
    path = _OUT.value or os.path.join(os.path.dirname(__file__), "results", f"ablation_{_MODEL.value}")
    common = dict(dataset_name=_DATASET.value)
    settings = {"model": _MODEL.value, "dataset": os.path.basename(_DATASET.value), "target_flops_ratio": _TARGET.value,
                "band": [round(_TARGET.value - 0.05, 4), _TARGET.value], "seeds": seeds,
                "teacher_epochs": _TEACHER_EPOCHS.value, "search_epochs": _SEARCH_EPOCHS.value,
                "search_batch_size": _SEARCH_BATCH.value, "random_candidates": _RANDOM_TRIALS.value,
                "random_epochs": _RANDOM_EPOCHS.value, "epochs": _EPOCHS.value, "batch_size": _BATCH.value,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, TF {tf.__version__}, "
                           f"Keras {keras.__version__}"}
    cells = read_json(f"{path}.json")["cells"] if os.path.exists(f"{path}.json") else {}

    teacher_dir = os.path.join(runs, "teacher")
    teacher = train_base(teacher_dir, model_name=_MODEL.value, epochs=_TEACHER_EPOCHS.value, batch_size=_BATCH.value,
                         seed=0, **common)
    teacher_path = os.path.join(teacher_dir, MODEL_FILE)
    # Scratch and KD of every seed first: the columns the comparison needs most; Init afterwards.
    for modes in (("scratch", "kd"), ("init",)):
        for seed in seeds:
            shapes = shape_paths(runs, seed, common)
            for shape in SHAPES:
                for mode in modes:
                    key = f"{shape}/{mode}/seed{seed}"
                    if key in cells:  # the committed JSON is the record of finished cells, so a fresh machine skips them
                        continue
                    metrics = distill(os.path.join(runs, f"seed{seed}", f"{shape}_{mode}"), arch_path=shapes[shape],
                                      teacher_path=teacher_path, mode=mode, epochs=_EPOCHS.value,
                                      batch_size=_BATCH.value, seed=seed, **common)
                    cells[key] = {"shape": shape, "mode": mode, "seed": seed,
                                  "test_accuracy": metrics["test_accuracy"], "flops": metrics["flops"],
                                  "flops_ratio": 1 - metrics["flops_reduction"], "params": metrics["params"],
                                  "wall_time_s": metrics["wall_time_s"]}
                    payload, lines = table(cells, settings, teacher["test_accuracy"])
                    payload["tas_searches"] = {f"seed{s}": search_outcome(runs, s) for s in seeds
                                               if os.path.exists(os.path.join(runs, f"seed{s}", "tas_search", "arch.json"))}
                    write_json(f"{path}.json", payload)
                    with open(f"{path}.md.tmp", "w") as f:
                        f.write("\n".join(lines) + "\n")
                    os.replace(f"{path}.md.tmp", f"{path}.md")
                    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    app.run(main)
