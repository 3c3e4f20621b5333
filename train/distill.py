"""Trains a pruned shape: from scratch, from the teacher's leading channels (init), with knowledge
distillation from the teacher (kd), or both (init_kd).

  python -m train.distill --out=runs/distill --arch=runs/search/arch.json --teacher=runs/base/model.keras
"""

from absl import flags

from tas_keras import api
from tas_keras.distill import MODES, DistillConfig as Defaults
from train import common_flags

common_flags.define_common_flags(epochs=Defaults.epochs, batch_size=Defaults.batch_size)
common_flags.define_mixed_precision_flag()
common_flags.define_input_convention_flag()
_ARCH = flags.DEFINE_string("arch", None, "The shape: an arch.json (search or baseline) or a released-shape "
                            "file.", required=True)
_TEACHER = flags.DEFINE_string("teacher", Defaults.teacher_path, "The unpruned network (train.base's model.keras).")
flags.DEFINE_enum("mode", Defaults.mode, list(MODES), "How the pruned network is trained.")
flags.DEFINE_float("kd_alpha", Defaults.alpha, "Weight of the KD term: (1 - a) CE + a T^2 KL.")
flags.DEFINE_float("kd_temperature", Defaults.temperature, "KD softmax temperature T.")
flags.DEFINE_float("learning_rate", Defaults.learning_rate, "Initial SGD learning rate (cosine to 0).")
FLAGS = flags.FLAGS

# The flags that set a DistillConfig setting (`common_flags.given_settings`); --arch, --teacher and
# --dataset are read apart.
SETTING_FLAGS = ("data_dir", "image_size", "streaming", "batch_size", "seed", "max_train_examples", "epochs",
                 "checkpoint_steps", "strategy", "mixed_precision", "input_convention", "mode", "kd_alpha",
                 "kd_temperature", "learning_rate")


def main():
    api.distill(_ARCH.value, _TEACHER.value, FLAGS.dataset, FLAGS.out, overwrite=FLAGS.overwrite,
                **common_flags.given_settings(SETTING_FLAGS))


if __name__ == "__main__":
    common_flags.run(main)
