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
from tas_keras.cost import count_shape
from tas_keras.distill import distill, load_teacher
from tas_keras.distribute import make_strategy
from tas_keras.export import tfmot_bridge
from tas_keras.export.convert import QUANTIZATIONS
from tas_keras.export.exporter import REPORT_FILE, ExportConfig, export_and_verify
from tas_keras.export.layer_latency import make_table
from tas_keras.graph import load_model, read_model, softmax_head
from tas_keras.importance import importance_scores, order_channels
from tas_keras.latency import LatencyLayout, LatencyTable, predict_latency
from tas_keras.models.registry import check_model_name, check_weights, image_size_for, is_model_file
from tas_keras.precision import check_mixed_precision
from tas_keras.report import write_report
from tas_keras.runs import (check_overwrite, clear_run_dir, holds_own_files, lock_run_dir, locking_stage,
                            prepare_run_dir, read_json, run_dir, write_json)
from tas_keras.search import ARCH_FILE, COSTS, LATENCY, latency_target_ratio, run_search, source_model
from tas_keras.supernet import search_space
from tas_keras.training import MODEL_FILE, chance_threshold, check_above_chance, save_model, train_base

PIPELINE_FILE = "pipeline.json"
ORDERED_DIR = "ordered"
# The weight learning rate of a search and of KD that start from a trained network, and of fine-tuning a
# base from pretrained weights: the reference's 0.1 would first undo the training
# (bench/results/pretrained_lite0.json used it).
FROM_TRAINED_LEARNING_RATE = 0.01
STAGES = ("base", "latency table", "search", "distill", "export", "report")
LATENCY_TABLE_FILE = os.path.join("latency_table", "table.json")


@dataclasses.dataclass(frozen=True)
class Preset:
    dataset: str
    base_epochs: int
    search_epochs: int
    distill_epochs: int
    batch_size: int
    search_batch_size: int
    latency_runs: int
    # run_search's architecture-step settings; empty: its defaults, which scale to the run's length.
    arch_step: dict = dataclasses.field(default_factory=dict)
    cost: str = "flops"
    width_multiple: int = 1
    quantizations: tuple = ("none", "int8")  # the exports
    # LiteRT threads of the exports' latency (and of the latency table the pipeline makes)
    threads: int = ExportConfig.threads


PRESETS = {
    # The README quickstart: the bundled subset, under 5 minutes on 2 CPU cores (docs/results.md).
    "quick": Preset(data.BUNDLED_DATASET, base_epochs=5, search_epochs=6, distill_epochs=5, batch_size=128,
                    search_batch_size=64, latency_runs=100),
    # The reference schedule and architecture step (base network trained as long as the final
    # training), for GPUs.
    "paper": Preset("cifar10", base_epochs=300, search_epochs=600, distill_epochs=300, batch_size=256,
                    search_batch_size=256, latency_runs=500,
                    arch_step={"arch_learning_rate": 1e-3, "arch_warmup": 0.0, "arch_decay": "constant",
                              "entropy_weight": 0.0}),
    # For phones: the quick schedule, searched against the int8 latency of a table measured on this
    # machine (made in latency_table/ unless given) in widths that are multiples of 16 (XNNPACK's int8
    # kernels tile output channels by 16), exported to int8 only, timed on one thread.
    "mobile": Preset(data.BUNDLED_DATASET, base_epochs=5, search_epochs=6, distill_epochs=5, batch_size=128,
                     search_batch_size=64, latency_runs=100, cost=LATENCY, width_multiple=16,
                     quantizations=("int8",), threads=1),
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
def run_prune(out, model_name="resnet20", target_ratio=0.5, preset="quick", dataset_name=None, data_dir=None,
              teacher_path=None, base_epochs=None, search_epochs=None, distill_epochs=None, batch_size=None,
              width_multiple=None, seed=0, qat_epochs=0, overwrite=False, strategy="auto", cost_metric=None,
              latency_table=None, target_latency_ms=None, image_size=None, streaming="auto", mixed_precision=None,
              add_mode=None, max_train_examples=None, quantizations=None, weights=None, input_convention=None,
              check_base=True):
    """Runs every stage into `out` and returns the report (also `out/report.json` and `report.md`).

    The training stages run under `strategy`; export and report need one device and run outside it,
    on the chief only (the other workers of a cluster return None once training is done).
    `qat_epochs` > 0 makes the int8 export quantization-aware (the optional TFMOT bridge).

    `cost_metric` and `width_multiple` default to the preset's. The latency cost reads `latency_table`
    (it must measure one of the preset's export quantisations; the exports are then timed at its
    threads); without one, the pipeline measures a table on this machine into `out/latency_table/`
    (int8, the preset's threads). `target_latency_ms` replaces `target_ratio` by a latency.

    `mixed_precision` ("mixed_bfloat16" or "mixed_float16"; None: float32) is the dtype policy of the
    training stages (`tas_keras.precision`); the models they save, and so the exports, are float32.

    `model_name` is a registry name (trained from scratch as the base network) or a trained .keras
    model, which is then the base network and the teacher; `add_mode` as `run_search` takes it.
    `max_train_examples` trains every stage on that many training images (a trial run of the pipeline);
    `quantizations` replaces the preset's exports, e.g. ("int8",). `weights` ("imagenet", for the registry
    networks that offer them) fine-tunes the base network from those pretrained weights.

    A trained base network (a .keras model, `teacher_path`, or one fine-tuned from `weights`) is scored
    on the test split first (`check_base`: one line naming the likely causes when it is at chance); its
    channels are then ordered by importance (`tas_keras.importance`, in `ordered/`), the supernet starts
    from those weights (trained at FROM_TRAINED_LEARNING_RATE) and the searched shape is initialised
    from them before KD. A base trained from scratch here keeps the reference's search from a random
    supernet and KD without Init. `input_convention` says how the images are fed
    (`tas_keras.input_convention`).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    chosen = PRESETS[preset]
    dataset_name = dataset_name or chosen.dataset
    base_epochs, search_epochs, distill_epochs = (
        value or default for value, default in ((base_epochs, chosen.base_epochs),
                                                 (search_epochs, chosen.search_epochs),
                                                 (distill_epochs, chosen.distill_epochs)))
    batch_size = batch_size or chosen.batch_size
    search_batch_size = min(batch_size, chosen.search_batch_size)
    cost_metric = cost_metric or chosen.cost
    given, exporter = quantizations, "this run" if quantizations else f"the {preset} preset"
    quantizations = tuple(quantizations or chosen.quantizations)
    unknown = [q for q in quantizations if q not in QUANTIZATIONS]
    if unknown or len(set(quantizations)) != len(quantizations):
        raise ValueError(f"exports must be distinct ones of {', '.join(QUANTIZATIONS)}, got {given!r}")
    width_multiple = width_multiple or chosen.width_multiple
    if cost_metric not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost_metric!r}")
    if cost_metric != LATENCY and (latency_table or target_latency_ms):
        raise ValueError(f"a latency table or target is for the latency cost, got cost {cost_metric!r}")
    if not 0 < target_ratio < 1:
        raise ValueError(f"target ratio must be in (0, 1), got {target_ratio!r}")
    table = latency_table and LatencyTable.load(latency_table)
    if table and table.quantize not in quantizations:
        raise ValueError(f"latency table {latency_table!r} was measured with quantize={table.quantize}, but "
                         f"{exporter} exports {', '.join(quantizations)}")
    if is_model_file(model_name):
        if teacher_path:
            raise ValueError(f"{model_name} is the base network and the teacher: do not give --teacher too")
        if not os.path.isfile(model_name):
            raise ValueError(f"model file {model_name!r} does not exist")
    check_model_name(model_name)
    check_weights(model_name, weights)
    conventions.check(input_convention)
    check_mixed_precision(mixed_precision)
    if qat_epochs:
        tfmot_bridge.require_tfmot()  # now, not after hours of training
    distribution = make_strategy(strategy)  # a multi-worker strategy must precede other TensorFlow work
    image_size = image_size_for(model_name, image_size)
    dataset = data.load_dataset(dataset_name, data_dir=data_dir, seed=seed, image_size=image_size, streaming=streaming,
                                max_train_examples=max_train_examples)
    source = source_model(model_name, dataset)
    space = search_space(model_name, source, add_mode, width_multiple)
    layout = table and LatencyLayout(space, source)
    if table:
        table.check_covers(layout)
    if cost_metric != LATENCY or table:
        floor = smallest_ratio(space, layout, table)
        if target_latency_ms is None and target_ratio < floor:
            raise ValueError(f"target ratio {target_ratio} is below the smallest {space.name} the search space "
                             f"can express ({floor:.3f} of the {'latency' if table else 'FLOPs'})")
    if teacher_path:
        _check_teacher(teacher_path, space)
    elif is_model_file(model_name):
        teacher_path = model_name
    from_trained = bool(teacher_path or weights)
    # A given model ending in a softmax is searched and distilled on its logits; the exports end in it again.
    output = "probabilities" if teacher_path and softmax_head(load_model(teacher_path, logits=False)) else "logits"
    if table and target_latency_ms is not None:
        latency_target_ratio(target_latency_ms, layout, table)
    threads = table.threads if table else chosen.threads
    images = dataset.train_size
    # Stage workloads in base-training images, an export about half an epoch. The rate is the last stage's, timed.
    progress = _Progress([base_epochs * images * (teacher_path is None), 0, search_epochs * images * SEARCH_IMAGE_COST,
                          distill_epochs * images * KD_IMAGE_COST, images * len(quantizations) / 2, 0])
    common = dict(dataset_name=dataset_name, data_dir=data_dir, seed=seed,
                  **({"input_convention": input_convention} if input_convention else {}))
    trained = dict(common, strategy=strategy, image_size=image_size, streaming=streaming,
                   mixed_precision=mixed_precision, max_train_examples=max_train_examples)
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
        write_json(os.path.join(written, PIPELINE_FILE), {
            "model": model_name, "target_ratio": target_ratio, "preset": preset,
            "dataset": data.recorded_name(dataset_name),
            "seed": seed, "cost": cost_metric, "width_multiple": width_multiple,
            **({"latency_table": latency_table, "target_latency_ms": target_latency_ms}
               if cost_metric == LATENCY else {}),
            **({"mixed_precision": mixed_precision} if mixed_precision else {}),
            **({"max_train_examples": max_train_examples} if max_train_examples else {}),
            **({"add_mode": add_mode} if add_mode else {}),
            **({"weights": weights} if weights else {}),
            **({"input_convention": input_convention} if input_convention else {})})

        progress.banner(0, "base network" + (f": given {teacher_path}" if teacher_path else ""))
        if not teacher_path:
            base = train_base(stage_dirs["base"], model_name=model_name, epochs=base_epochs,
                              batch_size=batch_size, **trained, **({"weights": weights, "learning_rate":
                                                                   FROM_TRAINED_LEARNING_RATE} if weights else {}))
            teacher_path = os.path.join(run_dir(stage_dirs["base"]), MODEL_FILE)
            progress.measured(base["train_images_per_second"])
        else:
            progress.measured(300.0)  # a first guess, until a stage is timed
        kd_teacher, from_trained_settings = teacher_path, {}
        if from_trained:
            kd_teacher = ordered_base(written, teacher_path, space, dataset, batch_size, input_convention,
                                      check_base)
            from_trained_settings = {"init_from": kd_teacher, "learning_rate": FROM_TRAINED_LEARNING_RATE}

        if cost_metric == LATENCY and not latency_table:
            latency_table = os.path.join(written, LATENCY_TABLE_FILE)
            progress.banner(1, f"latency table of {model_name}'s search space on this machine (int8, {threads} "
                               f"thread(s))")
            os.makedirs(os.path.dirname(latency_table), exist_ok=True)
            make_table(latency_table, models=[model_name], quantize="int8", threads=threads,
                       width_multiple=width_multiple, num_classes=dataset.num_classes,
                       image_size=dataset.image_shape[0], add_mode=add_mode,
                       note=f"made by train.prune --preset={preset}")
        target = f"{target_latency_ms} ms" if target_latency_ms else f"{target_ratio:.0%} of the {cost_metric}"
        progress.banner(2, f"TAS search of {model_name} at {target}")
        searched = run_search(stage_dirs["search"], model_name=model_name, epochs=search_epochs,
                              batch_size=search_batch_size, target_ratio=target_ratio, width_multiple=width_multiple,
                              cost_metric=cost_metric, latency_table=latency_table,
                              target_latency_ms=target_latency_ms, add_mode=add_mode, **chosen.arch_step,
                              **from_trained_settings, **trained)
        search_dir = run_dir(stage_dirs["search"])
        progress.measured(progress.workloads[2] / searched["provenance"]["search_wall_time_s"])

        progress.banner(3, "training the searched shape with KD from the base network")
        distilled = distill(stage_dirs["distill"], arch_path=os.path.join(search_dir, ARCH_FILE),
                            teacher_path=kd_teacher, epochs=distill_epochs, batch_size=batch_size, **trained,
                            **({"mode": "init_kd", "learning_rate": FROM_TRAINED_LEARNING_RATE} if from_trained
                               else {"mode": "kd"}))
        progress.measured(distilled["train_images_per_second"] / KD_IMAGE_COST)
    if not distribution.extended.should_checkpoint:
        logging.info("training done; the chief exports and writes the report")
        return None

    progress.banner(4, f"export to SavedModel and .tflite ({', '.join(quantizations)}), verified with LiteRT")
    exports = {}
    for quantize in quantizations:
        export_dir = os.path.join(out, "export", quantize)
        config = ExportConfig(model_path=os.path.abspath(os.path.join(stage_dirs["distill"], MODEL_FILE)),
                              compare_with=os.path.abspath(teacher_path), quantize=quantize, threads=threads,
                              qat_epochs=qat_epochs if quantize == "int8" else 0, output=output,
                              latency_runs=chosen.latency_runs, **common)
        _, finished = prepare_run_dir(export_dir, config.run_record(), done_file=REPORT_FILE)
        if finished:
            exports[quantize] = read_json(os.path.join(export_dir, REPORT_FILE))
        else:
            exports[quantize] = export_and_verify(export_dir, config)

    progress.banner(5, "report")
    report = write_report(out, model_name, target_ratio, distilled, exports, search_dir,
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
