import itertools
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tas_keras.cifar_shapes import arch_from_shape
from tas_keras.derive import derive_model
from tas_keras.export import layer_latency
from tas_keras.graph import read_model
from tas_keras.graph_space import GraphShape
from tas_keras.latency import TABLE_FORMAT, LatencyLayout, LatencyTable, SupernetLatency, predict_latency
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.models.registry import build_model
from tas_keras.prune import PRESETS, run_prune
from tas_keras.search import TASSearchModel, run_search
from tas_keras.shapes import shape_space
from tas_keras.supernet import build_supernet

from .conftest import REPO, assert_refused_before_any_work
from .test_supernet import dense_cnn

# The op classes a synthetic table prices: a unit's time is PRICE[its op's class] * in * out * h * w
# (h x w: the size of its input) + 1e-3 ms, so a test can total a derived network from its layers.
PRICE = {"Conv2D": 3e-7, "DepthwiseConv2D": 5e-7, "Dense": 2e-7, "Add": 1e-7, "GlobalAveragePooling2D": 4e-8,
         "AveragePooling2D": 6e-8, "ZeroPadding2D": 2e-8}


def _time(op_class, size, a, b):
    return PRICE[op_class] * a * b * int(np.prod(size)) + 1e-3


def synthetic_table(layout, quantize="none", threads=1, fixed_ms=0.0123):
    """A complete table covering `layout`'s space exactly, with the priced times (ms), as a dict."""
    entries = {}
    for key, (geometry, pairs) in layout.required_entries().items():
        op_class, size = key.split("/")[0].split("+")[0], geometry["inputs"][0][:-1]
        entries[key] = {"geometry": geometry, "times": {f"{a}->{b}": {"ms": _time(op_class, size, a, b)}
                                                        for a, b in pairs}}
    return {"format": TABLE_FORMAT, "complete": True, "quantize": quantize, "threads": threads,
            "space": {"models": [layout.space.name], "input_shape": list(layout.input_shape),
                      "num_classes": layout.num_classes, "width_multiple": layout.space.multiple_of},
            "environment": {"machine": "test"}, "fixed": {"ms": fixed_ms}, "entries": entries}


def priced_latency(model, fixed_ms=0.0123):
    """The synthetic table's latency of a built Keras network, from its layers alone: every op that is not
    a BN or a ReLU the converter fuses into the op before it, priced at its input and output channels."""
    total = fixed_ms
    for layer in model.layers:
        inputs = layer.input if isinstance(layer.input, list) else [layer.input]
        before = None if isinstance(layer, keras.layers.InputLayer) else inputs[0]._keras_history.operation
        folded = isinstance(layer, keras.layers.BatchNormalization) or (
            isinstance(layer, keras.layers.ReLU) and isinstance(before, (
                keras.layers.BatchNormalization, keras.layers.Conv2D, keras.layers.Add)))
        if type(layer).__name__ not in PRICE or folded:
            assert folded or isinstance(layer, (keras.layers.InputLayer, keras.layers.ReLU)), layer
            continue
        total += _time(type(layer).__name__, inputs[0].shape[1:-1], inputs[0].shape[-1], layer.output.shape[-1])
    return total


def tiny_model(path=None, blocks=2, classes=10, image=32):
    """A small MobileNet-like network: a strided stem, `blocks` droppable depthwise-separable residual blocks,
    a projection to a wider head conv, pooling and a classifier."""
    image_input = x = keras.Input((image, image, 3), name="image")
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(6.0, name="stem_relu")(x)
    for index in range(blocks):
        y = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"block{index}_dw")(x)
        y = keras.layers.BatchNormalization(name=f"block{index}_dw_bn")(y)
        y = keras.layers.ReLU(6.0, name=f"block{index}_dw_relu")(y)
        y = keras.layers.Conv2D(16, 1, use_bias=False, name=f"block{index}_pw")(y)
        y = keras.layers.BatchNormalization(name=f"block{index}_pw_bn")(y)
        x = keras.layers.Add(name=f"block{index}_add")([x, y])
    x = keras.layers.Conv2D(32, 1, name="head_conv")(x)
    x = keras.layers.ReLU(name="head_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(image_input, keras.layers.Dense(classes, name="logits")(x), name="tiny")
    if path:
        model.save(path)
    return model


def _setup(model_name, model, width_multiple, add_mode=None):
    supernet = build_supernet(model_name, model, add_mode, width_multiple)
    return supernet, layer_latency.table_layout(model_name, model, width_multiple, add_mode)


def _randomise(supernet, seed):
    rng = np.random.default_rng(seed)
    for variable in supernet.arch_variables:
        variable.assign(rng.normal(0, 1.5, variable.shape).astype(np.float32))


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _brute_force_expectation(supernet, layout, table):
    """sum over every shape of P(shape) * the table latency of its derived network."""
    space = supernet.space
    widths = [(choice.candidates, _softmax(choice.alpha.numpy()) if choice.alpha is not None else np.ones(1))
              for choice in supernet.width_choices]
    depths = [(mixer.depth_choices, _softmax(mixer.beta.numpy())) for _, mixer in supernet.stages]
    expected = 0.0
    for pick in itertools.product(*[range(len(c)) for c, _ in widths + depths]):
        width_pick, depth_pick = pick[:len(widths)], pick[len(widths):]
        p = np.prod([p[i] for (_, p), i in zip(widths + depths, pick)])
        shape = space.shape({slot.name: c[i] for slot, (c, _), i in zip(space.searchable_slots, widths, width_pick)},
                            {stage.name: c[i] for (stage, _), (c, _), i in zip(supernet.stages, depths, depth_pick)})
        expected += p * predict_latency(layout, shape, table)
    return expected


def test_units_are_the_ops_the_converter_leaves():
    """BN and ReLU/ReLU6 fold into the conv before them, a ReLU after an Add into the Add; equal layers share
    a geometry; the names of layers are not part of it."""
    supernet, layout = _setup("tiny.keras", tiny_model(), 8)
    units = {unit.name: unit for unit in layout.units}
    assert [[layer.name for layer in unit.layers] for unit in layout.units] == [
        ["stem", "stem_bn", "stem_relu"], ["block0_dw", "block0_dw_bn", "block0_dw_relu"],
        ["block0_pw", "block0_pw_bn"], ["block0_add"], ["block1_dw", "block1_dw_bn", "block1_dw_relu"],
        ["block1_pw", "block1_pw_bn"], ["block1_add"], ["head_conv", "head_relu"], ["pool"], ["logits"]]
    assert units["block0_pw"].key == units["block1_pw"].key and units["block0_dw"].key == units["block1_dw"].key
    assert units["block0_dw"].one_width and not units["head_conv"].one_width
    assert re.fullmatch(r"DepthwiseConv2D\+BatchNormalization\+ReLU/16x16/[0-9a-f]{10}", units["block0_dw"].key)
    renamed = tiny_model()
    for layer in renamed.layers:
        layer.name = f"other_{layer.name}"
    assert {unit.key for unit in layer_latency.table_layout("t.keras", renamed, 8).units} == {
        unit.key for unit in layout.units}


@pytest.mark.parametrize("model_name, multiple, add_mode", [
    ("tiny.keras", 4, None), ("tiny.keras", 4, "independent"), ("resnet14", 32, None)])
def test_expected_latency_equals_the_brute_force_expectation(model_name, multiple, add_mode):
    # The tiny model, tied: 4 widths of the stem/block slot (read and written by the depthwise convs and
    # Adds), 7 of the head conv, 1 or 2 blocks (56 shapes); independent: 4 widths of each pointwise conv
    # too, projections where they differ from their block's input, the head conv reading the depth
    # mixture of the block outputs (896 shapes). resnet14 (independent Adds): 2 depths per stage, 2 widths
    # of each stage-3 conv, the stage outputs reaching the next stage and the classifier through the depth
    # mixture (128 shapes).
    model = tiny_model() if model_name == "tiny.keras" else build_model(model_name, (8, 8, 3), 10)
    supernet, layout = _setup(model_name, model, multiple, add_mode)
    table = LatencyTable(synthetic_table(layout))
    _randomise(supernet, seed=1)
    latency = SupernetLatency(supernet, layout, table)
    assert float(latency.expected()) == pytest.approx(_brute_force_expectation(supernet, layout, table), rel=1e-5)


def test_expected_latency_is_differentiable_in_alpha_and_beta():
    supernet, layout = _setup("resnet14", build_model("resnet14", (8, 8, 3), 10), 16)
    latency = SupernetLatency(supernet, layout, LatencyTable(synthetic_table(layout)))
    with tf.GradientTape() as tape:
        expected = latency.expected()
    gradients = tape.gradient(expected, supernet.arch_variables)
    assert all(g is not None and np.abs(g.numpy()).sum() > 0 for g in gradients)


@pytest.mark.parametrize("model_name, seed", [("mobilenet_v2", 0), ("mobilenet_v2", 1), ("resnet14", 2)])
def test_argmax_latency_is_the_priced_latency_of_the_derived_network(model_name, seed):
    size = 32 if model_name == "mobilenet_v2" else 8
    model = build_model(model_name, (size, size, 3), 10)
    supernet, layout = _setup(model_name, model, 16)
    content = synthetic_table(layout)
    table = LatencyTable(content)
    _randomise(supernet, seed)
    latency = SupernetLatency(supernet, layout, table)
    shape = supernet.derive()
    derived = derive_model(model, supernet.space, shape, transfer_weights=False)
    assert float(latency.argmax()) == pytest.approx(priced_latency(derived), rel=1e-5)
    assert latency.shape_ms(shape) == pytest.approx(priced_latency(derived))
    assert latency.full_ms == pytest.approx(priced_latency(model))


def test_a_table_covers_the_full_network_whose_widths_need_not_be_candidates():
    """At width multiple 32, MobileNetV2's 144-wide expansions have candidates up to 128 only; the full
    network (the base of the latency ratios) still needs its own widths."""
    model = build_model("mobilenet_v2", (32, 32, 3), 10)
    layout = layer_latency.table_layout("mobilenet_v2", model, 32)
    assert layout.space.slot("block_2_expand").candidates[-1] == 128
    key = layout.by_name["block_2_expand"].key
    assert (24, 144) in layout.required_entries()[key][1]
    table = LatencyTable(synthetic_table(layout))
    assert predict_latency(layout, layout.space.full_shape(), table) == pytest.approx(priced_latency(model))


def test_an_interpolated_table_answers_between_its_grid():
    supernet, layout = _setup("tiny.keras", tiny_model(), 4)
    content = synthetic_table(layout)
    (key,) = [key for key in content["entries"] if key.startswith("Conv2D+ReLU/16x16")]  # the head conv: 4 -> 32
    pairs = layout.required_entries()[key][1]
    kept = layer_latency.measured_pairs(pairs, 3)
    ins, outs = sorted({a for a, _ in pairs}), sorted({b for _, b in pairs})
    assert sorted({a for a, _ in kept}) == [4, 12, 16] and ins == [4, 8, 12, 16]
    assert sorted({b for _, b in kept}) == [outs[0], outs[len(outs) // 2], 32] and len(outs) > 3
    content["entries"][key]["times"] = {pair: times for pair, times in content["entries"][key]["times"].items()
                                        if tuple(map(int, pair.split("->"))) in kept}
    table = LatencyTable(content)
    # The priced time is bilinear in (in, out), so interpolation between grid points is exact.
    assert table.time(key, 8, outs[1]) == pytest.approx(_time("Conv2D", (16, 16), 8, outs[1]))
    table.check_covers(layout)
    with pytest.raises(ValueError, match=f"has no time for {re.escape(key)} with 8 -> 36 channels"):
        table.time(key, 8, 36)


def test_a_table_that_does_not_cover_the_space_is_refused_naming_what_is_missing():
    supernet, layout = _setup("tiny.keras", tiny_model(), 8)
    content = synthetic_table(layout)
    (key,) = [key for key in content["entries"] if key.startswith("Add/")]
    del content["entries"][key]["times"]["8->8"]
    with pytest.raises(ValueError, match=rf"latency table has no time for {re.escape(key)} with 8 -> 8 channels; it "
                                         r"was made for tiny at 32x32x3, 10 classes, width multiple 8"):
        LatencyTable(content).check_covers(layout)
    other = layer_latency.table_layout("tiny.keras", tiny_model(classes=5), 8)
    with pytest.raises(ValueError, match="was made for 32x32x3 images and 10 classes, the search takes 32x32x3 "
                                         "images and 5 classes"):
        LatencyTable(synthetic_table(layout)).check_covers(other)
    with pytest.raises(ValueError, match="is unfinished"):
        LatencyTable({**content, "complete": False})


def test_a_table_of_the_first_format_is_refused_in_one_line():
    path = os.path.join(REPO, "bench", "results", "latency_tables", "resnet20_int8_1thread.json")
    with pytest.raises(ValueError, match=r"^latency table '.*resnet20_int8_1thread.json' is in format "
                                         r"'tas_keras.latency_table/1', not 'tas_keras.latency_table/2': remake it "
                                         r"with `python -m export.latency_table`$"):
        LatencyTable.load(path)


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_table_of_a_tiny_model_is_measured_and_resumes(tmp_path, monkeypatch):
    model_path = str(tmp_path / "tiny.keras")
    tiny_model(model_path, blocks=1)
    out = str(tmp_path / "table.json")
    settings = dict(models=[model_path], width_multiple=8, runs=20, warmup=2)
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
    # stem 3 -> 8, 16; the depthwise conv, the pointwise conv and the Add at 8, 16 (the Add ties the pointwise
    # conv's width to the stem's); head conv 8, 16 -> 8, 16, 24, 32; pooling at 8 ... 32; logits 8 ... 32 -> 10:
    # 24 units, plus the fixed cost.
    assert progress[0][1] == 25
    table = layer_latency.make_table(out, **settings)
    # Every model converted once (the overhead model, 24 units and the rest), across both runs.
    assert len(converted) == len(set(converted)) == 26
    assert sorted(os.listdir(tmp_path)) == ["table.json", "tiny.keras"]  # the work directory is gone
    loaded = LatencyTable.load(out)
    loaded.check_covers(layer_latency.table_layout(model_path, layer_latency.table_model(model_path), 8))
    assert table["complete"] and loaded.quantize == "none" and loaded.threads == 1
    for entry in table["entries"].values():
        for times in entry["times"].values():
            net = times["raw_median_ms"] - entry["overhead_ms"][-1]
            assert times["p10_ms"] - 1e-5 <= net <= times["p90_ms"] + 1e-5  # all rounded to 10 ns
            assert times["ms"] >= 0
    assert table["fixed"]["ms"] > 0 and table["environment"]["ai_edge_litert"]
    with pytest.raises(ValueError, match="holds a table made with threads=1, not threads=2"):
        layer_latency.make_table(out, threads=2, **settings)


def _write(path, content):
    with open(path, "w") as f:
        json.dump(content, f)
    return str(path)


@pytest.fixture(scope="module")
def table_files(tmp_path_factory):
    """Synthetic tables: resnet20's space (32x32, widths in multiples of 16) in fp32, resnet8 at 8x8."""
    directory = tmp_path_factory.mktemp("tables")
    layouts = {"resnet20_fp32": ("resnet20", (32, 32, 3), 16), "resnet8_8x8": ("resnet8", (8, 8, 3), 32)}
    return {name: _write(directory / f"{name}.json", synthetic_table(layer_latency.table_layout(
        model, build_model(model, shape, 10), multiple))) for name, (model, shape, multiple) in layouts.items()}


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
     "was made for 8x8x3 images and 10 classes, the search takes 32x32x3 images and 10 classes"),
    ("search", dict(latency_table="{resnet20_fp32}", width_multiple=8),
     r"has no time for Add\+ReLU/16x16/\w+ with 8 -> 8 channels; it was made for resnet20 at 32x32x3"),
    ("search", dict(latency_table="{resnet20_fp32}", width_multiple=16, target_latency_ms=1000.0),
     r"target latency 1000.0 ms must be in \(0, "),
    ("prune", dict(config=PRESETS["mobile"], latency_table="{resnet20_fp32}"),
     "was measured with quantize=none, but the exports are int8"),
])
def test_a_bad_latency_table_or_target_is_refused_before_any_work(tmp_path, table_files, stage, options, message):
    options = {**options, "latency_table": options["latency_table"].format(**table_files)}
    if stage == "search":
        options["cost_metric"] = "latency"
    assert_refused_before_any_work(run_search if stage == "search" else run_prune, tmp_path / "run", message,
                                   **options)


@pytest.mark.slow
def test_latency_search_of_resnet20_records_the_table_latency_of_its_shapes(tmp_path, table_files):
    out = str(tmp_path / "search")
    shape = GraphShape.from_dict(run_search(out, model_name="resnet20", epochs=2, batch_size=32,
                                            max_train_examples=256, cost_metric="latency",
                                            latency_table=table_files["resnet20_fp32"], target_ratio=0.6,
                                            width_multiple=16))
    space = shape_space(shape)
    arch = arch_from_shape(space, shape)  # the shape as the CIFAR builder takes it
    provenance = arch.provenance
    full = build_model("resnet20", (32, 32, 3), 10)
    assert provenance["latency_ms"] == pytest.approx(priced_latency(CifarResNet(arch)))
    assert provenance["full_latency_ms"] == pytest.approx(priced_latency(full))
    assert provenance["latency_table"]["quantize"] == "none" and provenance["cost_metric"] == "latency"
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    for entry in history:
        recorded = arch_from_shape(space, space.shape(entry["widths"], entry["depths"]))
        assert entry["latency"] == pytest.approx(priced_latency(CifarResNet(recorded)))
    assert provenance["latency_ratio"] == pytest.approx(provenance["latency_ms"] / provenance["full_latency_ms"])


def test_latency_search_steps_move_mobilenet_v2_towards_its_target():
    """Two search steps of MobileNetV2 (32 px, 10 classes) against a table: eagerly, as tracing its
    supernet would cost a minute (tests/test_supernet.py)."""
    keras.utils.set_random_seed(0)  # the architecture's random start decides where the argmax lands
    model = build_model("mobilenet_v2", (32, 32, 3), 10)
    supernet, layout = _setup("mobilenet_v2", model, 16)
    latency = SupernetLatency(supernet, layout, LatencyTable(synthetic_table(layout)))
    search = TASSearchModel(supernet, target_ratio=0.2, cost_metric="latency", latency=latency)
    search.compile(optimizer=keras.optimizers.SGD(0.01),
                   arch_optimizer=keras.optimizers.Adam(0.01, beta_1=0.5, beta_2=0.999))
    rng = np.random.default_rng(0)
    batches = [tuple((rng.normal(size=(4, 32, 32, 3)).astype("float32"), rng.integers(0, 10, 4).astype("int32"))
                     for _ in range(2)) for _ in range(2)]
    arch = [v.numpy() for v in supernet.arch_variables]
    start = float(latency.expected())
    assert float(latency.argmax()) > 0.2 * latency.full_ms  # above the band: the cost term pulls it down
    logs = [search.train_step(batch) for batch in batches][-1]
    assert 0.2 < float(logs["argmax_cost_ratio"]) < 1 and float(logs["cost_loss"]) > 0
    assert all(not np.array_equal(a, v.numpy()) for a, v in zip(arch, supernet.arch_variables))
    assert float(latency.expected()) < start


@pytest.mark.slow
def test_latency_search_of_a_users_model_runs_on_a_table_measured_here(tmp_path):
    """A tiny latency search of a user's .keras model on a table measured here (a few runs per unit):
    arch.json records the table latency of its shape."""
    model_name = str(tmp_path / "tiny.keras")
    tiny_model(model_name)
    table_path = str(tmp_path / "table.json")
    layer_latency.make_table(table_path, models=[model_name], width_multiple=8, runs=5, warmup=1)
    out = str(tmp_path / "search")
    shape = GraphShape.from_dict(run_search(out, model_name=model_name, epochs=1, batch_size=16,
                                            max_train_examples=128, cost_metric="latency", target_ratio=0.7,
                                            latency_table=table_path, width_multiple=8))
    layout = layer_latency.table_layout(model_name, layer_latency.table_model(model_name), 8)
    table = LatencyTable.load(table_path)
    assert shape.provenance["latency_ms"] == pytest.approx(predict_latency(layout, shape, table), rel=1e-6)
    assert shape.provenance["full_latency_ms"] == pytest.approx(
        predict_latency(layout, layout.space.full_shape(), table), rel=1e-6)
    assert shape.provenance["cost_metric"] == "latency"


@pytest.mark.slow
def test_mobile_preset_on_a_users_model_reports_predicted_beside_measured(tmp_path):
    model_path = str(tmp_path / "tiny.keras")
    tiny_model(model_path)
    layout = layer_latency.table_layout(model_path, layer_latency.table_model(model_path), 16)
    table_path = _write(tmp_path / "int8_x16.json", synthetic_table(layout, quantize="int8", fixed_ms=0.001))
    out = str(tmp_path / "run")
    report = run_prune(out, model_name=model_path, config=PRESETS["mobile"], latency_table=table_path, target_ratio=0.8,
                       search_epochs=1, distill_epochs=1, max_train_examples=256, check_base=False)
    shape = GraphShape.from_dict(report["searched_shape"])
    assert all(w % 16 == 0 for w in shape.widths.values())
    assert sorted(os.listdir(os.path.join(out, "export"))) == ["int8"]
    assert report["cost"] == "latency" and report["latency"]["threads"] == 1
    assert report["latency"]["predicted_ms"]["pruned"] == shape.provenance["latency_ms"]
    assert report["latency"]["measured_ms"]["pruned"] == report["exports"]["int8"]["model"]["latency_ms"]
    assert "latency predicted by the table (1 thread(s))" in open(os.path.join(out, "report.md")).read()


def test_a_concatenate_of_searched_widths_is_refused_in_one_line():
    model = dense_cnn()
    with pytest.raises(ValueError, match=r"^the latency cost does not cover a Concatenate of searched widths "
                                         r"\(d1_l1_concat in dense_cnn\); search its FLOPs instead$"):
        LatencyLayout(read_model(model), model)
