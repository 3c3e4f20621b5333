"""Mixed precision for the training stages, with Keras dtype policies.

Under "mixed_bfloat16" or "mixed_float16" every layer a stage builds keeps its variables in float32
and computes in bfloat16 or float16: GPUs with tensor cores run it ~2x faster than float32 (bfloat16
needs an Ampere or newer GPU, or a TPU); a CPU gains nothing. What stays float32: the architecture
parameters (alpha, beta) and tau, the Gumbel sampling, the expected and exact costs, batch
statistics (Keras' BatchNormalization and the searchable convs upcast for them), the logits the
losses read and the losses.

float16 gradients underflow without loss scaling: under "mixed_float16" Keras wraps a compiled
model's optimizer in a LossScaleOptimizer, and the search wraps its architecture optimizer too. Such
an optimizer skips a step whose gradients overflow (and halves its scale); its iteration count, which
is a run's step in its backups, does not advance on a skipped step. bfloat16 has float32's range and
needs no scaling.

The models a stage saves are float32 models (`float32_copy`), so what reads them (export, a later
stage, `keras.models.load_model`) is unaffected.
"""

import contextlib

import keras

MIXED_PRECISION = ("mixed_bfloat16", "mixed_float16")


def check_mixed_precision(mixed_precision):
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed precision must be one of {', '.join(MIXED_PRECISION)} (or none for float32), "
                         f"got {mixed_precision!r}")


@contextlib.contextmanager
def dtype_policy_scope(mixed_precision):
    """Everything built inside computes in `mixed_precision` (None: float32, whatever the global policy
    was); the previous global policy is back on exit, so a stage's policy never leaks into the next."""
    check_mixed_precision(mixed_precision)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(mixed_precision or "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _float32_policies(config):
    """A model's serialized config with every mixed dtype policy replaced by float32."""
    if isinstance(config, dict):
        if config.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and (
                config.get("config", {}).get("name") in MIXED_PRECISION):
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {key: _float32_policies(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_float32_policies(value) for value in config]
    return config


def _layers(layer):
    yield layer
    for inner in getattr(layer, "layers", ()):
        yield from _layers(inner)


def computes_in_float32(model):
    """Whether the model and every layer in it (nested models' too) compute in float32."""
    return all(layer.compute_dtype == "float32" for layer in _layers(model))


def float32_copy(model):
    """`model` itself if every layer of it computes in float32; else a copy that does, built from its
    config (a layer's own policy becomes float32, a model that builds its layers from its config builds
    them under the float32 policy) and holding its weights, which are float32 under either policy."""
    if computes_in_float32(model):
        return model
    config = _float32_policies(keras.saving.serialize_keras_object(model))
    with dtype_policy_scope(None):
        copy = keras.saving.deserialize_keras_object(config)
    copy.set_weights(model.get_weights())
    return copy
