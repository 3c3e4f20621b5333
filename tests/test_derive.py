"""Deriving a point of a model's graph space as a plain Keras model, with the original's weights."""

import subprocess
import sys

import keras
from keras.src.applications.convnext import LayerScale, StochasticDepth
import numpy as np
import pytest

from tas_keras.cost import count_arch, count_model, count_shape
from tas_keras.derive import derive_model
from tas_keras.cifar_shapes import arch_from_shape, shape_from_arch
from tas_keras.graph import read_model
from tas_keras.graph_space import INDEPENDENT, TIED
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.models.registry import build_model
from tas_keras.search_space import ArchConfig

from .test_supernet import convnext_cnn, dense_cnn, grouped_cnn, ops_cnn, sep_cnn, unet_cnn

L = keras.layers


def user_cnn(num_classes=5):
    """A functional CNN as a user might write one: Adds, depthwise convs, biases, a squeeze-excitation
    Multiply, a Dense head."""
    inputs = keras.Input((32, 32, 3), name="pixels")
    x = L.Rescaling(1 / 127.5, offset=-1, name="scale")(inputs)
    x = L.Conv2D(24, 3, strides=2, padding="same", name="stem")(x)
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(x))
    for i in (1, 2):
        y = L.ReLU(6.0, name=f"b{i}_expand_relu")(L.BatchNormalization(name=f"b{i}_expand_bn")(
            L.Conv2D(48, 1, use_bias=False, name=f"b{i}_expand")(x)))
        y = L.ReLU(name=f"b{i}_dw_relu")(L.BatchNormalization(name=f"b{i}_dw_bn")(
            L.DepthwiseConv2D(3, padding="same", name=f"b{i}_dw")(y)))
        y = L.BatchNormalization(name=f"b{i}_project_bn")(L.Conv2D(24, 1, name=f"b{i}_project")(y))
        x = L.Add(name=f"b{i}_add")([x, y])
    shortcut = L.Conv2D(32, 1, strides=2, name="down_shortcut")(x)
    y = L.Activation("relu", name="down_a_relu")(L.Conv2D(32, 3, strides=2, padding="same", name="down_a")(x))
    y = L.BatchNormalization(name="down_b_bn")(L.Conv2D(32, 3, padding="same", name="down_b")(y))
    x = L.Activation("relu", name="down_out")(L.Add(name="down_add")([shortcut, y]))
    y = L.ReLU(name="b3_relu")(L.Conv2D(32, 3, padding="same", name="b3_conv_a")(x))
    y = L.Conv2D(32, 3, padding="same", name="b3_conv_b")(y)
    gate = L.GlobalAveragePooling2D(keepdims=True, name="b3_se_pool")(y)
    gate = L.Conv2D(8, 1, activation="relu", name="b3_se_reduce")(gate)
    gate = L.Activation("sigmoid", name="b3_se_gate")(L.Conv2D(32, 1, name="b3_se_expand")(gate))
    y = L.Multiply(name="b3_se")([y, gate])
    x = L.ReLU(name="b3_out")(L.Add(name="b3_add")([x, y]))
    x = L.Dropout(0.2, name="drop")(L.GlobalAveragePooling2D(name="pool")(x))
    outputs = L.Dense(num_classes, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="user_cnn")


def concat_cnn():
    """An Inception-style Concatenate of two branches of different widths between searchable convs."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.ReLU(name="stem_relu")(L.Conv2D(8, 3, padding="same", name="stem")(inputs))
    branches = [L.Conv2D(width, kernel, padding="same", name=f"branch{kernel}")(x) for width, kernel in ((4, 1), (6, 3))]
    x = L.BatchNormalization(name="mixed_bn")(L.Concatenate(name="mixed")(branches))
    x = L.Conv2D(8, 1, activation="relu", name="after")(x)
    return keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling2D(name="pool")(x)), name="concat_cnn")


def _with_statistics(model, seed=0):
    """Gives every BN non-trivial moving statistics and affine weights, so inference mode tests them, and
    every LayerNormalization and LayerScale non-trivial vectors."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
        if isinstance(layer, (L.BatchNormalization, L.LayerNormalization, LayerScale)):
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
        if isinstance(layer, (L.BatchNormalization, L.LayerNormalization)):
            layer.beta.assign(rng.normal(0, 0.2, layer.beta.shape))
    return model


def _images(model, count=2, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (count, *model.input_shape[1:])).astype("float32")


def _random_shape(space, seed):
    rng = np.random.default_rng(seed)
    return space.shape({s.name: int(rng.choice(s.candidates)) for s in space.searchable_slots},
                       {stage.name: int(rng.choice(stage.choices)) for stage in space.stages})


MODELS = {
    "cifar_resnet20": (lambda: CifarResNet(ArchConfig.full("resnet20")), INDEPENDENT),
    "resnet18": (lambda: build_model("resnet18", (32, 32, 3), 7), TIED),
    "resnet50": (lambda: build_model("resnet50", (32, 32, 3), 7), TIED),
    "mobilenet_v2": (lambda: build_model("mobilenet_v2", (32, 32, 3), 7), TIED),
    "user_cnn": (user_cnn, TIED),
    "ops_cnn": (ops_cnn, TIED),
    "sep_cnn": (sep_cnn, TIED),
    "grouped_cnn": (grouped_cnn, TIED),
    "concat_cnn": (concat_cnn, TIED),
    "dense_cnn": (dense_cnn, TIED),
    "convnext_cnn": (convnext_cnn, TIED),
    "unet_cnn": (unet_cnn, TIED),
}


@pytest.fixture(scope="module")
def models():
    return {name: _with_statistics(build()) for name, (build, _) in MODELS.items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_full_shape_reproduces_the_original(models, name):
    model = models[name]
    space = read_model(model, add_mode=MODELS[name][1])
    derived = derive_model(model, space, space.full_shape())
    assert [layer.name for layer in derived.layers] == [layer.name for layer in model.layers]
    images = _images(model)
    np.testing.assert_allclose(derived(images, training=False), model(images, training=False), atol=1e-5)


@pytest.mark.parametrize("name, mode", [("user_cnn", TIED), ("user_cnn", INDEPENDENT), ("ops_cnn", TIED),
                                        ("sep_cnn", TIED), ("grouped_cnn", TIED), ("grouped_cnn", INDEPENDENT),
                                        ("concat_cnn", TIED), ("dense_cnn", TIED), ("convnext_cnn", TIED),
                                        ("unet_cnn", TIED), ("mobilenet_v2", TIED), ("resnet50", INDEPENDENT),
                                        ("cifar_resnet20", INDEPENDENT)])
def test_count_of_a_shape_is_the_count_of_its_derived_model(models, name, mode):
    model = models[name]
    space = read_model(model, add_mode=mode)
    for seed in (1, 2):
        shape = _random_shape(space, seed)
        derived = derive_model(model, space, shape, transfer_weights=False)
        counted, built = count_shape(space, shape), count_model(derived)
        assert sorted((l.name, l.flops, l.params) for l in counted.layers) == sorted(
            (l.name, l.flops, l.params) for l in built.layers)
        assert built.params == sum(int(np.prod(w.shape)) for w in derived.trainable_weights)
        assert derived(_images(model), training=False).shape == (2, *model.output_shape[1:])


def test_derived_layers_keep_settings_and_leading_channels(models):
    model = models["user_cnn"]
    space = read_model(model)
    shape = space.shape({**space.full_shape().widths, "b1_expand": 20, "stem": 16, "down_a": 8},
                        {"stage1": 1, "stage2": 2})
    derived = derive_model(model, space, shape)
    names = {layer.name for layer in derived.layers}
    assert {"b2_expand", "b2_add"}.isdisjoint(names) and "b1_add" in names  # stage 1 keeps its first block
    dw = derived.get_layer("b1_dw")
    assert dw.kernel.shape == (3, 3, 20, 1) and dw.get_config()["padding"] == "same"
    np.testing.assert_array_equal(dw.kernel.numpy(), model.get_layer("b1_dw").kernel.numpy()[:, :, :20])
    bn = derived.get_layer("b1_project_bn")  # the stem's slot, tied through the Add
    original = model.get_layer("b1_project_bn").moving_mean.numpy()
    np.testing.assert_array_equal(bn.moving_mean.numpy(), original[:16])
    original = model.get_layer("b1_expand").kernel.numpy()
    np.testing.assert_array_equal(derived.get_layer("b1_expand").kernel.numpy(), original[:, :, :16, :20])
    assert derived.get_layer("down_shortcut").kernel.shape == (1, 1, 16, 32)  # b2 dropped: fed by b1's Add
    assert derived.get_layer("down_b").kernel.shape == (3, 3, 8, 32)
    assert derived.get_layer("scale").get_config() == model.get_layer("scale").get_config()
    assert space.layer("b3_se_expand").out_slot == space.layer("b3_conv_b").out_slot  # tied by the Multiply
    assert derived.get_layer("classifier").get_config()["activation"] == "softmax"


def test_derived_convnext_layers_keep_settings_and_leading_channels(models, tmp_path):
    """A narrower ConvNeXt-like network: its depthwise Conv2D has as many groups as channels, its Dense
    layers on feature maps, LayerNormalizations and LayerScales hold the leading channels, and it loads
    from its .keras file (LayerScale is keras.applications' own layer)."""
    model = models["convnext_cnn"]
    space = read_model(model)
    shape = space.shape({**space.full_shape().widths, "stem": 6, "b1_expand": 19}, space.full_shape().depths)
    derived = derive_model(model, space, shape)
    dw = derived.get_layer("b1_dw")
    assert (dw.groups, dw.filters, dw.kernel.shape) == (6, 6, (7, 7, 1, 6))
    for name in ("b1_dw", "b1_ln", "b1_expand", "b1_project", "b1_scale", "head_ln", "head"):
        for mine, theirs in zip(derived.get_layer(name).weights, model.get_layer(name).weights, strict=True):
            np.testing.assert_array_equal(mine.numpy(), theirs.numpy()[tuple(slice(0, n) for n in mine.shape)])
    assert derived.get_layer("b1_expand").kernel.shape == (6, 19)
    assert derived.get_layer("b1_scale").get_config()["projection_dim"] == 6
    assert derived.get_layer("b1_ln").get_config() == {**model.get_layer("b1_ln").get_config(), "trainable": True}
    path = tmp_path / "convnext.keras"
    derived.save(path)
    images = _images(model)
    np.testing.assert_allclose(keras.models.load_model(path)(images, training=False),
                               derived(images, training=False), atol=1e-6)


def test_stochastic_depth_is_read_through_and_kept():
    """ConvNeXt's StochasticDepth (keras.applications adds it with a drop_path_rate): the identity at
    inference, its input's slot followed; the derived network keeps it, with its rate, for training."""
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="stem")(inputs)
    y = StochasticDepth(0.5, name="drop_path")(L.Conv2D(8, 3, padding="same", name="branch")(x))
    model = keras.Model(inputs, L.Dense(2, name="head")(L.GlobalAveragePooling2D()(L.Add()([x, y]))))
    space = read_model(model)
    assert space.layer("drop_path").out_slot == "stem" and [s.name for s in space.searchable_slots] == ["stem"]
    derived = derive_model(model, space, space.shape({"stem": 5}, {stage.name: 1 for stage in space.stages}))
    assert derived.get_layer("drop_path").get_config() == {**model.get_layer("drop_path").get_config(),
                                                           "trainable": True}
    full = derive_model(model, space, space.full_shape())
    images = _images(model)
    np.testing.assert_allclose(full(images, training=False), model(images, training=False), atol=1e-6)


def test_independent_adds_get_a_projection_where_widths_differ(models):
    model = models["user_cnn"]
    space = read_model(model, add_mode=INDEPENDENT)
    shape = space.shape({**space.full_shape().widths, "b2_project": 10}, space.full_shape().depths)
    derived = derive_model(model, space, shape)
    names = [layer.name for layer in derived.layers]
    conv = derived.get_layer("b2_shortcut_conv")
    assert (conv.kernel.shape, conv.strides) == ((1, 1, 24, 10), (1, 1))
    assert conv.use_bias == model.get_layer("b2_project").use_bias  # the settings of the conv it mirrors
    assert names.index("b2_shortcut_bn") < names.index("b2_add")
    assert "b1_shortcut_conv" not in names and "b3_shortcut_conv" not in names  # equal widths: identity
    assert derived.get_layer("down_a").kernel.shape[2] == 10  # the Add now carries the residual's width


def test_a_sequential_model_derives_as_a_functional_one():
    model = _with_statistics(keras.Sequential([
        keras.Input((16, 16, 3)), L.Conv2D(8, 3, name="conv"), L.BatchNormalization(name="bn"),
        L.ReLU(name="relu"), L.GlobalAveragePooling2D(name="pool"), L.Dense(3, name="head")], name="seq"))
    space = read_model(model)
    assert [slot.name for slot in space.searchable_slots] == ["conv"]
    derived = derive_model(model, space, space.full_shape())
    images = _images(model)
    np.testing.assert_allclose(derived(images, training=False), model(images, training=False), atol=1e-5)
    narrow = derive_model(model, space, space.shape({"conv": 5}, {}))
    assert narrow.get_layer("head").kernel.shape == (5, 3)


@pytest.fixture(scope="module")
def cifar_spaces():
    """(full model, its space) of the CIFAR ResNet an ArchConfig prunes, built once per network."""
    spaces = {}

    def space_of(arch):
        key = (arch.name, arch.num_classes)
        if key not in spaces:
            full = CifarResNet(ArchConfig.full(arch.name, arch.num_classes))
            spaces[key] = full, read_model(full, add_mode=INDEPENDENT)
        return spaces[key]
    return space_of


def test_released_shapes_count_the_same_through_the_graph(released_shapes, cifar_spaces):
    for path in released_shapes:
        arch = ArchConfig.load(path)
        _, space = cifar_spaces(arch)
        shape = shape_from_arch(space, arch)
        assert count_shape(space, shape).flops == count_arch(arch).flops, path.name
        assert arch_from_shape(space, shape).replace(provenance=arch.provenance) == arch


@pytest.mark.parametrize("released", ["NeurIPS-2019__C010-ResNet20.config",
                                      "NeurIPS-2019__C100-ResNet164.config"])
def test_released_shape_derives_the_cifar_builders_network(released_shapes, cifar_spaces, released):
    arch = ArchConfig.load(next(p for p in released_shapes if p.name == released))
    full, space = cifar_spaces(arch)
    derived = derive_model(full, space, shape_from_arch(space, arch), transfer_weights=False)
    built = CifarResNet(arch)
    weights = lambda m: sorted((w.path, tuple(w.shape)) for w in m.weights)  # noqa: E731
    assert sorted(l.name for l in derived.layers) == sorted(l.name for l in built.layers)
    assert weights(derived) == weights(built)
    assert count_model(derived).flops == count_arch(arch).flops


def test_derived_model_loads_without_this_package(models, tmp_path):
    model = models["cifar_resnet20"]
    space = read_model(model, add_mode=INDEPENDENT)
    shape = _random_shape(space, seed=3)
    derived = derive_model(model, space, shape)
    assert any(layer.name.endswith("_shortcut_conv") and layer.name != "s2_b1_shortcut_conv"
               for layer in derived.layers)  # a projection the original does not have
    images = _images(model)
    path = tmp_path / "pruned.keras"
    derived.save(path)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "expected.npy", derived(images, training=False))
    script = (
        "import sys, numpy as np, keras\n"
        f"model = keras.models.load_model({str(path)!r})\n"
        "assert not any(name.startswith('tas_keras') for name in sys.modules)\n"
        f"out = model(np.load({str(tmp_path / 'images.npy')!r}), training=False)\n"
        f"np.testing.assert_allclose(out, np.load({str(tmp_path / 'expected.npy')!r}), atol=1e-6)\n"
        "print(type(model).__name__)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "Functional"
