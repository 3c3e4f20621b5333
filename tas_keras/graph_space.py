"""The search space read from a model (`tas_keras.graph.read_model`): its layers, width slots, stages of
droppable blocks and identity shortcuts (`GraphSpace`), a point of it (`GraphShape`, the project's one
shape type), and the layers the derived network of a point builds (`GraphSpace.plan`), which both the
builder (`tas_keras.derive`) and the FLOP counter (`tas_keras.cost.count_shape`) read, so the counted
network is the built one.
"""

import dataclasses
import functools
import json
import os
from typing import Mapping

import numpy as np

from tas_keras.layer_rules import rule_for

TIED = "tied"
INDEPENDENT = "independent"
ADD_MODES = (TIED, INDEPENDENT)
# The shape files' format name from when a PrunedShape held a GraphShape and its source: their files stay readable.
FORMAT = "tas_keras.PrunedShape"


@dataclasses.dataclass(frozen=True)
class WidthSlot:
    """A group of channels that share one width: opened by `name`, widened to `full_width` at most.

    A Concatenate's output is a slot of `members`: the slots it joins, in channel order, each at its own
    width, so the channels it keeps are each member's leading ones at that member's offset
    (`GraphSpace.kept_channels`). The search chooses its members' widths, not its own.
    """

    name: str
    full_width: int
    candidates: tuple  # sorted; (full_width,) when fixed
    fixed_reason: str = ""  # why the reader keeps it at full width; empty when the search chooses it
    # Its widths are whole multiples of this: the group widths of the grouped convs that follow it keep
    # whole groups (their least common multiple; 1 without one).
    width_step: int = 1
    members: tuple = ()

    @property
    def searchable(self):
        return not self.fixed_reason and not self.members


def output_size(shape):
    """(height, width) of a layer's output of `shape` (batch axis first) when it is a feature map, else ()."""
    return tuple(int(d) for d in shape[1:3]) if len(shape) == 4 else ()


@dataclasses.dataclass(frozen=True)
class GraphLayer:
    """One layer of the model, as the search space sees it.

    kind: the kind of its rule (`tas_keras.layer_rules`): input | conv (Conv2D) | grouped (Conv2D, groups >
    1) | separable | conv_transpose | dense | depthwise | batch_norm | layer_norm | layer_scale | pass (weightless, keeps
    the slot) | reshape (Flatten of a map, Reshape: fixed in and out) | concat (Concatenate: its output's
    slot has its inputs' as members) | merge (Add and other elementwise merges) | op (an element-wise
    keras.ops operation).
    """

    name: str
    class_name: str
    kind: str
    inputs: tuple  # names of the layers whose outputs it reads, in call order
    in_slots: tuple  # the slot of each input
    out_slot: str
    output_size: tuple = ()  # (height, width) of a spatial output, () for a vector
    kernel: tuple = ()  # (k_h, k_w) of a conv or depthwise conv; (1, 1) of a Dense on a feature map
    strides: tuple = ()
    use_bias: bool = False
    depth_multiplier: int = 1
    group_width: int = 1  # a grouped conv's input channels per group (a depthwise conv's: 1)
    affine: int = 0  # a normalisation or scale: its per-channel trainable vectors (gamma and/or beta)
    block: str = ""  # the droppable identity block it belongs to
    call_arguments: Mapping = dataclasses.field(default_factory=dict)  # e.g. Dropout's training=False
    operands: tuple = ()  # a keras.ops operation's arguments: None for each input tensor, else the constant
    input_size: tuple = ()  # (height, width) of a transposed conv's input, which its cost is counted over


@dataclasses.dataclass(frozen=True)
class IdentityShortcut:
    """An independent-mode Add(x, r) whose x a derived network projects when the widths differ."""

    add: str
    shortcut: str  # the layer whose output is x
    residual: str  # the layer whose output is r
    conv: str  # the Conv2D opening r's slot: the projection conv copies its settings
    batch_norm: str  # the BN between that conv and r ("" when none): the projection BN copies it
    conv_name: str  # names of the projection layers in the derived network
    batch_norm_name: str


@dataclasses.dataclass(frozen=True)
class ResidualBlock:
    name: str  # the Add's name without "_add"
    entry: str  # the layer whose output x the block reads (and hands on when dropped)
    add: str
    exit: str  # the layer whose output leaves the block: the Add or its trailing activation
    layers: tuple  # the residual branch, the Add and the trailing activations, in graph order


@dataclasses.dataclass(frozen=True)
class Stage:
    """A chain of droppable identity blocks and the stage's always-kept first block.

    The first block is `opener` (a projection block or a stage-opening block without an Add) when there
    is one, else `blocks[0]`.
    """

    name: str
    opener: str
    blocks: tuple  # ResidualBlock, in order
    choices: tuple  # depth_choices(num_blocks)

    @property
    def first_block(self):
        return self.opener or self.blocks[0].name

    @property
    def num_blocks(self):
        return len(self.blocks) + bool(self.opener)

    def kept_blocks(self, depth):
        """The identity blocks a stage keeping `depth` blocks (first block included) keeps."""
        return self.blocks[:depth - bool(self.opener)]


@dataclasses.dataclass(frozen=True)
class GraphShape:
    """The shape of a network: a point of a GraphSpace (the width of every searchable slot, the blocks kept
    per stage) and what reads that space again, as the search read it. The only shape type: a search, a
    baseline, the supernet's argmax and every shape file hold one; a CIFAR ResNet's ArchConfig and the
    paper's released shapes are converted to and from it at the edge (`tas_keras.cifar_shapes`).

    Args:
        widths: {searchable slot: width}.
        depths: {stage: blocks kept}.
        model: the registry name or the absolute path of the .keras file the space is read from; "" when
            it was read from a model in memory (`GraphSpace.model`).
        input_shape: (height, width, channels) of the model's images.
        num_classes: classes of the model's classifier.
        add_mode: how the space was read ("tied" or "independent", `tas_keras.graph.read_model`).
        width_multiple: candidate widths are multiples of it.
        provenance: where the shape came from (the search's settings and results).
    """

    widths: Mapping[str, int]
    depths: Mapping[str, int]
    model: str
    input_shape: tuple
    num_classes: int
    add_mode: str
    width_multiple: int
    provenance: Mapping = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "widths", {str(k): int(v) for k, v in dict(self.widths).items()})
        object.__setattr__(self, "depths", {str(k): int(v) for k, v in dict(self.depths).items()})
        if not isinstance(self.model, str):
            raise ValueError(f"model must be a registry name or a .keras path, got {self.model!r}")
        if len(self.input_shape) != 3 or any(not isinstance(d, int) or d < 1 for d in self.input_shape):
            raise ValueError(f"input_shape must be 3 positive integers, got {self.input_shape!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if self.add_mode not in ADD_MODES:
            raise ValueError(f"add_mode must be one of {ADD_MODES}, got {self.add_mode!r}")
        if not isinstance(self.width_multiple, int) or self.width_multiple < 1:
            raise ValueError(f"width_multiple must be a positive integer, got {self.width_multiple!r}")
        if not isinstance(self.provenance, Mapping):
            raise ValueError(f"provenance must be a JSON object, got {self.provenance!r}")
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "provenance", dict(self.provenance))

    @property
    def name(self):
        """The source model's name (a .keras file's base name)."""
        return os.path.splitext(os.path.basename(self.model))[0] if self.model.endswith(".keras") else self.model

    def point(self):
        """Where in its space the shape is: its widths and depths (a search's history records them)."""
        return {"widths": dict(self.widths), "depths": dict(self.depths)}

    def to_dict(self):
        """The shape file's content."""
        return {"format": FORMAT, "model": self.model, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "add_mode": self.add_mode, "width_multiple": self.width_multiple,
                **self.point(), "provenance": dict(self.provenance)}

    @classmethod
    def from_dict(cls, config):
        """The shape of a shape file's content; ValueError naming what is wrong with any other."""
        if not isinstance(config, Mapping) or config.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} (its 'format' key is {config.get('format')!r})"
                             if isinstance(config, Mapping) else f"a shape is a JSON object, got {config!r}")
        keys = {"format", "model", "input_shape", "num_classes", "add_mode", "width_multiple", "widths", "depths",
                "provenance"}
        missing, unknown = keys - {"provenance"} - set(config), set(config) - keys
        if missing or unknown:
            raise ValueError(f"shape keys: missing {sorted(missing)}, unknown {sorted(unknown)}")
        return cls(config["widths"], config["depths"], config["model"], tuple(config["input_shape"]),
                   config["num_classes"], config["add_mode"], config["width_multiple"], config.get("provenance", {}))

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))

    def save(self, path):
        """Writes the shape file atomically: a reader never sees a half-written file."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json() + "\n")
        os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class DerivedLayer:
    """A layer of the derived network: `layer` with its inputs rewired past dropped blocks, built with
    the class and settings of the original layer `source` (itself, or for a projection shortcut the
    conv or BN it mirrors) and `out_channels` output channels."""

    layer: GraphLayer
    source: str
    in_channels: int
    out_channels: int


@dataclasses.dataclass(frozen=True)
class DerivedPlan:
    layers: tuple
    output: str


@dataclasses.dataclass(frozen=True)
class GraphSpace:
    """The search space read from a model: layers in graph order, width slots, stages, shortcuts."""

    name: str  # the Keras model's
    input_shape: tuple
    add_mode: str
    multiple_of: int
    layers: tuple
    slots: tuple
    stages: tuple
    shortcuts: tuple  # IdentityShortcut, independent mode only
    output: str
    # The registry name or absolute .keras path the space was read from (`tas_keras.supernet.search_space`),
    # which its shapes name; "" for a model in memory.
    model: str = ""

    def layer(self, name):
        return self._layers_by_name[name]

    def slot(self, name):
        return self._slots_by_name[name]

    @functools.cached_property
    def _layers_by_name(self):
        return {layer.name: layer for layer in self.layers}

    @functools.cached_property
    def _slots_by_name(self):
        return {slot.name: slot for slot in self.slots}

    @property
    def searchable_slots(self):
        return tuple(slot for slot in self.slots if slot.searchable)

    @property
    def num_classes(self):
        return self.slot(self.layer(self.output).out_slot).full_width

    def shape(self, widths, depths, provenance=None):
        """The GraphShape of these widths (by searchable slot) and depths (by stage) in this space."""
        return GraphShape(widths, depths, self.model, self.input_shape, self.num_classes, self.add_mode,
                          self.multiple_of, provenance or {})

    def full_shape(self):
        return self.shape({s.name: s.full_width for s in self.searchable_slots},
                          {stage.name: stage.num_blocks for stage in self.stages})

    def smallest_shape(self):
        """Every slot at its smallest candidate, every stage at its smallest depth: what a search can reach."""
        return self.shape({s.name: s.candidates[0] for s in self.searchable_slots},
                          {stage.name: stage.choices[0] for stage in self.stages})

    def random_shape(self, rng):
        """A shape drawn uniformly from the candidates and depth choices (`rng`: a numpy Generator)."""
        return self.shape({s.name: int(rng.choice(s.candidates)) for s in self.searchable_slots},
                          {stage.name: int(rng.choice(stage.choices)) for stage in self.stages})

    def validate(self, shape):
        expected, given = {s.name for s in self.searchable_slots}, set(shape.widths)
        if expected != given:
            raise ValueError(f"shape widths do not match the space {self.name!r}: missing "
                             f"{sorted(expected - given)}, unknown {sorted(given - expected)}")
        for slot in self.searchable_slots:
            width = shape.widths[slot.name]
            if not 1 <= width <= slot.full_width:
                raise ValueError(f"{slot.name}: width {width} is outside 1..{slot.full_width}")
            if width % slot.width_step:
                raise ValueError(f"{slot.name}: width {width} is not a multiple of {slot.width_step}: its grouped "
                                 f"convs keep whole groups of {slot.width_step} channels")
        stages = {stage.name: stage for stage in self.stages}
        if set(shape.depths) != set(stages):
            raise ValueError(f"shape depths name the stages {sorted(shape.depths)}, the space has "
                             f"{sorted(stages)}")
        for name, depth in shape.depths.items():
            if not 1 <= depth <= stages[name].num_blocks:
                raise ValueError(f"{name}: {depth} blocks kept is outside 1..{stages[name].num_blocks}")

    def width(self, shape, slot_name):
        slot = self.slot(slot_name)
        if slot.members:
            return sum(self.width(shape, member) for member in slot.members)
        return shape.widths[slot_name] if slot.searchable else slot.full_width

    def varies(self, slot_name):
        """Whether a shape may keep fewer than all of the slot's channels."""
        slot = self.slot(slot_name)
        return slot.searchable or any(self.varies(member) for member in slot.members)

    def kept_channels(self, shape, slot_name):
        """The indices of the slot's channels that the derived network of `shape` keeps, in order."""
        slot = self.slot(slot_name)
        if not slot.members:
            return np.arange(self.width(shape, slot_name))
        kept, offset = [], 0
        for member in slot.members:
            kept.append(offset + self.kept_channels(shape, member))
            offset += self.slot(member).full_width
        return np.concatenate(kept)

    def plan(self, shape):
        """The layers the derived network of `shape` builds, in order, with their channel counts."""
        self.validate(shape)
        dropped, handed_on = set(), {}
        for stage in self.stages:
            for block in stage.blocks[len(stage.kept_blocks(shape.depths[stage.name])):]:
                dropped.update(block.layers)
                handed_on[block.exit] = block.entry

        def kept(name):
            while name in handed_on:
                name = handed_on[name]
            return name

        shortcuts = {s.add: s for s in self.shortcuts}
        channels, planned = {}, []
        for layer in self.layers:
            if layer.name in dropped:
                continue
            inputs = tuple(kept(name) for name in layer.inputs)
            widths = [channels[name] for name in inputs]
            if layer.name in shortcuts and len(set(widths)) > 1:
                shortcut = shortcuts[layer.name]
                x, r = inputs.index(kept(shortcut.shortcut)), inputs.index(kept(shortcut.residual))
                projection = self.projection(shortcut, inputs[x], widths[x], widths[r])
                planned.extend(projection)
                channels.update({p.layer.name: p.out_channels for p in projection})
                inputs = inputs[:x] + (projection[-1].layer.name,) + inputs[x + 1:]
                out = widths[r]
            else:
                rule = rule_for(layer)
                if rule.ties_inputs and len(set(widths)) > 1:
                    raise AssertionError(f"{layer.name}: tied inputs of widths {widths}")
                out = rule.out_channels(layer, widths, self.width(shape, layer.out_slot))
            planned.append(DerivedLayer(dataclasses.replace(layer, inputs=inputs), layer.name,
                                        widths[0] if widths else out, out))
            channels[layer.name] = out
        return DerivedPlan(tuple(planned), kept(self.output))

    def projection(self, shortcut, source, in_channels, out_channels):
        """The layers a derived network adds to an identity shortcut whose x (the output of layer
        `source`) and r differ in width: a 1x1 conv from `in_channels` to `out_channels` with the
        settings of the conv that opens r's slot, then a BN like r's, when r has one."""
        add = self.layer(shortcut.add)
        conv = dataclasses.replace(
            self.layer(shortcut.conv), name=shortcut.conv_name, inputs=(source,),
            in_slots=(self.layer(shortcut.shortcut).out_slot,), kernel=(1, 1), strides=(1, 1),
            output_size=add.output_size, block=add.block)
        layers = [DerivedLayer(conv, shortcut.conv, in_channels, out_channels)]
        if shortcut.batch_norm:
            bn = dataclasses.replace(self.layer(shortcut.batch_norm), name=shortcut.batch_norm_name,
                                     inputs=(conv.name,), output_size=add.output_size, block=add.block)
            layers.append(DerivedLayer(bn, shortcut.batch_norm, out_channels, out_channels))
        return layers

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config):
        config = dict(config)
        config["layers"] = tuple(GraphLayer(**_tuples(layer)) for layer in config["layers"])
        config["slots"] = tuple(WidthSlot(**_tuples(slot)) for slot in config["slots"])
        config["stages"] = tuple(
            Stage(**{**_tuples(stage), "blocks": tuple(ResidualBlock(**_tuples(b)) for b in stage["blocks"])})
            for stage in config["stages"])
        config["shortcuts"] = tuple(IdentityShortcut(**s) for s in config["shortcuts"])
        config["input_shape"] = tuple(config["input_shape"])
        return cls(**config)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))


def _tuples(record):
    return {key: tuple(value) if isinstance(value, list) else value for key, value in record.items()}
