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

from tas_keras.baselines import KINDS, make_baseline
from tas_keras.search import COST_BANDS
from train import common_flags

common_flags.define_common_flags(epochs=1, batch_size=256)
_KIND = flags.DEFINE_enum("kind", "predefined", list(KINDS), "Which baseline.")
_MODEL = flags.DEFINE_string("model", "resnet20", "A registry name or a .keras model, as train.search takes it.")
_TRAINED = flags.DEFINE_string("trained", None, "A trained full --model (.keras; default: --model when it is a "
                               ".keras file): the network magnitude and taylor score (they write it ordered by "
                               "their scores as ordered.keras) and the random trials start from (from its leading "
                               "channels: an importance-ordered one, such as train.prune's ordered/model.keras, "
                               "makes them the most important ones).")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 0.1, "random: the trials' learning rate (0.01 from a "
                                    "trained network).")
common_flags.define_add_mode_flag()
common_flags.define_input_convention_flag()
_TARGET = flags.DEFINE_float("target_flops_ratio", 0.5, "R: keep this fraction of the full FLOPs.")
_TOLERANCE = flags.DEFINE_float("tolerance", 0.05, "t, the width of the FLOP band.")
_BAND = flags.DEFINE_enum("band", "code", list(COST_BANDS), "As train.search's --band.")
_COUNT = flags.DEFINE_integer("num_candidates", 8, "random: keras-tuner trials, each a distinct shape in the "
                              "band trained --epochs on the search-train half and ranked on the search-valid "
                              "half.", lower_bound=1)
FLAGS = flags.FLAGS


def main():
    make_baseline(out=FLAGS.out, kind=_KIND.value, model_name=_MODEL.value, target_ratio=_TARGET.value,
                  tolerance=_TOLERANCE.value, band=_BAND.value, dataset_name=FLAGS.dataset,
                  data_dir=FLAGS.data_dir, image_size=FLAGS.image_size,
                  streaming=FLAGS.streaming, count=_COUNT.value, epochs=FLAGS.epochs,
                  batch_size=FLAGS.batch_size, seed=FLAGS.seed, max_train_examples=FLAGS.max_train_examples,
                  overwrite=FLAGS.overwrite, checkpoint_steps=FLAGS.checkpoint_steps, strategy=FLAGS.strategy,
                  add_mode=FLAGS.add_mode, trained=_TRAINED.value, learning_rate=_LEARNING_RATE.value,
                  input_convention=FLAGS.input_convention)


if __name__ == "__main__":
    common_flags.run(main)
