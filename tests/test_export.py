import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from tas_keras.export import convert, verify
from tas_keras.export.exporter import (REPORT_FILE, TFLITE_FILE, ExportConfig, export_and_verify,
                                       format_report)
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

    def get(quantize, int8_io=False, float_input=False):
        key = (quantize, int8_io, float_input)
        if key not in reports:
            out = str(tmp_path_factory.mktemp("_".join(map(str, key))))
            reports[key] = export_and_verify(out, model_path=trained, quantize=quantize, int8_io=int8_io,
                                             float_input=float_input, **QUICK)
        return reports[key]

    return get


def _cli(*args, code=None, module="export.tflite", timeout=120, env=None):
    command = ["-c", code] if code else ["-m", module]
    return subprocess.run([sys.executable, *command, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_saved_model_reload_equals_keras(trained, exported):
    report = exported("none")
    (entry,) = report["models"]
    assert entry["saved_model"]["max_rel_diff"] <= 1e-5 and entry["saved_model"]["max_abs_diff"] <= 1e-4
    serve = tf.saved_model.load(entry["saved_model"]["path"]).signatures["serving_default"]
    assert list(serve.structured_input_signature[1]) == ["image"]  # named after the model's input
    dataset = data.load_dataset(data.BUNDLED_DATASET)
    pixels = dataset.test_images[:64]
    (served,) = serve(image=tf.constant(pixels)).values()  # uint8 pixels, normalised inside
    expected = keras.saving.load_model(trained)(_normalised_by_hand(pixels, dataset), training=False)
    np.testing.assert_allclose(served.numpy(), keras.ops.convert_to_numpy(expected), atol=1e-5)


def _normalised_by_hand(pixels, dataset):
    """The training normalisation written out, independently of the code under test."""
    return ((pixels / 255 - np.array(dataset.mean)) / np.array(dataset.std)).astype(np.float32)


@pytest.mark.parametrize("quantize", convert.QUANTIZATIONS)
def test_every_mode_runs_in_litert_within_its_tolerance(exported, quantize):
    report = exported(quantize)
    (entry,) = report["models"]
    checked = {check["name"] for check in report["checks"]}
    assert checked == {f"model.{metric}" for metric in
                       [*verify.SAVED_MODEL_TOLERANCE, *verify.TOLERANCES[quantize]]}
    assert report["passed"], format_report(report)
    assert (entry["tflite"]["input_dtype"], entry["tflite"]["output_dtype"]) == ("uint8", "float32")
    assert os.path.getsize(entry["tflite"]["path"]) == entry["tflite"]["size_bytes"]
    assert entry["latency_ms"]["median"] > 0 and entry["latency_ms"]["runs"] == QUICK["latency_runs"]


def test_quantised_files_are_smaller(exported):
    size = {q: exported(q)["models"][0]["tflite"]["size_bytes"] for q in convert.QUANTIZATIONS}
    assert size["int8"] < size["float16"] < size["none"] and size["dynamic"] < size["float16"]


def test_int8_io_is_quantised_and_dequantised(exported):
    float_io, int8_io = exported("int8"), exported("int8", int8_io=True)
    float_pixels_int8_io = exported("int8", int8_io=True, float_input=True)
    for report, dtypes in ((int8_io, ("uint8", "int8")), (float_pixels_int8_io, ("int8", "int8"))):
        assert report["passed"], format_report(report)
        tflite = report["models"][0]["tflite"]
        assert (tflite["input_dtype"], tflite["output_dtype"]) == dtypes
    dataset = data.load_dataset(data.BUNDLED_DATASET)
    pixels = dataset.test_images[:200]
    top1 = [verify.LiteRTModel(r["models"][0]["tflite"]["path"], 1).predict(pixels).argmax(-1)
            for r in (float_io, int8_io, float_pixels_int8_io)]
    assert np.mean(top1[0] == top1[1]) >= 0.99 and np.mean(top1[0] == top1[2]) >= 0.95


def test_report_has_every_field(exported):
    report = exported("int8")
    with open(os.path.join(os.path.dirname(report["models"][0]["tflite"]["path"]), REPORT_FILE)) as f:
        assert json.load(f) == report
    assert {"quantize", "int8_io", "qat_epochs", "representative_size", "input", "dataset", "test_images",
            "latency", "tolerances", "models", "checks", "passed", "environment"} <= report.keys()
    assert report["test_images"] == 1000 and report["representative_size"] == QUICK["representative_size"]
    (entry,) = report["models"]
    assert {"role", "model_path", "name", "flops", "params", "saved_model", "labels", "tflite",
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
    report = export_and_verify(str(tmp_path / "out"), model_path=pruned, compare_with=trained, latency_runs=10)
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
    result = _cli(f"--model={trained}", f"--out={tmp_path / 'out'}", *args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_int8_io_needs_int8(trained, tmp_path):
    with pytest.raises(ValueError, match="--int8_io needs --quantize=int8"):
        export_and_verify(str(tmp_path), model_path=trained, quantize="dynamic", int8_io=True)


def test_failed_conversion_leaves_no_tflite_or_report(trained, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / REPORT_FILE).write_text("{}")  # an earlier run's report must not survive a failed one

    class KilledConverter:
        def convert(self):
            raise RuntimeError("converter killed")

    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_saved_model", lambda *a, **k: KilledConverter())
    with pytest.raises(RuntimeError, match="converter killed"):
        export_and_verify(str(out), model_path=trained, **QUICK)
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
        from tas_keras.export import convert, tfmot_bridge, verify
        from tas_keras import data
        from tas_keras.models import cifar_resnet  # registers the trained network's class
        model = keras.saving.load_model({trained!r})
        dataset = data.load_dataset(data.BUNDLED_DATASET)
        images = convert.normalised(dataset.test_images[:300], dataset.mean, dataset.std)
        plain = tfmot_bridge.build_tf_keras(model)
        tfmot_bridge.copy_weights(model, plain)
        reference = keras.ops.convert_to_numpy(model(images, training=False))
        convert.write_bytes({str(tmp_path / "qat.tflite")!r}, tfmot_bridge.quantization_aware_int8(
            model, dataset, max_steps=2, representative=convert.representative_images(dataset, 50)))
        runtime = verify.LiteRTModel({str(tmp_path / "qat.tflite")!r}, 1)
        kinds = {{str(t["dtype"]) for t in runtime.interpreter.get_tensor_details()}}
        print(json.dumps({{"rebuilt_diff": float(np.abs(plain.predict(images, verbose=0) - reference).max()),
                          "int8_tensors": any("int8" in k for k in kinds), "input": runtime.io_dtypes[0],
                          **verify.parity(reference, runtime.predict(dataset.test_images[:300]),
                                          dataset.test_labels[:300])}}))
    """)
    result = _cli(code=code, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["rebuilt_diff"] < 1e-4  # same network, same weights, in tf_keras
    assert metrics["int8_tensors"] and metrics["input"] == "uint8"  # the camera's pixels
    assert metrics["top1_agreement"] >= 0.8


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_tflite_takes_the_cameras_uint8_pixels(trained, exported, quantize):
    (entry,) = exported(quantize)["models"]
    interpreter = Interpreter(model_path=entry["tflite"]["path"])
    interpreter.allocate_tensors()
    (image,), (logits,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert image["dtype"] == np.uint8 and image["quantization"] == (0.0, 0)  # raw pixels, no scaling
    dataset = data.load_dataset(data.BUNDLED_DATASET)
    pixels = dataset.test_images[:100]
    outputs = []
    for pixel_image in pixels:
        interpreter.set_tensor(image["index"], pixel_image[None])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(logits["index"])[0])
    expected = keras.ops.convert_to_numpy(
        keras.saving.load_model(trained)(_normalised_by_hand(pixels, dataset), training=False))
    if quantize == "none":
        np.testing.assert_allclose(outputs, expected, atol=1e-5 * np.abs(expected).max())
    else:
        assert np.mean(np.argmax(outputs, -1) == expected.argmax(-1)) >= 0.9
    with open(entry["labels"]) as f:
        assert f.read().splitlines() == list(dataset.class_names)
    assert os.path.dirname(entry["labels"]) == os.path.dirname(entry["tflite"]["path"])


def test_float_input_takes_float_pixels(trained, exported):
    report = exported("none", float_input=True)
    assert report["passed"], format_report(report)
    assert report["models"][0]["tflite"]["input_dtype"] == "float32"
    assert report["input"]["pixels"] == "RGB, float32 0-255"


def test_predict_prints_the_top_classes_by_name(trained, exported, tmp_path):
    tflite = exported("none")["models"][0]["tflite"]["path"]
    dataset = data.load_dataset(data.BUNDLED_DATASET)
    pixels = dataset.test_images[:2]
    paths = []
    for index, pixel_image in enumerate(pixels):
        paths.append(str(tmp_path / f"photo_{index}.png"))
        with open(paths[-1], "wb") as f:
            f.write(tf.io.encode_png(pixel_image).numpy())
    result = _cli(tflite, *paths, "--top=3", module="export.predict")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    logits = keras.ops.convert_to_numpy(
        keras.saving.load_model(trained)(_normalised_by_hand(pixels, dataset), training=False)).astype(np.float64)
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for index, path in enumerate(paths):
        block = lines[4 * index: 4 * index + 4]
        assert block[0] == path
        printed = [line.split() for line in block[1:]]
        best = np.argsort(-probabilities[index])[:3]
        assert [row[1] for row in printed] == [dataset.class_names[i] for i in best]
        assert [float(row[2].rstrip("%")) for row in printed] == pytest.approx(
            100 * probabilities[index][best], abs=0.006)


def test_predict_refuses_a_model_without_labels_and_a_non_image(trained, exported, tmp_path):
    tflite = tmp_path / "model.tflite"
    tflite.write_bytes(open(exported("none")["models"][0]["tflite"]["path"], "rb").read())
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    no_labels = _cli(str(tflite), str(text), module="export.predict")
    assert no_labels.returncode == 2 and f"error: cannot read {tmp_path / 'labels.txt'}" in no_labels.stderr
    (tmp_path / "labels.txt").write_text("".join(f"{name}\n" for name in data.load_dataset(
        data.BUNDLED_DATASET).class_names))
    not_image = _cli(str(tflite), str(text), module="export.predict")
    assert not_image.returncode == 2 and "is not an image this tool can decode" in not_image.stderr
    assert "Traceback" not in no_labels.stderr + not_image.stderr


def test_qat_without_tfmot_says_how_to_install_it(trained, tmp_path):
    # A TFMOT that fails to import, whether or not the real one is installed.
    stub = tmp_path / "stub" / "tensorflow_model_optimization"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError(\"No module named 'tensorflow_model_optimization'\")\n")
    out = tmp_path / "out"
    result = _cli(f"--model={trained}", f"--out={out}", "--quantize=int8", "--qat_epochs=1",
                  env={**os.environ, "PYTHONPATH": str(stub.parent)})
    assert result.returncode == 2
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error.endswith("pip install --no-deps -r requirements-tfmot.txt")
    assert "Traceback" not in result.stderr and not out.exists()
    not_int8 = _cli(f"--model={trained}", f"--out={out}", "--qat_epochs=1")
    assert not_int8.returncode == 2 and "--qat_epochs needs --quantize=int8" in not_int8.stderr


# The run.json train.prune wrote of an export before ExportConfig (commit 671e460), with and without the
# settings it recorded only away from their defaults (threads, qat_epochs, input_convention).
PREVIOUS_RUN_FILE = {"model": "/r/distill/model.keras", "compare_with": "/r/base/model.keras", "quantize": "int8",
                     "dataset_name": "cifar10_mini", "data_dir": None, "seed": 0}


def test_an_export_config_records_what_train_prune_recorded_and_refuses_bad_settings():
    config = ExportConfig(model_path="/r/distill/model.keras", compare_with="/r/base/model.keras", quantize="int8",
                          latency_runs=100, output="logits")
    assert config.run_record() == PREVIOUS_RUN_FILE
    changed = config.replace(threads=1, qat_epochs=2, input_convention="raw")
    assert changed.run_record() == {**PREVIOUS_RUN_FILE, "threads": 1, "qat_epochs": 2, "input_convention": "raw"}
    assert ExportConfig.from_dict(changed.run_record()) == changed.replace(latency_runs=200, output="auto")
    for overrides, message in ((dict(quantize="int4"), "--quantize must be one of .* got 'int4'"),
                               (dict(quantize="dynamic", int8_io=True), "--int8_io needs --quantize=int8"),
                               (dict(quantize="none", qat_epochs=1), "--qat_epochs needs --quantize=int8"),
                               (dict(threads=0), "threads and latency_runs must be >= 1, got 300, 0, 100"),
                               (dict(model="m.keras"), "ExportConfig has no setting 'model'")):
        with pytest.raises(ValueError, match=message):
            config.replace(**overrides)


def test_parity_of_per_pixel_outputs_counts_pixels_and_their_mean_iou():
    from .test_train_base import MEAN_IOU, PIXEL_ACCURACY, PREDICTED, TRUE
    keras_logits = np.eye(3)[TRUE]  # the Keras model is right everywhere
    exported_logits = np.eye(3)[PREDICTED]
    metrics = verify.parity(keras_logits, exported_logits, TRUE)
    assert metrics["mean_iou"] == pytest.approx(MEAN_IOU) and metrics["keras_mean_iou"] == pytest.approx(1)
    assert metrics["accuracy"] == metrics["top1_agreement"] == pytest.approx(PIXEL_ACCURACY)
    assert metrics["accuracy_drop"] == pytest.approx(1 - PIXEL_ACCURACY)
    assert "mean_iou" not in verify.parity(keras_logits[:, 0, 0], exported_logits[:, 0, 0], TRUE[:, 0, 0])
