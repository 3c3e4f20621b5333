"""The plain CIFAR ResNet of docs/design.md section 3, built from any ArchConfig.

`network_plan` resolves an ArchConfig into the layers that are really built (kept blocks only, each
conv's actual input width, the shortcut each block needs); the Keras builder and the FLOP counter both
read that plan, so the counted network is the built one.
"""

import dataclasses
import math

import keras

from tas_keras.layers import BN_EPSILON, BN_MOMENTUM, he_normal_fan_out
from tas_keras.search_space import ArchConfig

WEIGHT_DECAY = 5e-4


@dataclasses.dataclass(frozen=True)
class ConvPlan:
    """One Conv2D (+ BatchNorm) of the built network."""

    name: str
    kernel: int
    stride: int
    in_channels: int
    out_channels: int
    input_size: tuple  # (height, width) the conv sees, after `pool_first`
    batch_norm: bool = True
    pool_first: bool = False  # the stride-2 shortcut averages 2x2 before its 1x1 conv

    @property
    def output_size(self):
        return tuple(math.ceil(d / self.stride) for d in self.input_size)

    @property
    def bn_name(self):
        return self.name.replace("conv", "bn")


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    name: str
    convs: tuple  # the residual branch, in order
    shortcut: ConvPlan = None  # None: identity

    @property
    def out_channels(self):
        return self.convs[-1].out_channels


@dataclasses.dataclass(frozen=True)
class NetworkPlan:
    arch: ArchConfig
    stem: ConvPlan
    blocks: tuple

    @property
    def head_in_channels(self):
        return self.blocks[-1].out_channels

    def convs(self):
        yield self.stem
        for block in self.blocks:
            yield from block.convs
            if block.shortcut is not None:
                yield block.shortcut


def network_plan(arch):
    """The layers built for `arch`: dropped blocks removed, the next stage fed by the last kept one."""
    slots, widths = arch.slots, arch.widths
    size = tuple(arch.input_shape[:2])
    stem = ConvPlan("stem_conv", slots[0].kernel, 1, arch.input_shape[2], widths[0], size)
    channels, blocks = stem.out_channels, []
    per_block = (len(slots) - 1) // (3 * arch.num_blocks)
    for start in range(1, len(slots), per_block):
        block_slots = slots[start:start + per_block]
        first = block_slots[0]
        if first.block > arch.stage_blocks[first.stage - 1]:
            continue
        prefix = first.name.rsplit("_conv_", 1)[0]
        block_in, convs = channels, []
        for slot, width in zip(block_slots, widths[start:start + per_block]):
            convs.append(ConvPlan(slot.name, slot.kernel, slot.stride, channels, width, size))
            channels, size = width, convs[-1].output_size
        if any(slot.stride > 1 for slot in block_slots):
            shortcut = ConvPlan(f"{prefix}_shortcut_conv", 1, 1, block_in, channels, size,
                                batch_norm=False, pool_first=True)
        elif block_in != channels:
            shortcut = ConvPlan(f"{prefix}_shortcut_conv", 1, 1, block_in, channels, size)
        else:
            shortcut = None
        blocks.append(BlockPlan(prefix, tuple(convs), shortcut))
    return NetworkPlan(arch, stem, tuple(blocks))


def _regularizer(weight_decay):
    # PyTorch's coupled weight decay adds wd * w to the gradient; L2(l) adds 2 * l * w.
    return keras.regularizers.L2(weight_decay / 2) if weight_decay else None


def _conv_bn(x, conv, weight_decay, relu):
    reg = _regularizer(weight_decay)
    if conv.pool_first:
        x = keras.layers.AveragePooling2D(2, padding="same", name=conv.name.replace("conv", "pool"))(x)
    x = keras.layers.Conv2D(
        conv.out_channels, conv.kernel, strides=conv.stride, padding="same", use_bias=False,
        kernel_initializer=he_normal_fan_out(),
        kernel_regularizer=reg, name=conv.name)(x)
    if conv.batch_norm:
        x = keras.layers.BatchNormalization(
            momentum=BN_MOMENTUM, epsilon=BN_EPSILON, gamma_regularizer=reg, beta_regularizer=reg,
            name=conv.bn_name)(x)
    if relu:
        x = keras.layers.ReLU(name=conv.name.replace("conv", "relu"))(x)
    return x


@keras.saving.register_keras_serializable(package="tas_keras")
class CifarResNet(keras.Model):
    """A plain (searched or full) CIFAR ResNet as a functional Keras model.

    Args:
        arch: the ArchConfig (or its dict) to build.
        weight_decay: coupled L2 on every weight, BN and the classifier included; 0 disables it.
    """

    def __init__(self, arch, weight_decay=WEIGHT_DECAY, **kwargs):
        if isinstance(arch, dict):
            arch = ArchConfig.from_dict(arch)
        if not isinstance(arch, ArchConfig):
            raise TypeError(f"arch must be an ArchConfig or its dict, got {type(arch).__name__}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        plan = network_plan(arch)

        inputs = keras.Input(shape=arch.input_shape, name="image")
        x = _conv_bn(inputs, plan.stem, weight_decay, relu=True)
        for block in plan.blocks:
            shortcut = x
            for index, conv in enumerate(block.convs):
                x = _conv_bn(x, conv, weight_decay, relu=index < len(block.convs) - 1)
            if block.shortcut is not None:
                shortcut = _conv_bn(shortcut, block.shortcut, weight_decay, relu=False)
            x = keras.layers.Add(name=f"{block.name}_add")([shortcut, x])
            x = keras.layers.ReLU(name=f"{block.name}_out")(x)
        x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
        reg = _regularizer(weight_decay)
        # floatx (float32) under a mixed dtype policy too (Keras' advice for a model's output layer): the losses'
        # softmax, KD's included, must not read low-precision logits.
        outputs = keras.layers.Dense(
            arch.num_classes, kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
            kernel_regularizer=reg, bias_regularizer=reg, dtype=keras.config.floatx(), name="head_fc")(x)
        kwargs.setdefault("name", arch.name)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.arch = arch
        self.weight_decay = weight_decay

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "arch": self.arch.to_dict(),
                "weight_decay": self.weight_decay}
