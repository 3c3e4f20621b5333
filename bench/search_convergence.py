"""Does a search of a given length decide? The architecture step's settings against convergence.

  python -m bench.search_convergence --suite=quick --runs=/work/runs/convergence
  python -m bench.search_convergence --suite=cifar10 --runs=/work/runs/convergence --dataset=../shared/data/cifar10-jpeg.zip

Every variant is one `run_search` into `<runs>/<suite>/<variant>` (resumable: a killed variant
continues from its backup, a finished one is read back). After each variant the suite's JSON
(bench/results/search_convergence_<suite>.json) is rewritten with every finished variant's outcome:
the final mean top-1 probability and entropy of the width and depth distributions, the epochs over
which the argmax last changed, whether the chosen shape is inside the band, and the wall time. A
search "decides" (issue 12) when the final mean top-1 width probability is >= 0.5, the argmax is
unchanged over the last 3 epochs and the shape lands in the band.
"""

import os
import platform

from absl import app, flags
import keras
import tensorflow as tf

from tas_keras import data
from tas_keras.search import ARCH_TRAVEL, ARCH_WARMUP, decision_summary, run_search
from tas_keras.runs import read_json, write_json

_SUITE = flags.DEFINE_enum("suite", "quick", ["quick", "cifar10"], "quick: the quickstart's search (bundled "
                           "data, 10 epochs, batch 64); cifar10: full CIFAR-10, ResNet-20, at most ~30 min.")
_RUNS = flags.DEFINE_string("runs", None, "Directory of the searches.", required=True)
_DATASET = flags.DEFINE_string("dataset", None, "Dataset of the suite (default: its own).")
_ONLY = flags.DEFINE_list("only", None, "Run these variants only.")
_OUT = flags.DEFINE_string("out", None, "JSON path (default bench/results/search_convergence_<suite>.json).")

REFERENCE = {"arch_learning_rate": 1e-3, "arch_warmup": 0.0, "arch_decay": "constant"}
SUITES = {
    "quick": {"search": dict(model_name="resnet20", dataset_name="cifar10_mini", epochs=10, batch_size=64,
                             target_ratio=0.5),
              "variants": {
                  "reference": REFERENCE,
                  "lr0.01_constant": {"arch_learning_rate": 1e-2, "arch_warmup": 0.0, "arch_decay": "constant"},
                  "travel10_warmup0.3_cosine": {"travel": 10.0, "arch_warmup": 0.3, "arch_decay": "cosine"},
                  "travel20_warmup0.3_cosine": {"travel": 20.0, "arch_warmup": 0.3, "arch_decay": "cosine"},
                  # The reference's own travel: 1e-3 x 58,800 architecture steps.
                  "travel59_warmup0.3_cosine": {"travel": 58.8, "arch_warmup": 0.3, "arch_decay": "cosine"},
                  "travel20_warmup0.3_cosine_entropy1": {"travel": 20.0, "arch_warmup": 0.3, "arch_decay": "cosine",
                                                         "entropy_weight": 1.0},
                  "travel20_warmup0.3_cosine_entropy2": {"travel": 20.0, "arch_warmup": 0.3, "arch_decay": "cosine",
                                                         "entropy_weight": 2.0},
                  "travel20_warmup0.3_cosine_entropy5": {"travel": 20.0, "arch_warmup": 0.3, "arch_decay": "cosine",
                                                         "entropy_weight": 5.0},
                  "travel59_warmup0.3_cosine_entropy5": {"travel": 58.8, "arch_warmup": 0.3, "arch_decay": "cosine",
                                                         "entropy_weight": 5.0},
                  "travel59_constant": {"travel": 58.8, "arch_warmup": 0.0, "arch_decay": "constant"},
                  "lr0.03_constant": {"arch_learning_rate": 3e-2, "arch_warmup": 0.0, "arch_decay": "constant"},
              }},
}


def _settings(variant, steps_total=None):
    """run_search keyword arguments of a variant; `travel` is turned into a learning rate."""
    settings = {"entropy_weight": 0.0, **variant}  # variants without the entropy term say nothing of it
    travel = settings.pop("travel", None)
    if travel is not None:
        warmup = settings.get("arch_warmup", ARCH_WARMUP)
        settings["arch_learning_rate"] = max(1e-3, travel / max(1, round(steps_total * (1 - warmup))))
    return settings


def main(argv):
    del argv
    suite = SUITES[_SUITE.value]
    search = dict(suite["search"])
    if _DATASET.value:
        search["dataset_name"] = _DATASET.value
    path = _OUT.value or os.path.join(os.path.dirname(__file__), "results",
                                      f"search_convergence_{_SUITE.value}.json")
    results = read_json(path) if os.path.exists(path) else {}
    results["settings"] = {**search, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                           f"TF {tf.__version__}, Keras {keras.__version__}", "travel_default": ARCH_TRAVEL,
                           "warmup_default": ARCH_WARMUP}
    variants = results.setdefault("variants", {})
    steps = _steps(search)
    for name, variant in suite["variants"].items():
        if _ONLY.value and name not in _ONLY.value:
            continue
        if variants.get(name, {}).get("settings") == variant:
            continue  # finished and recorded
        out = os.path.join(_RUNS.value, _SUITE.value, name)
        settings = _settings(variant, steps)
        arch = run_search(out, **search, **settings)
        history = read_json(os.path.join(out, "history.json"))
        variants[name] = {"settings": variant, **decision_summary(history, arch)}
        write_json(path, results)
        print(name, variants[name])


def _steps(search):
    """Total search steps of the suite (its data's search halves, batch and epochs)."""
    dataset = data.load_dataset(search["dataset_name"])
    halves = data.search_split(dataset.train_labels)
    return min(len(i) for i in halves) // search["batch_size"] * search["epochs"]


if __name__ == "__main__":
    app.run(main)
