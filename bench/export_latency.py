"""Does the FLOP reduction of pruning become phone latency? Full vs pruned CIFAR ResNets under LiteRT.

  python -m bench.export_latency [--threads=1,2] [--runs=400]

For ResNet-20 and ResNet-56: the full network against the paper's released shape at about half its
FLOPs (the authors' files, copied in tests/data/released_shapes; without one, every width scaled by
0.7, which keeps about half the FLOPs), as fp32 and int8 .tflite, batch 1, LiteRT's default XNNPACK
delegate, the shapes of one network timed interleaved (A B A B ...). speedup_per_flop_reduction is
(full ms / pruned ms) / (full FLOPs / pruned FLOPs): 1.0 when latency falls as much as FLOPs do; the
target is 0.8. ResNet-20 also gets its pruned shape with every width rounded to a multiple of 8
(XNNPACK tiles output channels by 8 in fp32, 16 in int8), compared per MFLOP.

Weights are random (He init, BN at its initial statistics): latency does not depend on weight values.
int8 is calibrated on 100 images of the bundled training set. Writes bench/results/export_latency.json.
"""

import json
import math
import os
import pathlib
import platform
import tempfile

from absl import app, flags
import keras
import tensorflow as tf

from tas_keras.export import convert, verify
from tas_keras import data
from tas_keras.cost import count_arch
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.search_space import ArchConfig
from tas_keras.runs import write_json

# The paper's released shape files, copied into the repository (tests/data/released_shapes/README.md).
RELEASED = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "released_shapes"
TARGET = 0.8
MODES = ("none", "int8")

_THREADS = flags.DEFINE_list("threads", ["1", "2"], "LiteRT thread counts to measure, each separately.")
_RUNS = flags.DEFINE_integer("runs", 400, "Timed invokes per model (after warm-up).", lower_bound=1)
_OUT = flags.DEFINE_string("out", str(pathlib.Path(__file__).parent / "results" / "export_latency.json"),
                           "JSON path.")


def pruned_shape(model):
    """The released shape of `model` (e.g. resnet20) if RELEASED holds one, else a uniform 0.7 shrink."""
    path = RELEASED / f"NeurIPS-2019__C010-{model.replace('resnet', 'ResNet')}.config"
    if path.is_file():
        return ArchConfig.load(path), path.name
    full = ArchConfig.full(model)
    return full.replace(widths=[max(1, int(0.7 * w)) for w in full.widths],
                        provenance={"source": "uniform 0.7"}), "every width x0.7 (no released shape)"


def rounded_to(arch, multiple):
    """`arch` with every width rounded to the nearest multiple (at least one, at most the full width)."""
    widths = [min(slot.full_width, max(multiple, multiple * math.floor(w / multiple + 0.5)))
              for slot, w in zip(arch.slots, arch.widths)]
    return arch.replace(widths=widths, provenance={**arch.provenance, "rounded_to": multiple})


def _convert_all(shapes, dataset, representative, workdir):
    """{mode: {shape name: .tflite path}} for random-weight models of every shape, taking uint8 pixels
    as every export does."""
    paths = {mode: {} for mode in MODES}
    for name, arch in shapes.items():
        keras.utils.set_random_seed(0)
        saved_model = os.path.join(workdir, name, "saved_model")
        convert.export_saved_model(convert.pixel_input_model(CifarResNet(arch), dataset.mean, dataset.std),
                                   saved_model)
        for mode in MODES:
            paths[mode][name] = os.path.join(workdir, name, f"{mode}.tflite")
            convert.write_bytes(paths[mode][name], convert.convert_tflite(saved_model, mode, representative))
    return paths


def _measure(shapes, paths, threads, runs):
    """Interleaved latency of the shapes of one network, per mode; speed-ups against "full"."""
    results = {}
    for mode, files in paths.items():
        runtimes = [verify.LiteRTModel(files[name], threads) for name in shapes]
        image = tf.random.stateless_uniform((32, 32, 3), [0, 0], maxval=256, dtype=tf.int32).numpy().astype("uint8")
        latencies = verify.interleaved_latency(runtimes, image, runs)
        rows = {}
        for (name, arch), samples in zip(shapes.items(), latencies):
            mflops = count_arch(arch).flops / 1e6
            summary = verify.latency_summary(samples)
            rows[name] = {"mflops": round(mflops, 3), "size_bytes": os.path.getsize(files[name]),
                          "median_ms": round(summary["median"], 4), "p90_ms": round(summary["p90"], 4),
                          "ms_per_mflop": round(summary["median"] / mflops, 5)}
        for name, row in rows.items():
            if name != "full":
                flop_reduction = rows["full"]["mflops"] / row["mflops"]
                speedup = rows["full"]["median_ms"] / row["median_ms"]
                row.update(flop_reduction=round(flop_reduction, 3), speedup=round(speedup, 3),
                           speedup_per_flop_reduction=round(speedup / flop_reduction, 3),
                           meets_target=speedup / flop_reduction >= TARGET)
        results[mode] = rows
    return results


def main(argv):
    del argv
    dataset = data.load_dataset(data.BUNDLED_DATASET)
    representative = convert.representative_images(dataset, 100)
    networks, sources = {}, {}
    for model in ("resnet20", "resnet56"):
        pruned, sources[model] = pruned_shape(model)
        networks[model] = {"full": ArchConfig.full(model), "pruned": pruned}
    networks["resnet20"]["pruned_rounded_to_8"] = rounded_to(networks["resnet20"]["pruned"], 8)

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as workdir:
        paths = {model: _convert_all(shapes, dataset, representative, os.path.join(workdir, model))
                 for model, shapes in networks.items()}
        measured = {f"{threads}_threads": {model: _measure(shapes, paths[model], int(threads), _RUNS.value)
                                           for model, shapes in networks.items()}
                    for threads in _THREADS.value}
    result = {
        "what": "batch-1 LiteRT (XNNPACK) latency of full vs pruned CIFAR-10 ResNets, random weights",
        "target_speedup_per_flop_reduction": TARGET,
        "runs": _RUNS.value,
        "pruned_shapes": sources,
        "shapes": {model: {name: {"widths": list(arch.widths), "stage_blocks": list(arch.stage_blocks)}
                           for name, arch in shapes.items()} for model, shapes in networks.items()},
        "latency": measured,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, TF {tf.__version__}, "
                   f"Keras {keras.__version__}",
        "load_average_at_start": [round(x, 2) for x in load],
    }
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    write_json(_OUT.value, result)
    print(json.dumps(measured, indent=2))


if __name__ == "__main__":
    app.run(main)
