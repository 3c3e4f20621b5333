"""Measures a latency table on this machine, for `--cost=latency` searches.

  python -m export.latency_table --model=mobilenet_v2 --image_size=128 --quantize=int8 --out=table.json

Every timed unit geometry of the model's search space (a layer with the BN and ReLU the converter folds
into it) at every (input width, output width) pair of its candidate widths, or at --grid widths per axis,
timed alone with LiteRT (XNNPACK, batch 1, --threads), plus the fixed cost of the exported form. Runs
wherever ai-edge-litert installs (run it on the device the model will run on); re-running the same
command continues an interrupted table. See tas_keras/export/layer_latency.py.
"""

import logging
import sys

from train import common_flags  # first: it quiets TensorFlow's logging before TensorFlow loads

from absl import flags  # noqa: E402
import keras  # noqa: E402

from tas_keras.export.layer_latency import RUNS, WARMUP, make_table  # noqa: E402
from tas_keras.graph_space import ADD_MODES  # noqa: E402
from tas_keras.latency import QUANTIZATIONS  # noqa: E402

_MODEL = flags.DEFINE_list("model", ["resnet20"], "Model(s) whose search space the table covers: registry names or "
                           ".keras files (the basic-block CIFAR ResNets at one input size share their geometries).")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", QUANTIZATIONS, "none (fp32) or int8, as the model will be "
                              "exported.")
_THREADS = flags.DEFINE_integer("threads", 1, "LiteRT threads, as the app will run the model.", lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "The table (JSON); an unfinished one with the same settings is "
                           "continued.", required=True)
_MULTIPLE = flags.DEFINE_integer("width_multiple", 1, "The search's --width_multiple (candidate widths rounded "
                                 "to multiples of this).", lower_bound=1)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classes of a registry network's classifier (a .keras model "
                                    "brings its own).", lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Input height and width of a registry network (default: "
                                   "its own, as train.search's; a .keras model brings its own).", lower_bound=1)
_GRID = flags.DEFINE_integer("grid", None, "Measure this many widths per axis of every geometry and interpolate "
                             "between them, instead of every width pair the space needs.", lower_bound=2)
_ADD_MODE = flags.DEFINE_enum("add_mode", None, ADD_MODES, "The search's --add_mode (default: its "
                              "default).")
_RUNS = flags.DEFINE_integer("runs", RUNS, "Timed invokes per layer (after the warm-up).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", WARMUP, "Untimed invokes per layer first.", lower_bound=0)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Measure afresh instead of continuing the table at --out.")
_NOTE = flags.DEFINE_string("note", "", "Recorded in the table: e.g. what else ran on the machine.")
FLAGS = flags.FLAGS


def main():
    logging.getLogger("absl").setLevel(logging.WARNING)  # TensorFlow logs lines per converted layer otherwise
    bar = None

    def progress(done, total):
        nonlocal bar
        bar = bar or keras.utils.Progbar(total, unit_name="layer")
        bar.update(done)

    table = make_table(FLAGS.out, models=_MODEL.value, quantize=_QUANTIZE.value, threads=_THREADS.value,
                       width_multiple=_MULTIPLE.value, num_classes=_NUM_CLASSES.value, image_size=_IMAGE_SIZE.value,
                       grid=_GRID.value, add_mode=_ADD_MODE.value, runs=_RUNS.value,
                       warmup=_WARMUP.value, note=_NOTE.value, overwrite=_OVERWRITE.value, progress=progress)
    entries = sum(len(entry["times"]) for entry in table["entries"].values())
    print(f"{FLAGS.out}: {entries} entries in {len(table['entries'])} geometries, fixed cost "
          f"{table['fixed']['ms']:.4f} ms", file=sys.stderr)


if __name__ == "__main__":
    common_flags.run(main)
