"""The main job: base training (or a given teacher), TAS search, KD training of the searched shape,
export (fp32 and int8) and the base-vs-pruned report, each stage in its own sub-directory of `out`.

Every stage is resumable and skipped when finished; a stage whose settings changed refuses to run
and names the changed setting (its directory's run.json), unless `overwrite` starts afresh.
"""

import dataclasses
import logging
import os
import time

from export import tfmot_bridge
from export.pipeline import REPORT_FILE, TFLITE_FILE, export_and_verify
from tas_keras import data
from tas_keras.distribute import make_strategy
from tas_keras.cost import count_arch
from tas_keras.distill import distill, load_teacher
from tas_keras.runs import (check_overwrite, clear_run_dir, holds_own_files, lock_run_dir, locking_stage,
                            prepare_run_dir, read_json, run_dir, write_json)
from tas_keras.search import ARCH_FILE, CURVES_FILE, PLOT_FILE, run_search
from tas_keras.search_space import ArchConfig, candidate_widths, depth_choices
from tas_keras.training import MODEL_FILE, train_base

PIPELINE_FILE = "pipeline.json"
STAGES = ("base", "search", "distill", "export", "report")


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


PRESETS = {
    # The README quickstart: the bundled subset, a few minutes on 2 CPU cores.
    "quick": Preset(data.BUNDLED_DATASET, base_epochs=8, search_epochs=10, distill_epochs=8, batch_size=128,
                    search_batch_size=64, latency_runs=100),
    # The reference schedule and architecture step (base network trained as long as the final
    # training), for GPUs.
    "paper": Preset("cifar10", base_epochs=300, search_epochs=600, distill_epochs=300, batch_size=256,
                    search_batch_size=256, latency_runs=500,
                    arch_step={"arch_learning_rate": 1e-3, "arch_warmup": 0.0, "arch_decay": "constant",
                              "entropy_weight": 0.0}),
}


def smallest_ratio(full):
    """FLOPs of the smallest network the search space can express, as a fraction of the full one."""
    smallest = full.replace(widths=[candidate_widths(s.full_width)[0] for s in full.slots],
                            stage_blocks=[depth_choices(full.num_blocks)[0]] * len(full.stage_blocks))
    return count_arch(smallest).flops / count_arch(full).flops


def _check_teacher(path, full):
    teacher = load_teacher(path)
    arch = getattr(teacher, "arch", None)
    if arch is None or not arch.is_full() or (arch.depth, arch.block, arch.num_classes, arch.input_shape) != (
            full.depth, full.block, full.num_classes, full.input_shape):
        shape = arch.name if arch is not None else type(teacher).__name__
        raise ValueError(f"--teacher {path} is not the full {full.name} for this data "
                         f"(it is {shape}{'' if arch is None else f', {arch.num_classes} classes'})")


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
              width_multiple=1, seed=0, qat_epochs=0, overwrite=False, strategy="auto"):
    """Runs every stage into `out` and returns the report (also `out/report.json` and `report.md`).

    The training stages run under `strategy`; export and report need one device and run outside it,
    on the chief only (the other workers of a cluster return None once training is done).
    `qat_epochs` > 0 makes the int8 export quantization-aware (the optional TFMOT bridge).
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
    if not 0 < target_ratio < 1:
        raise ValueError(f"target ratio must be in (0, 1), got {target_ratio!r}")
    floor = smallest_ratio(ArchConfig.full(model_name))
    if target_ratio < floor:
        raise ValueError(f"target ratio {target_ratio} is below the smallest {model_name} the search space "
                         f"can express ({floor:.3f} of the FLOPs)")
    if qat_epochs:
        tfmot_bridge.require_tfmot()  # now, not after hours of training
    distribution = make_strategy(strategy)  # a multi-worker strategy must precede other TensorFlow work
    dataset = data.load_dataset(dataset_name, data_dir=data_dir, seed=seed)
    full = ArchConfig.full(model_name, num_classes=dataset.num_classes, input_shape=dataset.image_shape)
    if teacher_path:
        _check_teacher(teacher_path, full)
    images = len(dataset.train_labels)
    progress = _Progress([base_epochs * images * (teacher_path is None), search_epochs * images,
                          distill_epochs * images * 1.3, images, 0])
    common = dict(dataset_name=dataset_name, data_dir=data_dir, seed=seed)
    trained = dict(common, strategy=strategy)
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
            "model": model_name, "target_ratio": target_ratio, "preset": preset, "dataset": dataset_name,
            "seed": seed})

        progress.banner(0, "base network" + (f": given {teacher_path}" if teacher_path else ""))
        if not teacher_path:
            base = train_base(stage_dirs["base"], model_name=model_name, epochs=base_epochs,
                              batch_size=batch_size, **trained)
            teacher_path = os.path.join(run_dir(stage_dirs["base"]), MODEL_FILE)
            progress.measured(base["train_images_per_second"])
        else:
            progress.measured(300.0)  # a first guess, until a stage is timed

        progress.banner(1, f"TAS search of {model_name} at {target_ratio:.0%} of the FLOPs")
        run_search(stage_dirs["search"], model_name=model_name, epochs=search_epochs,
                   batch_size=search_batch_size, target_ratio=target_ratio, width_multiple=width_multiple,
                   **chosen.arch_step,
                   **trained)
        search_dir = run_dir(stage_dirs["search"])

        progress.banner(2, "training the searched shape with KD from the base network")
        distilled = distill(stage_dirs["distill"], os.path.join(search_dir, ARCH_FILE), teacher_path,
                            mode="kd", epochs=distill_epochs, batch_size=batch_size, **trained)
        progress.measured(distilled["train_images_per_second"] / 1.3)
    if not distribution.extended.should_checkpoint:
        logging.info("training done; the chief exports and writes the report")
        return None

    progress.banner(3, "export to SavedModel and .tflite (fp32, int8), verified with LiteRT")
    exports = {}
    for quantize in ("none", "int8"):
        export_dir = os.path.join(out, "export", quantize)
        settings = {"model": os.path.abspath(os.path.join(stage_dirs["distill"], MODEL_FILE)),
                    "compare_with": os.path.abspath(teacher_path), "quantize": quantize, **common}
        qat = qat_epochs if quantize == "int8" else 0
        if qat:  # only then: the exports of earlier runs, without the key, stay finished
            settings["qat_epochs"] = qat
        _, finished = prepare_run_dir(export_dir, settings, done_file=REPORT_FILE)
        if finished:
            exports[quantize] = read_json(os.path.join(export_dir, REPORT_FILE))
        else:
            exports[quantize] = export_and_verify(settings["model"], export_dir, quantize=quantize,
                                                  qat_epochs=qat, compare_with=teacher_path,
                                                  latency_runs=chosen.latency_runs, **common)

    progress.banner(4, "report")
    report = build_report(out, model_name, target_ratio, distilled, exports, search_dir)
    logging.info("report: %s", os.path.join(out, "report.md"))
    return report


def build_report(out, model_name, target_ratio, distilled, exports, search_dir):
    """report.json and report.md: base vs pruned, the searched shape and the search curves."""
    models = {q: {m["role"]: m for m in exports[q]["models"]} for q in exports}
    pruned, base = models["none"]["model"], models["none"]["compare_with"]
    report = {
        "model": model_name, "target_ratio": target_ratio,
        "searched_shape": read_json(os.path.join(search_dir, ARCH_FILE)),
        "base": {"flops": base["flops"], "params": base["params"]},
        "pruned": {"flops": pruned["flops"], "params": pruned["params"]},
        "keras_accuracy": {"base": distilled["teacher_test_accuracy"], "pruned": distilled["test_accuracy"]},
        "exports": {q: {role: {"size_bytes": m["tflite"]["size_bytes"], "accuracy": m["tflite"]["accuracy"],
                               "latency_ms": m["latency_ms"]["median"]} for role, m in models[q].items()}
                    for q in models},
        "checks_passed": all(exports[q]["passed"] for q in exports),
    }
    write_json(os.path.join(out, "report.json"), report)

    def row(label, base_value, pruned_value, fmt):
        ratio = pruned_value / base_value if base_value else float("nan")
        return f"| {label} | {fmt(base_value)} | {fmt(pruned_value)} | {ratio:.2f}x |"

    size = lambda b: f"{b / 1024:.1f} KB"  # noqa: E731
    pct = lambda a: f"{100 * a:.2f}%"  # noqa: E731
    ms = lambda t: f"{t:.3f} ms"  # noqa: E731
    e = report["exports"]
    lines = [
        f"# {model_name} pruned to {pruned['flops'] / base['flops']:.1%} of its FLOPs (target {target_ratio:.0%})",
        "",
        "| | base | pruned | pruned / base |",
        "|---|---|---|---|",
        row("MFLOPs", base["flops"] / 1e6, pruned["flops"] / 1e6, lambda v: f"{v:.2f}"),
        row("parameters", base["params"], pruned["params"], lambda v: f"{v:,}"),
        row("accuracy, Keras", report["keras_accuracy"]["base"], report["keras_accuracy"]["pruned"], pct),
    ]
    for q, label in (("none", "fp32"), ("int8", "int8")):
        lines += [row(f".tflite {label} size", e[q]["compare_with"]["size_bytes"], e[q]["model"]["size_bytes"], size),
                  row(f".tflite {label} accuracy", e[q]["compare_with"]["accuracy"], e[q]["model"]["accuracy"], pct),
                  row(f".tflite {label} latency (batch 1, median)", e[q]["compare_with"]["latency_ms"],
                      e[q]["model"]["latency_ms"], ms)]
    shape = report["searched_shape"]
    lines += ["", f"Export checks: {'all passed' if report['checks_passed'] else 'SOME FAILED, see export/*/report.json'}."
              f" Files: `export/none/{TFLITE_FILE}`, `export/int8/{TFLITE_FILE}`.", "",
              f"## Searched shape: blocks per stage {shape['stage_blocks']}", "",
              f"![searched shape](search/{PLOT_FILE})", "", "## Search", "", f"![search curves](search/{CURVES_FILE})", ""]
    tmp = os.path.join(out, "report.md.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, os.path.join(out, "report.md"))
    return report
