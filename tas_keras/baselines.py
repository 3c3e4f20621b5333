"""The paper's baselines at a matched FLOP target: a uniformly shrunk ("pre-defined") shape and the
best of N random shapes inside the FLOP band. Both produce ArchConfigs, so they go through
train.distill exactly like a searched shape."""

import dataclasses
import logging
import os

import numpy as np

from tas_keras import data
from tas_keras.distribute import in_strategy_scope
from tas_keras.cost import count_arch
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.runs import locking_stage, prepare_run_dir, read_json, run_dir, write_json
from tas_keras.search import cost_band
from tas_keras.search_space import ArchConfig, candidate_widths, depth_choices
from tas_keras.training import CHECKPOINT_STEPS, check_fits_data, evaluate_classifier, fit_classifier

CANDIDATES_FILE = "candidates.json"
ARCH_FILE = "arch.json"
KINDS = ("predefined", "random")


def _flops_band(full, target_ratio, tolerance, band):
    base = count_arch(full).flops
    low, high = cost_band(target_ratio, tolerance, band)
    return base, low * base, high * base


def uniform_shape(full, ratio):
    """Every conv at round(C * ratio) channels (at least 1), all blocks kept."""
    return full.replace(widths=[max(1, round(s.full_width * ratio)) for s in full.slots],
                        provenance={"source": "predefined", "width_ratio": ratio})


def predefined_shape(full, target_ratio, tolerance=0.05, band="code"):
    """The widest uniformly shrunk shape whose FLOPs do not exceed the band's top; ValueError if the
    widths' rounding makes the band unreachable."""
    base, low, high = _flops_band(full, target_ratio, tolerance, band)
    lo, hi = 0.0, 1.0
    for _ in range(40):  # FLOPs grow with the ratio; bisection to float precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count_arch(uniform_shape(full, mid)).flops <= high else (lo, mid)
    shape = uniform_shape(full, lo)
    flops = count_arch(shape).flops
    if flops < low:
        raise ValueError(f"no uniform width ratio of {full.name} lands in the FLOP band "
                         f"[{low / base:.3f}, {high / base:.3f}]; widen --tolerance")
    return shape.replace(provenance={**shape.provenance, "target_ratio": target_ratio, "flops": flops,
                                     "flops_ratio": flops / base})


def random_shapes(full, target_ratio, count, seed=0, tolerance=0.05, band="code", width_multiple=1,
                  max_draws=1_000_000):
    """`count` distinct shapes drawn uniformly from the search space, kept if inside the FLOP band."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count!r}")
    base, low, high = _flops_band(full, target_ratio, tolerance, band)
    rng = np.random.default_rng(seed)
    widths = [candidate_widths(s.full_width, width_multiple) for s in full.slots]
    depths = depth_choices(full.num_blocks)
    shapes, seen = [], set()
    for draw in range(max_draws):
        shape = full.replace(widths=[rng.choice(c) for c in widths],
                             stage_blocks=[rng.choice(depths) for _ in full.stage_blocks])
        flops = count_arch(shape).flops
        key = (shape.widths, shape.stage_blocks)
        if low <= flops <= high and key not in seen:
            seen.add(key)
            shapes.append(shape.replace(provenance={"source": "random", "seed": seed, "draw": draw,
                                                    "target_ratio": target_ratio, "flops": flops,
                                                    "flops_ratio": flops / base}))
            if len(shapes) == count:
                return shapes
    raise ValueError(f"only {len(shapes)} of {count} random shapes of {full.name} fell in the FLOP band "
                     f"after {max_draws} draws")


def random_search(out, full, dataset, target_ratio, count, epochs, batch_size, learning_rate=0.1, seed=0,
                  tolerance=0.05, band="code", checkpoint_steps=CHECKPOINT_STEPS):
    """Trains each random shape briefly on the search-train half and keeps the best on the search-valid
    half. Every candidate has its own resumable run directory; `out/candidates.json` lists them all."""
    train_index, valid_index = data.search_split(dataset.train_labels, seed=seed)
    split = dataclasses.replace(dataset, train_images=dataset.train_images[train_index],
                                train_labels=dataset.train_labels[train_index],
                                test_images=dataset.train_images[valid_index],
                                test_labels=dataset.train_labels[valid_index])
    results = []
    for index, shape in enumerate(random_shapes(full, target_ratio, count, seed, tolerance, band)):
        candidate = os.path.join(out, f"candidate_{index}")
        done = os.path.join(run_dir(candidate), "result.json")
        if not os.path.exists(done):
            os.makedirs(run_dir(candidate), exist_ok=True)
            model = CifarResNet(shape)
            fit_classifier(model, split, candidate, epochs, batch_size, learning_rate, seed,
                           checkpoint_steps)
            write_json(done, {"valid_accuracy": evaluate_classifier(model, split, batch_size)["test_accuracy"],
                              "arch": shape.to_dict()})
        results.append(read_json(done))
        logging.info("random shape %d: %.2f MFLOPs, valid accuracy %.4f", index,
                     shape.provenance["flops"] / 1e6, results[-1]["valid_accuracy"])
    write_json(os.path.join(run_dir(out), CANDIDATES_FILE), results)
    best = max(results, key=lambda r: r["valid_accuracy"])
    arch = ArchConfig.from_dict(best["arch"])
    return arch.replace(provenance={**arch.provenance, "valid_accuracy": best["valid_accuracy"],
                                    "candidates": count, "epochs_per_candidate": epochs})


@in_strategy_scope
@locking_stage
def make_baseline(out, kind, model_name="resnet20", target_ratio=0.5, tolerance=0.05, band="code",
                  dataset_name=data.BUNDLED_DATASET, data_dir=None, count=8, epochs=1, batch_size=256,
                  seed=0, max_train_examples=None, overwrite=False, checkpoint_steps=CHECKPOINT_STEPS):
    """Writes `out/arch.json`: the pre-defined shape, or the best of `count` random shapes."""
    settings = {k: v for k, v in locals().items() if k not in ("out", "overwrite", "checkpoint_steps")}
    settings["stage"] = "baseline"
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0 < target_ratio < 1:
        raise ValueError(f"target ratio must be in (0, 1), got {target_ratio!r}")
    full = ArchConfig.full(model_name)
    cost_band(target_ratio, tolerance, band)
    dataset = None
    if kind == "random":
        dataset = data.load_dataset(dataset_name, data_dir=data_dir, max_train_examples=max_train_examples,
                                    seed=seed)
        full = ArchConfig.full(model_name, num_classes=dataset.num_classes, input_shape=dataset.image_shape)
        check_fits_data(full, dataset)
    run, finished = prepare_run_dir(out, settings, overwrite, done_file=ARCH_FILE)
    if finished:
        return ArchConfig.load(os.path.join(out, ARCH_FILE))
    if kind == "predefined":
        arch = predefined_shape(full, target_ratio, tolerance, band)
    else:
        arch = random_search(out, full, dataset, target_ratio, count, epochs, batch_size, seed=seed,
                             tolerance=tolerance, band=band, checkpoint_steps=checkpoint_steps)
    arch.save(os.path.join(run, ARCH_FILE))
    return arch
