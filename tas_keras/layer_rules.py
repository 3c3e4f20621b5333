"""One rule per Keras layer class: everything the search space knows about a layer (docs/design.md section 11).

A rule answers, for the layer classes it covers:
  - `read`: how the layer acts on width slots while `tas_keras.graph` reads a model: it opens a slot
    (Conv2D, a Dense on a feature map), follows its input's (BatchNormalization, activations; a grouped
    conv, in whole groups), ties its inputs (merges) or fixes them (Concatenate), or refuses the layer
    with one line naming it;
  - `details`: the settings a `GraphLayer` records for the other questions (kernel, strides, ...);
  - `out_channels`: its output channels in a derived network, given its inputs' and its slot's widths;
  - `counts`: its FLOPs and parameters at given widths (`tas_keras.cost`; numbers or tensors);
  - `masked`: whether the supernet, which runs every layer at full width on zero-padded tensors, must
    zero the channels beyond the sampled width after it (a BN's beta, a bias, f(0) != 0);
  - `copy` and `rebuilt`: a fresh copy for the supernet, and the layer of a derived network with fewer
    channels (`tas_keras.derive`); `call`: how either is called on its inputs, `supernet_call`: how the
    copy is, knowing its inputs' widths (a LayerNormalization's statistics depend on them);
  - `permuted`: its weights with its input and output channels permuted (`tas_keras.importance`);
  - `exported`, `folds_as` and `takes_folded`: what the TFLite converter makes of it, which the latency
    tables time (`tas_keras.latency`): an op of its own, folded into the op before it (a BN into a conv's
    weights, a ReLU into a conv's or an Add's fused activation), or nothing (dropout at inference);
  - what the reader's structure rules ask of it: whether it adds its inputs (`adds_inputs`: the end of a
    residual block), is the image input, a batch normalisation, a Concatenate, a layer that passes its
    input's channels through weightless, an element-wise activation, a no-op at inference, a conv whose
    settings a shortcut projection copies; whether it ends in a softmax, and its logits without it.
The reader, the supernet, derive, the cost, the importance ordering and the loading of a model consult
these rules and switch on no layer class themselves (`tests/test_layer_rules.py` checks it): a layer
class is supported by adding its rule here.

Besides layers, a functional model may hold keras.ops operations applied to symbolic tensors (`x + 3.0`,
`x * gate`, `keras.ops.hard_silu(x)`): the element-wise ones have a rule (`ElementwiseOpRule`) too.

`rule_for_layer(layer)` finds the rule of a Keras layer or operation (by exact class: a subclass may
compute something else; where a class computes two kinds of layer, by `matches`: a Conv2D with groups > 1
is a grouped conv), `rule_for(graph_layer)` the rule of a layer the reader recorded (by its kind).
"""

import math

import keras
# ConvNeXt's own layers, and the classes of the keras.ops operations: Keras exports neither.
from keras.src.applications.convnext import LayerScale, StochasticDepth
from keras.src.ops import nn as nn_ops
from keras.src.ops import numpy as numpy_ops
import numpy as np
import tensorflow as tf

from tas_keras.layers import (MaskedLayerNormalization, SearchableConv, SearchableConvTranspose,
                              SearchableSeparableConv, channel_mask)

_L = keras.layers
CHANNEL_MIXING_ACTIVATIONS = ("softmax", "log_softmax")
# How the TFLite converter folds a layer into the op that computes its input (`LayerRule.folds_as`).
FOLDED_BATCH_NORM, FOLDED_ACTIVATION = "batch_norm", "activation"
# The activations TFLite ops carry as a fused activation function (RELU, RELU6).
FUSED_ACTIVATIONS = ("relu", "relu6")


class UnsupportedModelError(ValueError):
    """The model, or one of its layers, is outside what the graph reader can prune safely."""


def refuse(layer, reason):
    raise UnsupportedModelError(f"{layer.name} ({type(layer).__name__}): {reason}")


def activation_name(layer):
    """The name of a layer's built-in activation ("linear" when it has none)."""
    activation = layer.get_config().get("activation", "linear")
    if not isinstance(activation, str):
        refuse(layer, f"activation {activation!r} is not a built-in Keras activation")
    return activation


def maps_zero_to_zero(function):
    return not np.any(keras.ops.convert_to_numpy(function(tf.zeros((1, 1)))))


def _conv_foldings(keras_layer):
    """What the converter folds into a conv, depthwise conv or Dense: a BN into its kernel and bias, then a
    ReLU into the op, both only after a linear output."""
    return (FOLDED_BATCH_NORM, FOLDED_ACTIVATION) if activation_name(keras_layer) == "linear" else ()


def _take(value, order, axis):
    return value if order is None else np.take(value, order, axis=axis)


class LayerRule:
    """The defaults: a weightless layer of one input that keeps its input's slot and costs nothing."""

    kind = ""
    classes = ()
    multiple_inputs = False  # called with the list of its inputs (merges, Concatenate)
    opens_slot = False  # its output width is its slot's width, not its input's
    ties_inputs = False  # its inputs share one width (merges, element-wise ops of two tensors)
    costed = False  # counted by `counts`
    searchable_conv = False  # where it opens a searchable slot the supernet runs it as a `searchable` conv
    is_image_input = False  # the model's input: the image
    batch_normalizes = False  # its gamma and beta score its channels (Taylor); a shortcut projection copies it
    concatenates = False  # its output is its inputs side by side
    passes_channels_through = False  # weightless, keeps its input's channels one by one
    shortcut_projection_template = False  # a derived network's shortcut projection copies its settings
    named_by_user = True  # keras.ops operations are numbered by Keras instead
    conv_layer = False  # Conv2D (grouped too), SeparableConv2D, Conv2DTranspose, Dense: a conv on a feature map

    def matches(self, layer):
        """Whether the rule covers `layer`, of one of its classes. One class may compute two kinds of layer
        (a Conv2D with groups > 1 is a grouped conv): the first rule of `RULES` that matches covers it."""
        return True

    def read(self, reader, layer, in_slots):
        """Returns the slot of the layer's output, opening, tying or fixing slots through `reader`."""
        return in_slots[0]

    def details(self, layer, node):
        """The GraphLayer fields of the layer, called as `node` records."""
        return {}

    def out_channels(self, layer, in_channels, slot_width):
        """Output channels in a derived network: `in_channels` of its inputs, `slot_width` of its slot."""
        return slot_width if self.opens_slot else in_channels[0]

    def counts(self, in_channels, out_channels, kernel=(), output_size=(), use_bias=False, affine=2,
               depth_multiplier=1, group_width=1, input_size=()):
        """(FLOPs, parameters) at the given widths; the convention is `tas_keras.cost`'s. `output_size` and
        `input_size` are (height, width) of its output and input maps."""
        return 0, 0

    def filter_norms(self, keras_layer):
        """The L1 norm of the weights that produce each output channel (a searchable conv's)."""
        raise NotImplementedError(f"{type(keras_layer).__name__} opens no searchable slot")

    def masked(self, layer, keras_layer):
        """Whether the supernet zeroes its output beyond the sampled width (searchable slots only)."""
        return False

    def narrowed(self, config, planned):
        """The layer's config in a derived network (`planned`: its `DerivedLayer`)."""
        return config

    def copy(self, source, dtype, regularizer):
        """A new layer of the source layer's class, settings and name (fresh weights) for the supernet,
        computing in `dtype` (a dtype policy), every weight regularised by `regularizer`."""
        return type(source).from_config(_supernet_config(source, dtype, regularizer))

    def rebuilt(self, source, planned, dtype):
        """The layer of a derived network (`planned`: its `DerivedLayer`), of `source`'s class and
        settings, trainable, computing in `dtype` (None: the stage's policy)."""
        config = source.get_config()
        config.update(name=planned.layer.name, trainable=True)
        config.pop("dtype", None)
        if dtype:
            config["dtype"] = dtype
        return type(source).from_config(self.narrowed(config, planned))

    def call(self, layer, inputs, graph_layer, **call_arguments):
        """Calls a copy or rebuild of the layer on its inputs' tensors, in `graph_layer.inputs` order."""
        return layer(inputs if self.multiple_inputs else inputs[0], **call_arguments)

    def supernet_width(self, inputs):
        """The width the supernet carries beside the layer's output (`tas_keras.supernet`), from its
        inputs' (tensor, width) pairs: as its input's; of zero-padded inputs merged, the widest."""
        widths = [width for _, width in inputs]
        return widths[0] if len(widths) == 1 else tf.reduce_max(tf.stack(widths))

    def supernet_call(self, layer, inputs, widths, graph_layer, **call_arguments):
        """Calls the supernet's copy on its inputs' zero-padded tensors, whose leading `widths` channels
        are the sampled ones: a layer whose function depends on the width reads them."""
        return self.call(layer, inputs, graph_layer, **call_arguments)

    def permuted(self, layer, weights, in_order, out_order):
        """Its weights with the input channels in `in_order`, the output channels in `out_order` (None:
        as they are)."""
        if weights and (in_order is not None or out_order is not None):
            raise ValueError(f"{layer.name} ({layer.class_name}) holds weights in a permuted slot")
        return weights

    def exported(self, keras_layer):
        """Whether the layer computes anything in the converted .tflite (dropout and noise do not)."""
        return True

    def folds_as(self, keras_layer):
        """FOLDED_BATCH_NORM or FOLDED_ACTIVATION when the converter can fold the layer into the op that
        computes its input (if that op `takes_folded` it); None: the layer is an op of its own."""
        return None

    def takes_folded(self, keras_layer):
        """The foldings (`folds_as`) the converter applies to the layer's op, in the order they may follow."""
        return ()

    def adds_inputs(self, keras_layer):
        """Whether it adds its inputs, as a residual block's Add does (the reader counts the tensor inputs)."""
        return False

    def activates_elementwise(self, keras_layer):
        """Whether it is an activation that acts on each value alone (a residual block's trailing ReLU)."""
        return False

    def is_no_op(self, keras_layer):
        """Whether at inference it hands its input on, at most zero-padded (a stage opener may differ from
        the blocks it repeats by these: padding for a stride, dropout)."""
        return False

    def ends_in_softmax(self, keras_layer, output_rank):
        """Whether its output is a softmax over the channels (the last of `output_rank` axes)."""
        return keras_layer.get_config().get("activation") == "softmax"

    def logits(self, keras_layer, features):
        """Its output without its softmax (`ends_in_softmax`), computed on `features`, its input: a copy
        with the same name, settings and weights and a linear activation."""
        linear = type(keras_layer).from_config({**keras_layer.get_config(), "activation": "linear"})
        logits = linear(features)
        linear.set_weights(keras_layer.get_weights())
        return logits


def _supernet_config(source, dtype, regularizer):
    """The source layer's config with `dtype` and every weight regularizer set to `regularizer`."""
    config = source.get_config()
    config["dtype"] = dtype
    for key in config:
        if key.endswith("_regularizer") and key != "activity_regularizer":
            config[key] = regularizer
    return config


def _fixed_if_mixing(reader, layer, slot):
    """`slot`, fixed when the layer's activation mixes the channels (a softmax over them)."""
    if activation_name(layer) in CHANNEL_MIXING_ACTIVATIONS:
        reader.slots.fix(slot, f"{layer.name} applies {activation_name(layer)} over the channels")
    return slot


def _conv_details(layer):
    return {"kernel": tuple(layer.kernel_size), "strides": tuple(layer.strides), "use_bias": layer.use_bias}


class InputRule(LayerRule):
    kind, classes, opens_slot, is_image_input = "input", (_L.InputLayer,), True, True

    def read(self, reader, layer, in_slots):
        return reader.slots.open(layer.name, reader.channels(layer.name), "image channels")

    def exported(self, keras_layer):
        return False  # the image input is part of a latency table's fixed cost


class ConvRule(LayerRule):
    """Conv2D (groups 1; `GroupedConvRule` covers the others): opens a searchable slot named after it; a
    softmax activation fixes it."""

    kind, classes, opens_slot, costed, searchable_conv = "conv", (_L.Conv2D,), True, True, True
    conv_layer = True
    shortcut_projection_template, searchable_class = True, SearchableConv

    def read(self, reader, layer, in_slots):
        return _fixed_if_mixing(reader, layer, reader.slots.open(layer.name, reader.channels(layer.name)))

    def details(self, layer, node):
        return _conv_details(layer)

    def counts(self, in_channels, out_channels, kernel=(), output_size=(), use_bias=False, affine=2,
               depth_multiplier=1, group_width=1, input_size=()):
        weights = math.prod(kernel) * in_channels * out_channels + (out_channels if use_bias else 0)
        return weights * math.prod(output_size), weights

    def filter_norms(self, keras_layer):
        kernel = keras.ops.convert_to_numpy(keras_layer.kernel)
        return np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)

    def conv_settings(self, source):
        """The searchable conv's full width, kernel, strides, padding and dilation for `source`."""
        return {"filters": source.filters, "kernel_size": source.kernel_size, "strides": source.strides,
                "padding": source.padding, "dilation_rate": source.dilation_rate}

    def takes_folded(self, keras_layer):
        return _conv_foldings(keras_layer)

    def searchable(self, source, candidates, normalize, epsilon, weight_decay):
        """The supernet's searchable conv for `source`, mixing the sampled widths of `candidates`."""
        config = source.get_config()
        return self.searchable_class(
            candidates=candidates, weight_decay=weight_decay, normalize=normalize,
            use_bias=source.use_bias and not normalize, epsilon=epsilon,
            kernel_initializer=keras.initializers.get(config["kernel_initializer"]), name=source.name,
            **self.conv_settings(source))

    def init_searchable(self, searchable, source):
        """Copies a trained source layer's weights into its searchable conv."""
        searchable.kernel.assign(tf.reshape(source.kernel, searchable.kernel.shape))  # a Dense's (in, out) is 1x1
        if searchable.use_bias:
            searchable.bias.assign(source.bias)

    def narrowed(self, config, planned):
        config["filters"] = planned.out_channels
        if planned.layer.name != planned.source:  # a projection shortcut: a 1x1 conv with the source's settings
            config.update(kernel_size=(1, 1), strides=(1, 1), dilation_rate=(1, 1), activation="linear")
        return config

    def permuted(self, layer, weights, in_order, out_order):
        kernel = _take(_take(weights[0], in_order, -2), out_order, -1)
        return [kernel] + [_take(bias, out_order, 0) for bias in weights[1:]]


class SeparableConvRule(ConvRule):
    """SeparableConv2D: its depthwise part follows its input's slot, its pointwise part opens a searchable
    slot named after it (a softmax activation fixes it). The supernet runs it as a depthwise conv and a
    searchable 1x1 conv."""

    kind, classes, shortcut_projection_template = "separable", (_L.SeparableConv2D,), False

    def details(self, layer, node):
        return {**super().details(layer, node), "depth_multiplier": layer.depth_multiplier}

    def counts(self, in_channels, out_channels, kernel=(), output_size=(), use_bias=False, affine=2,
               depth_multiplier=1, group_width=1, input_size=()):
        weights = (math.prod(kernel) * in_channels * depth_multiplier + in_channels * depth_multiplier * out_channels
                   + (out_channels if use_bias else 0))
        return weights * math.prod(output_size), weights

    def filter_norms(self, keras_layer):
        return np.abs(keras.ops.convert_to_numpy(keras_layer.pointwise_kernel)).sum(axis=(0, 1, 2))

    def searchable(self, source, candidates, normalize, epsilon, weight_decay):
        config = source.get_config()
        return SearchableSeparableConv(
            source.filters, candidates, source.kernel_size, source.strides, source.depth_multiplier,
            weight_decay=weight_decay, padding=source.padding, dilation_rate=source.dilation_rate,
            normalize=normalize, use_bias=source.use_bias and not normalize, epsilon=epsilon,
            depthwise_initializer=keras.initializers.get(config["depthwise_initializer"]),
            kernel_initializer=keras.initializers.get(config["pointwise_initializer"]), name=source.name)

    def init_searchable(self, searchable, source):
        searchable.depthwise.kernel.assign(source.depthwise_kernel)
        searchable.kernel.assign(source.pointwise_kernel)
        if searchable.use_bias:
            searchable.bias.assign(source.bias)

    def permuted(self, layer, weights, in_order, out_order):
        multiplier = layer.depth_multiplier
        depthwise, pointwise, *bias = weights
        pointwise_order = None if in_order is None else (
            np.asarray(in_order)[:, None] * multiplier + np.arange(multiplier)).reshape(-1)
        return [_take(depthwise, in_order, 2), _take(_take(pointwise, pointwise_order, 2), out_order, -1)] + [
            _take(value, out_order, 0) for value in bias]


class ConvTransposeRule(ConvRule):
    """Conv2DTranspose: opens a searchable slot as a Conv2D does (a softmax activation fixes it). Its kernel is
    (k_h, k_w, C_out, C_in), the output channels before the input ones. It scatters every input position
    through its whole kernel, so it costs k_h*k_w*C_in*C_out multiply-adds per input position (plus C_out
    per output position for a bias). The supernet runs it as a `SearchableConvTranspose`."""

    kind, classes, searchable_class = "conv_transpose", (_L.Conv2DTranspose,), SearchableConvTranspose
    shortcut_projection_template = False  # a projection shortcut is a strided conv, not an upsampling one

    def details(self, layer, node):
        return {**super().details(layer, node), "input_size": tuple(int(d) for d in node.input_tensors[0].shape[1:3])}

    def counts(self, in_channels, out_channels, kernel=(), output_size=(), use_bias=False, affine=2,
               depth_multiplier=1, group_width=1, input_size=()):
        kernel_weights = math.prod(kernel) * in_channels * out_channels
        bias = out_channels if use_bias else 0
        return kernel_weights * math.prod(input_size) + bias * math.prod(output_size), kernel_weights + bias

    def filter_norms(self, keras_layer):
        return np.abs(keras.ops.convert_to_numpy(keras_layer.kernel)).sum(axis=(0, 1, 3))

    def conv_settings(self, source):
        return {**super().conv_settings(source), "output_padding": source.output_padding}

    def init_searchable(self, searchable, source):
        searchable.kernel.assign(tf.transpose(source.kernel, [0, 1, 3, 2]))
        if searchable.use_bias:
            searchable.bias.assign(source.bias)

    def permuted(self, layer, weights, in_order, out_order):
        kernel = _take(_take(weights[0], in_order, -1), out_order, -2)
        return [kernel] + [_take(bias, out_order, 0) for bias in weights[1:]]


class DenseRule(ConvRule):
    """Dense on a feature map is a 1x1 conv (ConvNeXt's pointwise convs): it opens a searchable slot as a
    Conv2D does. Dense on a vector (a classifier, an MLP head) opens a fixed slot: it is not searched."""

    kind, classes, shortcut_projection_template = "dense", (_L.Dense,), False

    def read(self, reader, layer, in_slots):
        rank = len(reader.shapes[reader.inputs[layer.name][0]])
        if rank == 2:
            return reader.slots.open(layer.name, layer.units, "a Dense on a vector is not searched")
        if rank != 4:
            refuse(layer, f"Dense on a {rank}-D input; the reader takes vectors and feature maps")
        return super().read(reader, layer, in_slots)

    def details(self, layer, node):
        on_map = len(node.input_tensors[0].shape) == 4
        return {"use_bias": layer.use_bias, "kernel": (1, 1) if on_map else ()}

    def counts(self, in_channels, out_channels, kernel=(), output_size=(), use_bias=False, affine=2,
               depth_multiplier=1, group_width=1, input_size=()):
        if output_size:  # on a feature map: a 1x1 conv
            return super().counts(in_channels, out_channels, kernel, output_size, use_bias)
        # On a vector, its weights, computed as they always were: no product by an empty output size,
        # whose extra op changes the float rounding of a search's expected cost (tests/test_search.py's
        # RECORDED_SEARCH).
        weights = in_channels * out_channels + (out_channels if use_bias else 0)
        return weights, weights

    def conv_settings(self, source):
        return {"filters": source.units, "kernel_size": 1}

    def narrowed(self, config, planned):
        config["units"] = planned.out_channels
        return config


class GroupedRule(LayerRule):
    """Convs whose channels are split into groups, each mapping its own input channels to its own output
    channels: a grouped Conv2D and a DepthwiseConv2D (a group per input channel). They are pruned in whole
    groups. Where a group has as many outputs as inputs, keeping k groups keeps k groups of inputs and of
    outputs: the conv follows its input's slot, whose widths become whole groups (`width_step`). Where
    a group's outputs are not as many as its inputs (a depth multiplier), the input slot is fixed and the
    output opens a fixed one. A softmax activation fixes the slot, as a conv's does."""

    costed = True

    def group_channels(self, layer):
        """(input channels, output channels) of one group."""
        raise NotImplementedError

    def resizing_groups(self, layer):
        """What its groups do to the channel count where they change it (the reason its slots are fixed)."""
        raise NotImplementedError

    def read(self, reader, layer, in_slots):
        group_inputs, group_outputs = self.group_channels(layer)
        if group_inputs != group_outputs:
            reason = f"{layer.name} {self.resizing_groups(layer)}"
            reader.slots.fix(in_slots[0], reason)
            return reader.slots.open(layer.name, reader.channels(layer.name), reason)
        reader.slots.keep_multiples(in_slots[0], group_inputs)
        if activation_name(layer) in CHANNEL_MIXING_ACTIVATIONS:
            reader.slots.fix(in_slots[0], f"{layer.name} applies {activation_name(layer)} over the channels")
        return in_slots[0]

    def details(self, layer, node):
        return {"kernel": tuple(layer.kernel_size), "strides": tuple(layer.strides), "use_bias": layer.use_bias,
                "group_width": self.group_channels(layer)[0]}

    def out_channels(self, layer, in_channels, slot_width):
        # Following its input's slot, it writes as many channels as it reads; else its slot is fixed.
        return in_channels[0] if layer.out_slot == layer.in_slots[0] else slot_width

    def counts(self, in_channels, out_channels, kernel=(), output_size=(), use_bias=False, affine=2,
               depth_multiplier=1, group_width=1, input_size=()):
        weights = math.prod(kernel) * group_width * out_channels + (out_channels if use_bias else 0)
        return weights * math.prod(output_size), weights

    def masked(self, layer, keras_layer):
        return layer.use_bias or not maps_zero_to_zero(keras_layer.activation)

    def takes_folded(self, keras_layer):
        return _conv_foldings(keras_layer)


def _moves_whole_groups(order, group_width):
    """Whether a channel order moves whole groups of `group_width` channels, each keeping its own order."""
    groups = np.reshape(order, (-1, group_width))
    return bool(np.all(groups == groups[:, :1] + np.arange(group_width)) and np.all(groups[:, 0] % group_width == 0))


class GroupedConvRule(GroupedRule):
    """Conv2D with groups > 1 (RegNet's, ResNeXt's): `GroupedRule`. Keras keeps a group's channels
    contiguous (group j reads inputs j * C_in/g .. and writes outputs j * C_out/g ..) and its kernel is
    (k_h, k_w, C_in/g, C_out), so the leading k groups are the leading channels: a narrower copy keeps
    the kernel's leading output channels and has k groups."""

    kind, classes, conv_layer = "grouped", (_L.Conv2D,), True

    def matches(self, layer):
        return layer.groups > 1

    def group_channels(self, layer):
        return layer.kernel.shape[2], layer.filters // layer.groups

    def resizing_groups(self, layer):
        return "maps {} to {} channels per group".format(*self.group_channels(layer))

    def narrowed(self, config, planned):
        config.update(filters=planned.out_channels, groups=planned.in_channels // planned.layer.group_width)
        return config

    def permuted(self, layer, weights, in_order, out_order):
        """Whole groups only, in one order for the inputs and outputs (they are one slot): the kernel's
        output channels move with their group, its input axis (within a group) stays as it is."""
        if in_order is None and out_order is None:
            return weights
        if in_order is None or not np.array_equal(in_order, out_order) or not _moves_whole_groups(
                in_order, layer.group_width):
            raise ValueError(f"{layer.name} ({layer.class_name}): a channel order that does not move whole groups "
                             f"of {layer.group_width} channels")
        return [_take(weights[0], out_order, -1)] + [_take(bias, out_order, 0) for bias in weights[1:]]


class DepthwiseRule(GroupedRule):
    """DepthwiseConv2D: `GroupedRule` with a group per input channel (its kernel is (k_h, k_w, C, m))."""

    kind, classes = "depthwise", (_L.DepthwiseConv2D,)

    def group_channels(self, layer):
        return 1, layer.depth_multiplier

    def resizing_groups(self, layer):
        return f"has depth_multiplier {layer.depth_multiplier}"

    def details(self, layer, node):
        return {**super().details(layer, node), "depth_multiplier": layer.depth_multiplier}

    def permuted(self, layer, weights, in_order, out_order):
        # With depth_multiplier > 1 its input slot is fixed, so in_order is None.
        return [_take(weights[0], in_order, 2)] + [_take(bias, in_order, 0) for bias in weights[1:]]


class ChannelVectorsRule(LayerRule):
    """A layer whose weights are vectors over its channels (a normalisation's gamma and beta, a scale):
    it follows its input's slot, and its vectors are parameters (`affine` of them), sliced and permuted
    with the channels."""

    costed = True

    def details(self, layer, node):
        return {"affine": int(layer.center) + int(layer.scale)}

    def counts(self, in_channels, out_channels, kernel=(), output_size=(), use_bias=False, affine=2,
               depth_multiplier=1, group_width=1, input_size=()):
        return 0, affine * out_channels

    def masked(self, layer, keras_layer):
        return True  # a normalisation's beta makes the zero channels non-zero

    def permuted(self, layer, weights, in_order, out_order):
        return [_take(value, out_order, 0) for value in weights]


class BatchNormRule(ChannelVectorsRule):
    """BatchNormalization over the channel axis: follows its input's slot; its gamma/beta are parameters."""

    kind, classes, batch_normalizes = "batch_norm", (_L.BatchNormalization,), True

    def read(self, reader, layer, in_slots):
        if not reader.is_channel_axis(layer.name, layer.axis):
            refuse(layer, f"normalises axis {layer.axis}, not the channel axis")
        return in_slots[0]

    def folds_as(self, keras_layer):
        return FOLDED_BATCH_NORM


class LayerNormRule(ChannelVectorsRule):
    """LayerNormalization over the channel axis: follows its input's slot; its gamma/beta are parameters.
    Its mean and variance are over the channels, so they depend on the width: the supernet runs it as a
    `MaskedLayerNormalization`, over the leading channels of the sampled width (the narrower network's
    statistics). Other axes, and the deprecated rms_scaling, are refused."""

    kind, classes = "layer_norm", (_L.LayerNormalization,)

    def read(self, reader, layer, in_slots):
        axes = layer.axis if isinstance(layer.axis, list) else [layer.axis]
        if len(axes) != 1 or not reader.is_channel_axis(layer.name, axes[0]):
            refuse(layer, f"normalises over axes {axes}; only the channel axis is supported")
        if layer.rms_scaling:
            refuse(layer, "rms_scaling (deprecated by Keras) is not supported")
        return in_slots[0]

    def copy(self, source, dtype, regularizer):
        return MaskedLayerNormalization.from_config(_supernet_config(source, dtype, regularizer))

    def supernet_call(self, layer, inputs, widths, graph_layer, **call_arguments):
        return layer(inputs[0], width=widths[0], **call_arguments)


class LayerScaleRule(ChannelVectorsRule):
    """ConvNeXt's LayerScale (`keras.src.applications.convnext`): each channel times its gamma; follows its
    input's slot."""

    kind, classes = "layer_scale", (LayerScale,)

    def details(self, layer, node):
        return {"affine": 1}

    def masked(self, layer, keras_layer):
        return False

    def narrowed(self, config, planned):
        config["projection_dim"] = planned.out_channels
        return config


def _existing(module, names):
    return tuple(getattr(module, name) for name in names if hasattr(module, name))


ELEMENTWISE_ACTIVATIONS = (_L.Activation, _L.ReLU, _L.LeakyReLU, _L.ELU)
# Weightless layers that leave an all-zero channel zero.
_ZERO_KEEPING = (_L.MaxPooling2D, _L.AveragePooling2D, _L.GlobalAveragePooling2D, _L.GlobalMaxPooling2D,
                 _L.ZeroPadding2D, _L.Cropping2D, _L.UpSampling2D, _L.Dropout, _L.SpatialDropout2D,
                 _L.GaussianDropout, _L.ActivityRegularization, _L.Identity, _L.Resizing, _L.CenterCrop,
                 StochasticDepth)
# Weightless layers that compute nothing at inference.
_INFERENCE_IDENTITIES = (_L.Dropout, _L.SpatialDropout2D, _L.GaussianDropout, _L.GaussianNoise, _L.AlphaDropout,
                         _L.ActivityRegularization, _L.Identity, StochasticDepth)
# Layers that rescale or normalise the pixel values: a model that starts with one takes raw pixels.
_PIXEL_PREPROCESSING = (_L.Rescaling, _L.Normalization)


def _fused_activation(keras_layer):
    """Whether an activation layer is one the converter fuses into the op before it (ReLU, ReLU6)."""
    if type(keras_layer) is _L.Activation:
        return activation_name(keras_layer) in FUSED_ACTIVATIONS
    if type(keras_layer) is _L.ReLU:
        return (keras_layer.max_value in (None, 6) and not keras_layer.negative_slope
                and not keras_layer.threshold)
    return False


class PassThroughRule(LayerRule):
    """Layers of one input that keep its channels one by one: activations, pooling, padding, dropout and
    noise (ConvNeXt's StochasticDepth too), Identity, Rescaling and Normalization. One that holds
    per-channel constants it cannot slice (Normalization, a Rescaling with a vector scale or offset) or
    mixes the channels (softmax over them) fixes its slot."""

    kind, passes_channels_through = "pass", True
    classes = ELEMENTWISE_ACTIVATIONS + _ZERO_KEEPING + (
        _L.Softmax, _L.GaussianNoise, _L.AlphaDropout, _L.Rescaling, _L.Normalization)

    def read(self, reader, layer, in_slots):
        name, in_slot = layer.name, in_slots[0]
        if len(reader.inputs[name]) != 1 or reader.channels(name) != reader.channels(reader.inputs[name][0]):
            refuse(layer, "expected one input and as many output channels as input channels")
        if type(layer) is _L.Softmax:
            if not reader.is_channel_axis(name, layer.axis):
                refuse(layer, f"softmax over axis {layer.axis}")
            reader.slots.fix(in_slot, f"{name} applies softmax over the channels")
        elif type(layer) is _L.Activation and activation_name(layer) in CHANNEL_MIXING_ACTIVATIONS:
            reader.slots.fix(in_slot, f"{name} applies {activation_name(layer)} over the channels")
        elif type(layer) is _L.Normalization:
            reader.slots.fix(in_slot, f"{name} (Normalization) holds per-channel statistics")
        elif type(layer) is _L.Rescaling and not all(isinstance(v, (int, float)) for v in (layer.scale, layer.offset)):
            reader.slots.fix(in_slot, f"{name} (Rescaling) holds per-channel constants")
        return in_slot

    def masked(self, layer, keras_layer):
        if isinstance(keras_layer, _ZERO_KEEPING):
            return False
        if isinstance(keras_layer, _L.Rescaling):  # in a searchable slot its offset is a number
            return keras_layer.offset != 0
        if isinstance(keras_layer, ELEMENTWISE_ACTIVATIONS):
            return not maps_zero_to_zero(keras_layer)
        return True

    def exported(self, keras_layer):
        return not isinstance(keras_layer, _INFERENCE_IDENTITIES)

    def folds_as(self, keras_layer):
        return FOLDED_ACTIVATION if _fused_activation(keras_layer) else None

    def activates_elementwise(self, keras_layer):
        return (isinstance(keras_layer, ELEMENTWISE_ACTIVATIONS)
                and activation_name(keras_layer) not in CHANNEL_MIXING_ACTIVATIONS)

    def is_no_op(self, keras_layer):
        # StochasticDepth is not: it drops a residual branch in training, so only a residual branch has it.
        return (isinstance(keras_layer, _INFERENCE_IDENTITIES + (_L.ZeroPadding2D,))
                and type(keras_layer) is not StochasticDepth)

    def ends_in_softmax(self, keras_layer, output_rank):
        if type(keras_layer) is _L.Softmax:
            return keras_layer.axis in (-1, output_rank - 1)
        return super().ends_in_softmax(keras_layer, output_rank)

    def logits(self, keras_layer, features):
        return features  # a Softmax, or a softmax Activation, computes nothing else


class ReshapeRule(LayerRule):
    """Flatten of a spatial map and Reshape fold positions into the channels: they fix their input's
    slot and open a fixed one. Two keep the channels and their input's slot: a Flatten of a vector, and
    a Reshape that only adds or drops axes of size 1 before the channels (the squeeze-and-excitation
    gate's (batch, C) -> (batch, 1, 1, C)), whose target shape follows the width."""

    kind, classes, opens_slot = "reshape", (_L.Flatten, _L.Reshape), True

    @staticmethod
    def _keeps_channels(reader, layer):
        source = reader.inputs[layer.name][0]
        shape, source_shape = reader.shapes[layer.name], reader.shapes[source]
        if type(layer) is _L.Flatten:
            return len(shape) == len(source_shape)
        return shape[-1] == source_shape[-1] and all(d == 1 for d in (*shape[1:-1], *source_shape[1:-1]))

    def read(self, reader, layer, in_slots):
        if self._keeps_channels(reader, layer):
            return in_slots[0]
        reader.slots.fix(in_slots[0], f"{layer.name} ({type(layer).__name__}) reshapes the channels")
        return reader.slots.open(layer.name, reader.channels(layer.name), "reshaped")

    def narrowed(self, config, planned):
        if "target_shape" in config:  # a channel-keeping Reshape: the fixed ones keep their full width
            config["target_shape"] = (*config["target_shape"][:-1], planned.out_channels)
        return config


class ConcatenateRule(LayerRule):
    """Concatenate on the channel axis: its output is a slot of its inputs' slots, each keeping its own
    width (`WidthSlot.members`); its readers read the channels each member keeps."""

    kind, classes, multiple_inputs, concatenates = "concat", (_L.Concatenate,), True, True

    def read(self, reader, layer, in_slots):
        if not reader.is_channel_axis(layer.name, layer.axis):
            refuse(layer, f"concatenates along axis {layer.axis}; only the channel axis is supported")
        return reader.slots.concatenate(layer.name, in_slots)

    def out_channels(self, layer, in_channels, slot_width):
        return sum(in_channels)

    def supernet_width(self, inputs):
        """The channel mask of the kept channels of every input, one after the other."""
        return tf.concat([channel_mask(width, y.shape[-1]) for y, width in inputs], axis=0)


class MergeRule(LayerRule):
    """Add and the other elementwise merges of equal-width inputs: the reader's Add rule (tied or
    independent, `tas_keras.graph`) decides the slots."""

    kind, multiple_inputs, ties_inputs = "merge", True, True
    classes = (_L.Add, _L.Multiply, _L.Subtract, _L.Average, _L.Maximum, _L.Minimum)

    def read(self, reader, layer, in_slots):
        return reader.read_merge(layer, in_slots)

    def takes_folded(self, keras_layer):
        return (FOLDED_ACTIVATION,) if isinstance(keras_layer, (_L.Add, _L.Subtract, _L.Multiply)) else ()

    def adds_inputs(self, keras_layer):
        return type(keras_layer) is _L.Add


class ElementwiseOpRule(LayerRule):
    """keras.ops operations that act channel by channel, on one tensor and scalar constants (`x + 3.0`,
    `keras.ops.relu(x)`, `ops.clip(x, 0, 6)`: they follow its slot) or on two tensors of equal channels,
    broadcast over the positions (`x * gate`: they tie the two slots, as a merge does). The reader
    records where the constants go (`operands`); the derived network calls the same operation."""

    kind, ties_inputs, named_by_user = "op", True, False
    _BINARY = _existing(numpy_ops, ("Add", "Subtract", "Multiply", "Maximum", "Minimum", "Divide", "TrueDivide"))
    _DIVISIONS = _existing(numpy_ops, ("Divide", "TrueDivide"))
    classes = _BINARY + _existing(numpy_ops, ("Negative", "Abs", "Square", "Tanh", "Clip")) + _existing(
        nn_ops, ("Relu", "Relu6", "Sigmoid", "HardSigmoid", "Silu", "HardSilu", "Elu", "Selu", "Gelu", "LeakyRelu",
                 "Softplus", "Softsign", "Celu", "SparsePlus", "Squareplus"))

    def read(self, reader, layer, in_slots):
        node, name = reader.nodes_by_name[layer.name], layer.name
        operands = self._operands(layer, node)
        if node.arguments.kwargs:
            refuse(layer, f"called with keyword arguments {sorted(node.arguments.kwargs)}")
        if any(reader.channels(source) != reader.channels(name) for source in reader.inputs[name]):
            refuse(layer, "its inputs and output differ in channels: "
                          f"{[reader.channels(s) for s in reader.inputs[name]]} -> {reader.channels(name)}")
        tensors = [index for index, operand in enumerate(operands) if operand is None]
        if isinstance(layer, self._DIVISIONS) and tensors[-1] != 0:
            refuse(layer, "divides by a tensor, which a narrowed network would divide by zero-padded channels")
        for slot in in_slots[1:]:
            reader.slots.tie(in_slots[0], slot)
        return in_slots[0]

    @staticmethod
    def _operands(layer, node):
        operands = []
        for value in node.arguments.args:
            if isinstance(value, keras.KerasTensor):
                operands.append(None)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                operands.append(value)
            else:
                refuse(layer, f"an operand {value!r} that is neither a tensor nor a number")
        return tuple(operands)

    def details(self, layer, node):
        return {"operands": self._operands(layer, node)}

    def folds_as(self, keras_layer):
        return FOLDED_ACTIVATION if type(keras_layer).__name__ in ("Relu", "Relu6") else None

    def adds_inputs(self, keras_layer):
        return type(keras_layer) is numpy_ops.Add  # `x + y` (`x + 3.0` has one tensor input)

    def masked(self, layer, keras_layer):
        zeros = tf.zeros((1, 1))
        return bool(np.any(keras.ops.convert_to_numpy(self.call(keras_layer, [zeros] * 2, layer))))

    def copy(self, source, dtype, regularizer):
        return type(source).from_config(source.get_config())

    def rebuilt(self, source, planned, dtype):
        return type(source).from_config({**source.get_config(), "name": planned.layer.name})

    def call(self, layer, inputs, graph_layer, **call_arguments):
        tensors = iter(inputs)
        return layer(*(next(tensors) if operand is None else operand for operand in graph_layer.operands))


RULES = (InputRule(), GroupedConvRule(), ConvRule(), SeparableConvRule(), DenseRule(), DepthwiseRule(), BatchNormRule(),
         LayerNormRule(), LayerScaleRule(), PassThroughRule(), ReshapeRule(), ConcatenateRule(), MergeRule(),
         ElementwiseOpRule(), ConvTransposeRule())
_BY_CLASS = {cls: tuple(rule for rule in RULES if cls in rule.classes) for rule in RULES for cls in rule.classes}
_BY_KIND = {rule.kind: rule for rule in RULES}
# Keras' random image augmentation layers (RandomFlip, RandomRotation, ...): the identity at inference, and
# in training the project augments the images itself, so a model's own are left out when it is loaded.
# (RandomCrop is not one of them: at inference it crops.)
_RANDOM_AUGMENTATIONS = tuple(cls for name, cls in vars(_L).items()
                              if name.startswith("Random") and name != "RandomCrop" and isinstance(cls, type))


# Layer classes refused with their reason rather than as unknown.
_REFUSED_BECAUSE = {_L.GroupNormalization: "not supported: in a narrower network its groups would hold other channels"}


def matching_rule(layer):
    """The first rule of the layer's exact class that matches it, or None (`rule_for_layer` refuses it)."""
    return next((rule for rule in _BY_CLASS.get(type(layer), ()) if rule.matches(layer)), None)


def is_input_layer(layer):
    """Whether a Keras layer is a model's input (its rule `is_image_input`)."""
    rule = matching_rule(layer)
    return rule is not None and rule.is_image_input


def is_random_augmentation(layer):
    """Whether a Keras layer is a random image augmentation (`load_model` leaves them out)."""
    return isinstance(layer, _RANDOM_AUGMENTATIONS)


def preprocesses_pixels(layer):
    """Whether a Keras layer rescales or normalises pixel values (Rescaling, Normalization)."""
    return isinstance(layer, _PIXEL_PREPROCESSING)


def rule_for_layer(layer):
    """The rule of a Keras layer or keras.ops operation; refuses (UnsupportedModelError) a class without one."""
    rule = matching_rule(layer)
    if rule is None and not isinstance(layer, keras.layers.Layer):
        refuse(layer, "a keras.ops operation on symbolic tensors that the reader has no rule for; the element-wise "
                      "ones are read (x + 3.0, x * y, keras.ops.relu, ...): use a layer for the others")
    if rule is None:
        refuse(layer, _REFUSED_BECAUSE.get(type(layer), "this layer type is not supported by the graph reader"))
    return rule


def counting_rule(layer):
    """The rule that counts a Keras layer (`tas_keras.cost.count_model`), or None: its class has no rule,
    or its rule counts nothing."""
    rule = matching_rule(layer)
    return rule if rule is not None and rule.costed else None


def rule_for(layer):
    """The rule of a GraphLayer (by the kind its rule recorded)."""
    return _BY_KIND[layer.kind]


def rule_of_kind(kind):
    if kind not in _BY_KIND:
        raise ValueError(f"no layer rule of kind {kind!r}; the kinds are {sorted(_BY_KIND)}")
    return _BY_KIND[kind]
