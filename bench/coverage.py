"""Which CNN families the tool takes: every keras.applications classification family (and the registry's
EfficientNet-Lite0), built with random weights at a small input and 10 classes, read, derived, counted
and pruned end to end (issue 23, item 5).

  python -m bench.coverage [--noprune] [--families=ResNet50,MobileNetV2] [--refresh]
  python -m bench.coverage --table [--compact]

Each family is built as a user would save it (`keras.applications.<Family>(weights=None, classes=10,
input_shape=(s, s, 3))`, ending in its softmax; s is --image_size or the family's minimum when larger:
InceptionV3 75, Xception 71) and, in its own subprocess (so memory does not pile up), gives:
  read         `tas_keras.graph.read_model` of the logits model (`graph.load_model` takes the softmax off, as
               the pipeline does), or the refusal's one line (UnsupportedModelError);
  widths       searchable slots, searchable convs / all convs (Conv2D, SeparableConv2D, Dense on a feature
               map: the layers whose rule opens a slot as a conv, and grouped Conv2Ds, which follow their
               input's slot in whole groups; a conv is searchable when its output slot is), and why the
               other convs keep their full width (reasons with the layer name left off);
  depth        the stages of droppable blocks (`space.stages`) and their block counts;
  derive       the max |output difference| of `derive.derive_model` at the full shape from the logits
               model, absolute and relative to the max |output|, on 2 random images (0-255), after every
               BatchNormalization (and Layer/GroupNormalization) got random statistics and affine
               weights, and every LayerScale a random scale: untrained keras.applications outputs are
               ~1e-10 (and ConvNeXt's blocks scaled by 1e-6) and would make it vacuous. It must be
               <= 1e-5 relative;
  flops        `cost.count_shape` of the full shape (multiply-accumulates, as the project counts) and
               of the uniform 50% shape (`baselines.predefined_shape(space, 0.5)`), with its ratio and
               width ratio, and the FLOPs ratio of the smallest shape the search space expresses (where
               it is above the target, train.prune refuses the target);
  prune        (--prune) whether `tas_keras.prune.run_prune` runs end to end on the model saved as a
               .keras file and a tiny synthetic image folder at its input size (10 classes x 4 train
               + 2 test random PNGs; base, search and distill epochs 1, batch 8, the fp32 export only,
               check_base=False, --max_train_examples): ok, or the error's last line, and its wall time.

keras.applications of Keras 3 has no RegNet (tf.keras 2 had it): RegNetX002 is tf.keras's layout (stem,
4 stages of X blocks with grouped 3x3 convs of group width 8, depths 1, 1, 4, 7, widths 24, 56, 152,
368) rebuilt here with Keras 3 layers (an Add for its `x + skip`).

Writes bench/results/coverage.json. A family already there is skipped unless --refresh (which with
--noprune keeps its recorded prune part); with --prune, a family recorded without its prune part gets only
that part run. Each part records its commit and the library files that differed from it, since the tool
changes as rules land. `--table` prints the results as markdown (`--compact`: the README's family table).
"""

import collections
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import keras
from keras.src.applications.convnext import LayerScale  # Keras exports ConvNeXt's layers only inside it
import numpy as np

from bench.provenance import provenance
from tas_keras.runs import read_json, write_json

RESULTS = os.path.join(os.path.dirname(__file__), "results", "coverage.json")
CLASSES = 10
TOLERANCE = 1e-5  # relative max |output difference| of the full shape
A = keras.applications
# name: (builder taking input_shape and classes, the smallest input side it builds at)
FAMILIES = {
    "ResNet50": (A.ResNet50, 32),
    "ResNet50V2": (A.ResNet50V2, 32),
    "MobileNet": (A.MobileNet, 32),
    "MobileNetV2": (A.MobileNetV2, 32),
    "MobileNetV3Small": (A.MobileNetV3Small, 32),
    "MobileNetV3Large": (A.MobileNetV3Large, 32),
    "EfficientNetB0": (A.EfficientNetB0, 32),
    "EfficientNetV2B0": (A.EfficientNetV2B0, 32),
    "DenseNet121": (A.DenseNet121, 32),
    "InceptionV3": (A.InceptionV3, 75),
    "Xception": (A.Xception, 71),
    "NASNetMobile": (A.NASNetMobile, 32),
    "ConvNeXtTiny": (A.ConvNeXtTiny, 32),
    "RegNetX002": (lambda **kwargs: regnet_x002(**kwargs), 32),
    "efficientnet_lite0": (lambda **kwargs: lite0(**kwargs), 32),
}

_FAMILIES = flags.DEFINE_list("families", list(FAMILIES), "The families to run, of " + ", ".join(FAMILIES) + ".")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Input side (a family's minimum when that is larger).")
_PRUNE = flags.DEFINE_bool("prune", True, "Also run train.prune end to end on tiny data (minutes a family).")
_MAX_TRAIN = flags.DEFINE_integer("max_train_examples", 40, "train.prune's --max_train_examples.")
_REFRESH = flags.DEFINE_bool("refresh", False, "Run the families already in the results file again.")
_RESULTS = flags.DEFINE_string("results", RESULTS, "The results file.")
_TABLE = flags.DEFINE_bool("table", False, "Only print the results file's table (markdown) and exit.")
_COMPACT = flags.DEFINE_bool("compact", False, "With --table: the README's family table.")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 3600, "A family's subprocess is stopped after this long.")
_WORKER = flags.DEFINE_string("worker", None, "(internal) Run one family in this process.")
_PARTS = flags.DEFINE_list("parts", ["read"], "(internal) The worker's parts: read, prune.")
_WORKER_OUT = flags.DEFINE_string("worker_out", None, "(internal) Where the worker writes its entry.")


def regnet_x002(input_shape, classes, weights=None):
    """tf.keras 2's keras.applications.RegNetX002 (random weights), with Keras 3 layers."""
    assert weights is None
    L, name = keras.layers, "regnetx002"

    def conv_bn(x, filters, kernel, prefix, strides=1, groups=1, relu=True):
        x = L.Conv2D(filters, kernel, strides=strides, groups=groups, padding="same", use_bias=False,
                     kernel_initializer="he_normal", name=prefix)(x)
        x = L.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{prefix}_bn")(x)
        return L.ReLU(name=f"{prefix}_relu")(x) if relu else x

    image = keras.Input(shape=input_shape)
    x = L.Rescaling(1.0 / 255.0, name=f"{name}_prestem_rescaling")(image)
    x = conv_bn(x, 32, 3, f"{name}_stem_conv", strides=2)
    for stage, (depth, width) in enumerate(zip((1, 1, 4, 7), (24, 56, 152, 368))):
        for index in range(depth):
            prefix, stride = f"{name}_Stage_{stage}_XBlock_{index}", 2 if index == 0 else 1
            skip = x if stride == 1 else conv_bn(x, width, 1, f"{prefix}_skip_1x1", strides=stride, relu=False)
            y = conv_bn(x, width, 1, f"{prefix}_conv_1x1_1")
            y = conv_bn(y, width, 3, f"{prefix}_conv_3x3", strides=stride, groups=width // 8)
            y = conv_bn(y, width, 1, f"{prefix}_conv_1x1_2", relu=False)
            x = L.ReLU(name=f"{prefix}_exit_relu")(L.Add(name=f"{prefix}_add")([y, skip]))
    x = L.GlobalAveragePooling2D(name=f"{name}_head_gap")(x)
    x = L.Dense(classes, activation="softmax", name=f"{name}head_dense")(x)
    return keras.Model(image, x, name=name)


def lite0(input_shape, classes, weights=None):
    from tas_keras.models.registry import build_model
    return build_model("efficientnet_lite0", input_shape, classes, weights)


def input_size(family, image_size):
    return max(image_size, FAMILIES[family][1])


def build_family(family, image_size):
    """The family's network, random weights, ending as it ends (keras.applications: in a softmax)."""
    side = input_size(family, image_size)
    keras.utils.set_random_seed(0)
    return FAMILIES[family][0](weights=None, input_shape=(side, side, 3), classes=CLASSES)


def _layers(model):
    return model._flatten_layers(include_self=False, recursive=True)


def with_statistics(model, seed=0):
    """Every BatchNormalization gets random moving statistics and affine weights, every Layer/Group
    normalisation random affine weights (as tests/test_derive.py's `_with_statistics`), every LayerScale
    (ConvNeXt's, 1e-6 as built) a random scale."""
    rng = np.random.default_rng(seed)
    for layer in _layers(model):
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
                              keras.layers.GroupNormalization, LayerScale)):
            if isinstance(layer, keras.layers.BatchNormalization):
                channels = layer.moving_mean.shape[0]
                layer.moving_mean.assign(rng.normal(0, 0.5, channels))
                layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
            if getattr(layer, "gamma", None) is not None:
                layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
            if getattr(layer, "beta", None) is not None:
                layer.beta.assign(rng.normal(0, 0.2, layer.beta.shape))
    return model


def _reason_kind(reason, layer_names):
    """A fixed slot's reason without the layer it names ("mixed0 (Concatenate) reads it" -> "(Concatenate)
    reads it"), so that reasons of the same kind count together."""
    first, _, rest = reason.partition(" ")
    return rest if first in layer_names and rest else reason


def _is_conv(layer):
    """Whether a GraphLayer is a conv layer (`LayerRule.conv_layer`: Conv2D, grouped too, SeparableConv2D,
    Conv2DTranspose, a Dense on a feature map: a 1x1 conv) on a feature map; not a Dense on a vector, which
    has no kernel size, nor a DepthwiseConv2D."""
    from tas_keras.layer_rules import rule_for
    return rule_for(layer).conv_layer and bool(layer.kernel)


def read_and_derive(model):
    """The read part of a family's entry, from its model as built (`build_family`)."""
    from tas_keras.graph import load_model, read_model
    from tas_keras.layer_rules import UnsupportedModelError

    logits = load_model(with_statistics(model))
    start = time.perf_counter()
    try:
        space = read_model(logits)
    except UnsupportedModelError as error:
        return {"read": False, "refusal": str(error), "read_seconds": round(time.perf_counter() - start, 3)}
    except Exception as error:  # noqa: BLE001 - anything but UnsupportedModelError is a reader bug
        return {"read": False, "error": _last_line(error)}
    entry = {"read": True, "read_seconds": round(time.perf_counter() - start, 3)}
    slots = {slot.name: slot for slot in space.slots}
    convs = [layer for layer in space.layers if _is_conv(layer)]
    names = {layer.name for layer in space.layers}
    fixed = collections.Counter(_reason_kind(slots[c.out_slot].fixed_reason, names) for c in convs
                                if not slots[c.out_slot].searchable)
    entry.update({
        "searchable_slots": len(space.searchable_slots), "slots": len(space.slots),
        "searchable_convs": sum(slots[c.out_slot].searchable for c in convs), "convs": len(convs),
        "fixed_conv_reasons": dict(fixed.most_common()),
        "stages": {stage.name: stage.num_blocks for stage in space.stages},
    })
    entry["derive"] = _part(lambda: derive(logits, space))
    entry["flops"] = _part(lambda: flops(space))
    return entry


def _part(compute):
    """`compute()`, or the error's last line: a part that fails is recorded and the others still run."""
    try:
        return compute()
    except Exception as error:  # noqa: BLE001 - the table records what failed
        return {"error": _last_line(error)}


def derive(logits, space):
    """The full shape's derived network against `logits`, on 2 random images."""
    from tas_keras.derive import derive_model

    start = time.perf_counter()
    derived = derive_model(logits, space, space.full_shape())
    images = np.random.default_rng(1).uniform(0, 255, (2, *logits.input_shape[1:])).astype("float32")
    original = np.asarray(logits(images, training=False))
    difference = float(np.max(np.abs(np.asarray(derived(images, training=False)) - original)))
    scale = float(np.max(np.abs(original)))
    relative = difference / scale if scale else float("inf")
    return {"max_abs_difference": difference, "max_abs_output": scale, "relative": relative,
            "ok": relative <= TOLERANCE,
            "layers_equal": [layer.name for layer in derived.layers] == [layer.name for layer in logits.layers],
            "seconds": round(time.perf_counter() - start, 2)}


def flops(space):
    """Multiply-accumulates of the full shape and of the uniform 50% shape (any uniform width ratio, as the
    pre-defined baseline takes it), and the ratio of the smallest shape of the search space (every slot at
    its smallest candidate, every stage at its smallest depth: what a search can reach)."""
    from tas_keras.baselines import predefined_shape
    from tas_keras.cost import count_shape

    full = count_shape(space, space.full_shape())
    result = {"full": full.flops, "params": full.params,
              "smallest_ratio": round(count_shape(space, space.smallest_shape()).flops / full.flops, 4)}
    try:
        _, shape = predefined_shape(space, 0.5)
        result["uniform_50"] = {"flops": shape["flops"], "ratio": round(shape["flops_ratio"], 4),
                                "width_ratio": round(shape["width_ratio"], 4)}
    except ValueError as error:
        result["uniform_50"] = {"error": _last_line(error)}
    return result


def tiny_folder(root, size, classes=CLASSES, train=4, test=2):
    """Class folders of random PNGs (train/ and test/), as tests/test_prune.py's `_tiny_folder`."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for label in range(classes):
            folder = os.path.join(root, split, f"class{label}")
            os.makedirs(folder)
            for index in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                pixels[..., label % 3] //= 4  # a colour cue
                keras.utils.save_img(os.path.join(folder, f"{index}.png"), pixels)
    return root


def _last_line(error):
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def prune(model, max_train_examples):
    """The prune part of a family's entry: tas_keras.prune.run_prune on the model saved as a .keras file."""
    from tas_keras.prune import run_prune

    side = model.input_shape[1]
    with tempfile.TemporaryDirectory(prefix="coverage_") as tmp:
        path = os.path.join(tmp, f"{model.name}.keras")
        model.save(path)
        dataset = tiny_folder(os.path.join(tmp, "data"), side)
        start = time.perf_counter()
        try:
            report = run_prune(os.path.join(tmp, "run"), model_name=path, target_ratio=0.5, dataset_name=dataset,
                               base_epochs=1, search_epochs=1, distill_epochs=1, batch_size=8,
                               quantizations=("none",), check_base=False, max_train_examples=max_train_examples)
            result = {"ok": True, "flops_ratio": round(report["pruned"]["flops"] / report["base"]["flops"], 4),
                      "checks_passed": report["checks_passed"]}
        except Exception as error:  # noqa: BLE001 - the table records what a user would see
            result = {"ok": False, "error": _last_line(error)}
        result["wall_time_s"] = round(time.perf_counter() - start, 1)
    return result


def run_worker(family, parts, image_size, max_train_examples):
    import tas_keras.derive  # noqa: F401 - the library as it is when the provenance is read
    if "prune" in parts:
        import tas_keras.prune  # noqa: F401
    model = build_family(family, image_size)
    entry = {}
    if "read" in parts:
        entry = {"input_size": model.input_shape[1], "date": datetime.date.today().isoformat(),
                 **provenance(), **read_and_derive(model)}
        model = build_family(family, image_size)  # the prune part starts from the weights as built
    if "prune" in parts:
        entry["prune"] = {**prune(model, max_train_examples), "date": datetime.date.today().isoformat(),
                          **provenance()}
    return entry


def _in_subprocess(family, parts):
    """Runs the family's parts in a subprocess; its entry (or why there is none)."""
    with tempfile.TemporaryDirectory(prefix="coverage_worker_") as tmp:
        out = os.path.join(tmp, "entry.json")
        command = [sys.executable, "-m", "bench.coverage", f"--worker={family}", f"--parts={','.join(parts)}",
                   f"--image_size={_IMAGE_SIZE.value}", f"--max_train_examples={_MAX_TRAIN.value}",
                   f"--worker_out={out}"]
        try:
            code = subprocess.run(command, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  timeout=_TIMEOUT.value).returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {_TIMEOUT.value} s"
        if os.path.exists(out):
            return read_json(out)
    failure = f"the family's subprocess ended without an entry (exit {code})"
    return {"prune": {"ok": False, "error": failure}} if parts == ["prune"] else {"read": False, "error": failure}


# --- tables --------------------------------------------------------------------------------------------------

def _stages(entry):
    blocks = list(entry.get("stages", {}).values())
    return f"{len(blocks)} ({', '.join(map(str, blocks))})" if blocks else "0"


def _prune_cell(entry, details=True):
    result = entry.get("prune")
    if result is None:
        return "not run"
    if result["ok"]:
        return f"ok, {result['wall_time_s']:.0f} s" if details else "ok"
    if not details:
        return "no"
    seen = entry.get("refusal") or entry.get("error") or entry.get("derive", {}).get("error")
    return "no: the same " + ("refusal" if "refusal" in entry else "error") if seen and seen in result["error"] \
        else f"no: {result['error']}"


def _read_cell(entry):
    return "yes" if entry.get("read") else "refused" if "refusal" in entry else "error"


def _derive_cell(derive):
    if "error" in derive:
        return f"fails: {derive['error']}"
    return f"{derive['max_abs_difference']:.1e} ({derive['relative']:.1e})" + ("" if derive["ok"] else " > 1e-5")


def _flops_cells(flops, derive):
    if "error" in flops:
        return ["-", "fails: the same error" if flops["error"] == derive.get("error") else f"fails: {flops['error']}",
                "-"]
    shape = flops["uniform_50"]
    return [f"{flops['full'] / 1e6:.1f}",
            f"{shape['flops'] / 1e6:.1f} ({shape['ratio']:.3f}) at width x{shape['width_ratio']:.2f}"
            if "ratio" in shape else shape["error"], f"{flops['smallest_ratio']:.3f}" if "smallest_ratio" in flops
            else "-"]


def _note(entry):
    if not entry.get("read"):
        return entry.get("refusal") or entry.get("error", "")
    return "; ".join(f"{count} conv{'s' * (count > 1)} fixed: {reason}"
                     for reason, count in entry["fixed_conv_reasons"].items())


def table(results, compact=False):
    """The results as markdown: every part (`compact`: the README's read / convs / stages / prune)."""
    families = results["families"]
    if compact:
        lines = ["| family | read | searchable convs | depth stages (blocks) | `train.prune` end to end |",
                 "|---|---|---|---|---|"]
        for family, entry in families.items():
            widths = (f"{entry['searchable_convs']}/{entry['convs']} | {_stages(entry)}" if entry.get("read")
                      else "- | -")
            lines.append(f"| {family} | {_read_cell(entry)} | {widths} | {_prune_cell(entry, details=False)} |")
        return "\n".join(lines)
    lines = ["| family | input px | read | searchable slots | searchable convs | depth stages (blocks) | full-shape "
             "derive: max diff (relative) | MMACs | uniform 50% shape: MMACs (ratio) | smallest shape: ratio | "
             "`train.prune` end to end | fixed convs or refusal |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for family, entry in families.items():
        cells = ["-"] * 7
        if entry.get("read"):
            cells = [str(entry["searchable_slots"]), f"{entry['searchable_convs']}/{entry['convs']}", _stages(entry),
                     _derive_cell(entry["derive"]), *_flops_cells(entry["flops"], entry["derive"])]
        lines.append(f"| {family} | {entry.get('input_size', '-')} | {_read_cell(entry)} | " + " | ".join(cells)
                     + f" | {_prune_cell(entry)} | {_note(entry)} |")
    return "\n".join(lines)


def main(argv):
    del argv
    if _WORKER.value:
        write_json(_WORKER_OUT.value, run_worker(_WORKER.value, _PARTS.value, _IMAGE_SIZE.value, _MAX_TRAIN.value))
        return
    if _TABLE.value:
        print(table(read_json(_RESULTS.value), _COMPACT.value))
        return
    unknown = sorted(set(_FAMILIES.value) - set(FAMILIES))
    if unknown:
        raise app.UsageError(f"unknown families {unknown}: expected some of {', '.join(FAMILIES)}")
    results = read_json(_RESULTS.value) if os.path.exists(_RESULTS.value) else {"families": {}}
    import tensorflow as tf
    command = ("python -m bench.coverage" + ("" if _PRUNE.value else " --noprune")
               + (f" --image_size={_IMAGE_SIZE.value}" if _IMAGE_SIZE.value != 64 else ""))
    results.update({
        "command": command,  # the last run's; "commands": every run that wrote the file
        "commands": sorted(set(results.get("commands", [])) | {command}),
        "setting": {"image_size": _IMAGE_SIZE.value, "classes": CLASSES, "derive_tolerance": TOLERANCE,
                    "prune": "run_prune(target_ratio=0.5, base/search/distill epochs 1, batch 8, quantizations "
                             f"('none',), check_base=False, max_train_examples={_MAX_TRAIN.value}) on 10 classes x "
                             "(4 train + 2 test) random PNGs"},
        **provenance(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}; TF {tf.__version__}, "
                   f"Keras {keras.__version__}",
    })
    for family in _FAMILIES.value:
        entry = results["families"].get(family)
        if entry is None or _REFRESH.value:  # --refresh --noprune keeps a recorded prune part (with its commit)
            parts = ["read"] + (["prune"] if _PRUNE.value else [])
            entry = {"prune": entry["prune"]} if entry and "prune" in entry and not _PRUNE.value else {}
        elif _PRUNE.value and "prune" not in entry:
            parts = ["prune"]
        else:
            continue
        print(f"coverage: {family}: {', '.join(parts)}", flush=True)
        entry.update(_in_subprocess(family, parts))
        results["families"][family] = entry
        results["date"] = datetime.date.today().isoformat()
        results["families"] = {name: results["families"][name] for name in FAMILIES if name in results["families"]}
        write_json(_RESULTS.value, results)
    print(table(results))


if __name__ == "__main__":
    app.run(main)
