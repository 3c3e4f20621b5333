"""Trains the unpruned network (the teacher), or any shape, with the reference recipe.

  python -m train.base --out=runs/base --model=resnet20 --dataset=cifar10_mini --epochs=10
"""

from absl import flags

from tas_keras import api
from tas_keras.training import BaseConfig as Defaults
from train import common_flags

common_flags.define_common_flags(epochs=Defaults.epochs, batch_size=Defaults.batch_size)
common_flags.define_mixed_precision_flag()
common_flags.define_input_convention_flag()
_MODEL = flags.DEFINE_string("model", Defaults.model_name, "A registry name: the CIFAR resnet20 | resnet32 | "
                             "resnet56 | resnet110 | resnet164, resnet18 | resnet34 | resnet50 | mobilenet_v2 | "
                             "efficientnet_lite0.")
flags.DEFINE_enum("weights", Defaults.weights, ["imagenet"], "Start from these pretrained weights with a new "
                  "classifier for the data's classes and fine-tune (efficientnet_lite0; use a fine-tuning "
                  "--learning_rate such as 0.01).")
_ARCH = flags.DEFINE_string("arch", Defaults.arch_path, "Train this shape (arch.json or released-shape file) "
                            "instead.")
flags.DEFINE_float("learning_rate", Defaults.learning_rate, "Initial SGD learning rate (cosine to 0).")
FLAGS = flags.FLAGS

# The flags that set a BaseConfig setting (`common_flags.given_settings`); --model, --arch and --dataset
# are read apart.
SETTING_FLAGS = ("data_dir", "image_size", "streaming", "batch_size", "seed", "max_train_examples", "epochs",
                 "checkpoint_steps", "strategy", "mixed_precision", "input_convention", "weights", "learning_rate")


def main():
    api.train(_ARCH.value or _MODEL.value, FLAGS.dataset, FLAGS.out, overwrite=FLAGS.overwrite,
              **common_flags.given_settings(SETTING_FLAGS))


if __name__ == "__main__":
    common_flags.run(main)
