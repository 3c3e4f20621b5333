"""Pictures of a search: the searched width of every layer against the original, and how it moved."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen first)
import numpy as np  # noqa: E402

from tas_keras.layer_rules import rule_for  # noqa: E402


def _save(fig, path):
    """Atomically: a killed run never leaves a half-written picture."""
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _kept(space, shape):
    """Per searchable slot of `space`: whether a conv writing it survives the shape's stage depths."""
    dropped = {block.name for stage in space.stages for block in stage.blocks
               if block not in stage.kept_blocks(shape.depths[stage.name])}
    return np.array([any(layer.block not in dropped for layer in space.layers
                         if rule_for(layer).searchable_conv and layer.out_slot == slot.name)
                  for slot in space.searchable_slots])


def plot_search(history, space, shapes, full_flops, path):
    """Writes a PNG: final widths vs full (dropped blocks hatched), width ratio per searchable slot per
    epoch, and the argmax FLOPs ratio and tau per epoch. `shapes`: the GraphShape of every history entry
    in `space`; `full_flops`: the full network's. Written atomically."""
    slots = space.searchable_slots
    full = np.array([s.full_width for s in slots], float)
    widths = np.array([[shape.widths[s.name] for s in slots] for shape in shapes], float)
    last = history[-1]
    kept = _kept(space, shapes[-1])
    ratios = np.array([w / full * _kept(space, shape) for w, shape in zip(widths, shapes)])
    epochs = [e["epoch"] + 1 for e in history]
    depths = list(shapes[-1].depths.values())

    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.28 * len(slots)), 11),
                             gridspec_kw={"height_ratios": [3, 3, 2]})
    x = np.arange(len(slots))
    axes[0].bar(x, full, color="#d9d9d9", label="original")
    axes[0].bar(x[kept], widths[-1][kept], color="#1f77b4", label="searched")
    axes[0].bar(x[~kept], widths[-1][~kept], color="white", edgecolor="#1f77b4",
                hatch="//", label="block dropped")
    axes[0].set_xticks(x, [s.name.replace("_conv", "") for s in slots], rotation=90, fontsize=7)
    axes[0].set_ylabel("channels")
    axes[0].set_title(f"{space.name}: searched shape after epoch {epochs[-1]}, blocks per stage "
                      f"{depths}, {last['flops'] / 1e6:.2f} MFLOPs")
    axes[0].legend(fontsize=8)

    image = axes[1].imshow(ratios.T, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                           extent=(0.5, len(epochs) + 0.5, len(slots) - 0.5, -0.5))
    axes[1].set_yticks(x, [s.name.replace("_conv", "") for s in slots], fontsize=6)
    axes[1].xaxis.get_major_locator().set_params(integer=True)
    axes[1].set_xlabel("epoch")
    axes[1].set_title("width / original per epoch (0: block dropped)")
    fig.colorbar(image, ax=axes[1], fraction=0.03)

    axes[2].plot(epochs, [e["flops"] / full_flops for e in history], marker="o", label="argmax FLOPs / full")
    axes[2].plot(epochs, [e["tau"] for e in history], marker=".", label="tau", color="#ff7f0e")
    axes[2].set_xlabel("epoch")
    axes[2].xaxis.get_major_locator().set_params(integer=True)
    axes[2].set_yscale("log")
    axes[2].legend(fontsize=8)
    _save(fig, path)


def plot_search_curves(history, path):
    """Writes a PNG of the search per epoch: supernet accuracy (train and valid batches), expected and
    argmax cost as a fraction of the full network, how decided the architecture is (mean top-1
    probability of the width and depth distributions, argmax changes since the previous epoch) and
    tau. Written atomically."""
    epochs = [e["epoch"] + 1 for e in history]
    logs = lambda key: [e["logs"].get(key, np.nan) for e in history]  # noqa: E731
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    axes[0].plot(epochs, logs("accuracy"), marker="o", label="search-train batches")
    axes[0].plot(epochs, logs("valid_accuracy"), marker="o", label="search-valid batches")
    axes[0].set_title("supernet accuracy (sampled shapes)")
    axes[1].plot(epochs, logs("expected_cost_ratio"), marker="o", label="expected E(A)")
    axes[1].plot(epochs, logs("argmax_cost_ratio"), marker="o", label="argmax F(A)")
    axes[1].set_title("cost / full network (epoch mean)")
    axes[2].plot(epochs, logs("width_top1"), marker="o", label="width: mean top-1 probability")
    axes[2].plot(epochs, logs("depth_top1"), marker="o", label="depth: mean top-1 probability")
    axes[2].set_ylim(0, 1.02)
    changes = axes[2].twinx()
    changes.bar(epochs, np.nan_to_num(logs("width_changes")) + np.nan_to_num(logs("depth_changes")),
                color="#bbbbbb", alpha=0.5, width=0.6)
    changes.set_ylabel("argmax changes (bars)", fontsize=8)
    axes[2].set_zorder(changes.get_zorder() + 1)
    axes[2].patch.set_visible(False)
    axes[2].set_title("how decided the architecture is")
    axes[3].plot(epochs, [e["tau"] for e in history], marker="o", color="#ff7f0e")
    axes[3].set_title("Gumbel temperature tau")
    for axis in axes:
        axis.set_xlabel("epoch")
        axis.xaxis.get_major_locator().set_params(integer=True)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    _save(fig, path)
