"""Mixed precision (tas_keras.precision), on CPU with bfloat16: base training, the search and KD run
under it with float32 variables and finite losses; their first-step loss is the float32 one within
what bfloat16 rounding allows; the policy stays inside the stage; saved models are float32."""

import json
import math
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

from tas_keras.export.exporter import export_and_verify
from tas_keras.distill import KnowledgeDistiller
from tas_keras.graph import read_model
from tas_keras.graph_space import INDEPENDENT, TIED
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.precision import computes_in_float32, dtype_policy_scope, float32_copy
from tas_keras.search import TASSearchModel
from tas_keras.search_space import ArchConfig
from tas_keras.supernet import GraphSupernet
from tas_keras.training import save_model, train_base
from tas_keras.prune import run_prune

from .conftest import REPO, predefined_arch
from .test_supernet import convnext_cnn, user_cnn

BF16 = "mixed_bfloat16"
# bfloat16 keeps 8 significant bits: rounding to nearest errs by at most 2^-8 of the value.
BFLOAT16_ROUNDOFF = 2.0 ** -8


def _layers(layer):
    yield layer
    for inner in getattr(layer, "layers", ()):
        yield from _layers(inner)


def _bfloat16_layers(model):
    return sum(layer.compute_dtype == "bfloat16" for layer in _layers(model))


def _tolerance(terms):
    """4 standard deviations of the change in a batch-mean loss when the logits it reads come from
    bfloat16 layers, from terms (float32 logits [batch, classes], layers computing in bfloat16, bound
    on the L2 norm of one example's loss gradient w.r.t. its logits).

    Every bfloat16 layer rounds its output once, to nearest: a relative error uniform within
    +-u, u = 2^-8, of standard deviation u / sqrt(3). n such roundings, independent, add up in
    quadrature, so a logit strays by about sqrt(n) u / sqrt(3) times the logits' RMS. An example's
    loss moves by its gradient (L2 norm <= g) dotted with those errors, and the batch mean of B
    independent examples by 1 / sqrt(B) of that."""
    deviation = 0.0
    for logits, rounding_layers, gradient_norm in terms:
        logits = np.asarray(logits)
        logit_error = math.sqrt(rounding_layers) * BFLOAT16_ROUNDOFF / math.sqrt(3) * np.sqrt(np.mean(logits ** 2))
        deviation = math.hypot(deviation, gradient_norm * logit_error / math.sqrt(len(logits)))
    return 4 * deviation


def _assert_float32_variables(model):
    floats = [v for v in model.variables if keras.backend.is_float_dtype(v.dtype)]
    assert floats and all(v.dtype == "float32" for v in floats), {v.path: v.dtype for v in floats}


def _assert_first_loss_matches(losses, tolerance):
    """Both runs finite; the bfloat16 one near the float32 one, yet not equal (it did run in bfloat16)."""
    float32, bfloat16 = losses[None], losses[BF16]
    assert np.all(np.isfinite(float32)) and np.all(np.isfinite(bfloat16)), losses
    assert 0 < abs(bfloat16[0] - float32[0]) <= tolerance, (float32[0], bfloat16[0], tolerance)


def _images(shape, count=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(count, *shape)).astype("float32"), rng.integers(0, 10, count).astype("int32")


def _sharpen_head(model, name="head_fc", factor=300.0):
    """Logits of a few units instead of ~0.05 at init: a loss near log(classes) hides the body's errors."""
    layer = model.get_layer(name)
    layer.kernel.assign(layer.kernel * factor)


def test_scope_sets_the_policy_and_always_restores_it(tmp_path):
    with dtype_policy_scope(BF16):
        layer = keras.layers.Dense(2)
        with dtype_policy_scope(None):  # None is float32, whatever the enclosing policy
            assert keras.layers.Dense(2).compute_dtype == "float32"
        assert keras.config.dtype_policy().name == BF16
    assert (layer.compute_dtype, layer.variable_dtype) == ("bfloat16", "float32")
    assert keras.config.dtype_policy().name == "float32"
    with pytest.raises(ValueError, match="must be one of mixed_bfloat16, mixed_float16 .* got 'float8'"):
        with dtype_policy_scope("float8"):
            pass
    with pytest.raises(ValueError, match="got 'mixed_float8'"):
        run_prune(str(tmp_path / "prune"), mixed_precision="mixed_float8")  # before any work
    assert not (tmp_path / "prune").exists()
    with pytest.raises(ValueError, match="epochs, batch_size and learning_rate must be positive"):
        train_base("unused", epochs=0, mixed_precision=BF16)  # fails inside the stage's scope
    assert keras.config.dtype_policy().name == "float32"


def test_base_training_steps_match_float32():
    arch = ArchConfig.full("resnet8", input_shape=(16, 16, 3))
    keras.utils.set_random_seed(0)
    reference = CifarResNet(arch)
    _sharpen_head(reference)
    images, labels = _images(arch.input_shape)
    losses, logits, rounding = {}, None, None
    for policy in (None, BF16):
        with dtype_policy_scope(policy):
            model = CifarResNet(arch)
            model.set_weights(reference.get_weights())
            model.compile(keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        if policy is None:
            logits = model(images, training=True)
        else:
            rounding = _bfloat16_layers(model)
            assert model.get_layer("head_fc").compute_dtype == "float32"  # the logits
        losses[policy] = [float(model.train_on_batch(images, labels)) for _ in range(3)]
        _assert_float32_variables(model)
    assert rounding > 20
    _assert_first_loss_matches(losses, _tolerance([(logits, rounding, math.sqrt(2))]))  # |p - y| <= sqrt(2)


@pytest.mark.parametrize("name", ["resnet8", "user_cnn", "convnext_cnn"])
def test_search_steps_match_float32(name):
    """GraphSupernet under TASSearchModel: the CIFAR ResNet (independent adds, CWI in the depth mix, the
    stride-2 shortcut) and functional CNNs (copied layers, masks, a depthwise conv; LayerNormalizations
    over the sampled width, Dense layers on feature maps as searchable convs)."""
    keras.utils.set_random_seed(0)
    if name == "resnet8":
        source = CifarResNet(ArchConfig.full("resnet8", input_shape=(8, 8, 3)))
        _sharpen_head(source)
        space = read_model(source, add_mode=INDEPENDENT)
    else:
        source = {"user_cnn": user_cnn, "convnext_cnn": convnext_cnn}[name]()
        space = read_model(source, add_mode=TIED)
    (images, labels), (valid_images, valid_labels) = (_images(space.input_shape, 8, seed) for seed in (1, 2))
    batch = ((images, labels), (valid_images, valid_labels)) if name == "resnet8" else (
        (images, labels % 4), (valid_images, valid_labels % 4))
    losses, logits, rounding = {}, None, None
    for policy in (None, BF16):
        with dtype_policy_scope(policy):
            supernet = GraphSupernet(source, space, normalize_every_conv=name == "resnet8")
            supernet.init_from_source(source)
            search = TASSearchModel(supernet, target_ratio=0.5, seed=3)
            search.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                           arch_optimizer=keras.optimizers.Adam(0.01, beta_1=0.5, beta_2=0.999))
        arch_before = [v.numpy() for v in supernet.arch_variables]
        if policy is None:
            logits = supernet(images, supernet.sample(search.tau, search._step_seed(0)))
        else:
            rounding = _bfloat16_layers(supernet)
        logs = [search.train_step(batch) for _ in range(3)]
        assert all(math.isfinite(float(value)) for step in logs for value in step.values()), logs
        losses[policy] = [float(step["loss"]) for step in logs]
        _assert_float32_variables(search)
        assert all(v.dtype == "float32" for v in [search.tau, *supernet.arch_variables])
        assert all(not np.array_equal(a, v.numpy()) for a, v in zip(arch_before, supernet.arch_variables))
    assert rounding > 10
    _assert_first_loss_matches(losses, _tolerance([(logits, rounding, math.sqrt(2))]))  # |p - y| <= sqrt(2)
    assert keras.config.dtype_policy().name == "float32"


def test_kd_steps_match_float32():
    full = ArchConfig.full("resnet8", input_shape=(16, 16, 3))
    keras.utils.set_random_seed(0)
    references = CifarResNet(full), CifarResNet(predefined_arch(full, 0.5, 0.2))
    _sharpen_head(references[0])  # a confident teacher: the KL term matters
    images, labels = _images(full.input_shape)
    alpha, temperature = 0.9, 4.0
    losses, terms = {}, []
    for policy in (None, BF16):
        with dtype_policy_scope(policy):
            teacher, student = CifarResNet(full), CifarResNet(references[1].arch)
            for model, reference in zip((teacher, student), references):
                model.set_weights(reference.get_weights())
            teacher.trainable = False
            distiller = KnowledgeDistiller(teacher, student, alpha, temperature)
            distiller.compile(keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
                              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        if policy == BF16:
            # The loss's gradient w.r.t. the student's logits: (1 - a)(p - y) + a T (p_s,T - p_t,T), of L2
            # norm <= sqrt(2) (1 - a + aT); w.r.t. the teacher's: a T (p_t,T - p_s,T), <= sqrt(2) aT.
            terms = [(references[1](images, training=True), _bfloat16_layers(student),
                      math.sqrt(2) * (1 - alpha + alpha * temperature)),
                     (references[0](images, training=False), _bfloat16_layers(teacher),
                      math.sqrt(2) * alpha * temperature)]
        losses[policy] = [distiller.train_on_batch(images, labels, return_dict=True)["loss"] for _ in range(3)]
        _assert_float32_variables(distiller)
    _assert_first_loss_matches(losses, _tolerance(terms))


def test_float32_copy_of_a_functional_model_saves_a_float32_file(tmp_path):
    """A functional model's layers keep their policy in the .keras file: the saved copy's are float32."""
    images = _images((8, 8, 3), 4)[0]
    with dtype_policy_scope(BF16):
        trained = user_cnn()
    assert not computes_in_float32(trained)
    copy = float32_copy(trained)
    assert computes_in_float32(copy) and not computes_in_float32(trained)
    with dtype_policy_scope(None):
        reference = user_cnn()
    reference.set_weights(trained.get_weights())
    np.testing.assert_array_equal(copy(images), reference(images))
    trained.save(tmp_path / "as_trained.keras")
    save_model(trained, str(tmp_path / "model.keras"))
    assert BF16 in _saved_config(tmp_path / "as_trained.keras")  # what the copy is for
    assert BF16 not in _saved_config(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert computes_in_float32(loaded)
    np.testing.assert_array_equal(loaded(images), reference(images))
    assert float32_copy(reference) is reference


def _saved_config(path):
    with zipfile.ZipFile(path) as archive:
        return archive.read("config.json").decode()


def test_train_base_under_bfloat16_saves_a_float32_model_that_exports(tmp_path):
    out = tmp_path / "base"
    metrics = train_base(str(out), model_name="resnet8", epochs=1, batch_size=64, max_train_examples=64,
                         mixed_precision=BF16)
    assert keras.config.dtype_policy().name == "float32"
    assert math.isfinite(metrics["history"]["loss"][0])
    assert json.loads((out / "run.json").read_text())["mixed_precision"] == BF16
    model = keras.saving.load_model(out / "model.keras")
    assert computes_in_float32(model)
    report = export_and_verify(str(tmp_path / "export"), model_path=str(out / "model.keras"), quantize="none",
                               latency_runs=5, representative_size=16)
    assert report["passed"]


def test_mixed_float16_scales_and_unscales_both_search_steps():
    """Both optimizers of the search are loss-scaled under mixed_float16; with SGD for both steps the
    updates equal float32's (a missing unscale or a scale outside the tape would be off by 2^15, or
    leave no gradient)."""
    source = user_cnn()
    space = read_model(source, add_mode=TIED)
    (images, labels), (valid_images, valid_labels) = (_images(space.input_shape, 8, seed) for seed in (1, 2))
    batch = ((images, labels % 4), (valid_images, valid_labels % 4))
    moves = {}
    for policy in (None, "mixed_float16"):
        keras.utils.set_random_seed(0)  # the same architecture logits, so the same side of the cost band
        with dtype_policy_scope(policy):
            supernet = GraphSupernet(source, space)
            supernet.init_from_source(source)
            search = TASSearchModel(supernet, target_ratio=0.5, seed=3)
            search.compile(optimizer=keras.optimizers.SGD(0.1), arch_optimizer=keras.optimizers.SGD(1.0))
        scaled = [isinstance(o, keras.optimizers.LossScaleOptimizer) for o in (search.optimizer, search.arch_optimizer)]
        assert scaled == [policy is not None] * 2
        before = [v.numpy() for v in (*supernet.weight_variables, *supernet.arch_variables)]
        search.train_step(batch)
        moves[policy] = np.concatenate([(v.numpy() - b).ravel() for v, b in zip(
            (*supernet.weight_variables, *supernet.arch_variables), before)])
    weights = sum(v.numpy().size for v in supernet.weight_variables)
    for part in (slice(None, weights), slice(weights, None)):  # the weight step, the architecture step
        float32, float16 = moves[None][part], moves["mixed_float16"][part]
        assert np.linalg.norm(float32) > 0
        # float16 keeps 11 significant bits: the moves agree to a few percent, not to a factor 2^15.
        assert np.linalg.norm(float16 - float32) <= 0.05 * np.linalg.norm(float32)


def test_cli_rejects_a_bad_mixed_precision_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "train.base", f"--out={tmp_path / 'run'}",
                             "--mixed_precision=float16"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "--mixed_precision=float16" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
