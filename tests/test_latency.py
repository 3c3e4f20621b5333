import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tas_keras.export import layer_latency
from tas_keras.cifar_shapes import arch_from_shape
from tas_keras.graph_space import GraphShape
from tas_keras.latency import TABLE_FORMAT, LatencyTable, SupernetLatency, predict_latency, required_entries
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.search import run_search
from tas_keras.search_space import ArchConfig
from tas_keras.supernet import build_supernet
from tas_keras.prune import run_prune

from .conftest import REPO, assert_refused_before_any_work


def synthetic_table(full, width_multiple, quantize="none", seed=0):
    """A complete table for the search space of `full` with random times (ms), as a dict."""
    rng = np.random.default_rng(seed)
    entries = {geometry.key: {"geometry": geometry.to_dict(),
                              "times": {f"{a}->{b}": {"ms": float(rng.uniform(0.001, 0.1))} for a, b in pairs}}
               for geometry, pairs in required_entries(full, width_multiple).items()}
    return {"format": TABLE_FORMAT, "complete": True, "quantize": quantize, "threads": 1,
            "space": {"models": [full.name], "input_shape": list(full.input_shape), "num_classes": full.num_classes,
                      "width_multiple": width_multiple},
            "environment": {"machine": "test"}, "fixed": {"ms": 0.0123}, "entries": entries}


def table_latency(table, arch):
    """The latency of the plain network of `arch` (a basic-block CIFAR ResNet) from the table's entries,
    following docs/design.md section 3's network, written out independently of tas_keras.latency."""
    times = table["entries"]

    def t(key, a, b):
        return times[key]["times"][f"{a}->{b}"]["ms"]

    n = arch.num_blocks
    size = arch.input_shape[0]
    widths = iter(arch.widths)
    width = next(widths)
    total = table["fixed"]["ms"] + t(f"conv3x3/s1/{size}x{size}/bn/relu", arch.input_shape[-1], width)
    for stage in range(3):
        stage_widths = [(next(widths), next(widths)) for _ in range(n)]
        for block, (width_a, width_b) in enumerate(stage_widths[:arch.stage_blocks[stage]]):
            stride = 2 if stage > 0 and block == 0 else 1
            out = size // stride
            total += t(f"conv3x3/s{stride}/{size}x{size}/bn/relu", width, width_a)
            total += t(f"conv3x3/s1/{out}x{out}/bn/add_relu", width_a, width_b)
            if stride == 2:
                total += t(f"conv1x1/s1/{size}x{size}/pool", width, width_b)
            elif width != width_b:
                total += t(f"conv1x1/s1/{size}x{size}/bn", width, width_b)
            width, size = width_b, out
    return total + t(f"head/{size}x{size}", width, arch.num_classes)


def _supernet(full, width_multiple):
    """The search's supernet of the CIFAR ResNet `full` (independent Adds, every conv normalised)."""
    return build_supernet(full.name, CifarResNet(full), width_multiple=width_multiple)


def _randomise(supernet, seed):
    rng = np.random.default_rng(seed)
    for variable in supernet.arch_variables:
        variable.assign(rng.normal(0, 1.5, variable.shape).astype(np.float32))


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _brute_force_expectation(supernet, table):
    """sum over every width and depth combination of P(combination) * its table latency."""
    space = supernet.space
    widths = [(choice.candidates, _softmax(choice.alpha.numpy()) if choice.alpha is not None else np.ones(1))
              for choice in supernet.width_choices]
    depths = [(mixer.depth_choices, _softmax(mixer.beta.numpy())) for _, mixer in supernet.stages]
    expected = 0.0
    for width_pick in itertools.product(*[range(len(c)) for c, _ in widths]):
        p_widths = np.prod([p[i] for (_, p), i in zip(widths, width_pick)])
        shape_widths = {slot.name: c[i] for slot, (c, _), i in zip(space.searchable_slots, widths, width_pick)}
        for depth_pick in itertools.product(*[range(len(c)) for c, _ in depths]):
            p = p_widths * np.prod([p[i] for (_, p), i in zip(depths, depth_pick)])
            shape = GraphShape(shape_widths, {stage.name: c[i] for (stage, _), (c, _), i in zip(
                supernet.stages, depths, depth_pick)})
            expected += p * table_latency(table, arch_from_shape(space, shape))
    return expected


@pytest.mark.parametrize("model, multiple", [("resnet8", 8), ("resnet14", 32)])
def test_expected_latency_equals_the_brute_force_expectation(model, multiple):
    # resnet8 (one block per stage): 2 x 2 x 2 x 4 x 4 x 7 x 7 = 6,272 width combinations, projections
    # in stage 1; resnet14: 2 depths per stage, 16 width combinations of stage 3 whose stage output
    # reaches the classifier through the depth mixture.
    full = ArchConfig.full(model, input_shape=(8, 8, 3))
    supernet = _supernet(full, multiple)
    content = synthetic_table(full, multiple)
    _randomise(supernet, seed=1)
    latency = SupernetLatency(supernet, LatencyTable(content))
    assert float(latency.expected()) == pytest.approx(_brute_force_expectation(supernet, content), rel=1e-5)


def test_expected_latency_is_differentiable_in_alpha_and_beta():
    full = ArchConfig.full("resnet14", input_shape=(8, 8, 3))
    supernet = _supernet(full, 16)
    latency = SupernetLatency(supernet, LatencyTable(synthetic_table(full, 16)))
    with tf.GradientTape() as tape:
        expected = latency.expected()
    gradients = tape.gradient(expected, supernet.arch_variables)
    assert all(g is not None and np.abs(g.numpy()).sum() > 0 for g in gradients)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_argmax_latency_is_the_table_latency_of_the_derived_network(seed):
    full = ArchConfig.full("resnet14", input_shape=(8, 8, 3))
    supernet = _supernet(full, 8)
    content = synthetic_table(full, 8, seed=seed)
    _randomise(supernet, seed)
    latency = SupernetLatency(supernet, LatencyTable(content))
    derived = arch_from_shape(supernet.space, supernet.derive())
    assert float(latency.argmax()) == pytest.approx(table_latency(content, derived), rel=1e-5)
    assert latency.shape_ms(supernet.derive()) == pytest.approx(table_latency(content, derived))
    assert predict_latency(derived, LatencyTable(content)) == pytest.approx(table_latency(content, derived))
    assert latency.full_ms == pytest.approx(table_latency(content, full))


def test_table_lookup_names_what_is_missing():
    full = ArchConfig.full("resnet8", input_shape=(8, 8, 3))
    table = LatencyTable(synthetic_table(full, 32))
    table.check_covers("resnet8", input_shape=(8, 8, 3), width_multiple=32)
    with pytest.raises(ValueError, match=r"has no time for conv3x3/s1/8x8/bn/relu with 3 -> 8 channels; it was "
                                         r"made for resnet8 at 8x8x3, 10 classes, width multiple 32"):
        table.check_covers("resnet8", input_shape=(8, 8, 3), width_multiple=8)
    with pytest.raises(ValueError, match="is unfinished"):
        LatencyTable({**table.content, "complete": False})


def test_latency_cost_refuses_a_space_its_tables_do_not_cover(tmp_path):
    full = ArchConfig.full("resnet8", input_shape=(8, 8, 3))
    tied = build_supernet("resnet8", CifarResNet(full), add_mode="tied", width_multiple=32)
    with pytest.raises(ValueError, match="the latency cost covers the CIFAR ResNets read with independent Adds "
                                         r"\(the layer geometries latency tables hold\), not resnet8 read with tied"):
        SupernetLatency(tied, LatencyTable(synthetic_table(full, 32)))
    with pytest.raises(ValueError, match="the latency cost covers the CIFAR ResNets with independent Adds .*, not "
                                         "mobilenet_v2 with tied Adds"):
        run_search(str(tmp_path / "search"), model_name="mobilenet_v2", cost_metric="latency",
                   latency_table="/no/table.json")
    assert not (tmp_path / "search").exists()


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_table_of_a_tiny_model_is_measured_and_resumes(tmp_path, monkeypatch):
    out = str(tmp_path / "table.json")
    settings = dict(models=["resnet8"], input_shape=(8, 8, 3), width_multiple=32, runs=20, warmup=2)
    converted = []
    convert = layer_latency.convert_model
    monkeypatch.setattr(layer_latency, "convert_model", lambda model, *args, **kwargs: (
        converted.append(args[1]), convert(model, *args, **kwargs)))
    progress = []

    def stop_after_three(done, total):
        progress.append((done, total))
        if done == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        layer_latency.make_table(out, progress=stop_after_three, **settings)
    assert not os.path.exists(out) or not json.load(open(out))["complete"]
    # 16 width pairs in 9 geometries for resnet8 at 8x8 with widths 16 | 32 | 32, 64, plus the fixed cost.
    assert progress[0][1] == 17
    table = layer_latency.make_table(out, **settings)
    # Every model converted once (the overhead model, 16 layers and the rest), across both runs.
    assert len(converted) == len(set(converted)) == 18
    assert os.listdir(tmp_path) == ["table.json"]  # the work directory is gone
    loaded = LatencyTable.load(out)
    loaded.check_covers("resnet8", input_shape=(8, 8, 3), width_multiple=32)
    assert table["complete"] and loaded.quantize == "none" and loaded.threads == 1
    for entry in table["entries"].values():
        for times in entry["times"].values():
            net = times["raw_median_ms"] - entry["overhead_ms"][-1]
            assert times["p10_ms"] - 1e-5 <= net <= times["p90_ms"] + 1e-5  # all rounded to 10 ns
            assert times["ms"] >= 0
    geometry = table["entries"]["conv3x3/s1/2x2/bn/add_relu"]["times"]
    assert geometry["64->64"]["ms"] > geometry["32->32"]["ms"]  # 4x the MACs
    assert table["fixed"]["ms"] > 0 and table["environment"]["ai_edge_litert"]
    with pytest.raises(ValueError, match="holds a table made with threads=1, not threads=2"):
        layer_latency.make_table(out, threads=2, **settings)


@pytest.fixture(scope="module")
def table_files(tmp_path_factory):
    """Synthetic tables: resnet20's space (32x32, widths in multiples of 16) in fp32, and resnet8 at 8x8."""
    directory = tmp_path_factory.mktemp("tables")
    tables = {"resnet20_fp32": synthetic_table(ArchConfig.full("resnet20"), 16),
              "resnet8_8x8": synthetic_table(ArchConfig.full("resnet8", input_shape=(8, 8, 3)), 32)}
    paths = {}
    for name, content in tables.items():
        paths[name] = str(directory / f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(content, f)
    return paths


def test_cli_refuses_cost_flags_that_do_not_say_one_target_in_one_line(tmp_path, table_files):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "train.search", f"--out={out}", "--cost=latency",
                             f"--latency_table={table_files['resnet20_fp32']}", "--target_flops_ratio=0.4"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr and errors == [
        "error: --cost=latency takes --target_latency_ratio or --target_latency_ms, not --target_flops_ratio"]
    assert not out.exists()


@pytest.mark.parametrize("stage, options, message", [
    ("search", dict(latency_table="/no/table.json"),
     "cannot read latency table '/no/table.json': No such file or directory"),
    ("search", dict(latency_table="{resnet8_8x8}", width_multiple=16),
     "has no time for conv3x3/s1/32x32/bn/relu with 3 -> 16 channels; it was made for resnet8 at 8x8x3"),
    ("search", dict(latency_table="{resnet20_fp32}", width_multiple=16, target_latency_ms=1000.0),
     r"target latency 1000.0 ms must be in \(0, "),
    ("prune", dict(preset="mobile", latency_table="{resnet20_fp32}"),
     "was measured with quantize=none, but the mobile preset exports int8"),
])
def test_a_bad_latency_table_or_target_is_refused_before_any_work(tmp_path, table_files, stage, options, message):
    options = {**options, "latency_table": options["latency_table"].format(**table_files)}
    if stage == "search":
        options["cost_metric"] = "latency"
    assert_refused_before_any_work(run_search if stage == "search" else run_prune, tmp_path / "run", message,
                                   **options)


@pytest.mark.slow
def test_latency_search_records_the_table_latency_of_its_shapes(tmp_path, table_files):
    with open(table_files["resnet20_fp32"]) as f:
        content = json.load(f)
    out = str(tmp_path / "search")
    arch = ArchConfig.from_dict(run_search(out, model_name="resnet20", epochs=2, batch_size=32, max_train_examples=256,
                                           cost_metric="latency", latency_table=table_files["resnet20_fp32"],
                                           target_ratio=0.6, width_multiple=16))
    provenance = arch.provenance
    assert provenance["latency_ms"] == pytest.approx(table_latency(content, arch))
    assert provenance["full_latency_ms"] == pytest.approx(table_latency(content, ArchConfig.full("resnet20")))
    assert provenance["latency_table"]["quantize"] == "none" and provenance["cost_metric"] == "latency"
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    for entry in history:
        shape = arch.replace(widths=entry["widths"], stage_blocks=entry["stage_blocks"])
        assert entry["latency"] == pytest.approx(table_latency(content, shape))
    assert provenance["latency_ratio"] == pytest.approx(provenance["latency_ms"] / provenance["full_latency_ms"])


@pytest.mark.slow
def test_mobile_preset_searches_latency_and_reports_predicted_beside_measured(tmp_path):
    full = ArchConfig.full("resnet14")
    table_path = str(tmp_path / "int8_x16.json")
    with open(table_path, "w") as f:  # random times: seed 3's smallest network is below the target (0.48)
        json.dump({**synthetic_table(full, 16, quantize="int8", seed=3), "threads": 1}, f)
    out = str(tmp_path / "run")
    report = run_prune(out, model_name="resnet14", preset="mobile", latency_table=table_path, target_ratio=0.6,
                       base_epochs=1, search_epochs=2, distill_epochs=1, max_train_examples=512)
    shape = ArchConfig.from_dict(report["searched_shape"])
    assert all(w % 16 == 0 for w in shape.widths)
    assert sorted(os.listdir(os.path.join(out, "export"))) == ["int8"]
    assert report["cost"] == "latency" and report["latency"]["threads"] == 1
    assert report["latency"]["predicted_ms"]["pruned"] == shape.provenance["latency_ms"]
    assert report["latency"]["measured_ms"]["pruned"] == report["exports"]["int8"]["model"]["latency_ms"]
    export = json.load(open(os.path.join(out, "export", "int8", "report.json")))
    assert export["latency"]["threads"] == 1
    (pruned,) = [m for m in export["models"] if m["role"] == "model"]
    assert pruned["predicted_latency"]["ms"] == shape.provenance["latency_ms"]
    assert "latency predicted by the table (1 thread(s))" in open(os.path.join(out, "report.md")).read()
