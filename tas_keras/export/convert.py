"""SavedModel and TFLite conversion of a trained Keras model (docs/design.md section 9).

The exported models take RGB pixels as a camera gives them (uint8, or float32 in 0-255 with
`float_input`): the dataset's mean/std normalisation, which training applies in tf.data, is a
Rescaling layer inside the exported model (`pixel_input_model`); the .keras files stay as trained.
The SavedModel comes from Keras 3's own exporter (model.export, an ExportArchive whose serving
signature takes the input by its name, "image"); the .tflite files are converted from that SavedModel,
the path Keras' own LiteRT export takes for Keras 3 models. Every file and directory is written under a
temporary name beside its final one and renamed when complete, so a killed export never leaves a
model.tflite or saved_model/ that looks usable.
"""

import contextlib
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from tas_keras import data

QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
SERVING_SIGNATURE = "serving_default"
LABELS_FILE = "labels.txt"


@contextlib.contextmanager
def atomic_path(path, directory=False):
    """Yields a temporary path beside `path` to write to; it becomes `path` only if the block succeeds.

    `directory`: the block creates a directory there (an existing one at `path` is replaced).
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        if directory:
            os.chmod(scratch, 0o777 & ~_umask())  # mkdtemp's 0o700 would make the result private
        target = scratch if directory else os.path.join(scratch, os.path.basename(path))
        yield target
        if directory and os.path.isdir(path):
            shutil.rmtree(path)  # os.replace cannot replace a non-empty directory
        os.replace(target, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path, payload):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(payload)


def write_labels(path, class_names):
    """labels.txt: one class name per line, in the order of the model's outputs."""
    write_bytes(path, "".join(f"{name}\n" for name in class_names).encode())


def normalised(images, mean, std, batch_size=1024, bgr=False):
    """uint8 images as float32 model inputs, through the data pipeline's own normalisation."""
    labels = np.zeros(len(images), np.int32)
    return np.concatenate([x for x, _ in data.eval_pipeline(images, labels, batch_size, mean, std, bgr)
                           .as_numpy_iterator()])


def pixel_dtype(float_input=False):
    return "float32" if float_input else "uint8"


def pixel_input_model(model, mean, std, float_input=False, keras_module=keras, bgr=False, probabilities=False):
    """`model` (which takes normalised images) behind a Rescaling layer that normalises RGB pixels
    (uint8, or float32 in 0-255 with `float_input`) as training did (`data.normalisation`); for a
    model that takes BGR (`bgr`), a fixed 1x1 conv first reverses the channels. With `probabilities`
    a Softmax after the model turns its logits into class probabilities.

    `keras_module` builds the wrapper in another Keras of the same API (tf_keras for the TFMOT bridge).
    """
    scale, offset = data.normalisation(mean, std)
    pixels = keras_module.Input(model.input_shape[1:], dtype=pixel_dtype(float_input), name="image")
    ordered = pixels
    if bgr:
        reverse = np.eye(3, dtype=np.float32)[::-1].reshape(1, 1, 3, 3)
        ordered = keras_module.layers.Conv2D(3, 1, use_bias=False, trainable=False, name="bgr",
                                             kernel_initializer=keras_module.initializers.Constant(reverse))(
            keras_module.layers.Rescaling(1.0, name="pixels")(pixels))  # a float input for the conv
    normalised_images = keras_module.layers.Rescaling(scale, offset, name="normalisation")(ordered)
    outputs = model(normalised_images)
    if probabilities:
        outputs = keras_module.layers.Softmax(name="probabilities")(outputs)
    return keras_module.Model(pixels, outputs, name=model.name)


def representative_images(dataset, size, seed=0, float_input=False):
    """`size` training images drawn at random (fixed seed), as pixels, for int8 calibration."""
    return dataset.sample_train_pixels(size, seed).astype(pixel_dtype(float_input))


def export_saved_model(model, path):
    """Writes `model`'s inference graph as a SavedModel directory at `path`."""
    with atomic_path(path, directory=True) as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)


def saved_model_outputs(path, input_name, images, batch_size=256):
    """Runs the reloaded SavedModel's serving signature (called with the input's name) on `images`."""
    serve = tf.saved_model.load(path).signatures[SERVING_SIGNATURE]
    outputs = []
    for start in range(0, len(images), batch_size):
        result = serve(**{input_name: tf.constant(images[start:start + batch_size])})
        (logits,) = result.values()
        outputs.append(logits.numpy())
    return np.concatenate(outputs)


def convert_tflite(saved_model_dir, quantize, representative=None, int8_io=False):
    """The .tflite bytes of a SavedModel.

    quantize: none (fp32) | float16 (fp16 weights) | dynamic (int8 weights, activations quantised at
    run time) | int8 (weights and activations int8, calibrated on `representative`: [N, H, W, C] images
    of the SavedModel's input type, or a list of such arrays, one per model input in the model's
    order). `int8_io`: the int8 model gives int8 output and, if its input is float, takes int8 input
    (their scale and zero point say how to convert) instead of float32; a uint8 input stays the uint8
    pixels.
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if int8_io and quantize != "int8":
        raise ValueError(f"int8 input/output needs quantize='int8', got {quantize!r}")
    if quantize == "int8" and representative is None:
        raise ValueError("int8 quantisation needs representative images")
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        inputs = representative if isinstance(representative, (list, tuple)) else [representative]
        converter.representative_dataset = lambda: ([x[i][None] for x in inputs] for i in range(len(inputs[0])))
        # Builtins-int8 only: an op without an int8 kernel fails the conversion instead of silently
        # staying float.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    return converter.convert()
