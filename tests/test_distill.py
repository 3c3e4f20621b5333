import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tas_keras.baselines import make_baseline
from tas_keras.cifar_shapes import arch_from_shape
from tas_keras.cost import count_arch
from tas_keras.derive import init_from_teacher
from tas_keras.distill import DistillConfig, KnowledgeDistiller, distill
from tas_keras.graph_space import GraphShape
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.search_space import ArchConfig
from tas_keras.shapes import shape_space

from .conftest import REPO, assert_refused_before_any_work, predefined_arch


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_kd_loss_matches_hand_computation():
    teacher = CifarResNet(ArchConfig.full("resnet8", input_shape=(8, 8, 3)))
    student = CifarResNet(predefined_arch(ArchConfig.full("resnet8", input_shape=(8, 8, 3)), 0.5, 0.2))
    distiller = KnowledgeDistiller(teacher, student, alpha=0.9, temperature=4.0)
    distiller.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 10, 6)
    for layer in teacher.layers:  # make the teacher's logits far from uniform
        if layer.name == "head_fc":
            layer.kernel.assign(layer.kernel * 300)
    loss = float(distiller.compute_loss(x=images, y=labels, y_pred=student(images, training=True)))

    t_logits = teacher(images, training=False).numpy()
    s_logits = student(images, training=True).numpy()
    ce = -np.log(_softmax(s_logits)[np.arange(6), labels]).mean()
    p_t, p_s = _softmax(t_logits / 4.0), _softmax(s_logits / 4.0)
    kl = (p_t * np.log(p_t / p_s)).sum(axis=1).mean()
    decay = sum(float(v) for v in student.losses)
    assert kl > 0.01
    assert loss == pytest.approx(0.1 * ce + 0.9 * 16 * kl + decay, rel=1e-4)


def test_keras_logits_distillation_needs_a_kl_instance():
    """Pins the keras.distillation behaviour KnowledgeDistiller works around (see its docstring)."""
    rng = np.random.default_rng(2)
    teacher, student = rng.normal(size=(4, 10)) * 3, rng.normal(size=(4, 10))
    p_t, p_s = _softmax(teacher / 4.0), _softmax(student / 4.0)
    expected = 16 * (p_t * np.log(p_t / p_s)).sum(axis=1).mean()
    by_instance = keras.distillation.LogitsDistillation(4.0, loss=keras.losses.KLDivergence())
    by_name = keras.distillation.LogitsDistillation(4.0)
    teacher, student = tf.constant(teacher, tf.float32), tf.constant(student, tf.float32)
    assert float(by_instance.compute_loss(teacher, student)) == pytest.approx(expected, rel=1e-4)
    assert float(by_name.compute_loss(teacher, student)) != pytest.approx(expected, rel=0.1)


def test_teacher_stays_bit_identical():
    teacher = CifarResNet(ArchConfig.full("resnet8", input_shape=(8, 8, 3)))
    teacher.trainable = False
    student = CifarResNet(ArchConfig.full("resnet8", input_shape=(8, 8, 3)))
    before = [w.copy() for w in teacher.get_weights()]
    distiller = KnowledgeDistiller(teacher, student)
    distiller.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(1)
    distiller.fit(rng.normal(size=(16, 8, 8, 3)).astype("float32"), rng.integers(0, 10, 16), batch_size=8,
                  epochs=1, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, teacher.get_weights()))  # BN statistics too
    assert not all(np.array_equal(a, b) for a, b in zip(before, student.get_weights()))


def test_init_copies_leading_channels_and_first_blocks():
    full = ArchConfig.full("resnet20")
    teacher = CifarResNet(full)
    for layer in teacher.layers:
        layer.set_weights([np.random.default_rng(0).normal(size=w.shape).astype("float32")
                           for w in layer.get_weights()])
    widths = list(full.widths)
    widths[full.slots.index(next(s for s in full.slots if s.name == "s1_b2_conv_b"))] = 12
    shape = full.replace(widths=widths, stage_blocks=(2, 3, 1))
    student = CifarResNet(shape)
    fresh = init_from_teacher(student, teacher)
    assert fresh == ["s1_b2_shortcut_conv", "s1_b2_shortcut_bn"]  # a projection only the pruned net has
    t, s = teacher.get_layer("s1_b2_conv_b").kernel.numpy(), student.get_layer("s1_b2_conv_b").kernel.numpy()
    np.testing.assert_array_equal(s, t[:, :, :, :12])
    bn_t, bn_s = teacher.get_layer("s1_b2_bn_b"), student.get_layer("s1_b2_bn_b")
    np.testing.assert_array_equal(bn_s.moving_variance.numpy(), bn_t.moving_variance.numpy()[:12])
    # Stage 2 is fed by block 2 of stage 1 (12 channels): the first 12 input channels of the teacher.
    np.testing.assert_array_equal(student.get_layer("s2_b1_conv_a").kernel.numpy(),
                                  teacher.get_layer("s2_b1_conv_a").kernel.numpy()[:, :, :12, :])
    np.testing.assert_array_equal(student.get_layer("head_fc").kernel.numpy(),
                                  teacher.get_layer("head_fc").kernel.numpy())
    narrow = CifarResNet(predefined_arch(full, 0.3))
    with pytest.raises(ValueError, match="cannot init from the teacher: stem_conv has shape"):
        init_from_teacher(teacher, narrow)


@pytest.mark.parametrize("model, target", [("resnet20", 0.55), ("resnet56", 0.47), ("resnet164", 0.5)])
def test_predefined_meets_the_flop_target(model, target):
    full = ArchConfig.full(model)
    shape = predefined_arch(full, target)
    assert target - 0.05 <= count_arch(shape).flops / count_arch(full).flops <= target
    assert shape.stage_blocks == full.stage_blocks
    ratio = shape.provenance["width_ratio"]
    assert list(shape.widths) == [max(1, round(s.full_width * ratio)) for s in full.slots]


@pytest.mark.slow
def test_one_epoch_distill_writes_all_artifacts(tmp_path):
    teacher_path = str(tmp_path / "teacher.keras")
    CifarResNet(ArchConfig.full("resnet8")).save(teacher_path)
    teacher_bytes = open(teacher_path, "rb").read()
    shape = GraphShape.from_dict(make_baseline(str(tmp_path / "predefined"), kind="predefined", model_name="resnet8",
                                               target_ratio=0.5))
    arch = arch_from_shape(shape_space(shape), shape)  # the shape as the CIFAR builder takes it
    out = str(tmp_path / "kd")
    metrics = distill(out, arch_path=str(tmp_path / "predefined" / "arch.json"), teacher_path=teacher_path,
                      mode="init_kd", epochs=1, batch_size=64, max_train_examples=256)
    assert {"test_accuracy", "teacher_test_accuracy", "flops", "params", "flops_reduction",
            "params_reduction", "wall_time_s", "history"} <= set(metrics)
    assert metrics["flops"] == count_arch(arch).flops
    assert metrics["flops_reduction"] == pytest.approx(1 - metrics["flops"] / metrics["teacher_flops"])
    loaded = keras.saving.load_model(os.path.join(out, "model.keras"))
    built = CifarResNet(arch)  # the CIFAR builder's network of the shape: the same layers, plain functional
    assert type(loaded).__name__ == "Functional"
    assert sorted((w.path, tuple(w.shape)) for w in loaded.weights) == sorted(
        (w.path, tuple(w.shape)) for w in built.weights)
    teacher = keras.saving.load_model(teacher_path)
    stem = loaded.get_layer("stem_conv").kernel.numpy()  # init copied the teacher's; KD then trained it
    assert not np.allclose(stem, teacher.get_layer("stem_conv").kernel.numpy()[..., :stem.shape[-1]])
    assert json.load(open(os.path.join(out, "metrics.json"))) == metrics
    assert open(teacher_path, "rb").read() == teacher_bytes
    assert os.listdir(os.path.join(out, "tensorboard"))


def _cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_distill_refuses_bad_input_before_any_work(tmp_path):
    shape = tmp_path / "arch.json"
    ArchConfig.full("resnet8").save(shape)
    for options, message in ((dict(arch_path=shape, mode="kd"), "mode 'kd' needs --teacher"),
                             (dict(arch_path="nope.json", mode="scratch"), "cannot read shape file 'nope.json'"),
                             (dict(arch_path=shape, teacher_path="none.keras"),
                              "--teacher: no such model file 'none.keras'")):
        assert_refused_before_any_work(distill, tmp_path / "run", message, **options)


def test_baseline_cli_refuses_a_target_outside_the_unit_interval(tmp_path):
    far = _cli("train.baseline", f"--out={tmp_path / 'run'}", "--target_flops_ratio=0", "--kind=predefined")
    assert far.returncode == 2 and "error: target ratio must be in (0, 1), got 0.0" in far.stderr
    assert "Traceback" not in far.stderr


def test_search_distill_and_baseline_clis_take_input_convention(tmp_path):
    # A name outside the conventions: the flag parser's one line, before any work.
    for module, *required in (("train.search",), ("train.distill", "--arch=arch.json"), ("train.baseline",)):
        bogus = _cli(module, f"--out={tmp_path / 'bogus'}", *required, "--input_convention=bogus")
        assert bogus.returncode != 0 and "Traceback" not in bogus.stderr, (module, bogus.stderr)
        (error,) = [line for line in bogus.stderr.splitlines() if "bogus" in line]
        assert error.endswith("flag --input_convention=bogus: value should be one of "
                              "<dataset|raw|unit|symmetric|lite|imagenet|caffe>"), (module, error)
        assert not (tmp_path / "bogus").exists()
    given = _cli("train.baseline", f"--out={tmp_path / 'run'}", "--kind=predefined", "--model=resnet8",
                 "--input_convention=unit")  # the cheap stage: no training
    assert given.returncode == 0, given.stderr
    assert json.load(open(tmp_path / "run" / "run.json"))["input_convention"] == "unit"


def test_distill_refuses_a_file_that_is_not_a_shape_in_one_line(tmp_path):
    bad = tmp_path / "widths.json"
    bad.write_text(json.dumps({"widths": [1, 2]}))
    result = _cli("train.distill", f"--out={tmp_path / 'run'}", f"--arch={bad}", "--mode=scratch")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error == (f"error: shape file '{bad}' is not a valid shape: missing keys ['depth', 'block', "
                     "'num_classes', 'stage_blocks'] (a shape needs ['depth', 'block', 'num_classes', 'widths', "
                     "'stage_blocks'])")
    assert not (tmp_path / "run").exists()


def test_a_shape_of_another_network_than_the_teachers_is_refused(tmp_path):
    teacher = tmp_path / "teacher.keras"
    CifarResNet(ArchConfig.full("resnet8")).save(teacher)
    released56 = tmp_path / "ResNet56.config"  # a released-shape file, as the paper's authors give them
    released56.write_text(json.dumps(ArchConfig.full("resnet56").to_released(mflops=125.75)))
    for mode in ("init", "init_kd"):  # init copies the teacher's weights: only its own network fits
        with pytest.raises(ValueError, match=rf"^the shape is a resnet56 with 10 classes on \(32, 32, 3\) images "
                                             rf"but the teacher {teacher} is a resnet8 with 10 classes on "
                                             r"\(32, 32, 3\) images: give a shape of the teacher's network$"):
            distill(str(tmp_path / mode), arch_path=str(released56), teacher_path=str(teacher), mode=mode)
        assert not (tmp_path / mode).exists()
    hundred = tmp_path / "c100.json"  # KD compares logits: another depth is fine, other classes are not
    hundred.write_text(ArchConfig.full("resnet8", num_classes=100).to_json())
    with pytest.raises(ValueError, match=r"^the shape is a resnet8 with 100 classes on .* but the teacher .* is a "
                                         r"resnet8 with 10 classes"):
        distill(str(tmp_path / "kd"), arch_path=str(hundred), teacher_path=str(teacher), mode="kd")


# The run.json of `distill(out, arch_path="arch.json", teacher_path="teacher.keras")` as the code before
# DistillConfig wrote it (commit 73fe90b): input_convention, a later setting, only when given.
PREVIOUS_RUN_FILE = {
    "arch_path": "arch.json", "teacher_path": "teacher.keras", "mode": "kd", "dataset_name": "cifar10_mini",
    "data_dir": None, "epochs": 10, "batch_size": 256, "learning_rate": 0.1, "alpha": 0.9, "temperature": 4.0,
    "seed": 0, "max_train_examples": None, "image_size": None, "mixed_precision": None, "stage": "distill"}


def test_a_distill_config_records_what_the_previous_code_recorded_and_refuses_bad_settings():
    config = DistillConfig(arch_path="arch.json", teacher_path="teacher.keras", streaming="never")
    assert config.run_record() == PREVIOUS_RUN_FILE
    assert DistillConfig.from_dict(config.to_dict()) == config
    for overrides, message in ((dict(mode="fast"), "mode must be one of .* got 'fast'"),
                               (dict(alpha=1.5), r"KD alpha must be in \[0, 1\], got 1.5"),
                               (dict(temperature=0.0), "KD temperature must be > 0, got 0.0"),
                               (dict(kd_alpha=0.5), "DistillConfig has no setting 'kd_alpha'")):
        with pytest.raises(ValueError, match=message):
            config.replace(**overrides)
