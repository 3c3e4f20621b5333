"""The main job: base training (or a given teacher), TAS search, KD training of the searched shape,
export (fp32 and int8) and the base-vs-pruned report, each stage in its own sub-directory of `out`.

Every stage is resumable and skipped when finished; a stage whose settings changed refuses to run
and names the changed setting (its directory's run.json), unless `overwrite` starts afresh.
"""

import dataclasses
import logging
import os
import time

from tas_keras import data
from tas_keras import input_convention as conventions
from tas_keras.configs import DataSettings, RunSettings, recorded_as
from tas_keras.cost import count_shape
from tas_keras.distill import DistillConfig, distill, load_teacher
from tas_keras.distribute import make_strategy
from tas_keras.export import tfmot_bridge
from tas_keras.export.convert import QUANTIZATIONS
from tas_keras.export.exporter import REPORT_FILE, ExportConfig, export_and_verify
from tas_keras.export.layer_latency import make_table
from tas_keras.graph import load_model, read_model, softmax_head
from tas_keras.importance import importance_scores, order_channels
from tas_keras.latency import LatencyLayout, LatencyTable, predict_latency
from tas_keras.models.registry import check_model_name, check_weights, image_size_for, is_model_file
from tas_keras.report import write_report
from tas_keras.runs import (check_overwrite, clear_run_dir, holds_own_files, lock_run_dir, locking_stage,
                            prepare_run_dir, read_json, run_dir, write_json)
from tas_keras.search import ARCH_FILE, COSTS, LATENCY, SearchConfig, latency_target_ratio, run_search, source_model
from tas_keras.supernet import search_space
from tas_keras.training import MODEL_FILE, BaseConfig, chance_threshold, check_above_chance, save_model, train_base

PIPELINE_FILE = "pipeline.json"
ORDERED_DIR = "ordered"
STAGES = ("base", "latency table", "search", "distill", "export", "report")
LATENCY_TABLE_FILE = os.path.join("latency_table", "table.json")


def _stage_config_field(config_class, **settings):
    return dataclasses.field(default_factory=lambda: config_class(**settings))


# What the main job sets in its stages' configs from its own settings and its run (the shared data and
# run settings besides): a stage config given to it leaves them at their defaults.
_SET_BY_THE_JOB = {
    "base": ("model_name", "arch_path", "weights"),
    "search": ("model_name", "target_ratio", "width_multiple", "cost_metric", "latency_table", "target_latency_ms",
               "add_mode", "init_from"),
    "distill": ("arch_path", "teacher_path", "mode"),
    "export": ("model_path", "compare_with", "quantize", "qat_epochs", "output"),
}
_STAGE_CONFIGS = {"base": BaseConfig, "search": SearchConfig, "distill": DistillConfig, "export": ExportConfig}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneConfig(RunSettings):
    """The settings of the main job (`run_prune`): its own, and a config per stage.

    `model_name` is a registry name (trained from scratch as the base network) or a trained .keras
    model, which is then the base network and the teacher; `teacher_path` a trained full registry network
    instead of training one; `weights` ("imagenet", for the registry networks that offer them)
    fine-tunes the base network from those pretrained weights. The search keeps `target_ratio` of the
    `cost_metric` ("flops", "params" or "latency": with `latency_table`, or a table the job measures on
    this machine, int8 at the export's threads; `target_latency_ms` replaces the ratio by a latency) in
    widths that are multiples of `width_multiple`, its Adds as `add_mode` says (`run_search`). The
    searched shape is trained with KD from the base network and exported to each of `quantizations`
    (`convert.QUANTIZATIONS`); `qat_epochs` > 0 makes the int8 export quantization-aware (the optional
    TFMOT bridge). A given trained base network is first scored on the test split (`check_base`: one
    line naming the likely causes when it is at chance). Search, KD and base fine-tuning that start from
    a trained network train their weights at `from_trained_learning_rate`: the reference's 0.1 would
    first undo the training (bench/results/pretrained_lite0.json used it).

    `base`, `search`, `distill` and `export`: the stages' configs, for their own settings (epochs, batch
    size, the architecture step, KD, the export's threads and timing, ...); the job sets the rest from
    its own settings (the data and run settings, which are `RunSettings`'s, and those above) and leaves
    them at their defaults there. The defaults are the quick preset (`PRESETS`).

    `replace` also takes a stage's setting as `<stage>_<setting>` (`search_epochs=3`, `export_threads=1`:
    train.prune's flags) and `batch_size`, the batch of base training and KD and the most each search
    half takes.
    """

    stage = "prune"

    model_name: str = recorded_as("model", "resnet20")
    dataset_name: object = recorded_as("dataset", data.BUNDLED_DATASET)
    target_ratio: float = 0.5
    teacher_path: str = None
    weights: str = None
    cost_metric: str = recorded_as("cost", "flops")
    latency_table: str = None
    target_latency_ms: float = None
    width_multiple: int = 1
    add_mode: str = None
    quantizations: tuple = ("none", "int8")
    qat_epochs: int = 0
    check_base: bool = True
    from_trained_learning_rate: float = 0.01
    base: BaseConfig = _stage_config_field(BaseConfig, epochs=5, batch_size=128)
    search: SearchConfig = _stage_config_field(SearchConfig, epochs=6, batch_size=64)
    distill: DistillConfig = _stage_config_field(DistillConfig, epochs=5, batch_size=128)
    export: ExportConfig = _stage_config_field(ExportConfig, latency_runs=100)

    def __post_init__(self):
        object.__setattr__(self, "quantizations", tuple(self.quantizations))  # a list from JSON or a flag
        super().__post_init__()

    def validate(self):
        super().validate()
        for stage, config_class in _STAGE_CONFIGS.items():
            config = getattr(self, stage)
            if not isinstance(config, config_class):
                raise ValueError(f"{stage} must be a {config_class.__name__}, got {type(config).__name__}")
            shared = RunSettings if isinstance(config, RunSettings) else DataSettings
            for name in _SET_BY_THE_JOB[stage] + shared.setting_names():
                value, default = getattr(config, name), getattr(config_class, name)  # a dataclass's default
                if value != default:
                    where = f"; set {name} of the PruneConfig" if name in self.setting_names() else ""
                    raise ValueError(f"the main job sets the {stage} stage's {name} itself, got {value!r}{where}")
        unknown = [q for q in self.quantizations if q not in QUANTIZATIONS]
        if not self.quantizations or unknown or len(set(self.quantizations)) != len(self.quantizations):
            raise ValueError(f"exports must be distinct ones of {', '.join(QUANTIZATIONS)}, got "
                             f"{self.quantizations!r}")
        if self.cost_metric not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {self.cost_metric!r}")
        if self.cost_metric != LATENCY and (self.latency_table or self.target_latency_ms):
            raise ValueError(f"a latency table or target is for the latency cost, got cost {self.cost_metric!r}")
        if not 0 < self.target_ratio < 1:
            raise ValueError(f"target ratio must be in (0, 1), got {self.target_ratio!r}")
        if is_model_file(self.model_name) and self.teacher_path:
            raise ValueError(f"{self.model_name} is the base network and the teacher: do not give --teacher too")
        check_model_name(self.model_name)
        check_weights(self.model_name, self.weights)
        if self.qat_epochs < 0:
            raise ValueError(f"qat epochs must be >= 0, got {self.qat_epochs!r}")
        if self.from_trained_learning_rate <= 0:
            raise ValueError(f"the learning rate from a trained network must be positive, got "
                             f"{self.from_trained_learning_rate!r}")

    def replace(self, **overrides):
        """A copy with `overrides` (validated): settings of the job, `<stage>_<setting>` ones, `batch_size`."""
        stages = {stage: {} for stage in _STAGE_CONFIGS}
        if "batch_size" in overrides:
            batch_size = overrides.pop("batch_size")
            stages["base"]["batch_size"] = stages["distill"]["batch_size"] = batch_size
            stages["search"]["batch_size"] = min(batch_size, overrides.get("search", self.search).batch_size)
        for key in [key for key in overrides if key not in self.setting_names()]:
            stage, _, name = key.partition("_")
            if stage not in stages:
                self._check_names([key])
            stages[stage][name] = overrides.pop(key)
        for stage, settings in stages.items():
            if settings:
                overrides[stage] = overrides.get(stage, getattr(self, stage)).replace(**settings)
        return super().replace(**overrides)

    @classmethod
    def from_dict(cls, settings):
        return super().from_dict({key: _STAGE_CONFIGS[key].from_dict(value)
                                  if key in _STAGE_CONFIGS and isinstance(value, dict) else value
                                  for key, value in settings.items()})

    def run_record(self):
        """The job's settings and each stage config's own (pipeline.json)."""
        record = super().run_record()
        for stage in _STAGE_CONFIGS:
            config = getattr(self, stage)
            recorded = config.run_record()  # by the keys it records them under: none of the job's is renamed
            record[stage] = {name: value for name, value in config.to_dict().items()
                             if name in recorded and name not in _SET_BY_THE_JOB[stage] + RunSettings.setting_names()}
        record["quantizations"] = list(self.quantizations)
        return record


PRESETS = {
    # The README quickstart: the bundled subset, under 5 minutes on 2 CPU cores (docs/results.md).
    "quick": PruneConfig(),
    # The reference schedule and architecture step (base network trained as long as the final
    # training), for GPUs.
    "paper": PruneConfig(dataset_name="cifar10", base=BaseConfig(epochs=300, batch_size=256),
                         search=SearchConfig(epochs=600, batch_size=256, arch_learning_rate=1e-3, arch_warmup=0.0,
                                             arch_decay="constant", entropy_weight=0.0),
                         distill=DistillConfig(epochs=300, batch_size=256), export=ExportConfig(latency_runs=500)),
    # For phones: the quick schedule, searched against the int8 latency of a table measured on this
    # machine (made in latency_table/ unless given) in widths that are multiples of 16 (XNNPACK's int8
    # kernels tile output channels by 16), exported to int8 only, timed on one thread.
    "mobile": PruneConfig(cost_metric=LATENCY, width_multiple=16, quantizations=("int8",),
                          export=ExportConfig(latency_runs=100, threads=1)),
}


def smallest_ratio(space, layout=None, table=None):
    """FLOPs (or with a latency table and the space's `LatencyLayout`, latency) of the smallest network the
    search space can express, as a fraction of the full one's."""
    full, smallest = space.full_shape(), space.smallest_shape()
    if table is not None:
        return predict_latency(layout, smallest, table) / predict_latency(layout, full, table)
    return count_shape(space, smallest).flops / count_shape(space, full).flops


def _check_teacher(path, space):
    """The given base network must be the full network the search prunes (the report compares the two)."""
    teacher = load_teacher(path)
    try:
        teacher_space = read_model(teacher, space.add_mode, space.multiple_of)
        fits = teacher_space.full_shape().point() == space.full_shape().point()
    except ValueError:
        fits = False
    fits = fits and (tuple(teacher.input_shape[1:]), teacher.output_shape[-1]) == (space.input_shape, space.num_classes)
    if not fits:
        raise ValueError(f"--teacher {path} is not the full {space.name} for this data (it is {teacher.name}, "
                         f"{teacher.output_shape[-1]} classes on {tuple(teacher.input_shape[1:])} images)")


# What a search image and a KD image cost in base-training images, for the ETA: a search step costs
# 0.9-1.1x a plain step per image (bench.search_throughput), KD adds the teacher's forward pass.
SEARCH_IMAGE_COST = 1.0
KD_IMAGE_COST = 1.3


class _Progress:
    """Stage banners with the elapsed time and a rough ETA for the rest of the pipeline."""

    def __init__(self, workloads):
        self.workloads, self.start, self.rate = workloads, time.perf_counter(), None

    def banner(self, index, title):
        elapsed = time.perf_counter() - self.start
        eta = ""
        if self.rate:
            remaining = sum(self.workloads[index:]) / self.rate
            eta = f", about {remaining / 60:.0f} min to go"
        logging.info("=" * 20 + f" [{index + 1}/{len(STAGES)}] {title} (elapsed {elapsed / 60:.1f} min{eta})")

    def measured(self, images_per_second):
        self.rate = images_per_second


@locking_stage
def run_prune(out, config=None, overwrite=False, **overrides):
    """Runs every stage into `out` as `config` (a PruneConfig; default the quick preset) with `overrides`
    (`PruneConfig.replace`) says, and returns the report (also `out/report.json` and `report.md`).

    The training stages run under the config's `strategy`; export and report need one device and run
    outside it, on the chief only (the other workers of a cluster return None once training is done).
    The latency cost reads `latency_table` (it must measure one of the exports' quantisations; the
    exports are then timed at its threads); without one, the job measures a table on this machine into
    `out/latency_table/` (int8, the export's threads).

    A trained base network (a .keras model, `teacher_path`, or one fine-tuned from `weights`) has its
    channels ordered by importance (`tas_keras.importance`, in `ordered/`); the supernet starts from
    those weights and the searched shape is initialised from them before KD. A base trained from scratch
    here keeps the reference's search from a random supernet and KD without Init.
    """
    config = (config or PRESETS["quick"]).replace(**overrides)
    table = config.latency_table and LatencyTable.load(config.latency_table)
    if table and table.quantize not in config.quantizations:
        raise ValueError(f"latency table {config.latency_table!r} was measured with quantize={table.quantize}, but "
                         f"the exports are {', '.join(config.quantizations)}")
    model_name, teacher_path = config.model_name, config.teacher_path
    if is_model_file(model_name) and not os.path.isfile(model_name):
        raise ValueError(f"model file {model_name!r} does not exist")
    if config.qat_epochs:
        tfmot_bridge.require_tfmot()  # now, not after hours of training
    distribution = make_strategy(config.strategy)  # a multi-worker strategy must precede other TensorFlow work
    image_size = image_size_for(model_name, config.image_size)
    dataset = config.load_dataset(image_size)
    source = source_model(model_name, dataset)
    space = search_space(model_name, source, config.add_mode, config.width_multiple)
    layout = table and LatencyLayout(space, source)
    if table:
        table.check_covers(layout)
    if config.cost_metric != LATENCY or table:
        floor = smallest_ratio(space, layout, table)
        if config.target_latency_ms is None and config.target_ratio < floor:
            raise ValueError(f"target ratio {config.target_ratio} is below the smallest {space.name} the search "
                             f"space can express ({floor:.3f} of the {'latency' if table else 'FLOPs'})")
    if teacher_path:
        _check_teacher(teacher_path, space)
    elif is_model_file(model_name):
        teacher_path = model_name
    from_trained = bool(teacher_path or config.weights)
    # A given model ending in a softmax is searched and distilled on its logits; the exports end in it again.
    output = "probabilities" if teacher_path and softmax_head(load_model(teacher_path, logits=False)) else "logits"
    if table and config.target_latency_ms is not None:
        latency_target_ratio(config.target_latency_ms, layout, table)
    threads = table.threads if table else config.export.threads
    images = dataset.train_size
    # Stage workloads in base-training images, an export about half an epoch. The rate is the last stage's, timed.
    progress = _Progress([config.base.epochs * images * (teacher_path is None), 0,
                          config.search.epochs * images * SEARCH_IMAGE_COST,
                          config.distill.epochs * images * KD_IMAGE_COST, images * len(config.quantizations) / 2, 0])
    shared = {**{name: getattr(config, name) for name in RunSettings.setting_names()}, "image_size": image_size}
    from_trained_rate = {"learning_rate": config.from_trained_learning_rate}
    stage_dirs = {stage: os.path.join(out, stage) for stage in ("base", "search", "distill")}

    with distribution.scope():
        check_overwrite(overwrite)
        # On a cluster's other workers every stage writes its own copy (run_dir), read back from there.
        written = run_dir(out)
        lock_run_dir(written)
        if overwrite:
            clear_run_dir(written)
        if holds_own_files(written) and not os.path.exists(os.path.join(written, PIPELINE_FILE)):
            raise ValueError(f"{out} is not empty and holds no train.prune run; use another --out or "
                             "--overwrite")
        write_json(os.path.join(written, PIPELINE_FILE), config.run_record())

        progress.banner(0, "base network" + (f": given {teacher_path}" if teacher_path else ""))
        if not teacher_path:
            base = train_base(stage_dirs["base"], config.base.replace(
                model_name=model_name, weights=config.weights, **shared, **(from_trained_rate if config.weights
                                                                            else {})))
            teacher_path = os.path.join(run_dir(stage_dirs["base"]), MODEL_FILE)
            progress.measured(base["train_images_per_second"])
        else:
            progress.measured(300.0)  # a first guess, until a stage is timed
        kd_teacher, from_trained_settings = teacher_path, {}
        if from_trained:
            kd_teacher = ordered_base(written, teacher_path, space, dataset, config.base.batch_size,
                                      config.input_convention, config.check_base)
            from_trained_settings = {"init_from": kd_teacher, **from_trained_rate}

        latency_table = config.latency_table
        if config.cost_metric == LATENCY and not latency_table:
            latency_table = os.path.join(written, LATENCY_TABLE_FILE)
            progress.banner(1, f"latency table of {model_name}'s search space on this machine (int8, {threads} "
                               f"thread(s))")
            os.makedirs(os.path.dirname(latency_table), exist_ok=True)
            make_table(latency_table, models=[model_name], quantize="int8", threads=threads,
                       width_multiple=config.width_multiple, num_classes=dataset.num_classes,
                       image_size=dataset.image_shape[0], add_mode=config.add_mode, note="made by train.prune")
        target = (f"{config.target_latency_ms} ms" if config.target_latency_ms else
                  f"{config.target_ratio:.0%} of the {config.cost_metric}")
        progress.banner(2, f"TAS search of {model_name} at {target}")
        searched = run_search(stage_dirs["search"], config.search.replace(
            model_name=model_name, target_ratio=config.target_ratio, width_multiple=config.width_multiple,
            cost_metric=config.cost_metric, latency_table=latency_table, target_latency_ms=config.target_latency_ms,
            add_mode=config.add_mode, **from_trained_settings, **shared))
        search_dir = run_dir(stage_dirs["search"])
        progress.measured(progress.workloads[2] / searched["provenance"]["search_wall_time_s"])

        progress.banner(3, "training the searched shape with KD from the base network")
        distilled = distill(stage_dirs["distill"], config.distill.replace(
            arch_path=os.path.join(search_dir, ARCH_FILE), teacher_path=kd_teacher,
            mode="init_kd" if from_trained else "kd", **(from_trained_rate if from_trained else {}), **shared))
        progress.measured(distilled["train_images_per_second"] / KD_IMAGE_COST)
    if not distribution.extended.should_checkpoint:
        logging.info("training done; the chief exports and writes the report")
        return None

    progress.banner(4, f"export to SavedModel and .tflite ({', '.join(config.quantizations)}), verified with LiteRT")
    exports = {}
    for quantize in config.quantizations:
        export_dir = os.path.join(out, "export", quantize)
        export = config.export.replace(
            model_path=os.path.abspath(os.path.join(stage_dirs["distill"], MODEL_FILE)),
            compare_with=os.path.abspath(teacher_path), quantize=quantize, threads=threads,
            qat_epochs=config.qat_epochs if quantize == "int8" else 0, output=output,
            **{name: getattr(config, name) for name in DataSettings.setting_names()})
        _, finished = prepare_run_dir(export_dir, export.run_record(), done_file=REPORT_FILE)
        if finished:
            exports[quantize] = read_json(os.path.join(export_dir, REPORT_FILE))
        else:
            exports[quantize] = export_and_verify(export_dir, export)

    progress.banner(5, "report")
    report = write_report(out, model_name, config.target_ratio, distilled, exports, search_dir,
                          chance_threshold(dataset.test_pixels()[1]))
    logging.info("report: %s", os.path.join(out, "report.md"))
    return report


def ordered_base(out, teacher_path, space, dataset, batch_size, input_convention, check_base):
    """`out`/ordered/model.keras: the trained base network `teacher_path` with its channels ordered by
    importance (the Taylor scores on a few training batches; the same function); first a ValueError if
    it scores at chance (`check_base`)."""
    ordered = os.path.join(out, ORDERED_DIR, MODEL_FILE)
    if os.path.exists(ordered):
        return ordered
    teacher = load_teacher(teacher_path)
    if check_base:
        fed = conventions.feed(dataset, teacher, input_convention)
        accuracy = check_above_chance(teacher, fed, batch_size, f"the base network {teacher_path}",
                                      conventions.resolve(teacher, input_convention))
        logging.info("the base network scores %.2f%% on the test split", 100 * accuracy)
    os.makedirs(os.path.dirname(ordered), exist_ok=True)
    teacher_space = read_model(teacher, space.add_mode, space.multiple_of)
    scores = importance_scores(teacher, teacher_space, conventions.feed(dataset, teacher, input_convention), batch_size)
    save_model(order_channels(teacher, teacher_space, scores), ordered)
    return ordered
