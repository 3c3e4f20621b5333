"""The main job: from a network and a FLOP budget to a pruned, verified .tflite and a report.

  python -m train.prune --out=runs/quickstart                       # --preset=quick, bundled data
  python -m train.prune --out=runs/r56 --model=resnet56 --dataset=cifar10 --target_flops_ratio=0.47 \
      --preset=paper --teacher=runs/base56/model.keras

Stages (sub-directories of --out): base (skipped with --teacher), search, distill, export/{none,int8},
then report.md / report.json. Re-running resumes; a finished stage is not redone.
"""

from absl import flags

from train import common_flags
from train.pipeline import PRESETS, run_prune

common_flags.define_common_flags(epochs=None, batch_size=None, dataset=None)
_MODEL = flags.DEFINE_string("model", "resnet20", "resnet20 | resnet32 | resnet56 | resnet110 | resnet164.")
_TARGET = flags.DEFINE_float("target_flops_ratio", 0.5, "Keep this fraction of the network's FLOPs.")
_PRESET = flags.DEFINE_enum("preset", "quick", sorted(PRESETS),
                            "quick: bundled data, minutes on a CPU; paper: the reference schedule (600 search "
                            "epochs, 300 KD epochs, batch 256), for GPUs.")
_TEACHER = flags.DEFINE_string("teacher", None, "A trained full --model (train.base's model.keras): skips base "
                               "training.")
_BASE_EPOCHS = flags.DEFINE_integer("base_epochs", None, "Override the preset.", lower_bound=1)
_SEARCH_EPOCHS = flags.DEFINE_integer("search_epochs", None, "Override the preset.", lower_bound=1)
_DISTILL_EPOCHS = flags.DEFINE_integer("distill_epochs", None, "Override the preset.", lower_bound=1)
_MULTIPLE = flags.DEFINE_integer("width_multiple", 1, "Search widths in multiples of this (8 or 16).",
                                 lower_bound=1)
_QAT_EPOCHS = flags.DEFINE_integer("qat_epochs", 0, "Make the int8 export quantization-aware: fine-tune this "
                                   "many epochs (needs requirements-tfmot.txt).", lower_bound=0)
FLAGS = flags.FLAGS


def main():
    run_prune(out=FLAGS.out, model_name=_MODEL.value, target_ratio=_TARGET.value, preset=_PRESET.value,
              dataset_name=FLAGS.dataset, data_dir=FLAGS.data_dir, teacher_path=_TEACHER.value,
              base_epochs=_BASE_EPOCHS.value, search_epochs=_SEARCH_EPOCHS.value,
              distill_epochs=_DISTILL_EPOCHS.value, batch_size=FLAGS.batch_size,
              width_multiple=_MULTIPLE.value, seed=FLAGS.seed, qat_epochs=_QAT_EPOCHS.value,
              overwrite=FLAGS.overwrite, strategy=FLAGS.strategy)


if __name__ == "__main__":
    common_flags.run(main)
