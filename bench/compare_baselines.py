"""TAS against the paper's baselines at one FLOP target, all trained by the same distill recipe.

  python -m bench.compare_baselines --out=runs/compare --teacher=runs/base/model.keras \
      --tas_arch=runs/search/arch.json --model=resnet20 --target_flops_ratio=0.55 --epochs=2

Builds the pre-defined shape and the best of --random_candidates random shapes (a keras-tuner random
search) at the TAS run's target, trains every shape from scratch and with KD from the teacher (same
epochs, batch, seed), and writes `<out>/comparison.json` and `<out>/comparison.md`. Every run has its
own directory, so a re-run resumes.
"""

import os

from absl import app, flags

from tas_keras.baselines import make_baseline
from tas_keras.distill import distill
from tas_keras.runs import write_json

_OUT = flags.DEFINE_string("out", None, "Directory of all runs and the tables.", required=True)
_TEACHER = flags.DEFINE_string("teacher", None, "The unpruned network (model.keras).", required=True)
_TAS_ARCH = flags.DEFINE_string("tas_arch", None, "The searched shape (arch.json).", required=True)
_MODEL = flags.DEFINE_string("model", "resnet20", "The network the shapes prune.")
_TARGET = flags.DEFINE_float("target_flops_ratio", 0.55, "R of the TAS search.")
_DATASET = flags.DEFINE_string("dataset", "cifar10_mini", "As the train CLIs' --dataset.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "As the train CLIs' --data_dir.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Training epochs of every pruned network.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Batch size of every run.")
_RANDOM = flags.DEFINE_integer("random_candidates", 4, "Random shapes drawn and briefly trained.")
_RANDOM_EPOCHS = flags.DEFINE_integer("random_epochs", 1, "Epochs of each random candidate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every run.")

MODES = ("scratch", "kd")


def main(argv):
    del argv
    out = _OUT.value
    common = dict(dataset_name=_DATASET.value, data_dir=_DATA_DIR.value, batch_size=_BATCH.value,
                  seed=_SEED.value)
    shapes = {"tas": _TAS_ARCH.value}
    for kind in ("predefined", "random"):
        make_baseline(os.path.join(out, kind), kind=kind, model_name=_MODEL.value, target_ratio=_TARGET.value,
                      count=_RANDOM.value, epochs=_RANDOM_EPOCHS.value, **common)
        shapes[kind] = os.path.join(out, kind, "arch.json")

    rows = []
    for name, arch_path in shapes.items():
        for mode in MODES:
            metrics = distill(os.path.join(out, f"{name}_{mode}"), arch_path=arch_path, teacher_path=_TEACHER.value,
                              mode=mode, epochs=_EPOCHS.value, **common)
            rows.append({"shape": name, "mode": mode, "mflops": metrics["flops"] / 1e6,
                         "flops_ratio": 1 - metrics["flops_reduction"], "params": metrics["params"],
                         "test_accuracy": metrics["test_accuracy"],
                         "teacher_test_accuracy": metrics["teacher_test_accuracy"]})
    settings = {"model": _MODEL.value, "target_flops_ratio": _TARGET.value, "epochs": _EPOCHS.value,
                "random_candidates": _RANDOM.value, "random_epochs": _RANDOM_EPOCHS.value, **common}
    write_json(os.path.join(out, "comparison.json"), {"settings": settings, "rows": rows})
    lines = ["| shape | training | MFLOPs | FLOPs kept | params | test accuracy |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['mode']} | {r['mflops']:.2f} | {r['flops_ratio']:.1%} | {r['params']:,} | "
              f"{r['test_accuracy']:.2%} |" for r in rows]
    lines.append(f"\nTeacher: {rows[0]['teacher_test_accuracy']:.2%}; settings: {settings}")
    with open(os.path.join(out, "comparison.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(out, "comparison.md.tmp"), os.path.join(out, "comparison.md"))
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
