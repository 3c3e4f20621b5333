"""Latency as a search cost: a table of measured LiteRT times of a search space's layers, and the latency of
a network in it (docs/design.md "Latency").

The timed units of a `GraphSpace` (`LatencyLayout`) are its layers as the TFLite converter leaves them:
every layer that is an op of its own (a conv, depthwise conv, Dense, Add, Multiply, pooling, padding, an
unfused activation, Concatenate, ...) with the layers the converter folds into it (a BN into the kernel
and bias, then a ReLU or ReLU6 as the op's fused activation: `tas_keras.layer_rules`), plus, in an
independent-Add space, the 1x1 conv + BN a derived network adds to an identity shortcut whose widths
differ. A unit's time depends on its input and output widths and on its geometry: the classes and
settings of its layers (names and widths left out) and the sizes of its inputs, so equal layers of one
model or of several share one table entry (`TimedUnit.key`).

A latency table (made on the target device by `python -m export.latency_table`, measured by
`tas_keras.export.layer_latency`) holds per geometry the median batch-1 time of the unit alone, minus the
interpreter's per-invoke overhead, at (input width, output width) pairs: every pair the search space needs,
or a grid of them between which `LatencyTable.time` interpolates bilinearly; plus the fixed cost of the
exported form (uint8 pixels in, the normalisation inside, logits out, one invoke).

The latency of a derived network is the fixed cost plus the times of its units (`predict_latency`). In
a supernet whose slots have categorical width distributions, the expected latency is exact
(`SupernetLatency`): per unit, sum over candidate pairs (a, b) of p_in(a) * p_out(b) * t(a, b) (sum_a p(a)
t(a, a) when the unit reads and writes one slot, as a depthwise conv does), weighted by the probability that
its block is kept.
"""

import collections
import dataclasses
import hashlib
import json

import keras
import numpy as np
import tensorflow as tf

from tas_keras.graph import load_model, operation
from tas_keras.graph_space import DerivedLayer
from tas_keras.layer_rules import rule_for
from tas_keras.search_space import read_json_file

TABLE_FORMAT = "tas_keras.latency_table/2"
QUANTIZATIONS = ("none", "int8")
# Config entries a unit's time does not depend on (its widths are the table's axes).
_UNTIMED_CONFIG = ("name", "dtype", "trainable", "filters", "units")


def pair_key(in_width, out_width):
    return f"{int(in_width)}->{int(out_width)}"


def _timed_config(keras_layer):
    return {key: value for key, value in keras_layer.get_config().items()
            if key not in _UNTIMED_CONFIG and not key.endswith(("_initializer", "_regularizer", "_constraint"))}


@dataclasses.dataclass(frozen=True)
class TimedUnit:
    """One op of the converted network and the layers folded into it.

    `layers`: the GraphLayers (the op's first), built as the layers `sources` of the source model; `name`:
    the first's name in a derived network. Its time is the table's at (its input width, its output width),
    which follow the width sources (`LatencyLayout.width_sources`) `input_source` and `output_source`. It
    exists when its `block` (if any) is kept and, for a `projection`, when the widths differ.
    """

    name: str
    key: str
    geometry: dict = dataclasses.field(compare=False, hash=False)
    layers: tuple = ()
    sources: tuple = ()
    input_source: tuple = ()
    output_source: tuple = ()
    block: str = ""
    projection: bool = False

    @property
    def one_width(self):
        """Its input and output widths are one (a depthwise conv, a BN, an Add): only equal widths occur."""
        return self.input_source == self.output_source


SLOT, STAGE = "slot", "stage"


class LatencyLayout:
    """The timed units of `space`, read from `model` (the network it was read from: the converter's
    foldings and the units' settings come from its layers).

    `width_sources`: per layer, the width its readers see in a derived network: (SLOT, s), the width of
    slot s, or (STAGE, name), for a stage's exit and the layers that follow its width (when its blocks'
    exits have different slots, as with independent Adds): the width of the exit of the last block kept.
    `stage_exits`: a stage's name -> (Stage, the layers whose outputs leave it after 1, 2, ... blocks);
    `exit_stages`: the last of those layers -> the stage's name.
    """

    def __init__(self, space, model):
        concatenated = [slot.name for slot in space.slots if slot.members and space.varies(slot.name)]
        if concatenated:  # their readers' widths are sums of several slots' widths, which the units do not model
            raise ValueError(f"the latency cost does not cover a Concatenate of searched widths ({concatenated[0]} "
                             f"in {space.name}); search its FLOPs instead")
        self.space, self.model = space, load_model(model)
        self.input_shape = tuple(space.input_shape)
        self.num_classes = space.slot(space.layer(space.output).out_slot).full_width
        self.stage_exits, self.exit_stages = {}, {}
        for stage in space.stages:
            outputs = ([stage.blocks[0].entry] if stage.opener else []) + [block.exit for block in stage.blocks]
            if len({space.layer(name).out_slot for name in outputs}) > 1:
                self.stage_exits[stage.name], self.exit_stages[outputs[-1]] = (stage, outputs), stage.name
        self.width_sources = {}
        for layer in space.layers:
            first = layer.inputs[0] if layer.inputs else None
            if layer.name in self.exit_stages:
                self.width_sources[layer.name] = (STAGE, self.exit_stages[layer.name])
            elif first and not rule_for(layer).opens_slot and layer.out_slot == space.layer(first).out_slot:
                self.width_sources[layer.name] = self.width_sources[first]
            else:
                self.width_sources[layer.name] = (SLOT, layer.out_slot)
        full = {planned.layer.name: planned for planned in space.plan(space.full_shape()).layers}
        readers = collections.Counter(name for layer in space.layers for name in layer.inputs)
        groups, open_tails = [], {}  # layer name -> (group index, the foldings it still takes)
        for layer in space.layers:
            keras_layer = operation(self.model, layer.name)
            rule = rule_for(layer)
            source = layer.inputs[0] if len(layer.inputs) == 1 else None
            tail = open_tails.get(source) if readers[source] == 1 else None
            if not rule.exported(keras_layer):
                if tail:  # it vanishes: what follows it may still fold into the op before it
                    open_tails[layer.name] = tail
                continue
            folding = rule.folds_as(keras_layer)
            if tail and folding in tail[1] and groups[tail[0]][0][0].block == layer.block:
                index, takes = tail
                groups[index].append((layer, full[layer.name]))
                open_tails[layer.name] = (index, takes[takes.index(folding) + 1:])
                continue
            groups.append([(layer, full[layer.name])])
            open_tails[layer.name] = (len(groups) - 1, rule.takes_folded(keras_layer))
        self.units = [self._unit(group) for group in groups]
        for shortcut in space.shortcuts:
            in_full = space.slot(space.layer(shortcut.shortcut).out_slot).full_width
            projection = space.projection(shortcut, shortcut.shortcut, in_full, full[shortcut.add].out_channels)
            self.units.append(self._unit([(planned.layer, planned) for planned in projection],
                                         self._own_source(shortcut.add)))
        self.by_name = {unit.name: unit for unit in self.units}

    def _own_source(self, name):
        """The width of a layer's own output: a stage's exit is as wide as its own slot (its readers see the
        exit of the last block kept)."""
        return (SLOT, self.space.layer(name).out_slot) if name in self.exit_stages else self.width_sources[name]

    def _unit(self, group, output_source=None):
        """The TimedUnit of `group`: [(GraphLayer, its DerivedLayer in the full network)], the op first."""
        first, planned = group[0]
        rule = rule_for(first)
        widths_follow = not rule.opens_slot  # every input is as wide as the first (tied, or projected)
        inputs = []
        for position, name in enumerate(first.inputs):
            source = self.space.layer(name)
            width = None if position == 0 or widths_follow else self.space.slot(source.out_slot).full_width
            inputs.append([*source.output_size, width])
        layers = [{"class_name": type(keras_layer).__name__, "config": _timed_config(keras_layer)}
                  for keras_layer in (rule_for(layer).rebuilt(operation(self.model, derived.source), derived, None)
                                      for layer, derived in group)]
        geometry = {"layers": layers, "inputs": inputs}
        digest = hashlib.sha1(json.dumps(geometry, sort_keys=True, default=str).encode()).hexdigest()[:10]
        size = "x".join(map(str, first.inputs and self.space.layer(first.inputs[0]).output_size)) or "vector"
        output_source = output_source or self._own_source(group[-1][0].name)
        # An op that merges tensors of its own width (an Add after a projection) reads its output's width.
        input_source = output_source if widths_follow and len(first.inputs) > 1 else self.width_sources[
            first.inputs[0]]
        return TimedUnit(first.name, f"{'+'.join(layer['class_name'] for layer in layers)}/{size}/{digest}",
                         geometry, tuple(layer for layer, _ in group), tuple(derived.source for _, derived in group),
                         input_source, output_source, first.block, projection=first.name != planned.source)

    def candidates(self, source):
        """The widths a width source may take (a stage's: those of all its exits)."""
        kind, name = source
        if kind == SLOT:
            return self.space.slot(name).candidates
        _, outputs = self.stage_exits[name]
        slots = {self.space.layer(output).out_slot for output in outputs}
        return tuple(sorted({width for slot in slots for width in self.space.slot(slot).candidates}))

    def planned_units(self, shape):
        """(unit, input width, output width) of every unit the network derived from `shape` builds."""
        channels = {}
        for planned in self.space.plan(shape).layers:
            channels[planned.layer.name] = planned.out_channels
            unit = self.by_name.get(planned.layer.name)
            if unit is not None:  # inputs rewired to a projection: the width the op reads
                yield unit, channels[planned.layer.inputs[0]], planned.out_channels

    def required_entries(self):
        """{key: (geometry, {(input width, output width)})}: every entry a latency search of the space needs:
        its candidate widths, and the full network's (the base of the latency ratios), whose widths need not
        be candidates (with a width multiple they are rounded)."""
        needed = {}
        for unit, a, b in self.planned_units(self.space.full_shape()):
            needed.setdefault(unit.key, (unit.geometry, set()))[1].add((a, b))
        for unit in self.units:
            outs = self.candidates(unit.output_source)
            if unit.one_width:
                pairs = {(w, w) for w in outs}
            else:
                pairs = {(a, b) for a in self.candidates(unit.input_source) for b in outs
                         if not (unit.projection and a == b)}
            needed.setdefault(unit.key, (unit.geometry, set()))[1].update(pairs)
        return needed

    def unit_model(self, key, in_width, out_width):
        """The unit of geometry `key` alone as a Keras model at the given widths (random weights: a unit's
        time does not depend on them); its inputs are named so that they sort in the model's order (the
        converter calibrates them in that order)."""
        unit = next(unit for unit in self.units if unit.key == key)
        inputs = [keras.Input((*size, in_width if width is None else width), name=f"input_{index}")
                  for index, (*size, width) in enumerate(unit.geometry["inputs"])]
        tensors = inputs
        for position, (layer, source) in enumerate(zip(unit.layers, unit.sources)):
            rule = rule_for(layer)
            planned = DerivedLayer(layer, source, in_width if position == 0 else out_width, out_width)
            keras_layer = rule.rebuilt(operation(self.model, source), planned, None)
            tensors = [rule.call(keras_layer, tensors, layer, **layer.call_arguments)]
        return keras.Model(inputs, tensors[0])


class LatencyTable:
    """A measured latency table (the JSON written by `tas_keras.export.layer_latency.make_table`)."""

    def __init__(self, content, path=None):
        self.content, self.path = content, path
        made_with = content.get("format", "")
        if made_with != TABLE_FORMAT:
            old = made_with.startswith(TABLE_FORMAT.rsplit("/", 1)[0])
            raise ValueError(f"{self._name} is in format {made_with!r}, not {TABLE_FORMAT!r}: "
                             + ("remake it with `python -m export.latency_table`" if old else "not a latency table"))
        if not content.get("complete"):
            raise ValueError(f"{self._name} is unfinished: run `python -m export.latency_table` with "
                             "the same flags again to complete it")
        # {key: {(input width, output width): ms}} of the measured pairs
        self._measured = {key: {tuple(int(w) for w in pair.split("->")): times["ms"]
                                for pair, times in entry["times"].items()}
                          for key, entry in content["entries"].items()}

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


    def time(self, key, in_width, out_width):
        """The time (ms) of a unit: measured, or interpolated between the four measured pairs around it
        (linearly along the diagonal for a unit that reads and writes one slot); a ValueError names
        what is missing."""
        measured = self._measured.get(key, {})
        a, b = int(in_width), int(out_width)
        if (a, b) in measured:
            return measured[a, b]
        if measured and all(x == y for x, y in measured):
            widths = sorted(x for x, _ in measured)
            if a == b and widths[0] <= a <= widths[-1]:
                return float(np.interp(a, widths, [measured[w, w] for w in widths]))
        else:
            value = _bilinear(measured, a, b)
            if value is not None:
                return value
        raise ValueError(f"{self._name} has no time for {key} with {a} -> {b} channels; it was made for "
                         f"{self.describe()}")

    def check_covers(self, layout):
        """Refuses (ValueError, one line) a table made for another input or classes, or that lacks an entry
        the search space of `layout` needs."""
        space = self.content["space"]
        made, wanted = (tuple(space["input_shape"]), space["num_classes"]), (layout.input_shape, layout.num_classes)
        if made != wanted:
            raise ValueError(f"{self._name} was made for {'x'.join(map(str, made[0]))} images and {made[1]} classes, "
                             f"the search takes {'x'.join(map(str, wanted[0]))} images and {wanted[1]} classes")
        for key, (_, pairs) in sorted(layout.required_entries().items()):
            for a, b in sorted(pairs):
                self.time(key, a, b)


def _bilinear(measured, a, b):
    """Bilinear interpolation of {(a, b): ms} at (a, b) from the measured grid around it; None outside it."""
    ins, outs = sorted({x for x, _ in measured}), sorted({y for _, y in measured})
    a0, a1 = max((x for x in ins if x <= a), default=None), min((x for x in ins if x >= a), default=None)
    b0, b1 = max((y for y in outs if y <= b), default=None), min((y for y in outs if y >= b), default=None)
    corners = [(x, y) for x in (a0, a1) for y in (b0, b1)]
    if None in (a0, a1, b0, b1) or any(corner not in measured for corner in corners):
        return None
    u = (a - a0) / (a1 - a0) if a1 > a0 else 0.0
    v = (b - b0) / (b1 - b0) if b1 > b0 else 0.0
    return float((1 - u) * (1 - v) * measured[a0, b0] + (1 - u) * v * measured[a0, b1]
                 + u * (1 - v) * measured[a1, b0] + u * v * measured[a1, b1])


def predict_latency(layout, shape, table):
    """The table's latency (ms) of the network derived from `shape`: the fixed cost plus its units."""
    return table.fixed_ms + sum(table.time(unit.key, a, b) for unit, a, b in layout.planned_units(shape))


class SupernetLatency:
    """E(A) and F(A) in latency (ms) of a GraphSupernet's architecture, from a table that covers its space.

    Both are one sum over the layout's units: E(A) under softmax(alpha) and softmax(beta), F(A) under their
    one-hot argmax, where the sum is the table latency of the network the argmax shape derives
    (`predict_latency`). A width that follows a stage's exit is that of the last block kept: distributed
    as sum_d P(depth d) * p(width of the exit after d blocks). A projection counts only at unequal widths.
    The widths of different slots, and the depths, are independent, so the sum is the exact expectation.
    """

    def __init__(self, supernet, layout, table):
        table.check_covers(layout)
        self.supernet, self.layout, self.table = supernet, layout, table
        self.terms = []
        for unit in layout.units:
            outs = layout.candidates(unit.output_source)
            if unit.one_width:
                times = [table.time(unit.key, w, w) for w in outs]
            else:
                times = [[0.0 if unit.projection and a == b else table.time(unit.key, a, b) for b in outs]
                         for a in layout.candidates(unit.input_source)]
            self.terms.append((unit, tf.constant(times, tf.float32)))
        self.full_ms = predict_latency(layout, layout.space.full_shape(), table)

    def _width_probs(self, source, slot_probs, depth_probs):
        """The probabilities of a width source over its candidates (`LatencyLayout.candidates`)."""
        kind, name = source
        if kind == SLOT:
            return slot_probs[name]
        stage, outputs = self.layout.stage_exits[name]
        union = self.layout.candidates(source)
        mixture = 0.0
        for probability, depth in zip(tf.unstack(depth_probs[stage.name]), stage.choices):
            slot = self.layout.space.slot(self.layout.space.layer(outputs[depth - 1]).out_slot)
            into_union = np.eye(len(union), dtype=np.float32)[[union.index(w) for w in slot.candidates]]
            mixture += probability * tf.linalg.matvec(into_union, slot_probs[slot.name], transpose_a=True)
        return mixture

    def _latency(self, slot_probs, depth_probs):
        """`slot_probs`: {searchable slot: probabilities over its candidates}; `depth_probs`: {stage: over its
        depth choices}."""
        space = self.layout.space
        slot_probs = {**{slot.name: tf.ones([1]) for slot in space.slots}, **slot_probs}
        keep = {}
        for stage in space.stages:
            for index, block in enumerate(stage.blocks, start=int(bool(stage.opener))):
                keep[block.name] = tf.reduce_sum(tf.stack([p for p, depth in zip(
                    tf.unstack(depth_probs[stage.name]), stage.choices) if depth > index]))
        total = tf.constant(self.table.fixed_ms, tf.float32)
        for unit, times in self.terms:
            out_probs = self._width_probs(unit.output_source, slot_probs, depth_probs)
            if unit.one_width:
                time = tf.tensordot(out_probs, times, 1)
            else:
                time = tf.tensordot(self._width_probs(unit.input_source, slot_probs, depth_probs),
                                    tf.linalg.matvec(times, out_probs), 1)
            total += keep[unit.block] * time if unit.block else time
        return total

    def _choices(self):
        return zip(self.layout.space.searchable_slots, self.supernet.width_choices)

    def expected(self):
        """E(A): the expected latency under softmax(alpha) and softmax(beta)."""
        widths = {slot.name: tf.nn.softmax(choice.alpha) if choice.alpha is not None else tf.ones([1])
                  for slot, choice in self._choices()}
        return self._latency(widths, {stage.name: tf.nn.softmax(mixer.beta) for stage, mixer in self.supernet.stages})

    def argmax(self):
        """F(A): the table latency of the network the argmax shape derives."""
        widths = {slot.name: tf.one_hot(choice.argmax_index(), len(choice.candidates))
                  for slot, choice in self._choices()}
        return self._latency(widths, {stage.name: tf.one_hot(tf.argmax(mixer.beta), len(mixer.depth_choices))
                                      for stage, mixer in self.supernet.stages})

    def shape_ms(self, shape):
        """The table's latency of the network derived from a GraphShape of the supernet's space."""
        return predict_latency(self.layout, shape, self.table)
