import json

import pytest

from tas_keras.search_space import (ArchConfig, candidate_widths, conv_slots, depth_choices,
                                    parse_model_name)


@pytest.mark.parametrize("full, expected", [
    (16, (4, 6, 8, 9, 11, 12, 14, 16)),
    (32, (9, 12, 16, 19, 22, 25, 28, 32)),
    (64, (19, 25, 32, 38, 44, 51, 57, 64)),
])
def test_candidate_widths_match_design(full, expected):
    assert candidate_widths(full) == expected


@pytest.mark.parametrize("blocks, expected", [
    (3, (1, 2, 3)), (5, (1, 3, 5)), (9, (1, 3, 5, 7, 9)),
    (18, (1, 3, 5, 7, 9, 11, 13, 15, 17, 18)),
])
def test_depth_choices_match_design(blocks, expected):
    assert depth_choices(blocks) == expected


@pytest.mark.parametrize("name, parsed", [
    ("resnet20", (20, "basic")), ("resnet110", (110, "basic")), ("resnet164", (164, "bottleneck")),
    ("resnet29_bottleneck", (29, "bottleneck")),
])
def test_model_names(name, parsed):
    assert parse_model_name(name) == parsed


@pytest.mark.parametrize("name, message", [
    ("resnet21", "6n+2"), ("resnet21_bottleneck", "9n+2"), ("vgg16", "unknown model 'vgg16'"),
])
def test_bad_model_names(name, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        parse_model_name(name)


def test_conv_slots_order_and_strides():
    slots = conv_slots(20, "basic")
    assert len(slots) == 19
    assert [s.name for s in slots[:3]] == ["stem_conv", "s1_b1_conv_a", "s1_b1_conv_b"]
    assert [(s.name, s.stride) for s in slots if s.stride == 2] == [("s2_b1_conv_a", 2), ("s3_b1_conv_a", 2)]
    bottleneck = conv_slots(164, "bottleneck")
    assert len(bottleneck) == 1 + 3 * 18 * 3
    assert [(s.kernel, s.full_width) for s in bottleneck[1:4]] == [(1, 16), (3, 16), (1, 64)]
    assert bottleneck[1 + 18 * 3 + 1].stride == 2  # the 3x3 of the first stage-2 bottleneck


def _shape(**changes):
    return ArchConfig.full("resnet20").replace(**changes)


@pytest.mark.parametrize("changes, message", [
    ({"widths": [16] * 18}, "widths has 18 entries; resnet20 needs 19"),
    ({"widths": [16] * 7 + [0] + [64] * 11}, "s1_b4_conv_a|s2_b1_conv_b|: width 0 is outside"),
    ({"widths": [17] + [16] * 18}, "stem_conv: width 17 is outside 1..16"),
    ({"stage_blocks": [3, 0, 3]}, "stage 2: 0 blocks kept is outside 1..3"),
    ({"stage_blocks": [3, 4, 3]}, "stage 2: 4 blocks kept is outside 1..3"),
    ({"stage_blocks": [3, 3]}, "stage_blocks needs 3 entries"),
    ({"num_classes": 0}, "num_classes must be >= 1, got 0"),
])
def test_validation_names_layer_and_value(changes, message):
    with pytest.raises(ValueError, match=message):
        _shape(**changes)


def test_json_round_trip(tmp_path):
    arch = _shape(stage_blocks=(1, 2, 3), num_classes=100, provenance={"source": "test", "seed": 3})
    path = tmp_path / "arch.json"
    arch.save(path)
    assert ArchConfig.load(path) == arch
    assert json.loads(path.read_text())["model"] == "resnet20"
    with pytest.raises(ValueError, match=r"unknown ArchConfig keys \['colour'\]"):
        ArchConfig.from_dict({**arch.to_dict(), "colour": 1})


def test_load_reports_missing_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="cannot read shape file .*nope.json"):
        ArchConfig.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="is not JSON"):
        ArchConfig.load(bad)


def test_released_shapes_import_and_export(released_shapes):
    assert len(released_shapes) == 17
    for path in released_shapes:
        arch = ArchConfig.load(path)
        raw = json.loads(path.read_text())
        assert [arch.input_shape[-1], *arch.widths] == [int(c) for c in raw["xchannels"][1]]
        if raw["super_type"][1] == "infer-width":
            assert arch.stage_blocks == (arch.num_blocks,) * 3
        else:
            assert list(arch.stage_blocks) == [int(b) for b in raw["xblocks"][1]]
        exported = arch.to_released(mflops=1.0)
        again = ArchConfig.from_released(exported)
        assert (again.widths, again.stage_blocks, again.num_classes) == (
            arch.widths, arch.stage_blocks, arch.num_classes)


def test_released_bottleneck_and_width_only(released_shapes):
    by_name = {p.name: ArchConfig.load(p) for p in released_shapes}
    r164 = by_name["NeurIPS-2019__C010-ResNet164.config"]
    assert (r164.depth, r164.block, r164.stage_blocks) == (164, "bottleneck", (13, 15, 13))
    fixed = by_name["compares__CIFAR100-FIX-R32.config"]
    assert (fixed.num_classes, fixed.stage_blocks, set(fixed.widths)) == (100, (5, 5, 5), {12, 25, 50})
    assert fixed.provenance["super_type"] == "infer-width"


_FULL20 = ArchConfig.full("resnet20").to_dict()
_RELEASED20 = {"dataset": ["str", "cifar"], "depth": ["int", "20"], "module": ["str", "ResNetBasicblock"],
               "super_type": ["str", "infer-shape"], "class_num": ["int", "10"],
               "xchannels": ["int", ["3"] + [str(w) for w in _FULL20["widths"]]], "xblocks": ["int", ["3", "3", "3"]]}


@pytest.mark.parametrize("shape, message", [
    ({"widths": [1, 2]}, r"missing keys \['depth', 'block', 'num_classes', 'stage_blocks'\]"),
    ([1, 2], r"a shape is a JSON object with keys .*, got list \[1, 2\]"),
    (None, "a shape is a JSON object"),
    ({**_FULL20, "widths": [16] * 18}, "widths has 18 entries; resnet20 needs 19"),
    ({**_FULL20, "widths": [17] + [16] * 18}, r"stem_conv: width 17 is outside 1\.\.16"),
    ({**_FULL20, "widths": ["16"] * 19}, r"widths must be a list of integers, got \['16'"),
    ({**_FULL20, "widths": 16}, "widths must be a list of integers, got 16"),
    ({**_FULL20, "stage_blocks": None}, "stage_blocks must be a list of integers, got None"),
    ({**_FULL20, "stage_blocks": [3, 3, 3, 3]}, "stage_blocks needs 3 entries"),
    ({**_FULL20, "depth": "twenty"}, "depth must be an integer, got 'twenty'"),
    ({**_FULL20, "depth": 22}, "depth 22 is not valid for basic blocks"),
    ({**_FULL20, "block": 3}, r"block must be one of \('basic', 'bottleneck'\), got 3"),
    ({**_FULL20, "input_shape": 32}, "input_shape must be a list of integers, got 32"),
    ({**_FULL20, "provenance": [1]}, r"provenance must be a JSON object, got \[1\]"),
    ({**_FULL20, "model": "resnet56"}, r"model 'resnet56' contradicts depth 20 and block 'basic' \(a resnet20\)"),
    # Released files: a ResNet-56 shape under a ResNet-20 header, missing or malformed entries.
    ({**_RELEASED20, "xchannels": ["int", ["3"] + ["16"] * 55]}, "widths has 55 entries; resnet20 needs 19"),
    ({k: v for k, v in _RELEASED20.items() if k != "xchannels"}, r"missing keys \['xchannels'\]"),
    ({**_RELEASED20, "depth": 20}, r"depth: expected a \[type, value\] pair, got 20"),
    ({**_RELEASED20, "xblocks": ["int", "3"]}, "xblocks must be a list of integers, got '3'"),
    ({**_RELEASED20, "class_num": ["int", "ten"]}, "class_num must be an integer, got 'ten'"),
])
def test_a_file_that_is_not_a_shape_is_refused_in_one_line(tmp_path, shape, message):
    path = tmp_path / "shape.json"
    path.write_text(json.dumps(shape))
    with pytest.raises(ValueError, match=rf"^shape file '{path}' is not a valid shape: {message}") as refused:
        ArchConfig.load(path)
    assert type(refused.value) is ValueError and "\n" not in str(refused.value)


def test_the_shapes_the_bad_ones_were_made_from_load(tmp_path):
    for name, shape in (("arch.json", _FULL20), ("released.config", _RELEASED20)):
        (tmp_path / name).write_text(json.dumps(shape))
        assert ArchConfig.load(tmp_path / name) == ArchConfig.full("resnet20").replace(
            provenance=ArchConfig.load(tmp_path / name).provenance)
