"""One export run: SavedModel + .tflite of a trained model taking RGB pixels, its labels.txt, verified
with LiteRT against the Keras model on normalised images, one report.json.

With `compare_with`, a second model (typically the unpruned base of a pruned `model`) is exported and
verified the same way and the two are reported side by side, their latency measured interleaved.
"""

import dataclasses
import importlib.metadata
import os
import platform

import keras
import numpy as np
import tensorflow as tf

from tas_keras.export import convert, tfmot_bridge, verify
from tas_keras import data
from tas_keras import input_convention as conventions
from tas_keras.configs import DataSettings, configure, recorded_as, recorded_when_given, run_only
from tas_keras.cost import count_model
from tas_keras.distill import SHAPE_FILE
from tas_keras.graph import load_model, logits_model, softmax_head
from tas_keras.models import cifar_resnet  # noqa: F401 (registers CifarResNet for load_model)
from tas_keras.models.registry import image_side
from tas_keras.runs import write_json
from tas_keras.shapes import load_shape

OUTPUTS = ("auto", "logits", "probabilities")
REPORT_FILE = "report.json"
TFLITE_FILE = "model.tflite"
SAVED_MODEL_DIR = "saved_model"
COMPARE_DIR = "compare"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig(DataSettings):
    """The settings of an export (`export_and_verify`).

    `model_path`: the trained model (.keras) exported (given when the export runs: train.prune's export
    config has none), and `compare_with` another one exported and
    verified beside it (typically the unpruned base of a pruned model). The exported models take RGB
    pixels (uint8, or float32 0-255 with `float_input`) and normalise them as the model was trained
    (`tas_keras.input_convention`: by default with the mean/std of `dataset_name`, the data the model
    was trained on, read at the model's input size as training read it; raw pixels for a model holding
    its own preprocessing, a named convention with `input_convention`). `quantize`: one of
    `convert.QUANTIZATIONS`; `int8_io` (int8 only): int8 output (and, with `float_input`, input)
    tensors; `representative_size` images calibrate int8 activations, unless `qat_epochs` > 0 (int8
    only) fine-tunes with quantization-aware training (the optional TFMOT bridge). `threads` and
    `latency_runs`: LiteRT's CPU threads and the timed batch-1 invokes. `tolerances` ({metric: limit})
    replaces the default verify.TOLERANCES[quantize]. `output`: what the exported models output,
    "logits", "probabilities" (a softmax after the logits) or "auto": as each model's file, which keeps
    the final softmax it ends in (`tas_keras.graph.softmax_head`; the model is verified on its logits).

    An export has no run directory of its own; train.prune records its exports' configs (their
    `run_record`) to skip finished ones, as it recorded them before this config: without the stage's
    name, settings added later only away from their defaults, and neither `latency_runs` (how long the
    latency is timed) nor `output` (train.prune sets it from its models' files, which are recorded).
    """

    stage = "export"

    model_path: str = recorded_as("model", None)
    compare_with: str = None
    quantize: str = "none"
    threads: int = recorded_when_given(2)
    qat_epochs: int = recorded_when_given(0)
    int8_io: bool = recorded_when_given(False)
    float_input: bool = recorded_when_given(False)
    representative_size: int = recorded_when_given(300)
    tolerances: dict = recorded_when_given(None)
    latency_runs: int = run_only(200)
    output: str = run_only("auto")

    def validate(self):
        super().validate()
        if self.output not in OUTPUTS:
            raise ValueError(f"--output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        if self.quantize not in convert.QUANTIZATIONS:
            raise ValueError(f"--quantize must be one of {', '.join(convert.QUANTIZATIONS)}, got {self.quantize!r}")
        if self.int8_io and self.quantize != "int8":
            raise ValueError(f"--int8_io needs --quantize=int8, got --quantize={self.quantize}")
        if self.qat_epochs < 0 or (self.qat_epochs and self.quantize != "int8"):
            raise ValueError(f"--qat_epochs needs --quantize=int8 and a count >= 0, got "
                             f"--qat_epochs={self.qat_epochs} --quantize={self.quantize}")
        if min(self.representative_size, self.threads, self.latency_runs) < 1:
            raise ValueError(f"representative_size, threads and latency_runs must be >= 1, got "
                             f"{self.representative_size}, {self.threads}, {self.latency_runs}")

    def run_record(self):
        record = super().run_record()
        del record["stage"]
        return record


def export_and_verify(out, config=None, **overrides):
    """Exports `config.model_path` (and `config.compare_with`) into `out` as `config` with `overrides`
    says (`ExportConfig`; without `config`, its defaults) and writes `out`/report.json; returns the
    report, labels.txt beside model.tflite naming its outputs.

    The report's "checks" list every tolerance tested (the SavedModel check always runs) and "passed" is
    False if any failed: the caller decides what a failure means (the CLI exits non-zero).
    """
    config = configure(ExportConfig, config, overrides)
    model_path, compare_with, quantize = config.model_path, config.compare_with, config.quantize
    if config.qat_epochs:
        tfmot_bridge.require_tfmot()
    # The files a config names are checked when it runs: a config read back from a run.json stays valid.
    if model_path is None:
        raise ValueError("an export needs the model to export (model_path)")
    for path in filter(None, (model_path, compare_with)):
        if not os.path.isfile(path):
            raise ValueError(f"model file {path!r} does not exist")
    tolerances = {**verify.SAVED_MODEL_TOLERANCE,
                  **(verify.TOLERANCES[quantize] if config.tolerances is None else config.tolerances)}

    os.makedirs(out, exist_ok=True)
    report_path = os.path.join(out, REPORT_FILE)
    if os.path.exists(report_path):
        os.remove(report_path)  # a stale report must not vouch for files this run replaces
    jobs = [("model", model_path, out)]
    if compare_with:
        jobs.append(("compare_with", compare_with, os.path.join(out, COMPARE_DIR)))
    as_saved = {path: load_model(path, logits=False) for _, path, _ in jobs}
    models = {path: logits_model(model) for path, model in as_saved.items()}
    probabilities = {path: config.output == "probabilities" or (config.output == "auto" and
                                                                softmax_head(model) is not None)
                     for path, model in as_saved.items()}
    dataset = data.load_dataset(config.dataset_name, data_dir=config.data_dir, seed=config.seed,
                                image_size=image_side(models[model_path].input_shape[1:]))
    dataset = conventions.feed(dataset, models[model_path], config.input_convention)
    representative = (convert.representative_images(dataset, config.representative_size, config.seed,
                                                    config.float_input)
                      if quantize == "int8" else None)
    export = dict(quantize=quantize, int8_io=config.int8_io, float_input=config.float_input,
                  qat_epochs=config.qat_epochs, representative=representative, threads=config.threads,
                  seed=config.seed)

    test_images, test_labels = dataset.test_pixels()
    export["test"] = (test_images, test_labels)
    entries, runtimes, checks = [], [], []
    for role, path, directory in jobs:
        entry, runtime = _export_one(models[path], path, directory, dataset, probabilities=probabilities[path],
                                     **export)
        entries.append({"role": role, **entry})
        runtimes.append(runtime)
        metrics = {**entry["tflite"], "saved_model_max_rel_diff": entry["saved_model"]["max_rel_diff"]}
        checks += verify.checks(metrics, tolerances, prefix=f"{role}.")

    pixels = test_images[0].astype(convert.pixel_dtype(config.float_input))
    latencies = verify.interleaved_latency(runtimes, pixels, config.latency_runs)
    for entry, samples in zip(entries, latencies):
        entry["latency_ms"] = verify.latency_summary(samples)
        if "predicted_latency" in entry:
            entry["predicted_latency"]["error"] = entry["predicted_latency"]["ms"] / entry["latency_ms"]["median"] - 1

    report = {
        "quantize": quantize,
        "int8_io": config.int8_io,
        "qat_epochs": config.qat_epochs,
        "representative_size": len(representative) if representative is not None else None,
        "input": {"pixels": f"RGB, {convert.pixel_dtype(config.float_input)} 0-255",
                  "convention": conventions.resolve(models[model_path], config.input_convention),
                  "normalisation_mean": list(dataset.mean), "normalisation_std": list(dataset.std),
                  "model_channel_order": "BGR" if dataset.bgr else "RGB"},
        "dataset": dataset.name,
        "test_images": len(test_labels),
        "latency": {"batch": 1, "threads": config.threads, "runs": config.latency_runs, "interleaved": len(jobs) > 1,
                    "runtime": "LiteRT, XNNPACK"},
        "tolerances": tolerances,
        "models": entries,
        "checks": checks,
        "passed": all(check["passed"] for check in checks),
        "environment": _environment(),
    }
    if compare_with:
        report["comparison"] = _comparison(*entries)
    write_json(report_path, report)
    return report


def _export_one(model, model_path, directory, dataset, quantize, int8_io, float_input, qat_epochs, representative,
                threads, seed, test, probabilities):
    """Exports one model. Its .tflite, fed the test images' pixels, is compared with the Keras model
    fed the images normalised by the data pipeline, as in training; the reloaded SavedModel with the
    Keras graph it was exported from (the pixel-input wrapper: the two normalisations round apart
    by about 1e-7)."""
    _check_fits(model, dataset, model_path)
    test_images, test_labels = test
    reference = _keras_outputs(model, convert.normalised(test_images, dataset.mean, dataset.std, bgr=dataset.bgr))
    if probabilities:
        reference = keras.ops.convert_to_numpy(keras.ops.softmax(reference))
    pixels = test_images.astype(convert.pixel_dtype(float_input))

    exported = convert.pixel_input_model(model, dataset.mean, dataset.std, float_input, bgr=dataset.bgr,
                                         probabilities=probabilities)
    saved_model = os.path.join(directory, SAVED_MODEL_DIR)
    convert.export_saved_model(exported, saved_model)
    served = convert.saved_model_outputs(saved_model, exported.inputs[0].name, pixels)
    keras_served = _keras_outputs(exported, pixels)
    served_diff = float(abs(served - keras_served).max())

    tflite = os.path.join(directory, TFLITE_FILE)
    if qat_epochs:
        tflite_bytes = tfmot_bridge.quantization_aware_int8(model, dataset, epochs=qat_epochs, seed=seed,
                                                            int8_io=int8_io, float_input=float_input,
                                                            representative=representative,
                                                            probabilities=probabilities)
    else:
        tflite_bytes = convert.convert_tflite(saved_model, quantize, representative, int8_io)
    convert.write_bytes(tflite, tflite_bytes)
    labels = os.path.join(directory, convert.LABELS_FILE)
    convert.write_labels(labels, dataset.class_names)
    runtime = verify.LiteRTModel(tflite, threads)
    outputs = runtime.predict(pixels)
    cost = count_model(model)
    input_dtype, output_dtype = runtime.io_dtypes
    shape_file = os.path.join(os.path.dirname(model_path), SHAPE_FILE)  # written beside a pruned model.keras
    provenance = load_shape(shape_file).provenance if os.path.exists(shape_file) else {}
    entry = {
        "model_path": os.path.abspath(model_path),
        "name": model.name,
        "output": "probabilities" if probabilities else "logits",
        "flops": cost.flops,
        "params": cost.params,
        "saved_model": {"path": os.path.abspath(saved_model),
                        "max_abs_diff": served_diff, "max_rel_diff": served_diff / float(abs(keras_served).max())},
        "labels": os.path.abspath(labels),
        "tflite": {"path": os.path.abspath(tflite), "size_bytes": os.path.getsize(tflite),
                   "input_dtype": input_dtype, "output_dtype": output_dtype,
                   **verify.parity(reference, outputs, test_labels)},
    }
    if "latency_ms" in provenance:  # a latency search's shape: its table's prediction, to set beside the measurement
        entry["predicted_latency"] = {"ms": provenance["latency_ms"], "table": provenance["latency_table"]}
    return entry, runtime


def _keras_outputs(model, images, batch_size=256):
    # Eager calls: model.predict would trace a new function for every model a process loads.
    return np.concatenate([keras.ops.convert_to_numpy(model(images[start:start + batch_size], training=False))
                           for start in range(0, len(images), batch_size)])


def _check_fits(model, dataset, path):
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"{path}: only single-input, single-output models are exported")
    image_shape, classes = tuple(model.input_shape[1:]), model.output_shape[-1]
    if image_shape != dataset.image_shape or classes != dataset.num_classes:
        raise ValueError(f"{path} takes {image_shape} images and predicts {classes} classes, but "
                         f"{dataset.name} has {dataset.image_shape} images of {dataset.num_classes} classes")


def _comparison(model, other):
    """`model` relative to `other`: below 1 is smaller / cheaper, a speed-up above 1 is faster."""
    flop_reduction = other["flops"] / model["flops"]
    speedup = other["latency_ms"]["median"] / model["latency_ms"]["median"]
    return {
        "flops_ratio": model["flops"] / other["flops"],
        "params_ratio": model["params"] / other["params"],
        "size_ratio": model["tflite"]["size_bytes"] / other["tflite"]["size_bytes"],
        "latency_speedup": speedup,
        # 1.0: latency fell exactly as much as FLOPs did.
        "speedup_per_flop_reduction": speedup / flop_reduction,
        "accuracy_difference": model["tflite"]["accuracy"] - other["tflite"]["accuracy"],
    }


def _environment():
    return {"tensorflow": tf.__version__, "keras": keras.__version__,
            "ai_edge_litert": importlib.metadata.version("ai-edge-litert"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}


def format_report(report):
    """The report as a table (one column per model), its checks and the comparison, for a terminal."""
    per_pixel = "mean_iou" in report["models"][0]["tflite"]  # a segmentation network's, tested on masks
    rows = [
        ("model file", lambda m: os.path.basename(m["model_path"])),
        ("network", lambda m: m["name"]),
        ("MFLOPs", lambda m: f"{m['flops'] / 1e6:.2f}"),
        ("params", lambda m: f"{m['params']:,}"),
        (f".tflite ({report['quantize']}) KB", lambda m: f"{m['tflite']['size_bytes'] / 1024:.1f}"),
        ("input / output", lambda m: f"{m['tflite']['input_dtype']} / {m['tflite']['output_dtype']}"),
        ("accuracy Keras", lambda m: f"{100 * m['tflite']['keras_accuracy']:.2f}%"),
        ("accuracy .tflite", lambda m: f"{100 * m['tflite']['accuracy']:.2f}%"),
        *([("mean IoU Keras", lambda m: f"{100 * m['tflite']['keras_mean_iou']:.2f}%"),
           ("mean IoU .tflite", lambda m: f"{100 * m['tflite']['mean_iou']:.2f}%")]
          if per_pixel else []),
        ("top-1 agreement", lambda m: f"{100 * m['tflite']['top1_agreement']:.2f}%"),
        ("max |diff| .tflite", lambda m: f"{m['tflite']['max_abs_diff']:.3g}"),
        ("  relative to max |logit|", lambda m: f"{m['tflite']['max_rel_diff']:.3g}"),
        ("max |diff| SavedModel", lambda m: f"{m['saved_model']['max_abs_diff']:.3g}"),
        ("latency median ms", lambda m: f"{m['latency_ms']['median']:.3f}"),
        ("latency p90 ms", lambda m: f"{m['latency_ms']['p90']:.3f}"),
        ("latency predicted ms", lambda m: f"{m['predicted_latency']['ms']:.3f} ({m['predicted_latency']['error']:+.0%})"
         if "predicted_latency" in m else "-"),
    ]
    models = report["models"]
    lines = [f"{'':<24}" + "".join(f"{m['role']:>18}" for m in models)]
    lines += [f"{label:<24}" + "".join(f"{cell(m):>18}" for m in models) for label, cell in rows]
    latency = report["latency"]
    lines.append(f"{report['dataset']} test split ({report['test_images']} images); latency: batch 1, "
                 f"{latency['threads']} threads, {latency['runs']} runs"
                 + (", interleaved" if latency["interleaved"] else ""))
    lines.append(f"input: {report['input']['pixels']} pixels, normalised inside the model; output: logits"
                 f"{' per pixel' if per_pixel else ''} "
                 f"of the classes in {convert.LABELS_FILE}"
                 + (f"; int8 by {report['qat_epochs']} epoch(s) of quantization-aware training"
                    if report["qat_epochs"] else ""))
    lines += [f"predicted: {m['role']}'s latency table, {m['predicted_latency']['table']['quantize']}, "
              f"{m['predicted_latency']['table']['threads']} thread(s)" for m in models if "predicted_latency" in m]
    if "comparison" in report:
        c = report["comparison"]
        lines.append(f"model vs compare_with: FLOPs x{c['flops_ratio']:.3f}, params x{c['params_ratio']:.3f}, "
                     f".tflite size x{c['size_ratio']:.3f}, latency speed-up {c['latency_speedup']:.2f}x "
                     f"({c['speedup_per_flop_reduction']:.2f} of the FLOP reduction), accuracy "
                     f"{100 * c['accuracy_difference']:+.2f} points")
    lines.append("checks:")
    lines += [f"  {'PASS' if c['passed'] else 'FAIL'}  {c['name']}: {c['value']:.4g} (must be {c['bound']} "
              f"{c['limit']:g})" for c in report["checks"]]
    return "\n".join(lines)
