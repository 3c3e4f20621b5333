"""Prints the exact FLOPs and parameters of a network, layer by layer.

  python -m train.flops resnet56 [--num_classes=100] [--json]
  python -m train.flops runs/x/search/arch.json
  python -m train.flops tests/data/released_shapes/NeurIPS-2019__C010-ResNet56.config
  python -m train.flops mobilenet_v2 --image_size=224 --num_classes=1000 [--json]
  python -m train.flops my_model.keras
"""

import json
import os
import sys

from absl import app, flags

from tas_keras.cost import count_shape
from tas_keras.models.registry import build_model, is_model_file
from tas_keras.shapes import load_shape, shape_space
from tas_keras.supernet import search_space

_JSON = flags.DEFINE_bool("json", False, "Print {flops, params, layers} as JSON instead of a table.")
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", None, "Classes, when SHAPE is a model name (default: 10 for the CIFAR ResNets, 1000 for "
    "the ImageNet models).", lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "Square input side, when SHAPE is a model name (default: 32 for the CIFAR ResNets, "
    "224 for the ImageNet models).", lower_bound=1)


def _is_shape_file(shape):
    return not is_model_file(shape) and (os.path.exists(shape) or os.sep in shape
                                         or shape.endswith((".json", ".config")))


def _input_shape():
    return None if _IMAGE_SIZE.value is None else (_IMAGE_SIZE.value, _IMAGE_SIZE.value, 3)


def _count(shape):
    """(header line, CostReport) of SHAPE."""
    if _is_shape_file(shape):
        pruned = load_shape(shape)
        space = shape_space(pruned)
    else:
        space = search_space(shape, build_model(shape, _input_shape(), _NUM_CLASSES.value))
        pruned = space.full_shape()
    header = (f"{pruned.name}, input {'x'.join(map(str, pruned.input_shape))}, {pruned.num_classes} outputs, "
              f"blocks per stage {list(pruned.depths.values())}")
    return header, count_shape(space, pruned)


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("give one SHAPE: a model name (resnet20 ... resnet164, resnet18, resnet34, "
                             "resnet50, mobilenet_v2, efficientnet_lite0), a .keras file, an arch.json or a released-shape file")
    try:
        header, report = _count(argv[1])
    except ValueError as error:
        sys.exit(f"error: {error}")
    if _JSON.value:
        print(json.dumps(report.to_dict()))
    else:
        print(header)
        print(report.table())


if __name__ == "__main__":
    app.run(main)
