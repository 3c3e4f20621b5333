"""Rebuilds a point of a GraphSpace as a plain functional Keras model and moves the weights into it.

`derive_model(model, space, shape)` builds the layers of `space.plan(shape)`, each from its source
layer's `get_config()` with only the channel count changed (a grouped conv's groups with it; for a
projection shortcut, a 1x1 kernel and stride 1), so the derived model has the user's layer types, names
and settings, narrower and shallower, and nothing but stock Keras layers: `keras.models.load_model`
opens its .keras file without this package. `transfer_weights` copies the kept channels of every
variable (kernels, biases, BN gamma/beta and moving statistics, depthwise kernels; a grouped conv's
leading groups) of the layers both models have, as train.distill's "init" does: a slot's leading
channels, and for a Concatenate's output the leading channels of each of its inputs
(`GraphSpace.kept_channels`); a dropped block has nothing to copy and a projection only the derived model
has keeps its fresh initialisation.
"""

import logging

import keras

from tas_keras.graph import operation
from tas_keras.layer_rules import rule_for


def derive_model(model, space, shape, transfer_weights=True):
    """The plain functional model of `shape`; with `transfer_weights`, initialised from `model`."""
    plan = space.plan(shape)
    tensors = {}
    for planned in plan.layers:
        rule = rule_for(planned.layer)
        if rule.is_image_input:
            image = model.inputs[0]
            tensors[planned.layer.name] = keras.Input(batch_shape=image.shape, dtype=image.dtype,
                                                      name=planned.layer.name)
            continue
        # The derived network is trained next: a frozen source (a teacher) must not freeze it (`rebuilt` makes
        # it trainable), and it computes in the stage's dtype policy (tas_keras.precision), with floatx
        # (float32) logits for the losses.
        layer = rule.rebuilt(operation(model, planned.source), planned,
                             keras.config.floatx() if planned.layer.name == plan.output else None)
        tensors[planned.layer.name] = rule.call(layer, [tensors[name] for name in planned.layer.inputs],
                                                planned.layer, **planned.layer.call_arguments)
    input_name = next(p.layer.name for p in plan.layers if rule_for(p.layer).is_image_input)
    derived = keras.Model(tensors[input_name], tensors[plan.output], name=model.name)
    if transfer_weights:
        init_from_teacher(derived, model, space, shape)
    return derived


def _leading(value, shape):
    return value[tuple(slice(0, n) for n in shape)]


def init_from_teacher(student, teacher, space=None, shape=None):
    """Copies the kept channels (and, for a truncated stage, the first blocks) of every weight of
    `teacher` into the same-named layer of `student` (module docstring): the leading ones, and where
    `student` is the derived network of `shape` in the teacher's `space`, each Concatenate input's
    leading ones (without them, a narrowed Concatenate's readers would get wrong channels).

    A projection shortcut that only the pruned network has (an identity block whose widths now differ)
    keeps its fresh initialisation. Raises ValueError, naming the layer, when the student is wider.
    """
    teacher_layers = {layer.name: layer for layer in teacher.layers}
    # A layer reading or writing a Concatenate's output keeps channels that are not the leading ones.
    concatenated = {} if space is None else {slot.name: space.kept_channels(shape, slot.name)
                                              for slot in space.slots if slot.members and space.varies(slot.name)}
    fresh = []
    for layer in student.layers:
        if not layer.weights:
            continue
        if layer.name not in teacher_layers:
            fresh.append(layer.name)
            continue
        values = [weight.numpy() for weight in teacher_layers[layer.name].weights]
        if concatenated:
            graph_layer = space.layer(layer.name)
            in_kept = concatenated.get(graph_layer.in_slots[0]) if graph_layer.in_slots else None
            out_kept = concatenated.get(graph_layer.out_slot)
            if in_kept is not None or out_kept is not None:
                values = rule_for(graph_layer).permuted(graph_layer, values, in_kept, out_kept)
        for mine, theirs in zip(layer.weights, values):
            if any(m > t for m, t in zip(mine.shape, theirs.shape)):
                raise ValueError(f"cannot init from the teacher: {layer.name} has shape {tuple(mine.shape)}, "
                                 f"wider than the teacher's {tuple(theirs.shape)}")
        layer.set_weights([_leading(theirs, mine.shape) for mine, theirs in zip(layer.weights, values)])
    if fresh:
        logging.info("layers the teacher does not have, trained from their initialisation: %s", fresh)
    return fresh
