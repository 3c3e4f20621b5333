"""Exports a trained model to SavedModel and TFLite and verifies the .tflite with LiteRT.

  python -m export.tflite --model=runs/base/model.keras --out=runs/base/export --quantize=int8
  python -m export.tflite --model=runs/pruned/model.keras --compare_with=runs/base/model.keras --out=...

Writes <out>/saved_model/, <out>/model.tflite, <out>/labels.txt and <out>/report.json (with
--compare_with also <out>/compare/), prints the report as a table and exits with status 1 if a check
failed. The exported models take RGB pixels (uint8; float32 0-255 with --float_input) and normalise
them inside with the mean/std of --dataset, which must be the data the model was trained on.
"""

import sys

from train import common_flags  # first: it quiets TensorFlow's logging before TensorFlow loads

from absl import flags  # noqa: E402

from tas_keras.export.convert import QUANTIZATIONS  # noqa: E402
from tas_keras.export.exporter import OUTPUTS, format_report  # noqa: E402
from tas_keras import api  # noqa: E402
from tas_keras.data import BUNDLED_DATASET  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "The trained model (.keras) to export.", required=True)
_OUT = flags.DEFINE_string("out", None, "Directory for saved_model/, model.tflite and report.json.",
                           required=True)
_QUANTIZE = flags.DEFINE_enum("quantize", "none", QUANTIZATIONS,
                              "none (fp32) | float16 | dynamic (int8 weights) | int8 (full integer).")
_INT8_IO = flags.DEFINE_bool("int8_io", False, "With --quantize=int8: an int8 output tensor instead of "
                             "float32 (and, with --float_input, an int8 input tensor).")
_FLOAT_INPUT = flags.DEFINE_bool("float_input", False, "Take float32 pixels in 0-255 instead of uint8 ones.")
_QAT_EPOCHS = flags.DEFINE_integer("qat_epochs", 0, "With --quantize=int8: fine-tune this many epochs with "
                                   "quantization-aware training (needs requirements-tfmot.txt) instead of "
                                   "post-training calibration.", lower_bound=0)
_REPRESENTATIVE_SIZE = flags.DEFINE_integer("representative_size", 300,
                                            "Training images that calibrate int8 activations.", lower_bound=1)
_DATASET = flags.DEFINE_string("dataset", BUNDLED_DATASET,
                               "Data for calibration and verification: cifar10 | cifar100 | "
                               f"{BUNDLED_DATASET} | a folder or .zip of class folders.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where tensorflow-datasets keeps cifar10/cifar100.")
_THREADS = flags.DEFINE_integer("threads", 2, "LiteRT CPU threads.", lower_bound=1)
_LATENCY_RUNS = flags.DEFINE_integer("latency_runs", 200, "Timed batch-1 invokes (after warm-up).",
                                     lower_bound=1)
_COMPARE_WITH = flags.DEFINE_string("compare_with", None, "Another model (.keras), e.g. the unpruned "
                                    "base, exported and measured side by side.")
_OUTPUT = flags.DEFINE_enum("output", "auto", OUTPUTS, "What the exported models output: logits, probabilities "
                            "(a softmax after the logits) or auto: as each model file, which keeps the final "
                            "softmax it ends in.")

common_flags.define_input_convention_flag()
FLAGS = flags.FLAGS


def main(tolerances=None):
    report = api.export(_MODEL.value, _DATASET.value, _OUT.value, quantize=_QUANTIZE.value,
                        compare_with=_COMPARE_WITH.value, int8_io=_INT8_IO.value, float_input=_FLOAT_INPUT.value,
                        qat_epochs=_QAT_EPOCHS.value, representative_size=_REPRESENTATIVE_SIZE.value,
                        data_dir=_DATA_DIR.value, threads=_THREADS.value, latency_runs=_LATENCY_RUNS.value,
                        tolerances=tolerances, input_convention=FLAGS.input_convention, output=_OUTPUT.value)
    print(format_report(report))
    failed = [check["name"] for check in report["checks"] if not check["passed"]]
    if failed:
        print(f"error: {len(failed)} check(s) failed: {', '.join(failed)} (see {_OUT.value}/report.json)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    common_flags.run(main)
