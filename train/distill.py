"""Trains a pruned shape: from scratch, from the teacher's leading channels (init), with knowledge
distillation from the teacher (kd), or both (init_kd).

  python -m train.distill --out=runs/distill --arch=runs/search/arch.json --teacher=runs/base/model.keras
"""

from absl import flags

from tas_keras import api
from tas_keras.distill import MODES
from train import common_flags

common_flags.define_common_flags(epochs=10, batch_size=256)
common_flags.define_mixed_precision_flag()
common_flags.define_input_convention_flag()
_ARCH = flags.DEFINE_string("arch", None, "The shape: an arch.json (search or baseline) or a released-shape "
                            "file.", required=True)
_TEACHER = flags.DEFINE_string("teacher", None, "The unpruned network (train.base's model.keras).")
_MODE = flags.DEFINE_enum("mode", "kd", list(MODES), "How the pruned network is trained.")
_ALPHA = flags.DEFINE_float("kd_alpha", 0.9, "Weight of the KD term: (1 - a) CE + a T^2 KL.")
_TEMPERATURE = flags.DEFINE_float("kd_temperature", 4.0, "KD softmax temperature T.")
_LR = flags.DEFINE_float("learning_rate", 0.1, "Initial SGD learning rate (cosine to 0).")
FLAGS = flags.FLAGS


def main():
    api.distill(_ARCH.value, _TEACHER.value, FLAGS.dataset, FLAGS.out, mode=_MODE.value, epochs=FLAGS.epochs,
                batch_size=FLAGS.batch_size, overwrite=FLAGS.overwrite, data_dir=FLAGS.data_dir,
                image_size=FLAGS.image_size, streaming=FLAGS.streaming, learning_rate=_LR.value,
                alpha=_ALPHA.value, temperature=_TEMPERATURE.value, seed=FLAGS.seed,
                max_train_examples=FLAGS.max_train_examples, checkpoint_steps=FLAGS.checkpoint_steps,
                strategy=FLAGS.strategy, mixed_precision=FLAGS.mixed_precision,
                input_convention=FLAGS.input_convention)


if __name__ == "__main__":
    common_flags.run(main)
