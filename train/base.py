"""Trains the unpruned network (the teacher), or any shape, with the reference recipe.

  python -m train.base --out=runs/base --model=resnet20 --dataset=cifar10_mini --epochs=10
"""

from absl import flags

from tas_keras import api
from train import common_flags

common_flags.define_common_flags(epochs=10, batch_size=256)
common_flags.define_mixed_precision_flag()
common_flags.define_input_convention_flag()
_MODEL = flags.DEFINE_string("model", "resnet20", "A registry name: the CIFAR resnet20 | resnet32 | resnet56 | "
                             "resnet110 | resnet164, resnet18 | resnet34 | resnet50 | mobilenet_v2 | "
                             "efficientnet_lite0.")
_WEIGHTS = flags.DEFINE_enum("weights", None, ["imagenet"], "Start from these pretrained weights with a new "
                             "classifier for the data's classes and fine-tune (efficientnet_lite0; use a "
                             "fine-tuning --learning_rate such as 0.01).")
_ARCH = flags.DEFINE_string("arch", None, "Train this shape (arch.json or released-shape file) instead.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 0.1, "Initial SGD learning rate (cosine to 0).")
FLAGS = flags.FLAGS


def main():
    api.train(_ARCH.value or _MODEL.value, FLAGS.dataset, FLAGS.out, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
              overwrite=FLAGS.overwrite, data_dir=FLAGS.data_dir, image_size=FLAGS.image_size,
              streaming=FLAGS.streaming, learning_rate=_LEARNING_RATE.value, seed=FLAGS.seed,
              max_train_examples=FLAGS.max_train_examples, checkpoint_steps=FLAGS.checkpoint_steps,
              strategy=FLAGS.strategy, mixed_precision=FLAGS.mixed_precision, weights=_WEIGHTS.value,
              input_convention=FLAGS.input_convention)


if __name__ == "__main__":
    common_flags.run(main)
