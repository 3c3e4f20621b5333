import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from tas_keras.cost import count_arch, count_model
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.models.registry import build_model
from tas_keras.search_space import ArchConfig

from .conftest import REPO

# docs/design.md section 3, CIFAR-10 MFLOPs of the full networks.
BASE_MFLOPS = {"resnet20": 40.81, "resnet32": 69.12, "resnet56": 125.75, "resnet110": 253.15,
               "resnet164": 247.65}


@pytest.mark.parametrize("model", sorted(BASE_MFLOPS))
def test_base_flops_match_design_table(model):
    assert round(count_arch(ArchConfig.full(model)).mflops, 2) == BASE_MFLOPS[model]


def test_resnet20_counts_by_hand():
    report = count_arch(ArchConfig.full("resnet20"))
    stem = 3 * 3 * 3 * 16 * 32 * 32
    stage1 = 6 * 3 * 3 * 16 * 16 * 32 * 32
    stage2 = (9 * 16 * 32 + 5 * 9 * 32 * 32 + 16 * 32) * 16 * 16  # conv_a stride 2 + 5 convs + shortcut
    stage3 = (9 * 32 * 64 + 5 * 9 * 64 * 64 + 32 * 64) * 8 * 8
    assert report.flops == stem + stage1 + stage2 + stage3 + 64 * 10 + 10
    assert report.params == 272_282  # the paper's 0.27M


def _pruned(model="resnet20", num_classes=10, stage_blocks=None, seed=0):
    """A random valid shape: every width drawn from 1..full, optionally truncated."""
    full = ArchConfig.full(model, num_classes=num_classes)
    rng = np.random.default_rng(seed)
    widths = [int(rng.integers(1, s.full_width + 1)) for s in full.slots]
    return full.replace(widths=widths, stage_blocks=stage_blocks or full.stage_blocks)


@pytest.mark.parametrize("arch", [
    ArchConfig.full("resnet20"),
    _pruned(),
    _pruned(stage_blocks=(1, 2, 1), num_classes=100, seed=1),
    _pruned("resnet29_bottleneck", stage_blocks=(3, 1, 2), seed=2),
], ids=["full", "pruned", "truncated", "bottleneck"])
def test_counter_agrees_with_built_model(arch):
    model = CifarResNet(arch)
    counted, built = count_arch(arch), count_model(model)
    assert sorted((l.name, l.flops, l.params) for l in counted.layers) == sorted(
        (l.name, l.flops, l.params) for l in built.layers)
    assert built.params == sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert model.output_shape == (None, arch.num_classes)


def test_truncated_stage_feeds_next_stage_from_last_kept_block():
    arch = _pruned(stage_blocks=(2, 3, 3), seed=3)
    model = CifarResNet(arch)
    names = {layer.name for layer in model.layers}
    assert "s1_b2_conv_b" in names and "s1_b3_conv_a" not in names
    assert model.get_layer("s2_b1_conv_a").kernel.shape[2] == arch.width_of("s1_b2_conv_b")
    assert model.get_layer("s2_b1_shortcut_conv").kernel.shape[2] == arch.width_of("s1_b2_conv_b")


def test_shortcut_rules():
    full = ArchConfig.full("resnet20")
    widths = list(full.widths)
    widths[4] = 12  # s1_b2_conv_b: identity block whose output differs from its input
    model = CifarResNet(full.replace(widths=widths))
    names = {layer.name for layer in model.layers}
    assert {"s1_b2_shortcut_conv", "s1_b2_shortcut_bn"} <= names  # in != out: conv1x1 + BN
    assert {"s2_b1_shortcut_pool", "s2_b1_shortcut_conv"} <= names  # stride 2: avgpool + conv1x1
    assert "s2_b1_shortcut_bn" not in names and "s1_b1_shortcut_conv" not in names


def test_layer_settings_follow_reference():
    model = CifarResNet(ArchConfig.full("resnet20"))
    bn = model.get_layer("s1_b1_bn_a")
    assert (bn.momentum, bn.epsilon) == (0.9, 1e-5)
    assert bn.gamma_regularizer.l2 == pytest.approx(2.5e-4)  # coupled wd 5e-4 == L2(wd / 2)
    conv = model.get_layer("s1_b1_conv_a")
    assert not conv.use_bias and conv.kernel_regularizer.l2 == pytest.approx(2.5e-4)
    # He normal, fan_out: std = sqrt(2 / (3 * 3 * 16)).
    assert np.std(conv.kernel.numpy()) == pytest.approx(np.sqrt(2 / 144), rel=0.1)
    assert len(model.losses) == len(model.trainable_weights)  # every weight is decayed
    dense = model.get_layer("head_fc")
    assert dense.use_bias and dense.bias_regularizer.l2 == pytest.approx(2.5e-4)


def test_config_round_trip_and_keras_file(tmp_path):
    arch = _pruned(stage_blocks=(2, 1, 3), seed=4)
    model = CifarResNet(arch, weight_decay=1e-4)
    clone = CifarResNet.from_config(model.get_config())
    assert clone.arch == arch and clone.weight_decay == 1e-4
    assert [l.name for l in clone.layers] == [l.name for l in model.layers]
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, CifarResNet) and loaded.arch == arch
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded(images, training=False), model(images, training=False), atol=1e-6)


def test_builder_rejects_bad_arguments():
    with pytest.raises(TypeError, match="arch must be an ArchConfig"):
        CifarResNet("resnet20")
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -1"):
        CifarResNet(ArchConfig.full("resnet20"), weight_decay=-1)


def _flops_cli(*args):
    return subprocess.run([sys.executable, "-m", "train.flops", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_flops_cli(released_shapes):
    result = _flops_cli("resnet56", "--num_classes=100", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    full = count_arch(ArchConfig.full("resnet56", num_classes=100))
    assert (report["flops"], report["params"], len(report["layers"])) == (
        full.flops, full.params, len(full.layers))
    released = [p for p in released_shapes if p.name == "NeurIPS-2019__C010-ResNet56.config"][0]
    table = _flops_cli(str(released))
    assert table.returncode == 0 and "total: 59.8584 MFLOPs" in table.stdout
    missing = _flops_cli("no/such/arch.json")
    assert missing.returncode != 0 and "cannot read shape file 'no/such/arch.json'" in missing.stderr


def test_registry_networks_name_their_layers_alike_in_every_build():
    """keras.applications leaves MobileNetV2's pooling unnamed, which Keras numbers per session: a second
    build would not match a saved first one's layers by name (a search starting from a trained network)."""
    first, second = (build_model("mobilenet_v2", (32, 32, 3), 10) for _ in range(2))
    assert [layer.name for layer in first.layers] == [layer.name for layer in second.layers]
    assert "global_average_pooling2d" in [layer.name for layer in second.layers]
