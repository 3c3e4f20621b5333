"""The TAS search space of a CIFAR ResNet, and ArchConfig: one concrete shape in it.

The space (docs/design.md section 4): every conv picks its width among int(C * r), r in 0.3..1.0, and every
stage picks how many of its leading blocks it keeps. ArchConfig records one choice of all of them, in
the order of the paper's released shapes ("xchannels": stem, then every conv of every block, dropped
blocks included), so a shape moves between this project and the reference code unchanged. It is what the
CIFAR builder (`tas_keras.models.cifar_resnet`) builds and what the reference's files hold; the pipeline's
shape is a GraphShape, to and from which `tas_keras.cifar_shapes` converts it.
"""

import dataclasses
import json
import numbers
import os
import re
from typing import Any, Mapping

WIDTH_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
STAGE_PLANES = (16, 32, 64)
STEM_WIDTH = 16
BLOCK_TYPES = ("basic", "bottleneck")
BOTTLENECK_EXPANSION = 4
FAMILY = "cifar_resnet"

_MODEL_NAME = re.compile(r"^resnet(\d+)(_bottleneck)?$")
_RELEASED_MODULES = {"ResNetBasicblock": "basic", "ResNetBottleneck": "bottleneck"}
_REQUIRED_KEYS = ("depth", "block", "num_classes", "widths", "stage_blocks")
_RELEASED_REQUIRED_KEYS = ("depth", "module", "class_num", "xchannels")


def _integer(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _integers(name, values):
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a list of integers, got {values!r:.80}")
    values = list(values)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be a list of integers, got {values!r:.80}")
    return tuple(int(v) for v in values)


def candidate_widths(full_width, multiple_of=1, ratios=WIDTH_RATIOS):
    """Sorted distinct widths int(full_width * r), as the reference code forms them.

    `multiple_of` > 1 rounds every candidate to the nearest multiple (at least one multiple, at most
    the full width), the hardware-aligned space: mobile kernels tile output channels by 8 or 16.
    """
    if full_width < 1:
        raise ValueError(f"full_width must be >= 1, got {full_width!r}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of!r}")
    widths = {max(1, int(full_width * r)) for r in ratios}
    if multiple_of > 1:
        widths = {min(full_width, max(multiple_of, multiple_of * round(w / multiple_of))) for w in widths}
    return tuple(sorted(widths))


def depth_choices(num_blocks):
    """Block counts a stage of `num_blocks` blocks may keep: all if <= 3, else the odd ones and n."""
    if num_blocks < 1:
        raise ValueError(f"a stage needs at least one block, got {num_blocks!r}")
    if num_blocks <= 3:
        return tuple(range(1, num_blocks + 1))
    choices = list(range(1, num_blocks + 1, 2))
    if choices[-1] != num_blocks:
        choices.append(num_blocks)
    return tuple(choices)


def parse_model_name(name):
    """'resnet56' -> (56, 'basic'); 'resnet164' is the paper's bottleneck network.

    `resnet<D>` is a basic-block network (D = 6n+2) except resnet164, which the paper and the
    reference code build from bottlenecks; `resnet<D>_bottleneck` asks for bottlenecks (D = 9n+2).
    """
    match = _MODEL_NAME.match(str(name))
    if not match:
        raise ValueError(
            f"unknown model {name!r}: expected resnet<depth> (resnet20, resnet32, resnet56, resnet110, "
            "resnet164) or resnet<depth>_bottleneck")
    depth = int(match.group(1))
    block = "bottleneck" if match.group(2) or depth == 164 else "basic"
    blocks_per_stage(depth, block)
    return depth, block


def model_name(depth, block):
    if block == "bottleneck" and depth != 164:
        return f"resnet{depth}_bottleneck"
    return f"resnet{depth}"


def blocks_per_stage(depth, block):
    """Blocks per stage n of a CIFAR ResNet of `depth` layers: (depth-2)/6 basic, (depth-2)/9 bottleneck."""
    if block not in BLOCK_TYPES:
        raise ValueError(f"block must be one of {BLOCK_TYPES}, got {block!r}")
    layers_per_block = 2 if block == "basic" else 3
    if depth < 2 + 3 * layers_per_block or (depth - 2) % (3 * layers_per_block):
        form = "6n+2 (8, 14, 20, 32, 56, 110, ...)" if block == "basic" else "9n+2 (11, 20, 29, ..., 164)"
        raise ValueError(f"depth {depth!r} is not valid for {block} blocks: it must be of the form {form}")
    return (depth - 2) // (3 * layers_per_block)


def read_json_file(path, what):
    """The JSON content of `path`; a ValueError naming `what` the file should be if it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as error:
        raise ValueError(f"cannot read {what} {path!r}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path!r} is not JSON: {error}") from None


@dataclasses.dataclass(frozen=True)
class ConvSlot:
    """One searchable conv of the full network: where it sits and how wide it is at most."""

    name: str
    kernel: int
    stride: int
    full_width: int
    stage: int  # 0 for the stem
    block: int  # 1-based within its stage; 0 for the stem


def conv_slots(depth, block):
    """Every searchable conv of the full network, in xchannels order (stem first)."""
    n = blocks_per_stage(depth, block)
    slots = [ConvSlot("stem_conv", 3, 1, STEM_WIDTH, 0, 0)]
    for stage, planes in enumerate(STAGE_PLANES, start=1):
        for index in range(1, n + 1):
            stride = 2 if stage > 1 and index == 1 else 1
            prefix = f"s{stage}_b{index}"
            if block == "basic":
                layout = (("conv_a", 3, stride, planes), ("conv_b", 3, 1, planes))
            else:
                layout = (("conv_a", 1, 1, planes), ("conv_b", 3, stride, planes),
                          ("conv_c", 1, 1, planes * BOTTLENECK_EXPANSION))
            slots.extend(ConvSlot(f"{prefix}_{conv}", kernel, conv_stride, width, stage, index)
                         for conv, kernel, conv_stride, width in layout)
    return tuple(slots)


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """A concrete CIFAR ResNet shape: the width of every conv and the blocks kept per stage.

    `widths` lists the stem and then every conv of every block of the full-depth network (a block
    beyond its stage's kept count still has an entry, ignored when building). `provenance` says
    where the shape came from (search run, released file, hand-written) and is carried along.
    """

    depth: int
    block: str
    num_classes: int
    widths: tuple
    stage_blocks: tuple
    input_shape: tuple = (32, 32, 3)
    family: str = FAMILY
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("depth", "num_classes"):
            object.__setattr__(self, name, _integer(name, getattr(self, name)))
        for name in ("widths", "stage_blocks", "input_shape"):
            object.__setattr__(self, name, _integers(name, getattr(self, name)))
        if not isinstance(self.provenance, Mapping):
            raise ValueError(f"provenance must be a JSON object, got {self.provenance!r}")
        object.__setattr__(self, "provenance", dict(self.provenance))
        self._validate()

    def _validate(self):
        if self.family != FAMILY:
            raise ValueError(f"family must be {FAMILY!r}, got {self.family!r}")
        if self.block not in BLOCK_TYPES:
            raise ValueError(f"block must be one of {BLOCK_TYPES}, got {self.block!r}")
        n = blocks_per_stage(self.depth, self.block)
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes!r}")
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be (height, width, channels) > 0, got {self.input_shape!r}")
        slots = self.slots
        if len(self.widths) != len(slots):
            per_block = 2 if self.block == "basic" else 3
            raise ValueError(
                f"widths has {len(self.widths)} entries; {self.name} needs {len(slots)} "
                f"(stem + {per_block} per block x {3 * n} blocks)")
        for slot, width in zip(slots, self.widths):
            if not 1 <= width <= slot.full_width:
                raise ValueError(f"{slot.name}: width {width} is outside 1..{slot.full_width}")
        if len(self.stage_blocks) != len(STAGE_PLANES):
            raise ValueError(f"stage_blocks needs {len(STAGE_PLANES)} entries, got {self.stage_blocks!r}")
        for stage, kept in enumerate(self.stage_blocks, start=1):
            if not 1 <= kept <= n:
                raise ValueError(f"stage {stage}: {kept} blocks kept is outside 1..{n}")

    @property
    def name(self):
        return model_name(self.depth, self.block)

    @property
    def slots(self):
        return conv_slots(self.depth, self.block)

    @property
    def num_blocks(self):
        return blocks_per_stage(self.depth, self.block)

    def width_of(self, conv_name):
        for slot, width in zip(self.slots, self.widths):
            if slot.name == conv_name:
                return width
        raise KeyError(conv_name)

    def is_full(self):
        return (all(w == s.full_width for s, w in zip(self.slots, self.widths))
                and all(b == self.num_blocks for b in self.stage_blocks))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def full(cls, model, num_classes=10, input_shape=(32, 32, 3)):
        """The unpruned network `model` (a name such as 'resnet56')."""
        depth, block = parse_model_name(model)
        slots = conv_slots(depth, block)
        n = blocks_per_stage(depth, block)
        return cls(depth=depth, block=block, num_classes=num_classes,
                   widths=[s.full_width for s in slots], stage_blocks=[n] * len(STAGE_PLANES),
                   input_shape=input_shape, provenance={"source": "full"})

    def to_dict(self):
        return {
            "family": self.family,
            "model": self.name,
            "depth": self.depth,
            "block": self.block,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "widths": list(self.widths),
            "stage_blocks": list(self.stage_blocks),
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, config):
        """The shape of a `to_dict` mapping; ValueError naming what is wrong with any other."""
        if not isinstance(config, Mapping):
            raise ValueError(f"a shape is a JSON object with keys {list(_REQUIRED_KEYS)}, got "
                             f"{type(config).__name__} {config!r:.80}")
        config = dict(config)
        model = config.pop("model", None)
        missing = [key for key in _REQUIRED_KEYS if key not in config]
        if missing:
            raise ValueError(f"missing keys {missing} (a shape needs {list(_REQUIRED_KEYS)})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown ArchConfig keys {unknown}")
        arch = cls(**config)
        if model is not None and model != arch.name:
            raise ValueError(f"model {model!r} contradicts depth {arch.depth} and block {arch.block!r} "
                             f"(a {arch.name})")
        return arch

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))

    def save(self, path):
        """Writes the JSON atomically: a reader never sees a half-written arch.json."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json() + "\n")
        os.replace(tmp, path)

    @classmethod
    def from_released(cls, released, provenance=None):
        """Imports a shape in the reference code's typed JSON (`xchannels`, `xblocks`)."""
        if not isinstance(released, Mapping):
            raise ValueError(f"a released shape is a JSON object, got {type(released).__name__}")
        for key, entry in released.items():
            if not isinstance(entry, list) or len(entry) != 2:
                raise ValueError(f"{key}: expected a [type, value] pair, got {entry!r:.80}")
        values = {key: value for key, (_, value) in released.items()}
        super_type = values.get("super_type", "infer-shape")
        required = _RELEASED_REQUIRED_KEYS + (("xblocks",) if super_type == "infer-shape" else ())
        missing = [key for key in required if key not in values]
        if missing:
            raise ValueError(f"missing keys {missing} (a released shape needs {list(required)})")
        module = values["module"]
        if module not in _RELEASED_MODULES:
            raise ValueError(f"module must be one of {sorted(_RELEASED_MODULES)}, got {module!r}")
        if values.get("dataset", "cifar") != "cifar":
            raise ValueError(f"only CIFAR shapes are supported, got dataset {values['dataset']!r}")
        depth, block = _released_integer("depth", values["depth"]), _RELEASED_MODULES[module]
        channels = _released_integers("xchannels", values["xchannels"])
        if len(channels) < 2:
            raise ValueError(f"xchannels must list the input channels and every conv's width, got {channels}")
        if super_type == "infer-shape":
            stage_blocks = _released_integers("xblocks", values["xblocks"])
        elif super_type == "infer-width":
            stage_blocks = [blocks_per_stage(depth, block)] * len(STAGE_PLANES)
        else:
            raise ValueError(f"super_type must be infer-shape or infer-width, got {super_type!r}")
        origin = {"source": "released", "super_type": super_type}
        if "estimated_FLOP" in values:
            origin["reported_mflops"] = float(values["estimated_FLOP"])
        origin.update(provenance or {})
        return cls(depth=depth, block=block, num_classes=_released_integer("class_num", values["class_num"]),
                   widths=channels[1:], stage_blocks=stage_blocks,
                   input_shape=(32, 32, channels[0]), provenance=origin)

    @classmethod
    def load(cls, path):
        """Reads an arch.json of this project or a released-shape file of the reference code."""
        config = read_json_file(path, "shape file")
        try:
            if isinstance(config, Mapping) and {"xchannels", "module"} & config.keys():
                return cls.from_released(config, provenance={"file": os.path.basename(path)})
            return cls.from_dict(config)
        except ValueError as error:
            raise ValueError(f"shape file {os.fspath(path)!r} is not a valid shape: {error}") from None

    def to_released(self, mflops):
        """The reference code's typed JSON for this shape; `mflops` is written as estimated_FLOP."""
        module = {v: k for k, v in _RELEASED_MODULES.items()}[self.block]
        as_str = lambda values: [str(v) for v in values]  # noqa: E731 (the format stores strings)
        released = {
            "dataset": ["str", "cifar"],
            "arch": ["str", "resnet"],
            "depth": ["int", str(self.depth)],
            "module": ["str", module],
            "super_type": ["str", "infer-shape"],
            "zero_init_residual": ["bool", "0"],
            "class_num": ["int", str(self.num_classes)],
            "search_mode": ["str", "shape"],
            "xchannels": ["int", as_str((self.input_shape[-1],) + self.widths)],
            "xblocks": ["int", as_str(self.stage_blocks)],
        }
        released["estimated_FLOP"] = ["float", f"{mflops:.6f}"]
        return released


def _released_integer(name, value):
    """The reference code's files write integers as strings ("20")."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _released_integers(name, values):
    if not isinstance(values, list):
        raise ValueError(f"{name} must be a list of integers, got {values!r:.80}")
    return [_released_integer(name, v) for v in values]
