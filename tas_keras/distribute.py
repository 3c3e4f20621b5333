"""tf.distribute strategies for the training stages.

The batch size every stage takes is the global batch: each of R replicas sees batch / R images per
step. Learning rates are not rescaled automatically: the reference recipe (lr 0.1 at batch 256) holds
for a global batch of 256 on any number of replicas; for a larger global batch scale the learning rate
linearly (lr = 0.1 * batch / 256) and consider a warm-up.
"""

import functools
import os

import tensorflow as tf

STRATEGIES = ("auto", "default", "mirrored", "multi_worker")


@functools.cache
def make_strategy(name="auto"):
    """auto: MirroredStrategy over the visible GPUs when there are several, else the default strategy.

    multi_worker reads the cluster from TF_CONFIG; it must be created before any other TensorFlow
    work in the process, so the stage functions create it first (and once: it is cached).
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    if name == "auto":
        name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if "TF_CONFIG" not in os.environ:
        raise ValueError("--strategy=multi_worker needs TF_CONFIG describing the cluster and this worker")
    return tf.distribute.MultiWorkerMirroredStrategy()


def in_strategy_scope(stage):
    """Runs a stage function (models, optimizers, fit) inside the scope of its `strategy=` argument;
    called from inside another stage's scope with the default "auto", it stays in that scope."""

    @functools.wraps(stage)
    def run(*args, strategy="auto", **kwargs):
        if strategy == "auto" and tf.distribute.has_strategy():
            return stage(*args, **kwargs)
        with make_strategy(strategy).scope():
            return stage(*args, **kwargs)

    return run
