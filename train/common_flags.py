"""Flags every stage CLI shares, and the wrapper that turns bad input into one readable line."""

import logging
import os
import sys

if "--verbose" not in sys.argv:  # before TensorFlow is imported, or its C++ logging is already set up
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from tas_keras.data import BUNDLED_DATASET, STREAMING  # noqa: E402
from tas_keras.distribute import STRATEGIES  # noqa: E402
from tas_keras.graph_space import ADD_MODES  # noqa: E402
from tas_keras.input_convention import CONVENTIONS  # noqa: E402
from tas_keras.precision import MIXED_PRECISION  # noqa: E402
from tas_keras.configs import CHECKPOINT_STEPS  # noqa: E402
from tas_keras.training import DivergenceError  # noqa: E402

flags.DEFINE_bool("verbose", False, "Show TensorFlow's own log messages (read before flags are parsed).")
flags.DEFINE_enum("strategy", "auto", list(STRATEGIES),
                  "auto: all visible GPUs if several, else one device; mirrored: MirroredStrategy; "
                  "multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG. --batch_size is global.")


def define_common_flags(epochs, batch_size, dataset=BUNDLED_DATASET):
    """The flags of every stage CLI; `epochs=None` for a CLI that runs several stages (no --epochs)."""
    flags.DEFINE_string("out", None, "Run directory: every artifact of the stage goes here.", required=True)
    flags.DEFINE_string("dataset", dataset,
                        f"cifar10 | cifar100 | imagenette | imagenet2012 (tensorflow-datasets) | {BUNDLED_DATASET} "
                        "(bundled, offline) | a folder or .zip of class folders (train/<class>/* and val/<class>/*, "
                        "validation/ or test/; or just <class>/*).")
    flags.DEFINE_string("data_dir", None, "Where tensorflow-datasets keeps its prepared sets (never downloaded "
                        "except cifar10/cifar100).")
    # No bounds here: load_dataset's check gives the one-line error that quotes the value.
    flags.DEFINE_integer("image_size", None, "Train and test on image_size x image_size crops: random resized "
                         "crops + flip for training, resize + centre crop for testing, from images of any size. "
                         "Default: a .keras model's (or a shape file's) own input side; for a registry network, "
                         "CIFAR-sized images (<= 64 px) at their own size with the CIFAR augmentation, larger "
                         "ones and imagenette/imagenet2012 at 224.")
    flags.DEFINE_enum("streaming", "auto", list(STREAMING), "With the crops of --image_size: auto holds the "
                      "decoded images in memory when they fit a quarter of the machine's memory, else decodes "
                      "them from their files at every epoch; always / never force either.")
    flags.DEFINE_integer("batch_size", batch_size, "Global batch size.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed of data order, augmentation, init and splits.", lower_bound=0)
    flags.DEFINE_integer("max_train_examples", None, "Use at most this many training images (quick runs).",
                         lower_bound=1)
    if epochs is not None:
        flags.DEFINE_integer("epochs", epochs, "Training epochs.", lower_bound=1)
        flags.DEFINE_integer("checkpoint_steps", CHECKPOINT_STEPS, "Back the training state up every this "
                             "many steps (and every epoch): a killed run resumes from there.", lower_bound=1)
    flags.DEFINE_bool("overwrite", False, "Replace what --out holds instead of refusing or resuming.")


def define_mixed_precision_flag():
    """--mixed_precision, for the CLIs that train."""
    flags.DEFINE_enum("mixed_precision", None, list(MIXED_PRECISION),
                      "Train with float32 variables and bfloat16 or float16 compute (GPUs with tensor cores; "
                      "mixed_float16 scales the losses). Default: float32. Saved models are float32.")


def define_cost_flags(target_help):
    """--cost, --target_flops_ratio and the latency cost's flags (`cost_target` reads them)."""
    flags.DEFINE_enum("cost", "flops", ["flops", "params", "latency"], "What the target constrains: FLOPs, "
                      "parameters, or the latency in --latency_table.")
    flags.DEFINE_float("target_flops_ratio", 0.5, target_help)
    flags.DEFINE_string("latency_table", None, "With --cost=latency: a table made on the target device by "
                        "`python -m export.latency_table` (its quantisation and threads).")
    flags.DEFINE_float("target_latency_ratio", None, "With --cost=latency: keep this fraction of the full "
                       "network's latency in the table (default 0.5).")
    flags.DEFINE_float("target_latency_ms", None, "With --cost=latency: the target latency in ms instead of a "
                       "ratio.")


def define_input_convention_flag():
    flags.DEFINE_enum("input_convention", None, list(CONVENTIONS),
                      "The pixels the model was trained on: dataset (the data's mean/std, how this project trains "
                      "from scratch) | raw (0-255) | unit ([0, 1]) | symmetric ([-1, 1]) | lite ((x - 127) / 128) | "
                      "imagenet (ImageNet mean/std) | caffe (BGR minus the ImageNet means). Default: raw for a model "
                      "that starts with a Rescaling or "
                      "Normalization layer, else dataset.")


def define_add_mode_flag():
    flags.DEFINE_enum("add_mode", None, list(ADD_MODES), "How the inputs of an Add are searched: tied (one width, "
                      "no layer added to the model) or independent (free widths, a 1x1 projection where they "
                      "differ). Default: independent for the CIFAR ResNets (the reference), tied for other models.")


def cost_target(cost):
    """(target ratio, target ms or None) of the cost flags for `cost` (--cost, or a preset's); a ValueError
    for flags that do not say one target."""
    f = flags.FLAGS
    if cost != "latency":
        given = [name for name in ("latency_table", "target_latency_ratio", "target_latency_ms") if f[name].present]
        if given:
            raise ValueError(f"--{given[0]} is for --cost=latency, got --cost={cost}")
        return f.target_flops_ratio, None
    if f["target_flops_ratio"].present:
        raise ValueError("--cost=latency takes --target_latency_ratio or --target_latency_ms, not "
                         "--target_flops_ratio")
    if f.target_latency_ratio is not None and f.target_latency_ms is not None:
        raise ValueError("give --target_latency_ratio or --target_latency_ms, not both")
    return (0.5 if f.target_latency_ratio is None else f.target_latency_ratio), f.target_latency_ms


# The stage settings (config fields, `tas_keras.configs`) of the flags whose names differ from them.
SETTING_OF_FLAG = {"dataset": "dataset_name", "model": "model_name", "cost": "cost_metric",
                   "target_flops_ratio": "target_ratio", "kd_alpha": "alpha", "kd_temperature": "temperature",
                   "num_candidates": "count", "quantize": "quantizations", "teacher": "teacher_path"}


def given_settings(flag_names):
    """{setting: value} of the flags among `flag_names` given on the command line, to override a stage
    config (`StageConfig.replace`): a flag left at its default keeps the config's (or a preset's) value."""
    f = flags.FLAGS
    return {SETTING_OF_FLAG.get(name, name): f[name].value for name in flag_names if f[name].present}


def run(main, positional=None):
    """absl's app.run, with ValueError (bad shape, data, flags, a run directory in use) printed as
    one line, exit status 2, and a diverged training as one line, exit status 1 (the traceback with
    --verbose).

    `positional`: what the command's positional arguments are (e.g. "IMAGE..."); main then takes
    them as a list. Without it, positional arguments are refused."""

    def guarded(argv):
        arguments = argv[1:]
        if arguments and not positional:
            raise app.UsageError(f"unexpected arguments: {' '.join(arguments)}")
        if positional and not arguments:
            raise app.UsageError(f"expected {positional}")
        logging.getLogger().setLevel(logging.INFO)
        try:
            if positional:
                main(arguments)
            else:
                main()
        except (ValueError, DivergenceError) as error:
            if flags.FLAGS.verbose:
                raise
            if isinstance(error, DivergenceError):
                print(flush=True)  # ends the progress bar's line that fit was drawing
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2 if isinstance(error, ValueError) else 1)

    app.run(guarded)
