import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from export import convert, verify
from export.pipeline import REPORT_FILE, TFLITE_FILE, export_and_verify, format_report
from tas_keras import data
from tas_keras.cost import count_model
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.search_space import ArchConfig
from tas_keras.training import save_model

from .conftest import REPO

QUICK = dict(latency_runs=20, representative_size=100)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ResNet-8 trained one epoch on the bundled set (about 30% test accuracy): enough for its
    logits to carry decisions that quantisation can disturb."""
    keras.utils.set_random_seed(0)
    dataset = data.load_dataset(data.BUNDLED_DATASET)
    model = CifarResNet(ArchConfig.full("resnet8"))
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data.train_pipeline(dataset.train_images, dataset.train_labels, 64, dataset.mean, dataset.std),
              epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path_factory.mktemp("model") / "model.keras")
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """Exports of `trained`, one per quantisation mode, made on first use."""
    reports = {}

    def get(quantize, int8_io=False):
        key = (quantize, int8_io)
        if key not in reports:
            out = str(tmp_path_factory.mktemp(f"{quantize}{'_io' if int8_io else ''}"))
            reports[key] = export_and_verify(trained, out, quantize=quantize, int8_io=int8_io, **QUICK)
        return reports[key]

    return get


def _cli(*args, code=None, timeout=120):
    command = ["-c", code] if code else ["-m", "export.tflite"]
    return subprocess.run([sys.executable, *command, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_saved_model_reload_equals_keras(trained, exported):
    report = exported("none")
    (entry,) = report["models"]
    assert entry["saved_model"]["max_abs_diff"] <= 1e-5
    serve = tf.saved_model.load(entry["saved_model"]["path"]).signatures["serving_default"]
    assert list(serve.structured_input_signature[1]) == ["image"]  # named after the model's input
    dataset = data.load_dataset(data.BUNDLED_DATASET)
    images = convert.normalised(dataset.test_images[:64], dataset.mean, dataset.std)
    (served,) = serve(image=tf.constant(images)).values()
    expected = keras.saving.load_model(trained)(images, training=False)
    np.testing.assert_allclose(served.numpy(), keras.ops.convert_to_numpy(expected), atol=1e-5)


@pytest.mark.parametrize("quantize", convert.QUANTIZATIONS)
def test_every_mode_runs_in_litert_within_its_tolerance(exported, quantize):
    report = exported(quantize)
    (entry,) = report["models"]
    checked = {check["name"] for check in report["checks"]}
    assert checked == {f"model.{metric}" for metric in
                       [*verify.SAVED_MODEL_TOLERANCE, *verify.TOLERANCES[quantize]]}
    assert report["passed"], format_report(report)
    assert entry["tflite"]["input_dtype"] == entry["tflite"]["output_dtype"] == "float32"
    assert os.path.getsize(entry["tflite"]["path"]) == entry["tflite"]["size_bytes"]
    assert entry["latency_ms"]["median"] > 0 and entry["latency_ms"]["runs"] == QUICK["latency_runs"]


def test_quantised_files_are_smaller(exported):
    size = {q: exported(q)["models"][0]["tflite"]["size_bytes"] for q in convert.QUANTIZATIONS}
    assert size["int8"] < size["float16"] < size["none"] and size["dynamic"] < size["float16"]


def test_int8_io_is_quantised_and_dequantised(exported):
    float_io, int8_io = exported("int8"), exported("int8", int8_io=True)
    assert int8_io["passed"], format_report(int8_io)
    assert (int8_io["models"][0]["tflite"]["input_dtype"], int8_io["models"][0]["tflite"]["output_dtype"]) \
        == ("int8", "int8")
    dataset = data.load_dataset(data.BUNDLED_DATASET)
    images = convert.normalised(dataset.test_images[:200], dataset.mean, dataset.std)
    top1 = [verify.LiteRTModel(r["models"][0]["tflite"]["path"], 1).predict(images).argmax(-1)
            for r in (float_io, int8_io)]
    assert np.mean(top1[0] == top1[1]) >= 0.99


def test_report_has_every_field(exported):
    report = exported("int8")
    with open(os.path.join(os.path.dirname(report["models"][0]["tflite"]["path"]), REPORT_FILE)) as f:
        assert json.load(f) == report
    assert {"quantize", "int8_io", "representative_size", "dataset", "test_images", "latency", "tolerances",
            "models", "checks", "passed", "environment"} <= report.keys()
    assert report["test_images"] == 1000 and report["representative_size"] == QUICK["representative_size"]
    (entry,) = report["models"]
    assert {"role", "model_path", "name", "flops", "params", "saved_model", "tflite",
            "latency_ms"} <= entry.keys()
    assert {"path", "size_bytes", "input_dtype", "output_dtype", "max_abs_diff", "max_rel_diff",
            "top1_agreement", "accuracy", "keras_accuracy", "accuracy_drop"} <= entry["tflite"].keys()
    assert {"median", "p90", "runs"} <= entry["latency_ms"].keys()
    assert entry["latency_ms"]["p90"] >= entry["latency_ms"]["median"]
    assert all({"name", "value", "limit", "bound", "passed"} <= c.keys() for c in report["checks"])
    table = format_report(report)
    assert "accuracy .tflite" in table and "PASS  model.top1_agreement" in table


def test_compare_with_reports_both_side_by_side(trained, tmp_path):
    keras.utils.set_random_seed(1)
    half = ArchConfig.full("resnet8")
    half = half.replace(widths=[max(1, w // 2) for w in half.widths])
    pruned = str(tmp_path / "pruned.keras")
    save_model(CifarResNet(half), pruned)
    report = export_and_verify(pruned, str(tmp_path / "out"), compare_with=trained, latency_runs=10)
    assert [m["role"] for m in report["models"]] == ["model", "compare_with"]
    assert report["latency"]["interleaved"]
    assert os.path.isfile(tmp_path / "out" / "compare" / TFLITE_FILE)
    model, base = report["models"]
    assert (model["flops"], base["flops"]) == (count_model(CifarResNet(half)).flops,
                                               count_model(keras.saving.load_model(trained)).flops)
    comparison = report["comparison"]
    assert comparison["flops_ratio"] == pytest.approx(model["flops"] / base["flops"])
    assert comparison["flops_ratio"] < 0.5
    assert comparison["speedup_per_flop_reduction"] == pytest.approx(
        comparison["latency_speedup"] * comparison["flops_ratio"])
    assert {c["name"] for c in report["checks"]} >= {"model.max_rel_diff", "compare_with.max_rel_diff"}
    assert "model vs compare_with" in format_report(report)


def test_a_failed_check_fails_the_cli_loudly(trained, tmp_path):
    out = tmp_path / "out"
    # The CLI itself, with a tolerance no export can meet passed to its main().
    code = textwrap.dedent("""
        from export import tflite
        from train import common_flags
        common_flags.run(lambda: tflite.main(tolerances={"max_abs_diff": -1.0}))
    """)
    result = _cli(f"--model={trained}", f"--out={out}", "--latency_runs=5", code=code)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "FAIL  model.max_abs_diff" in result.stdout
    assert "error: 1 check(s) failed: model.max_abs_diff" in result.stderr
    with open(out / REPORT_FILE) as f:
        assert json.load(f)["passed"] is False


@pytest.mark.parametrize("args, message", [
    (["--model=/no/such/model.keras"], "error: model file '/no/such/model.keras' does not exist"),
    (["--quantize=int4"], "--quantize=int4"),
])
def test_bad_input_fails_fast_with_one_line(trained, tmp_path, args, message):
    start = time.perf_counter()
    result = _cli(f"--model={trained}", f"--out={tmp_path / 'out'}", *args)
    assert time.perf_counter() - start < 20
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_int8_io_needs_int8(trained, tmp_path):
    with pytest.raises(ValueError, match="--int8_io needs --quantize=int8"):
        export_and_verify(trained, str(tmp_path), quantize="dynamic", int8_io=True)


def test_failed_conversion_leaves_no_tflite_or_report(trained, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / REPORT_FILE).write_text("{}")  # an earlier run's report must not survive a failed one

    class KilledConverter:
        def convert(self):
            raise RuntimeError("converter killed")

    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_saved_model", lambda *a, **k: KilledConverter())
    with pytest.raises(RuntimeError, match="converter killed"):
        export_and_verify(trained, str(out), **QUICK)
    assert sorted(os.listdir(out)) == ["saved_model"]  # complete, written before the conversion


def test_interrupted_saved_model_leaves_nothing(tmp_path):
    class DiesHalfway:
        def export(self, path, **kwargs):
            with open(os.path.join(path, "saved_model.pb"), "w") as f:
                f.write("half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert.export_saved_model(DiesHalfway(), str(tmp_path / "saved_model"))
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not (importlib.util.find_spec("tf_keras")
                         and importlib.util.find_spec("tensorflow_model_optimization")),
                    reason="tf_keras / tensorflow-model-optimization (requirements-tfmot.txt) not installed")
def test_tfmot_bridge_quantization_aware_int8(trained, tmp_path):
    # In a child process: importing TFMOT rebinds tf.keras for the whole process.
    code = textwrap.dedent(f"""
        import json, keras, numpy as np
        from export import convert, tfmot_bridge, verify
        from tas_keras import data
        model = keras.saving.load_model({trained!r})
        dataset = data.load_dataset(data.BUNDLED_DATASET)
        images = convert.normalised(dataset.test_images[:300], dataset.mean, dataset.std)
        plain = tfmot_bridge.build_tf_keras(model.arch)
        tfmot_bridge.copy_weights(model, plain)
        reference = keras.ops.convert_to_numpy(model(images, training=False))
        convert.write_bytes({str(tmp_path / "qat.tflite")!r},
                            tfmot_bridge.quantization_aware_int8(model, dataset, max_steps=2))
        runtime = verify.LiteRTModel({str(tmp_path / "qat.tflite")!r}, 1)
        kinds = {{str(t["dtype"]) for t in runtime.interpreter.get_tensor_details()}}
        print(json.dumps({{"rebuilt_diff": float(np.abs(plain.predict(images, verbose=0) - reference).max()),
                          "int8_tensors": any("int8" in k for k in kinds),
                          **verify.parity(reference, runtime.predict(images), dataset.test_labels[:300])}}))
    """)
    result = _cli(code=code, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["rebuilt_diff"] < 1e-4  # same network, same weights, in tf_keras
    assert metrics["int8_tensors"]
    assert metrics["top1_agreement"] >= 0.8
