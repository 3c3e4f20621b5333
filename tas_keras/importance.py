"""Importance-ordered channels (DESIGN.md section 12): the channels of a trained network, permuted so that
within every width slot the most important come first, without changing what the network computes.

A candidate width k keeps a slot's leading k channels (in the supernet, the derived network's weight
transfer and the magnitude baseline), so after `order_channels` it keeps the k most important.

- Score: each Conv2D that writes a slot scores its output channels by the L1 norm of their filters
  times |gamma| of the BatchNormalization that reads the conv (1 without one); the slot's score is the
  mean of its convs' scores, each divided by its own mean so that every conv counts alike (a tied slot,
  such as the outputs of the blocks a residual Add joins, is scored as one group, as DepGraph scores a
  group).
- Groups: the slots that a merge joins are permuted together (in "independent" mode an identity
  shortcut's two slots too: the Add pairs their channels by position), so every merge still adds
  matching channels.
- Permutation: one per group, applied to every producer (a conv's output channels and bias, the BN and
  depthwise conv that follow) and consumer (a conv's or Dense's input channels). Fixed slots, and groups
  holding one, are not permuted.
"""

import keras
import numpy as np

_WEIGHTED_KINDS = ("conv", "depthwise", "batch_norm", "dense")


def slot_groups(space):
    """{slot name: the name of its group}: the slots any merge joins, by union-find."""
    parent = {slot.name: slot.name for slot in space.slots}

    def find(name):
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for layer in space.layers:
        if layer.kind == "merge":
            for slot in (*layer.in_slots, layer.out_slot):
                parent[find(slot)] = find(layer.out_slot)
    return {name: find(name) for name in parent}


def _following_batch_norm(space, model, conv_name):
    readers = [layer for layer in space.layers if conv_name in layer.inputs]
    if len(readers) == 1 and readers[0].kind == "batch_norm":
        batch_norm = model.get_layer(readers[0].name)
        if batch_norm.scale:
            return batch_norm
    return None


def magnitude_scores(model, space):
    """{group name: per-channel score} of every group of searchable slots (module docstring)."""
    groups = slot_groups(space)
    fixed = {groups[slot.name] for slot in space.slots if not slot.searchable}
    members = {}
    for layer in space.layers:
        group = groups[layer.out_slot]
        if layer.kind != "conv" or group in fixed:
            continue
        conv = model.get_layer(layer.name)
        score = np.abs(keras.ops.convert_to_numpy(conv.kernel)).sum(axis=(0, 1, 2))
        batch_norm = _following_batch_norm(space, model, layer.name)
        if batch_norm is not None:
            score = score * np.abs(keras.ops.convert_to_numpy(batch_norm.gamma))
        members.setdefault(group, []).append(score / max(float(score.mean()), 1e-12))
    return {group: np.mean(scores, axis=0) for group, scores in members.items()}


def permutations(space, scores):
    """{slot name: channel order, most important first} for every slot of a scored group."""
    groups = slot_groups(space)
    orders = {group: np.argsort(-score, kind="stable") for group, score in scores.items()}
    return {slot.name: orders[groups[slot.name]] for slot in space.slots if groups[slot.name] in orders}


def permuted_weights(layer, weights, in_order, out_order):
    """The weights of a GraphLayer's Keras layer with its input channels in `in_order` and its output
    channels in `out_order` (None: as they are)."""
    def take(value, order, axis):
        return value if order is None else np.take(value, order, axis=axis)

    if layer.kind in ("conv", "dense"):
        kernel = take(take(weights[0], in_order, -2), out_order, -1)
        return [kernel] + [take(bias, out_order, 0) for bias in weights[1:]]
    if layer.kind == "depthwise":  # with depth_multiplier > 1 its input slot is fixed: in_order is None
        return [take(weights[0], in_order, 2)] + [take(bias, in_order, 0) for bias in weights[1:]]
    if layer.kind == "batch_norm":
        return [take(value, out_order, 0) for value in weights]
    raise ValueError(f"{layer.name} ({layer.class_name}): no channel permutation for a layer of kind {layer.kind!r}")


def order_channels(model, space, scores=None):
    """A copy of `model` (same layers, names and function) whose channels are permuted by importance
    within every searchable slot of `space` (read from `model`); `scores` as `magnitude_scores` gives
    them (its default)."""
    scores = magnitude_scores(model, space) if scores is None else scores
    orders = permutations(space, scores)
    ordered = model.__class__.from_config(model.get_config())  # keeps every name, the input's too
    ordered.set_weights(model.get_weights())
    for layer in space.layers:
        if layer.kind == "input" or not ordered.get_layer(layer.name).weights:
            continue
        keras_layer = ordered.get_layer(layer.name)
        if layer.kind not in _WEIGHTED_KINDS:
            if any(orders.get(slot) is not None for slot in (*layer.in_slots, layer.out_slot)):
                raise ValueError(f"{layer.name} ({layer.class_name}) holds weights in a permuted slot")
            continue
        in_order = orders.get(layer.in_slots[0]) if layer.in_slots else None
        keras_layer.set_weights(permuted_weights(layer, keras_layer.get_weights(), in_order,
                                                 orders.get(layer.out_slot)))
    return ordered
