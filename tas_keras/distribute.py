"""tf.distribute strategies for the training stages.

The batch size every stage takes is the global batch: each of R replicas sees batch / R images per
step. Learning rates are not rescaled automatically: the reference recipe (lr 0.1 at batch 256) holds
for a global batch of 256 on any number of replicas; for a larger global batch scale the learning rate
linearly (lr = 0.1 * batch / 256) and consider a warm-up.

Under MultiWorkerMirroredStrategy every worker runs the same stage code. The chief writes the run
directory; every other worker writes the same files into `<out>/workers/<task>` (`runs.run_dir`), and all
of them resume from the chief's checkpoint, so `--out` must be on a filesystem all workers share.
"""

import contextlib
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
    _let_keras_fit_run_multi_worker()
    return tf.distribute.MultiWorkerMirroredStrategy()


def strategy_scope(strategy):
    """The scope of the strategy named `strategy`; "auto" inside another strategy's scope stays in it."""
    if strategy == "auto" and tf.distribute.has_strategy():
        return contextlib.nullcontext()
    return make_strategy(strategy).scope()


def is_multi_worker():
    return isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy)


def is_chief():
    """True unless this process is a non-chief worker of a multi-worker cluster."""
    return tf.distribute.get_strategy().extended.should_checkpoint


def _let_keras_fit_run_multi_worker():
    """Works around Keras 3's TensorFlow trainer under MultiWorkerMirroredStrategy
    (keras-team/keras#20585): `fit` reduces a whole data batch across workers only to learn its
    shapes, and reduces the scalar step logs over axis 0; both fail. This takes the shapes from the
    local replica's batch and averages the logs over replicas, what the trainer does on one machine.
    """
    # Keras internals, imported only when a multi-worker strategy is made (pinned: Keras 3.15).
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as keras_tf_trainer

    if getattr(keras_tf_trainer, "_multi_worker_fixed", False):
        return
    multi_worker = keras_tf_trainer._collective_all_reduce_multi_worker
    reduce_per_replica = keras_tf_trainer.reduce_per_replica
    symbolic_build = keras_tf_trainer.TensorFlowTrainer._maybe_symbolic_build

    def reduce_logs(values, strategy, reduction):
        if multi_worker(strategy) and reduction in ("auto", "mean"):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return reduce_per_replica(values, strategy, reduction)

    def build_from_local_batch(model, iterator=None, data_batch=None):
        strategy = model.distribute_strategy
        if iterator is not None and strategy is not None and multi_worker(strategy):
            for _, _, batches in iterator:
                data_batch = tree.map_structure(lambda v: strategy.experimental_local_results(v)[0],
                                                next(batches))
                break
            iterator = None
        return symbolic_build(model, iterator=iterator, data_batch=data_batch)

    keras_tf_trainer.reduce_per_replica = reduce_logs
    keras_tf_trainer.TensorFlowTrainer._maybe_symbolic_build = build_from_local_batch
    keras_tf_trainer._multi_worker_fixed = True
