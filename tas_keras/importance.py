"""Importance-ordered channels (docs/design.md section 12): the channels of a trained network, permuted so that
within every width slot the most important come first, without changing what the network computes.

A candidate width k keeps a slot's leading k channels (in the supernet, the derived network's weight
transfer and the one-shot baselines), so after `order_channels` it keeps the k most important.

- Scores, per channel of every group of searchable slots:
  `taylor_scores` (the default for a trained network, `importance_scores`): the first-order Taylor
  estimate of the loss change when a channel is removed, measured through the BatchNormalizations of
  the group on a few training batches: (gamma * dL/dgamma + beta * dL/dbeta)^2 summed over the batches
  (Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019);
  `magnitude_scores`: the L1 norm of the filters of the convs that write the group (Li et al., "Pruning
  Filters for Efficient ConvNets", ICLR 2017; the default of magnitude pruners such as Torch-Pruning).
  Each member's scores (a BN, or a conv) are divided by their mean so that every member counts alike,
  then averaged: a tied group, such as the outputs of the blocks a residual Add joins, is scored as one
  (as DepGraph scores a group). Measured on EfficientNet-Lite0 fine-tuned on Imagenette, the Taylor
  order keeps a narrowed network far more accurate than the L1 order or the channels' own order
  (bench/results/supernet_probe_*.json).
- Groups: the slots that a merge joins are permuted together (in "independent" mode an identity
  shortcut's two slots too: the Add pairs their channels by position), so every merge still adds
  matching channels.
- Permutation: one per group, applied to every producer (a conv's output channels and bias, the BN and
  depthwise conv that follow) and consumer (a conv's or Dense's input channels). Fixed slots, and groups
  holding one, are not permuted. A group read by a grouped conv moves in whole groups of that conv
  (`group_steps`), ordered by their mean score, each keeping its channels' order: a grouped conv keeps
  or drops whole groups, and its kernel pairs a group's inputs with its outputs by position. A
  Concatenate's output is permuted member by member, each member's channels within its own range; a BN
  on it scores each member by its range (DenseNet's convs have their BN only after the Concatenate).
"""

import math

import keras
import numpy as np
import tensorflow as tf

from tas_keras.graph import operation
from tas_keras.layer_rules import rule_for


def slot_groups(space):
    """{slot name: the name of its group}: the slots any merge joins, by union-find."""
    parent = {slot.name: slot.name for slot in space.slots}

    def find(name):
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for layer in space.layers:
        if rule_for(layer).ties_inputs:  # its inputs' channels are paired by position
            for slot in (*layer.in_slots, layer.out_slot):
                parent[find(slot)] = find(layer.out_slot)
    return {name: find(name) for name in parent}


def _scored_groups(space):
    """(slot name -> group, the groups of searchable slots: a group holding a fixed slot is not scored)."""
    groups = slot_groups(space)
    fixed = {groups[slot.name] for slot in space.slots if not slot.searchable}
    return groups, {group for group in set(groups.values()) if group not in fixed}


def _segments(space, slot_name):
    """(slot, its channels in a tensor of `slot_name`) for the slot, or for each member of a Concatenate's."""
    slot = space.slot(slot_name)
    if not slot.members:
        return [(slot_name, slice(None))]
    segments, offset = [], 0
    for member in slot.members:
        width = space.slot(member).full_width
        segments.append((member, slice(offset, offset + width)))
        offset += width
    return segments


def _averaged(members):
    """{group: the mean of its members' scores, each divided by its own mean}."""
    return {group: np.mean([score / max(float(score.mean()), 1e-30) for score in scores], axis=0)
            for group, scores in members.items()}


def magnitude_scores(model, space):
    """{group name: per-channel score}: the L1 norm of the filters of every Conv2D that writes the group."""
    groups, scored = _scored_groups(space)
    members = {}
    for layer in space.layers:
        if rule_for(layer).searchable_conv and groups[layer.out_slot] in scored:
            members.setdefault(groups[layer.out_slot], []).append(rule_for(layer).filter_norms(
                model.get_layer(layer.name)))
    return _averaged(members)


def taylor_scores(model, space, batches):
    """{group name: per-channel score}: the first-order Taylor scores of the group's BatchNormalizations
    over `batches` of (images, labels) as the model is fed them (module docstring); a group without a
    BN (with a scale or a centre) is scored by `magnitude_scores`."""
    groups, scored = _scored_groups(space)
    norms = [(layer, model.get_layer(layer.name)) for layer in space.layers if rule_for(layer).batch_normalizes
             and any(groups[slot] in scored for slot, _ in _segments(space, layer.out_slot))]
    affines = [[v for v in (bn.gamma, bn.beta) if v is not None] for _, bn in norms]
    norms = [(layer, bn, affine) for (layer, bn), affine in zip(norms, affines) if affine]
    variables = [v for _, _, affine in norms for v in affine]
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    totals = [0.0] * len(norms)
    for images, labels in batches:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch([v.value for v in variables])
            loss = cross_entropy(labels, model(images, training=False))
        gradients = iter(tape.gradient(loss, variables))
        for index, (_, _, affine) in enumerate(norms):
            change = sum(keras.ops.convert_to_numpy(v) * keras.ops.convert_to_numpy(next(gradients)) for v in affine)
            totals[index] = totals[index] + change ** 2
    members = {}
    for (layer, _, _), total in zip(norms, totals):
        for slot, channels in _segments(space, layer.out_slot):
            if groups[slot] in scored:
                members.setdefault(groups[slot], []).append(np.asarray(total, np.float64)[channels])
    scores = _averaged(members)
    if len(scores) == len(scored):
        return scores
    magnitudes = magnitude_scores(model, space)  # the groups without a BN
    return {**{group: magnitudes[group] for group in magnitudes if group not in scores}, **scores}


def importance_scores(model, space, dataset, batch_size=64, num_batches=8, seed=0):
    """`taylor_scores` of `model` on `num_batches` training batches of `dataset` (not augmented; fed as
    the model expects them: pass a dataset fed by `tas_keras.input_convention.feed`)."""
    batches = dataset.train_batches(min(batch_size, dataset.train_size), seed=seed, augment=False)
    return taylor_scores(model, space, batches.take(num_batches))


def group_steps(space):
    """{group name: the channels that move and go together in it}: the least common multiple of its slots'
    `width_step`s, so that a grouped conv's groups move whole and keep their own order."""
    groups, steps = slot_groups(space), {}
    for slot in space.slots:
        steps[groups[slot.name]] = math.lcm(steps.get(groups[slot.name], 1), slot.width_step)
    return steps


def step_scores(score, step):
    """The mean score of every run of `step` channels (the units a group of that step keeps or drops)."""
    return np.reshape(score, (-1, step)).mean(axis=1)


def permutations(space, scores):
    """{slot name: channel order, most important first} for every slot of a scored group: its units of
    `group_steps` channels by their mean score, each unit's channels in their own order; and for every
    Concatenate's output with such a member, each member's order at its offset."""
    groups, steps = slot_groups(space), group_steps(space)
    orders = {}
    for group, score in scores.items():
        units = np.argsort(-step_scores(score, steps[group]), kind="stable")
        orders[group] = (units[:, None] * steps[group] + np.arange(steps[group])).reshape(-1)
    ordered = {slot.name: orders[groups[slot.name]] for slot in space.slots if groups[slot.name] in orders}
    for slot in space.slots:
        if any(member in ordered for member in slot.members):
            ordered[slot.name] = np.concatenate([
                channels.start + ordered.get(member, np.arange(channels.stop - channels.start))
                for member, channels in _segments(space, slot.name)])
    return ordered


def order_channels(model, space, scores=None):
    """A copy of `model` (same layers, names and function) whose channels are permuted by importance
    within every searchable slot of `space` (read from `model`); `scores` as `importance_scores` (the
    Taylor scores, which need data) or `magnitude_scores` (the default) give them."""
    scores = magnitude_scores(model, space) if scores is None else scores
    orders = permutations(space, scores)
    ordered = model.__class__.from_config(model.get_config())  # keeps every name, the input's too
    ordered.set_weights(model.get_weights())
    for layer in space.layers:
        keras_layer = operation(ordered, layer.name)
        if not getattr(keras_layer, "weights", None):  # keras.ops operations have none
            continue
        in_order = orders.get(layer.in_slots[0]) if layer.in_slots else None
        keras_layer.set_weights(rule_for(layer).permuted(layer, keras_layer.get_weights(), in_order,
                                                         orders.get(layer.out_slot)))
    return ordered
