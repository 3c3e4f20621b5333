"""The TAS supernet of any model the graph reader supports (docs/design.md sections 5, 6 and 11).

`GraphSupernet(model, space)` lays the search out on the `GraphSpace` read from `model`
(`tas_keras.graph.read_model`); `tas_keras.search.TASSearchModel` drives it.

- Widths: one distribution (alpha, a `WidthChoice`) per searchable slot. Every Conv2D (or Dense on a
  feature map, a 1x1 conv) that writes a searchable slot follows that slot's sample (the convs of a
  tied slot share one) and is a `SearchableConv` of the same name: it runs at full width and mixes the
  two sampled widths by CWI to the wider one. When a BatchNormalization (with centre and scale) is the
  only reader of the conv's linear output, the BN becomes the conv's per-candidate affines, normalised
  with batch statistics.
  Other searchable convs are normalised the same way with `normalize_every_conv` (the reference's
  search forward normalises every conv, its CIFAR ResNets' stride-2 shortcut conv included, although
  no BN follows it); otherwise they mix their output (plus bias) as it is, so that the full-width,
  full-depth sample computes the source model.
- Every other layer is a copy of the source layer (class, settings, name) and runs at full width on
  the zero-padded tensors: a depthwise or grouped conv and the BN after it follow the width of the slot
  that feeds them (a grouped conv's groups beyond it read zeros), activations, pooling and padding pass
  it on, and the classifier reads the first channels of its kernel. Where a layer could make the
  channels beyond the width non-zero (a BN's beta, a bias, an activation with f(0) != 0, noise), a mask
  zeroes them again. A LayerNormalization, whose statistics are over the channels, takes them over the
  kept channels of the width only (`layers.MaskedLayerNormalization`), so that a one-hot sample computes
  the narrower network.
- Merges run at full width: tied inputs share one width; an independent Add is a zero-padded add,
  where the wider width wins.
- Depth: every block runs; a stage's output is sum_j q_j * CWI(output after d_j blocks) (`DepthMixer`).

The supernet is only ever trained: batch statistics and dropout are always on.

E(A) (`expected_cost`) and F(A) (`argmax_cost`) apply one per-layer rule (`layer_cost`, the rule of
`tas_keras.cost.count_shape`): E(A) to the expected widths (softmax(alpha), chained through the slots,
each droppable block weighted by the probability that its stage keeps it, docs/design.md section 6), F(A)
to the argmax shape as `GraphSpace.plan` builds it (dropped blocks left out, their readers handed the
last kept block, an independent shortcut projected where its widths differ), so F(A) equals
`count_shape(space, supernet.derive())`.
"""

import dataclasses
import inspect
import os

import keras
import tensorflow as tf

from tas_keras import cost
from tas_keras.graph import load_model, operation, read_model
from tas_keras.layer_rules import maps_zero_to_zero, rule_for
from tas_keras.layers import BN_EPSILON, DepthMixer, SearchableConv, WidthChoice, channel_mask
from tas_keras.models.registry import is_model_file, search_defaults

COST_METRICS = ("flops", "params")
WEIGHT_DECAY = 5e-4  # the reference's, on the weights of a search


def _check_metric(metric):
    if metric not in COST_METRICS:
        raise ValueError(f"metric must be one of {COST_METRICS}, got {metric!r}")


def layer_cost(layer, in_channels, out_channels, metric):
    """The cost of a GraphLayer at the given widths (numbers or tensors): FLOPs or parameters."""
    return getattr(cost.graph_layer_cost(layer, in_channels, out_channels), metric)


def search_space(model_name, model, add_mode=None, width_multiple=1):
    """The space a search of `model_name` (a registry name or a .keras path; `model` is that network)
    explores, named by it (its shapes name it). The CIFAR ResNets follow the reference: Adds independent;
    other models keep their own layers: Adds tied. `add_mode` overrides the Add rule. Candidate widths are
    multiples of `width_multiple`."""
    space = read_model(model, add_mode or search_defaults(model_name).add_mode, multiple_of=width_multiple)
    return dataclasses.replace(space, model=os.path.abspath(model_name) if is_model_file(model_name) else model_name)


def build_supernet(model_name, model, add_mode=None, width_multiple=1):
    """The supernet of `search_space(...)`; the CIFAR ResNets' normalise every searchable conv, as the
    reference's search forward does."""
    return GraphSupernet(model, search_space(model_name, model, add_mode, width_multiple),
                         normalize_every_conv=search_defaults(model_name).normalize_every_conv)


class GraphSupernet(keras.Model):
    """Args:
        model: the source model (a keras.Model or a .keras path) that `space` was read from.
        space: its GraphSpace (`tas_keras.graph.read_model(model, ...)`).
        normalize_every_conv: batch-normalise every searchable conv, also those no BN follows (the
            reference's rule for the CIFAR ResNets; see the module docstring).
        weight_decay: coupled L2 on every weight (not on the architecture parameters).
    """

    def __init__(self, model, space, normalize_every_conv=False, weight_decay=WEIGHT_DECAY, **kwargs):
        super().__init__(name=kwargs.pop("name", f"{space.name}_supernet"), **kwargs)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        model = load_model(model)
        self.space, self.normalize_every_conv, self.weight_decay = space, normalize_every_conv, weight_decay
        taken = {layer.name for layer in space.layers}

        def own_name(name):
            if name in taken:
                raise ValueError(f"the supernet names a layer {name!r}, which the model already uses")
            return name

        readers = {layer.name: [] for layer in space.layers}
        for layer in space.layers:
            for source in layer.inputs:
                readers[source].append(layer.name)
        # BN name -> the name of the searchable conv that takes its affine
        self.absorbed = {bn: layer.name for layer in space.layers
                         if (bn := self._absorbable_batch_norm(layer, readers[layer.name], model))}
        regularizer = keras.regularizers.L2(weight_decay / 2) if weight_decay else None
        self._activations, self._masked, self._call_arguments = {}, set(), {}
        # Weights draw their random seeds where their initializers are made, so the order below fixes
        # the initial supernet of a seed: the copies of the source layers first, then in graph order
        # each searchable conv's kernel, its slot's width distribution where the slot is first written,
        # and a stage's depth distribution after the stage's exit. (It is the order in which the
        # project's first, CIFAR-only supernet drew them: a seed's CIFAR search stays what it was.)
        made = {}
        for layer in space.layers:
            varies = space.varies(layer.out_slot)
            if rule_for(layer).is_image_input or layer.name in self.absorbed or self._runs_searchable(layer):
                continue
            source = operation(model, layer.name)
            # Fresh weights under the supernet's coupled weight decay, in the dtype policy the supernet is
            # built under rather than the source's.
            made[layer.name] = rule_for(layer).copy(source, keras.config.dtype_policy(), regularizer)
            arguments = dict(layer.call_arguments)
            if "training" in inspect.signature(source.call).parameters:
                arguments.setdefault("training", True)
            self._call_arguments[layer.name] = arguments
            if varies and rule_for(layer).masked(layer, made[layer.name]):
                self._masked.add(layer.name)

        stage_outputs = {}  # the exit a stage mixes -> (stage, the outputs after 1, 2, ... blocks)
        for stage in space.stages:
            outputs = ([stage.blocks[0].entry] if stage.opener else []) + [block.exit for block in stage.blocks]
            stage_outputs[outputs[-1]] = stage, outputs
        choices, self.stages, self._mixed_exits = {}, [], {}
        for layer in space.layers:
            slot = space.slot(layer.out_slot)
            if self._runs_searchable(layer):
                made[layer.name] = self._searchable_conv(layer, model)
                if slot.name not in choices:
                    choices[slot.name] = WidthChoice(slot.candidates, name=own_name(f"{slot.name}_width"))
                    choices[slot.name].build()
            if layer.name in stage_outputs:
                stage, outputs = stage_outputs[layer.name]
                mixer = DepthMixer(stage.choices, slot.candidates,
                                   equal_widths=len({space.layer(name).out_slot for name in outputs}) == 1,
                                   name=own_name(f"{stage.name}_depth"))
                mixer.build()
                self._mixed_exits[layer.name] = (len(self.stages), outputs)
                self.stages.append((stage, mixer))
        self.width_choices = [choices[slot.name] for slot in space.searchable_slots]
        self._choice_of_slot = {slot.name: choice.name
                                for slot, choice in zip(space.searchable_slots, self.width_choices)}
        self.graph_layers = {layer.name: made[layer.name] for layer in space.layers if layer.name in made}
        self._full_cost = {}
        self(tf.zeros((1, *space.input_shape)), self.uniform_sample())
        for name, layer in self.graph_layers.items():  # constants such as a Normalization's statistics
            if getattr(layer, "weights", None) and not layer.trainable_weights:
                layer.set_weights(model.get_layer(name).get_weights())

    def build(self, input_shape):
        """Nothing to do: the first call builds every layer. (Without a build method, Keras would first
        trace the whole call symbolically to find unbuilt state: 10 s for a ResNet-164 supernet.)"""
        del input_shape

    def _absorbable_batch_norm(self, layer, readers, model):
        """The name of the BN (with centre and scale) that is the only reader of a searchable conv's
        linear output, whose affine the conv takes as its per-candidate affines; else None."""
        if not self._runs_searchable(layer) or len(readers) != 1:
            return None
        source, reader = model.get_layer(layer.name), self.space.layer(readers[0])
        if source.get_config()["activation"] != "linear" or not rule_for(reader).batch_normalizes:
            return None
        batch_norm = model.get_layer(reader.name)
        return batch_norm.name if batch_norm.center and batch_norm.scale else None

    def _searchable_conv(self, layer, model):
        source = model.get_layer(layer.name)
        config = source.get_config()
        activation = config["activation"]
        batch_norm = next((model.get_layer(bn) for bn, conv in self.absorbed.items() if conv == layer.name), None)
        normalize = batch_norm is not None or self.normalize_every_conv
        if activation != "linear":
            self._activations[layer.name] = keras.activations.get(activation)
            if not maps_zero_to_zero(self._activations[layer.name]):
                self._masked.add(layer.name)
        return rule_for(layer).searchable(source, self.space.slot(layer.out_slot).candidates, normalize,
                                          batch_norm.epsilon if batch_norm else BN_EPSILON, self.weight_decay)

    def _runs_searchable(self, layer):
        """Whether the layer writes a searchable slot, so runs as a searchable conv (`layers.SearchableConv`)."""
        return rule_for(layer).searchable_conv and self.space.slot(layer.out_slot).searchable

    @property
    def image_shape(self):
        return self.space.input_shape

    @property
    def arch_variables(self):
        return ([choice.alpha for choice in self.width_choices if choice.alpha is not None]
                + [mixer.beta for _, mixer in self.stages])

    @property
    def weight_variables(self):
        arch = {id(v) for v in self.arch_variables}
        return [v for v in self.trainable_variables if id(v) not in arch]

    def uniform_sample(self):
        """A fixed sample (the two widest candidates, equal weights; uniform depths), for building."""
        widths = {choice.name: (tf.constant([len(choice.candidates) - 1, max(0, len(choice.candidates) - 2)]),
                                tf.constant([0.5, 0.5])) for choice in self.width_choices}
        depths = [tf.fill([len(mixer.depth_choices)], 1.0 / len(mixer.depth_choices)) for _, mixer in self.stages]
        return widths, depths

    def sample(self, tau, seed):
        """One architecture sample: two widths + weights per width distribution, soft weights per stage."""
        widths = {choice.name: choice.sample(tau, tf.random.experimental.stateless_fold_in(seed, i))
                  for i, choice in enumerate(self.width_choices)}
        offset = len(self.width_choices)
        depths = [mixer.sample(tau, tf.random.experimental.stateless_fold_in(seed, offset + s))
                  for s, (_, mixer) in enumerate(self.stages)]
        return widths, depths

    def call(self, images, sample):
        widths, depths = sample
        tensors = {}  # layer name -> (output at full width, its width in channels)
        for layer in self.space.layers:
            if rule_for(layer).is_image_input:
                tensors[layer.name] = (images, tf.constant(self.space.slot(layer.out_slot).full_width))
            elif layer.name in self.absorbed:
                tensors[layer.name] = tensors[self.absorbed[layer.name]]
            else:
                tensors[layer.name] = self._forward(layer, [tensors[name] for name in layer.inputs], widths)
            if layer.name in self._mixed_exits:
                index, outputs = self._mixed_exits[layer.name]
                block_outputs = [tensors[name] for name in outputs]
                tensors[layer.name] = self.stages[index][1](
                    [y for y, _ in block_outputs], [width for _, width in block_outputs], depths[index])
        return tensors[self.space.output][0]

    def _forward(self, layer, inputs, widths):
        """(output, width) of one layer from its inputs' (output, width)."""
        keras_layer = self.graph_layers[layer.name]
        slot = self.space.slot(layer.out_slot)
        if isinstance(keras_layer, SearchableConv):
            y, width = keras_layer(inputs[0][0], *widths[self._choice_of_slot[layer.out_slot]])
            if layer.name in self._activations:
                y = self._activations[layer.name](y)
        else:
            rule = rule_for(layer)
            y = rule.supernet_call(keras_layer, [y for y, _ in inputs], [width for _, width in inputs],
                                              layer, **self._call_arguments[layer.name])
            width = rule.supernet_width(inputs)
        if not self.space.varies(slot.name):
            return y, tf.constant(slot.full_width)
        if layer.name in self._masked:
            y = y * tf.cast(channel_mask(width, slot.full_width), y.dtype)
        return y, width

    def argmax_widths(self):
        """The argmax width of every searchable slot, int64."""
        return {slot: tf.gather(tf.constant(choice.candidates, tf.int64), choice.argmax_index())
                for slot, choice in zip(self._choice_of_slot, self.width_choices)}

    def derive(self):
        """The argmax shape."""
        return self.space.shape({slot: int(width) for slot, width in self.argmax_widths().items()},
                                {stage.name: int(mixer.argmax_depth()) for stage, mixer in self.stages})

    def full_cost(self, metric="flops"):
        """The cost of the source model (the full shape): the base of the cost ratios."""
        _check_metric(metric)
        if metric not in self._full_cost:
            self._full_cost[metric] = getattr(cost.count_shape(self.space, self.space.full_shape()), metric)
        return self._full_cost[metric]

    def keep_probabilities(self):
        """P(the block is kept) under softmax(beta), for every droppable block by name."""
        keep = {}
        for stage, mixer in self.stages:
            at_least = mixer.keep_probabilities(stage.num_blocks)
            for index, block in enumerate(stage.blocks, start=int(bool(stage.opener))):
                keep[block.name] = at_least[index]
        return keep

    def expected_cost(self, metric="flops"):
        """E(A): the sum over layers of `layer_cost` at the expected widths of the layer's input and
        output slots (E[C] = sum_k softmax(alpha)_k c_k; fixed slots at full width), a droppable
        block's layers weighted by the probability that its stage keeps it (docs/design.md section 6)."""
        _check_metric(metric)
        widths = {slot.name: float(slot.full_width) for slot in self.space.slots}
        widths.update({slot: choice.expected_width()
                       for slot, choice in zip(self._choice_of_slot, self.width_choices)})
        widths.update({slot.name: sum(widths[member] for member in slot.members)
                       for slot in self.space.slots if slot.members})
        keep = self.keep_probabilities()
        total = 0.0
        for layer in self.space.layers:
            if rule_for(layer).costed:
                layer_total = layer_cost(layer, widths[layer.in_slots[0]], widths[layer.out_slot], metric)
                total += keep[layer.block] * layer_total if layer.block else layer_total
        return total

    def argmax_cost(self, metric="flops"):
        """F(A): the exact cost of the network derived from the argmax shape, an int64 tensor."""
        _check_metric(metric)
        widths = {slot.name: tf.constant(slot.full_width, tf.int64) for slot in self.space.slots}
        widths.update(self.argmax_widths())
        kept, handed_on = {}, {}  # block -> whether kept; block exit -> (the exits it may hand on, which)
        for stage, mixer in self.stages:
            kept_blocks = tf.cast(mixer.argmax_depth(), tf.int64) - int(bool(stage.opener))
            exits = [stage.blocks[0].entry] + [block.exit for block in stage.blocks]
            for index, block in enumerate(stage.blocks, start=1):
                kept[block.name] = index <= kept_blocks
                handed_on[block.exit] = (exits[:index + 1], tf.minimum(kept_blocks, index))
        channels = {}

        def read(name):  # the width a reader of `name` sees: a dropped block hands on its entry
            if name not in handed_on:
                return channels[name]
            exits, position = handed_on[name]
            return tf.gather(tf.stack([channels[exit_] for exit_ in exits]), position)

        shortcuts = {shortcut.add: shortcut for shortcut in self.space.shortcuts}
        total = tf.constant(0, tf.int64)
        for layer in self.space.layers:
            inputs = [read(name) for name in layer.inputs]
            layer_total = tf.constant(0, tf.int64)
            if layer.name in shortcuts:
                shortcut = shortcuts[layer.name]
                x = inputs[layer.inputs.index(shortcut.shortcut)]
                out = inputs[layer.inputs.index(shortcut.residual)]
                projection = sum(layer_cost(planned.layer, x, out, metric)
                                 for planned in self.space.projection(shortcut, shortcut.shortcut, 0, 0))
                layer_total = tf.where(tf.not_equal(x, out), projection, layer_total)
            else:
                out = rule_for(layer).out_channels(layer, inputs, widths[layer.out_slot])
            channels[layer.name] = out
            if rule_for(layer).costed:
                layer_total += layer_cost(layer, inputs[0], out, metric)
            total += tf.where(kept[layer.block], layer_total, tf.zeros_like(layer_total)) if layer.block else (
                layer_total)
        return total

    def start_full(self, logit):
        """Adds `logit` to the full width of every width distribution and the full depth of every stage's,
        so that a search starts near the source network (from a trained one, its samples then start
        near the trained function instead of across all widths)."""
        for variable in self.arch_variables:
            variable.assign(variable + tf.one_hot(variable.shape[0] - 1, variable.shape[0]) * logit)

    def init_from_source(self, model):
        """Starts from the source model's (trained) weights, matched by layer name: conv kernels and
        biases, every candidate's affine from the BN its conv absorbed (a searchable conv without one
        keeps its identity affines), and every other layer's weights."""
        model = load_model(model)
        batch_norm_of = {conv: bn for bn, conv in self.absorbed.items()}
        for name, layer in self.graph_layers.items():
            source = operation(model, name)
            if not isinstance(layer, SearchableConv):
                if getattr(layer, "weights", None):
                    layer.set_weights(source.get_weights())
                continue
            rule_for(self.space.layer(name)).init_searchable(layer, source)
            if name in batch_norm_of:
                bn = model.get_layer(batch_norm_of[name])
                layer.gammas.assign(tf.tile(bn.gamma[None], [len(layer.candidates), 1]))
                layer.betas.assign(tf.tile(bn.beta[None], [len(layer.candidates), 1]))
