import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from tas_keras.export import verify
from tas_keras.cost import count_model
from tas_keras.graph import read_model
from tas_keras.graph_space import INDEPENDENT
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.models.registry import build_model
from tas_keras.search_space import ArchConfig
from tas_keras.shapes import load_shape
from tas_keras.prune import run_prune, smallest_ratio

from .conftest import REPO, assert_refused_before_any_work
from .test_supernet import user_cnn

SHORT = dict(base_epochs=1, search_epochs=2, distill_epochs=1, max_train_examples=512)


def _cli(*args, timeout=60, env=None):
    return subprocess.run([sys.executable, "-m", "train.prune", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prune") / "run")
    return out, run_prune(out, target_ratio=0.5, **SHORT)


@pytest.mark.slow
def test_quick_pipeline_end_to_end(finished_run):
    out, report = finished_run
    for path in ("base/model.keras", "search/arch.json", "search/search.png", "search/curves.png",
                 "distill/model.keras", "export/none/model.tflite", "export/int8/model.tflite",
                 "report.md", "report.json"):
        assert os.path.exists(os.path.join(out, path)), path
    # fp32 must match Keras exactly; int8's top-1 agreement is noise on these 1-epoch near-chance models
    # (25% accuracy), so here the report only has to state its checks and their verdict truthfully.
    exports = {q: json.load(open(os.path.join(out, "export", q, "report.json"))) for q in ("none", "int8")}
    assert exports["none"]["passed"] and all(c["passed"] for c in exports["none"]["checks"])
    assert {c["name"] for c in exports["int8"]["checks"]} >= {"model.top1_agreement", "model.accuracy_drop"}
    assert report["checks_passed"] == all(c["passed"] for e in exports.values() for c in e["checks"])
    assert report["pruned"]["flops"] < report["base"]["flops"]
    assert report["pruned"]["flops"] == report["searched_shape"]["provenance"]["flops"]
    int8 = report["exports"]["int8"]
    assert int8["model"]["size_bytes"] < report["exports"]["none"]["model"]["size_bytes"]
    markdown = open(os.path.join(out, "report.md")).read()
    assert "| MFLOPs | 40.81 |" in markdown and "search/search.png" in markdown
    # Every training stage read the first 512 of the 5,000 training images (its settings say so).
    for stage in ("base", "search", "distill"):
        assert json.load(open(os.path.join(out, stage, "run.json")))["max_train_examples"] == 512, stage
    assert json.load(open(os.path.join(out, "base", "metrics.json")))["train_examples"] == 512
    assert json.load(open(os.path.join(out, "report.json"))) == report


@pytest.mark.slow
def test_rerun_of_a_finished_pipeline_trains_nothing(finished_run):
    out, report = finished_run
    stamps = {p: os.path.getmtime(os.path.join(out, p)) for p in ("base/model.keras", "distill/model.keras",
                                                                   "export/int8/model.tflite")}
    start = time.perf_counter()
    assert run_prune(out, target_ratio=0.5, **SHORT) == report
    assert time.perf_counter() - start < 60
    assert stamps == {p: os.path.getmtime(os.path.join(out, p)) for p in stamps}


@pytest.mark.slow
def test_changed_flag_names_the_stage_it_invalidates(finished_run):
    out, _ = finished_run
    with pytest.raises(ValueError, match=r"distill holds a different run \(epochs: 1 -> 2\)"):
        run_prune(out, target_ratio=0.5, **{**SHORT, "distill_epochs": 2})


def test_smallest_expressible_network():
    # Widths 4/9/19, one block per stage: stem + s1_b1 + s2_b1 (with shortcut) + s3_b1 + classifier.
    flops = (27 * 4 * 1024 + 2 * 9 * 4 * 4 * 1024 + (9 * 4 * 9 + 9 * 9 * 9 + 4 * 9) * 256
             + (9 * 9 * 19 + 9 * 19 * 19 + 9 * 19) * 64 + 19 * 10 + 10)
    space = read_model(CifarResNet(ArchConfig.full("resnet20")), add_mode=INDEPENDENT)
    assert smallest_ratio(space) == pytest.approx(flops / 40_813_194)


@pytest.mark.parametrize("args, message, status", [
    (["--model=resnet19"], "error: depth 19 is not valid for basic blocks", 2),
    (["--preset=huge"], "--preset", 1),
])
def test_bad_input_fails_fast_with_one_line(tmp_path, args, message, status):
    """The CLI's own refusals: what run_prune refuses (below) in one line and exit status 2, and a flag
    value absl's parser refuses (its exit status 1)."""
    result = _cli(f"--out={tmp_path / 'run'}", *args)
    assert result.returncode == status and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options, message", [
    (dict(target_ratio=0), r"target ratio must be in \(0, 1\), got 0"),
    (dict(target_ratio=1), r"target ratio must be in \(0, 1\), got 1"),
    (dict(target_ratio=0.02), "is below the smallest resnet20 the search space can express"),
    (dict(dataset_name="/no/such/data.zip"), "/no/such/data.zip"),
    (dict(teacher_path="/no/teacher.keras"), "--teacher: no such model file '/no/teacher.keras'"),
    (dict(quantizations=("int8", "int9")), r"exports must be distinct ones of none, float16, dynamic, int8, got "
                                           r"\('int8', 'int9'\)"),
    (dict(quantizations=("int8", "int8")), r"exports must be distinct ones of .* got \('int8', 'int8'\)"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, options, message):
    assert_refused_before_any_work(run_prune, tmp_path / "run", message, **options)


def test_teacher_of_another_network_and_foreign_out_dir(tmp_path):
    teacher = tmp_path / "teacher.keras"
    CifarResNet(ArchConfig.full("resnet8")).save(teacher)
    wrong = _cli(f"--out={tmp_path / 'run'}", f"--teacher={teacher}")
    assert wrong.returncode == 2 and "is not the full resnet20 for this data (it is resnet8" in wrong.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = _cli(f"--out={foreign}")
    assert refused.returncode == 2 and "holds no train.prune run" in refused.stderr
    assert (foreign / "notes.txt").read_text() == "mine"


def test_qat_without_tfmot_is_refused_before_any_training(tmp_path):
    stub = tmp_path / "stub" / "tensorflow_model_optimization"  # a TFMOT that fails to import
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError(\"No module named 'tensorflow_model_optimization'\")\n")
    start = time.perf_counter()
    result = _cli(f"--out={tmp_path / 'run'}", "--qat_epochs=2", env={**os.environ, "PYTHONPATH": str(stub.parent)})
    assert time.perf_counter() - start < 30
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: quantization-aware training needs tf_keras and tensorflow-model-optimization" in result.stderr
    assert "pip install --no-deps -r requirements-tfmot.txt" in result.stderr
    assert not (tmp_path / "run").exists()


def _tiny_folder(root, size, classes=3, train=24, test=8):
    """Class folders of random PNGs (train/ and test/), as a user's own data comes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                pixels[..., label % 3] //= 4  # a colour cue, so that the classes can be learnt
                keras.utils.save_img(folder / f"{index}.png", pixels)
    return str(root)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mobilenet_v2", "resnet18", "user_cnn"])
def test_any_model_goes_through_the_pipeline(tmp_path, model):
    """Every family the graph reader supports is searched, distilled, exported and reported like the CIFAR
    ResNets: keras.applications' MobileNetV2 trained from scratch as the base network, the ImageNet
    ResNet-18 given its base network (--teacher; `bench.coverage` puts keras.applications' ResNet-50 and
    every other family through the same job), and a user's .keras
    model taken as base and teacher, written as Keras' tutorials write classifiers (an augmentation
    Sequential, the test's functional CNN nested in it, a final softmax): it states its input (without
    --image_size every stage, the export too, reads its 8 px images from larger ones), is read through,
    searched and distilled on its logits without its augmentation, and its exports end in the softmax."""
    user = model == "user_cnn"
    # Conversion dominates the export: fp32 for all, int8 too for the user's CNN (a depthwise conv, Adds).
    quantizations = ("none", "int8") if user else ("none",)
    classes = 4 if user else 3
    dataset = _tiny_folder(tmp_path / "data", 12 if user else 32, classes=classes)
    teacher = None
    if model == "user_cnn":
        keras.utils.set_random_seed(0)
        model = str(tmp_path / "mine.keras")
        logits = user_cnn()
        pixels = keras.Input(logits.input_shape[1:], name="pixels")
        augmentation = keras.Sequential([keras.Input(logits.input_shape[1:]), keras.layers.RandomFlip("horizontal")],
                                        name="augmentation")
        probabilities = keras.layers.Softmax(name="probabilities")(logits(augmentation(pixels)))
        keras.Model(pixels, probabilities).save(model)
    elif model.startswith("resnet"):
        teacher = str(tmp_path / f"{model}.keras")
        build_model(model, (32, 32, 3), classes).save(teacher)
    out = tmp_path / "run"
    report = run_prune(str(out), model_name=model, target_ratio=0.6, dataset_name=dataset, batch_size=8,
                       base_epochs=1, search_epochs=1, distill_epochs=1,
                       quantizations=quantizations, teacher_path=teacher, check_base=False)
    trained_base = teacher is None and not model.endswith(".keras")
    base = out / "base" / "model.keras" if trained_base else teacher or model
    assert (out / "base").exists() == trained_base
    pruned = load_shape(out / "search" / "arch.json")
    full_flops = count_model(keras.models.load_model(base)).flops
    derived = keras.models.load_model(out / "distill" / "model.keras")  # a plain functional model
    assert type(derived).__name__ == "Functional"
    assert report["base"]["flops"] == full_flops
    assert report["pruned"]["flops"] == count_model(derived).flops == pruned.provenance["flops"] < full_flops
    assert report["exports"]["none"]["model"]["accuracy"] == pytest.approx(report["keras_accuracy"]["pruned"],
                                                                            abs=1e-6)
    # A given (here untrained) base network is ordered by importance, and the supernet and the pruned
    # network start from that copy; a base trained here from scratch is not.
    assert (out / "ordered" / "model.keras").exists() == (not trained_base)
    # 8 test images per class: chance is 1/classes plus three standard errors.
    chance = 1 / classes + 3 * np.sqrt((1 / classes) * (1 - 1 / classes) / (8 * classes))
    assert report["base_at_chance"] == (report["keras_accuracy"]["base"] <= chance)
    assert sorted(os.listdir(out / "export")) == sorted(quantizations)
    assert all(os.path.exists(out / "export" / q / "model.tflite") for q in quantizations)
    output = "probabilities" if user else "logits"
    for quantize in quantizations:
        exported = report["exports"][quantize]
        assert exported["model"]["output"] == exported["compare_with"]["output"] == output
    if user:
        runtime = verify.LiteRTModel(str(out / "export" / "none" / "model.tflite"), threads=1)
        pixels = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
        assert np.allclose(runtime.predict(pixels).sum(axis=-1), 1.0, atol=1e-5)
