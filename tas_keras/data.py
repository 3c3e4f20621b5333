"""Datasets as in-memory uint8 arrays, and the tf.data pipelines that feed them to Keras.

Sources (DESIGN.md section 10): the CIFAR-10 subset bundled with the project, cifar10 / cifar100
through tensorflow-datasets, and image folders or zips of class folders. Folder and zip sources are
decoded once and cached as .npz, since decoding dominates start-up time.
"""

import dataclasses
import hashlib
import os
import pathlib
import socket
import tempfile
import threading
import zipfile
import zlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

BUNDLED_DATASET = "cifar10_mini"
_BUNDLED_ZIP = pathlib.Path(__file__).parent / "assets" / f"{BUNDLED_DATASET}.zip"


def _scaled(*values):
    return tuple(v / 255 for v in values)


# (mean, std) per channel in [0, 1] pixel scale, the constants of the TAS reference code.
_CIFAR10_STATS = (_scaled(125.3, 123.0, 113.9), _scaled(63.0, 62.1, 66.7))
_TFDS_STATS = {
    "cifar10": _CIFAR10_STATS,
    "cifar100": (_scaled(129.3, 124.1, 112.4), _scaled(68.2, 65.4, 70.4)),
}
_DOWNLOAD_HOST = "www.cs.toronto.edu"  # tfds fetches both CIFAR archives from here
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_PAD = 4
_CACHE_VERSION = 2  # bump when the decoded arrays change meaning


class DatasetError(ValueError):
    """A dataset that cannot be loaded or used as asked; the message quotes the offending value."""


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare arrays elementwise and fail
class ImageDataset:
    """A labelled image set in memory: images uint8 [N, H, W, 3] (channels last), labels int32 [N]."""

    name: str
    class_names: tuple
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    mean: tuple  # per channel, [0, 1] pixel scale
    std: tuple
    # Files of a folder or zip source left out: {"unreadable_images": n, "non_image_files": n}.
    files_skipped: dict = dataclasses.field(default_factory=lambda: {"unreadable_images": 0,
                                                                     "non_image_files": 0})

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def image_shape(self):
        return tuple(self.train_images.shape[1:])


def load_dataset(name, data_dir=None, max_train_examples=None, seed=0):
    """Loads `name`: "cifar10_mini" (bundled), "cifar10" / "cifar100" (tfds), or a folder / .zip path.

    A folder or zip holds either train/<class>/* and test/<class>/*, or just <class>/* (then 10% of
    each class is held out as the test split, chosen by `seed`); a zip may wrap this in one top-level
    folder. `max_train_examples` keeps a class-stratified random subset of the training images.
    """
    if max_train_examples is not None and max_train_examples <= 0:
        raise DatasetError(f"max_train_examples must be > 0, got {max_train_examples!r}")
    if name == BUNDLED_DATASET:
        dataset = _load_files(_BUNDLED_ZIP, seed, stats=_CIFAR10_STATS)
    elif name in _TFDS_STATS:
        dataset = _load_tfds(name, data_dir)
    else:
        dataset = _load_files(_existing_path(name), seed)
    if max_train_examples is not None and max_train_examples < len(dataset.train_labels):
        keep = _stratified_subset(dataset.train_labels, max_train_examples, seed)
        dataset = dataclasses.replace(
            dataset, train_images=dataset.train_images[keep], train_labels=dataset.train_labels[keep])
    return dataset


def search_split(labels, seed=0):
    """Splits every class 50/50 (the odd one out goes to train): sorted (train, valid) indices."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    in_train = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        in_train[members[: (len(members) + 1) // 2]] = True
    return np.flatnonzero(in_train), np.flatnonzero(~in_train)


def train_pipeline(images, labels, batch_size, mean, std, seed=0, augment=True, epochs=1, start_step=0,
                   steps_per_epoch=None):
    """Shuffled full batches of (normalised float32 images, int32 labels) for `epochs` epochs, from
    global step `start_step` on.

    Batch `i` of epoch `e` is a function of (seed, e, i) alone: every epoch has its own order and
    augmentation, and a run resumed at any step sees exactly the batches an uninterrupted run would.
    An epoch is `steps_per_epoch` batches (default: all full batches). Augmentation (pad 4 + random
    crop back to size + random horizontal flip) runs on whole batches with per-image offsets and flips.
    """
    images, labels = _check_arrays(images, labels)
    if not 0 < batch_size <= len(images):
        raise DatasetError(
            f"batch_size must be in [1, {len(images)}] (the number of training images), got {batch_size!r}")
    full_batches = len(images) // batch_size
    steps_per_epoch = steps_per_epoch or full_batches
    if not 0 < steps_per_epoch <= full_batches:
        raise DatasetError(f"steps_per_epoch must be in [1, {full_batches}], got {steps_per_epoch!r}")
    if not 0 <= start_step <= epochs * steps_per_epoch:
        raise DatasetError(f"start_step must be in [0, {epochs * steps_per_epoch}], got {start_step!r}")
    fetch = _batch_fn(images, labels, mean, std)

    def batch(step):
        epoch, position = step // steps_per_epoch, step % steps_per_epoch
        # A pseudo-random permutation of the images per epoch, evaluated only at this batch's slots.
        slots = position * batch_size + tf.range(batch_size, dtype=tf.int64)
        indices = tf.random.experimental.index_shuffle(slots, tf.stack([tf.constant(seed, tf.int64), epoch]),
                                                       max_index=len(images) - 1)
        augment_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, 1], tf.int64), step)
        return fetch(indices, augment_seed if augment else None)

    steps = tf.data.Dataset.range(start_step, epochs * steps_per_epoch)
    return steps.map(batch, tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def eval_pipeline(images, labels, batch_size, mean, std):
    """All images in order, normalised, not augmented; the last batch may be smaller."""
    images, labels = _check_arrays(images, labels)
    if not 0 < batch_size:
        raise DatasetError(f"batch_size must be > 0, got {batch_size!r}")
    batch = _batch_fn(images, labels, mean, std)
    return tf.data.Dataset.range(len(images)).batch(batch_size).map(
        batch, tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def normalisation(mean, std):
    """(scale, offset), float32 per channel: (p / 255 - mean) / std, the pipelines' normalisation of a
    pixel p, as p * scale + offset, the form of a Keras Rescaling layer (the exported models'
    export.convert.pixel_input_model). The two forms round differently, by about 1e-7 relative."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return (1 / (255 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def _check_arrays(images, labels):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(labels) != len(images):
        raise DatasetError(
            f"expected uint8 images [N, H, W, 3] and N labels, got images {images.dtype} "
            f"{list(images.shape)} and labels {list(labels.shape)}")
    return images, labels


def _batch_fn(images, labels, mean, std):
    """Maps a batch of indices (and a seed: augment) to a normalised batch."""
    # Gathering whole batches by index is much faster than slicing and batching single images.
    images, labels = tf.constant(images), tf.constant(labels, tf.int32)
    mean, std = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)

    def batch(indices, seed=None):
        x = tf.gather(images, indices)
        if seed is not None:
            x = _augment(x, seed)
        return (tf.cast(x, tf.float32) / 255 - mean) / std, tf.gather(labels, indices)

    return batch


def _augment(images, seed):
    height, width = images.shape[1:3]
    n = tf.shape(images)[0]
    offset_seed, flip_seed = tf.unstack(tf.random.split(seed, 2))
    offsets = tf.random.stateless_uniform([2, n], offset_seed, maxval=2 * _PAD + 1, dtype=tf.int32)
    flip = tf.random.stateless_uniform([n], flip_seed) < 0.5
    padded = tf.pad(images, [[0, 0], [_PAD, _PAD], [_PAD, _PAD], [0, 0]])
    rows = offsets[0][:, None] + tf.range(height)
    # A flip is the crop's columns read backwards: one gather does both.
    cols = offsets[1][:, None] + tf.where(flip[:, None], tf.range(width - 1, -1, -1), tf.range(width))
    return tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)


def _existing_path(name):
    if not isinstance(name, (str, os.PathLike)) or not os.fspath(name):  # "" would mean the cwd
        raise DatasetError(f"dataset must be a name or a path, got {name!r}")
    path = pathlib.Path(name).expanduser()
    if path.exists():
        return path.resolve()
    if "/" in os.fspath(name) or os.sep in os.fspath(name) or path.suffix:
        raise DatasetError(f"dataset path {os.fspath(name)!r} does not exist")
    names = ", ".join([BUNDLED_DATASET, *_TFDS_STATS])
    raise DatasetError(
        f"unknown dataset {name!r}: expected one of {names}, or the path of an image folder or a .zip "
        f"of class folders")


def _load_tfds(name, data_dir):
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        # tfds retries an unreachable host for minutes before failing: find out first.
        if not _reachable(_DOWNLOAD_HOST):
            raise DatasetError(
                f"dataset {name!r} is neither prepared in {builder.data_dir!r} nor downloadable "
                f"({_DOWNLOAD_HOST} is unreachable): use --dataset={BUNDLED_DATASET} (bundled, offline) "
                f"or --data_dir=<a folder holding the prepared tensorflow-datasets data>")
        builder.download_and_prepare()
    train, test = (tfds.as_numpy(builder.as_dataset(split=s, batch_size=-1)) for s in ("train", "test"))
    return ImageDataset(
        name, tuple(builder.info.features["label"].names),
        train["image"], train["label"].astype(np.int32),
        test["image"], test["label"].astype(np.int32),
        *_TFDS_STATS[name])


def _reachable(host, port=443, timeout=3.0):
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    # The DNS lookup ignores socket timeouts; a daemon thread bounds the whole check.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def _load_files(path, seed, stats=None):
    cache = _cache_file(path)
    arrays = _read_cache(cache)
    if arrays is None:
        arrays = _decode_source(path)
        _write_cache(cache, arrays)
    else:
        logging.info("Loaded decoded images of %s from the cache %s", path, cache)
    unreadable = [str(name) for name in arrays["unreadable"]]
    if unreadable:
        logging.warning("%s: skipped %d image files that cannot be decoded: %s", path, len(unreadable),
                        _some(unreadable))
    images, labels, test_mask = arrays["images"], arrays["labels"], arrays["test_mask"]
    if not arrays["has_test_split"]:
        test_mask = _holdout(labels, seed)
        logging.info("%s has no train/ and test/ folders: holding out %d of %d images (10%% per class, "
                     "seed %d) as the test split", path, test_mask.sum(), len(labels), seed)
    train_images = images[~test_mask]
    return ImageDataset(
        path.stem, tuple(str(c) for c in arrays["class_names"]),
        train_images, labels[~test_mask], images[test_mask], labels[test_mask],
        *(stats or _channel_stats(train_images)),
        files_skipped={"unreadable_images": len(unreadable), "non_image_files": int(arrays["non_images"])})


def _some(names, shown=5):
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _decode_source(path):
    """Decodes a folder or zip of class folders into the arrays that the cache holds.

    Image files that cannot be decoded are left out and listed ("unreadable"); files that are not
    images (by extension: .txt, .DS_Store, ...) are ignored and counted ("non_images")."""
    blobs, non_images = _read_image_files(path)
    if non_images:
        logging.warning("%s: ignoring %d files that are not images (%s): %s", path, len(non_images),
                        ", ".join(_IMAGE_EXTENSIONS), _some(non_images))
    keys = _class_keys(list(blobs))
    if None in keys:
        logging.warning("%s: ignoring %d image files outside class folders", path, keys.count(None))
    kept = [(key, name) for key, name in zip(keys, blobs) if key]
    if not kept:
        raise DatasetError(
            f"no class folders with images ({', '.join(_IMAGE_EXTENSIONS)}) found in {str(path)!r}")
    names = [name for _, name in kept]
    images, decoded = _decode_images(names, [blobs[name] for name in names], path)
    unreadable = [name for name, ok in zip(names, decoded) if not ok]
    kept = [entry for entry, ok in zip(kept, decoded) if ok]
    has_test_split = any(split for (split, _), _ in kept)
    class_names = sorted({cls for (split, cls), _ in kept if split != "test"})
    test_classes = sorted({cls for (split, cls), _ in kept if split == "test"})
    if has_test_split and test_classes != class_names:
        raise DatasetError(
            f"{str(path)!r}: test classes {test_classes} differ from train classes {class_names}")
    index = {cls: i for i, cls in enumerate(class_names)}
    return {
        "images": images,
        "labels": np.array([index[cls] for (_, cls), _ in kept], np.int32),
        "test_mask": np.array([split == "test" for (split, _), _ in kept]),
        "has_test_split": np.array(has_test_split),
        "class_names": np.array(class_names),
        "unreadable": np.array(unreadable, dtype=str),
        "non_images": np.array(len(non_images)),
    }


def _read_image_files(path):
    """({relative posix path: bytes} of the image files of a folder or zip, in sorted order, [the
    other files' paths]). Hidden files and macOS' __MACOSX folders count as other files."""

    def is_image(name):
        parts = name.split("/")
        return name.lower().endswith(_IMAGE_EXTENSIONS) and not any(
            p.startswith(".") or p == "__MACOSX" for p in parts)

    try:
        if path.is_dir():
            names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
            read = lambda name: (path / name).read_bytes()  # noqa: E731
            return {n: read(n) for n in names if is_image(n)}, [n for n in names if not is_image(n)]
        with zipfile.ZipFile(path) as zf:
            names = sorted(n for n in zf.namelist() if not n.endswith("/"))
            return {n: zf.read(n) for n in names if is_image(n)}, [n for n in names if not is_image(n)]
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise DatasetError(f"{str(path)!r} is neither a folder nor a readable zip file ({e})") from e
    except OSError as e:
        raise DatasetError(f"cannot read {e.filename or str(path)!r}: {e.strerror or e}") from e


def _class_keys(names):
    """(split, class) of every file, split None for a <class>/* tree; None outside class folders."""
    folders = [name.split("/")[:-1] for name in names]
    # A zip usually wraps everything in one folder (named after it): look inside.
    while all(len(f) >= 2 for f in folders) and len({f[0] for f in folders}) == 1:
        folders = [f[1:] for f in folders]
    if {"train", "test"} <= {f[0] for f in folders if f}:
        return [(f[0], f[1]) if len(f) >= 2 and f[0] in ("train", "test") else None for f in folders]
    return [(None, f[0]) if f else None for f in folders]


def decode_image(blob, size):
    """An encoded image (JPEG, PNG, GIF, BMP) as uint8 RGB [height, width, 3] of `size` (height,
    width), resized (antialiased) if it has another size. Grayscale becomes RGB, alpha is dropped."""
    return _decode_to_size(blob, size)[0]


def _decode_to_size(blob, size):
    image = tf.io.decode_image(blob, channels=3, expand_animations=False)
    same = tf.reduce_all(tf.shape(image)[:2] == size)
    image = tf.cond(same, lambda: image, lambda: tf.saturate_cast(
        tf.round(tf.image.resize(image, size, antialias=True)), tf.uint8))
    return tf.ensure_shape(image, (*size, 3)), same


def _decode_images(names, blobs, path):
    """Decodes in parallel to (uint8 [N, H, W, 3] of the images that decode, a mask of which of
    `blobs` did), resizing to the size of the first one that decodes where needed."""
    size = None
    for blob in blobs:
        try:
            size = tuple(tf.io.decode_image(blob, channels=3, expand_animations=False).shape[:2])
            break
        except tf.errors.InvalidArgumentError:
            continue
    if size is None:
        raise DatasetError(f"none of the {len(blobs)} image files in {str(path)!r} can be decoded "
                           f"({_some(names)})")
    # A blob that fails to decode drops out of the stream (ignore_errors): its index is then missing.
    indexed = tf.data.Dataset.from_tensor_slices((tf.range(len(blobs)), blobs))
    batches = list(indexed.map(lambda index, blob: (index, *_decode_to_size(blob, size)), tf.data.AUTOTUNE)
                   .ignore_errors().batch(1024).as_numpy_iterator())
    decoded = np.zeros(len(blobs), bool)
    decoded[np.concatenate([index for index, _, _ in batches])] = True
    images = np.concatenate([images for _, images, _ in batches])
    resized = len(images) - int(sum(same.sum() for _, _, same in batches))
    if resized:
        logging.warning("%s: resized %d of %d images to %dx%d, the size of the first", path, resized,
                        len(images), *size)
    return images, decoded


def _cache_file(path):
    """Where the decoded arrays of `path` are cached: keyed by its path, size and mtime (for a
    folder, those of every file in it), so any change to the source is a cache miss."""

    def signature(p):
        st = p.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"

    if path.is_dir():
        listing = [f"{p.relative_to(path).as_posix()}:{signature(p)}"
                   for p in sorted(path.rglob("*")) if p.is_file()]
    else:
        listing = [signature(path)]
    key = hashlib.sha256("\n".join([f"v{_CACHE_VERSION}", str(path), *listing]).encode()).hexdigest()
    root = pathlib.Path(os.environ.get("TAS_KERAS_CACHE", "~/.cache/tas_keras")).expanduser()
    return root / f"{path.stem}-{key[:20]}.npz"


def _read_cache(file):
    try:
        with np.load(file) as npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        logging.warning("Ignoring the unreadable cache %s: %s", file, e)
        return None


def _write_cache(file, arrays):
    """Writes via a temp file and os.replace, so a killed process never leaves a half-written cache."""
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=file.parent, suffix=".tmp", delete=False) as f:
            tmp = f.name
            np.savez(f, **arrays)
        os.replace(tmp, file)
    except OSError as e:
        logging.warning("Not caching the decoded images at %s: %s", file, e)
    finally:
        if tmp:
            pathlib.Path(tmp).unlink(missing_ok=True)


def _channel_stats(images):
    """Per-channel (mean, std) in [0, 1] scale, exact from 256-bin histograms (no float copy)."""
    values = np.arange(256) / 255
    mean, std = [], []
    for c in range(images.shape[-1]):
        p = np.bincount(images[..., c].ravel(), minlength=256) / images[..., c].size
        m = p @ values
        mean.append(float(m))
        std.append(float(np.sqrt(p @ (values - m) ** 2)))
    return tuple(mean), tuple(std)


def _holdout(labels, seed):
    """Test mask holding out a tenth (rounded up) of every class that has more than one image."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        count = (len(members) + 9) // 10 if len(members) > 1 else 0
        mask[rng.choice(members, count, replace=False)] = True
    return mask


def _stratified_subset(labels, size, seed):
    """Sorted indices of `size` examples drawn at the same rate from every class."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    # Rank within the (shuffled) class as a fraction of the class: taking the smallest fractions
    # first takes every class in proportion; the shuffled order breaks ties between classes.
    fraction = np.empty(len(labels))
    for c in np.unique(labels):
        members = order[labels[order] == c]
        fraction[members] = (np.arange(len(members)) + 0.5) / len(members)
    return np.sort(order[np.argsort(fraction[order], kind="stable")[:size]])
