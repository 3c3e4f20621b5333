"""What pixels a model was trained on, and feeding it exactly those (docs/design.md section 12).

Every pipeline normalises RGB pixels p in 0-255 as `(p / 255 - mean) / std` per channel; a convention is
the (mean, std) that gives a model the inputs it was trained on:

  dataset    the data's own per-channel statistics: how this project trains a network from scratch
  raw        p, 0-255 (a model that holds its own preprocessing, such as a leading Rescaling)
  unit       p / 255, in [0, 1]
  symmetric  (p - 127.5) / 127.5, in [-1, 1] (keras.applications' MobileNets, "tf" mode)
  lite       (p - 127) / 128 (TensorFlow's EfficientNet-Lite)
  imagenet   (p / 255 - ImageNet mean) / ImageNet std (torchvision's models, keras "torch" mode)
  caffe      BGR order, minus the ImageNet means in 0-255 (keras.applications' ResNet50 and VGG, "caffe")

A model whose first layer after its input is a Rescaling or a Normalization holds its convention: it is
fed raw pixels, and a different convention given for it is refused. Otherwise the given convention
applies, `dataset` by default. The exports take uint8 RGB pixels with the convention inside.
"""

import dataclasses

from tas_keras.data import IMAGENET_STATS
from tas_keras.layer_rules import is_input_layer, preprocesses_pixels

DATASET = "dataset"
RAW = "raw"
# (mean, std) per channel of the model's input in [0, 1] pixel scale, and whether that input is BGR.
CONVENTIONS = {
    DATASET: None,
    RAW: ((0.0, 0.0, 0.0), (1 / 255,) * 3, False),
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False),
    "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False),
    "lite": ((127 / 255,) * 3, (128 / 255,) * 3, False),
    "imagenet": (*IMAGENET_STATS, False),
    "caffe": ((103.939 / 255, 116.779 / 255, 123.68 / 255), (1 / 255,) * 3, True),
}


def _first_layer(model):
    """The model's first layer after its input (None when it has none)."""
    return next((layer for layer in model.layers if not is_input_layer(layer)), None)


def held_by(model):
    """RAW when the model's first layer (`_first_layer`) is a Rescaling or Normalization, else None."""
    return RAW if preprocesses_pixels(_first_layer(model)) else None


def check(convention):
    """ValueError unless `convention` is None or a name of CONVENTIONS."""
    if convention is not None and convention not in CONVENTIONS:
        raise ValueError(f"input convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")


def resolve(model, convention=None):
    """The convention `model` is fed: the one it holds, else `convention` (default DATASET)."""
    check(convention)
    held = held_by(model)
    if held and convention not in (None, held):
        raise ValueError(f"{model.name} starts with its own preprocessing ({_first_layer(model).name}) and takes raw "
                         f"0-255 pixels; input convention {convention!r} does not apply to it")
    return held or convention or DATASET


def feed(dataset, model, convention=None):
    """`dataset`, normalising its pixels as `model` expects them (`resolve`)."""
    stats = CONVENTIONS[resolve(model, convention)]
    if stats is None:
        return dataset
    mean, std, bgr = stats
    return dataclasses.replace(dataset, mean=tuple(mean), std=tuple(std), bgr=bgr)
