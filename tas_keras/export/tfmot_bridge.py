"""Quantization-aware training with TensorFlow Model Optimization (optional; docs/design.md section 9).

TFMOT wraps only tf_keras (Keras 2) models. The bridge rebuilds the functional Keras 3 model in
tf_keras layer by layer (same classes, names and settings), copies the Keras 3 weights by layer name, fine-tunes
with fake quantisation (tfmot.quantization.keras.quantize_model) and converts to an int8 .tflite that
takes RGB pixels, like every export (tas_keras.export.convert.pixel_input_model).

Needs the packages of requirements-tfmot.txt. Import this module only where QAT is wanted: importing
TFMOT sets TF_USE_LEGACY_KERAS=1, which changes what `tf.keras` means for the whole process.
"""

import inspect
import os

import tensorflow as tf

from tas_keras.export import convert
from tas_keras.layer_rules import is_input_layer


class TfmotMissingError(ValueError):
    """The optional TFMOT packages are not installed."""


def require_tfmot():
    """Raises TfmotMissingError, saying how to install them, without the TFMOT packages."""
    _import_tfmot()


def _import_tfmot():
    previous = os.environ.get("TF_USE_LEGACY_KERAS")
    try:
        import tensorflow_model_optimization as tfmot
        import tf_keras
    except ImportError as error:
        raise TfmotMissingError(
            f"quantization-aware training needs tf_keras and tensorflow-model-optimization, which are "
            f"optional ({error}): pip install --no-deps -r requirements-tfmot.txt") from error
    finally:
        # TFMOT has bound tf_keras for itself by now; keep the switch from leaking to the rest.
        if previous is None:
            os.environ.pop("TF_USE_LEGACY_KERAS", None)
        else:
            os.environ["TF_USE_LEGACY_KERAS"] = previous
    return tf_keras, tfmot


def _tf_keras_layer(tf_keras, layer):
    """A tf_keras layer of `layer`'s class and settings. Initialisers, regularisers and constraints
    are left at their defaults (the weights are copied in afterwards), and Keras 3 settings tf_keras
    does not take are dropped."""
    cls = getattr(tf_keras.layers, type(layer).__name__, None)
    if cls is None:
        raise ValueError(f"{layer.name} ({type(layer).__name__}): tf_keras has no such layer, so the TFMOT "
                         "bridge cannot rebuild this model")
    accepted = inspect.signature(cls.__init__).parameters
    config = {key: value for key, value in layer.get_config().items()
              if key in accepted and not key.endswith(("_initializer", "_regularizer", "_constraint"))}
    return cls(name=layer.name, **config)


def build_tf_keras(model):
    """A functional Keras 3 model's network in tf_keras: the same layers, names and settings, fresh
    weights, no regularisers."""
    tf_keras, _ = _import_tfmot()
    tensors = {id(t): tf_keras.Input(shape=t.shape[1:], name=t.name) for t in model.inputs}
    for layer in model.operations:
        if is_input_layer(layer):
            continue
        node = layer._inbound_nodes[0]
        inputs = [tensors[id(t)] for t in node.input_tensors]
        outputs = _tf_keras_layer(tf_keras, layer)(inputs if len(inputs) > 1 else inputs[0])
        tensors[id(node.outputs[0])] = outputs
    return tf_keras.Model([tensors[id(t)] for t in model.inputs], [tensors[id(t)] for t in model.outputs],
                          name=model.name)


def copy_weights(source, target):
    """Copies every weighted layer of the Keras 3 `source` into the same-named layer of `target`.

    Both libraries order a layer's weights alike (kernel, bias; gamma, beta, moving mean, variance).
    """
    targets = {layer.name: layer for layer in target.layers if layer.weights}
    sources = {layer.name: layer for layer in source.layers if layer.weights}
    if sources.keys() != targets.keys():
        raise ValueError(f"layer names differ: only in the Keras 3 model {sorted(sources - targets.keys())}, "
                         f"only in the tf_keras model {sorted(targets - sources.keys())}")
    for name, layer in sources.items():
        weights = layer.get_weights()
        expected = [tuple(w.shape) for w in targets[name].get_weights()]
        if [w.shape for w in weights] != expected:
            raise ValueError(f"{name}: weight shapes {[w.shape for w in weights]} != {expected}")
        targets[name].set_weights(weights)


def quantization_aware_int8(model, dataset, epochs=1, max_steps=None, batch_size=128, learning_rate=1e-3,
                            seed=0, int8_io=False, float_input=False, representative=None, probabilities=False):
    """Fine-tunes a trained functional model with fake quantisation; returns the int8 .tflite bytes of it
    behind the pixel normalisation (`convert.pixel_input_model`).

    `max_steps` caps the steps of each epoch (quick runs). The fake-quant ranges learnt in training
    set the network's quantisation; `representative` pixels (as convert.representative_images gives
    them) calibrate the normalisation in front of it, which training does not see, so that it runs in
    int8 too (without them it stays float).
    """
    tf_keras, tfmot = _import_tfmot()
    plain = build_tf_keras(model)
    copy_weights(model, plain)
    qat = tfmot.quantization.keras.quantize_model(plain)
    qat.compile(optimizer=tf_keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True),
                loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps = min(max_steps or dataset.train_size, dataset.train_size // batch_size)
    train = dataset.train_batches(batch_size, seed=seed, epochs=epochs, steps_per_epoch=steps)
    qat.fit(train, epochs=epochs, steps_per_epoch=steps, verbose=0)
    exported = convert.pixel_input_model(qat, dataset.mean, dataset.std, float_input, keras_module=tf_keras,
                                         bgr=dataset.bgr, probabilities=probabilities)
    converter = tf.lite.TFLiteConverter.from_keras_model(exported)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if representative is not None:
        converter.representative_dataset = lambda: ([image[None]] for image in representative)
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()
