"""Baselines as shapes, for train.distill, at the same target as a TAS search, for any model: uniformly
shrunk (predefined), the best of N random shapes in the FLOP band (random: a keras-tuner random search
that resumes when re-run after a kill) or one-shot magnitude or Taylor pruning (the least important
channels of a trained network removed globally; the network ordered by the same scores is written
beside the shape as ordered.keras, for train.distill's Init).

  python -m train.baseline --out=runs/predefined --kind=predefined --model=resnet20 --target_flops_ratio=0.55
  python -m train.baseline --out=runs/random --kind=random --num_candidates=8 --epochs=2
  python -m train.baseline --out=runs/magnitude --kind=magnitude --model=runs/base/model.keras \
      --dataset=my_images/ --image_size=96
"""

from absl import flags

from tas_keras.baselines import KINDS, BaselineConfig as Defaults, make_baseline
from tas_keras.search import COST_BANDS
from train import common_flags

common_flags.define_common_flags(epochs=Defaults.epochs, batch_size=Defaults.batch_size)
flags.DEFINE_enum("kind", Defaults.kind, list(KINDS), "Which baseline.")
flags.DEFINE_string("model", Defaults.model_name, "A registry name or a .keras model, as train.search takes it.")
flags.DEFINE_string("trained", Defaults.trained, "A trained full --model (.keras; default: --model when it is a "
                    ".keras file): the network magnitude and taylor score (they write it ordered by their scores "
                    "as ordered.keras) and the random trials start from (from its leading channels: an "
                    "importance-ordered one, such as train.prune's ordered/model.keras, makes them the most "
                    "important ones).")
flags.DEFINE_float("learning_rate", Defaults.learning_rate, "random: the trials' learning rate (0.01 from a "
                   "trained network).")
common_flags.define_add_mode_flag()
common_flags.define_input_convention_flag()
flags.DEFINE_float("target_flops_ratio", Defaults.target_ratio, "R: keep this fraction of the full FLOPs.")
flags.DEFINE_float("tolerance", Defaults.tolerance, "t, the width of the FLOP band.")
flags.DEFINE_enum("band", Defaults.band, list(COST_BANDS), "As train.search's --band.")
flags.DEFINE_integer("num_candidates", Defaults.count, "random: keras-tuner trials, each a distinct shape in the "
                     "band trained --epochs on the search-train half and ranked on the search-valid half.",
                     lower_bound=1)
FLAGS = flags.FLAGS

# The flags that set a BaselineConfig setting (`common_flags.given_settings`).
SETTING_FLAGS = ("dataset", "data_dir", "image_size", "streaming", "batch_size", "seed", "max_train_examples",
                 "epochs", "checkpoint_steps", "strategy", "add_mode", "input_convention", "kind", "model",
                 "trained", "learning_rate", "target_flops_ratio", "tolerance", "band", "num_candidates")


def main():
    make_baseline(FLAGS.out, overwrite=FLAGS.overwrite, **common_flags.given_settings(SETTING_FLAGS))


if __name__ == "__main__":
    common_flags.run(main)
