"""tas_keras.api: each stage one call on a user's Keras model and in-memory data."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tas_keras import api, data
from tas_keras.cost import count_model
from tas_keras.shapes import load_shape

from .test_supernet import unet_cnn, user_cnn

CLASSES = 4


def _arrays(seed=0, train=48, test=24, size=8):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (train, size, size, 3), dtype=np.uint8), rng.integers(0, CLASSES, train),
            rng.integers(0, 256, (test, size, size, 3), dtype=np.uint8), rng.integers(0, CLASSES, test))


@pytest.fixture(scope="module")
def pruned_end_to_end(tmp_path_factory):
    """search -> distill -> export of user_cnn (8 px, 4 classes) on random arrays, one epoch each."""
    root = tmp_path_factory.mktemp("api")
    keras.utils.set_random_seed(0)
    source = user_cnn()
    dataset = api.from_arrays(*_arrays(), class_names=["a", "b", "c", "d"])
    shape = api.search(source, dataset, 0.6, str(root / "search"), epochs=1, batch_size=8)
    student, metrics = api.distill(shape, source, dataset, str(root / "distill"), epochs=1, batch_size=8)
    report = api.export(student, dataset, str(root / "export"), quantize="int8", compare_with=source,
                        latency_runs=3, threads=1, representative_size=16)
    return root, source, dataset, shape, student, metrics, report


def test_search_returns_the_shape_it_wrote(pruned_end_to_end):
    root, source, dataset, shape, *_ = pruned_end_to_end
    assert shape == load_shape(root / "search" / "arch.json")
    assert shape.model == str(root / "search" / "source.keras")
    settings = json.loads((root / "search" / "run.json").read_text())
    assert settings["dataset_name"] == dataset.name and dataset.name.startswith("arrays-")
    # A finished run is returned again, not searched again; another model in its directory is refused.
    mtime = os.path.getmtime(root / "search" / "arch.json")
    assert api.search(source, dataset, 0.6, str(root / "search"), epochs=1, batch_size=8) == shape
    assert os.path.getmtime(root / "search" / "arch.json") == mtime
    keras.utils.set_random_seed(1)
    with pytest.raises(ValueError, match="holds another model than the one given"):
        api.search(user_cnn(), dataset, 0.6, str(root / "search"), epochs=1, batch_size=8)


def test_derived_model_costs_what_the_search_counted(pruned_end_to_end):
    root, source, _, shape, *_ = pruned_end_to_end
    derived = api.derive(source, shape)
    assert count_model(derived).flops == shape.provenance["flops"] < count_model(source).flops
    # From the shape's file, with weights transferred: the leading channels of the source's stem.
    transferred = api.derive(source, str(root / "search" / "arch.json"), transfer_weights=True)
    stem = transferred.get_layer("stem").kernel.numpy()
    np.testing.assert_array_equal(stem, source.get_layer("stem").kernel.numpy()[..., :stem.shape[-1]])


def test_distilled_model_is_the_saved_functional_model(pruned_end_to_end):
    root, _, dataset, shape, student, metrics, _ = pruned_end_to_end
    assert type(student).__name__ == "Functional"
    images = next(iter(dataset.test_batches(24)))[0]
    saved = keras.models.load_model(root / "distill" / "model.keras", compile=False)
    np.testing.assert_allclose(student(images), saved(images), atol=1e-6)
    assert metrics == json.loads((root / "distill" / "metrics.json").read_text())
    assert metrics["flops"] == shape.provenance["flops"] and metrics["mode"] == "kd"
    assert (root / "distill" / "teacher.keras").exists() and (root / "distill" / "given_shape.json").exists()
    # A finished run is returned again, not trained again.
    mtime = os.path.getmtime(root / "distill" / "model.keras")
    again, again_metrics = api.distill(shape, pruned_end_to_end[1], dataset, str(root / "distill"), epochs=1,
                                       batch_size=8)
    assert again_metrics == metrics and os.path.getmtime(root / "distill" / "model.keras") == mtime


def test_train_from_scratch_a_registry_network_or_a_searched_shape(pruned_end_to_end):
    root, source, dataset, shape, *_ = pruned_end_to_end
    full, metrics = api.train("resnet8", dataset, str(root / "train_full"), epochs=1, batch_size=8)
    assert full.input_shape == (None, 8, 8, 3) and full.output_shape == (None, CLASSES)
    assert metrics["flops"] == count_model(full).flops and metrics["model"] == "resnet8"
    pruned, metrics = api.train(shape, dataset, str(root / "train_pruned"), epochs=1, batch_size=8)
    assert count_model(pruned).flops == shape.provenance["flops"] == metrics["flops"]
    assert load_shape(root / "train_pruned" / "given_shape.json") == shape
    with pytest.raises(ValueError, match="train takes a registry name or a shape .* got Functional"):
        api.train(source, dataset, str(root / "train_model"))


def test_export_report_and_its_files(pruned_end_to_end):
    root, *_, report = pruned_end_to_end
    assert report == json.loads((root / "export" / "report.json").read_text())
    assert [m["role"] for m in report["models"]] == ["model", "compare_with"]
    for entry in report["models"]:
        assert os.path.getsize(entry["tflite"]["path"]) > 0 and os.path.isdir(entry["saved_model"]["path"])
        assert open(entry["labels"]).read().split() == ["a", "b", "c", "d"]
    assert report["models"][1]["flops"] > report["models"][0]["flops"]


def test_prune_runs_the_main_job_on_a_model_object_and_a_tf_data_set(tmp_path):
    train_images, train_labels, test_images, test_labels = _arrays()
    dataset = api.from_tf_data(tf.data.Dataset.from_tensor_slices((train_images, train_labels)).batch(16),
                               tf.data.Dataset.from_tensor_slices((test_images, test_labels)).batch(16))
    keras.utils.set_random_seed(0)
    source = user_cnn()
    report = api.prune(source, dataset, 0.6, str(tmp_path), batch_size=8, search_epochs=1, distill_epochs=1,
                       quantizations=("none",), check_base=False)  # an untrained model: at chance
    assert report == json.loads((tmp_path / "report.json").read_text())
    assert not (tmp_path / "base").exists()  # the model given is the base network and the teacher
    assert report["base"]["flops"] == count_model(source).flops > report["pruned"]["flops"]
    assert json.loads((tmp_path / "pipeline.json").read_text())["dataset"] == dataset.name


def test_from_tf_data_gives_the_arrays_of_from_arrays():
    train_images, train_labels, test_images, test_labels = _arrays(train=13, test=7)
    expected = api.from_arrays(train_images, train_labels, test_images, test_labels)
    train = tf.data.Dataset.from_tensor_slices((train_images, train_labels)).batch(5)  # last batch smaller
    test = tf.data.Dataset.from_tensor_slices((test_images.astype(np.float32), test_labels))  # unbatched, 0-255
    got = api.from_tf_data(train, test)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))
    assert got.name == expected.name and got.class_names == ("0", "1", "2", "3")
    pixels = train_images.reshape(-1, 3) / 255
    np.testing.assert_allclose(got.mean, pixels.mean(0), atol=1e-9)
    np.testing.assert_allclose(got.std, pixels.std(0), atol=1e-9)
    assert api.from_arrays(train_images, train_labels, test_images, test_labels + 1).name != expected.name


def test_from_tf_data_takes_masks_as_from_arrays_does():
    train_images, _, test_images, _ = _arrays(train=5, test=3)
    train_masks, test_masks = train_images[..., 0] % 3, test_images[..., 1] % 3
    expected = api.from_arrays(train_images, train_masks, test_images, test_masks)
    got = api.from_tf_data(tf.data.Dataset.from_tensor_slices((train_images, train_masks)).batch(2),
                           tf.data.Dataset.from_tensor_slices((test_images, test_masks)))  # unbatched
    assert got.per_pixel_labels and got.name == expected.name and got.class_names == ("0", "1", "2")
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))
    np.testing.assert_array_equal(got.test_labels, test_masks)


def test_a_loaded_dataset_passes_through_load_dataset():
    dataset = api.from_arrays(*_arrays())
    assert data.load_dataset(dataset) is dataset and data.load_dataset(dataset, image_size=8) is dataset
    assert data.load_dataset(dataset, max_train_examples=20).train_size == 20
    with pytest.raises(ValueError, match=r"image_size 16 differs from the given dataset"):
        data.load_dataset(dataset, image_size=16)


def _generated(shapes):
    return tf.data.Dataset.from_generator(
        lambda: ((np.zeros(s, np.uint8), 0) for s in shapes),
        output_signature=(tf.TensorSpec((None, None, 3), tf.uint8), tf.TensorSpec((), tf.int64)))


def _bad(**changes):
    train_images, train_labels, test_images, test_labels = _arrays(train=6, test=3)
    args = {**dict(train_images=train_images, train_labels=train_labels, test_images=test_images,
                   test_labels=test_labels), **changes}
    return lambda: api.from_arrays(**args)


@pytest.mark.parametrize("call, message", [
    (_bad(train_images=np.zeros((6, 8, 8, 3), np.float32)),
     r"train_images must be uint8 .* got float32 \[6, 8, 8, 3\]"),
    (_bad(test_images=np.zeros((3, 8, 8), np.uint8)), r"test_images must be uint8 RGB .* got uint8 \[3, 8, 8\]"),
    (_bad(test_images=np.zeros((3, 9, 9, 3), np.uint8)),
     r"train and test images differ in size: \[8, 8, 3\] and \[9, 9, 3\]"),
    (_bad(train_labels=np.zeros(5, int)), r"train_labels must be 6 integers .* got int64 \[5\]"),
    (_bad(train_labels=np.full(6, 0.5)), r"train_labels must be 6 integers .* got float64"),
    (_bad(test_labels=np.array([0, -1, 2])), r"labels must be non-negative, got -1"),
    (_bad(class_names=["a", "b"]), r"labels must be in \[0, 2\) \(one class per name\), got [23]"),
    (_bad(train_labels=np.zeros((6, 8, 7), int)),
     r"train_labels must be 6 integers .* or masks \[6, 8, 8\] \(one per pixel\), got int64 \[6, 8, 7\]"),
    (_bad(train_labels=np.zeros((6, 8, 8), np.uint8), test_labels=np.full((3, 8, 8), 3, np.uint8), class_names="abc"),
     r"labels must be in \[0, 3\) \(one class per name\), got 3"),
    (_bad(train_labels=np.zeros((6, 8, 8), np.uint8)),
     r"must both be per image or both per pixel, got train_labels \[6, 8, 8\] and test_labels \[3\]"),
    (lambda: api.from_tf_data(tf.data.Dataset.from_tensor_slices((np.zeros((2, 8, 8, 3), np.uint8),
                                                                  np.zeros((2, 8, 7), np.uint8))),
                              _generated([(8, 8, 3)])),
     r"train labels must be one integer per image \(not one-hot\) or a mask \[8, 8\] per image, got \[8, 7\]"),
    (lambda: api.from_tf_data(_generated([(8, 8, 3)]).repeat(), _generated([(8, 8, 3)])), r"train is infinite"),
    (lambda: api.from_tf_data(_generated([(8, 8, 3)]), _generated([(8, 8, 3), (9, 8, 3)])),
     r"test images must all be \[H, W, 3\] of one size, got \[9, 8, 3\] after \[8, 8, 3\]"),
    (lambda: api.from_tf_data(tf.data.Dataset.from_tensor_slices((np.full((2, 8, 8, 3), 0.5), [0, 1])),
                              _generated([(8, 8, 3)])), r"train images are floats in \[0, 0.5\]: give pixels 0-255"),
    (lambda: api.from_tf_data(tf.data.Dataset.from_tensor_slices(np.zeros((2, 8, 8, 3))), _generated([(8, 8, 3)])),
     r"train must yield \(image, label\) pairs"),
])
def test_bad_input_is_one_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_data_of_another_kind_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"data must be a dataset name or path, .* got tuple"):
        api.search(user_cnn(), _arrays(), 0.6, str(tmp_path / "search"))
    assert not (tmp_path / "search").exists()


def _blobs(count, seed, size=32):
    """Images of a dark background with a red and a green disc, and their masks: class 1 where red covers a
    pixel, 2 where green does (drawn last), 0 elsewhere."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (count, size, size, 3), dtype=np.uint8)
    rows, cols = np.mgrid[:size, :size]
    for image in images:
        for channel in (0, 1):
            y, x, radius = *rng.integers(0, size, 2), rng.integers(4, 9)
            image[(rows - y) ** 2 + (cols - x) ** 2 <= radius ** 2] = (200, 0, 0) if channel == 0 else (0, 200, 0)
    masks = np.select([images[..., 1] > 128, images[..., 0] > 128], [2, 1], 0).astype(np.uint8)
    return images, masks


@pytest.mark.slow
def test_prune_runs_the_main_job_on_a_u_net_and_masks(tmp_path):
    dataset = api.from_arrays(*_blobs(64, seed=0), *_blobs(16, seed=1), class_names=["background", "red", "green"])
    keras.utils.set_random_seed(0)
    source = unet_cnn()
    report = api.prune(source, dataset, 0.6, str(tmp_path), batch_size=8, search_epochs=1, distill_epochs=1,
                       quantizations=("none",), check_base=False)  # an untrained model
    assert report == json.loads((tmp_path / "report.json").read_text())
    assert report["base"]["flops"] == count_model(source).flops > report["pruned"]["flops"]
    distilled = json.loads((tmp_path / "distill" / "metrics.json").read_text())
    assert 0 <= distilled["test_mean_iou"] <= 1 and 0 <= distilled["teacher_test_mean_iou"] <= 1
    assert report["keras_mean_iou"] == {"base": distilled["teacher_test_mean_iou"],
                                        "pruned": distilled["test_mean_iou"]}
    export = json.loads((tmp_path / "export" / "none" / "report.json").read_text())
    assert export["passed"] and export["test_images"] == 16
    for model in export["models"]:  # fp32: the .tflite decides every pixel as Keras does
        scores = model["tflite"]
        assert scores["top1_agreement"] == 1 and scores["mean_iou"] == scores["keras_mean_iou"]
    assert report["exports"]["none"]["model"]["mean_iou"] == export["models"][0]["tflite"]["mean_iou"]
    assert "mean IoU, Keras" in (tmp_path / "report.md").read_text()
