"""Run as a script, `mirrored_step.py base|search` (it splits the CPU into 2 logical devices, which must
happen before TensorFlow starts): one base-training step or one search step on one device and under
MirroredStrategy over the two devices, on the same global batch. Prints the largest weight difference
as JSON.

The global batch is one half-batch twice, so per-replica BN statistics equal the global ones and any
difference left comes from how losses and gradients are scaled and summed across replicas. The base
step runs in float64: in float32 the two devices' different summation orders move a few activations
across a ReLU kink, which shifts the early layers' updates by about 0.1% of the update.
"""

import json
import sys

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

STEP = sys.argv[1]
keras.config.set_floatx("float64" if STEP == "base" else "float32")
import numpy as np  # noqa: E402

from tas_keras.models.cifar_resnet import CifarResNet  # noqa: E402
from tas_keras.search import TASSearchModel  # noqa: E402
from tas_keras.search_space import ArchConfig  # noqa: E402
from tas_keras.supernet import build_supernet  # noqa: E402

ARCH = ArchConfig.full("resnet14", input_shape=(8, 8, 3))  # two blocks a stage: a depth choice
rng = np.random.default_rng(0)
half = rng.normal(size=(8, 8, 8, 3)).astype("float32"), rng.integers(0, 10, 8).astype("int32")
batch = tuple(np.concatenate([a, a]) for a in half)


def plain():
    model = CifarResNet(ARCH)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    images, labels = batch
    return model, tf.data.Dataset.from_tensors((images.astype("float64"), labels))


def search():
    model = TASSearchModel(build_supernet(ARCH.name, CifarResNet(ARCH)), target_ratio=0.3, sample_per_replica=False)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
                  arch_optimizer=keras.optimizers.Adam(0.01, beta_1=0.5, beta_2=0.999))
    return model, tf.data.Dataset.from_tensors((batch, batch))


def one_step(build, strategy):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model, dataset = build()
        history = model.fit(dataset, epochs=1, verbose=0).history
    return [np.asarray(v) for v in model.weights], history["loss"][0]


mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
build = {"base": plain, "search": search}[STEP]
single, single_loss = one_step(build, tf.distribute.get_strategy())
replicated, replicated_loss = one_step(build, mirrored)
keras.utils.set_random_seed(0)
initial = [np.asarray(v) for v in build()[0].weights]
print(json.dumps({
    "replicas": mirrored.num_replicas_in_sync,
    "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(single, replicated)),
    "max_update": max(float(np.abs(a - b).max()) for a, b in zip(single, initial)),
    "loss": [single_loss, replicated_loss],
}))
