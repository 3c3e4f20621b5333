"""What the stages after a search do with a shape (a GraphShape, `tas_keras.graph_space`): read it from
any shape file, build the full model it prunes, read that model's space and derive its pruned network.

A shape file is a GraphShape's JSON (what a search or a baseline writes as arch.json), or, imported at the
edge, a CIFAR ResNet's ArchConfig or a shape the paper's authors released (`tas_keras.cifar_shapes`), so
every stage after the search has one way to build and count a pruned network.
"""

import dataclasses
import os
from typing import Mapping

from tas_keras.cifar_shapes import imported_shape
from tas_keras.derive import derive_model
from tas_keras.graph import read_model
from tas_keras.graph_space import GraphShape
from tas_keras.models.registry import build_model, is_model_file
from tas_keras.search_space import ArchConfig, read_json_file


def load_shape(path):
    """The shape in `path` (a GraphShape's file, or a CIFAR ResNet's ArchConfig or released shape); a
    ValueError naming the file and what is wrong with it."""
    config = read_json_file(path, "shape file")
    if not (isinstance(config, Mapping) and "format" in config):  # a GraphShape's file names its format
        return imported_shape(ArchConfig.load(path))  # also reads the paper's released shape files
    try:
        return GraphShape.from_dict(config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"shape file {os.fspath(path)!r} is not a valid shape: {error}") from None


def source_model(shape):
    """The full model `shape` prunes: its .keras file, or its registry network (fresh weights)."""
    if not shape.model:
        raise ValueError("the shape names no model (its space was read from a model in memory): give the model")
    if is_model_file(shape.model):
        return build_model(shape.model)
    return build_model(shape.model, shape.input_shape, shape.num_classes)


def shape_space(shape, model=None):
    """The GraphSpace of `model` (default: `source_model(shape)`), read as the search of `shape` read it."""
    space = read_model(source_model(shape) if model is None else model, shape.add_mode, shape.width_multiple)
    return dataclasses.replace(space, model=shape.model)


def derive_network(shape, model=None, transfer_weights=False):
    """The pruned network of `shape` as a plain functional model, built from the layers of `model`
    (default: `source_model(shape)`); with `transfer_weights`, initialised from its leading channels."""
    model = source_model(shape) if model is None else model
    return derive_model(model, shape_space(shape, model), shape, transfer_weights=transfer_weights)
