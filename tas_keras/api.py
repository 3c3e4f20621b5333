"""The stages as one call each, for a notebook holding a Keras model and its data.

Every call takes an `out` directory and runs one stage (`train_base`, `run_search`, `distill`,
`export_and_verify`, `run_prune`) into it, so it writes the artifacts its CLI writes (the CLIs
`train.base`, `train.search`, `train.distill`, `export.tflite` and `train.prune` call these
functions), resumes an interrupted run and returns at once when `out` holds the finished run; it
returns Keras objects besides.

- `model` / `teacher`: a keras.Model, a .keras path or a registry name (`tas_keras.models.registry`).
  A keras.Model is saved into `out` first (source.keras, teacher.keras: the stages read models from
  files, and the run's settings name that file); an `out` holding another model is refused unless
  `overwrite=True`. `export`, which has no run to resume, saves them as model.keras and
  compare_with.keras, replacing what `out` held.
- `data`: a dataset name or path as the CLIs' --dataset takes it, a loaded dataset
  (`data.load_dataset`), or data held in memory: `from_arrays` (numpy) or `from_tf_data` (tf.data).

    shape = api.search(model, dataset, 0.5, "runs/search", epochs=10)
    pruned, metrics = api.distill(shape, model, dataset, "runs/distill", epochs=10)
    report = api.export("runs/distill/model.keras", dataset, "runs/export", compare_with=model)
"""

import os

import keras
import numpy as np

from tas_keras.export.exporter import export_and_verify
from tas_keras.configs import configure
from tas_keras.data import CroppedImageDataset, ImageDataset, from_arrays, from_tf_data
from tas_keras.distill import DistillConfig, distill as distill_stage
from tas_keras.distribute import make_strategy
from tas_keras.graph import load_model
from tas_keras.graph_space import GraphShape
from tas_keras.runs import GIVEN_FILES, run_dir
from tas_keras.search import run_search
from tas_keras.shapes import derive_network, load_shape
from tas_keras.training import MODEL_FILE, BaseConfig, save_model, train_base
from tas_keras.prune import run_prune

__all__ = ["train", "search", "derive", "distill", "export", "prune", "from_arrays", "from_tf_data"]

SOURCE_FILE, TEACHER_FILE, GIVEN_SHAPE_FILE = GIVEN_FILES  # the run directory keeps them (`runs.clear_run_dir`)
# Export has no run directory to resume: its given models are saved under the roles the report names.
EXPORTED_FILE, COMPARED_FILE = "model.keras", "compare_with.keras"


def train(model, data, out, config=None, overwrite=False, **overrides):
    """Trains from scratch `model`: a registry name (at the data's image size and classes), or a shape
    (a GraphShape or its file), whose pruned network is trained (`train_base`): its settings are `config`
    (a BaseConfig; default its defaults) with `overrides`, e.g. epochs, learning_rate, seed; returns (the
    trained model as `out`/model.keras holds it, not compiled; its metrics)."""
    dataset = _dataset(data)
    if isinstance(model, GraphShape):
        model = _shape_file(model, out, overwrite)
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"train takes a registry name or a shape (a GraphShape or its file), got "
                         f"{type(model).__name__}")
    shape_file = os.fspath(model) if str(model).endswith(".json") else None
    config = configure(BaseConfig, config, dict(overrides, model_name=None if shape_file else model,
                                                 arch_path=shape_file, dataset_name=dataset))
    metrics = train_base(out, config, overwrite)
    return _trained_model(out, config.strategy), metrics


def search(model, data, target_ratio, out, config=None, overwrite=False, **overrides):
    """Searches a shape of `model` keeping `target_ratio` of its FLOPs (or of the cost `cost_metric`
    names) (`run_search`): its settings are `config` (a SearchConfig; default its defaults) with
    `overrides`, e.g. epochs, add_mode, width_multiple, seed; returns the GraphShape that `out`/arch.json
    holds."""
    dataset = _dataset(data)  # checked before anything is written
    return GraphShape.from_dict(run_search(
        out, config, overwrite, model_name=_model_file(model, out, SOURCE_FILE, overwrite), dataset_name=dataset,
        target_ratio=target_ratio, **overrides))


def derive(model, shape, transfer_weights=False):
    """The pruned network of `shape` (a GraphShape or its file) as a plain functional keras.Model,
    built from the layers of `model` (None: the shape's source model); with `transfer_weights`,
    initialised from `model`'s leading channels."""
    return derive_network(_shape(shape), model, transfer_weights=transfer_weights)


def distill(shape, teacher, data, out, config=None, overwrite=False, **overrides):
    """Trains the pruned network of `shape` (a GraphShape or its file) by `mode` ("kd", "init_kd",
    "init" from `teacher`; "scratch" without one): its settings are `config` (a DistillConfig) with
    `overrides`, e.g. mode, epochs, learning_rate; returns (the trained model as `out`/model.keras holds
    it, a plain functional keras.Model, not compiled; its metrics)."""
    dataset = _dataset(data)
    if isinstance(shape, GraphShape):
        shape = _shape_file(shape, out, overwrite)
    teacher = None if teacher is None else _model_file(teacher, out, TEACHER_FILE, overwrite)
    config = configure(DistillConfig, config, dict(overrides, arch_path=shape, teacher_path=teacher,
                                                    dataset_name=dataset))
    metrics = distill_stage(out, config, overwrite)
    return _trained_model(out, config.strategy), metrics


def export(model, data, out, config=None, compare_with=None, **overrides):
    """Exports `model` (trained on `data`, fed as its input convention says, which the exported model
    applies to its pixels: `tas_keras.input_convention`) to a SavedModel and a .tflite in `out`, verified
    with LiteRT, beside `compare_with` if given (`export_and_verify`): its settings are `config` (an
    ExportConfig; default its defaults but int8 quantisation) with `overrides`, e.g. quantize, threads;
    returns the report (`out`/report.json)."""
    dataset = _dataset(data)
    settings = dict({"quantize": "int8"} if config is None else {}, **overrides)
    return export_and_verify(out, config, **dict(
        settings, model_path=_model_file(model, out, EXPORTED_FILE, overwrite=True), dataset_name=dataset,
        compare_with=None if compare_with is None else _model_file(compare_with, out, COMPARED_FILE, overwrite=True)))


def prune(model, data, target_ratio, out, config=None, overwrite=False, **overrides):
    """The main job (`run_prune`): a trained `model` (keras.Model or .keras file) is the base network and
    teacher, a registry name is trained first; searched to `target_ratio` of its FLOPs (or of the cost
    `cost_metric` names), distilled, exported. Its settings are `config` (a PruneConfig, e.g. one of
    `prune.PRESETS`; default the quick preset) with `overrides` (`PruneConfig.replace`: e.g.
    search_epochs, batch_size, quantizations). `data` None: the config's dataset. Returns the report
    (`out`/report.json; None on a cluster's other workers)."""
    if data is not None:
        overrides["dataset_name"] = _dataset(data)
    return run_prune(out, config, overwrite, model_name=_model_file(model, out, SOURCE_FILE, overwrite),
                     target_ratio=target_ratio, **overrides)


def _trained_model(out, strategy):
    """The model a training stage saved: on a cluster's other workers their own copy (`runs.run_dir`)."""
    with make_strategy(strategy).scope():
        return load_model(os.path.join(run_dir(out), MODEL_FILE))


def _dataset(data):
    if isinstance(data, (ImageDataset, CroppedImageDataset)):
        return data
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    raise ValueError(f"data must be a dataset name or path, a loaded dataset, or the result of from_arrays "
                     f"(numpy arrays) or from_tf_data (tf.data), got {type(data).__name__}")


def _model_file(model, out, file_name, overwrite):
    """A registry name or .keras path as given; a keras.Model saved as `out`/`file_name`, unless that
    file holds it already (a resumed run), refusing a file of another model without `overwrite`."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    if not isinstance(model, keras.Model):
        raise ValueError(f"a model must be a keras.Model, a .keras path or a registry name, got "
                         f"{type(model).__name__}")
    path = os.path.abspath(os.path.join(out, file_name))
    if os.path.exists(path) and not overwrite:
        if _same_model(model, load_model(path)):
            return path
        raise ValueError(f"{path} holds another model than the one given, so {out} holds another run: use "
                         "another out, or overwrite=True to start afresh")
    os.makedirs(out, exist_ok=True)
    save_model(model, path)
    return path


def _same_model(model, saved):
    """Same layers (class and name, in order) and the same weights, exactly."""
    layers = lambda m: [(type(layer).__name__, layer.name) for layer in m.layers]  # noqa: E731
    weights, saved_weights = model.get_weights(), saved.get_weights()
    return layers(model) == layers(saved) and len(weights) == len(saved_weights) and all(
        np.array_equal(a, b) for a, b in zip(weights, saved_weights))


def _shape(shape):
    return shape if isinstance(shape, GraphShape) else load_shape(shape)


def _shape_file(shape, out, overwrite):
    """`shape` saved as `out`/given_shape.json for the distill stage to read, as `_model_file` saves a model."""
    path = os.path.abspath(os.path.join(out, GIVEN_SHAPE_FILE))
    if os.path.exists(path) and not overwrite:
        if load_shape(path).to_dict() == shape.to_dict():
            return path
        raise ValueError(f"{path} holds another shape than the one given, so {out} holds another run: use "
                         "another out, or overwrite=True to start afresh")
    os.makedirs(out, exist_ok=True)
    shape.save(path)
    return path
