"""The ImageNet basic-block ResNets of the paper (ResNet-18, ResNet-34) as plain functional Keras models.

torchvision's layout: a 7x7/2 conv (64, no bias) + BN + ReLU and a 3x3/2 max pool; four stages of 64,
128, 256 and 512 channels with [2, 2, 2, 2] (ResNet-18) or [3, 4, 6, 3] (ResNet-34) basic blocks
(3x3 conv + BN + ReLU, 3x3 conv + BN, added to the shortcut, ReLU); the first 3x3 conv of stages 2-4
has stride 2 and their first block a 1x1/2 conv + BN projection shortcut; global average pooling and a
Dense classifier. Strided layers pad explicitly as PyTorch does (ZeroPadding2D then "valid"), so the
sampled positions, and ported weights, match torchvision's. Layer names follow keras.applications'
ResNet50 (`conv1_conv`, `conv2_block1_1_conv`, `conv3_block1_0_conv`, ...).

The models hold no weight decay: as for the keras.applications models, the training recipe applies it.
"""

import keras

from tas_keras.layers import BN_EPSILON, BN_MOMENTUM, he_normal_fan_out

STAGE_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def _conv_bn(x, filters, kernel, stride, name, relu):
    if stride > 1:
        x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="valid" if stride > 1 else "same",
                            use_bias=False, kernel_initializer=he_normal_fan_out(), name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _basic_block(x, filters, stride, name):
    shortcut = x
    if stride > 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                       kernel_initializer=he_normal_fan_out(), name=f"{name}_0_conv")(x)
        shortcut = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                                   name=f"{name}_0_bn")(shortcut)
    x = _conv_bn(x, filters, 3, stride, f"{name}_1", relu=True)
    x = _conv_bn(x, filters, 3, 1, f"{name}_2", relu=False)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.ReLU(name=f"{name}_out")(x)


def imagenet_resnet(depth, input_shape=(224, 224, 3), num_classes=1000):
    """ResNet-`depth` (18 or 34) for images of `input_shape` (height, width, channels)."""
    if depth not in BLOCKS_PER_STAGE:
        raise ValueError(f"depth must be one of {sorted(BLOCKS_PER_STAGE)}, got {depth!r}")
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1 or min(input_shape[:2]) < 32:
        raise ValueError(f"input_shape must be (height, width, channels) with sides >= 32, got {input_shape!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
    inputs = keras.Input(shape=input_shape, name="image")
    x = _conv_bn(inputs, STAGE_WIDTHS[0], 7, 2, "conv1", relu=True)
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)  # after a ReLU, zeros pad like PyTorch's -inf
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage, (filters, blocks) in enumerate(zip(STAGE_WIDTHS, BLOCKS_PER_STAGE[depth]), start=2):
        for index in range(1, blocks + 1):
            stride = 2 if stage > 2 and index == 1 else 1
            x = _basic_block(x, filters, stride, f"conv{stage}_block{index}")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")
