"""One rule per Keras layer class: everything the search space knows about a layer (docs/design.md section 11).

A rule answers, for the layer classes it covers:
  - `read`: how the layer acts on width slots while `tas_keras.graph` reads a model: it opens a slot
    (Conv2D), follows its input's (BatchNormalization, activations), ties its inputs (merges) or fixes
    them (Concatenate), or refuses the layer with one line naming it;
  - `details`: the settings a `GraphLayer` records for the other questions (kernel, strides, ...);
  - `out_channels`: its output channels in a derived network, given its inputs' and its slot's widths;
  - `counts`: its FLOPs and parameters at given widths (`tas_keras.cost`; numbers or tensors);
  - `masked`: whether the supernet, which runs every layer at full width on zero-padded tensors, must
    zero the channels beyond the sampled width after it (a BN's beta, a bias, f(0) != 0);
  - `copy` and `rebuilt`: a fresh copy for the supernet, and the layer of a derived network with fewer
    channels (`tas_keras.derive`); `call`: how either is called on its inputs;
  - `permuted`: its weights with its input and output channels permuted (`tas_keras.importance`);
  - `exported`, `folds_as` and `takes_folded`: what the TFLite converter makes of it, which the latency
    tables time (`tas_keras.latency`): an op of its own, folded into the op before it (a BN into a conv's
    weights, a ReLU into a conv's or an Add's fused activation), or nothing (dropout at inference).
The reader, the supernet, derive, the cost and the importance ordering consult these rules and switch on
no layer class themselves: a layer class is supported by adding its rule here.

Besides layers, a functional model may hold keras.ops operations applied to symbolic tensors (`x + 3.0`,
`x * gate`, `keras.ops.hard_silu(x)`): the element-wise ones have a rule (`ElementwiseOpRule`) too.

`rule_for_layer(layer)` finds the rule of a Keras layer or operation (by exact class: a subclass may
compute something else), `rule_for(graph_layer)` the rule of a layer the reader recorded (by its kind).
"""

import math

import keras
# The classes of the keras.ops operations: Keras exports the functions only.
from keras.src.ops import nn as nn_ops
from keras.src.ops import numpy as numpy_ops
import numpy as np
import tensorflow as tf

from tas_keras.layers import SearchableConv, SearchableSeparableConv

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
    costed = False  # counted by `counts`
    searchable_conv = False  # where it opens a searchable slot the supernet runs it as a `searchable` conv

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
               depth_multiplier=1):
        """(FLOPs, parameters) at the given widths; the convention is `tas_keras.cost`'s."""
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
        config = source.get_config()
        config["dtype"] = dtype
        for key in config:
            if key.endswith("_regularizer") and key != "activity_regularizer":
                config[key] = regularizer
        return type(source).from_config(config)

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


class InputRule(LayerRule):
    kind, classes, opens_slot = "input", (_L.InputLayer,), True

    def read(self, reader, layer, in_slots):
        return reader.slots.open(layer.name, reader.channels(layer.name), "image channels")

    def exported(self, keras_layer):
        return False  # the image input is part of a latency table's fixed cost


class ConvRule(LayerRule):
    """Conv2D (groups 1): opens a searchable slot named after it; a softmax activation fixes it."""

    kind, classes, opens_slot, costed, searchable_conv = "conv", (_L.Conv2D,), True, True, True

    def read(self, reader, layer, in_slots):
        if getattr(layer, "groups", 1) != 1:
            refuse(layer, f"grouped convolution (groups={layer.groups}) is not supported")
        slot = reader.slots.open(layer.name, layer.filters)
        if activation_name(layer) in CHANNEL_MIXING_ACTIVATIONS:
            reader.slots.fix(slot, f"{layer.name} applies {activation_name(layer)} over the channels")
        return slot

    def details(self, layer, node):
        return {"kernel": tuple(layer.kernel_size), "strides": tuple(layer.strides), "use_bias": layer.use_bias}

    def counts(self, in_channels, out_channels, kernel=(), output_size=(), use_bias=False, affine=2,
               depth_multiplier=1):
        weights = math.prod(kernel) * in_channels * out_channels + (out_channels if use_bias else 0)
        return weights * math.prod(output_size), weights

    def filter_norms(self, keras_layer):
        return np.abs(keras.ops.convert_to_numpy(keras_layer.kernel)).sum(axis=(0, 1, 2))

    def takes_folded(self, keras_layer):
        return _conv_foldings(keras_layer)

    def searchable(self, source, candidates, normalize, epsilon, weight_decay):
        """The supernet's searchable conv for `source`, mixing the sampled widths of `candidates`."""
        config = source.get_config()
        return SearchableConv(
            source.filters, candidates, source.kernel_size, source.strides, weight_decay=weight_decay,
            padding=source.padding, dilation_rate=source.dilation_rate, normalize=normalize,
            use_bias=source.use_bias and not normalize, epsilon=epsilon,
            kernel_initializer=keras.initializers.get(config["kernel_initializer"]), name=source.name)

    def init_searchable(self, searchable, source):
        """Copies a trained source layer's weights into its searchable conv."""
        searchable.kernel.assign(source.kernel)
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

    kind, classes = "separable", (_L.SeparableConv2D,)

    def details(self, layer, node):
        return {**super().details(layer, node), "depth_multiplier": layer.depth_multiplier}

    def counts(self, in_channels, out_channels, kernel=(), output_size=(), use_bias=False, affine=2,
               depth_multiplier=1):
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


class DenseRule(ConvRule):
    """Dense on a vector: opens a fixed slot (Dense layers are not searched)."""

    kind, classes, searchable_conv = "dense", (_L.Dense,), False

    def read(self, reader, layer, in_slots):
        if len(reader.shapes[reader.inputs[layer.name][0]]) != 2:
            refuse(layer, "Dense on a spatial map; use a 1x1 Conv2D, or pool or flatten first")
        return reader.slots.open(layer.name, layer.units, "Dense layers are not searched")

    def details(self, layer, node):
        return {"use_bias": layer.use_bias}

    def counts(self, in_channels, out_channels, kernel=(), output_size=(), use_bias=False, affine=2,
               depth_multiplier=1):
        count = in_channels * out_channels + (out_channels if use_bias else 0)
        return count, count

    def narrowed(self, config, planned):
        config["units"] = planned.out_channels
        return config


class DepthwiseRule(LayerRule):
    """DepthwiseConv2D: follows its input's slot (depth_multiplier 1), else fixes it and opens a fixed one."""

    kind, classes, costed = "depthwise", (_L.DepthwiseConv2D,), True

    def read(self, reader, layer, in_slots):
        if layer.depth_multiplier == 1:
            return in_slots[0]
        reader.slots.fix(in_slots[0], f"{layer.name} has depth_multiplier {layer.depth_multiplier}")
        return reader.slots.open(layer.name, reader.channels(layer.name), "depth_multiplier > 1")

    def details(self, layer, node):
        return {"kernel": tuple(layer.kernel_size), "strides": tuple(layer.strides), "use_bias": layer.use_bias,
                "depth_multiplier": layer.depth_multiplier}

    def out_channels(self, layer, in_channels, slot_width):
        return in_channels[0] * layer.depth_multiplier

    def counts(self, in_channels, out_channels, kernel=(), output_size=(), use_bias=False, affine=2,
               depth_multiplier=1):
        weights = math.prod(kernel) * out_channels + (out_channels if use_bias else 0)
        return weights * math.prod(output_size), weights

    def masked(self, layer, keras_layer):
        return layer.use_bias

    def takes_folded(self, keras_layer):
        return _conv_foldings(keras_layer)

    def permuted(self, layer, weights, in_order, out_order):
        # With depth_multiplier > 1 its input slot is fixed, so in_order is None.
        return [_take(weights[0], in_order, 2)] + [_take(bias, in_order, 0) for bias in weights[1:]]


class BatchNormRule(LayerRule):
    """BatchNormalization over the channel axis: follows its input's slot; its gamma/beta are parameters."""

    kind, classes, costed = "batch_norm", (_L.BatchNormalization,), True

    def read(self, reader, layer, in_slots):
        if not reader.is_channel_axis(layer.name, layer.axis):
            refuse(layer, f"normalises axis {layer.axis}, not the channel axis")
        return in_slots[0]

    def details(self, layer, node):
        return {"affine": int(layer.center) + int(layer.scale)}

    def counts(self, in_channels, out_channels, kernel=(), output_size=(), use_bias=False, affine=2,
               depth_multiplier=1):
        return 0, affine * out_channels

    def masked(self, layer, keras_layer):
        return True

    def folds_as(self, keras_layer):
        return FOLDED_BATCH_NORM

    def permuted(self, layer, weights, in_order, out_order):
        return [_take(value, out_order, 0) for value in weights]


def _existing(module, names):
    return tuple(getattr(module, name) for name in names if hasattr(module, name))


ELEMENTWISE_ACTIVATIONS = (_L.Activation, _L.ReLU, _L.LeakyReLU, _L.ELU)
# Weightless layers that leave an all-zero channel zero.
_ZERO_KEEPING = (_L.MaxPooling2D, _L.AveragePooling2D, _L.GlobalAveragePooling2D, _L.GlobalMaxPooling2D,
                 _L.ZeroPadding2D, _L.Cropping2D, _L.UpSampling2D, _L.Dropout, _L.SpatialDropout2D,
                 _L.GaussianDropout, _L.ActivityRegularization, _L.Identity, _L.Resizing, _L.CenterCrop)
# Weightless layers that compute nothing at inference.
_INFERENCE_IDENTITIES = (_L.Dropout, _L.SpatialDropout2D, _L.GaussianDropout, _L.GaussianNoise, _L.AlphaDropout,
                         _L.ActivityRegularization, _L.Identity)


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
    noise, Identity, Rescaling and Normalization. One that holds per-channel constants it cannot slice
    (Normalization, a Rescaling with a vector scale or offset) or mixes the channels (softmax over them)
    fixes its slot."""

    kind = "pass"
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
    """Concatenate on the channel axis: fixes its inputs' slots and opens a fixed one."""

    kind, classes, opens_slot, multiple_inputs = "concat", (_L.Concatenate,), True, True

    def read(self, reader, layer, in_slots):
        if not reader.is_channel_axis(layer.name, layer.axis):
            refuse(layer, f"concatenates along axis {layer.axis}; only the channel axis is supported")
        for slot in in_slots:
            reader.slots.fix(slot, f"{layer.name} (Concatenate) reads it")
        return reader.slots.open(layer.name, reader.channels(layer.name), "concatenated")


class MergeRule(LayerRule):
    """Add and the other elementwise merges of equal-width inputs: the reader's Add rule (tied or
    independent, `tas_keras.graph`) decides the slots."""

    kind, multiple_inputs = "merge", True
    classes = (_L.Add, _L.Multiply, _L.Subtract, _L.Average, _L.Maximum, _L.Minimum)

    def read(self, reader, layer, in_slots):
        return reader.read_merge(layer, in_slots)

    def takes_folded(self, keras_layer):
        return (FOLDED_ACTIVATION,) if isinstance(keras_layer, (_L.Add, _L.Subtract, _L.Multiply)) else ()



class ElementwiseOpRule(LayerRule):
    """keras.ops operations that act channel by channel, on one tensor and scalar constants (`x + 3.0`,
    `keras.ops.relu(x)`, `ops.clip(x, 0, 6)`: they follow its slot) or on two tensors of equal channels,
    broadcast over the positions (`x * gate`: they tie the two slots, as a merge does). The reader
    records where the constants go (`operands`); the derived network calls the same operation."""

    kind = "op"
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


RULES = (InputRule(), ConvRule(), SeparableConvRule(), DenseRule(), DepthwiseRule(), BatchNormRule(), PassThroughRule(), ReshapeRule(),
         ConcatenateRule(), MergeRule(), ElementwiseOpRule())
_BY_CLASS = {cls: rule for rule in RULES for cls in rule.classes}
_BY_KIND = {rule.kind: rule for rule in RULES}
FOLLOWING_CLASSES = PassThroughRule.classes  # keep their input's channels one by one, weightless
# Keras' random image augmentation layers (RandomFlip, RandomRotation, ...): the identity at inference, and
# in training the project augments the images itself, so a model's own are left out when it is loaded.
# (RandomCrop is not one of them: at inference it crops.)
RANDOM_AUGMENTATION_CLASSES = tuple(cls for name, cls in vars(_L).items()
                                    if name.startswith("Random") and name != "RandomCrop" and isinstance(cls, type))
NORMALIZATION_CLASSES = BatchNormRule.classes


def rule_for_layer(layer):
    """The rule of a Keras layer or keras.ops operation; refuses (UnsupportedModelError) a class without one."""
    rule = _BY_CLASS.get(type(layer))
    if rule is None and not isinstance(layer, keras.layers.Layer):
        refuse(layer, "a keras.ops operation on symbolic tensors that the reader has no rule for; the element-wise "
                      "ones are read (x + 3.0, x * y, keras.ops.relu, ...): use a layer for the others")
    if rule is None:
        refuse(layer, "this layer type is not supported by the graph reader")
    return rule


def rule_for(layer):
    """The rule of a GraphLayer (by the kind its rule recorded)."""
    return _BY_KIND[layer.kind]


def rule_of_kind(kind):
    if kind not in _BY_KIND:
        raise ValueError(f"no layer rule of kind {kind!r}; the kinds are {sorted(_BY_KIND)}")
    return _BY_KIND[kind]
