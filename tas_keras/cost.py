"""Exact FLOP and parameter counts, in the paper's convention.

FLOPs are multiply-accumulates of Conv2D (k*k*C_in*C_out*H_out*W_out) and Dense (in*out + out); BN,
ReLU, pooling and additions are not counted. Parameters are the trainable weights (conv and Dense
kernels, Dense bias, BN gamma and beta), as PyTorch's parameter count reports them; BN moving
statistics are not parameters.
"""

import dataclasses
import math

import keras

from tas_keras.models.cifar_resnet import network_plan


@dataclasses.dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str  # conv | dense | batch_norm
    in_channels: int
    out_channels: int
    kernel: int = 0
    stride: int = 1
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
            kernel = f"{layer.kernel}x{layer.kernel}" if layer.kernel else "-"
            lines.append(
                f"{layer.name:<26} {kernel:>6} {layer.stride:>6} {layer.in_channels:>5} "
                f"{layer.out_channels:>5} {size:>7} {layer.flops / 1e6:>9.4f} {layer.params:>9,} "
                f"{100 * layer.flops / self.flops:>6.2f}%")
        lines.append(f"total: {self.flops / 1e6:.4f} MFLOPs ({self.flops:,} MACs), "
                     f"{self.params / 1e6:.4f} M params ({self.params:,}, BN included)")
        return "\n".join(lines)


def _report(layers):
    layers = tuple(layers)
    return CostReport(sum(layer.flops for layer in layers), sum(layer.params for layer in layers), layers)


def _conv_cost(name, kernel, stride, in_channels, out_channels, output_size):
    macs = kernel * kernel * in_channels * out_channels
    return LayerCost(name, "conv", in_channels, out_channels, kernel, stride, tuple(output_size),
                     macs * math.prod(output_size), macs)


def _dense_cost(name, in_units, out_units):
    count = in_units * out_units + out_units
    return LayerCost(name, "dense", in_units, out_units, flops=count, params=count)


def count_arch(arch):
    """Counts the network that `CifarResNet(arch)` builds, without building it."""
    plan = network_plan(arch)
    layers = []
    for conv in plan.convs():
        layers.append(_conv_cost(conv.name, conv.kernel, conv.stride, conv.in_channels,
                                 conv.out_channels, conv.output_size))
        if conv.batch_norm:
            layers.append(LayerCost(conv.bn_name, "batch_norm", conv.out_channels, conv.out_channels,
                                    params=2 * conv.out_channels))
    layers.append(_dense_cost("head_fc", plan.head_in_channels, arch.num_classes))
    return _report(layers)


def count_model(model):
    """Counts a built functional Keras model from its Conv2D, Dense and BatchNormalization layers."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel_h, kernel_w, in_channels, out_channels = layer.kernel.shape
            if kernel_h != kernel_w or layer.groups != 1:
                raise ValueError(f"{layer.name}: only square, ungrouped convolutions are counted")
            cost = _conv_cost(layer.name, kernel_h, layer.strides[0], in_channels, out_channels,
                              layer.output.shape[1:3])
            bias = out_channels if layer.use_bias else 0
            layers.append(dataclasses.replace(cost, params=cost.params + bias))
        elif isinstance(layer, keras.layers.Dense):
            layers.append(_dense_cost(layer.name, *layer.kernel.shape))
        elif isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layers.append(LayerCost(layer.name, "batch_norm", channels, channels,
                                    params=sum(math.prod(w.shape) for w in layer.trainable_weights)))
    return _report(layers)
