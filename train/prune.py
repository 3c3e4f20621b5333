"""The main job: from a network and a FLOP budget to a pruned, verified .tflite and a report.

  python -m train.prune --out=runs/quickstart                       # --preset=quick, bundled data
  python -m train.prune --out=runs/r56 --model=resnet56 --dataset=cifar10 --target_flops_ratio=0.47 \
      --preset=paper --teacher=runs/base56/model.keras
  python -m train.prune --out=runs/phone --preset=mobile --target_latency_ratio=0.6   # int8 latency on this machine

Stages (sub-directories of --out): base (skipped with --teacher), latency_table (a latency search
without --latency_table), search, distill, export/{none,int8} (int8 only with --preset=mobile; --quantize), then
report.md / report.json. Re-running resumes; a finished stage is not redone.
"""

from absl import flags

from train import common_flags
from tas_keras import api
from tas_keras.prune import PRESETS

common_flags.define_common_flags(epochs=None, batch_size=None, dataset=None)
common_flags.define_mixed_precision_flag()
_MODEL = flags.DEFINE_string("model", "resnet20", "A registry name, trained from scratch as the base network (the "
                             "CIFAR resnet20 | resnet32 | resnet56 | resnet110 | resnet164, resnet18 | resnet34 | "
                             "resnet50 | mobilenet_v2 | efficientnet_lite0), or your trained .keras model, which is "
                             "then the base network and the teacher.")
_WEIGHTS = flags.DEFINE_enum("weights", None, ["imagenet"], "Fine-tune the base network from these pretrained "
                             "weights (efficientnet_lite0) instead of training it from scratch.")
_CHECK_BASE = flags.DEFINE_bool("check_base", True, "Stop before the search when a given trained base network "
                                "scores at chance on the data (--nocheck_base: prune it anyway, e.g. an untrained "
                                "model in a trial of the pipeline).")
common_flags.define_add_mode_flag()
common_flags.define_input_convention_flag()
common_flags.define_cost_flags("Keep this fraction of the network's FLOPs (or parameters).")
_PRESET = flags.DEFINE_enum("preset", "quick", sorted(PRESETS),
                            "quick: bundled data, minutes on a CPU; paper: the reference schedule (600 search "
                            "epochs, 300 KD epochs, batch 256), for GPUs; mobile: the quick schedule searched "
                            "against int8 latency measured on this machine (--cost=latency), widths in multiples "
                            "of 16, int8 export.")
_TEACHER = flags.DEFINE_string("teacher", None, "A trained full --model (train.base's model.keras): skips base "
                               "training.")
_BASE_EPOCHS = flags.DEFINE_integer("base_epochs", None, "Override the preset.", lower_bound=1)
_SEARCH_EPOCHS = flags.DEFINE_integer("search_epochs", None, "Override the preset.", lower_bound=1)
_DISTILL_EPOCHS = flags.DEFINE_integer("distill_epochs", None, "Override the preset.", lower_bound=1)
_MULTIPLE = flags.DEFINE_integer("width_multiple", None, "Search widths in multiples of this (8 or 16; "
                                 "default: the preset's, 1 or 16 for mobile).", lower_bound=1)
_QUANTIZE = flags.DEFINE_list("quantize", None, "The exports, comma-separated: none (fp32), float16, dynamic, int8. "
                              "Default: the preset's (none,int8; int8 for mobile).")
_QAT_EPOCHS = flags.DEFINE_integer("qat_epochs", 0, "Make the int8 export quantization-aware: fine-tune this "
                                   "many epochs (needs requirements-tfmot.txt).", lower_bound=0)
FLAGS = flags.FLAGS


def main():
    cost = FLAGS.cost if FLAGS["cost"].present else PRESETS[_PRESET.value].cost
    target_ratio, target_ms = common_flags.cost_target(cost)
    api.prune(_MODEL.value, FLAGS.dataset, target_ratio, FLAGS.out, overwrite=FLAGS.overwrite, preset=_PRESET.value,
              cost_metric=cost, latency_table=FLAGS.latency_table, target_latency_ms=target_ms,
              data_dir=FLAGS.data_dir, image_size=FLAGS.image_size, streaming=FLAGS.streaming,
              teacher_path=_TEACHER.value, base_epochs=_BASE_EPOCHS.value, search_epochs=_SEARCH_EPOCHS.value,
              distill_epochs=_DISTILL_EPOCHS.value, batch_size=FLAGS.batch_size, width_multiple=_MULTIPLE.value,
              seed=FLAGS.seed, qat_epochs=_QAT_EPOCHS.value, strategy=FLAGS.strategy,
              mixed_precision=FLAGS.mixed_precision, add_mode=FLAGS.add_mode,
              max_train_examples=FLAGS.max_train_examples, quantizations=_QUANTIZE.value, weights=_WEIGHTS.value,
              input_convention=FLAGS.input_convention, check_base=_CHECK_BASE.value)


if __name__ == "__main__":
    common_flags.run(main)
