"""TAS search of the width of every layer and the depth of every stage under a cost target.

  python -m train.search --out=runs/search --model=resnet56 --dataset=cifar10 --target_flops_ratio=0.47
  python -m train.search --out=runs/search --cost=latency --latency_table=table.json --target_latency_ratio=0.6
  python -m train.search --out=runs/search --model=my_model.keras --dataset=DIR --add_mode=tied
"""

from absl import flags

from tas_keras import api
from tas_keras.search import ARCH_DECAYS, COST_BANDS, TAU_SCHEDULES, SearchConfig as Defaults
from train import common_flags

common_flags.define_common_flags(epochs=Defaults.epochs, batch_size=Defaults.batch_size)
common_flags.define_mixed_precision_flag()
_MODEL = flags.DEFINE_string("model", Defaults.model_name, "A registry name (the CIFAR resnet20 | resnet32 | "
                             "resnet56 | resnet110 | resnet164, resnet18 | resnet34 | resnet50 | mobilenet_v2 | "
                             "efficientnet_lite0) or a .keras file (its images and classes must be the dataset's).")
common_flags.define_add_mode_flag()
common_flags.define_input_convention_flag()
common_flags.define_cost_flags("R: keep this fraction of the full network's cost (FLOPs or params).")
flags.DEFINE_float("cost_weight", Defaults.cost_weight, "lambda, the weight of the cost loss.")
flags.DEFINE_float("tolerance", Defaults.tolerance, "t, the width of the accepted band.")
flags.DEFINE_enum("band", Defaults.band, list(COST_BANDS),
                  "code: [R - t, R] (reference code); paper: [(1 - t) R, (1 + t) R].")
flags.DEFINE_enum("tau_schedule", Defaults.tau_schedule, list(TAU_SCHEDULES),
                  "cosine 5 -> 0.1 (reference code) or linear (the paper: --tau_max=10).")
flags.DEFINE_float("tau_max", Defaults.tau_max, "Gumbel temperature at the first epoch.")
flags.DEFINE_float("tau_min", Defaults.tau_min, "Gumbel temperature at the last epoch.")
flags.DEFINE_integer("width_multiple", Defaults.width_multiple, "Candidate widths rounded to multiples of this "
                     "(8 or 16: hardware-aligned search space).", lower_bound=1)
flags.DEFINE_float("learning_rate", Defaults.learning_rate, "Weights: initial SGD learning rate (cosine to 0).")
flags.DEFINE_float("arch_learning_rate", Defaults.arch_learning_rate, "Architecture: Adam's peak learning rate "
                   "(default: scaled to the run's length). The reference: 0.001.")
flags.DEFINE_float("arch_warmup", Defaults.arch_warmup, "Fraction of the steps during which only the "
                   "weights train (the reference: 0).")
flags.DEFINE_float("entropy_weight", Defaults.entropy_weight, "Weight, reached at the last step (linear "
                   "from the warm-up's end), of the architecture distributions' mean entropy in the "
                   "architecture loss: makes a short search's distributions sharp. Off by default, as the "
                   "reference.", lower_bound=0)
flags.DEFINE_enum("arch_decay", Defaults.arch_decay, list(ARCH_DECAYS), "Architecture learning rate after "
                  "the warm-up: cosine to 0, or constant (the reference).")
flags.DEFINE_string("init_from", Defaults.init_from, "Start the supernet from this trained full network "
                    "(train.base's model.keras; order its channels by importance first, as train.prune's "
                    "ordered/model.keras is).")
flags.DEFINE_float("arch_start_full", Defaults.arch_start_full, "Add this logit to the full width and depth of "
                   "every architecture distribution at the start, so that the samples start near the "
                   "(trained) network. The reference: 0.")
FLAGS = flags.FLAGS


# The flags that set a SearchConfig setting (`common_flags.given_settings`); --model, --dataset and the
# cost target's flags are read apart.
SETTING_FLAGS = ("data_dir", "image_size", "streaming", "batch_size", "seed", "max_train_examples", "epochs",
                 "checkpoint_steps", "strategy", "mixed_precision", "add_mode", "input_convention", "cost",
                 "latency_table", "cost_weight", "tolerance", "band", "tau_schedule", "tau_max", "tau_min",
                 "width_multiple", "learning_rate", "arch_learning_rate", "arch_warmup", "entropy_weight",
                 "arch_decay", "init_from", "arch_start_full")


def main():
    target_ratio, target_ms = common_flags.cost_target(FLAGS.cost)
    api.search(_MODEL.value, FLAGS.dataset, target_ratio, FLAGS.out, overwrite=FLAGS.overwrite,
               target_latency_ms=target_ms, **common_flags.given_settings(SETTING_FLAGS))


if __name__ == "__main__":
    common_flags.run(main)
