"""Latency as a search cost: a table of measured LiteRT layer times, and the latency of a network in it.

A latency table (made on the target device by `python -m export.latency_table`, measured by
`tas_keras.export.layer_latency`) holds, for every distinct layer geometry of a search space (what a layer's
time depends on besides its widths: kind, kernel, stride, input size, the pooling, BN, ReLU and
residual Add the converter fuses with it) and every (input width, output width) pair of candidates,
the median batch-1 time of that layer alone, minus the interpreter's per-invoke overhead; plus the
fixed cost of the rest of a network (image in, logits out, the invoke overhead once).

The latency of a network is the fixed cost plus the times of its layers. In a search space whose
layers read and write width slots with categorical distributions, the expected latency is exact
(`expected_latency`): per layer, sum over candidate pairs (a, b) of p_in(a) * p_out(b) * t(a, b),
weighted by the probability that the layer exists (its stage keeps its block). The functions over
(layer terms, slot distributions, keep probabilities) know nothing of the CIFAR ResNet; `SupernetLatency`
lays the graph supernet of a CIFAR ResNet out as such terms (the tables hold the layer geometries of
the CIFAR ResNets only: what the converter fuses in them, docs/design.md section 3).
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

from tas_keras.cifar_shapes import arch_from_shape
from tas_keras.graph_space import INDEPENDENT
from tas_keras.models.cifar_resnet import network_plan
from tas_keras.search_space import ArchConfig, candidate_widths, read_json_file

TABLE_FORMAT = "tas_keras.latency_table/1"  # the name the format was first written under
QUANTIZATIONS = ("none", "int8")
IMAGE_SLOT = "image"
CONV, HEAD = "conv", "head"


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
    """What a layer's latency depends on besides its input and output widths.

    kind "conv": [2x2 average pooling if `pool_first`] -> Conv2D(kernel, stride, "same") [-> BN,
    folded into the conv by the converter] [-> ReLU, fused] [-> Add of a residual of the output's
    shape, then ReLU (`residual_add`)]. kind "head": global average pooling -> Dense.
    `input_size` is the (height, width) of the tensor the layer reads (before the pooling).
    """

    kind: str
    input_size: tuple
    kernel: int = 0
    stride: int = 1
    pool_first: bool = False
    batch_norm: bool = False
    relu: bool = False
    residual_add: bool = False

    def __post_init__(self):
        object.__setattr__(self, "input_size", tuple(int(d) for d in self.input_size))
        if self.kind not in (CONV, HEAD):
            raise ValueError(f"layer kind must be {CONV!r} or {HEAD!r}, got {self.kind!r}")

    @property
    def output_size(self):
        size = self.input_size
        if self.kind == HEAD:
            return ()
        if self.pool_first:
            size = tuple(math.ceil(d / 2) for d in size)
        return tuple(math.ceil(d / self.stride) for d in size)

    @property
    def key(self):
        size = "x".join(map(str, self.input_size))
        if self.kind == HEAD:
            return f"head/{size}"
        flags = [name for name, on in (("pool", self.pool_first), ("bn", self.batch_norm), ("relu", self.relu),
                                       ("add_relu", self.residual_add)) if on]
        return "/".join([f"conv{self.kernel}x{self.kernel}", f"s{self.stride}", size, *flags])

    def to_dict(self):
        return {**dataclasses.asdict(self), "input_size": list(self.input_size)}


def pair_key(in_width, out_width):
    return f"{int(in_width)}->{int(out_width)}"


class LatencyTable:
    """A measured latency table (the JSON written by `tas_keras.export.layer_latency.make_table`)."""

    def __init__(self, content, path=None):
        self.content, self.path = content, path
        if content.get("format") != TABLE_FORMAT:
            raise ValueError(f"{self._name}: not a latency table (format {content.get('format')!r}, expected "
                             f"{TABLE_FORMAT!r})")
        if not content.get("complete"):
            raise ValueError(f"{self._name} is unfinished: run `python -m export.latency_table` with "
                             "the same flags again to complete it")

    @property
    def _name(self):
        return f"latency table {self.path!r}" if self.path else "latency table"

    @classmethod
    def load(cls, path):
        return cls(read_json_file(path, "latency table"), path)

    @property
    def quantize(self):
        return self.content["quantize"]

    @property
    def threads(self):
        return self.content["threads"]

    @property
    def fixed_ms(self):
        return self.content["fixed"]["ms"]

    def describe(self):
        """One line: what the table was made for and where."""
        space = self.content["space"]
        return (f"{','.join(space['models'])} at {'x'.join(map(str, space['input_shape']))}, "
                f"{space['num_classes']} classes, width multiple {space['width_multiple']}; "
                f"quantize={self.quantize}, {self.threads} thread(s), {self.content['environment']['machine']}")

    def time(self, geometry, in_width, out_width):
        """The time (ms) of one layer; a ValueError names what is missing."""
        entry = self.content["entries"].get(geometry.key)
        times = entry and entry["times"].get(pair_key(in_width, out_width))
        if times is None:
            raise ValueError(f"{self._name} has no time for {geometry.key} with {in_width} -> {out_width} "
                             f"channels; it was made for {self.describe()}")
        return times["ms"]

    def grid(self, geometry, in_widths, out_widths, skip_equal=False):
        """[len(in_widths), len(out_widths)] times; `skip_equal`: 0 where the widths are equal (a
        projection shortcut exists only where a block's input and output widths differ)."""
        return np.array([[0.0 if skip_equal and a == b else self.time(geometry, a, b) for b in out_widths]
                         for a in in_widths], np.float32)

    def check_covers(self, model_name, num_classes=10, input_shape=(32, 32, 3), width_multiple=1):
        """Refuses (ValueError, one line) a table that lacks an entry the search space needs."""
        full = ArchConfig.full(model_name, num_classes=num_classes, input_shape=input_shape)
        for geometry, pairs in required_entries(full, width_multiple).items():
            for a, b in sorted(pairs):
                self.time(geometry, a, b)


@dataclasses.dataclass(frozen=True)
class LayerPosition:
    """A layer of a search space: its geometry and the width slots it reads and writes.

    `projection`: a 1x1 conv + BN that exists only where its input and output widths differ (the
    shortcut of an identity block whose widths the shape made unequal). `keep`: (stage, block), the
    layer exists only if its stage keeps that block (1-based); None: always.
    """

    name: str
    geometry: LayerGeometry
    input_slot: str
    output_slot: str
    keep: tuple = None
    projection: bool = False


def _conv_geometry(conv, relu=False, residual_add=False, input_size=None):
    return LayerGeometry(CONV, input_size or conv.input_size, conv.kernel, conv.stride, conv.pool_first,
                         conv.batch_norm, relu, residual_add)


def _walk(plan, possible_projections):
    """(position, in_channels, out_channels) of every layer `plan` builds, the head included.

    `possible_projections`: also yield, for every identity block, the projection shortcut a shape
    with unequal widths would build (flagged `projection`): with the full network's plan, the layout
    of the whole search space.
    """
    yield (LayerPosition("stem_conv", _conv_geometry(plan.stem, relu=True), IMAGE_SLOT, "stem_conv"),
           plan.stem.in_channels, plan.stem.out_channels)
    block_input, stage = "stem_conv", 1
    for block in plan.blocks:
        block_stage, index = (int(part[1:]) for part in block.name.split("_"))
        if block_stage != stage:  # the next stage reads the output of the last kept block
            block_input, stage = f"s{stage}_output", block_stage
        slot, keep = block_input, (block_stage, index)
        for position, conv in enumerate(block.convs):
            last = position == len(block.convs) - 1
            yield (LayerPosition(conv.name, _conv_geometry(conv, relu=not last, residual_add=last), slot,
                                 conv.name, keep), conv.in_channels, conv.out_channels)
            slot = conv.name
        shortcut = block.shortcut
        if shortcut is None and possible_projections:
            shortcut = dataclasses.replace(block.convs[-1], name=f"{block.name}_shortcut_conv", kernel=1, stride=1,
                                           in_channels=block.convs[0].in_channels, pool_first=False,
                                           batch_norm=True, input_size=block.convs[-1].output_size)
        if shortcut is not None:
            projection = not shortcut.pool_first
            geometry = _conv_geometry(shortcut, input_size=None if projection else block.convs[0].input_size)
            yield (LayerPosition(shortcut.name, geometry, block_input, slot, keep, projection),
                   shortcut.in_channels, shortcut.out_channels)
        block_input = slot
    yield (LayerPosition("head_fc", LayerGeometry(HEAD, plan.blocks[-1].convs[-1].output_size),
                         f"s{stage}_output", "classes"), plan.head_in_channels, plan.arch.num_classes)


def search_space_layout(full):
    """The layers of the search space around the full network `full` (an ArchConfig), as
    (LayerPosition, full input width, full output width)."""
    return list(_walk(network_plan(full), possible_projections=True))


def built_layers(arch):
    """(geometry, input width, output width) of every layer the plain network of `arch` builds."""
    return [(position.geometry, a, b) for position, a, b in _walk(network_plan(arch), possible_projections=False)]


def required_entries(full, width_multiple=1):
    """{geometry: {(input width, output width)}}: every entry a latency search of `full` needs."""
    needed = {}
    for position, in_full, out_full in search_space_layout(full):
        ins = (in_full,) if position.input_slot == IMAGE_SLOT else candidate_widths(in_full, width_multiple)
        outs = (out_full,) if position.geometry.kind == HEAD else candidate_widths(out_full, width_multiple)
        needed.setdefault(position.geometry, set()).update(
            (a, b) for a in ins for b in outs if not (position.projection and a == b))
    return needed


def predict_latency(arch, table):
    """The table's latency (ms) of the plain network of `arch`: the fixed cost plus its layers."""
    return table.fixed_ms + sum(table.time(geometry, a, b) for geometry, a, b in built_layers(arch))


@dataclasses.dataclass(frozen=True)
class LatencyTerm:
    """One layer of a search space in the expectation: its time is grid[i, j] for the i-th candidate of
    its input slot and the j-th of its output slot; it exists with probability keep_probs[keep]
    (always when `keep` is None)."""

    name: str
    grid: np.ndarray
    input_slot: str
    output_slot: str
    keep: tuple = None


def expected_latency(terms, slot_probs, keep_probs, fixed_ms):
    """sum over terms of P(term exists) * sum_{a, b} p_in(a) * p_out(b) * t(a, b), plus the fixed cost.

    `slot_probs`: {slot: probabilities over its candidates}; `keep_probs`: {keep key: probability}.
    The exact expectation of the latency when the slots' widths are independent of each other and of
    whether the layer exists; differentiable in the probabilities (a tf scalar).
    """
    total = tf.constant(fixed_ms, tf.float32)
    for term in terms:
        time = tf.tensordot(tf.cast(slot_probs[term.input_slot], tf.float32),
                            tf.linalg.matvec(term.grid, tf.cast(slot_probs[term.output_slot], tf.float32)), 1)
        total += time if term.keep is None else tf.cast(keep_probs[term.keep], tf.float32) * time
    return total


class SupernetLatency:
    """E(A) and F(A) in latency (ms) of the architecture of a CIFAR ResNet's GraphSupernet, from a table.

    The terms are the layers of the CIFAR search space (`search_space_layout`); their slots are the
    graph space's: "image" (fixed), the output of every searchable conv (named after the conv; a
    shortcut writes its block's slot), and "s<k>_output", the output of stage k: the output of its last
    kept block, so its distribution is sum_d P(depth d) * p(output of block d). Both costs are
    `expected_latency` of the same terms: E(A) under softmax(alpha) and softmax(beta), F(A) under their
    one-hot argmax, which is the table's latency of the plain network the argmax shape builds.
    """

    def __init__(self, supernet, table):
        space = supernet.space
        try:
            self.full = space.add_mode == INDEPENDENT and arch_from_shape(space, space.full_shape())
        except ValueError:  # not a CIFAR ResNet's space
            self.full = None
        if not self.full:
            raise ValueError(f"the latency cost covers the CIFAR ResNets read with independent Adds (the layer "
                             f"geometries latency tables hold), not {space.name} read with {space.add_mode} Adds")
        self.supernet, self.table = supernet, table
        table.check_covers(self.full.name, self.full.num_classes, self.full.input_shape, space.multiple_of)
        candidates = {IMAGE_SLOT: (self.full.input_shape[-1],), "classes": (self.full.num_classes,),
                      **{slot.name: slot.candidates for slot in space.searchable_slots}}
        mixers = {stage.first_block: mixer for stage, mixer in supernet.stages}
        # Per CIFAR stage: the slot of its output after 1, 2, ... blocks, and its depth distribution
        # (None: the stage has a single block).
        self.stage_outputs = []
        for stage in range(1, len(self.full.stage_blocks) + 1):
            blocks = [block for block in network_plan(self.full).blocks if block.name.startswith(f"s{stage}_")]
            self.stage_outputs.append(([block.convs[-1].name for block in blocks], mixers.get(f"s{stage}_b1")))
            candidates[f"s{stage}_output"] = candidates[blocks[-1].convs[-1].name]
        self.terms = [LatencyTerm(position.name, tf.constant(table.grid(
            position.geometry, candidates[position.input_slot], candidates[position.output_slot],
            skip_equal=position.projection)), position.input_slot, position.output_slot, position.keep)
            for position, _, _ in search_space_layout(self.full)]
        self.full_ms = predict_latency(self.full, table)

    def _latency(self, width_probs, depth_probs):
        """`width_probs`: {slot: probabilities}; `depth_probs`: {mixer name: probabilities}."""
        slot_probs = {IMAGE_SLOT: tf.ones([1]), "classes": tf.ones([1]), **width_probs}
        keep_probs = {}
        for stage, (output_slots, mixer) in enumerate(self.stage_outputs, start=1):
            if mixer is None:
                choices, probs = (len(output_slots),), tf.ones([1])
            else:
                choices, probs = mixer.depth_choices, depth_probs[mixer.name]
            for index in range(1, len(output_slots) + 1):
                keep_probs[(stage, index)] = tf.reduce_sum(
                    tf.stack([p for p, depth in zip(tf.unstack(probs), choices) if depth >= index]))
            slot_probs[f"s{stage}_output"] = tf.add_n(
                [p * width_probs[output_slots[depth - 1]] for p, depth in zip(tf.unstack(probs), choices)])
        return expected_latency(self.terms, slot_probs, keep_probs, self.table.fixed_ms)

    def _slots_and_choices(self):
        return zip(self.supernet.space.searchable_slots, self.supernet.width_choices)

    def expected(self):
        """E(A): the expected latency under softmax(alpha) and softmax(beta)."""
        widths = {slot.name: tf.nn.softmax(choice.alpha) if choice.alpha is not None else tf.ones([1])
                  for slot, choice in self._slots_and_choices()}
        return self._latency(widths, {mixer.name: tf.nn.softmax(mixer.beta) for _, mixer in self.supernet.stages})

    def argmax(self):
        """F(A): the latency of the plain network of the argmax shape."""
        widths = {slot.name: tf.one_hot(choice.argmax_index(), len(choice.candidates))
                  for slot, choice in self._slots_and_choices()}
        return self._latency(widths, {mixer.name: tf.one_hot(tf.argmax(mixer.beta), len(mixer.depth_choices))
                                      for _, mixer in self.supernet.stages})

    def shape_ms(self, shape):
        """The table's latency of the plain network of a GraphShape of the supernet's space."""
        return predict_latency(arch_from_shape(self.supernet.space, shape), self.table)
