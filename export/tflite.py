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
from tas_keras.export.exporter import OUTPUTS, ExportConfig as Defaults, format_report  # noqa: E402
from tas_keras import api  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "The trained model (.keras) to export.", required=True)
_OUT = flags.DEFINE_string("out", None, "Directory for saved_model/, model.tflite and report.json.",
                           required=True)
flags.DEFINE_enum("quantize", Defaults.quantize, QUANTIZATIONS,
                  "none (fp32) | float16 | dynamic (int8 weights) | int8 (full integer).")
flags.DEFINE_bool("int8_io", Defaults.int8_io, "With --quantize=int8: an int8 output tensor instead of "
                  "float32 (and, with --float_input, an int8 input tensor).")
flags.DEFINE_bool("float_input", Defaults.float_input, "Take float32 pixels in 0-255 instead of uint8 ones.")
flags.DEFINE_integer("qat_epochs", Defaults.qat_epochs, "With --quantize=int8: fine-tune this many epochs with "
                     "quantization-aware training (needs requirements-tfmot.txt) instead of post-training "
                     "calibration.", lower_bound=0)
flags.DEFINE_integer("representative_size", Defaults.representative_size,
                     "Training images that calibrate int8 activations.", lower_bound=1)
_DATASET = flags.DEFINE_string("dataset", Defaults.dataset_name,
                               "Data for calibration and verification: cifar10 | cifar100 | "
                               f"{Defaults.dataset_name} | a folder or .zip of class folders.")
flags.DEFINE_string("data_dir", Defaults.data_dir, "Where tensorflow-datasets keeps cifar10/cifar100.")
flags.DEFINE_integer("threads", Defaults.threads, "LiteRT CPU threads.", lower_bound=1)
flags.DEFINE_integer("latency_runs", Defaults.latency_runs, "Timed batch-1 invokes (after warm-up).",
                     lower_bound=1)
_COMPARE_WITH = flags.DEFINE_string("compare_with", Defaults.compare_with, "Another model (.keras), e.g. the "
                                    "unpruned base, exported and measured side by side.")
flags.DEFINE_enum("output", Defaults.output, OUTPUTS, "What the exported models output: logits, probabilities "
                  "(a softmax after the logits) or auto: as each model file, which keeps the final softmax it "
                  "ends in.")

common_flags.define_input_convention_flag()
FLAGS = flags.FLAGS

# The flags that set an ExportConfig setting (`common_flags.given_settings`); --model, --out, --dataset,
# --compare_with and --quantize (always: api.export's own default is int8) are read apart.
SETTING_FLAGS = ("int8_io", "float_input", "qat_epochs", "representative_size", "data_dir", "threads",
                 "latency_runs", "output", "input_convention")


def main(tolerances=None):
    report = api.export(_MODEL.value, _DATASET.value, _OUT.value, compare_with=_COMPARE_WITH.value,
                        quantize=FLAGS.quantize, tolerances=tolerances,
                        **common_flags.given_settings(SETTING_FLAGS))
    print(format_report(report))
    failed = [check["name"] for check in report["checks"] if not check["passed"]]
    if failed:
        print(f"error: {len(failed)} check(s) failed: {', '.join(failed)} (see {_OUT.value}/report.json)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    common_flags.run(main)
