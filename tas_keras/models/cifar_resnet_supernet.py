"""The TAS supernet of a CIFAR ResNet: every width and every stage depth searchable.

It is laid out from the plan of the full network (`network_plan`), with the same layer names as the
plain model, so a derived shape maps back to these weights and the FLOP rules are shared.
"""

import keras
import numpy as np
import tensorflow as tf

from tas_keras.cost import count_arch
from tas_keras.layers import DepthMixer, SearchableConv
from tas_keras.models.cifar_resnet import WEIGHT_DECAY, ConvPlan, network_plan
from tas_keras.search_space import ArchConfig, candidate_widths, depth_choices

COST_METRICS = ("flops", "params")


def _conv_unit(conv, metric):
    """Cost of one input x one output channel of `conv`: k*k*H*W MACs, or k*k parameters."""
    unit = conv.kernel * conv.kernel
    return unit * int(np.prod(conv.output_size)) if metric == "flops" else unit


def _bn_unit(conv, metric):
    return 2 if metric == "params" and conv.batch_norm else 0


@keras.saving.register_keras_serializable(package="tas_keras")
class CifarResNetSupernet(keras.Model):
    """Args:
        arch: the full network to search in (an ArchConfig, e.g. `ArchConfig.full("resnet56")`).
        width_multiple: restrict candidate widths to multiples of this (1: the paper's space).
        weight_decay: coupled L2 on every weight (not on the architecture parameters).
    """

    def __init__(self, arch, width_multiple=1, weight_decay=WEIGHT_DECAY, **kwargs):
        if isinstance(arch, dict):
            arch = ArchConfig.from_dict(arch)
        if not arch.is_full():
            raise ValueError(f"the supernet is built from the full network, got a pruned {arch.name}")
        super().__init__(name=kwargs.pop("name", f"{arch.name}_supernet"), **kwargs)
        self.arch, self.width_multiple, self.weight_decay = arch, width_multiple, weight_decay
        self.plan = network_plan(arch)
        self.candidates = {slot.name: candidate_widths(slot.full_width, width_multiple)
                           for slot in arch.slots}

        def searchable(conv, relu, choice_of=None):
            return SearchableConv(
                conv.out_channels, self.candidates[choice_of or conv.name], conv.kernel, conv.stride,
                relu=relu, own_choice=choice_of is None,
                pool_first=conv.pool_first, weight_decay=weight_decay, name=conv.name)

        self.stem = searchable(self.plan.stem, relu=True)
        self.blocks = []
        for block in self.plan.blocks:
            convs = [searchable(c, relu=i < len(block.convs) - 1) for i, c in enumerate(block.convs)]
            shortcut = block.shortcut and searchable(block.shortcut, relu=False, choice_of=convs[-1].name)
            self.blocks.append((block, convs, shortcut))
        self.stages = []
        for stage in range(1, len(arch.stage_blocks) + 1):
            members = [b for b in self.blocks if b[0].name.startswith(f"s{stage}_")]
            mixer = DepthMixer(depth_choices(len(members)), members[-1][1][-1].candidates,
                               name=f"s{stage}_depth")
            self.stages.append((members, mixer))
        decay = keras.regularizers.L2(weight_decay / 2) if weight_decay else None
        self.head = keras.layers.Dense(arch.num_classes, kernel_initializer=keras.initializers.RandomNormal(
            0.0, 0.01), kernel_regularizer=decay, bias_regularizer=decay, name="head_fc")
        self.width_choices = [self.stem] + [c for _, convs, _ in self.blocks for c in convs]
        self(tf.zeros((1, *arch.input_shape)), self.uniform_sample())

    @property
    def image_shape(self):
        return self.arch.input_shape

    def full_cost(self, metric="flops"):
        """The cost of the full network: the base of the cost ratios."""
        full = count_arch(self.arch)
        return full.flops if metric == "flops" else full.params

    @property
    def arch_variables(self):
        return ([conv.alpha for conv in self.width_choices if conv.alpha is not None]
                + [mixer.beta for _, mixer in self.stages])

    @property
    def weight_variables(self):
        arch = {id(v) for v in self.arch_variables}
        return [v for v in self.trainable_variables if id(v) not in arch]

    def uniform_sample(self):
        """A fixed sample (the two widest candidates, equal weights; uniform depths), for building."""
        widths = {conv.name: (tf.constant([len(conv.candidates) - 1, max(0, len(conv.candidates) - 2)]),
                              tf.constant([0.5, 0.5])) for conv in self.width_choices}
        depths = [tf.fill([len(mixer.depth_choices)], 1.0 / len(mixer.depth_choices))
                  for _, mixer in self.stages]
        return widths, depths

    def sample(self, tau, seed):
        """One architecture sample: two widths + weights per conv, soft weights per stage depth."""
        widths = {conv.name: conv.sample(tau, tf.random.experimental.stateless_fold_in(seed, i))
                  for i, conv in enumerate(self.width_choices)}
        offset = len(self.width_choices)
        depths = [mixer.sample(tau, tf.random.experimental.stateless_fold_in(seed, offset + s))
                  for s, (_, mixer) in enumerate(self.stages)]
        return widths, depths

    def call(self, images, sample):
        widths, depths = sample
        x, width = self.stem(images, *widths[self.stem.name])
        for (members, mixer), stage_weights in zip(self.stages, depths):
            outputs, output_widths = [], []
            for _, convs, shortcut in members:
                residual, residual_width = x, width
                for conv in convs:
                    x, width = conv(x, *widths[conv.name])
                if shortcut is not None:
                    residual, _ = shortcut(residual, *widths[convs[-1].name])
                else:
                    width = tf.maximum(width, residual_width)  # zero-padded add: the wider one wins
                x = tf.nn.relu(residual + x)
                outputs.append(x)
                output_widths.append(width)
            x, width = mixer(outputs, output_widths, stage_weights)
        return self.head(tf.reduce_mean(x, axis=[1, 2]))

    def expected_cost(self, metric="flops"):
        """E(A): per conv k*k*H*W*E[C_in]*E[C_out] under softmax(alpha), each block weighted by
        P(its stage keeps it) under softmax(beta), plus the classifier (DESIGN.md section 6)."""
        if metric not in COST_METRICS:
            raise ValueError(f"metric must be one of {COST_METRICS}, got {metric!r}")
        expected = {conv.name: conv.expected_width() for conv in self.width_choices}

        def conv_cost(conv, in_width, out_width):
            return (_conv_unit(conv, metric) * in_width + _bn_unit(conv, metric)) * out_width

        total = conv_cost(self.plan.stem, float(self.arch.input_shape[-1]), expected["stem_conv"])
        width = expected["stem_conv"]
        for members, mixer in self.stages:
            keep = mixer.keep_probabilities(len(members))
            for index, (block, _, _) in enumerate(members):
                block_cost, block_in = 0.0, width
                for conv in block.convs:
                    block_cost += conv_cost(conv, width, expected[conv.name])
                    width = expected[conv.name]
                if block.shortcut is not None:
                    block_cost += conv_cost(block.shortcut, block_in, width)
                total += keep[index] * block_cost
        return total + (width + 1.0) * self.arch.num_classes

    def argmax_widths(self):
        return {conv.name: tf.gather(tf.constant(conv.candidates, tf.int64), conv.argmax_index())
                for conv in self.width_choices}

    def argmax_cost(self, metric="flops"):
        """F(A): the exact cost of the plain network derived by argmax, as an int64 tensor."""
        if metric not in COST_METRICS:
            raise ValueError(f"metric must be one of {COST_METRICS}, got {metric!r}")
        widths = self.argmax_widths()

        def conv_cost(conv, in_width, out_width):
            return (_conv_unit(conv, metric) * in_width + _bn_unit(conv, metric)) * out_width

        total = conv_cost(self.plan.stem, tf.constant(self.arch.input_shape[-1], tf.int64),
                          widths["stem_conv"])
        width = widths["stem_conv"]
        for members, mixer in self.stages:
            depth = tf.cast(mixer.argmax_depth(), tf.int64)
            block_outputs = []
            for index, (block, _, _) in enumerate(members, start=1):
                block_in, block_cost = width, tf.constant(0, tf.int64)
                for conv in block.convs:
                    block_cost += conv_cost(conv, width, widths[conv.name])
                    width = widths[conv.name]
                if block.shortcut is not None:
                    block_cost += conv_cost(block.shortcut, block_in, width)
                else:  # the plain net projects an identity block whose widths differ (conv1x1 + BN)
                    projection = ConvPlan(f"{block.name}_shortcut_conv", 1, 1, 0, 0, block.convs[-1].output_size)
                    block_cost += tf.where(block_in != width, conv_cost(projection, block_in, width), 0)
                total += tf.where(index <= depth, block_cost, tf.constant(0, tf.int64))
                block_outputs.append(width)
            width = tf.gather(tf.stack(block_outputs), depth - 1)  # the next stage reads the last kept block
        return total + (width + 1) * self.arch.num_classes

    def derive(self):
        """The argmax shape as an ArchConfig."""
        widths = self.argmax_widths()
        return self.arch.replace(
            widths=[int(widths[slot.name]) for slot in self.arch.slots],
            stage_blocks=[int(mixer.argmax_depth()) for _, mixer in self.stages],
            provenance={"source": "tas_search", "width_multiple": self.width_multiple})

    def get_config(self):
        return {"name": self.name, "arch": self.arch.to_dict(), "width_multiple": self.width_multiple,
                "weight_decay": self.weight_decay}

