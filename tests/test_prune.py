import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from tas_keras.export import verify
from tas_keras.export.exporter import ExportConfig
from tas_keras.cost import count_model
from tas_keras.graph import read_model
from tas_keras.graph_space import INDEPENDENT
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.models.registry import build_model
from tas_keras.search_space import ArchConfig
from tas_keras.shapes import load_shape
from tas_keras.prune import PRESETS, PruneConfig, run_prune, smallest_ratio
from tas_keras.search import SearchConfig

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


@pytest.mark.slow
def test_the_stages_of_a_run_record_what_they_recorded_before_the_job_had_a_config(finished_run):
    """Runs made before PruneConfig resume: its stages' run.json are the ones the job wrote before (these
    literals are its settings for SHORT: the quick preset with 1/2/1 epochs on 512 images)."""
    out, _ = finished_run
    data = {"data_dir": None, "seed": 0, "image_size": None, "max_train_examples": 512, "mixed_precision": None,
            "learning_rate": 0.1}
    assert json.load(open(os.path.join(out, "base", "run.json"))) == {
        **data, "dataset": "cifar10_mini", "epochs": 1, "batch_size": 128, "model": "resnet20", "arch": None,
        "stage": "base"}
    assert json.load(open(os.path.join(out, "search", "run.json"))) == {
        **data, "dataset_name": "cifar10_mini", "epochs": 2, "batch_size": 64, "model_name": "resnet20",
        "target_ratio": 0.5, "cost_metric": "flops", "cost_weight": 2.0, "tolerance": 0.05, "band": "code",
        "tau_schedule": "cosine", "tau_max": 5.0, "tau_min": 0.1, "width_multiple": 1, "arch_learning_rate": None,
        "arch_warmup": 0.3, "arch_decay": "cosine", "entropy_weight": 0.0, "init_from": None,
        "latency_table": None, "target_latency_ms": None, "stage": "search"}
    assert json.load(open(os.path.join(out, "distill", "run.json"))) == {
        **data, "dataset_name": "cifar10_mini", "epochs": 1, "batch_size": 128,
        "arch_path": os.path.join(out, "search", "arch.json"), "teacher_path": os.path.join(out, "base", "model.keras"),
        "mode": "kd", "alpha": 0.9, "temperature": 4.0, "stage": "distill"}


def test_presets_are_the_schedules_the_docs_give():
    """docs/guide.md's preset table: quick 5/6/5 epochs at batch 128 (search 64); paper the reference's
    300/600/300 at 256 with its architecture step on cifar10; mobile the quick schedule against int8
    latency in multiples of 16, exported to int8, timed on one thread."""
    schedule = lambda c: (c.dataset_name, c.base.epochs, c.search.epochs, c.distill.epochs,  # noqa: E731
                          c.base.batch_size, c.search.batch_size, c.distill.batch_size, c.export.latency_runs)
    quick, paper, mobile = PRESETS["quick"], PRESETS["paper"], PRESETS["mobile"]
    assert quick == PruneConfig()
    assert schedule(quick) == ("cifar10_mini", 5, 6, 5, 128, 64, 128, 100)
    assert schedule(paper) == ("cifar10", 300, 600, 300, 256, 256, 256, 500)
    assert (paper.search.arch_learning_rate, paper.search.arch_warmup, paper.search.arch_decay,
            paper.search.entropy_weight) == (1e-3, 0.0, "constant", 0.0)
    assert schedule(mobile) == schedule(quick)
    assert (mobile.cost_metric, mobile.width_multiple, mobile.quantizations, mobile.export.threads) == (
        "latency", 16, ("int8",), 1)


def test_a_prune_config_takes_stage_settings_by_the_flags_names():
    config = PRESETS["quick"].replace(search_epochs=2, export_threads=1, seed=3)
    assert (config.search.epochs, config.export.threads, config.seed) == (2, 1, 3)
    assert config.base == PRESETS["quick"].base and config.distill == PRESETS["quick"].distill
    # batch_size: base and KD; each search half at most that (the preset's 64 otherwise)
    small, large = PRESETS["quick"].replace(batch_size=8), PRESETS["quick"].replace(batch_size=512)
    assert (small.base.batch_size, small.search.batch_size, small.distill.batch_size) == (8, 8, 8)
    assert (large.base.batch_size, large.search.batch_size, large.distill.batch_size) == (512, 64, 512)
    given = PRESETS["quick"].replace(search=SearchConfig(epochs=9), search_batch_size=16)
    assert (given.search.epochs, given.search.batch_size) == (9, 16)


@pytest.mark.parametrize("overrides, message", [
    (dict(search_epoch=3), "SearchConfig has no setting 'epoch'"),
    (dict(stages=3), "PruneConfig has no setting 'stages'"),
    (dict(search=SearchConfig(seed=1)), "the main job sets the search stage's seed itself, got 1; set seed of "
                                        "the PruneConfig"),
    (dict(search=SearchConfig(init_from="a.keras")), "the main job sets the search stage's init_from itself"),
    (dict(search_epochs=0), r"epochs, batch_size and learning_rate must be positive, got 0"),
    (dict(cost_metric="watts"), "cost must be one of"),
    (dict(latency_table="t.json"), "a latency table or target is for the latency cost, got cost 'flops'"),
    (dict(model_name="a.keras", teacher_path="b.keras"), "a.keras is the base network and the teacher"),
    (dict(qat_epochs=-1), "qat epochs must be >= 0, got -1"),
])
def test_a_prune_config_refuses_a_bad_setting_quoting_it(overrides, message):
    with pytest.raises(ValueError, match=message):
        PRESETS["quick"].replace(**overrides)


def test_a_prune_config_comes_back_from_its_record():
    config = PRESETS["mobile"].replace(model_name="resnet32", search_epochs=3, batch_size=32, seed=2,
                                       quantizations=["none", "int8"], export_latency_runs=50)
    record = json.loads(json.dumps(config.run_record()))
    # less how long the exports are timed: how a run runs is not recorded
    assert PruneConfig.from_dict(record) == config.replace(export_latency_runs=ExportConfig().latency_runs)
    assert record["base"] == {"epochs": 5, "batch_size": 32, "learning_rate": 0.1}


def test_smallest_expressible_network():
    # Widths 4/9/19, one block per stage: stem + s1_b1 + s2_b1 (with shortcut) + s3_b1 + classifier.
    flops = (27 * 4 * 1024 + 2 * 9 * 4 * 4 * 1024 + (9 * 4 * 9 + 9 * 9 * 9 + 4 * 9) * 256
             + (9 * 9 * 19 + 9 * 19 * 19 + 9 * 19) * 64 + 19 * 10 + 10)
    space = read_model(CifarResNet(ArchConfig.full("resnet20")), add_mode=INDEPENDENT)
    assert smallest_ratio(space) == pytest.approx(flops / 40_813_194)


@pytest.mark.parametrize("args, message, status", [
    (["--model=resnet19"], "error: depth 19 is not valid for basic blocks", 2),
    (["--preset=huge"], "--preset", 1),
    (["--quantize=int8,int9", "--search_epochs=1"], "exports must be distinct ones of none, float16, dynamic, "
                                                   "int8, got ('int8', 'int9')", 2),
    (["--preset=paper", "--search_epochs=0"], "--search_epochs", 1),
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
