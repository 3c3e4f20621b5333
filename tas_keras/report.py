"""The main job's report: base against pruned network, from the stages' results (report.json, report.md)."""

import os

from tas_keras.export.exporter import TFLITE_FILE
from tas_keras.runs import read_json, write_json
from tas_keras.search import ARCH_FILE, CURVES_FILE, PLOT_FILE
from tas_keras.shapes import load_shape


def write_report(out, model_name, target_ratio, distilled, exports, search_dir, chance):
    """report.json and report.md: base vs pruned, the searched shape and the search curves; for a
    latency search also the latency its table predicted beside the measured one; for per-pixel labels
    the mean IoU beside the (pixel) accuracy. A base network whose accuracy is at or below `chance`
    (`training.chance_threshold`) is said to be at chance."""
    models = {q: {m["role"]: m for m in exports[q]["models"]} for q in exports}
    pruned, base = next(iter(models.values()))["model"], next(iter(models.values()))["compare_with"]
    shape = read_json(os.path.join(search_dir, ARCH_FILE))
    provenance = shape["provenance"]
    report = {
        "model": model_name, "target_ratio": target_ratio, "cost": provenance["cost_metric"],
        "searched_shape": shape,
        "base": {"flops": base["flops"], "params": base["params"]},
        "pruned": {"flops": pruned["flops"], "params": pruned["params"]},
        "keras_accuracy": {"base": distilled["teacher_test_accuracy"], "pruned": distilled["test_accuracy"]},
        "exports": {q: {role: {"size_bytes": m["tflite"]["size_bytes"], "accuracy": m["tflite"]["accuracy"],
                               **({"mean_iou": m["tflite"]["mean_iou"]} if "mean_iou" in m["tflite"] else {}),
                               "latency_ms": m["latency_ms"]["median"], "output": m["output"]}
                        for role, m in models[q].items()}
                    for q in models},
        "checks_passed": all(exports[q]["passed"] for q in exports),
        "base_at_chance": bool(distilled["teacher_test_accuracy"] <= chance),
    }
    segmentation = "test_mean_iou" in distilled
    if segmentation:
        report["keras_mean_iou"] = {"base": distilled["teacher_test_mean_iou"], "pruned": distilled["test_mean_iou"]}
    table = provenance.get("latency_table")
    if table:
        measured = report["exports"][table["quantize"]]
        report["latency"] = {"quantize": table["quantize"], "threads": table["threads"],
                             "predicted_ms": {"base": provenance["full_latency_ms"], "pruned": provenance["latency_ms"]},
                             "measured_ms": {"base": measured["compare_with"]["latency_ms"],
                                             "pruned": measured["model"]["latency_ms"]}}
    write_json(os.path.join(out, "report.json"), report)

    def row(label, base_value, pruned_value, fmt):
        ratio = pruned_value / base_value if base_value else float("nan")
        return f"| {label} | {fmt(base_value)} | {fmt(pruned_value)} | {ratio:.2f}x |"

    size = lambda b: f"{b / 1024:.1f} KB"  # noqa: E731
    pct = lambda a: f"{100 * a:.2f}%"  # noqa: E731
    ms = lambda t: f"{t:.3f} ms"  # noqa: E731
    e = report["exports"]
    flops_kept = pruned["flops"] / base["flops"]
    if table:
        latency = report["latency"]["measured_ms"]
        title = (f"{latency['pruned'] / latency['base']:.1%} of its {table['quantize']} latency, measured "
                 f"(target {provenance['target_ratio']:.0%} in the latency table), {flops_kept:.1%} of its FLOPs")
    else:
        title = f"{flops_kept:.1%} of its FLOPs (target {target_ratio:.0%})"
    lines = [
        f"# {model_name} pruned to {title}",
        "",
        "| | base | pruned | pruned / base |",
        "|---|---|---|---|",
        row("MFLOPs", base["flops"] / 1e6, pruned["flops"] / 1e6, lambda v: f"{v:.2f}"),
        row("parameters", base["params"], pruned["params"], lambda v: f"{v:,}"),
        row(f"{'pixel ' if segmentation else ''}accuracy, Keras", report["keras_accuracy"]["base"],
            report["keras_accuracy"]["pruned"], pct),
    ]
    if segmentation:
        lines.append(row("mean IoU, Keras", report["keras_mean_iou"]["base"], report["keras_mean_iou"]["pruned"], pct))
    for q in e:
        label = {"none": "fp32"}.get(q, q)
        lines += [row(f".tflite {label} size", e[q]["compare_with"]["size_bytes"], e[q]["model"]["size_bytes"], size),
                  row(f".tflite {label} accuracy", e[q]["compare_with"]["accuracy"], e[q]["model"]["accuracy"], pct),
                  *([row(f".tflite {label} mean IoU", e[q]["compare_with"]["mean_iou"], e[q]["model"]["mean_iou"], pct)]
                    if segmentation else []),
                  row(f".tflite {label} latency (batch 1, median)", e[q]["compare_with"]["latency_ms"],
                      e[q]["model"]["latency_ms"], ms)]
        if table and table["quantize"] == q:
            predicted = report["latency"]["predicted_ms"]
            lines.append(row(f".tflite {label} latency predicted by the table ({table['threads']} thread(s))",
                             predicted["base"], predicted["pruned"], ms))
    files = ", ".join(f"`export/{q}/{TFLITE_FILE}`" for q in e)
    verdict = "all passed" if report["checks_passed"] else "SOME FAILED, see export/*/report.json"
    if report["base_at_chance"]:
        verdict = (f"{'run' if report['checks_passed'] else verdict}, but THE BASE NETWORK IS AT CHANCE "
                   f"({pct(report['keras_accuracy']['base'])}): nothing here is a measurement; check the input "
                   "convention, class order and image size")
    lines += ["", f"Export checks: {verdict}. Files: {files}.", "",
              f"## Searched shape: blocks kept per stage {load_shape(os.path.join(search_dir, ARCH_FILE)).depths}", "",
              f"![searched shape](search/{PLOT_FILE})", "", "## Search", "", f"![search curves](search/{CURVES_FILE})", ""]
    tmp = os.path.join(out, "report.md.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, os.path.join(out, "report.md"))
    return report
