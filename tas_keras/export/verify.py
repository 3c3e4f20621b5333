"""Runs .tflite files with LiteRT and checks them against the Keras model they came from.

LiteRT (`ai_edge_litert`) is the runtime phones use; tf.lite.Interpreter is deprecated. Its CPU path
applies the XNNPACK delegate by default, so the latency measured here is the XNNPACK one.
"""

import os
import time

import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from tas_keras.export.convert import LABELS_FILE
from tas_keras import data

# What each conversion must keep, on the test split. fp32 and fp16 bound the logits themselves, relative
# to the largest Keras logit, since fp16 rounding errors grow with the activations' scale: measured
# max_rel_diff 2.9e-7 (fp32) and 4.3e-4 (fp16, 0.007 absolute) on a trained ResNet-20 whose logits reach
# 16.6, and 1.1e-3 (fp16) on a ResNet-8 trained one epoch. int8 changes the logits by design (by up to 2
# there), so only its decisions are checked: top-1 agreement with Keras (measured 0.96 to 0.995) and the
# test accuracy lost (measured -0.4 to +0.3 points).
TOLERANCES = {
    "none": {"max_rel_diff": 1e-5},
    "float16": {"max_rel_diff": 5e-3},
    "dynamic": {"top1_agreement": 0.9, "accuracy_drop": 0.02},
    "int8": {"top1_agreement": 0.9, "accuracy_drop": 0.02},
}
# Relative to the largest logit, as the .tflite's: the reloaded graph is rewritten (folded constants,
# fused ops), and a fine-tuned EfficientNet-Lite0's logits of ~15 move by 2e-5 (1.3e-6 of them).
SAVED_MODEL_TOLERANCE = {"saved_model_max_rel_diff": 1e-5}
_AT_LEAST = {"top1_agreement"}  # every other checked metric is an upper bound


class LiteRTModel:
    """One .tflite model at batch 1, taking pixels and returning float32 whatever its I/O types.

    A quantised input (int8, with a scale) is quantised with the input tensor's scale and zero point,
    an integer output dequantised with the output's, as an app would; pixels go to a uint8 or float
    input as they are.
    """

    def __init__(self, path, threads):
        self.interpreter = Interpreter(model_path=path, num_threads=threads)
        self.interpreter.allocate_tensors()
        (self._input,) = self.interpreter.get_input_details()
        (self._output,) = self.interpreter.get_output_details()

    @property
    def io_dtypes(self):
        return np.dtype(self._input["dtype"]).name, np.dtype(self._output["dtype"]).name

    @property
    def image_shape(self):
        return tuple(int(d) for d in self._input["shape"][1:])

    @property
    def num_classes(self):
        return int(self._output["shape"][-1])

    def set_input(self, image):
        x = image[None]
        dtype = self._input["dtype"]
        scale, zero_point = self._input["quantization"]
        if np.issubdtype(dtype, np.integer) and scale:
            x = np.clip(np.round(x / scale + zero_point), np.iinfo(dtype).min, np.iinfo(dtype).max)
        self.interpreter.set_tensor(self._input["index"], x.astype(dtype))

    def output(self):
        y = self.interpreter.get_tensor(self._output["index"])[0]
        if np.issubdtype(y.dtype, np.integer):
            scale, zero_point = self._output["quantization"]
            y = (y.astype(np.float32) - zero_point) * scale
        return y

    def predict(self, images):
        outputs = []
        for image in images:
            self.set_input(image)
            self.interpreter.invoke()
            outputs.append(self.output())
        return np.stack(outputs)


def read_labels(model_path):
    """The class names of a .tflite's outputs, from the labels.txt the export wrote beside it."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), LABELS_FILE)
    try:
        with open(path) as f:
            return [line.rstrip("\n") for line in f]
    except OSError as error:
        raise ValueError(f"cannot read {path}, the class names of {model_path}: {error.strerror}") from None


def classify_files(model_path, image_paths, top=5, threads=1):
    """The `top` classes of every image file (JPEG, PNG, GIF, BMP) by a .tflite of this tool: one list
    of (class name, probability) per image, most probable first. Images are resized to the model's
    input size, as the dataset loader does; probabilities are the softmax of the logits."""
    model = LiteRTModel(model_path, threads)
    labels = read_labels(model_path)
    if len(labels) != model.num_classes:
        raise ValueError(f"{LABELS_FILE} beside {model_path} names {len(labels)} classes, the model has "
                         f"{model.num_classes} outputs")
    results = []
    for path in image_paths:
        try:
            with open(path, "rb") as f:
                image = data.decode_image(f.read(), model.image_shape[:2]).numpy()
        except OSError as error:
            raise ValueError(f"cannot read image {path!r}: {error.strerror}") from None
        except tf.errors.InvalidArgumentError:
            raise ValueError(f"{path!r} is not an image this tool can decode (JPEG, PNG, GIF, BMP)") from None
        model.set_input(image)
        model.interpreter.invoke()
        logits = model.output().astype(np.float64)
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        best = np.argsort(-probabilities, kind="stable")[:top]
        results.append([(labels[i], float(probabilities[i])) for i in best])
    return results


def parity(reference, outputs, labels):
    """How `outputs` (of an export) compare with the Keras model's `reference` logits on labelled images;
    per pixel for per-pixel labels (masks [N, H, W]), which also get the mean IoU of either."""
    reference_top1, top1 = reference.argmax(-1), outputs.argmax(-1)
    keras_accuracy, accuracy = float(np.mean(reference_top1 == labels)), float(np.mean(top1 == labels))
    max_abs_diff = float(np.max(np.abs(outputs - reference)))
    metrics = {
        "max_abs_diff": max_abs_diff,
        "max_rel_diff": max_abs_diff / float(np.max(np.abs(reference))),
        "top1_agreement": float(np.mean(top1 == reference_top1)),
        "accuracy": accuracy,
        "keras_accuracy": keras_accuracy,
        "accuracy_drop": keras_accuracy - accuracy,
    }
    if np.ndim(labels) == 3:
        classes = reference.shape[-1]
        metrics.update(mean_iou=mean_iou(labels, top1, classes),
                       keras_mean_iou=mean_iou(labels, reference_top1, classes))
    return metrics


def mean_iou(labels, predicted, num_classes):
    """The mean over the classes present in `labels` or `predicted` of their intersection over union."""
    metric = keras.metrics.MeanIoU(num_classes)
    metric.update_state(labels, predicted)
    return float(metric.result())


def interleaved_latency(models, image, runs, warmup=20, rewarm=0):
    """Batch-1 invoke times in ms, one list per model, measured A B A B ... so that load from other
    processes on the machine hits every model alike. `image` None: the models' inputs are already set
    (anything with an `interpreter` can be timed then).

    `rewarm`: untimed invokes of a model right before each of its timed ones, so that it is timed with
    its own weights and activations in the caches, as when an app runs it back to back (1 is enough);
    0 times every model right after the others, whose weights have evicted its own."""
    for model in models:
        if image is not None:
            model.set_input(image)
        for _ in range(warmup):
            model.interpreter.invoke()
    times = [[] for _ in models]
    for _ in range(runs):
        for model, samples in zip(models, times):
            for _ in range(rewarm):
                model.interpreter.invoke()
            start = time.perf_counter()
            model.interpreter.invoke()
            samples.append(1e3 * (time.perf_counter() - start))
    return times


def latency_summary(samples):
    return {"median": float(np.median(samples)), "p90": float(np.percentile(samples, 90)),
            "runs": len(samples)}


def checks(metrics, tolerances, prefix=""):
    """Pass/fail of every metric named in `tolerances`: {metric: limit}, an upper bound unless the
    metric is one where more is better."""
    results = []
    for metric, limit in tolerances.items():
        at_least = metric in _AT_LEAST
        value = metrics[metric]
        results.append({"name": f"{prefix}{metric}", "value": value, "limit": limit,
                        "bound": ">=" if at_least else "<=",
                        "passed": bool(value >= limit if at_least else value <= limit)})
    return results
