import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tas_keras.cost import count_arch, count_model
from tas_keras.cifar_shapes import arch_from_shape
from tas_keras.layers import DepthMixer, WidthChoice, cwi_transition, sample_two_widths
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.runs import RunMismatchError, prepare_run_dir
from tas_keras.search import (ARCH_FILE, ArchLearningRate, LinearRamp, SearchConfig, arch_learning_rate_for,
                              TASSearchModel, convergence, cost_band, decision_summary, run_search, tau_at)
from tas_keras.search_space import ArchConfig, candidate_widths
from tas_keras.shapes import derive_network, load_shape, shape_space
from tas_keras.supernet import build_supernet

from .conftest import REPO, assert_refused_before_any_work


def _cifar_supernet(model, input_shape=(32, 32, 3), width_multiple=1):
    """The search's supernet of a CIFAR ResNet (independent Adds, every conv normalised)."""
    return build_supernet(model, CifarResNet(ArchConfig.full(model, input_shape=input_shape)),
                          width_multiple=width_multiple)


def _derived_arch(supernet):
    """The argmax shape of a CIFAR ResNet's supernet as an ArchConfig."""
    return arch_from_shape(supernet.space, supernet.derive())


def _search_model(model="resnet20", input_shape=(8, 8, 3), target=0.5, weight_lr=0.1, arch_lr=1e-3):
    supernet = _cifar_supernet(model, input_shape)
    search = TASSearchModel(supernet, target_ratio=target)
    search.compile(optimizer=keras.optimizers.SGD(weight_lr),
                   arch_optimizer=keras.optimizers.Adam(arch_lr, beta_1=0.5, beta_2=0.999))
    return search


def _random_batches(input_shape, batch=8, steps=1, seed=0):
    rng = np.random.default_rng(seed)
    def half():
        return (rng.normal(size=(steps * batch, *input_shape)).astype("float32"),
                rng.integers(0, 10, steps * batch).astype("int32"))
    (x, y), (xv, yv) = half(), half()
    return tf.data.Dataset.zip((tf.data.Dataset.from_tensor_slices((x, y)).batch(batch),
                                tf.data.Dataset.from_tensor_slices((xv, yv)).batch(batch)))


def test_hardware_aligned_candidates():
    assert candidate_widths(16, multiple_of=8) == (8, 16)
    assert candidate_widths(64, multiple_of=8) == (16, 24, 32, 40, 48, 56, 64)
    assert candidate_widths(32, multiple_of=16) == (16, 32)
    assert candidate_widths(16, multiple_of=16) == (16,)


@pytest.mark.parametrize("in_width, out_width", [(16, 16), (9, 16), (4, 14), (19, 25), (1, 5), (57, 64)])
def test_cwi_widens_by_adaptive_average_pooling_at_full_width(in_width, out_width):
    x = np.zeros(64, np.float32)
    x[:in_width] = np.random.default_rng(0).normal(size=in_width)
    widened = tf.linalg.matvec(cwi_transition(in_width, out_width, 64), x, transpose_a=True).numpy()
    expected = [x[math.floor(j * in_width / out_width):math.ceil((j + 1) * in_width / out_width)].mean()
                for j in range(out_width)]
    np.testing.assert_allclose(widened[:out_width], expected, rtol=1e-5)
    assert not widened[out_width:].any()


@tf.function
def _draw(alpha, tau, seeds):
    return tf.map_fn(lambda s: sample_two_widths(alpha, tau, s), seeds,
                     fn_output_signature=(tf.int32, tf.float32))


def test_two_distinct_draws_follow_the_distribution():
    probs = np.array([0.05, 0.1, 0.15, 0.2, 0.5], np.float32)
    seeds = tf.stack([tf.zeros(4000, tf.int64), tf.range(4000, dtype=tf.int64)], axis=1)
    # At a small tau, pi is the one-hot of a Gumbel-max draw, so the first pick follows softmax(alpha)
    # and the second is uniform over the rest.
    picks, weights = _draw(tf.math.log(probs), tf.constant(1e-3), seeds)
    picks, weights = picks.numpy(), weights.numpy()
    assert (picks[:, 0] != picks[:, 1]).all()
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
    first = np.bincount(picks[:, 0], minlength=5) / len(picks)
    np.testing.assert_allclose(first, probs, atol=0.025)
    second = np.bincount(picks[:, 1], minlength=5) / len(picks)
    expected_second = sum(p * np.where(np.arange(5) == i, 0, 0.25) for i, p in enumerate(probs))
    np.testing.assert_allclose(second, expected_second, atol=0.025)
    # A large tau flattens pi: both picks become close to uniform whatever alpha says.
    flat, _ = _draw(tf.math.log(probs), tf.constant(100.0), seeds)
    np.testing.assert_allclose(np.bincount(flat.numpy().ravel(), minlength=5) / flat.numpy().size, 0.2,
                               atol=0.03)


def test_a_width_choice_hands_its_two_draws_over_wider_first():
    """The convs of a slot take the first pick as the wider one: the choice reorders the two draws,
    each keeping its own weight."""
    choice = WidthChoice([4, 8, 12, 16])
    choice.build()
    choice.alpha.assign([0.3, -0.2, 0.1, 0.0])
    reordered = 0
    for index in range(40):
        seed = tf.constant([index, 7], tf.int64)
        picks, weights = (t.numpy() for t in choice.sample(tf.constant(2.0), seed))
        drawn_picks, drawn_weights = (t.numpy() for t in sample_two_widths(choice.alpha, tf.constant(2.0), seed))
        assert picks[0] > picks[1]
        assert dict(zip(picks, weights)) == dict(zip(drawn_picks, drawn_weights))
        reordered += drawn_picks[0] < drawn_picks[1]
    assert 0 < reordered < 40  # both orders were drawn


@pytest.mark.parametrize("model, multiple", [("resnet20", 1), ("resnet20", 8), ("resnet29_bottleneck", 1)])
def test_argmax_cost_is_the_exact_cost_of_the_derived_net(model, multiple):
    supernet = _cifar_supernet(model, width_multiple=multiple)
    for seed in range(4):
        for i, variable in enumerate(supernet.arch_variables):
            variable.assign(tf.random.stateless_normal(variable.shape, [seed, i]))
        derived = _derived_arch(supernet)
        assert int(supernet.argmax_cost("flops")) == count_arch(derived).flops
        assert int(supernet.argmax_cost("params")) == count_arch(derived).params
    assert count_model(CifarResNet(derived)).flops == int(supernet.argmax_cost("flops"))


def test_architecture_loss_reaches_every_alpha_and_beta():
    search = _search_model(target=0.1)  # the full-width argmax is far above: the cost term is active
    (images, labels), _ = next(iter(_random_batches((8, 8, 3))))
    with tf.GradientTape() as tape:
        logits = search.supernet(images, search.supernet.sample(search.tau, search._step_seed(1)))
        cost_loss, _, _ = search.cost_loss()
        loss = search.cross_entropy(labels, logits) + 2.0 * cost_loss
    gradients = tape.gradient(loss, search.supernet.arch_variables)
    assert len(gradients) == 19 + 3
    for variable, gradient in zip(search.supernet.arch_variables, gradients):
        assert gradient is not None and float(tf.norm(gradient)) > 0, variable.path


@pytest.mark.parametrize("frozen", ["architecture", "weights"])
def test_each_step_updates_only_its_own_variables(frozen):
    search = _search_model("resnet14", weight_lr=0.0 if frozen == "weights" else 0.1,
                           arch_lr=0.0 if frozen == "architecture" else 0.01, target=0.1)
    weights = [v.numpy() for v in search.supernet.weight_variables]
    arch = [v.numpy() for v in search.supernet.arch_variables]
    search.fit(_random_batches((8, 8, 3)), epochs=1, verbose=0)
    weights_moved = any(not np.array_equal(a, v.numpy()) for a, v in zip(weights, search.supernet.weight_variables))
    arch_moved = any(not np.array_equal(a, v.numpy()) for a, v in zip(arch, search.supernet.arch_variables))
    # With one optimizer at lr 0 the other step alone ran: it must not have touched the frozen set.
    assert (weights_moved, arch_moved) == ((False, True) if frozen == "weights" else (True, False))


def test_short_search_drives_the_argmax_cost_into_the_band():
    keras.utils.set_random_seed(1)
    search = _search_model(target=0.3, arch_lr=0.01)
    search.tau.assign(1.0)
    rng = np.random.default_rng(1)
    for variable in search.supernet.arch_variables:  # start from the full network, widest preferred
        variable.assign(variable + np.linspace(0, 0.3, variable.shape[0]) * rng.uniform(0.5, 1.5))
    low, high = search.cost_low / search.base_cost, search.cost_high / search.base_cost
    ratios = [int(search.supernet.argmax_cost()) / search.base_cost]
    for epoch in range(10):
        search.fit(_random_batches((8, 8, 3), steps=5, seed=epoch), epochs=1, verbose=0)
        ratios.append(int(search.supernet.argmax_cost()) / search.base_cost)
    assert ratios[0] == 1.0
    assert any(low <= r <= high for r in ratios[-5:]), ratios
    assert low - 0.025 <= np.mean(ratios[-5:]) <= high + 0.025, ratios
    assert count_arch(_derived_arch(search.supernet)).flops == int(search.supernet.argmax_cost())


def test_cost_loss_sign_follows_the_band():
    search = _search_model(target=0.5)
    for ratio, sign in ((0.6, 1.0), (0.3, -1.0), (0.47, 0.0)):
        for variable in search.supernet.arch_variables:
            variable.assign(tf.zeros_like(variable))
        argmax = float(search.supernet.argmax_cost())
        search.cost_low, search.cost_high = argmax / ratio * 0.45, argmax / ratio * 0.5
        loss, expected, _ = search.cost_loss()
        assert float(loss) == pytest.approx(sign * math.log(float(expected)))


def test_supernet_from_base_at_full_shape_equals_base():
    arch = ArchConfig.full("resnet20", input_shape=(8, 8, 3))
    base = CifarResNet(arch)
    for layer in base.layers:  # non-trivial BN affines, so a wrong copy shows
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.gamma.assign(tf.random.uniform(layer.gamma.shape, 0.5, 1.5))
            layer.beta.assign(tf.random.normal(layer.beta.shape))
    supernet = build_supernet(arch.name, CifarResNet(arch))
    supernet.init_from_source(base)
    full = ({c.name: (tf.fill([2], len(c.candidates) - 1), tf.constant([1.0, 0.0]))
             for c in supernet.width_choices},
            [tf.one_hot(len(m.depth_choices) - 1, len(m.depth_choices)) for _, m in supernet.stages])
    images = tf.random.normal((16, 8, 8, 3))
    np.testing.assert_allclose(supernet(images, full), _base_with_normalised_shortcuts(base, images), atol=1e-4)


def _base_with_normalised_shortcuts(base, images):
    """The base network run layer by layer in training mode, except that every stride-2 shortcut
    conv is followed by batch normalisation with identity affine, as the reference's search forward
    normalises every conv (its derived network has no BN there)."""
    layer = base.get_layer

    def normalised(x):
        mean, variance = tf.nn.moments(x, axes=[0, 1, 2])
        return (x - mean) / tf.sqrt(variance + 1e-5)

    x = tf.nn.relu(layer("stem_bn")(layer("stem_conv")(images), training=True))
    for stage in (1, 2, 3):
        for block in (1, 2, 3):
            name = f"s{stage}_b{block}"
            y = tf.nn.relu(layer(f"{name}_bn_a")(layer(f"{name}_conv_a")(x), training=True))
            y = layer(f"{name}_bn_b")(layer(f"{name}_conv_b")(y), training=True)
            if stage > 1 and block == 1:
                x = normalised(layer(f"{name}_shortcut_conv")(layer(f"{name}_shortcut_pool")(x)))
            x = tf.nn.relu(x + y)
    return layer("head_fc")(tf.reduce_mean(x, axis=[1, 2]))


def test_tau_schedules_and_bands():
    # The reference anneals with progress epoch / epochs: tau_min would come one epoch after the last.
    assert tau_at(0, 10) == pytest.approx(5.0)
    assert tau_at(9, 10) == pytest.approx(0.1 + 4.9 * (1 + math.cos(0.9 * math.pi)) / 2)
    assert tau_at(2, 4) == pytest.approx(2.55)
    assert tau_at(2, 5, "linear", tau_max=10) == pytest.approx(10 - 9.9 * 0.4)
    assert cost_band(0.5, 0.05, "code") == pytest.approx((0.45, 0.5))
    assert cost_band(0.5, 0.05, "paper") == pytest.approx((0.475, 0.525))
    with pytest.raises(ValueError, match="band must be one of"):
        cost_band(0.5, 0.05, "both")
    with pytest.raises(ValueError, match="target_ratio must be in \\(0, 1\\), got 1.5"):
        TASSearchModel(_cifar_supernet("resnet8", (8, 8, 3)), 1.5)


# The outcome of this search (resnet20, seed 0, the bundled data's first 256 images, batch 32, 2 epochs,
# target 0.5, no warm-up), recorded through run_search at commit 5871ad1, whose architecture step ran at
# rate 0 through the warm-up (and there equalled the CIFAR-only supernet that preceded the graph one,
# commit 5cd9e0f): the argmax (widths, stage_blocks) as an ArchConfig, its FLOPs, and the epoch means of
# the expected and argmax FLOP ratios. Without a warm-up the skipped steps of today's search change nothing.
RECORDED_SEARCH = [
    ([11, 11, 11, 11, 12, 12, 11, 22, 22, 22, 22, 22, 22, 44, 44, 44, 44, 44, 44], [3, 2, 2], 15_610_306,
     0.4272367060184479, 0.43871572613716125),
    ([11, 11, 11, 11, 12, 12, 11, 22, 22, 22, 22, 22, 22, 44, 44, 44, 44, 44, 44], [3, 2, 2], 15_610_306,
     0.387454628944397, 0.3824819028377533),
]


@pytest.mark.slow
def test_run_search_writes_a_shape_that_builds_and_counts(tmp_path):
    out = str(tmp_path / "search")
    settings = dict(model_name="resnet20", epochs=2, batch_size=32, max_train_examples=256,
                    target_ratio=0.5, arch_warmup=0.0, entropy_weight=2.0)  # as RECORDED_SEARCH ran
    result = run_search(out, **settings)
    shape = load_shape(os.path.join(out, "arch.json"))
    assert shape.to_dict() == result and shape.model == "resnet20"
    space = shape_space(shape)
    arch = arch_from_shape(space, shape)  # the shape as the CIFAR builder and the reference take it
    assert count_arch(arch).flops == arch.provenance["flops"]
    assert count_model(CifarResNet(arch)).flops == arch.provenance["flops"]
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    assert [e["epoch"] for e in history] == [0, 1]
    for entry, (widths, stage_blocks, flops, expected_ratio, argmax_ratio) in zip(history, RECORDED_SEARCH):
        recorded = arch_from_shape(space, space.shape(entry["widths"], entry["depths"]))
        assert (list(recorded.widths), list(recorded.stage_blocks), entry["flops"]) == (widths, stage_blocks, flops)
        # The two supernets sum their costs and weight decays in different orders: float noise only.
        assert entry["logs"]["expected_cost_ratio"] == pytest.approx(expected_ratio, rel=1e-4)
        assert entry["logs"]["argmax_cost_ratio"] == pytest.approx(argmax_ratio, rel=1e-6)
    chosen = history[arch.provenance["epoch"]]
    assert {"widths": chosen["widths"], "depths": chosen["depths"]} == shape.point()
    band = [e for e in history if 0.45 * 40_813_194 <= e["flops"] <= 0.5 * 40_813_194]
    assert chosen == (band or history)[-1]  # the last epoch inside the band, else the last
    assert history[0]["tau"] == pytest.approx(5.0) and history[1]["tau"] == pytest.approx(2.55)
    assert os.path.getsize(os.path.join(out, "search.png")) > 10_000
    assert os.path.getsize(os.path.join(out, "curves.png")) > 10_000
    changed = sum(history[0]["widths"][slot] != width for slot, width in history[1]["widths"].items())
    assert history[1]["logs"]["width_changes"] == changed and "width_changes" not in history[0]["logs"]
    assert 1 / 8 <= history[1]["logs"]["width_top1"] < 1 and 0 < history[1]["logs"]["width_entropy"] <= math.log(8)
    assert run_search(out, **settings) == result  # finished: not searched again


def _user_cnn(input_shape=(32, 32, 3), classes=10):
    """A small functional CNN with a droppable residual block and a Dense head."""
    layers = keras.layers
    inputs = keras.Input(input_shape, name="image")
    x = layers.ReLU(name="stem_relu")(layers.BatchNormalization(name="stem_bn")(
        layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inputs)))
    for block in ("b1", "b2"):
        y = layers.Conv2D(8, 3, padding="same", use_bias=False, name=f"{block}_conv")(x)
        x = layers.ReLU(name=f"{block}_relu")(layers.Add(name=f"{block}_add")(
            [x, layers.BatchNormalization(name=f"{block}_bn")(y)]))
    outputs = layers.Dense(classes, name="head")(layers.GlobalAveragePooling2D(name="pool")(x))
    return keras.Model(inputs, outputs, name="user_cnn")


@pytest.mark.slow
def test_run_search_of_a_keras_file_writes_a_pruned_shape(tmp_path):
    path = str(tmp_path / "user_cnn.keras")
    _user_cnn().save(path)
    out = str(tmp_path / "search")
    result = run_search(out, model_name=path, epochs=2, batch_size=16, max_train_examples=128, target_ratio=0.5)
    shape = load_shape(os.path.join(out, "arch.json"))
    assert shape.to_dict() == result
    assert (shape.model, shape.input_shape, shape.num_classes, shape.add_mode) == (path, (32, 32, 3), 10, "tied")
    shape_space(shape).validate(shape)
    # Tied Adds: the stem and both blocks' convs write one width; one stage of the two blocks.
    assert len(shape.widths) == 1 and len(shape.depths) == 1
    derived = derive_network(shape)
    assert count_model(derived).flops == shape.provenance["flops"]
    assert shape.provenance["flops_ratio"] == pytest.approx(shape.provenance["flops"] / count_model(_user_cnn()).flops)
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    chosen = history[shape.provenance["epoch"]]
    assert {"widths": chosen["widths"], "depths": chosen["depths"]} == shape.point()
    assert "width_changes" in history[1]["logs"] and "depth_changes" in history[1]["logs"]
    assert os.path.getsize(os.path.join(out, "search.png")) > 10_000
    summary = decision_summary(history, result)
    assert summary["depths"] == result["depths"] and summary["chosen_epoch"] == shape.provenance["epoch"] + 1


def test_run_search_refuses_a_keras_file_that_does_not_fit_the_data(tmp_path):
    path = str(tmp_path / "small.keras")
    _user_cnn((16, 16, 3), 4).save(path)
    # The data is read at the model's 16 px (it states its input); its 10 classes are not the model's 4.
    with pytest.raises(ValueError, match=f"{path} takes 16x16x3 images and gives 4 classes; the dataset "
                                         "cifar10_mini has 16x16x3 images and 10 classes"):
        run_search(str(tmp_path / "search"), model_name=path)
    assert not (tmp_path / "search").exists()


@pytest.mark.parametrize("args, message", [
    (["--model=resnet23"], "error: depth 23 is not valid for basic blocks"),
    (["--add_mode=wide"], "--add_mode=wide"),
    (["--band=wide"], "--band"),
])
def test_search_cli_rejects_bad_input_before_any_work(tmp_path, args, message):
    """What run_search refuses (below) and flag values absl's parser refuses."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "train.search", f"--out={out}", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("options, message", [
    (dict(target_ratio=1.5), r"target ratio must be in \(0, 1\), got 1.5"),
    (dict(model_name="/no/model.keras"), "model file '/no/model.keras' does not exist"),
    (dict(init_from="/no/base.keras"), "--init_from: no such file '/no/base.keras'"),
    # 64 images of 10 classes split per class: halves of 30 and 34, so not one batch of 32 in the smaller
    (dict(model_name="resnet8", max_train_examples=64, batch_size=32),
     r"batch_size 32 is larger than the smaller search half \(30 images\)"),
])
def test_run_search_refuses_bad_input_before_any_work(tmp_path, options, message):
    assert_refused_before_any_work(run_search, tmp_path / "run", message, **options)


@pytest.mark.parametrize("overrides, message", [
    (dict(target_ratio=1.5), r"target ratio must be in \(0, 1\), got 1.5"),
    (dict(tolerance=0.6), r"tolerance must be in \[0, target ratio\), got 0.6"),
    (dict(epochs=0), "epochs, batch_size and learning_rate must be positive, got 0, 256, 0.1"),
    (dict(tau_schedule="step"), "tau schedule must be one of .* got 'step'"),
    (dict(arch_warmup=1.0), r"warm-up must be a fraction in \[0, 1\), got 1.0"),
    (dict(cost_metric="latency"), "the latency cost needs a latency table"),
    (dict(mixed_precision="float8"), "got 'float8'"),
    (dict(model_name="vgg16"), "unknown model 'vgg16'"),
    (dict(epoch=3), "SearchConfig has no setting 'epoch'; its settings: dataset_name, .*epochs, "),
])
def test_a_search_config_refuses_a_bad_setting_quoting_it(overrides, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig().replace(**overrides)


def test_a_search_config_round_trips_through_its_dicts():
    config = SearchConfig(model_name="resnet56", epochs=3, add_mode="tied", streaming="never")
    assert SearchConfig.from_dict(config.to_dict()) == config
    record = config.run_record()
    # run.json: the settings of the result, not how the run ran (a resumed run may change those).
    assert record["stage"] == "search" and record["add_mode"] == "tied"
    assert not {"streaming", "checkpoint_steps", "strategy"} & set(record)
    assert SearchConfig.from_dict(record) == config.replace(streaming="auto")
    with pytest.raises(ValueError, match="config of the search stage, got settings of 'distill'"):
        SearchConfig.from_dict({**record, "stage": "distill"})


# The run.json of `run_search(out, model_name="resnet8", epochs=1)` as the code before SearchConfig wrote it
# (commit 73fe90b): the settings added later (add_mode, input_convention, arch_start_full) only when given.
PREVIOUS_RUN_FILE = {
    "model_name": "resnet8", "dataset_name": "cifar10_mini", "data_dir": None, "epochs": 1, "batch_size": 256,
    "target_ratio": 0.5, "cost_metric": "flops", "cost_weight": 2.0, "tolerance": 0.05, "band": "code",
    "tau_schedule": "cosine", "tau_max": 5.0, "tau_min": 0.1, "width_multiple": 1, "learning_rate": 0.1,
    "arch_learning_rate": None, "arch_warmup": 0.3, "arch_decay": "cosine", "entropy_weight": 0.0,
    "init_from": None, "seed": 0, "max_train_examples": None, "latency_table": None, "target_latency_ms": None,
    "image_size": None, "mixed_precision": None, "stage": "search"}


def test_a_run_directory_of_the_previous_code_resumes_with_the_same_settings(tmp_path):
    out = str(tmp_path / "search")
    os.makedirs(out)
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(PREVIOUS_RUN_FILE, f)
    config = SearchConfig(model_name="resnet8", epochs=1, checkpoint_steps=7)
    assert prepare_run_dir(out, config.run_record(), done_file=ARCH_FILE) == (out, False)
    with pytest.raises(RunMismatchError, match="epochs: 1 -> 2"):
        prepare_run_dir(out, config.replace(epochs=2).run_record(), done_file=ARCH_FILE)
    with pytest.raises(RunMismatchError, match="add_mode: None -> 'tied'"):
        prepare_run_dir(out, config.replace(add_mode="tied").run_record(), done_file=ARCH_FILE)


def _naive_cwi(x, out_width):
    """Channel-wise interpolation as the paper defines it: adaptive average pooling along channels."""
    width = x.shape[-1]
    return np.stack([x[..., math.floor(j * width / out_width):math.ceil((j + 1) * width / out_width)].mean(-1)
                     for j in range(out_width)], axis=-1)


def test_depth_mixer_with_different_block_widths_equals_the_naive_route():
    candidates = candidate_widths(16)
    mixer = DepthMixer((1, 2, 3), candidates)
    mixer.build()
    widths = [16, 8, 11]  # the block outputs' widths (zero beyond)
    rng = np.random.default_rng(0)
    outputs = [np.concatenate([rng.normal(size=(2, 3, 3, w)), np.zeros((2, 3, 3, 16 - w))], -1).astype("float32")
               for w in widths]
    weights = tf.constant([0.2, 0.5, 0.3])
    mixed, wider = mixer([tf.constant(o) for o in outputs], [tf.constant(w) for w in widths], weights)
    expected = sum(q * _naive_cwi(o[..., :w], 16) for q, o, w in zip(weights.numpy(), outputs, widths))
    assert int(wider) == 16
    np.testing.assert_allclose(mixed, expected, atol=1e-5)


@pytest.mark.parametrize("entropy_weight", [0.0, 3.0])
def test_architecture_step_inside_the_band_follows_the_cross_entropy_alone(entropy_weight):
    """Inside the band the cost term is 0: the step is the cross-entropy's gradient (plus, when the
    entropy term is on, its weight times the gradient of the distributions' mean entropy)."""
    supernet = _cifar_supernet("resnet14", (8, 8, 3))
    for i, variable in enumerate(supernet.arch_variables):  # not uniform, where the entropy's gradient is 0
        variable.assign(tf.random.stateless_normal(variable.shape, [7, i]))
    search = TASSearchModel(supernet, target_ratio=0.5, arch_weight_decay=0.0,
                            entropy_weight=(lambda step: entropy_weight) if entropy_weight else None)
    # A large rate: the step (before - after) / rate then keeps the gradient's digits in float32.
    search.compile(optimizer=keras.optimizers.SGD(0.0), arch_optimizer=keras.optimizers.SGD(1e4))
    argmax = float(supernet.argmax_cost())
    search.cost_low, search.cost_high = 0.99 * argmax, 1.01 * argmax  # the argmax is inside the band
    assert float(search.cost_loss()[0]) == 0.0
    before = [v.numpy() for v in supernet.arch_variables]
    batches = _random_batches((8, 8, 3))
    search.fit(batches, epochs=1, verbose=0)
    steps = [(b - v.numpy()) / 1e4 for b, v in zip(before, supernet.arch_variables)]  # the gradient

    for variable, value in zip(supernet.arch_variables, before):
        variable.assign(value)
    _, (valid_images, valid_labels) = next(iter(batches))
    with tf.GradientTape() as tape:  # the architecture step's sample: step 1 (after the weight step), phase 1
        logits = supernet(valid_images, supernet.sample(search.tau, search._step_seed(1)))
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(valid_labels, logits)
        distributions = [tf.nn.softmax(v) for v in supernet.arch_variables]
        mean_entropy = tf.add_n([-tf.reduce_sum(p * tf.math.log(p)) for p in distributions]) / len(distributions)
        loss += entropy_weight * mean_entropy
    gradients = tape.gradient(loss, supernet.arch_variables)
    for step, gradient, variable in zip(steps, gradients, supernet.arch_variables):
        assert np.abs(gradient).max() > 0, variable.path
        np.testing.assert_allclose(step, gradient, rtol=1e-4, atol=1e-7)


def _uniform_expected_flops(depth, block, classes=10):
    """E(A) at uniform alpha and beta, derived from docs/design.md sections 4 and 6 without the supernet:
    the mean candidate width of every conv chained through the network, each block weighted by the
    share of its stage's depth choices that keep it."""
    design = {16: (4, 6, 8, 9, 11, 12, 14, 16), 32: (9, 12, 16, 19, 22, 25, 28, 32),
              64: (19, 25, 32, 38, 44, 51, 57, 64)}
    mean = {c: np.mean(design.get(c, sorted({c * r // 10 for r in range(3, 11)}))) for c in (16, 32, 64, 128, 256)}
    n = (depth - 2) // (6 if block == "basic" else 9)
    choices = list(range(1, n + 1, 2)) + ([n] if n % 2 == 0 else [])
    total, width, size, full_in = 9 * 32 * 32 * 3 * mean[16], mean[16], 32, 16
    for stage, planes in enumerate((16, 32, 64)):
        for index in range(1, n + 1):
            stride = 2 if stage and index == 1 else 1
            out = size // stride
            layout = ([(9, out, planes), (9, out, planes)] if block == "basic" else
                      [(1, size, planes), (9, out, planes), (1, out, 4 * planes)])
            cost, block_in = 0.0, width
            for kernel, spatial, channels in layout:
                cost += kernel * spatial * spatial * width * mean[channels]
                width = mean[channels]
            if stride == 2 or full_in != layout[-1][2]:  # the full network's projection shortcut
                cost += out * out * block_in * width
            total += sum(d >= index for d in choices) / len(choices) * cost
            size, full_in = out, layout[-1][2]
    return total + (width + 1) * classes


@pytest.mark.parametrize("model, depth, block", [("resnet56", 56, "basic"), ("resnet110", 110, "basic"),
                                                 ("resnet164", 164, "bottleneck")])
def test_expected_cost_at_uniform_alpha_and_beta_of_deep_networks(model, depth, block):
    supernet = _cifar_supernet(model)
    for variable in supernet.arch_variables:
        variable.assign(tf.zeros_like(variable))
    assert float(supernet.expected_cost()) == pytest.approx(_uniform_expected_flops(depth, block), rel=1e-5)


def test_architecture_schedules():
    rate = ArchLearningRate(0.2, total_steps=70)  # steps of the architecture optimizer, after the warm-up
    assert float(rate(0)) == pytest.approx(0.2)
    assert float(rate(35)) == pytest.approx(0.1) and float(rate(70)) == pytest.approx(0.0, abs=1e-7)
    assert float(ArchLearningRate(0.2, 70, "constant")(69)) == pytest.approx(0.2)
    ramp = LinearRamp(4.0, total_steps=70)
    assert [float(ramp(s)) for s in (0, 35, 70, 100)] == pytest.approx([0, 2, 4, 4])
    assert arch_learning_rate_for(1000, 0.3, travel=20) == pytest.approx(20 / 700)
    assert arch_learning_rate_for(100_000, 0.0, travel=20) == 1e-3  # never below the reference's rate
    with pytest.raises(ValueError, match="architecture decay must be one of"):
        ArchLearningRate(0.2, 100, "linear")


def test_convergence_measures_entropy_top1_and_changes():
    supernet = _cifar_supernet("resnet8", (8, 8, 3))
    for variable in supernet.arch_variables:
        variable.assign(tf.zeros_like(variable))
    uniform = convergence(supernet)
    assert uniform["width_top1"] == pytest.approx(1 / 8) and uniform["width_entropy"] == pytest.approx(math.log(8))
    assert uniform["depth_top1"] == pytest.approx(1.0) and uniform["depth_entropy"] == pytest.approx(0.0)  # n=1
    supernet.width_choices[0].alpha.assign([0.0] * 7 + [math.log(7.0)])  # one conv: top-1 0.5, the rest 1/14 each
    decided = convergence(supernet)
    alphas = len([c for c in supernet.width_choices if c.alpha is not None])
    assert decided["width_top1"] == pytest.approx((0.5 + (alphas - 1) / 8) / alphas)
    stem_entropy = -(0.5 * math.log(0.5) + 7 / 14 * math.log(1 / 14))
    assert decided["width_entropy"] == pytest.approx((stem_entropy + (alphas - 1) * math.log(8)) / alphas)


def test_decision_summary_bounds_the_cost_that_was_searched():
    from tas_keras.search import decision_summary
    logs = {"width_top1": 0.9, "width_entropy": 0.1, "depth_top1": 0.9, "depth_entropy": 0.1, "valid_accuracy": 0.5}
    history = [{"epoch": e, "logs": logs, "widths": [4]} for e in range(3)]
    provenance = {"target_ratio": 0.5, "tolerance": 0.05, "band": "code", "epoch": 2, "arch_learning_rate": 0.1,
                  "search_wall_time_s": 1.0, "flops_ratio": 0.7, "params_ratio": 0.47, "latency_ratio": 0.6}
    for cost, in_band in (("params", True), ("flops", False), ("latency", False)):
        summary = decision_summary(history, {"provenance": {**provenance, "cost_metric": cost}})
        assert (summary["in_band"], summary["decides"], summary["cost"]) == (in_band, in_band, cost)


def test_warm_up_skips_the_architecture_step_then_turns_it_on():
    """4 steps with a 2-step warm-up: the architecture optimizer steps twice (the last two steps), and the
    architecture weights stay put until the warm-up is over."""
    from tas_keras.search import ArchWarmup
    search = _search_model("resnet8", arch_lr=0.01)
    arch = [v.numpy() for v in search.supernet.arch_variables]
    search.fit(_random_batches((8, 8, 3), steps=2), epochs=1, verbose=0, callbacks=[ArchWarmup(2)])
    assert int(search.arch_optimizer.iterations) == 0 and int(search.optimizer.iterations) == 2
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(arch, search.supernet.arch_variables))
    search.fit(_random_batches((8, 8, 3), steps=2, seed=1), epochs=1, verbose=0, callbacks=[ArchWarmup(2)])
    assert int(search.arch_optimizer.iterations) == 2 and int(search.optimizer.iterations) == 4
    assert any(not np.array_equal(a, v.numpy()) for a, v in zip(arch, search.supernet.arch_variables))
    # Turned on in the middle of a fit, too.
    fresh = _search_model("resnet8", arch_lr=0.01)
    logs = fresh.fit(_random_batches((8, 8, 3), steps=3), epochs=1, verbose=0, callbacks=[ArchWarmup(1)]).history
    assert int(fresh.arch_optimizer.iterations) == 2 and "valid_accuracy" in logs
