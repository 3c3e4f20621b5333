"""Does the search pay on a real pretrained network? EfficientNet-Lite0 from ImageNet weights, fine-tuned
on Imagenette at 96 px, pruned to 50% of its FLOPs by each method at an equal training budget.

  python -m bench.pretrained_pruning --runs=runs/pretrained

Rows (every shape is trained with the same recipe: Init from the base with its channels ordered by
importance, `tas_keras.importance.order_channels`, + KD from it; the order is the Taylor scores' but
for the magnitude row, whose own L1 scores order it):
  tas_trained     TAS whose supernet starts from the ordered base (weights at --search_learning_rate)
  taylor          one-shot global pruning by the Taylor scores (`baselines.ranked_shape`)
  magnitude       one-shot global pruning by L1 magnitude, the standard of other tools
  uniform         every slot shrunk by one ratio (`baselines.predefined_shape`)
  random          keras-tuner random search (`baselines.random_search`): 2 x --search_epochs shapes in the band,
                  each trained from the ordered base for one epoch of half the training split and scored on
                  the other half; the best is kept. Its trials spend the epochs of a TAS search.
  tas_scratch     TAS from a randomly initialised supernet (the reference's search)
  tas_no_entropy  tas_trained without the entropy term
  tas_full_start  tas_trained whose distributions start at the full network (`--arch_start_full`, logit 4)
                  and whose temperature starts at 1: its samples start near the trained function
Every row spends --budget_epochs epochs of the training split: a TAS row's search epochs count against
it, the others spend them all on KD. Two seeds each; top-1 on Imagenette val in Keras and as fp32 and
int8 .tflite.

Every run has its own directory under --runs and resumes there; each finished run is added to
bench/results/pretrained_lite0.json (with the summary: mean and range per row, and how alike the two
TAS seeds' shapes are), and a run already recorded there is not run again, so the table fills up over
several sessions.
"""

import dataclasses
import datetime
import os
import platform

from absl import app, flags
import keras
import numpy as np

from bench.provenance import commit
from tas_keras.export.exporter import export_and_verify
from tas_keras import data, input_convention
from tas_keras.baselines import predefined_shape, random_search, ranked_shape
from tas_keras.distill import distill
from tas_keras.graph import load_model, read_model
from tas_keras.importance import importance_scores, magnitude_scores, order_channels
from tas_keras.runs import read_json, write_json
from tas_keras.search import ARCH_FILE, run_search
from tas_keras.shapes import load_shape
from tas_keras.training import MODEL_FILE, save_model, train_base

# The entropy weight of the TAS rows but tas_no_entropy: the search's default when they ran (this
# experiment turned it off by default).
TAS_ENTROPY_WEIGHT = 2.0
ROWS = ("tas_trained", "magnitude", "uniform", "taylor", "random", "tas_scratch", "tas_no_entropy", "tas_full_start")
FIRST_ROWS = 4  # run for every seed before the others: the search and the simple alternatives
RESULTS = os.path.join(os.path.dirname(__file__), "results", "pretrained_lite0.json")
ORDERED_FILES = {"taylor": "ordered.keras", "magnitude": "ordered_l1.keras"}

_RUNS = flags.DEFINE_string("runs", None, "Directory of every run of the experiment.", required=True)
_DATASET = flags.DEFINE_string("dataset", "../shared/data/imagenette2-224.zip", "As the train CLIs' --dataset.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 96, "Side of the training and test crops.")
_TARGET = flags.DEFINE_float("target_flops_ratio", 0.5, "R: every shape keeps [R - 0.05, R] of the FLOPs.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "One search and one training per row and seed.")
_ROWS = flags.DEFINE_list("rows", list(ROWS), f"The rows to run, in this order (of {', '.join(ROWS)}).")
_BASE_EPOCHS = flags.DEFINE_integer("base_epochs", 5, "Fine-tuning epochs of the base (from ImageNet weights).")
_BASE_LEARNING_RATE = flags.DEFINE_float("base_learning_rate", 0.01, "Fine-tuning learning rate of the base.")
_BUDGET = flags.DEFINE_integer("budget_epochs", 8, "Training epochs of every row, search epochs included.")
_SEARCH_EPOCHS = flags.DEFINE_integer("search_epochs", 2, "TAS search epochs (out of the budget).")
_SEARCH_BATCH = flags.DEFINE_integer("search_batch_size", 32, "TAS search batch (train and valid each).")
_SEARCH_LEARNING_RATE = flags.DEFINE_float("search_learning_rate", 0.01, "Weight learning rate of a search "
                                           "that starts from the trained base (from scratch: 0.1, the reference's).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch of the base and of every KD training.")
_KD_LEARNING_RATE = flags.DEFINE_float("kd_learning_rate", 0.01, "Learning rate of every KD training.")
_MAX_TRAIN = flags.DEFINE_integer("max_train_examples", None, "Train every stage on this many images (a trial "
                                  "of the experiment; give it another --results).", lower_bound=1)
_RESULTS = flags.DEFINE_string("results", RESULTS, "The results file.")
_TABLE = flags.DEFINE_bool("table", False, "Only print the results file's table (markdown) and exit.")


COMMIT = commit()


def ordered_base(runs):
    """The fine-tuned base (trained once, seed 0) and its copies ordered by the Taylor and by the L1
    scores, as files."""
    base_dir = os.path.join(runs, "base")
    base = train_base(base_dir, model_name="efficientnet_lite0", weights="imagenet", dataset_name=_DATASET.value,
                      image_size=_IMAGE_SIZE.value, epochs=_BASE_EPOCHS.value, batch_size=_BATCH.value,
                      learning_rate=_BASE_LEARNING_RATE.value, seed=0, **_trial())
    ordered = {score: os.path.join(runs, name) for score, name in ORDERED_FILES.items()}
    if not all(map(os.path.exists, ordered.values())):
        model = load_model(os.path.join(base_dir, MODEL_FILE))
        space = read_model(model)
        dataset = input_convention.feed(data.load_dataset(_DATASET.value, image_size=_IMAGE_SIZE.value), model)
        scores = {"taylor": importance_scores(model, space, dataset, _BATCH.value),
                  "magnitude": magnitude_scores(model, space)}
        for score, path in ordered.items():
            save_model(order_channels(model, space, scores[score]), path)
    return base, ordered, _exported_top1(ordered["taylor"], os.path.join(runs, "base_export"), seed=0)


def _trial():
    return {"max_train_examples": _MAX_TRAIN.value} if _MAX_TRAIN.value else {}


def _exported_top1(model, out, seed):
    """Top-1 of the model's fp32 and int8 .tflite on the test split."""
    top1 = {}
    for quantize in ("none", "int8"):
        directory = os.path.join(out, quantize)
        report = os.path.join(directory, "report.json")
        if not os.path.exists(report):
            export_and_verify(directory, model_path=model, quantize=quantize, dataset_name=_DATASET.value,
                              latency_runs=20, seed=seed)
        top1[quantize] = read_json(report)["models"][0]["tflite"]["accuracy"]
    return top1


def shape_file(row, seed, run, ordered):
    """The row's shape file (a GraphShape of the ordered base `ordered`) and the training epochs it leaves."""
    budget = _BUDGET.value
    if row.startswith("tas"):
        trained = row != "tas_scratch"
        run_search(os.path.join(run, "search"), model_name=ordered, dataset_name=_DATASET.value,
                   image_size=_IMAGE_SIZE.value, epochs=_SEARCH_EPOCHS.value, batch_size=_SEARCH_BATCH.value,
                   target_ratio=_TARGET.value, seed=seed, init_from=ordered if trained else None,
                   learning_rate=_SEARCH_LEARNING_RATE.value if trained else 0.1,
                   entropy_weight=0.0 if row == "tas_no_entropy" else TAS_ENTROPY_WEIGHT,
                   **({"arch_start_full": 4.0, "tau_max": 1.0} if row == "tas_full_start" else {}), **_trial())
        return os.path.join(run, "search", ARCH_FILE), budget - _SEARCH_EPOCHS.value
    path = os.path.join(run, ARCH_FILE)
    search_epochs = _SEARCH_EPOCHS.value if row == "random" else 0
    if not os.path.exists(path):
        model = load_model(ordered)
        space = read_model(model)
        dataset = input_convention.feed(data.load_dataset(_DATASET.value, image_size=_IMAGE_SIZE.value, **_trial()),
                                        model)
        if row == "uniform":
            shape, provenance = predefined_shape(space, _TARGET.value)
        elif row == "random":
            shape, provenance = random_search(os.path.join(run, "search"), model, space, dataset, _TARGET.value,
                                              2 * search_epochs, epochs=1, batch_size=_BATCH.value, seed=seed,
                                              learning_rate=_KD_LEARNING_RATE.value, init=True)
        else:  # the ordered base's own scores, so that its leading channels are the ones the ranking keeps
            scores = (magnitude_scores(model, space) if row == "magnitude" else
                      importance_scores(model, space, dataset, _BATCH.value))
            shape, provenance = ranked_shape(space, scores, _TARGET.value, source=row)
        os.makedirs(run, exist_ok=True)
        dataclasses.replace(shape, model=os.path.abspath(ordered), provenance=provenance).save(path)
    return path, budget - search_epochs


def run_row(row, seed, runs, ordered_files):
    run = os.path.join(runs, f"{row}_s{seed}")
    ordered = ordered_files["magnitude" if row == "magnitude" else "taylor"]
    arch, epochs = shape_file(row, seed, run, ordered)
    metrics = distill(os.path.join(run, "distill"), arch_path=arch, teacher_path=ordered, mode="init_kd",
                      dataset_name=_DATASET.value, image_size=_IMAGE_SIZE.value, epochs=epochs, batch_size=_BATCH.value,
                      learning_rate=_KD_LEARNING_RATE.value, seed=seed, **_trial())
    exported = _exported_top1(os.path.join(run, "distill", MODEL_FILE), os.path.join(run, "export"), seed)
    shape = load_shape(arch)
    return {"row": row, "seed": seed, "kd_epochs": epochs, "search_epochs": _BUDGET.value - epochs,
            "flops": metrics["flops"], "flops_ratio": metrics["flops"] / metrics["teacher_flops"],
            "params": metrics["params"], "top1": metrics["test_accuracy"],
            "top1_fp32_tflite": exported["none"], "top1_int8_tflite": exported["int8"],
            "base_top1": metrics["teacher_test_accuracy"], "wall_time_s": metrics["wall_time_s"],
            **shape.point(),
            "commit": COMMIT, "date": datetime.date.today().isoformat()}


def _shape_similarity(first, second, full_widths):
    """Mean |difference| of two shapes' width ratios over the slots, and the stages whose depth agrees."""
    differences = [abs(first["widths"][s] - second["widths"][s]) / full_widths[s] for s in full_widths]
    depths = [first["depths"][s] == second["depths"][s] for s in first["depths"]]
    return {"mean_abs_width_ratio_difference": round(float(np.mean(differences)), 4),
            "stages_with_equal_depth": f"{sum(depths)}/{len(depths)}"}


def summary(runs, full_widths):
    table = {}
    for row in ROWS:
        done = [r for r in runs.values() if r["row"] == row]
        if not done:
            continue
        entry = {"seeds": [r["seed"] for r in done]}
        for key in ("top1", "top1_fp32_tflite", "top1_int8_tflite", "flops_ratio"):
            values = [100 * r[key] for r in done]
            entry[key] = {"mean": round(float(np.mean(values)), 2), "range": [round(min(values), 2),
                                                                              round(max(values), 2)]}
        if row.startswith("tas") and len(done) >= 2:
            entry["seed_shapes"] = _shape_similarity(done[0], done[1], full_widths)
        table[row] = entry
    return table


LABELS = {"tas_trained": "TAS from the trained model", "magnitude": "magnitude (L1) pruning, one shot, global",
          "taylor": "Taylor pruning, one shot, global",
          "uniform": "uniform (pre-defined)", "random": "random search (keras-tuner), best in the search epochs", "tas_scratch": "TAS from scratch (the reference's supernet)",
          "tas_no_entropy": "TAS from the trained model, no entropy term",
          "tas_full_start": "TAS from the trained model, distributions starting at the full network"}


def table(results):
    """The results as a markdown table: mean [range] over the seeds of each row."""
    def cell(entry, key):
        low, high = entry[key]["range"]
        return f"{entry[key]['mean']:.2f}" + (f" [{low:.2f}, {high:.2f}]" if low != high else "")

    base = results["base"]
    lines = ["| method | seeds | FLOPs kept, % | top-1, Keras | fp32 .tflite | int8 .tflite |", "|---|---|---|---|---|---|",
             f"| unpruned base | - | 100 | {100 * base['top1']:.2f} | {100 * base['top1_fp32_tflite']:.2f} | "
             f"{100 * base['top1_int8_tflite']:.2f} |"]
    for row, entry in results["summary"].items():
        lines.append(f"| {LABELS[row]} | {len(entry['seeds'])} | {cell(entry, 'flops_ratio')} | {cell(entry, 'top1')} | "
                     f"{cell(entry, 'top1_fp32_tflite')} | {cell(entry, 'top1_int8_tflite')} |")
    return "\n".join(lines)


def main(argv):
    del argv
    if _TABLE.value:
        print(table(read_json(_RESULTS.value)))
        return
    unknown = sorted(set(_ROWS.value) - set(ROWS))
    if unknown:
        raise app.UsageError(f"unknown rows {unknown}: expected some of {', '.join(ROWS)}")
    if not 0 < _SEARCH_EPOCHS.value < _BUDGET.value:
        raise app.UsageError("--search_epochs must leave KD epochs within --budget_epochs")
    runs = os.path.abspath(_RUNS.value)
    base, ordered, base_exported = ordered_base(runs)
    results = read_json(_RESULTS.value) if os.path.exists(_RESULTS.value) else {"runs": {}}
    space = read_model(load_model(ordered["taylor"]))
    full_widths = {slot.name: slot.full_width for slot in space.searchable_slots}
    results.update({
        "command": "python -m bench.pretrained_pruning --runs=runs/pretrained",
        "setting": {"model": "efficientnet_lite0 (ImageNet weights, fine-tuned)", "dataset": _DATASET.value,
                    "image_size": _IMAGE_SIZE.value, "target_flops_ratio": _TARGET.value,
                    "budget_epochs": _BUDGET.value, "search_epochs": _SEARCH_EPOCHS.value,
                    "search_batch_size": _SEARCH_BATCH.value, "search_learning_rate": _SEARCH_LEARNING_RATE.value,
                    "batch_size": _BATCH.value, "kd_learning_rate": _KD_LEARNING_RATE.value,
                    "kd": "init from the ordered base + KD (alpha 0.9, T 4)"},
        "base": {"top1": base["test_accuracy"], "top1_fp32_tflite": base_exported["none"],
                 "top1_int8_tflite": base_exported["int8"], "flops": base["flops"], "params": base["params"],
                 "epochs": _BASE_EPOCHS.value, "learning_rate": _BASE_LEARNING_RATE.value},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}; TF {__import__('tensorflow').__version__}, Keras {keras.__version__}",
    })
    # The rows the verdict needs first, for every seed; then the others.
    required = ROWS[:FIRST_ROWS]
    for group in ([r for r in _ROWS.value if r in required], [r for r in _ROWS.value if r not in required]):
        for seed in map(int, _SEEDS.value):
            for row in group:
                key = f"{row}/{seed}"
                if key not in results["runs"]:
                    results["runs"][key] = run_row(row, seed, runs, ordered)
                results["summary"] = summary(results["runs"], full_widths)
                write_json(_RESULTS.value, results)


if __name__ == "__main__":
    app.run(main)
