"""Datasets, and the tf.data pipelines that feed them to Keras.

Sources (docs/design.md sections 10, 11): the CIFAR-10 subset bundled with the project, cifar10 / cifar100,
imagenette and imagenet2012 through tensorflow-datasets, and image folders or zips of class folders.

Two kinds of dataset share one interface (`train_size`, `test_size`, `train_batches`, `test_batches`,
`search_halves`, `image_shape`, `num_classes`, `mean`, `std`, `files_skipped`):

- `ImageDataset`, the CIFAR path: small images used at their own size, in memory as uint8 arrays,
  augmented by pad 4 + random crop + flip. Folder and zip sources are decoded once and cached as .npz,
  since decoding dominates start-up time.
- `CroppedImageDataset`, the ImageNet path (any resolution, `image_size` chosen): random resized crops
  + flip for training, resize + centre crop for evaluation (`image_transforms`), the images' uint8
  squares held in memory when they fit `memory_budget()`, else decoded from their files (a zip is
  extracted once into the cache) or tfds records at every epoch.

Data a caller already holds becomes an ImageDataset through `from_arrays` (numpy) or `from_tf_data`,
with one label per image or per pixel (segmentation masks, which the augmentation moves with their images).
"""

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import shutil
import socket
import tempfile
import threading
import zipfile
import zlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from tas_keras import image_transforms

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
# torchvision's ImageNet statistics: the normalisation of every CroppedImageDataset that is not CIFAR.
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_TEST_FOLDERS = ("val", "validation", "test")  # the first one present is the test split
_PAD = 4
_CACHE_VERSION = 2  # bump when the decoded arrays change meaning


class DatasetError(ValueError):
    """A dataset that cannot be loaded or used as asked; the message quotes the offending value."""


CIFAR_SIZED = 64  # images of at most this side, used at their own size, take the CIFAR path
DEFAULT_IMAGE_SIZE = 224  # of the ImageNet path when --image_size is not given
IMAGE_SIZE_RANGE = (8, 1024)
STREAMING = ("auto", "always", "never")
MEMORY_BUDGET_FRACTION = 0.25  # of the machine's physical memory, for decoded images (memory_budget)
_STREAMED_TFDS = {  # name -> the split used as the test split
    "imagenette": "validation", "imagenet2012": "validation"}


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare arrays elementwise and fail
class ImageDataset:
    """A labelled image set in memory: images uint8 [N, H, W, 3] (channels last), labels int32 [N], or
    int32 [N, H, W] per-pixel class masks of a segmentation set."""

    name: str
    class_names: tuple
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    mean: tuple  # per channel of the model's input, [0, 1] pixel scale
    std: tuple
    # Files of a folder or zip source left out: {"unreadable_images": n, "non_image_files": n}.
    files_skipped: dict = dataclasses.field(default_factory=lambda: {"unreadable_images": 0,
                                                                     "non_image_files": 0})
    bgr: bool = False  # the model takes the channels in BGR order (tas_keras.input_convention)
    streamed = False

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def per_pixel_labels(self):
        return self.train_labels.ndim == 3

    @property
    def image_shape(self):
        return tuple(self.train_images.shape[1:])

    @property
    def train_size(self):
        return len(self.train_labels)

    @property
    def test_size(self):
        return len(self.test_labels)

    def train_batches(self, batch_size, seed=0, epochs=1, start_step=0, steps_per_epoch=None, augment=True):
        """`train_pipeline` of the training split."""
        return train_pipeline(self.train_images, self.train_labels, batch_size, self.mean, self.std, seed=seed,
                              augment=augment, epochs=epochs, start_step=start_step,
                              steps_per_epoch=steps_per_epoch, bgr=self.bgr)

    def test_batches(self, batch_size):
        """`eval_pipeline` of the test split."""
        return eval_pipeline(self.test_images, self.test_labels, batch_size, self.mean, self.std, bgr=self.bgr)

    def test_pixels(self):
        """(uint8 images [N, H, W, 3], int32 labels [N] or masks [N, H, W]): the test split as a deployed
        model sees it."""
        return self.test_images, self.test_labels

    def sample_train_pixels(self, size, seed=0):
        """`size` training images drawn at random (fixed seed), uint8, in the order of the split."""
        pick = np.sort(np.random.default_rng(seed).choice(self.train_size, min(size, self.train_size), replace=False))
        return self.train_images[pick]

    def search_halves(self, seed=0):
        """The training split halved per class (`search_split`; masks at random): two datasets, each
        holding one half as its training split and the other as its test split."""
        first, second = search_split(self.train_labels, seed=seed)

        def half(train, test):
            return dataclasses.replace(
                self, train_images=self.train_images[train], train_labels=self.train_labels[train],
                test_images=self.train_images[test], test_labels=self.train_labels[test])

        return half(first, second), half(second, first)


@dataclasses.dataclass(frozen=True, eq=False)
class IndexedImages:
    """One split of a CroppedImageDataset that can be read at any index: its images' uint8 squares in
    memory, or the image files they decode from."""

    labels: np.ndarray  # int32 [N]
    side: int  # of the squares
    squares: np.ndarray = None  # uint8 [N, side, side, 3], or
    files: np.ndarray = None  # str [N]

    streamed = property(lambda self: self.squares is None)

    def __len__(self):
        return len(self.labels)

    def subset(self, indices):
        return dataclasses.replace(self, labels=self.labels[indices], **(
            {"files": self.files[indices]} if self.streamed else {"squares": self.squares[indices]}))

    def examples(self, indices):
        """Maps a dataset of indices to (uint8 square, int32 label)."""
        labels = tf.constant(self.labels, tf.int32)
        if self.streamed:
            files = tf.constant(self.files)
            square = lambda i: image_transforms.decode_square(tf.io.read_file(files[i]), self.side)  # noqa: E731
        else:
            squares = tf.constant(self.squares)
            square = lambda i: squares[i]  # noqa: E731
        return indices.map(lambda i: (square(i), labels[i]), tf.data.AUTOTUNE)


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsImages:
    """One split of a prepared tensorflow-datasets set, read in record order (no random access): the
    examples [start, stop) of `split`."""

    builder: object
    split: str
    start: int
    stop: int
    side: int
    streamed = True

    def __len__(self):
        return self.stop - self.start

    def halves(self):
        middle = (self.start + self.stop) // 2
        return (dataclasses.replace(self, stop=middle), dataclasses.replace(self, start=middle))

    def records(self, shuffle_seed=None):
        """(uint8 square, int32 label) of every example; shuffled files and a shuffle buffer, both
        seeded, with `shuffle_seed`."""
        shuffle = shuffle_seed is not None
        records = self.builder.as_dataset(
            split=f"{self.split}[{self.start}:{self.stop}]", shuffle_files=shuffle,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False))
        if shuffle:
            records = records.shuffle(_TFDS_SHUFFLE_BUFFER, seed=shuffle_seed)
        return records.map(lambda r: (image_transforms.decode_square(r["image"], self.side),
                                      tf.cast(r["label"], tf.int32)), tf.data.AUTOTUNE)


_TFDS_SHUFFLE_BUFFER = 4096  # examples; tfds also shuffles the order of its record files every epoch


@dataclasses.dataclass(frozen=True, eq=False)
class CroppedImageDataset:
    """A labelled image set at any resolution, fed as image_size x image_size crops (module docstring).

    `train` and `test` are IndexedImages (folders, zips, tfds sets that fit in memory) or TfdsImages.
    """

    name: str
    class_names: tuple
    image_size: int
    train: object
    test: object
    mean: tuple
    std: tuple
    files_skipped: dict = dataclasses.field(default_factory=lambda: {"unreadable_images": 0,
                                                                     "non_image_files": 0})
    bgr: bool = False
    per_pixel_labels = False  # folders, zips and tfds sets are labelled per image

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def image_shape(self):
        return (self.image_size, self.image_size, 3)

    @property
    def streamed(self):
        return self.train.streamed

    @property
    def train_size(self):
        return len(self.train)

    @property
    def test_size(self):
        return len(self.test)

    def train_batches(self, batch_size, seed=0, epochs=1, start_step=0, steps_per_epoch=None, augment=True):
        """Full batches of (normalised float32 random resized crops, int32 labels) for `epochs` epochs
        from global step `start_step` on; as in `train_pipeline`, batch `i` of epoch `e` is a function
        of (seed, e, i) alone, so a resumed run sees the batches an uninterrupted one would."""
        steps_per_epoch = _check_steps(len(self.train), batch_size, epochs, start_step, steps_per_epoch)
        epoch_size = steps_per_epoch * batch_size
        if isinstance(self.train, TfdsImages):
            # Record order: each epoch is its own seeded stream; a resumed epoch skips what it has seen.
            first_epoch, skipped = divmod(start_step * batch_size, epoch_size)
            epochs_data = [self.train.records(shuffle_seed=seed * 100_003 + e).take(epoch_size)
                           for e in range(first_epoch, epochs)]
            examples = epochs_data[0].skip(skipped)
            for later in epochs_data[1:]:
                examples = examples.concatenate(later)
            positions = tf.data.Dataset.range(start_step * batch_size, epochs * epoch_size)
            examples = tf.data.Dataset.zip((positions, examples)).map(
                lambda position, example: (position, *example))
        else:
            def shuffled(position):
                slot, epoch = position % epoch_size, position // epoch_size
                return tf.random.experimental.index_shuffle(
                    slot, tf.stack([tf.constant(seed, tf.int64), epoch]), max_index=len(self.train) - 1)

            positions = tf.data.Dataset.range(start_step * batch_size, epochs * epoch_size)
            examples = tf.data.Dataset.zip((positions, self.train.examples(positions.map(shuffled))))
            examples = examples.map(lambda position, example: (position, *example))
        area_range = image_transforms.crop_area_range(self.image_size)
        base_seed = tf.constant([seed, 1], tf.int64)

        def crop(position, square, label):
            if not augment:
                return self._normalised(image_transforms.centre_crop(square, self.image_size)), label
            image = image_transforms.random_resized_crop(
                square, self.image_size, tf.random.experimental.stateless_fold_in(base_seed, position), area_range)
            return self._normalised(image), label

        return examples.map(crop, tf.data.AUTOTUNE).batch(batch_size, drop_remainder=True).prefetch(
            tf.data.AUTOTUNE)

    def test_batches(self, batch_size):
        """All test images in order, resized and centre-cropped, normalised; the last batch may be smaller."""
        if not 0 < batch_size:
            raise DatasetError(f"batch_size must be > 0, got {batch_size!r}")
        examples = (self.test.records() if isinstance(self.test, TfdsImages)
                    else self.test.examples(tf.data.Dataset.range(len(self.test))))
        return examples.map(
            lambda square, label: (self._normalised(image_transforms.centre_crop(square, self.image_size)), label),
            tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)

    def test_pixels(self):
        """(uint8 images [N, H, W, 3], int32 labels [N]): the test split resized and centre-cropped, as a
        deployed model sees it. All of it in memory: meant for test splits of thousands of images."""
        examples = (self.test.records() if isinstance(self.test, TfdsImages)
                    else self.test.examples(tf.data.Dataset.range(len(self.test))))
        images, labels = [], []
        for square, label in examples.map(
                lambda square, label: (image_transforms.centre_crop(square, self.image_size), label),
                tf.data.AUTOTUNE).batch(256):
            images.append(square.numpy())
            labels.append(label.numpy())
        return np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int32)

    def sample_train_pixels(self, size, seed=0):
        """`size` training images drawn at random (fixed seed), resized and centre-cropped, uint8."""
        if isinstance(self.train, TfdsImages):
            examples = self.train.records(shuffle_seed=seed).take(size)
        else:
            pick = np.sort(np.random.default_rng(seed).choice(len(self.train), min(size, len(self.train)),
                                                              replace=False))
            examples = self.train.examples(tf.data.Dataset.from_tensor_slices(pick.astype(np.int64)))
        squares = examples.map(lambda square, _: image_transforms.centre_crop(square, self.image_size))
        return np.concatenate([batch.numpy() for batch in squares.batch(256)]).astype(np.uint8)

    def search_halves(self, seed=0):
        """The training split halved (per class, `search_split`; a tfds stream by record order, which
        tfds shuffled when it prepared the set): two datasets, each training on one half and testing
        on the other."""
        if isinstance(self.train, TfdsImages):
            first, second = self.train.halves()
        else:
            first, second = (self.train.subset(i) for i in search_split(self.train.labels, seed=seed))
        return (dataclasses.replace(self, train=first, test=second),
                dataclasses.replace(self, train=second, test=first))

    def _normalised(self, image):
        return normalised_pixels(image, self.mean, self.std, self.bgr)


def memory_budget():
    """Bytes of decoded images a CroppedImageDataset may hold in memory: MEMORY_BUDGET_FRACTION of
    the physical memory."""
    return int(MEMORY_BUDGET_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def load_dataset(name, data_dir=None, max_train_examples=None, seed=0, image_size=None, streaming="auto",
                 memory_budget_bytes=None):
    """Loads `name`: "cifar10_mini" (bundled), "cifar10" / "cifar100", "imagenette" / "imagenet2012"
    (tfds, prepared in `data_dir`; a config may follow, "imagenette/160px-v2"), or a folder / .zip path.

    A folder or zip holds either train/<class>/* and val/<class>/* (or validation/, or test/), or just
    <class>/* (then 10% of each class is held out as the test split, chosen by `seed`); a zip may wrap
    this in one top-level folder. `max_train_examples` keeps a class-stratified random subset of the
    training images (of a tfds stream: its first ones).

    Images of at most CIFAR_SIZED px used at their own size (`image_size` None or theirs) give an
    ImageDataset (the CIFAR path); anything else a CroppedImageDataset of `image_size` (default
    DEFAULT_IMAGE_SIZE), held in memory when its squares fit `memory_budget_bytes` (default
    `memory_budget()`) and `streaming` is "auto", streamed with "always", in memory with "never".

    A dataset object (this function's result, or `from_arrays`) given as `name` is returned as it is
    (`_given_dataset`), so the stages take one wherever they take a name.
    """
    if max_train_examples is not None and max_train_examples <= 0:
        raise DatasetError(f"max_train_examples must be > 0, got {max_train_examples!r}")
    if isinstance(name, (ImageDataset, CroppedImageDataset)):
        return _given_dataset(name, max_train_examples, seed, image_size)
    low, high = IMAGE_SIZE_RANGE
    if image_size is not None and (not isinstance(image_size, (int, np.integer)) or not low <= image_size <= high):
        raise DatasetError(f"image_size must be an integer in [{low}, {high}], got {image_size!r}")
    if streaming not in STREAMING:
        raise DatasetError(f"streaming must be one of {', '.join(STREAMING)}, got {streaming!r}")
    budget = memory_budget() if memory_budget_bytes is None else memory_budget_bytes

    def in_memory(decoded_bytes):
        return streaming == "never" or (streaming == "auto" and decoded_bytes <= budget)

    tfds_name = name.split("/")[0] if isinstance(name, str) and not os.path.exists(name) else None
    if tfds_name in _STREAMED_TFDS or (tfds_name in _TFDS_STATS and image_size not in (None, 32)):
        return _load_cropped_tfds(name, data_dir, image_size or DEFAULT_IMAGE_SIZE, max_train_examples, in_memory)
    if name in _TFDS_STATS:
        dataset = _load_tfds(name, data_dir)
    else:
        path = _BUNDLED_ZIP if name == BUNDLED_DATASET else _existing_path(name)
        stats = _CIFAR10_STATS if name == BUNDLED_DATASET else None
        height, width = _first_image_size(path)
        if max(height, width) > CIFAR_SIZED or image_size not in (None, height) or image_size not in (None, width):
            return _load_cropped_files(path, image_size or DEFAULT_IMAGE_SIZE, seed, max_train_examples, in_memory,
                                       stats=stats or IMAGENET_STATS)
        dataset = _load_files(path, seed, stats=stats)
    return _with_max_train_examples(dataset, max_train_examples, seed)


def _with_max_train_examples(dataset, max_train_examples, seed):
    """An ImageDataset keeping a random subset of `max_train_examples` training images, class-stratified
    unless labelled per pixel (`_stratified_subset`)."""
    if max_train_examples is None or max_train_examples >= len(dataset.train_labels):
        return dataset
    keep = _stratified_subset(dataset.train_labels, max_train_examples, seed)
    return dataclasses.replace(
        dataset, train_images=dataset.train_images[keep], train_labels=dataset.train_labels[keep])


def _given_dataset(dataset, max_train_examples, seed, image_size):
    """A dataset already loaded (or built by `from_arrays`), passed where a name is expected: used as
    it is; `max_train_examples` subsets an in-memory ImageDataset, `image_size` must be its own."""
    if image_size is not None and dataset.image_shape[:2] != (image_size, image_size):
        raise DatasetError(f"image_size {image_size!r} differs from the given dataset {dataset.name!r}'s images "
                           f"{dataset.image_shape}: a loaded dataset is used at its own size")
    if max_train_examples is not None and not isinstance(dataset, ImageDataset):
        raise DatasetError(f"max_train_examples ({max_train_examples!r}) applies to an in-memory ImageDataset, "
                           f"not to the given {type(dataset).__name__} {dataset.name!r}: load it with "
                           f"max_train_examples instead")
    return dataset if max_train_examples is None else _with_max_train_examples(dataset, max_train_examples, seed)


def recorded_name(dataset):
    """What a run's settings record of a dataset given by name, path or as a loaded object: the name or
    path as given, or the object's `name` (JSON, and the same for the same data: `from_arrays`)."""
    return dataset.name if isinstance(dataset, (ImageDataset, CroppedImageDataset)) else dataset


def from_arrays(train_images, train_labels, test_images, test_labels, class_names=None, name=None):
    """An ImageDataset (the CIFAR path: used at its own size, pad-4 crop and flip augmentation) of
    uint8 RGB images [N, H, W, 3] and integer labels in [0, classes): one per image [N], or one per
    pixel (segmentation masks [N, H, W], of the images' size), held in memory. Normalised with the
    training images' per-channel mean/std, as image folders are.

    `class_names` default to "0", "1", ... up to the largest label. `name` is what the runs record in
    their settings (run.json), so that a run directory given other data refuses to resume; by default
    one derived from the arrays' contents ("arrays-" and 12 hex digits of their SHA-256)."""
    splits = {"train": (train_images, train_labels), "test": (test_images, test_labels)}
    arrays = {}
    for split, (images, labels) in splits.items():
        images, labels = np.asarray(images), np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
            raise DatasetError(f"{split}_images must be uint8 RGB images [N, H, W, 3] with N > 0, got "
                               f"{images.dtype} {list(images.shape)}")
        if not np.issubdtype(labels.dtype, np.integer) or labels.shape not in ((len(images),), images.shape[:3]):
            raise DatasetError(f"{split}_labels must be {len(images)} integers (one per image, shape "
                               f"[{len(images)}]) or masks {list(images.shape[:3])} (one per pixel), got "
                               f"{labels.dtype} {list(labels.shape)}")
        arrays[split] = (images, labels.astype(np.int32))
    (train_images, train_labels), (test_images, test_labels) = arrays["train"], arrays["test"]
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DatasetError(f"train and test images differ in size: {list(train_images.shape[1:])} and "
                           f"{list(test_images.shape[1:])}")
    if train_labels.ndim != test_labels.ndim:
        raise DatasetError(f"train and test labels must both be per image or both per pixel, got train_labels "
                           f"{list(train_labels.shape)} and test_labels {list(test_labels.shape)}")
    labels = np.concatenate([train_labels.ravel(), test_labels.ravel()])
    classes = len(class_names) if class_names is not None else int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= classes:
        bad = labels[(labels < 0) | (labels >= classes)][0]
        expected = f"in [0, {classes}) (one class per name)" if class_names is not None else "non-negative"
        raise DatasetError(f"labels must be {expected}, got {bad}")
    class_names = tuple(str(c) for c in class_names) if class_names is not None else tuple(map(str, range(classes)))
    if name is None:
        digest = hashlib.sha256()
        for array in (train_images, train_labels, test_images, test_labels):
            digest.update(np.ascontiguousarray(array).data)
        digest.update("\n".join(class_names).encode())
        name = f"arrays-{digest.hexdigest()[:12]}"
    return ImageDataset(name, class_names, train_images, train_labels, test_images, test_labels,
                        *_channel_stats(train_images))


def from_tf_data(train, test, class_names=None, name=None):
    """`from_arrays` of two finite tf.data datasets of (image, integer label) pairs, batched or not:
    images uint8, or float 0-255 (rounded; [0, 1] floats are refused), all of one size; a label is
    one class per image or a mask [H, W] of one per pixel. Both are read once into memory, so this
    suits sets that fit in it (a CIFAR-sized set does); larger image sets are better given as a folder
    or zip path, which the ImageNet path streams."""
    return from_arrays(*_materialised(train, "train"), *_materialised(test, "test"), class_names=class_names,
                       name=name)


def _materialised(dataset, split):
    """(uint8 images [N, H, W, 3], int labels [N] or masks [N, H, W]) of a finite tf.data dataset of
    (image, label) pairs."""
    if not isinstance(dataset, tf.data.Dataset):
        raise DatasetError(f"{split} must be a tf.data.Dataset, got {type(dataset).__name__}")
    spec = dataset.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2):
        raise DatasetError(f"{split} must yield (image, label) pairs, got elements {spec}")
    if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise DatasetError(f"{split} is infinite (a .repeat() without a count?): give one pass over the data")
    batched = spec[0].shape.rank == 4
    if not batched and spec[0].shape.is_fully_defined():
        dataset, batched = dataset.batch(1024), True  # many images per step: much faster than one by one
    images, labels = [], []
    for image, label in dataset.as_numpy_iterator():
        image, label = (image, np.asarray(label)) if batched else (image[None], np.asarray(label)[None])
        if image.ndim != 4 or (images and image.shape[1:] != images[0].shape[1:]):
            raise DatasetError(f"{split} images must all be [H, W, 3] of one size, got {list(image.shape[1:])} "
                               f"after {list(images[0].shape[1:]) if images else 'none'}")
        if label.shape[1:] == (1,):  # a label wrapped in a list of one
            label = label[:, 0]
        if label.shape[1:] not in ((), image.shape[1:3]):
            raise DatasetError(f"{split} labels must be one integer per image (not one-hot) or a mask "
                               f"{list(image.shape[1:3])} per image, got {list(label.shape[1:])} per image")
        images.append(image)
        labels.append(label)
    if not images:
        raise DatasetError(f"{split} is empty")
    images, labels = np.concatenate(images), np.concatenate(labels)
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating) or images.min() < 0 or images.max() > 255:
            raise DatasetError(f"{split} images must be uint8 or float 0-255, got {images.dtype} in "
                               f"[{images.min()}, {images.max()}]")
        if images.max() <= 1:
            raise DatasetError(f"{split} images are floats in [0, {images.max()}]: give pixels 0-255 "
                               "(multiply by 255)")
        images = np.rint(images).astype(np.uint8)
    return images, labels


def search_split(labels, seed=0):
    """Splits every class 50/50 (the odd one out goes to train): sorted (train, valid) indices.
    Images labelled per pixel (masks [N, H, W]) have no class to stratify by: they are halved at random."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if labels.ndim > 1:
        order = rng.permutation(len(labels))
        middle = (len(labels) + 1) // 2
        return np.sort(order[:middle]), np.sort(order[middle:])
    in_train = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        in_train[members[: (len(members) + 1) // 2]] = True
    return np.flatnonzero(in_train), np.flatnonzero(~in_train)


def train_pipeline(images, labels, batch_size, mean, std, seed=0, augment=True, epochs=1, start_step=0,
                   steps_per_epoch=None, bgr=False):
    """Shuffled full batches of (normalised float32 images, int32 labels) for `epochs` epochs, from
    global step `start_step` on.

    Batch `i` of epoch `e` is a function of (seed, e, i) alone: every epoch has its own order and
    augmentation, and a run resumed at any step sees exactly the batches an uninterrupted run would.
    An epoch is `steps_per_epoch` batches (default: all full batches). Augmentation (pad 4 + random
    crop back to size + random horizontal flip) runs on whole batches with per-image offsets and flips;
    per-pixel labels (masks [N, H, W]) are cropped and flipped with their images (`_augment`).
    """
    images, labels = _check_arrays(images, labels)
    steps_per_epoch = _check_steps(len(images), batch_size, epochs, start_step, steps_per_epoch)
    fetch = _batch_fn(images, labels, mean, std, bgr)

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


def _check_steps(size, batch_size, epochs, start_step, steps_per_epoch):
    """The steps per epoch (default: all full batches) of a training pipeline, checked."""
    if not 0 < batch_size <= size:
        raise DatasetError(
            f"batch_size must be in [1, {size}] (the number of training images), got {batch_size!r}")
    full_batches = size // batch_size
    steps_per_epoch = steps_per_epoch or full_batches
    if not 0 < steps_per_epoch <= full_batches:
        raise DatasetError(f"steps_per_epoch must be in [1, {full_batches}], got {steps_per_epoch!r}")
    if not 0 <= start_step <= epochs * steps_per_epoch:
        raise DatasetError(f"start_step must be in [0, {epochs * steps_per_epoch}], got {start_step!r}")
    return steps_per_epoch


def eval_pipeline(images, labels, batch_size, mean, std, bgr=False):
    """All images in order, normalised, not augmented; the last batch may be smaller."""
    images, labels = _check_arrays(images, labels)
    if not 0 < batch_size:
        raise DatasetError(f"batch_size must be > 0, got {batch_size!r}")
    batch = _batch_fn(images, labels, mean, std, bgr)
    return tf.data.Dataset.range(len(images)).batch(batch_size).map(
        batch, tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def normalisation(mean, std):
    """(scale, offset), float32 per channel: (p / 255 - mean) / std, the pipelines' normalisation of a
    pixel p, as p * scale + offset, the form of a Keras Rescaling layer (the exported models'
    tas_keras.export.convert.pixel_input_model). The two forms round differently, by about 1e-7 relative."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return (1 / (255 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def _check_arrays(images, labels):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(labels) != len(images):
        raise DatasetError(
            f"expected uint8 images [N, H, W, 3] and N labels, got images {images.dtype} "
            f"{list(images.shape)} and labels {list(labels.shape)}")
    return images, labels


def normalised_pixels(pixels, mean, std, bgr=False):
    """RGB pixels (0-255) as a model's inputs: (p / 255 - mean) / std per channel of the model's input,
    whose channels are in BGR order with `bgr`."""
    x = tf.cast(pixels, tf.float32)
    if bgr:
        x = tf.reverse(x, [-1])
    return (x / 255 - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _batch_fn(images, labels, mean, std, bgr=False):
    """Maps a batch of indices (and a seed: augment) to a normalised batch."""
    per_pixel = np.ndim(labels) == 3
    # Gathering whole batches by index is much faster than slicing and batching single images.
    images, labels = tf.constant(images), tf.constant(labels, tf.int32)

    def batch(indices, seed=None):
        x, y = tf.gather(images, indices), tf.gather(labels, indices)
        if seed is not None and per_pixel:
            x, y = _augment(x, seed, masks=y)
        elif seed is not None:
            x = _augment(x, seed)
        return normalised_pixels(x, mean, std, bgr), y

    return batch


def _augment(images, seed, masks=None):
    """Pad 4, random crop back to size and random horizontal flip of a batch, per image; with `masks`
    (per-pixel labels [n, H, W]), (images, masks) moved alike."""
    height, width = images.shape[1:3]
    n = tf.shape(images)[0]
    offset_seed, flip_seed = tf.unstack(tf.random.split(seed, 2))
    offsets = tf.random.stateless_uniform([2, n], offset_seed, maxval=2 * _PAD + 1, dtype=tf.int32)
    flip = tf.random.stateless_uniform([n], flip_seed) < 0.5
    rows = offsets[0][:, None] + tf.range(height)
    # A flip is the crop's columns read backwards: one gather does both.
    cols = offsets[1][:, None] + tf.where(flip[:, None], tf.range(width - 1, -1, -1), tf.range(width))

    def moved(x, mode):
        padding = [[0, 0], [_PAD, _PAD], [_PAD, _PAD]] + [[0, 0]] * (x.shape.rank - 3)
        padded = tf.pad(x, padding, mode=mode)
        return tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)

    if masks is None:
        return moved(images, "CONSTANT")
    # A black border has no class of its own; mirrored pixels bring theirs along.
    return moved(images, "SYMMETRIC"), moved(masks, "SYMMETRIC")


def _existing_path(name):
    if not isinstance(name, (str, os.PathLike)) or not os.fspath(name):  # "" would mean the cwd
        raise DatasetError(f"dataset must be a name or a path, got {name!r}")
    path = pathlib.Path(name).expanduser()
    if path.exists():
        return path.resolve()
    if "/" in os.fspath(name) or os.sep in os.fspath(name) or path.suffix:
        raise DatasetError(f"dataset path {os.fspath(name)!r} does not exist")
    names = ", ".join([BUNDLED_DATASET, *_TFDS_STATS, *_STREAMED_TFDS])
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
    names, non_images = _list_files(path)
    kept = _class_files(path, names, non_images)
    names = [name for _, name in kept]
    images, decoded = _decode_images(names, list(_read_files(path, names)), path)
    unreadable = [name for name, ok in zip(names, decoded) if not ok]
    class_names, labels, test_mask, has_test_split = _labelled(
        [key for (key, _), ok in zip(kept, decoded) if ok], path)
    return {
        "images": images,
        "labels": labels,
        "test_mask": test_mask,
        "has_test_split": np.array(has_test_split),
        "class_names": np.array(class_names),
        "unreadable": np.array(unreadable, dtype=str),
        "non_images": np.array(len(non_images)),
    }


def _class_files(path, names, non_images):
    """[((split, class), name)] of the image files in class folders (`_class_keys`), warning about the
    files left out."""
    if non_images:
        logging.warning("%s: ignoring %d files that are not images (%s): %s", path, len(non_images),
                        ", ".join(_IMAGE_EXTENSIONS), _some(non_images))
    keys = _class_keys(names)
    if None in keys:
        logging.warning("%s: ignoring %d image files outside class folders", path, keys.count(None))
    kept = [(key, name) for key, name in zip(keys, names) if key]
    if not kept:
        raise DatasetError(
            f"no class folders with images ({', '.join(_IMAGE_EXTENSIONS)}) found in {str(path)!r}")
    return kept


def _labelled(keys, path):
    """(class names, int32 labels, test mask, whether there is a test split) of the (split, class)
    keys of the files kept."""
    has_test_split = any(split for split, _ in keys)
    class_names = sorted({cls for split, cls in keys if split != "test"})
    test_classes = sorted({cls for split, cls in keys if split == "test"})
    if has_test_split and test_classes != class_names:
        raise DatasetError(
            f"{str(path)!r}: test classes {test_classes} differ from train classes {class_names}")
    index = {cls: i for i, cls in enumerate(class_names)}
    return (class_names, np.array([index[cls] for _, cls in keys], np.int32),
            np.array([split == "test" for split, _ in keys]), has_test_split)


def _is_image(name):
    """By extension; hidden files and macOS' __MACOSX folders are not images."""
    return name.lower().endswith(_IMAGE_EXTENSIONS) and not any(
        part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def _list_files(path):
    """([relative posix paths of the image files of a folder or zip, sorted], [the other files'])."""
    with _readable(path):
        if path.is_dir():
            names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        else:
            with zipfile.ZipFile(path) as zf:
                names = sorted(n for n in zf.namelist() if not n.endswith("/"))
    return [n for n in names if _is_image(n)], [n for n in names if not _is_image(n)]


def _read_files(path, names):
    """The bytes of files of a folder or zip, lazily, in order."""
    with _readable(path):
        if path.is_dir():
            for name in names:
                yield (path / name).read_bytes()
        else:
            with zipfile.ZipFile(path) as zf:
                for name in names:
                    yield zf.read(name)


@contextlib.contextmanager
def _readable(path):
    try:
        yield
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise DatasetError(f"{str(path)!r} is neither a folder nor a readable zip file ({e})") from e
    except OSError as e:
        raise DatasetError(f"cannot read {e.filename or str(path)!r}: {e.strerror or e}") from e


def _first_image_size(path):
    """(height, width) of the first image file of a folder or zip that decodes."""
    names, _ = _list_files(path)
    if not names:
        raise DatasetError(f"no class folders with images ({', '.join(_IMAGE_EXTENSIONS)}) found in {str(path)!r}")
    for blob in _read_files(path, names):
        try:
            return tuple(tf.io.decode_image(blob, channels=3, expand_animations=False).shape[:2])
        except tf.errors.InvalidArgumentError:
            continue
    raise DatasetError(f"none of the {len(names)} image files in {str(path)!r} can be decoded "
                       f"({_some(names)})")


def _class_keys(names):
    """(split, class) of every file, split None for a <class>/* tree; None outside class folders.

    With a train/ folder, the first of val/, validation/ and test/ present is the test split ("test")."""
    folders = [name.split("/")[:-1] for name in names]
    # A zip usually wraps everything in one folder (named after it): look inside.
    while all(len(f) >= 2 for f in folders) and len({f[0] for f in folders}) == 1:
        folders = [f[1:] for f in folders]
    tops = {f[0] for f in folders if f}
    test_folder = next((t for t in _TEST_FOLDERS if t in tops), None)
    if "train" in tops and test_folder:
        split = {"train": "train", test_folder: "test"}
        return [(split[f[0]], f[1]) if len(f) >= 2 and f[0] in split else None for f in folders]
    return [(None, f[0]) if f else None for f in folders]


def _load_cropped_files(path, image_size, seed, max_train_examples, in_memory, stats):
    """A CroppedImageDataset of a folder or zip (a zip is extracted once into the cache), its
    squares decoded into memory if `in_memory(their bytes)`, else checked once (the unreadable files
    are cached) and decoded from the files at every epoch."""
    names, non_images = _list_files(path)
    kept = _class_files(path, names, non_images)
    side = image_transforms.square_side(image_size)
    decoded_bytes = len(kept) * side * side * 3
    memory = in_memory(decoded_bytes)
    root = path if path.is_dir() else _extracted(path, [name for _, name in kept])
    files = np.array([str(root / name) for _, name in kept])
    unreadable_cache = _cache_file(path, f"-unreadable-{side}")
    cached = None if memory else _read_cache(unreadable_cache)
    if cached is None:
        squares, decoded = _decode_squares(files, side, keep=memory)
        if not memory:
            _write_cache(unreadable_cache, {"decoded": decoded})
    else:
        squares, decoded = None, cached["decoded"]
    unreadable = [name for (_, name), ok in zip(kept, decoded) if not ok]
    if unreadable:
        logging.warning("%s: skipped %d image files that cannot be decoded: %s", path, len(unreadable),
                        _some(unreadable))
    if not decoded.any():
        raise DatasetError(f"none of the {len(kept)} image files in {str(path)!r} can be decoded "
                           f"({_some(unreadable)})")
    class_names, labels, test_mask, has_test_split = _labelled(
        [key for (key, _), ok in zip(kept, decoded) if ok], path)
    if not has_test_split:
        test_mask = _holdout(labels, seed)
        logging.info("%s has no train/ and val/ (or test/) folders: holding out %d of %d images (10%% per "
                     "class, seed %d) as the test split", path, test_mask.sum(), len(labels), seed)
    images = IndexedImages(labels, side, squares=squares) if memory else IndexedImages(
        labels, side, files=files[decoded])
    train = images.subset(np.flatnonzero(~test_mask))
    if max_train_examples is not None and max_train_examples < len(train):
        train = train.subset(_stratified_subset(train.labels, max_train_examples, seed))
    logging.info("%s: %d training and %d test images at %d px, %s (%.2f GB decoded)", path, len(train),
                 test_mask.sum(), image_size, "streamed from files" if train.streamed else "in memory",
                 decoded_bytes / 1e9)
    return CroppedImageDataset(
        path.stem, tuple(class_names), image_size, train, images.subset(np.flatnonzero(test_mask)), *stats,
        files_skipped={"unreadable_images": len(unreadable), "non_image_files": len(non_images)})


def _decode_squares(files, side, keep):
    """(uint8 [N, side, side, 3] squares of the files that decode, or None without `keep`; a mask of
    which of `files` did), decoding in parallel."""
    indexed = tf.data.Dataset.from_tensor_slices((tf.range(len(files)), files))
    if keep:
        decode = lambda index, file: (index, image_transforms.decode_square(tf.io.read_file(file), side))  # noqa: E731
    else:  # only whether it decodes
        decode = lambda index, file: (index, tf.shape(tf.io.decode_image(  # noqa: E731
            tf.io.read_file(file), channels=3, expand_animations=False)))
    # A file that fails to decode drops out of the stream (ignore_errors): its index is then missing.
    batches = list(indexed.map(decode, tf.data.AUTOTUNE).ignore_errors().batch(1024).as_numpy_iterator())
    decoded = np.zeros(len(files), bool)
    decoded[np.concatenate([index for index, _ in batches] or [np.zeros(0, int)])] = True
    squares = np.concatenate([squares for _, squares in batches]) if keep and batches else None
    return squares, decoded


def _extracted(zip_path, names):
    """The folder into which the files `names` of a zip are extracted, once: beside the decoded-image
    caches, keyed like them, so that tf.data reads the files in parallel (a zip is one stream)."""
    folder = _cache_file(zip_path).with_suffix("")
    if folder.is_dir():
        return folder
    logging.info("Extracting %s to %s (once)", zip_path, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.", suffix=".tmp"))
    try:
        with _readable(zip_path), zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp, members=names)
        os.replace(tmp, folder)  # a killed extraction never looks complete
    except OSError:
        if not folder.is_dir():  # else another process extracted it first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _load_cropped_tfds(name, data_dir, image_size, max_train_examples, in_memory):
    """A CroppedImageDataset of a prepared tensorflow-datasets set (never downloaded), its squares
    decoded into memory if `in_memory(their bytes)`, else streamed from the records."""
    base = name.split("/")[0]
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (ValueError, tfds.core.registered.DatasetNotFoundError) as e:
        raise DatasetError(f"no tensorflow-datasets set {name!r}: {e}") from e
    if not builder.is_prepared():
        raise DatasetError(_not_prepared(base, builder))
    test_split = _STREAMED_TFDS.get(base, "test")
    side = image_transforms.square_side(image_size)
    sizes = {split: builder.info.splits[split].num_examples for split in ("train", test_split)}
    train = TfdsImages(builder, "train", 0, min(sizes["train"], max_train_examples or sizes["train"]), side)
    test = TfdsImages(builder, test_split, 0, sizes[test_split], side)
    decoded_bytes = (len(train) + len(test)) * side * side * 3
    if in_memory(decoded_bytes):
        train, test = _tfds_in_memory(train), _tfds_in_memory(test)
    logging.info("%s: %d training and %d test images at %d px, %s (%.2f GB decoded)", name, len(train),
                 len(test), image_size, "streamed" if train.streamed else "in memory", decoded_bytes / 1e9)
    return CroppedImageDataset(base, tuple(builder.info.features["label"].names), image_size, train, test,
                               *_TFDS_STATS.get(base, IMAGENET_STATS))


def _not_prepared(base, builder):
    root = os.fspath(builder.data_dir_root)
    if base == "imagenet2012":
        return (f"imagenet2012 is not prepared in {root!r}: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
                f"in {os.path.join(root, 'downloads', 'manual')!r} and run `tfds build imagenet2012 "
                f"--data_dir={root}` (nothing is downloaded), then pass --data_dir={root}")
    return (f"{base} is not prepared in {root!r} and is never downloaded here: run `tfds build {base} "
            f"--data_dir=DIR` on a machine online and pass --data_dir=DIR, or pass the downloaded archive's "
            f"folder or .zip as --dataset")


def _tfds_in_memory(split):
    batches = list(split.records().batch(1024).as_numpy_iterator())
    return IndexedImages(np.concatenate([labels for _, labels in batches]), split.side,
                         squares=np.concatenate([squares for squares, _ in batches]))


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


def _cache_file(path, kind=""):
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
    return root / f"{path.stem}-{key[:20]}{kind}.npz"


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
    """Sorted indices of `size` examples drawn at the same rate from every class; of images labelled
    per pixel (masks [N, H, W]), which have no class, drawn at random."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    if labels.ndim > 1:
        return np.sort(order[:size])
    # Rank within the (shuffled) class as a fraction of the class: taking the smallest fractions
    # first takes every class in proportion; the shuffled order breaks ties between classes.
    fraction = np.empty(len(labels))
    for c in np.unique(labels):
        members = order[labels[order] == c]
        fraction[members] = (np.arange(len(members)) + 0.5) / len(members)
    return np.sort(order[np.argsort(fraction[order], kind="stable")[:size]])
