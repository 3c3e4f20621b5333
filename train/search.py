"""TAS search of the width of every layer and the depth of every stage under a cost target.

  python -m train.search --out=runs/search --model=resnet56 --dataset=cifar10 --target_flops_ratio=0.47
  python -m train.search --out=runs/search --cost=latency --latency_table=table.json --target_latency_ratio=0.6
  python -m train.search --out=runs/search --model=my_model.keras --dataset=DIR --add_mode=tied
"""

from absl import flags

from tas_keras import api
from tas_keras.search import ARCH_DECAYS, ARCH_WARMUP, COST_BANDS, ENTROPY_WEIGHT, TAU_SCHEDULES
from train import common_flags

common_flags.define_common_flags(epochs=10, batch_size=256)
common_flags.define_mixed_precision_flag()
_MODEL = flags.DEFINE_string("model", "resnet20", "A registry name (the CIFAR resnet20 | resnet32 | resnet56 | "
                             "resnet110 | resnet164, resnet18 | resnet34 | resnet50 | mobilenet_v2 | "
                             "efficientnet_lite0) or a .keras file "
                             "(its images and classes must be the dataset's).")
common_flags.define_add_mode_flag()
common_flags.define_input_convention_flag()
common_flags.define_cost_flags("R: keep this fraction of the full network's cost (FLOPs or params).")
_LAMBDA = flags.DEFINE_float("cost_weight", 2.0, "lambda, the weight of the cost loss.")
_TOLERANCE = flags.DEFINE_float("tolerance", 0.05, "t, the width of the accepted band.")
_BAND = flags.DEFINE_enum("band", "code", list(COST_BANDS),
                          "code: [R - t, R] (reference code); paper: [(1 - t) R, (1 + t) R].")
_TAU = flags.DEFINE_enum("tau_schedule", "cosine", list(TAU_SCHEDULES),
                         "cosine 5 -> 0.1 (reference code) or linear (the paper: --tau_max=10).")
_TAU_MAX = flags.DEFINE_float("tau_max", 5.0, "Gumbel temperature at the first epoch.")
_TAU_MIN = flags.DEFINE_float("tau_min", 0.1, "Gumbel temperature at the last epoch.")
_MULTIPLE = flags.DEFINE_integer("width_multiple", 1, "Candidate widths rounded to multiples of this "
                                 "(8 or 16: hardware-aligned search space).", lower_bound=1)
_LR = flags.DEFINE_float("learning_rate", 0.1, "Weights: initial SGD learning rate (cosine to 0).")
_ARCH_LR = flags.DEFINE_float("arch_learning_rate", None, "Architecture: Adam's peak learning rate (default: "
                              "scaled to the run's length). The reference: 0.001.")
_ARCH_WARMUP = flags.DEFINE_float("arch_warmup", ARCH_WARMUP, "Fraction of the steps during which only the "
                                  "weights train (the reference: 0).")
_ENTROPY = flags.DEFINE_float("entropy_weight", ENTROPY_WEIGHT, "Weight, reached at the last step (linear "
                               "from the warm-up's end), of the architecture distributions' mean entropy in the "
                               "architecture loss: makes a short search's distributions sharp. Off by default, as the reference.",
                               lower_bound=0)
_ARCH_DECAY = flags.DEFINE_enum("arch_decay", "cosine", list(ARCH_DECAYS), "Architecture learning rate after "
                                "the warm-up: cosine to 0, or constant (the reference).")
_INIT = flags.DEFINE_string("init_from", None, "Start the supernet from this trained full network "
                            "(train.base's model.keras; order its channels by importance first, as train.prune's "
                            "ordered/model.keras is).")
_START_FULL = flags.DEFINE_float("arch_start_full", 0.0, "Add this logit to the full width and depth of every "
                                 "architecture distribution at the start, so that the samples start near the "
                                 "(trained) network. The reference: 0.")
FLAGS = flags.FLAGS


def main():
    target_ratio, target_ms = common_flags.cost_target(FLAGS.cost)
    api.search(_MODEL.value, FLAGS.dataset, target_ratio, FLAGS.out, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
               overwrite=FLAGS.overwrite, data_dir=FLAGS.data_dir, image_size=FLAGS.image_size,
               streaming=FLAGS.streaming, cost_metric=FLAGS.cost, latency_table=FLAGS.latency_table, target_latency_ms=target_ms,
               cost_weight=_LAMBDA.value, tolerance=_TOLERANCE.value,
               band=_BAND.value, tau_schedule=_TAU.value, tau_max=_TAU_MAX.value, tau_min=_TAU_MIN.value,
               width_multiple=_MULTIPLE.value, learning_rate=_LR.value, arch_learning_rate=_ARCH_LR.value,
               arch_warmup=_ARCH_WARMUP.value, arch_decay=_ARCH_DECAY.value, entropy_weight=_ENTROPY.value,
               init_from=_INIT.value, seed=FLAGS.seed, max_train_examples=FLAGS.max_train_examples,
               checkpoint_steps=FLAGS.checkpoint_steps, add_mode=FLAGS.add_mode, strategy=FLAGS.strategy,
               mixed_precision=FLAGS.mixed_precision, input_convention=FLAGS.input_convention,
               arch_start_full=_START_FULL.value)


if __name__ == "__main__":
    common_flags.run(main)
