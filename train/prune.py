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
flags.DEFINE_enum("weights", None, ["imagenet"], "Fine-tune the base network from these pretrained weights "
                  "(efficientnet_lite0) instead of training it from scratch.")
flags.DEFINE_bool("check_base", True, "Stop before the search when a given trained base network scores at chance "
                  "on the data (--nocheck_base: prune it anyway, e.g. an untrained model in a trial of the "
                  "pipeline).")
common_flags.define_add_mode_flag()
common_flags.define_input_convention_flag()
common_flags.define_cost_flags("Keep this fraction of the network's FLOPs (or parameters).")
_PRESET = flags.DEFINE_enum("preset", "quick", sorted(PRESETS),
                            "quick: bundled data, minutes on a CPU; paper: the reference schedule (600 search "
                            "epochs, 300 KD epochs, batch 256), for GPUs; mobile: the quick schedule searched "
                            "against int8 latency measured on this machine (--cost=latency), widths in multiples "
                            "of 16, int8 export.")
flags.DEFINE_string("teacher", None, "A trained full --model (train.base's model.keras): skips base training.")
flags.DEFINE_integer("base_epochs", None, "Override the preset.", lower_bound=1)
flags.DEFINE_integer("search_epochs", None, "Override the preset.", lower_bound=1)
flags.DEFINE_integer("distill_epochs", None, "Override the preset.", lower_bound=1)
flags.DEFINE_integer("width_multiple", None, "Search widths in multiples of this (8 or 16; default: the preset's, "
                     "1 or 16 for mobile).", lower_bound=1)
flags.DEFINE_list("quantize", None, "The exports, comma-separated: none (fp32), float16, dynamic, int8. Default: "
                  "the preset's (none,int8; int8 for mobile).")
flags.DEFINE_integer("qat_epochs", 0, "Make the int8 export quantization-aware: fine-tune this many epochs (needs "
                     "requirements-tfmot.txt).", lower_bound=0)
FLAGS = flags.FLAGS


# The flags that set a PruneConfig setting (`common_flags.given_settings`); --model, --preset and the cost
# target's flags are read apart.
SETTING_FLAGS = ("dataset", "data_dir", "image_size", "streaming", "batch_size", "seed", "max_train_examples",
                 "strategy", "mixed_precision", "add_mode", "input_convention", "cost", "latency_table", "weights",
                 "check_base", "teacher", "base_epochs", "search_epochs", "distill_epochs", "width_multiple",
                 "quantize", "qat_epochs")


def main():
    preset = PRESETS[_PRESET.value]
    cost = FLAGS.cost if FLAGS["cost"].present else preset.cost_metric
    target_ratio, target_ms = common_flags.cost_target(cost)
    api.prune(_MODEL.value, None, target_ratio, FLAGS.out, preset, overwrite=FLAGS.overwrite,
              target_latency_ms=target_ms, **common_flags.given_settings(SETTING_FLAGS))


if __name__ == "__main__":
    common_flags.run(main)
