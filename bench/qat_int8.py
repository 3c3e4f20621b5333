"""How much accuracy does int8 cost a pruned model, with post-training calibration and with
quantization-aware training (QAT)?

  python -m bench.qat_int8 --model=runs/quickstart/distill/model.keras \
      --test_dataset=../shared/data/cifar10-jpeg.zip [--qat_epochs=1,3]

The model is exported as train.prune exports it (uint8 pixels in, the normalisation inside) with
--quantize=int8, once calibrated post-training and once per --qat_epochs value fine-tuned with QAT
(tas_keras/export/tfmot_bridge.py; needs requirements-tfmot.txt). Calibration, QAT fine-tuning and the
normalisation use --train_dataset, the data the model was trained on; accuracies are measured on the
test split of --test_dataset (the full CIFAR-10 test split: 10,000 images), for Keras (float) and for
the .tflite under LiteRT. Writes bench/results/qat_int8.json.
"""

import dataclasses
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

from absl import app, flags
import keras
import tensorflow as tf

from tas_keras.export.exporter import export_and_verify
from tas_keras import data
from tas_keras.runs import write_json

_MODEL = flags.DEFINE_string("model", None, "The trained model (.keras) to quantise.", required=True)
_TRAIN = flags.DEFINE_string("train_dataset", data.BUNDLED_DATASET, "The data the model was trained on.")
_TEST = flags.DEFINE_string("test_dataset", None, "Whose test split measures accuracy (default: "
                            "--train_dataset's).")
_QAT_EPOCHS = flags.DEFINE_list("qat_epochs", ["1", "3"], "QAT fine-tuning epochs to measure.")
_OUT = flags.DEFINE_string("out", str(pathlib.Path(__file__).parent / "results" / "qat_int8.json"),
                           "JSON path.")


def _measured(report, seconds):
    (entry,) = report["models"]
    tflite = entry["tflite"]
    return {"keras_accuracy": tflite["keras_accuracy"], "int8_accuracy": tflite["accuracy"],
            "accuracy_drop_points": round(100 * tflite["accuracy_drop"], 2),
            "top1_agreement": tflite["top1_agreement"], "size_bytes": tflite["size_bytes"],
            "latency_ms_median": entry["latency_ms"]["median"], "checks_passed": report["passed"],
            "wall_time_s": round(seconds, 1)}


def main(argv):
    del argv
    dataset = data.load_dataset(_TRAIN.value)
    if _TEST.value:
        test = data.load_dataset(_TEST.value)
        if test.class_names != dataset.class_names:
            raise app.UsageError(f"{_TEST.value} has classes {test.class_names}, the model {dataset.class_names}")
        dataset = dataclasses.replace(dataset, test_images=test.test_images, test_labels=test.test_labels)
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for qat_epochs in [0, *map(int, _QAT_EPOCHS.value)]:  # post-training first: QAT imports TFMOT
            start = time.perf_counter()
            report = export_and_verify(os.path.join(workdir, str(qat_epochs)), model_path=_MODEL.value,
                                       quantize="int8", qat_epochs=qat_epochs, latency_runs=100,
                                       dataset_name=dataset)
            name = f"qat_{qat_epochs}_epochs" if qat_epochs else "post_training"
            results[name] = _measured(report, time.perf_counter() - start)
            print(name, json.dumps(results[name]), flush=True)
    result = {
        "what": "int8 accuracy drop of a pruned model: post-training calibration vs quantization-aware training",
        "command": "python -m bench.qat_int8 " + " ".join(sys.argv[1:]),
        "model": os.path.abspath(_MODEL.value),
        "train_dataset": _TRAIN.value,
        "test_dataset": _TEST.value or _TRAIN.value,
        "test_images": len(dataset.test_labels),
        "results": results,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, TF {tf.__version__}, Keras {keras.__version__}",
    }
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    write_json(_OUT.value, result)


if __name__ == "__main__":
    app.run(main)
