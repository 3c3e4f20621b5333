"""Exact FLOP and parameter counts, in the paper's convention.

FLOPs are multiply-accumulates of Conv2D (k_h*k_w*C_in*C_out*H_out*W_out; with g groups, each reading
C_in/g channels: k_h*k_w*(C_in/g)*C_out*H_out*W_out), DepthwiseConv2D (k_h*k_w*C_out*H_out*W_out) and
Dense (in*out), plus one per output value for a bias (C_out*H_out*W_out, out), as the reference code's
counter counts them; BN, activations, pooling and additions are not counted. Parameters are the
trainable weights (kernels, biases, BN gamma and beta), as PyTorch's parameter count reports them; BN
moving statistics are not parameters.

Three routes, one rule per layer class (`layer_cost` asks `tas_keras.layer_rules`): `count_arch` (a CIFAR ArchConfig, without
building), `count_shape` (a point of any model's GraphSpace, without building) and `count_model` (a
built Keras model).
"""

import dataclasses

import keras

from tas_keras.graph import plain_graph
from tas_keras.layer_rules import rule_for, rule_of_kind
from tas_keras.models.cifar_resnet import network_plan


@dataclasses.dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str  # conv | grouped | depthwise | separable | dense | batch_norm
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
        """The conv and Dense layers, one line each; BN parameters are in the totals."""
        lines = [f"{'layer':<26} {'kernel':>6} {'stride':>6} {'in':>5} {'out':>5} {'output':>7} "
                 f"{'MFLOPs':>9} {'params':>9} {'%FLOPs':>7}"]
        for layer in self.layers:
            if layer.kind == "batch_norm":
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
               affine=2, depth_multiplier=1, group_width=1):
    """The cost of one layer of a kind whose rule counts it (`tas_keras.layer_rules`); `affine` is the
    number of per-channel trainable vectors of a BN, `group_width` a grouped conv's input channels per group."""
    rule = rule_of_kind(kind)
    if not rule.costed:
        raise ValueError(f"{name}: no cost rule for a layer of kind {kind!r}")
    flops, params = rule.counts(in_channels, out_channels, kernel, output_size, use_bias, affine, depth_multiplier,
                                group_width)
    return LayerCost(name, kind, in_channels, out_channels, tuple(kernel), tuple(stride), tuple(output_size),
                     flops, params)


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
    layers = []
    for derived in space.plan(shape).layers:
        layer = derived.layer
        if rule_for(layer).costed:
            layers.append(layer_cost(layer.name, layer.kind, derived.in_channels, derived.out_channels,
                                     layer.kernel, layer.strides, layer.output_size, layer.use_bias,
                                     layer.affine, layer.depth_multiplier, layer.group_width))
    return _report(layers)


def count_model(model):
    """Counts a built Keras model from its Conv2D (grouped too), SeparableConv2D, DepthwiseConv2D, Dense and
    BatchNormalization layers (those of its nested models too)."""
    layers = []
    for layer in plain_graph(model).layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, _, group_width, out_channels = layer.kernel.shape
            layers.append(layer_cost(layer.name, "conv" if layer.groups == 1 else "grouped",
                                     group_width * layer.groups, out_channels, layer.kernel_size, layer.strides,
                                     layer.output.shape[1:3], layer.use_bias, group_width=group_width))
        elif isinstance(layer, keras.layers.SeparableConv2D):
            _, _, in_channels, multiplier = layer.depthwise_kernel.shape
            layers.append(layer_cost(layer.name, "separable", in_channels, layer.pointwise_kernel.shape[-1],
                                     layer.kernel_size, layer.strides, layer.output.shape[1:3], layer.use_bias,
                                     depth_multiplier=multiplier))
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            _, _, in_channels, multiplier = layer.kernel.shape
            layers.append(layer_cost(layer.name, "depthwise", in_channels, in_channels * multiplier,
                                     layer.kernel_size, layer.strides, layer.output.shape[1:3],
                                     layer.use_bias))
        elif isinstance(layer, keras.layers.Dense):
            layers.append(layer_cost(layer.name, "dense", *layer.kernel.shape, use_bias=layer.use_bias))
        elif isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layers.append(layer_cost(layer.name, "batch_norm", channels, channels,
                                     affine=int(layer.center) + int(layer.scale)))
    return _report(layers)
