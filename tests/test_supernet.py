"""The graph supernet: the reference's CIFAR supernet reproduced, exact costs, the source model at the full sample."""

import math

import keras
from keras.src.applications.convnext import LayerScale
import numpy as np
import pytest
import tensorflow as tf

from tas_keras.cost import count_model, count_shape
from tas_keras.derive import derive_model
from tas_keras.cifar_shapes import arch_from_shape
from tas_keras.graph import read_model
from tas_keras.graph_space import INDEPENDENT, TIED
from tas_keras.layers import SearchableConv, SearchableConvTranspose
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.models.registry import build_model
from tas_keras.search import TASSearchModel, convergence
from tas_keras.search_space import ArchConfig, candidate_widths
from tas_keras.supernet import GraphSupernet, build_supernet

L = keras.layers


def user_cnn():
    """A small functional CNN: a stage of two identity blocks (a depthwise conv with bias and its BN, a
    1x1 conv with bias and no BN, a widening 1x1 conv with an activation), a strided conv followed by a
    sigmoid (non-zero at 0), a Dense head."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(x))
    y = L.DepthwiseConv2D(3, padding="same", name="b1_dw")(x)
    y = L.ReLU(6.0, name="b1_dw_relu")(L.BatchNormalization(name="b1_dw_bn")(y))
    x = L.Add(name="b1_add")([x, L.Conv2D(8, 1, name="b1_project")(y)])
    y = L.Conv2D(16, 1, activation="relu", name="b2_expand")(x)
    y = L.BatchNormalization(name="b2_bn")(L.Conv2D(8, 3, padding="same", use_bias=False, name="b2_conv")(y))
    x = L.Add(name="b2_add")([x, y])
    x = L.Activation("sigmoid", name="down_gate")(L.Conv2D(12, 3, strides=2, padding="same", name="down")(x))
    outputs = L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="pool")(x))
    return keras.Model(inputs, outputs, name="user_cnn")


def ops_cnn():
    """MobileNetV3's and EfficientNet's idioms: hard-swish written with keras.ops (x * relu6(x + 3) / 6),
    ops.silu, an EfficientNet squeeze-excitation gate (pool, Reshape to 1x1, reduce and sigmoid expand
    convs) multiplied into the block with `*`, in a stage of two identity blocks."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.BatchNormalization(name="stem_bn")(L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs))
    x = x * keras.ops.relu6(x + 3.0) / 6.0
    for b in ("b1", "b2"):
        y = L.Conv2D(16, 1, use_bias=False, name=f"{b}_expand")(x)
        y = keras.ops.silu(L.BatchNormalization(name=f"{b}_expand_bn")(y))
        y = L.BatchNormalization(name=f"{b}_dw_bn")(L.DepthwiseConv2D(3, padding="same", name=f"{b}_dw")(y))
        y = keras.ops.silu(y)
        gate = L.Reshape((1, 1, 16), name=f"{b}_se_reshape")(L.GlobalAveragePooling2D(name=f"{b}_se_pool")(y))
        gate = L.Conv2D(4, 1, activation="relu", name=f"{b}_se_reduce")(gate)
        y = y * L.Conv2D(16, 1, activation="sigmoid", name=f"{b}_se_expand")(gate)
        y = L.BatchNormalization(name=f"{b}_project_bn")(L.Conv2D(8, 1, use_bias=False, name=f"{b}_project")(y))
        x = L.Add(name=f"{b}_add")([x, y])
    outputs = L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="pool")(x))
    return keras.Model(inputs, outputs, name="ops_cnn")


def sep_cnn():
    """Xception's idiom: SeparableConv2D (one with depth_multiplier 2 and a BN, one with a bias and no
    BN) in a stage of two identity blocks."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(L.Conv2D(8, 3, padding="same", name="stem")(inputs)))
    for b in ("b1", "b2"):
        y = L.SeparableConv2D(16, 3, padding="same", depth_multiplier=2, use_bias=False, name=f"{b}_sep1")(x)
        y = L.ReLU(name=f"{b}_relu")(L.BatchNormalization(name=f"{b}_sep1_bn")(y))
        y = L.SeparableConv2D(8, 3, padding="same", name=f"{b}_sep2")(y)
        x = L.Add(name=f"{b}_add")([x, y])
    outputs = L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="pool")(x))
    return keras.Model(inputs, outputs, name="sep_cnn")


def dense_cnn():
    """DenseNet's idiom: each layer's new channels concatenated to what came before (nested
    Concatenates), every Concatenate read by BN + ReLU + conv, a transition, a BN before the head."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(6, 3, padding="same", use_bias=False, name="stem")(inputs)
    for block, layers in (("d1", 2), ("d2", 1)):
        for index in range(1, layers + 1):
            name = f"{block}_l{index}"
            y = L.ReLU(name=f"{name}_relu")(L.BatchNormalization(name=f"{name}_bn")(x))
            y = L.Conv2D(4, 3, padding="same", use_bias=False, name=f"{name}_conv")(y)
            x = L.Concatenate(name=f"{name}_concat")([x, y])
        if block == "d1":
            x = L.ReLU(name="transition_relu")(L.BatchNormalization(name="transition_bn")(x))
            x = L.AveragePooling2D(2, name="transition_pool")(L.Conv2D(8, 1, name="transition_conv")(x))
    x = L.ReLU(name="head_relu")(L.BatchNormalization(name="head_bn")(x))
    outputs = L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="pool")(x))
    return keras.Model(inputs, outputs, name="dense_cnn")


def grouped_cnn():
    """RegNet's X blocks (ResNeXt's): a 1x1 conv, a grouped 3x3 conv (4 groups of 4) and a 1x1 conv, added to
    a shortcut. A downsampling block (a strided grouped conv, then a second one of 2 groups of 8 with a
    bias and no BN, whose outputs beyond a narrower width the supernet must zero: its last 1x1 conv has
    no BN that would cancel them either; a projection shortcut), then a stage of two identity blocks."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(
        L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)))

    def conv_bn(y, filters, kernel, name, strides=1, groups=1, relu=True):
        y = L.Conv2D(filters, kernel, strides=strides, groups=groups, padding="same", use_bias=False, name=name)(y)
        y = L.BatchNormalization(name=f"{name}_bn")(y)
        return L.ReLU(name=f"{name}_relu")(y) if relu else y

    for b in ("down", "b1", "b2"):
        stride = 2 if b == "down" else 1
        skip = conv_bn(x, 12, 1, f"{b}_skip", strides=2, relu=False) if b == "down" else x
        y = conv_bn(x, 16, 1, f"{b}_conv_1x1_1")
        y = conv_bn(y, 16, 3, f"{b}_conv_3x3", strides=stride, groups=4)
        if b == "down":
            y = L.Conv2D(16, 3, groups=2, padding="same", activation="relu", name="down_conv_3x3_wide_groups")(y)
            y = L.Conv2D(12, 1, name="down_conv_1x1_2")(y)
        else:
            y = conv_bn(y, 12, 1, f"{b}_conv_1x1_2", relu=False)
        x = L.ReLU(name=f"{b}_exit_relu")(L.Add(name=f"{b}_add")([y, skip]))
    outputs = L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="pool")(x))
    return keras.Model(inputs, outputs, name="grouped_cnn")


def convnext_cnn():
    """keras.applications.ConvNeXtTiny's idioms: a patchify stem (a strided conv and a LayerNormalization);
    blocks of a depthwise 7x7 conv written as a Conv2D whose groups are its channels, a LayerNormalization,
    a Dense on the feature map that widens 4x, gelu, a Dense back, a LayerScale and the residual add; a
    downsampling LayerNormalization and strided conv; a head of pooling, LayerNormalization and Dense. The
    first and last blocks add with `x + y`, as keras.applications writes it, the middle two with an Add
    layer: the first three are a stage whose depth is searched, the last a stage of its own."""
    inputs = keras.Input((16, 16, 3), name="image")
    x = L.LayerNormalization(epsilon=1e-6, name="stem_ln")(L.Conv2D(8, 2, strides=2, name="stem")(inputs))

    def block(x, name, add):
        width = x.shape[-1]
        y = L.Conv2D(width, 7, padding="same", groups=width, name=f"{name}_dw")(x)
        y = L.Dense(4 * width, name=f"{name}_expand")(L.LayerNormalization(epsilon=1e-6, name=f"{name}_ln")(y))
        y = L.Dense(width, name=f"{name}_project")(L.Activation("gelu", name=f"{name}_gelu")(y))
        y = LayerScale(1e-6, width, name=f"{name}_scale")(y)
        return L.Add(name=f"{name}_add")([x, y]) if add else x + y

    x = block(block(block(x, "b1", add=False), "b2", add=True), "b3", add=True)
    x = L.Conv2D(12, 2, strides=2, name="down")(L.LayerNormalization(epsilon=1e-6, name="down_ln")(x))
    x = block(x, "b4", add=False)
    x = L.LayerNormalization(epsilon=1e-6, name="head_ln")(L.GlobalAveragePooling2D(name="pool")(x))
    return keras.Model(inputs, L.Dense(4, name="head")(x), name="convnext_cnn")


def unet_cnn():
    """A small U-Net for per-pixel classes: three encoder levels of conv-BN-ReLU with max pooling between
    them and a bottleneck at 4x4; a decoder that goes up by a strided Conv2DTranspose (with its BN), then by
    nearest and by bilinear UpSampling2D each followed by a conv (with a bias and no BN), each step
    concatenated with the encoder's map of its size (the skips; one with the skip first); a 1x1 conv head
    of 3 class logits per pixel."""
    inputs = keras.Input((32, 32, 3), name="image")

    def conv_bn_relu(x, filters, name):
        x = L.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
        return L.ReLU(name=f"{name}_relu")(L.BatchNormalization(name=f"{name}_bn")(x))

    enc1 = conv_bn_relu(inputs, 6, "enc1")
    enc2 = conv_bn_relu(L.MaxPooling2D(name="pool1")(enc1), 8, "enc2")
    enc3 = conv_bn_relu(L.MaxPooling2D(name="pool2")(enc2), 10, "enc3")
    x = conv_bn_relu(L.MaxPooling2D(name="pool3")(enc3), 12, "bottleneck")
    x = L.Conv2DTranspose(10, 3, strides=2, padding="same", use_bias=False, name="up3")(x)
    x = L.ReLU(name="up3_relu")(L.BatchNormalization(name="up3_bn")(x))
    x = conv_bn_relu(L.Concatenate(name="skip3")([x, enc3]), 10, "dec3")
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="up2_conv")(L.UpSampling2D(name="up2")(x))
    x = conv_bn_relu(L.Concatenate(name="skip2")([enc2, x]), 8, "dec2")
    x = L.UpSampling2D(interpolation="bilinear", name="up1")(x)
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="up1_conv")(x)
    x = conv_bn_relu(L.Concatenate(name="skip1")([x, enc1]), 6, "dec1")
    return keras.Model(inputs, L.Conv2D(3, 1, name="head")(x), name="unet_cnn")


def _source(name):
    """A source model with non-trivial affines (BN, LayerNormalization, LayerScale) and biases, so a wrong
    copy shows."""
    keras.utils.set_random_seed(0)
    if name == "user_cnn":
        model = user_cnn()
    elif name == "ops_cnn":
        model = ops_cnn()
    elif name == "sep_cnn":
        model = sep_cnn()
    elif name == "dense_cnn":
        model = dense_cnn()
    elif name == "grouped_cnn":
        model = grouped_cnn()
    elif name == "convnext_cnn":
        model = convnext_cnn()
    elif name == "unet_cnn":
        model = unet_cnn()
    elif name == "resnet20":
        model = CifarResNet(ArchConfig.full("resnet20", input_shape=(8, 8, 3)))
    else:
        model = build_model(name, (32, 32, 3), 3)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if getattr(layer, "gamma", None) is not None:
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
        if getattr(layer, "beta", None) is not None:
            layer.beta.assign(rng.normal(0, 0.5, layer.beta.shape))
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.5, layer.bias.shape))
    return model


_BUILT = {}


def _supernet(name):
    """(source model, its space, its supernet initialised from it), built once per module; a name ending
    in "_independent" reads the model in independent mode, as the CIFAR ResNets always are."""
    if name not in _BUILT:
        model = _source(name.removesuffix("_independent"))
        independent = name == "resnet20" or name.endswith("_independent")
        space = read_model(model, add_mode=INDEPENDENT if independent else TIED)
        supernet = GraphSupernet(model, space)
        supernet.init_from_source(model)
        _BUILT[name] = model, space, supernet
    return _BUILT[name]


def _randomise_architecture(supernet, seed):
    for i, variable in enumerate(supernet.arch_variables):
        variable.assign(tf.random.stateless_normal(variable.shape, [seed, i]))


def _one_hot_sample(supernet, shape):
    """The sample of one shape: a single width per slot (weight 1), one-hot depths."""
    widths = {}
    for slot, choice in zip(supernet.space.searchable_slots, supernet.width_choices):
        index = choice.candidates.index(shape.widths[slot.name])
        widths[choice.name] = (tf.constant([index, index]), tf.constant([1.0, 0.0]))
    depths = [tf.one_hot(mixer.depth_choices.index(shape.depths[stage.name]), len(mixer.depth_choices))
              for stage, mixer in supernet.stages]
    return widths, depths


def _log_probabilities(outputs, model):
    """keras.applications models end in a softmax: compare them in log space, the others as logits."""
    return np.log(outputs) if model.layers[-1].get_config().get("activation") == "softmax" else outputs


# The CIFAR ResNets: the graph supernet of the independent-mode space is the reference's CIFAR supernet.

@pytest.fixture(scope="module")
def cifar_supernet():
    """The search's supernet of ResNet-20 at 8x8 (independent Adds, every conv normalised), with
    non-trivial per-candidate BN affines."""
    model = CifarResNet(ArchConfig.full("resnet20", input_shape=(8, 8, 3)))
    supernet = build_supernet("resnet20", model)
    for i, variable in enumerate(v for v in supernet.weight_variables if "gammas" in v.path or "betas" in v.path):
        variable.assign(tf.random.stateless_uniform(variable.shape, [9, i], 0.5, 1.5))
    return supernet


def _softmax(logits):
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _design_expected_flops(supernet):
    """E(A) of a basic-block CIFAR ResNet at 8x8 as docs/design.md section 6 writes it: per conv
    k*k*H_out*W_out*E[C_in]*E[C_out], E[C] = sum_k softmax(alpha)_k c_k chained through the network,
    every block weighted by P(its stage keeps it) under softmax(beta), the stride-2 shortcut (1x1 on the
    pooled input) with its block, plus the classifier (E[C] + 1) * classes."""
    expected = {choice.name.removesuffix("_width"): float(np.dot(_softmax(choice.alpha.numpy()), choice.candidates))
                for choice in supernet.width_choices}
    keep = [np.cumsum(_softmax(mixer.beta.numpy())[::-1])[::-1] for _, mixer in supernet.stages]  # P(depth >= b)
    total, width, size = 9 * 8 * 8 * 3 * expected["stem_conv"], expected["stem_conv"], 8
    for stage in (1, 2, 3):
        for block in (1, 2, 3):
            name, stride = f"s{stage}_b{block}", 2 if stage > 1 and block == 1 else 1
            size //= stride
            a, b = expected[f"{name}_conv_a"], expected[f"{name}_conv_b"]
            cost = 9 * size * size * (width * a + a * b) + (size * size * width * b if stride == 2 else 0)
            total += keep[stage - 1][block - 1] * cost
            width = b
    return total + (width + 1) * 10


def test_cifar_space_has_the_reference_choices_and_costs(cifar_supernet):
    supernet = cifar_supernet
    names = ["stem_conv"] + [f"s{s}_b{b}_conv_{c}" for s in (1, 2, 3) for b in (1, 2, 3) for c in "ab"]
    full = [16] + [16] * 6 + [32] * 6 + [64] * 6
    assert [c.name for c in supernet.width_choices] == [f"{name}_width" for name in names]
    assert [c.candidates for c in supernet.width_choices] == [candidate_widths(w) for w in full]
    assert [m.depth_choices for _, m in supernet.stages] == [(1, 2, 3)] * 3
    # ResNet-20 at 8x8: the CIFAR ResNet-20's 40,813,194 FLOPs at 32x32 (the 40.81 MFLOPs of docs/guide.md's
    # "Counting" and docs/design.md section 3) with every map 16 times smaller, the classifier (650) aside.
    assert supernet.full_cost("flops") == (40_813_194 - 650) // 16 + 650
    assert supernet.full_cost("params") == 272_282  # docs/guide.md's count: it does not depend on the size
    for seed in range(3):
        _randomise_architecture(supernet, seed)
        assert float(supernet.expected_cost()) == pytest.approx(_design_expected_flops(supernet), rel=1e-6)
        derived = CifarResNet(arch_from_shape(supernet.space, supernet.derive()))
        counted = count_model(derived)
        assert (int(supernet.argmax_cost()), int(supernet.argmax_cost("params"))) == (counted.flops, counted.params)


def test_cifar_expected_cost_at_uniform_alpha_and_beta():
    model = CifarResNet(ArchConfig.full("resnet20"))
    supernet = build_supernet("resnet20", model)
    for variable in supernet.arch_variables:
        variable.assign(tf.zeros_like(variable))
    # E[16] = 10, E[32] = 20.375, E[64] = 41.25; blocks weighted 1, 2/3, 1/3 (docs/design.md section 6).
    assert float(supernet.expected_cost()) / 1e6 == pytest.approx(10.83, abs=0.005)


def _naive_cifar_forward(supernet, images, sample):
    """docs/design.md section 5 written out for ResNet-20, conv by conv, with the supernet's weights: every
    conv runs at full width; each of its slot's two picks keeps its leading channels, is normalised with
    batch statistics and its own affine, widened by CWI to the wider pick, and the two are summed with
    their weights; an identity shortcut is a zero-padded add; the stride-2 shortcut pools 2x2 and is a
    normalised 1x1 conv on the block's picks; a stage's output mixes the outputs after 1, 2, 3 blocks
    by CWI to the widest; the classifier reads the average-pooled channels."""
    widths, depths = sample
    layers = supernet.graph_layers

    def conv(name, x, slot, strides):
        layer = layers[name]
        full = tf.nn.conv2d(x, layer.kernel, strides, "SAME").numpy()
        picks, weights = (t.numpy() for t in widths[f"{slot}_width"])
        wider = max(layer.candidates[p] for p in picks)
        out = np.zeros_like(full)
        for pick, weight in zip(picks, weights):
            part = full[..., :layer.candidates[pick]]
            part = (part - part.mean((0, 1, 2))) / np.sqrt(part.var((0, 1, 2)) + 1e-5)
            part = part * layer.gammas.numpy()[pick, :part.shape[-1]] + layer.betas.numpy()[pick, :part.shape[-1]]
            out[..., :wider] += weight * _naive_cwi(part, wider)
        return out, wider

    x, width = conv("stem_conv", images, "stem_conv", 1)
    x = np.maximum(x, 0)
    for stage in (1, 2, 3):
        outputs = []
        for block in (1, 2, 3):
            name, stride = f"s{stage}_b{block}", 2 if stage > 1 and block == 1 else 1
            y, _ = conv(f"{name}_conv_a", x, f"{name}_conv_a", stride)
            y, y_width = conv(f"{name}_conv_b", np.maximum(y, 0), f"{name}_conv_b", 1)
            if stride == 2:
                pooled = tf.nn.avg_pool2d(x, 2, 2, "SAME")
                x, _ = conv(f"{name}_shortcut_conv", pooled, f"{name}_conv_b", 1)
            else:
                y_width = max(y_width, width)
            x, width = np.maximum(x + y, 0), y_width
            outputs.append((x, width))
        widest = max(w for _, w in outputs)
        mixed = np.zeros_like(x)
        for weight, (output, output_width) in zip(depths[stage - 1].numpy(), outputs):
            mixed[..., :widest] += weight * _naive_cwi(output[..., :output_width], widest)
        x, width = mixed, widest
    head = layers["head_fc"]
    return x.mean((1, 2)) @ head.kernel.numpy() + head.bias.numpy()


def test_cifar_forward_is_the_reference_forward(cifar_supernet):
    supernet = cifar_supernet
    images = tf.random.stateless_normal((6, 8, 8, 3), [1, 0])
    for seed in range(2):
        _randomise_architecture(supernet, seed)
        sample = supernet.sample(tf.constant(1.0), tf.constant([seed, 5], tf.int64))
        np.testing.assert_allclose(supernet(images, sample), _naive_cifar_forward(supernet, images, sample),
                                   atol=1e-4)


# Any model: exact costs, and the source model at the full sample.

@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "resnet50", "user_cnn", "user_cnn_independent",
                                  "ops_cnn", "sep_cnn", "dense_cnn", "grouped_cnn", "convnext_cnn", "unet_cnn"])
def test_argmax_cost_is_the_count_of_the_derived_shape(name):
    _, space, supernet = _supernet(name)
    for seed in range(4):
        _randomise_architecture(supernet, seed)
        shape = supernet.derive()
        counted = count_shape(space, shape)
        assert (int(supernet.argmax_cost()), int(supernet.argmax_cost("params"))) == (counted.flops,
                                                                                      counted.params)
    assert shape != space.full_shape()
    assert supernet.full_cost("params") == count_shape(space, space.full_shape()).params


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "resnet50", "user_cnn", "user_cnn_independent",
                                  "ops_cnn", "sep_cnn", "dense_cnn", "grouped_cnn", "convnext_cnn", "unet_cnn"])
def test_full_sample_from_the_source_equals_the_source_in_training_mode(name):
    model, space, supernet = _supernet(name)  # resnet20 without normalize_every_conv: its stride-2
    images = tf.random.stateless_normal((8, *space.input_shape), [2, 0])  # shortcuts stay bare
    expected = _log_probabilities(model(images, training=True), model)
    actual = _log_probabilities(supernet(images, _one_hot_sample(supernet, space.full_shape())), model)
    # The tolerance: 1e-4, or twice how far the source's own outputs move when the batch is reversed
    # (float32 sums of BN statistics over a few values: ResNet-50's last stage is 1x1 at 32 px).
    reversed_batch = _log_probabilities(model(images[::-1], training=True), model)[::-1]
    np.testing.assert_allclose(actual, expected, atol=max(1e-4, 2 * np.abs(reversed_batch - expected).max()))


@pytest.mark.parametrize("name", ["mobilenet_v2", "user_cnn", "ops_cnn", "sep_cnn", "dense_cnn", "grouped_cnn",
                                  "convnext_cnn", "unet_cnn"])
def test_one_hot_sample_equals_the_derived_network_in_training_mode(name):
    """At a narrower one-hot sample the supernet is the derived network (tied slots share one width;
    depthwise and grouped convs, BNs and activations follow it; the masks keep the zero channels zero; a
    LayerNormalization takes its statistics over the sampled channels only)."""
    model, space, supernet = _supernet(name)
    rng = np.random.default_rng(3)
    shape = space.shape({s.name: int(rng.choice(s.candidates[:-1])) for s in space.searchable_slots},
                        {stage.name: int(rng.choice(stage.choices[:-1] or stage.choices)) for stage in space.stages})
    derived = derive_model(model, space, shape)
    images = tf.random.stateless_normal((8, *space.input_shape), [3, 0])
    np.testing.assert_allclose(_log_probabilities(supernet(images, _one_hot_sample(supernet, shape)), model),
                               _log_probabilities(derived(images, training=True), model), atol=1e-4)


def test_depthwise_convs_with_an_activation_keep_the_zero_channels_zero():
    """A depthwise conv (a DepthwiseConv2D, or a Conv2D whose groups are its channels) whose activation is
    not 0 at 0 (sigmoid) makes the channels beyond the sampled width non-zero: the supernet masks them, so
    a one-hot sample is still the derived network."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = L.DepthwiseConv2D(3, padding="same", activation="sigmoid", use_bias=False, name="dw")(x)
    x = L.Conv2D(8, 3, padding="same", groups=8, activation="sigmoid", use_bias=False, name="grouped_dw")(x)
    model = keras.Model(inputs, L.Dense(4, name="head")(L.GlobalAveragePooling2D(name="pool")(x)))
    space = read_model(model)
    supernet = GraphSupernet(model, space)
    supernet.init_from_source(model)
    shape = space.shape({"stem": 5}, {})
    images = tf.random.stateless_normal((4, 8, 8, 3), [5, 0])
    np.testing.assert_allclose(supernet(images, _one_hot_sample(supernet, shape)),
                               derive_model(model, space, shape)(images, training=True), atol=1e-5)


def test_expected_cost_of_a_user_cnn_by_hand():
    _, _, supernet = _supernet("user_cnn")
    for variable in supernet.arch_variables:
        variable.assign(tf.zeros_like(variable))
    # Slots: the stem, tied by the Adds to b1_project and b2_conv (candidates of 8: 2, 3, 4, 5, 6, 7, 8,
    # mean 5), b2_expand (of 16: mean 10), down (of 12: 3, 4, 6, 7, 8, 9, 10, 12, mean 7.375). The stage
    # keeps b2 with probability 1/2. 8x8 maps, 4x4 after the strided conv.
    s, e, d = 5, 10, 59 / 8
    expected = (9 * 3 * s * 64  # stem
                + (9 * s + s) * 64  # b1_dw, with bias
                + (s * s + s) * 64  # b1_project, with bias
                + 0.5 * ((s * e + e) * 64 + 9 * e * s * 64)  # b2_expand (with bias), b2_conv
                + (9 * s * d + d) * 16  # down, with bias
                + d * 4 + 4)  # head
    assert float(supernet.expected_cost()) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(35541.5)


def test_expected_cost_of_a_dense_cnn_by_hand():
    """A Concatenate's readers count the sum of its inputs' expected widths."""
    _, space, supernet = _supernet("dense_cnn")
    assert space.slot("d1_l2_concat").members == ("stem", "d1_l1_conv", "d1_l2_conv")
    assert space.slot("d2_l1_concat").members == ("transition_conv", "d2_l1_conv")
    for variable in supernet.arch_variables:
        variable.assign(tf.zeros_like(variable))
    # Candidates (floor of the ratios 0.3 .. 1.0 of docs/design.md section 4): of 6: 1 .. 6 (mean 3.5);
    # of 4: 1 .. 4 (mean 2.5); of 8: 2 .. 8 (mean 5). 8x8 maps, 4x4 after the transition.
    s, g, t = 3.5, 2.5, 5
    expected = (9 * 3 * s * 64  # stem
                + 9 * s * g * 64  # d1_l1_conv reads the stem
                + 9 * (s + g) * g * 64  # d1_l2_conv reads the stem and d1_l1
                + ((s + 2 * g) * t + t) * 64  # transition_conv, with bias
                + 9 * t * g * 16  # d2_l1_conv
                + (t + g) * 4 + 4)  # head
    assert float(supernet.expected_cost()) == pytest.approx(expected, rel=1e-6)


def test_a_concatenate_merged_with_another_tensor_fixes_its_inputs():
    inputs = keras.Input((8, 8, 3))
    a, b = (L.Conv2D(4, 1, name=name)(inputs) for name in ("a", "b"))
    joined = L.Concatenate(name="joined")([a, b])
    x = L.Add(name="sum")([joined, L.Conv2D(8, 1, name="c")(inputs)])
    space = read_model(keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x))))
    assert not any(space.varies(space.layer(name).out_slot) for name in ("a", "b", "c", "joined", "sum"))
    assert "joined (Concatenate) is merged" in space.slot("a").fixed_reason


def test_counts_of_a_grouped_cnn_by_hand():
    """A grouped conv costs k*k*(C_in/g)*C_out per output position (plus C_out for a bias): kept in whole
    groups, its group width stays and its C_in and C_out shrink with the groups kept."""
    _, space, _ = _supernet("grouped_cnn")
    # Widths: the stem s; down's inner slot d (whole groups of 8, for its 2-group conv: 2 of its first
    # grouped conv's 4 groups of 4, then 1 group of 8); the residual slot r (the Adds tie the skip and
    # every block's last 1x1 conv); b1's inner slot e (3 groups of 4), b2's f (2 groups of 4). 8x8 maps
    # up to down's strided grouped conv, 4x4 after.
    s, d, r, e, f = 6, 8, 9, 12, 8
    shape = space.shape({"stem": s, "down_conv_1x1_1": d, "b2_conv_1x1_2": r, "b1_conv_1x1_1": e, "b2_conv_1x1_1": f},
                        {"stage1": 3})
    convs = {"stem": (9 * 3 * s, 64), "down_conv_1x1_1": (s * d, 64), "down_conv_3x3": (9 * 4 * d, 16),
             "down_conv_3x3_wide_groups": (9 * 8 * d + d, 16), "down_conv_1x1_2": (d * r + r, 16),
             "down_skip": (s * r, 16), "b1_conv_1x1_1": (r * e, 16), "b1_conv_3x3": (9 * 4 * e, 16),
             "b1_conv_1x1_2": (e * r, 16), "b2_conv_1x1_1": (r * f, 16), "b2_conv_3x3": (9 * 4 * f, 16),
             "b2_conv_1x1_2": (f * r, 16), "head": (r * 4 + 4, 1)}
    batch_norms = 2 * (s + d + d + r + e + e + r + f + f + r)  # gamma and beta of every BN
    counted = count_shape(space, shape)
    assert {layer.name: layer.flops for layer in counted.layers if layer.kind != "batch_norm"} == {
        name: weights * positions for name, (weights, positions) in convs.items()}
    assert counted.flops == sum(weights * positions for weights, positions in convs.values()) == 46_872
    assert counted.params == sum(weights for weights, _ in convs.values()) + batch_norms


def test_counts_of_a_unet_by_hand():
    """A Conv2DTranspose costs k*k*C_in*C_out per input position (it scatters each through its whole kernel);
    pooling and UpSampling2D cost nothing; a conv reading a skip Concatenate reads the sum of its members'
    widths."""
    _, space, _ = _supernet("unet_cnn")
    assert [space.slot(name).members for name in ("skip3", "skip2", "skip1")] == [
        ("up3", "enc3"), ("enc2", "up2_conv"), ("up1_conv", "enc1")]

    def by_hand(a, b, c, d, u3, e, u2, f, u1, g):
        """(weights, positions) of every conv at the widths of enc1, enc2, enc3, bottleneck, up3, dec3,
        up2_conv, dec2, up1_conv, dec1: 32x32 maps (1024 positions), 16x16 (256), 8x8 (64), the bottleneck's
        4x4 (16), which are up3's input positions. up2_conv and up1_conv have a bias, as has the head."""
        return {"enc1": (9 * 3 * a, 1024), "enc2": (9 * a * b, 256), "enc3": (9 * b * c, 64),
                "bottleneck": (9 * c * d, 16), "up3": (9 * d * u3, 16), "dec3": (9 * (u3 + c) * e, 64),
                "up2_conv": (9 * e * u2 + u2, 256), "dec2": (9 * (b + u2) * f, 256),
                "up1_conv": (9 * f * u1 + u1, 1024), "dec1": (9 * (u1 + a) * g, 1024), "head": (g * 3 + 3, 1024)}

    names = ("enc1", "enc2", "enc3", "bottleneck", "up3", "dec3", "up2_conv", "dec2", "up1_conv", "dec1")
    for widths in ((6, 8, 10, 12, 10, 10, 8, 8, 6, 6), (4, 5, 7, 9, 6, 8, 3, 7, 2, 5)):
        a, b, c, d, u3, e, u2, f, u1, g = widths
        convs = by_hand(*widths)
        counted = count_shape(space, space.shape(dict(zip(names, widths)), {}))
        assert {layer.name: layer.flops for layer in counted.layers if layer.kind != "batch_norm"} == {
            name: weights * positions for name, (weights, positions) in convs.items()}
        batch_norms = 2 * (a + b + c + d + u3 + e + f + g)  # gamma and beta of every BN (up2_conv, up1_conv: none)
        assert counted.params == sum(weights for weights, _ in convs.values()) + batch_norms
    assert count_shape(space, space.full_shape()).flops == sum(
        weights * positions for weights, positions in by_hand(6, 8, 10, 12, 10, 10, 8, 8, 6, 6).values()) == 2_087_168


@pytest.mark.parametrize("name, compiled", [("mobilenet_v2", False), ("resnet50", False), ("user_cnn", True),
                                            ("grouped_cnn", True), ("unet_cnn", False)])
def test_short_search_runs_and_moves_the_architecture(name, compiled):
    """Two search steps: eagerly for the ImageNet models and the U-Net (tracing them would cost a minute, the
    U-Net's 10 s), through a compiled `fit` for the small CNNs (Keras runs a grouped conv through XLA on a
    CPU). A label per output
    position: one per image for a classifier, one per pixel for the U-Net (the search's cross-entropy and
    accuracy take either); the argmax network derives to the source's output shape."""
    model, space, supernet = _supernet(name)
    search = TASSearchModel(supernet, target_ratio=0.5)
    search.compile(optimizer=keras.optimizers.SGD(0.01),
                   arch_optimizer=keras.optimizers.Adam(0.01, beta_1=0.5, beta_2=0.999))
    rng = np.random.default_rng(0)
    halves = [tf.data.Dataset.from_tensor_slices((rng.normal(size=(8, *space.input_shape)).astype("float32"),
                                                  rng.integers(0, 3, (8, *model.output_shape[1:-1])).astype("int32")))
              .batch(4) for _ in range(2)]
    batches = tf.data.Dataset.zip(tuple(halves))
    arch = [v.numpy() for v in supernet.arch_variables]
    weights = [v.numpy() for v in supernet.weight_variables]
    if compiled:
        logs = {name: values[-1] for name, values in search.fit(batches, epochs=1, verbose=0).history.items()}
    else:
        logs = [search.train_step(batch) for batch in batches][-1]
    assert all(math.isfinite(float(value)) for value in logs.values()), logs
    assert all(not np.array_equal(a, v.numpy()) for a, v in zip(arch, supernet.arch_variables))
    assert sum(not np.array_equal(a, v.numpy()) for a, v in zip(weights, supernet.weight_variables)) > len(weights) / 2
    assert derive_model(model, space, supernet.derive(), transfer_weights=False).output_shape == model.output_shape


def test_search_state_backs_up_and_restores(tmp_path):
    """A backup (weights, both optimizers) of a search restores into a new supernet of the same model."""
    model, space, _ = _supernet("user_cnn")

    def search_model():
        search = TASSearchModel(GraphSupernet(model, space), target_ratio=0.5)
        search.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                       arch_optimizer=keras.optimizers.Adam(0.01, beta_1=0.5, beta_2=0.999))
        return search

    trained = search_model()
    images = tf.random.stateless_normal((4, *space.input_shape), [4, 0])
    trained.train_step(((images, tf.constant([0, 1, 2, 3])), (images, tf.constant([3, 2, 1, 0]))))
    trained.save_weights(tmp_path / "backup.weights.h5")
    restored = search_model()
    restored.load_weights(tmp_path / "backup.weights.h5")
    for variable, reference in zip(
            restored.variables + restored.optimizer.variables + restored.arch_optimizer.variables,
            trained.variables + trained.optimizer.variables + trained.arch_optimizer.variables, strict=True):
        np.testing.assert_array_equal(variable, reference, err_msg=variable.path)
    assert convergence(restored.supernet) == convergence(trained.supernet)


# The searchable conv's routes.

def _naive_cwi(x, out_width):
    width = x.shape[-1]
    return np.stack([x[..., math.floor(j * width / out_width):math.ceil((j + 1) * width / out_width)].mean(-1)
                     for j in range(out_width)], axis=-1)


@pytest.mark.parametrize("kernel, strides, normalize, route", [
    (1, 1, True, "covariance"), (1, 2, True, "covariance"), (1, 1, True, "second_conv"), (3, 2, True, "second_conv"),
    (3, 2, True, "matmul"), (1, 2, True, "gather"), (3, 1, True, "gather"),
    (3, 1, False, "kernel"), (1, 2, False, "kernel"), (3, 2, False, "matmul"), (3, 1, False, "gather")])
def test_searchable_conv_routes_equal_the_naive_route(kernel, strides, normalize, route):
    """Every route (statistics from the output or from the input's covariance; the mix as a matmul,
    as gathered taps or folded into the kernel) computes the naive mix of two normalised, widened picks."""
    candidates = candidate_widths(16)
    conv = SearchableConv(16, candidates, kernel, strides, normalize=normalize, use_bias=not normalize, route=route)
    _assert_mixes_the_naive_route(conv, lambda x: tf.nn.conv2d(x, conv.kernel, strides, "SAME"))


def _assert_mixes_the_naive_route(conv, full_conv):
    """Checks that a searchable conv of 16 channels (its kernel random, its affines or bias set here) mixes
    its picks of 12 and 8 channels as their naive mix on `full_conv(x)`, its output at full width: each
    pick's leading channels, normalised with their batch statistics and the pick's affine (or plus the
    bias), widened by CWI to 12 channels, weighted."""
    x = tf.random.stateless_normal((4, 7, 7, 5), [0, 0]) + 1.0
    picks, weights = tf.constant([5, 2]), tf.constant([0.7, 0.3])  # 12 and 8 channels
    conv(x, picks, weights)
    for i, variable in enumerate(conv.trainable_weights[1:]):
        variable.assign(tf.random.stateless_uniform(variable.shape, [1, i], 0.5, 1.5))
    mixed, wider = conv(x, picks, weights)

    full = full_conv(x).numpy() + (0 if conv.normalize else conv.bias.numpy())
    expected = np.zeros_like(full)
    for pick, weight in zip(picks.numpy(), weights.numpy()):
        part = full[..., :conv.candidates[pick]]
        if conv.normalize:
            part = (part - part.mean((0, 1, 2))) / np.sqrt(part.var((0, 1, 2)) + 1e-5)
            part = part * conv.gammas.numpy()[pick, :part.shape[-1]] + conv.betas.numpy()[pick, :part.shape[-1]]
        expected[..., :12] += weight * _naive_cwi(part, 12)
    assert int(wider) == 12
    np.testing.assert_allclose(mixed, expected, atol=1e-4)


@pytest.mark.parametrize("kernel, strides, padding, output_padding, normalize, route", [
    (3, 2, "same", None, True, "second_conv"), (2, 2, "valid", None, True, "matmul"),
    (1, 2, "same", None, True, "gather"), (3, 2, "valid", 1, False, "kernel"), (3, 1, "same", None, False, "gather")])
def test_searchable_conv_transpose_routes_equal_the_naive_route(kernel, strides, padding, output_padding, normalize,
                                                                route):
    """A searchable Conv2DTranspose mixes its picks as a searchable conv does, on the output of Keras'
    Conv2DTranspose whose kernel is its kernel in Keras' layout (k_h, k_w, C_out, C_in)."""
    conv = SearchableConvTranspose(16, candidate_widths(16), output_padding, kernel_size=kernel, strides=strides,
                                   padding=padding, normalize=normalize, use_bias=not normalize, route=route)

    def full_conv(x):
        keras_conv = L.Conv2DTranspose(16, kernel, strides=strides, padding=padding, output_padding=output_padding,
                                       use_bias=False)
        keras_conv.build(x.shape)
        keras_conv.kernel.assign(np.transpose(conv.kernel.numpy(), (0, 1, 3, 2)))
        return keras_conv(x)

    _assert_mixes_the_naive_route(conv, full_conv)


def test_the_routes_give_one_gradient():
    """The gradients a search step takes (kernel, affines, mixing weights, input) agree between routes."""
    x = tf.random.stateless_normal((4, 7, 7, 8), [0, 0]) + 1.0
    picks, weights = tf.constant([5, 2]), tf.Variable([0.7, 0.3])
    gradients = {}
    for route in ("matmul", "gather", "second_conv", "covariance"):
        keras.utils.set_random_seed(0)
        conv = SearchableConv(16, candidate_widths(16), 1, 2, route=route)
        conv(x, picks, weights)
        for i, variable in enumerate(conv.trainable_weights[1:]):
            variable.assign(tf.random.stateless_uniform(variable.shape, [1, i], 0.5, 1.5))
        with tf.GradientTape() as tape:
            tape.watch(x)
            mixed, _ = conv(x, picks, weights)
            loss = tf.reduce_sum(mixed * tf.random.stateless_normal(mixed.shape, [2, 0]))
        gradients[route] = tape.gradient(loss, [x, weights, *conv.trainable_weights])
    for route, gradient in gradients.items():
        for got, want in zip(gradient, gradients["matmul"], strict=True):
            np.testing.assert_allclose(tf.convert_to_tensor(got), tf.convert_to_tensor(want), rtol=1e-4, atol=1e-4,
                                       err_msg=route)


@pytest.mark.parametrize("kernel, in_channels, filters, positions, route", [
    # 1x1, 512 -> 2048 at 64 pixels (ResNet-50's last stage, 64 px, batch 16), in multiply-adds: matmul
    # 64 * 2048^2 = 268M; gather 64 * 256 * 2048 = 34M; second conv 64 * 512 * 2048 + 256 * 1M = 336M;
    # covariance 64 * 512^2 + 512^2 * 2048 + 256 * 1M = 822M.
    (1, 512, 2048, 64, "gather"),
    # The same conv at 16384 pixels: matmul 69G; gather 8.6G; second conv 17.5G; covariance 4.3G + 0.8G.
    (1, 512, 2048, 16384, "covariance"),
    # 3x3, 64 -> 64 at 65536 pixels: matmul 65536 * 4096 = 268M; gather 65536 * 256 * 64 = 1.1G; second
    # conv 65536 * 576 * 64 + 256 * 36864 = 2.4G.
    (3, 64, 64, 65536, "matmul"),
    # Batch size unknown, per pixel: 1x1, 512 -> 2048: covariance 512^2 below second conv 512 * 2048.
    (1, 512, 2048, None, "covariance")])
def test_the_cheapest_route_follows_the_hand_counted_costs(kernel, in_channels, filters, positions, route):
    conv = SearchableConv(filters, (filters // 2, filters), kernel)
    conv.build((None, 8, 8, in_channels))
    assert conv.cheapest_route(positions) == route


def test_searchable_conv_refuses_a_route_it_cannot_run():
    for route, normalize, kernel in (("covariance", True, 3), ("kernel", True, 1), ("second_conv", False, 1),
                                     ("slice", True, 1)):
        with pytest.raises(ValueError, match=f"conv: route must be None or one of .*, got '{route}'"):
            SearchableConv(8, (4, 8), kernel, normalize=normalize, use_bias=not normalize, route=route, name="conv")
    with pytest.raises(ValueError, match="up: route must be None or one of .*, got 'covariance'"):
        SearchableConvTranspose(8, (4, 8), kernel_size=1, route="covariance", name="up")
    config = SearchableConv(8, (4, 8), 3, route="gather").get_config()
    assert SearchableConv.from_config(config).route == "gather"


def test_supernet_refuses_bad_arguments():
    inputs = keras.Input((8, 8, 3))
    x = L.ReLU(name="conv_width")(L.Conv2D(4, 3, name="conv")(inputs))
    model = keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x)))
    with pytest.raises(ValueError, match="the supernet names a layer 'conv_width', which the model already uses"):
        GraphSupernet(model, read_model(model))
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -1"):
        GraphSupernet(model, read_model(model), weight_decay=-1)
    _, _, supernet = _supernet("user_cnn")
    with pytest.raises(ValueError, match="metric must be one of \\('flops', 'params'\\), got 'latency'"):
        supernet.expected_cost("latency")


def test_a_supernet_started_full_derives_and_mostly_samples_the_full_network():
    _, space, supernet = _supernet("user_cnn")
    before = [v.numpy() for v in supernet.arch_variables]
    supernet.start_full(4.0)
    try:
        assert supernet.derive() == space.full_shape()
        widths, _ = supernet.sample(tf.constant(1.0), tf.constant([0, 1]))
        full = [len(choice.candidates) - 1 for choice in supernet.width_choices]
        picks = [int(widths[choice.name][0][0]) for choice in supernet.width_choices]
        assert sum(p == f for p, f in zip(picks, full)) >= len(full) // 2
    finally:
        for variable, value in zip(supernet.arch_variables, before):
            variable.assign(value)
