"""Quantization-aware training with TensorFlow Model Optimization (optional; DESIGN.md section 9).

TFMOT wraps only tf_keras (Keras 2) models. The bridge rebuilds the plain CIFAR ResNet in tf_keras
from its ArchConfig with the same layer names, copies the Keras 3 weights by layer name, fine-tunes
with fake quantisation (tfmot.quantization.keras.quantize_model) and converts to an int8 .tflite that
takes RGB pixels, like every export (export.convert.pixel_input_model).

Needs the packages of requirements-tfmot.txt. Import this module only where QAT is wanted: importing
TFMOT sets TF_USE_LEGACY_KERAS=1, which changes what `tf.keras` means for the whole process.
"""

import os

import tensorflow as tf

from export import convert
from tas_keras import data
from tas_keras.models.cifar_resnet import BN_EPSILON, BN_MOMENTUM, network_plan


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


def build_tf_keras(arch):
    """CifarResNet(arch)'s network in tf_keras: same layers, same names, no regularisers."""
    tf_keras, _ = _import_tfmot()
    layers = tf_keras.layers

    def conv_bn(x, conv, relu):
        if conv.pool_first:
            x = layers.AveragePooling2D(2, padding="same", name=conv.name.replace("conv", "pool"))(x)
        x = layers.Conv2D(conv.out_channels, conv.kernel, strides=conv.stride, padding="same",
                          use_bias=False, name=conv.name)(x)
        if conv.batch_norm:
            x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=conv.bn_name)(x)
        return layers.ReLU(name=conv.name.replace("conv", "relu"))(x) if relu else x

    plan = network_plan(arch)
    inputs = tf_keras.Input(shape=arch.input_shape, name="image")
    x = conv_bn(inputs, plan.stem, relu=True)
    for block in plan.blocks:
        shortcut = x
        for index, conv in enumerate(block.convs):
            x = conv_bn(x, conv, relu=index < len(block.convs) - 1)
        if block.shortcut is not None:
            shortcut = conv_bn(shortcut, block.shortcut, relu=False)
        x = layers.Add(name=f"{block.name}_add")([shortcut, x])
        x = layers.ReLU(name=f"{block.name}_out")(x)
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    outputs = layers.Dense(arch.num_classes, name="head_fc")(x)
    return tf_keras.Model(inputs, outputs, name=arch.name)


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
                            seed=0, int8_io=False, float_input=False, representative=None):
    """Fine-tunes a trained CifarResNet with fake quantisation; returns the int8 .tflite bytes of it
    behind the pixel normalisation (`convert.pixel_input_model`).

    `max_steps` caps the steps of each epoch (quick runs). The fake-quant ranges learnt in training
    set the network's quantisation; `representative` pixels (as convert.representative_images gives
    them) calibrate the normalisation in front of it, which training does not see, so that it runs in
    int8 too (without them it stays float).
    """
    if not hasattr(model, "arch"):
        raise ValueError("the TFMOT bridge rebuilds a CifarResNet from its ArchConfig; got "
                         f"{type(model).__name__}")
    tf_keras, tfmot = _import_tfmot()
    plain = build_tf_keras(model.arch)
    copy_weights(model, plain)
    qat = tfmot.quantization.keras.quantize_model(plain)
    qat.compile(optimizer=tf_keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True),
                loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps = min(max_steps or len(dataset.train_labels), len(dataset.train_labels) // batch_size)
    train = data.train_pipeline(dataset.train_images, dataset.train_labels, batch_size, dataset.mean,
                                dataset.std, seed=seed, epochs=epochs, steps_per_epoch=steps)
    qat.fit(train, epochs=epochs, steps_per_epoch=steps, verbose=0)
    exported = convert.pixel_input_model(qat, dataset.mean, dataset.std, float_input, keras_module=tf_keras)
    converter = tf.lite.TFLiteConverter.from_keras_model(exported)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if representative is not None:
        converter.representative_dataset = lambda: ([image[None]] for image in representative)
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()
