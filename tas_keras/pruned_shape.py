"""The searched shape of any model the graph reader supports, as the search writes it (arch.json).

A `PrunedShape` names its source model (a registry name with input shape and classes, or a .keras
file), how the space was read from it (add mode, width multiple) and the point of that space (a
GraphShape: the width of every searchable slot, the blocks kept per stage), plus the provenance of the
search. From it, `space()` reads the space again and `derive(model)` rebuilds the pruned network as a
plain functional Keras model (`tas_keras.derive.derive_model`).

The CIFAR ResNets' shapes are written as ArchConfig files (the form of the paper's released shapes);
`PrunedShape.load` reads those too, as the GraphShape of the CIFAR ResNet's space they are
(`from_arch`), so every stage after the search has one way to build and count a pruned network.
"""

import dataclasses
import json
import os
from typing import Mapping

from tas_keras.derive import derive_model
from tas_keras.cifar_shapes import shape_from_arch
from tas_keras.graph import read_model
from tas_keras.graph_space import ADD_MODES, INDEPENDENT, GraphShape
from tas_keras.models.registry import build_model, is_model_file
from tas_keras.search_space import ArchConfig, read_json_file

FORMAT = "tas_keras.PrunedShape"


@dataclasses.dataclass(frozen=True)
class PrunedShape:
    """Args:
        model: a registry name (`tas_keras.models.registry`) or the absolute path of a .keras file.
        input_shape: (height, width, channels) of the model's images.
        num_classes: classes of the model's classifier.
        add_mode: how the space was read ("tied" or "independent", `tas_keras.graph.read_model`).
        width_multiple: candidate widths are multiples of it.
        shape: the GraphShape searched.
        provenance: where the shape came from (the search's settings and results).
    """

    model: str
    input_shape: tuple
    num_classes: int
    add_mode: str
    width_multiple: int
    shape: GraphShape
    provenance: Mapping = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a registry name or a .keras path, got {self.model!r}")
        if len(self.input_shape) != 3 or any(not isinstance(d, int) or d < 1 for d in self.input_shape):
            raise ValueError(f"input_shape must be 3 positive integers, got {self.input_shape!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if self.add_mode not in ADD_MODES:
            raise ValueError(f"add_mode must be one of {ADD_MODES}, got {self.add_mode!r}")
        if not isinstance(self.width_multiple, int) or self.width_multiple < 1:
            raise ValueError(f"width_multiple must be a positive integer, got {self.width_multiple!r}")
        object.__setattr__(self, "input_shape", tuple(self.input_shape))

    def source_model(self):
        """The full model the shape prunes: the .keras file, or the registry network (fresh weights)."""
        if is_model_file(self.model):
            return build_model(self.model)
        return build_model(self.model, self.input_shape, self.num_classes)

    def space(self, model=None):
        """The GraphSpace of `model` (default: `source_model()`), read as the search read it."""
        return read_model(self.source_model() if model is None else model, self.add_mode, self.width_multiple)

    def derive(self, model=None, transfer_weights=False):
        """The pruned network as a plain functional model, built from the layers of `model` (default:
        `source_model()`); with `transfer_weights`, initialised from its leading channels."""
        model = self.source_model() if model is None else model
        return derive_model(model, self.space(model), self.shape, transfer_weights=transfer_weights)

    def to_dict(self):
        return {"format": FORMAT, "model": self.model, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "add_mode": self.add_mode,
                "width_multiple": self.width_multiple, **self.shape.to_dict(),
                "provenance": dict(self.provenance)}

    @classmethod
    def from_dict(cls, config):
        if not isinstance(config, Mapping) or config.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} (its 'format' key is {config.get('format')!r})"
                             if isinstance(config, Mapping) else f"a shape is a JSON object, got {config!r}")
        keys = {"format", "model", "input_shape", "num_classes", "add_mode", "width_multiple", "widths", "depths",
                "provenance"}
        missing, unknown = keys - {"provenance"} - set(config), set(config) - keys
        if missing or unknown:
            raise ValueError(f"shape keys: missing {sorted(missing)}, unknown {sorted(unknown)}")
        return cls(config["model"], tuple(config["input_shape"]), config["num_classes"], config["add_mode"],
                   config["width_multiple"], GraphShape.from_dict({"widths": config["widths"],
                                                                   "depths": config["depths"]}),
                   config.get("provenance", {}))

    @classmethod
    def from_arch(cls, arch):
        """The CIFAR ResNet shape `arch` in the independent-mode space of its full network."""
        pruned = cls(arch.name, arch.input_shape, arch.num_classes, INDEPENDENT, 1, GraphShape({}, {}),
                     arch.provenance)
        return dataclasses.replace(pruned, shape=shape_from_arch(pruned.space(), arch))

    @classmethod
    def from_search(cls, config):
        """The shape a search returned (`run_search`: a PrunedShape's dict, or a CIFAR ResNet's ArchConfig's)."""
        return cls.from_dict(config) if _holds_pruned_shape(config) else cls.from_arch(ArchConfig.from_dict(config))

    @classmethod
    def load(cls, path):
        """The shape in `path` (a PrunedShape, or a CIFAR ResNet's ArchConfig or released shape); a
        ValueError naming the file and what is wrong with it."""
        config = read_json_file(path, "shape file")
        if not _holds_pruned_shape(config):
            return cls.from_arch(ArchConfig.load(path))  # also reads the paper's released shape files
        try:
            return cls.from_dict(config)
        except (TypeError, ValueError) as error:
            raise ValueError(f"shape file {os.fspath(path)!r} is not a valid shape: {error}") from None

    @property
    def name(self):
        """The source model's name (a .keras file's base name)."""
        return os.path.splitext(os.path.basename(self.model))[0] if is_model_file(self.model) else self.model

    def save(self, path):
        """Writes the JSON atomically: a reader never sees a half-written file."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)


def _holds_pruned_shape(config):
    """A PrunedShape's dict carries its format; a CIFAR ResNet's ArchConfig does not."""
    return isinstance(config, Mapping) and "format" in config
