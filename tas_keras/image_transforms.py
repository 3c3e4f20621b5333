"""ImageNet-style preprocessing of single images, as tf.data maps: decode, Inception-style random
resized crop + flip for training, resize + centre crop for evaluation.

Every image is first reduced to its *square*: the shorter side resized to `square_side(image_size)`
(= image_size / 0.875, the evaluation protocol's resize) and the centre square of that side cut out.
Evaluation takes the centre `image_size` crop of the square, which is the usual "resize to 1/0.875,
centre crop" protocol; training takes a random resized crop of the square. Squares are what a dataset
holds in memory when it fits (data.py), so the in-memory and the streamed pipelines compute the same
images from the same uint8 squares.
"""

import math

import tensorflow as tf

EVAL_CROP_FRACTION = 0.875
# Inception's crop areas (Szegedy et al. 2015): 8% to 100% of the image, aspect ratio 3/4 to 4/3. Below
# 128 px a network sees so few pixels of an 8% crop (at 96 px, a 31 px patch of the 110 px square
# blown up threefold) that it trains on blur; small-input recipes use milder crops, we use 25%.
INCEPTION_AREA_RANGE = (0.08, 1.0)
SMALL_INPUT_AREA_RANGE = (0.25, 1.0)
SMALL_INPUT = 128
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)


def square_side(image_size):
    return int(math.ceil(image_size / EVAL_CROP_FRACTION))


def crop_area_range(image_size):
    return SMALL_INPUT_AREA_RANGE if image_size < SMALL_INPUT else INCEPTION_AREA_RANGE


def decode_square(blob, side):
    """An encoded image (JPEG, PNG, GIF, BMP; grayscale, CMYK and RGBA become RGB) as its uint8
    [side, side, 3] square: shorter side resized to `side` (antialiased), then the centre cut out."""
    image = tf.io.decode_image(blob, channels=3, expand_animations=False)
    height, width = tf.unstack(tf.shape(image)[:2])
    scale = side / tf.cast(tf.minimum(height, width), tf.float64)
    # At least `side` on both axes, whatever the rounding of the longer one.
    size = tf.maximum(side, tf.cast(tf.round(tf.cast(tf.stack([height, width]), tf.float64) * scale), tf.int32))
    same = tf.reduce_all(size == tf.stack([height, width]))
    image = tf.cond(same, lambda: image, lambda: tf.saturate_cast(
        tf.round(tf.image.resize(image, size, antialias=True)), tf.uint8))
    top, left = (size[0] - side) // 2, (size[1] - side) // 2
    return tf.ensure_shape(image[top:top + side, left:left + side], (side, side, 3))


def centre_crop(square, image_size):
    """The centre image_size x image_size of a square (uint8 in, uint8 out)."""
    offset = (square.shape[0] - image_size) // 2
    return square[offset:offset + image_size, offset:offset + image_size]


def random_resized_crop(square, image_size, seed, area_range):
    """A crop of `area_range` of the square's area and aspect ratio in [3/4, 4/3] (else the whole
    square), resized to image_size (float32, 0-255) and flipped horizontally with probability 1/2.
    The result is a function of the image and the stateless `seed` alone."""
    box_seed, flip_seed = tf.unstack(tf.random.split(seed, 2))
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(square), tf.zeros([1, 0, 4]), seed=box_seed, area_range=area_range,
        aspect_ratio_range=ASPECT_RATIO_RANGE, max_attempts=10, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(square, begin, size)
    resized = tf.image.resize(crop, (image_size, image_size), antialias=True)
    return tf.image.stateless_random_flip_left_right(resized, flip_seed)
