"""Prints the exact FLOPs and parameters of a network, layer by layer.

  python -m tas_keras.flops resnet56 [--num_classes=100] [--json]
  python -m tas_keras.flops runs/x/search/arch.json
  python -m tas_keras.flops ../shared/reference/tas-released-shapes/NeurIPS-2019__C010-ResNet56.config
"""

import json
import os
import sys

from absl import app, flags

from tas_keras.cost import count_arch
from tas_keras.search_space import ArchConfig

_JSON = flags.DEFINE_bool("json", False, "Print {flops, params, layers} as JSON instead of a table.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classes, when SHAPE is a model name.", lower_bound=1)


def _load(shape):
    if os.path.exists(shape) or os.sep in shape or shape.endswith((".json", ".config")):
        return ArchConfig.load(shape)
    return ArchConfig.full(shape, num_classes=_NUM_CLASSES.value)


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("give one SHAPE: a model name (resnet20 ... resnet164), an arch.json or a "
                             "released-shape file")
    try:
        arch = _load(argv[1])
    except ValueError as error:
        sys.exit(f"error: {error}")
    report = count_arch(arch)
    if _JSON.value:
        print(json.dumps(report.to_dict()))
    else:
        print(f"{arch.name}, {arch.num_classes} classes, blocks per stage {list(arch.stage_blocks)}")
        print(report.table())


if __name__ == "__main__":
    app.run(main)
