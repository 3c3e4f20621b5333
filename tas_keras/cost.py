"""Exact FLOP and parameter counts, in the paper's convention.

FLOPs are multiply-accumulates of Conv2D (k_h*k_w*C_in*C_out*H_out*W_out; with g groups, each reading
C_in/g channels: k_h*k_w*(C_in/g)*C_out*H_out*W_out), Conv2DTranspose (k_h*k_w*C_in*C_out*H_in*W_in: it
scatters every input position through its whole kernel), DepthwiseConv2D (k_h*k_w*C_out*H_out*W_out) and
Dense (in*out; on a feature map, a 1x1 conv: in*out*H_out*W_out), plus one per output value for a bias
(C_out*H_out*W_out, out), as the reference code's counter counts them; normalisations (BN,
LayerNormalization), per-channel scales (LayerScale), activations, pooling and additions are not
counted. Parameters are the trainable weights (kernels, biases, the gamma and beta of a normalisation, a
LayerScale's gamma), as PyTorch's parameter count reports them; BN moving statistics are not parameters.

Three routes, one rule per layer class (`layer_cost` asks `tas_keras.layer_rules`): `count_arch` (a CIFAR ArchConfig, without
building), `count_shape` (a point of any model's GraphSpace, without building) and `count_model` (a
built Keras model).
"""

import dataclasses

from tas_keras.graph import plain_graph
from tas_keras.graph_space import GraphLayer, output_size
from tas_keras.layer_rules import counting_rule, rule_for, rule_of_kind
from tas_keras.models.cifar_resnet import network_plan


@dataclasses.dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str  # conv | grouped | depthwise | separable | conv_transpose | dense | batch_norm | ...
    in_channels: int
    out_channels: int
    kernel: tuple = ()  # (k_h, k_w)
    stride: tuple = ()
    output_size: tuple = ()
    flops: int = 0
    params: int = 0


@dataclasses.dataclass(frozen=True)
class CostReport:
    flops: int
    params: int
    layers: tuple

    @property
    def mflops(self):
        return self.flops / 1e6

    def to_dict(self):
        return {"flops": self.flops, "params": self.params,
                "layers": [dataclasses.asdict(layer) for layer in self.layers]}

    def table(self):
        """The layers with FLOPs (convs and Dense), one line each; the parameters of normalisations and
        scales are in the totals."""
        lines = [f"{'layer':<26} {'kernel':>6} {'stride':>6} {'in':>5} {'out':>5} {'output':>7} "
                 f"{'MFLOPs':>9} {'params':>9} {'%FLOPs':>7}"]
        for layer in self.layers:
            if not layer.flops:
                continue
            size = "x".join(map(str, layer.output_size)) or "-"
            kernel = "x".join(map(str, layer.kernel)) or "-"
            stride = "x".join(map(str, sorted(set(layer.stride)))) or "-"
            lines.append(
                f"{layer.name:<26} {kernel:>6} {stride:>6} {layer.in_channels:>5} "
                f"{layer.out_channels:>5} {size:>7} {layer.flops / 1e6:>9.4f} {layer.params:>9,} "
                f"{100 * layer.flops / self.flops:>6.2f}%")
        lines.append(f"total: {self.flops / 1e6:.4f} MFLOPs ({self.flops:,} MACs), "
                     f"{self.params / 1e6:.4f} M params ({self.params:,}, BN included)")
        return "\n".join(lines)


def _report(layers):
    layers = tuple(layers)
    return CostReport(sum(layer.flops for layer in layers), sum(layer.params for layer in layers), layers)


def layer_cost(name, kind, in_channels, out_channels, kernel=(), stride=(), output_size=(), use_bias=False,
               affine=2, depth_multiplier=1, group_width=1, input_size=()):
    """The cost of one layer of a kind whose rule counts it (`tas_keras.layer_rules`); `affine` is the
    number of per-channel trainable vectors of a BN, `group_width` a grouped conv's input channels per group,
    `input_size` a transposed conv's input map (it costs per input position)."""
    rule = rule_of_kind(kind)
    if not rule.costed:
        raise ValueError(f"{name}: no cost rule for a layer of kind {kind!r}")
    flops, params = rule.counts(in_channels, out_channels, kernel, output_size, use_bias, affine, depth_multiplier,
                                group_width, input_size)
    return LayerCost(name, kind, in_channels, out_channels, tuple(kernel), tuple(stride), tuple(output_size),
                     flops, params)


def graph_layer_cost(layer, in_channels, out_channels):
    """The cost of a GraphLayer (whose rule counts it) at the given widths (numbers or tensors)."""
    return layer_cost(layer.name, layer.kind, in_channels, out_channels, layer.kernel, layer.strides,
                      layer.output_size, layer.use_bias, layer.affine, layer.depth_multiplier, layer.group_width,
                      layer.input_size)


def count_arch(arch):
    """Counts the network that `CifarResNet(arch)` builds, without building it."""
    plan = network_plan(arch)
    layers = []
    for conv in plan.convs():
        layers.append(layer_cost(conv.name, "conv", conv.in_channels, conv.out_channels,
                                 (conv.kernel, conv.kernel), (conv.stride, conv.stride), conv.output_size))
        if conv.batch_norm:
            layers.append(layer_cost(conv.bn_name, "batch_norm", conv.out_channels, conv.out_channels))
    layers.append(layer_cost("head_fc", "dense", plan.head_in_channels, arch.num_classes, use_bias=True))
    return _report(layers)


def count_shape(space, shape):
    """Counts the network `tas_keras.derive.derive_model(model, space, shape)` builds, without building it."""
    return _report(graph_layer_cost(derived.layer, derived.in_channels, derived.out_channels)
                   for derived in space.plan(shape).layers if rule_for(derived.layer).costed)


def count_model(model):
    """Counts a built Keras model (the layers of its nested models too) by the same rules, each layer as
    the graph reader records it: the layers whose rule counts them (convs, Dense, normalisations, scales);
    a layer of a class without a rule counts nothing."""
    layers = []
    for layer in plain_graph(model).layers:
        rule = counting_rule(layer)
        if rule is None:
            continue
        node = layer._inbound_nodes[0]
        record = GraphLayer(name=layer.name, class_name=type(layer).__name__, kind=rule.kind, inputs=(),
                            in_slots=(), out_slot="", output_size=output_size(node.outputs[0].shape),
                            **rule.details(layer, node))
        layers.append(graph_layer_cost(record, node.input_tensors[0].shape[-1], node.outputs[0].shape[-1]))
    return _report(layers)
