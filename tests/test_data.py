import dataclasses
import socket
import time
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from tas_keras import data, image_transforms


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """This module's decode cache. Module-scoped fixtures (`mini`) load before any function-scoped
    environment patch applies, so they need the variable set at module scope too."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TAS_KERAS_CACHE", str(path))
        yield path


@pytest.fixture(autouse=True)
def _use_cache_dir(cache_dir, monkeypatch):
    monkeypatch.setenv("TAS_KERAS_CACHE", str(cache_dir))


@pytest.fixture(scope="module")
def mini(cache_dir):
    return data.load_dataset(data.BUNDLED_DATASET)


def _png(value, size=(8, 8)):
    return tf.io.encode_png(np.full((*size, 3), value, np.uint8)).numpy()


# Pixel value per class, so a label can be checked against the image it came with.
_CLASS_VALUES = {"cat": 10, "dog": 200}


def _write_tree(root, counts, size=(8, 8)):
    """Writes <root>/<folder>/<i>.png for {folder: count}; the last folder name is the class."""
    for folder, count in counts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / folder / f"{i}.png").write_bytes(_png(_CLASS_VALUES[folder.split("/")[-1]], size))


def _assert_pets(dataset, num_train, num_test):
    assert dataset.class_names == ("cat", "dog")
    assert len(dataset.train_labels) == num_train and len(dataset.test_labels) == num_test
    for images, labels in ((dataset.train_images, dataset.train_labels),
                           (dataset.test_images, dataset.test_labels)):
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        expected = np.array([_CLASS_VALUES[dataset.class_names[label]] for label in labels])
        np.testing.assert_array_equal(images.reshape(len(images), -1).min(1), expected)
        np.testing.assert_array_equal(images.reshape(len(images), -1).max(1), expected)


def test_bundled_set(mini):
    assert mini.num_classes == 10 and mini.class_names[0] == "airplane"
    assert mini.image_shape == (32, 32, 3)
    assert mini.train_images.shape == (5000, 32, 32, 3) and mini.train_images.dtype == np.uint8
    assert mini.test_images.shape == (1000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(mini.train_labels), [500] * 10)
    np.testing.assert_array_equal(np.bincount(mini.test_labels), [100] * 10)
    np.testing.assert_allclose(mini.mean, np.array([125.3, 123.0, 113.9]) / 255)
    np.testing.assert_allclose(mini.std, np.array([63.0, 62.1, 66.7]) / 255)
    # Real photos, not blank or noise: CIFAR-10's channel means are near 0.47.
    assert 0.4 < mini.train_images.mean() / 255 < 0.55


def test_second_load_is_served_from_cache(mini, cache_dir, monkeypatch):
    assert [f.name.split("-")[0] for f in cache_dir.glob("*.npz")].count("cifar10_mini") == 1
    assert not list(cache_dir.glob("*.tmp"))

    def no_decoding(*args):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data, "_decode_images", no_decoding)
    again = data.load_dataset(data.BUNDLED_DATASET)
    np.testing.assert_array_equal(again.train_images, mini.train_images)
    np.testing.assert_array_equal(again.test_labels, mini.test_labels)
    assert again.class_names == mini.class_names


def test_max_train_examples_is_stratified_and_seeded(mini):
    subset = data.load_dataset(data.BUNDLED_DATASET, max_train_examples=1000, seed=3)
    np.testing.assert_array_equal(np.bincount(subset.train_labels), [100] * 10)
    originals = {image.tobytes() for image in mini.train_images}
    assert all(image.tobytes() in originals for image in subset.train_images)
    assert len(subset.test_labels) == 1000
    again = data.load_dataset(data.BUNDLED_DATASET, max_train_examples=1000, seed=3)
    np.testing.assert_array_equal(again.train_images, subset.train_images)
    other = data.load_dataset(data.BUNDLED_DATASET, max_train_examples=1000, seed=4)
    assert not np.array_equal(other.train_images, subset.train_images)
    with pytest.raises(data.DatasetError, match="max_train_examples.*-5"):
        data.load_dataset(data.BUNDLED_DATASET, max_train_examples=-5)


def test_search_split_is_per_class_half_disjoint_and_seeded():
    labels = np.random.default_rng(0).permutation(np.repeat([0, 1, 2], [4, 5, 7]))
    train, valid = data.search_split(labels, seed=1)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(valid) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, valid])), np.arange(len(labels)))
    np.testing.assert_array_equal(np.bincount(labels[train]), [2, 3, 4])
    np.testing.assert_array_equal(np.bincount(labels[valid]), [2, 2, 3])
    again = data.search_split(labels, seed=1)
    np.testing.assert_array_equal(again[0], train)
    assert not np.array_equal(data.search_split(labels, seed=2)[0], train)


def test_images_labelled_per_pixel_are_halved_and_subset_at_random_and_seeded():
    masks = np.zeros((9, 4, 4), np.int32)  # one class everywhere: a stratified split could not be taken
    train, valid = data.search_split(masks, seed=1)
    assert (len(train), len(valid)) == (5, 4)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, valid])), np.arange(9))
    np.testing.assert_array_equal(data.search_split(masks, seed=1)[0], train)
    assert any(not np.array_equal(data.search_split(masks, seed=s)[0], train) for s in (2, 3))

    images = np.arange(12, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    dataset = data.from_arrays(images, masks[[*range(9), 0, 1, 2]], images[:2], masks[:2])
    first, second = dataset.search_halves(seed=1)
    np.testing.assert_array_equal(np.sort(np.concatenate([first.train_images, second.train_images])[:, 0, 0, 0]),
                                  np.arange(12))
    subsets = [data.load_dataset(dataset, max_train_examples=5, seed=s).train_images[:, 0, 0, 0] for s in (0, 0, 1)]
    assert len(subsets[0]) == 5 and len(set(subsets[0])) == 5
    np.testing.assert_array_equal(subsets[0], subsets[1])
    assert not np.array_equal(subsets[0], subsets[2])


def test_masks_are_cropped_and_flipped_with_their_images():
    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    masks = (images[..., 0] < 128).astype(np.uint8)  # a black padding would be class 1 in the image alone
    dataset = data.from_arrays(images, masks, images[:2], masks[:2])
    identity = dataclasses.replace(dataset, mean=(0.0,) * 3, std=(1.0,) * 3)  # the pipeline gives p / 255
    moved = 0
    for x, y in identity.train_batches(8, seed=3, epochs=2).as_numpy_iterator():
        np.testing.assert_array_equal(y, x[..., 0] < 127.5 / 255)
        moved += sum(not any(np.array_equal(image, original) for original in images / 255) for image in x)
    assert moved > 16  # most of the 32 images were cropped or flipped


def _denormalised(x, mean, std):
    return np.rint((x * np.array(std) + np.array(mean)) * 255).astype(np.int64)


def _window(image, dy, dx, flip):
    window = image[dy:dy + 32, dx:dx + 32]
    return window[:, ::-1] if flip else window


def test_train_pipeline_augments_each_image_with_its_own_crop_and_flip():
    images = np.random.default_rng(0).integers(1, 256, (20, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(20)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    batches = list(data.train_pipeline(images, labels, 8, mean, std, seed=0).as_numpy_iterator())
    assert [len(y) for _, y in batches] == [8, 8]  # remainder dropped, no repeat
    assert batches[0][0].dtype == np.float32 and batches[0][1].dtype == np.int32
    padded = np.pad(images, [(0, 0), (4, 4), (4, 4), (0, 0)]).astype(np.int64)
    transforms = set()
    for x, y in batches:
        for image, label in zip(_denormalised(x, mean, std), y):
            matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                       if np.array_equal(image, _window(padded[label], dy, dx, flip))]
            assert len(matches) == 1, f"image {label} is not one crop of its padded original"
            transforms.add(matches[0])
    assert len(transforms) > 8 and {flip for _, _, flip in transforms} == {False, True}

    # Every epoch is a new permutation of the images (the remainder differs), and the same seed
    # gives the same batches.
    two_epochs = [y for _, y in data.train_pipeline(images, labels, 8, mean, std, seed=0,
                                                    epochs=2).as_numpy_iterator()]
    assert len(two_epochs) == 4 and all(len(set(y)) == 8 for y in two_epochs)
    np.testing.assert_array_equal(two_epochs[:2], [y for _, y in batches])
    assert not np.array_equal(two_epochs[:2], two_epochs[2:])


def test_a_pipeline_started_mid_run_yields_the_remaining_batches_unchanged():
    images = np.random.default_rng(4).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    labels, mean, std = np.arange(24), (0.5,) * 3, (0.25,) * 3
    whole = list(data.train_pipeline(images, labels, 4, mean, std, seed=7, epochs=3,
                                     steps_per_epoch=5).as_numpy_iterator())
    assert len(whole) == 15
    resumed = list(data.train_pipeline(images, labels, 4, mean, std, seed=7, epochs=3, steps_per_epoch=5,
                                       start_step=7).as_numpy_iterator())
    assert len(resumed) == 8
    for (x, y), (x_again, y_again) in zip(whole[7:], resumed):
        np.testing.assert_array_equal(y, y_again)
        np.testing.assert_array_equal(x, x_again)
    with pytest.raises(data.DatasetError, match="start_step must be in \\[0, 15\\], got 16"):
        data.train_pipeline(images, labels, 4, mean, std, epochs=3, steps_per_epoch=5, start_step=16)
    with pytest.raises(data.DatasetError, match="steps_per_epoch must be in \\[1, 6\\], got 7"):
        data.train_pipeline(images, labels, 4, mean, std, steps_per_epoch=7)


def test_augmentation_is_seeded_and_redrawn_every_epoch():
    # Identical images: only the augmentation, not the shuffle, can change a batch.
    images = np.repeat(np.random.default_rng(3).integers(0, 256, (1, 32, 32, 3), np.uint8), 16, axis=0)
    first, second = (x for x, _ in data.train_pipeline(images, np.zeros(16), 16, (0.5,) * 3, (0.25,) * 3,
                                                       seed=5, epochs=2).as_numpy_iterator())
    again = next(data.train_pipeline(images, np.zeros(16), 16, (0.5,) * 3, (0.25,) * 3, seed=5)
                 .as_numpy_iterator())[0]
    np.testing.assert_array_equal(again, first)
    assert not np.array_equal(first, second)


def test_train_pipeline_without_augmentation_keeps_images_intact():
    images = np.random.default_rng(1).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    for x, y in data.train_pipeline(images, np.arange(12), 4, mean, std, augment=False).as_numpy_iterator():
        np.testing.assert_array_equal(_denormalised(x, mean, std), images[y])


def test_train_pipeline_rejects_bad_batch_sizes():
    images, labels = np.zeros((10, 32, 32, 3), np.uint8), np.zeros(10)
    for batch_size in (0, 11):
        with pytest.raises(data.DatasetError, match=f"10.*got {batch_size}"):
            data.train_pipeline(images, labels, batch_size, (0.5,) * 3, (0.2,) * 3)


def test_eval_pipeline_keeps_order_and_remainder_without_augmentation():
    images = np.random.default_rng(2).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.2, 0.2)
    batches = list(data.eval_pipeline(images, np.arange(10), 4, mean, std).as_numpy_iterator())
    assert [len(y) for _, y in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), np.arange(10))
    x = np.concatenate([x for x, _ in batches])
    np.testing.assert_array_equal(_denormalised(x, mean, std), images)


def test_normalisation_of_a_known_pixel():
    images = np.full((1, 32, 32, 3), 51, np.uint8)  # 51 / 255 = 0.2
    x, _ = next(data.eval_pipeline(images, [0], 1, (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)).as_numpy_iterator())
    np.testing.assert_allclose(x[0, 5, 7], [0.2, 0.0, -0.5], atol=1e-6)


def test_folder_with_train_and_test(tmp_path):
    _write_tree(tmp_path, {"train/cat": 3, "train/dog": 4, "test/cat": 2, "test/dog": 1})
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    dataset = data.load_dataset(str(tmp_path))
    _assert_pets(dataset, 7, 3)
    assert dataset.image_shape == (8, 8, 3)
    np.testing.assert_allclose(dataset.mean, [(3 * 10 + 4 * 200) / 7 / 255] * 3)
    # A changed folder is a cache miss, not stale data.
    (tmp_path / "train" / "dog" / "extra.png").write_bytes(_png(200))
    _assert_pets(data.load_dataset(str(tmp_path)), 8, 3)


def test_zip_under_a_top_level_folder_with_mixed_sizes(tmp_path):
    _write_tree(tmp_path / "tree", {"train/cat": 2, "train/dog": 3, "test/cat": 1, "test/dog": 1})
    (tmp_path / "tree" / "train" / "cat" / "big.png").write_bytes(_png(10, size=(12, 10)))
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted((tmp_path / "tree").rglob("*.png")):
            zf.write(file, "pets/" + file.relative_to(tmp_path / "tree").as_posix())
    dataset = data.load_dataset(str(archive))
    assert dataset.name == "pets"
    _assert_pets(dataset, 6, 2)
    assert dataset.image_shape == (8, 8, 3)


def test_class_folders_only_hold_out_a_test_split(tmp_path):
    _write_tree(tmp_path, {"cat": 10, "dog": 20})
    dataset = data.load_dataset(str(tmp_path), seed=0)
    _assert_pets(dataset, 27, 3)
    np.testing.assert_array_equal(np.bincount(dataset.test_labels), [1, 2])


def test_test_classes_must_match_train_classes(tmp_path):
    _write_tree(tmp_path, {"train/cat": 2, "train/dog": 2, "test/cat": 1})
    with pytest.raises(data.DatasetError, match=r"test classes \['cat'\] differ"):
        data.load_dataset(str(tmp_path))


def _bad_source(tmp, kind):
    if kind == "empty folder":
        (tmp / "empty").mkdir()
        return str(tmp / "empty")
    if kind == "corrupt zip":
        (tmp / "bad.zip").write_bytes(b"not a zip")
        return str(tmp / "bad.zip")
    return {"missing path": str(tmp / "no" / "such" / "folder"), "unknown name": "imagenet_tiny"}[kind]


@pytest.mark.parametrize("kind, pattern", [
    ("missing path", "does not exist"),
    ("unknown name", "unknown dataset .*cifar10_mini.*path"),
    ("empty folder", "no class folders"),
    ("corrupt zip", "readable zip"),
])
def test_bad_sources_raise_quickly_quoting_the_value(tmp_path, kind, pattern):
    name = _bad_source(tmp_path.resolve(), kind)
    start = time.monotonic()
    with pytest.raises(data.DatasetError, match=pattern) as error:
        data.load_dataset(name)
    assert time.monotonic() - start < 2
    assert repr(name) in str(error.value) and "\n" not in str(error.value)


def _host_reachable():
    try:
        socket.create_connection(("www.cs.toronto.edu", 443), timeout=3).close()
        return True
    except OSError:
        return False


def test_offline_cifar10_fails_fast_with_a_way_out(tmp_path):
    if _host_reachable():
        pytest.skip("the CIFAR download host is reachable: the offline error cannot be tested")
    start = time.monotonic()
    with pytest.raises(data.DatasetError) as error:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert time.monotonic() - start < 15
    assert "--dataset=cifar10_mini" in str(error.value) and "--data_dir" in str(error.value)


def test_unreadable_grayscale_rgba_and_stray_files(tmp_path, caplog):
    """What real image folders hold: a corrupt and a truncated JPEG (skipped, counted and named),
    grayscale and RGBA images (converted to RGB), non-image files (ignored and counted)."""
    _write_tree(tmp_path, {"train/cat": 2, "train/dog": 2, "test/cat": 1, "test/dog": 1})
    cat = tmp_path / "train" / "cat"
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (8, 8, 1), np.uint8)
    (cat / "gray.png").write_bytes(tf.io.encode_png(gray).numpy())
    smooth_gray = np.add.outer(np.arange(8), np.arange(8)).astype(np.uint8)[..., None] * 12
    (cat / "gray.jpg").write_bytes(tf.io.encode_jpeg(smooth_gray, quality=100).numpy())
    rgba = rng.integers(0, 256, (8, 8, 4), np.uint8)
    (cat / "rgba.png").write_bytes(tf.io.encode_png(rgba).numpy())
    jpeg = tf.io.encode_jpeg(rng.integers(0, 256, (8, 8, 3), np.uint8)).numpy()
    (cat / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (cat / "noise.jpg").write_bytes(rng.integers(0, 256, 300, np.uint8).tobytes())
    (cat / ".DS_Store").write_bytes(b"\0\1\2")
    (tmp_path / "train" / "notes.txt").write_text("not an image")

    for source in ("decoded", "cached"):
        caplog.clear()
        dataset = data.load_dataset(str(tmp_path))
        assert dataset.files_skipped == {"unreadable_images": 2, "non_image_files": 2}, source
        assert len(dataset.train_labels) == 2 + 3 + 2 and len(dataset.test_labels) == 2
        assert "skipped 2 image files that cannot be decoded: train/cat/noise.jpg, train/cat/truncated.jpg" \
            in caplog.text, source
    images = list(dataset.train_images)
    assert any(np.array_equal(image, np.repeat(gray, 3, -1)) for image in images)  # gray -> RGB
    assert any(np.array_equal(image, rgba[..., :3]) for image in images)  # alpha dropped
    # The grayscale JPEG: its one channel, decoded as such, in all three.
    one_channel = tf.io.decode_jpeg((cat / "gray.jpg").read_bytes(), channels=1).numpy()
    assert any(np.array_equal(image, np.repeat(one_channel, 3, -1)) for image in images)


def test_a_folder_of_only_unreadable_images_is_refused_naming_them(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(data.DatasetError, match=r"none of the 2 image files .* can be decoded "
                                                r"\(test/cat/0.jpg, train/cat/0.jpg\)"):
        data.load_dataset(str(tmp_path))


# --- The ImageNet path: crops of --image_size from images of any size ---------------------------

def _random_png(rng, shape):
    image = rng.integers(0, 256, shape, np.uint8)
    return image, tf.io.encode_png(image).numpy()


def _write_large_tree(root, folders, rng, shape=(48, 64, 3), per_class=3):
    """<root>/<folder>/<class>/<i>.png of random pixels for classes a, b; returns {path: pixels}."""
    pixels = {}
    for folder in folders:
        for cls in ("a", "b"):
            (root / folder / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image, png = _random_png(rng, shape)
                (root / folder / cls / f"{i}.png").write_bytes(png)
                pixels[f"{folder}/{cls}/{i}.png"] = image
    return pixels


def _pixels(batches, mean, std):
    """The 0-255 pixels and labels of normalised batches."""
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in batches])
    return np.concatenate(images) * np.array(std) * 255 + np.array(mean) * 255, np.concatenate(labels)


@pytest.mark.parametrize("test_folder", ["val", "validation", "test"])
def test_centre_crop_is_the_evaluation_protocol_and_the_test_split_is_found(tmp_path, test_folder):
    rng = np.random.default_rng(0)
    pixels = _write_large_tree(tmp_path, ["train", test_folder], rng)
    # 42 / 0.875 = 48, the images' shorter side: no resampling, the crop is a plain slice.
    dataset = data.load_dataset(str(tmp_path), image_size=42)
    assert isinstance(dataset, data.CroppedImageDataset) and dataset.image_shape == (42, 42, 3)
    assert dataset.class_names == ("a", "b") and (dataset.train_size, dataset.test_size) == (6, 6)
    images, labels = _pixels(dataset.test_batches(4), dataset.mean, dataset.std)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])
    expected = [pixels[f"{test_folder}/{cls}/{i}.png"][3:45, 11:53] for cls in "ab" for i in range(3)]
    np.testing.assert_allclose(images, np.stack(expected), atol=1e-3)


def test_small_images_use_the_cifar_path_with_a_validation_folder(tmp_path):
    _write_tree(tmp_path, {"train/cat": 2, "train/dog": 2, "validation/cat": 1, "validation/dog": 1})
    dataset = data.load_dataset(str(tmp_path))
    assert isinstance(dataset, data.ImageDataset)
    _assert_pets(dataset, 4, 2)
    assert isinstance(data.load_dataset(str(tmp_path), image_size=8), data.ImageDataset)
    assert data.load_dataset(str(tmp_path), image_size=16).image_shape == (16, 16, 3)


def test_random_resized_crop_has_the_size_and_stays_inside_the_image():
    square = tf.constant(np.full((55, 55, 3), 200, np.uint8))
    gradient = tf.constant(np.broadcast_to(np.arange(55, dtype=np.uint8)[None, :, None] * 4, (55, 55, 3)).copy())
    crops = []
    for i in range(20):
        seed = tf.constant([i, 7], tf.int64)
        flat = image_transforms.random_resized_crop(square, 48, seed, image_transforms.INCEPTION_AREA_RANGE)
        assert flat.shape == (48, 48, 3)
        np.testing.assert_allclose(flat.numpy(), 200, atol=1e-3)  # nothing from outside the image
        crop = image_transforms.random_resized_crop(gradient, 48, seed, image_transforms.INCEPTION_AREA_RANGE)
        assert crop.numpy().min() >= -1e-3 and crop.numpy().max() <= 54 * 4 + 1e-3
        crops.append(crop.numpy())
    assert len({c.tobytes() for c in crops}) == 20  # every seed its own crop
    # A crop of a horizontal gradient is monotone along a row, rising or (flipped) falling.
    rows = np.array([c[24, :, 0] for c in crops])
    rising, falling = (np.diff(rows, axis=1) >= -1e-3).all(1), (np.diff(rows, axis=1) <= 1e-3).all(1)
    assert (rising | falling).all() and rising.any() and falling.any()


def test_crop_area_is_milder_for_small_inputs():
    assert image_transforms.crop_area_range(96) == (0.25, 1.0)
    assert image_transforms.crop_area_range(224) == (0.08, 1.0)


def test_grayscale_cmyk_and_rgba_images_become_rgb(tmp_path):
    gray = np.add.outer(np.arange(48), np.arange(48)).astype(np.uint8)[..., None] * 2
    square = image_transforms.decode_square(tf.io.encode_png(gray), 48).numpy()
    assert square.shape == (48, 48, 3)
    np.testing.assert_array_equal(square, np.repeat(gray, 3, -1))
    rgba = np.random.default_rng(0).integers(0, 256, (48, 48, 4), np.uint8)
    np.testing.assert_array_equal(image_transforms.decode_square(tf.io.encode_png(rgba), 48), rgba[..., :3])
    image = pytest.importorskip("PIL.Image")
    smooth = np.stack([np.add.outer(np.arange(48), np.arange(48)) * 2, np.full((48, 48), 90),
                       np.full((48, 48), 200)], -1).astype(np.uint8)
    path = tmp_path / "cmyk.jpg"
    image.fromarray(smooth).convert("CMYK").save(path, quality=100)
    cmyk = image_transforms.decode_square(path.read_bytes(), 48).numpy()
    assert cmyk.shape == (48, 48, 3) and np.abs(cmyk.astype(int) - smooth).mean() < 4


def test_streamed_when_the_budget_is_small_in_memory_otherwise_with_the_same_batches(tmp_path):
    rng = np.random.default_rng(1)
    _write_large_tree(tmp_path / "src" / "pets", ["train", "val"], rng, shape=(40, 56, 3), per_class=4)
    (tmp_path / "src" / "pets" / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted((tmp_path / "src").rglob("*")):
            zf.write(file, file.relative_to(tmp_path / "src").as_posix())
    load = lambda **kw: data.load_dataset(str(archive), image_size=32, **kw)  # noqa: E731
    streamed, held = load(memory_budget_bytes=0), load(memory_budget_bytes=10**9)
    assert streamed.streamed and not held.streamed
    assert load(streaming="always", memory_budget_bytes=10**9).streamed
    assert not load(streaming="never", memory_budget_bytes=0).streamed
    for dataset in (streamed, held):
        assert dataset.files_skipped == {"unreadable_images": 1, "non_image_files": 0}
        assert (dataset.train_size, dataset.test_size, dataset.num_classes) == (8, 8, 2)
    for batches in (lambda d: d.train_batches(4, seed=3, epochs=2), lambda d: d.test_batches(3)):
        a, b = (list(batches(d).as_numpy_iterator()) for d in (streamed, held))
        assert len(a) == len(b) > 0
        for (xa, ya), (xb, yb) in zip(a, b):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)


@pytest.fixture(scope="module")
def cropped(cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cropped")
    _write_large_tree(root, ["a_class_folder_tree"], np.random.default_rng(2), shape=(40, 40, 3), per_class=10)
    return data.load_dataset(str(root / "a_class_folder_tree"), image_size=24, seed=0)


def test_cropped_training_batches_resume_and_reshuffle(cropped):
    assert (cropped.train_size, cropped.test_size) == (18, 2)  # a tenth of each class held out
    run = list(cropped.train_batches(4, seed=5, epochs=2).as_numpy_iterator())
    assert len(run) == 2 * (18 // 4) and run[0][0].shape == (4, 24, 24, 3)
    resumed = list(cropped.train_batches(4, seed=5, epochs=2, start_step=3).as_numpy_iterator())
    for (x, y), (xr, yr) in zip(run[3:], resumed, strict=True):
        np.testing.assert_array_equal(x, xr)
        np.testing.assert_array_equal(y, yr)
    assert not np.array_equal(run[0][0], run[4][0])  # epoch 2: another order and other crops


def test_cropped_search_halves_split_every_class(cropped):
    first, second = cropped.search_halves(seed=0)
    assert first.train_size + second.train_size == cropped.train_size
    assert first.test_size == second.train_size and second.test_size == first.train_size
    for half in (first, second):
        # 9 per class: the odd one out goes to the first half.
        np.testing.assert_array_equal(np.bincount(half.train.labels), [5, 5] if half is first else [4, 4])


@pytest.mark.parametrize("kwargs, quoted", [
    ({"image_size": 4}, "got 4"), ({"image_size": 2000}, "got 2000"), ({"streaming": "sometimes"}, "'sometimes'"),
])
def test_bad_image_options_raise_one_line_quoting_the_value(kwargs, quoted):
    with pytest.raises(data.DatasetError, match=quoted) as error:
        data.load_dataset(data.BUNDLED_DATASET, **kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name, advice", [("imagenette", "tfds build imagenette"),
                                          ("imagenet2012", "ILSVRC2012_img_train.tar")])
def test_unprepared_tfds_sets_fail_in_one_line_saying_where_they_go(tmp_path, name, advice):
    start = time.monotonic()
    with pytest.raises(data.DatasetError, match=advice) as error:
        data.load_dataset(name, data_dir=str(tmp_path))
    assert time.monotonic() - start < 5
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)
