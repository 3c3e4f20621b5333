"""SavedModel and TFLite conversion of a trained Keras model (DESIGN.md section 9).

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

import numpy as np
import tensorflow as tf

from tas_keras import data

QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
SERVING_SIGNATURE = "serving_default"


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


def normalised(images, mean, std, batch_size=1024):
    """uint8 images as float32 model inputs, through the data pipeline's own normalisation."""
    labels = np.zeros(len(images), np.int32)
    return np.concatenate([x for x, _ in data.eval_pipeline(images, labels, batch_size, mean, std)
                           .as_numpy_iterator()])


def representative_images(dataset, size, seed=0):
    """`size` training images drawn at random (fixed seed), normalised, for int8 calibration."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(dataset.train_images), min(size, len(dataset.train_images)), replace=False))
    return normalised(dataset.train_images[pick], dataset.mean, dataset.std)


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
    run time) | int8 (weights and activations int8, calibrated on `representative`, float32 [N, H, W, C]
    images, or a list of such arrays, one per model input in the model's order). `int8_io`: the int8 model takes int8 input and gives int8 output (its tensors' scale and
    zero point say how to convert) instead of float32.
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
