"""The graph reader: the search space it reads from models, what it refuses, and the FLOPs it counts."""

import json
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from tas_keras import input_convention
from tas_keras.cost import count_arch, count_model, count_shape
from tas_keras.derive import derive_model
from tas_keras.graph import UnsupportedModelError, load_model, read_model, softmax_head
from tas_keras.graph_space import INDEPENDENT, TIED, GraphShape, GraphSpace
from tas_keras.models.registry import build_model
from tas_keras.search_space import ArchConfig

from .conftest import REPO
from .test_supernet import convnext_cnn, grouped_cnn, ops_cnn

L = keras.layers


@pytest.fixture(scope="module")
def imagenet_models():
    """The ImageNet models at 224 px and 1000 classes: FLOPs need the graph's shapes, no forward pass."""
    return {name: build_model(name) for name in ("mobilenet_v2", "resnet50", "resnet18")}


def _slot_of(space, layer):
    return space.layer(layer).out_slot


# The CIFAR ResNets read from their own builder's graph are the search space of docs/design.md section 4.

def test_cifar_resnet_space_is_the_reference_space():
    space = read_model(build_model("resnet20"), add_mode=INDEPENDENT)
    arch = ArchConfig.full("resnet20")
    assert [s.name for s in space.searchable_slots] == [s.name for s in arch.slots]
    # docs/design.md section 4's candidate lists.
    expected = {16: (4, 6, 8, 9, 11, 12, 14, 16), 32: (9, 12, 16, 19, 22, 25, 28, 32),
                64: (19, 25, 32, 38, 44, 51, 57, 64)}
    assert all(slot.candidates == expected[slot.full_width] for slot in space.searchable_slots)
    assert [stage.choices for stage in space.stages] == [(1, 2, 3)] * 3
    assert [stage.first_block for stage in space.stages] == ["s1_b1", "s2_b1", "s3_b1"]
    assert [[b.name for b in stage.blocks] for stage in space.stages] == [
        ["s1_b1", "s1_b2", "s1_b3"], ["s2_b2", "s2_b3"], ["s3_b2", "s3_b3"]]
    # The stride-2 shortcut conv reuses the block-output conv's choice.
    assert _slot_of(space, "s2_b1_shortcut_conv") == "s2_b1_conv_b"
    assert {s.name for s in space.slots if not s.searchable} == {"image", "head_fc"}
    assert {s.add for s in space.shortcuts} == {f"s{i}_b{j}_add" for i in (1, 2, 3) for j in (1, 2, 3)} - {
        "s2_b1_add", "s3_b1_add"}


def test_cifar_space_depth_choices_and_width_multiple():
    space = read_model(build_model("resnet56"), add_mode=INDEPENDENT, multiple_of=8)
    assert [stage.choices for stage in space.stages] == [(1, 3, 5, 7, 9)] * 3  # docs/design.md section 4
    slot = space.slot("s3_b9_conv_a")
    assert slot.candidates == (16, 24, 32, 40, 48, 56, 64)  # int(64 r) rounded to multiples of 8
    bottleneck = read_model(build_model("resnet29_bottleneck"), add_mode=INDEPENDENT)
    # The bottleneck's stage 1 opens with a projection block (16 -> 64 channels).
    assert [stage.opener for stage in bottleneck.stages] == ["s1_b1", "s2_b1", "s3_b1"]
    assert _slot_of(bottleneck, "s1_b1_shortcut_conv") == "s1_b1_conv_c"


def test_tied_mode_ties_every_add_input():
    space = read_model(build_model("resnet20"), add_mode=TIED)
    assert {_slot_of(space, f"s1_b{i}_conv_b") for i in (1, 2, 3)} == {"stem_conv"}
    assert {_slot_of(space, n) for n in ("s2_b1_conv_b", "s2_b1_shortcut_conv", "s2_b3_conv_b")} == {
        _slot_of(space, "s2_b1_conv_b")}
    assert not space.shortcuts


def test_mobilenet_v2_space(imagenet_models):
    space = read_model(imagenet_models["mobilenet_v2"])
    # The paper's table (t, c, n, s): stages of n = 2, 3, 4, 3, 3 blocks have identity blocks; the
    # first block of each (stride 2 or a new width) has no Add and is always kept.
    assert [stage.opener for stage in space.stages] == ["block_1", "block_3", "block_6", "block_10", "block_13"]
    assert [stage.num_blocks for stage in space.stages] == [2, 3, 4, 3, 3]
    assert [stage.choices for stage in space.stages] == [(1, 2), (1, 2, 3), (1, 3, 4), (1, 2, 3), (1, 2, 3)]
    # A stage's project convs share one width; depthwise convs follow their expand conv.
    assert {_slot_of(space, f"block_{i}_project") for i in (6, 7, 8, 9)} == {"block_6_project"}
    assert _slot_of(space, "block_7_depthwise") == _slot_of(space, "block_7_expand") == "block_7_expand"
    assert _slot_of(space, "expanded_conv_depthwise") == "Conv1"
    assert space.slot("Conv_1").candidates[-1] == 1280 and space.slot("predictions").fixed_reason


def test_resnet50_space_in_both_modes(imagenet_models):
    model = imagenet_models["resnet50"]
    tied = read_model(model)
    assert [stage.opener for stage in tied.stages] == [f"conv{i}_block1" for i in (2, 3, 4, 5)]
    assert [stage.num_blocks for stage in tied.stages] == [3, 4, 6, 3]  # the paper's ResNet-50 table
    stage2 = ["conv2_block1_0_conv"] + [f"conv2_block{i}_3_conv" for i in (1, 2, 3)]
    assert len({_slot_of(tied, conv) for conv in stage2}) == 1
    independent = read_model(model, add_mode=INDEPENDENT)
    assert _slot_of(independent, "conv2_block1_0_conv") == "conv2_block1_3_conv"
    assert len({_slot_of(independent, f"conv2_block{i}_3_conv") for i in (1, 2, 3)}) == 3
    assert len(independent.shortcuts) == 16 - 4  # every identity block


# Refusals: one line naming the layer and its class, in seconds.

class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="my_subclassed")
        self.conv = L.Conv2D(4, 3)

    def call(self, x):
        return self.conv(x)


def _functional(body, input_shape=(16, 16, 3)):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, body(inputs))


def _nested(x):
    return L.Dense(2)(L.GlobalAveragePooling2D()(_Subclassed()(x)))


def _shared(x):
    conv = L.Conv2D(3, 3, padding="same", name="shared_conv")
    return conv(conv(x))


def _unbuilt_sequential():
    return keras.Sequential([L.Conv2D(4, 3)], name="lazy")


def _two_inputs():
    a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    return keras.Model([a, b], L.Add(name="join")([a, b]), name="two_inputs")


REFUSED = {
    "lambda": (lambda: _functional(lambda x: L.Lambda(lambda t: t * 2, name="doubling")(x)),
               "doubling (Lambda)"),
    "recurrent": (lambda: _functional(lambda x: L.LSTM(4, name="memory")(x), (10, 3)), "memory (LSTM)"),
    "1-D conv transpose": (lambda: _functional(lambda x: L.Conv1DTranspose(4, 3, name="up")(x), (10, 3)),
                           "up (Conv1DTranspose)"),
    "nested model": (lambda: _functional(_nested), "my_subclassed (_Subclassed): a nested model that is not "
                                                   "functional"),
    "shared layer": (lambda: _functional(_shared), "shared_conv (Conv2D): a shared layer"),
    "keras.ops": (lambda: _functional(lambda x: keras.ops.mean(x, axis=-1, keepdims=True)),
                  "(Mean): a keras.ops operation on symbolic tensors that the reader has no rule for"),
    "division by a tensor": (lambda: _functional(lambda x: x / L.Conv2D(3, 1)(x)), "(TrueDivide): divides by a tensor"),
    "constant array": (lambda: _functional(lambda x: x * np.ones(3, "float32")),
                       "(Multiply): an operand array("),
    "concat on width": (lambda: _functional(lambda x: L.Concatenate(axis=2, name="side_by_side")([x, x])),
                        "side_by_side (Concatenate): concatenates along axis 2"),
    "channels_first": (
        lambda: _functional(lambda x: L.Conv2D(4, 3, data_format="channels_first", name="cf")(x)),
        "cf (Conv2D): data_format 'channels_first'"),
    "dense on a sequence": (lambda: _functional(lambda x: L.Dense(4, name="per_step")(x), (10, 3)),
                            "per_step (Dense): Dense on a 3-D input"),
    "layer norm over positions": (
        lambda: _functional(lambda x: L.LayerNormalization(axis=(1, 2, 3), name="ln")(L.Conv2D(4, 3)(x))),
        "ln (LayerNormalization): normalises over axes [1, 2, 3]; only the channel axis is supported"),
    "layer norm with rms scaling": (
        lambda: _functional(lambda x: L.LayerNormalization(rms_scaling=True, name="rms")(L.Conv2D(4, 3)(x))),
        "rms (LayerNormalization): rms_scaling"),
    "group norm": (lambda: _functional(lambda x: L.GroupNormalization(2, name="gn")(L.Conv2D(4, 3)(x))),
                   "gn (GroupNormalization): not supported: in a narrower network its groups would hold other"),
    "subclassed": (_Subclassed, "my_subclassed (_Subclassed): a subclassed model"),
    "unbuilt sequential": (_unbuilt_sequential, "lazy (Sequential): build it with a keras.Input first"),
    "two inputs": (_two_inputs, "two_inputs (Functional): the reader takes one image input"),
    "unknown size": (lambda: _functional(lambda x: L.Conv2D(4, 3, name="c")(x), (None, None, 3)),
                     "has unknown sizes"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")  # Keras deprecates what the case builds
def test_unsupported_models_are_refused_by_name(case):
    build, message = REFUSED[case]
    model = build()
    start = time.perf_counter()
    with pytest.raises(UnsupportedModelError) as error:
        read_model(model)
    assert time.perf_counter() - start < 5
    assert message in str(error.value) and "\n" not in str(error.value)


def test_layers_it_cannot_shrink_are_kept_full():
    inputs = keras.Input((16, 16, 3), name="pixels")
    x = L.Normalization(mean=[0.5, 0.4, 0.3], variance=[0.1, 0.2, 0.3], name="norm")(inputs)
    a = L.Conv2D(8, 3, padding="same", name="left")(x)
    b = L.Conv2D(8, 3, padding="same", name="right")(x)
    x = L.Concatenate(name="both")([a, b])
    x = L.Conv2D(12, 3, strides=2, name="mid")(x)
    x = L.Conv2D(6, 1, name="to_flatten")(x)
    x = L.Flatten(name="flat")(x)
    outputs = L.Dense(4, name="classifier")(L.Dense(16, name="hidden")(x))
    space = read_model(keras.Model(inputs, outputs))
    fixed = {slot.name for slot in space.slots if not slot.searchable}
    # Flatten reads full widths; Dense layers on vectors are not searched; the image is fixed. The Concatenate's
    # output is not searched itself: its inputs are, each at its own width.
    assert fixed == {"pixels", "both", "to_flatten", "flat", "hidden", "classifier"}
    assert [slot.name for slot in space.searchable_slots] == ["left", "right", "mid"]
    assert space.slot("both").members == ("left", "right") and space.varies("both")


def test_a_conv_classifier_and_a_channel_softmax_are_fixed():
    inputs = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, name="features")(inputs)
    x = L.Softmax(name="attention")(L.Conv2D(8, 1, name="scores")(x))
    x = L.Conv2D(5, 1, name="class_map")(x)
    outputs = L.Activation("softmax", name="probabilities")(L.GlobalAveragePooling2D()(x))
    space = read_model(keras.Model(inputs, outputs))
    assert [slot.name for slot in space.searchable_slots] == ["features"]
    assert not space.slot("class_map").searchable  # the classifier output (under a softmax too)
    assert "softmax" in space.slot("scores").fixed_reason


def _classifier(ending):
    inputs = keras.Input((8, 8, 3), name="image")
    features = L.GlobalAveragePooling2D(name="pool")(L.Conv2D(6, 3, name="features")(inputs))
    if ending == "dense":
        return keras.Model(inputs, L.Dense(4, activation="softmax", name="predictions")(features))
    logits = L.Dense(4, name="logits")(features)
    head = {"layer": L.Softmax(name="predictions"), "activation": L.Activation("softmax", name="predictions"),
            "none": L.ReLU(name="predictions")}[ending]
    return keras.Model(inputs, head(logits))


@pytest.mark.parametrize("ending", ["dense", "layer", "activation"])
def test_a_final_softmax_is_taken_off_and_kept_in_mind(tmp_path, ending):
    """A classifier saved with its softmax (Keras' tutorials, keras.applications' default) loads as the
    same network outputting logits: same layers, names and weights, and softmax(logits) is its output."""
    keras.utils.set_random_seed(0)
    model = _classifier(ending)
    path = tmp_path / "probabilities.keras"
    model.save(path)
    assert softmax_head(model) == "predictions"
    logits = load_model(path)
    images = keras.random.uniform((5, 8, 8, 3), seed=1)
    probabilities = keras.ops.convert_to_numpy(model(images))
    assert np.allclose(keras.ops.convert_to_numpy(keras.ops.softmax(logits(images))), probabilities, atol=1e-6)
    assert not np.allclose(keras.ops.convert_to_numpy(logits(images)), probabilities, atol=1e-2)
    assert softmax_head(logits) is None
    kept = {layer.name for layer in model.layers} - ({"predictions"} if ending != "dense" else set())
    assert {layer.name for layer in logits.layers} == kept
    assert softmax_head(load_model(path, logits=False)) == "predictions"
    assert read_model(path).output == ("predictions" if ending == "dense" else "logits")


def test_a_model_without_a_final_softmax_loads_as_saved(tmp_path):
    model = _classifier("none")
    assert softmax_head(model) is None and load_model(model) is model


def _backbone(name, channels=3):
    features = keras.Input((16, 16, channels))
    y = L.ReLU(name="b_relu")(L.BatchNormalization(name="b_bn")(L.Conv2D(8, 3, padding="same", name="b_conv")(features)))
    return keras.Model(features, y, name=name)


def _tutorial_model(backbones=1):
    """A classifier as Keras' tutorials write one: augmentation layers in a nested Sequential, a Rescaling,
    a nested backbone called with training=False (transfer learning), a softmax head."""
    augmentation = keras.Sequential([keras.Input((16, 16, 3)), L.RandomFlip("horizontal"), L.RandomRotation(0.1)],
                                    name="augmentation")
    inputs = keras.Input((16, 16, 3), name="image")
    x = L.Rescaling(1 / 255, name="scale")(augmentation(inputs))
    for index in range(backbones):
        x = _backbone(f"backbone{index}", x.shape[-1])(x, training=False)
    x = L.Dense(3, activation="softmax", name="probabilities")(L.GlobalAveragePooling2D(name="pool")(x))
    return keras.Model(inputs, x, name="tutorial")


def test_nested_models_are_read_through_and_augmentation_left_out(tmp_path):
    """The nested backbone's layers join the graph with the training=False it was called with; the random
    augmentation (the identity at inference) is left out, so the Rescaling is the first layer and the model
    takes raw pixels; the derived full network computes what the model computes at inference."""
    keras.utils.set_random_seed(0)
    model = _tutorial_model()
    model.save(tmp_path / "tutorial.keras")
    loaded = load_model(tmp_path / "tutorial.keras")
    assert [layer.name for layer in loaded.layers] == ["image", "scale", "b_conv", "b_bn", "b_relu", "pool",
                                                        "probabilities"]
    assert input_convention.held_by(loaded) == input_convention.RAW
    space = read_model(loaded)
    assert dict(space.layer("b_bn").call_arguments) == {"training": False} and space.slot("b_conv").searchable
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    derived = derive_model(loaded, space, space.full_shape())
    np.testing.assert_allclose(keras.ops.softmax(derived(pixels, training=False)), model(pixels, training=False),
                               atol=1e-6)


def test_a_name_used_in_two_nested_models_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"^b_conv \(Conv2D\): a nested model uses the name 'b_conv' "
                                                    "for another layer too"):
        read_model(_tutorial_model(backbones=2))


def test_keras_ops_and_squeeze_excitation_are_read():
    """Element-wise keras.ops follow or tie their inputs' slots and record their constants; an EfficientNet
    squeeze-excitation keeps its widths searchable: the Reshape to 1x1 follows the pooled slot, the expand
    conv joins the slot it rescales (through `*`), the reduce conv opens its own."""
    space = read_model(ops_cnn())
    assert [slot.name for slot in space.searchable_slots] == ["stem", "b1_expand", "b1_se_reduce", "b2_expand",
                                                               "b2_se_reduce"]
    assert space.layer("b1_se_expand").out_slot == space.layer("b1_dw").out_slot == "b1_expand"
    assert space.layer("b1_se_reshape").out_slot == "b1_expand"
    assert [(layer.class_name, layer.operands) for layer in space.layers if layer.kind == "op"][:4] == [
        ("Add", (None, 3.0)), ("Relu6", (None,)), ("Multiply", (None, None)), ("TrueDivide", (None, 6.0))]
    assert [(stage.opener, [block.name for block in stage.blocks]) for stage in space.stages] == [("", ["b1", "b2"])]
    assert GraphSpace.from_json(space.to_json()) == space


def test_grouped_convs_follow_their_input_in_whole_groups():
    """A grouped conv whose groups map as many channels as they read follows its input's slot (keeping k
    groups keeps k groups of inputs and outputs), whose candidates become whole groups: multiples of the
    group width, of the least common multiple where grouped convs of two group widths read the slot.
    One whose groups change the channel count fixes its slots, as a depthwise conv with a depth multiplier
    does."""
    space = read_model(grouped_cnn())
    assert [slot.name for slot in space.searchable_slots] == ["stem", "down_conv_1x1_1", "b1_conv_1x1_1",
                                                               "b2_conv_1x1_1", "b2_conv_1x1_2"]
    assert (space.layer("b1_conv_3x3").out_slot, space.layer("b1_conv_3x3").group_width) == ("b1_conv_1x1_1", 4)
    assert {space.layer(name).out_slot for name in ("down_conv_3x3", "down_conv_3x3_wide_groups")} == {
        "down_conv_1x1_1"}
    # int(16 r), r = 0.3 .. 1.0 (4, 6, 8, 9, 11, 12, 14, 16), rounded to multiples of 4 and of lcm(4, 8) = 8.
    assert [(space.slot(name).width_step, space.slot(name).candidates)
            for name in ("b1_conv_1x1_1", "down_conv_1x1_1")] == [(4, (4, 8, 12, 16)), (8, (8, 16))]
    assert space.slot("b2_conv_1x1_2").width_step == 1
    assert GraphSpace.from_json(space.to_json()) == space
    with pytest.raises(ValueError, match="b1_conv_1x1_1: width 10 is not a multiple of 4: its grouped convs keep "
                                         "whole groups of 4 channels"):
        space.validate(space.shape({**space.full_shape().widths, "b1_conv_1x1_1": 10}, space.full_shape().depths))
    def resizing_groups(x):
        x = L.Conv2D(6, 3, groups=3, name="grouped")(L.Conv2D(3, 1, name="narrow")(x))
        return L.Dense(2)(L.GlobalAveragePooling2D()(x))

    resizing = read_model(_functional(resizing_groups))
    assert not resizing.searchable_slots
    assert resizing.slot("narrow").fixed_reason == resizing.slot("grouped").fixed_reason == (
        "grouped maps 1 to 2 channels per group")


def test_convnext_idioms_are_read_with_searchable_widths():
    """A ConvNeXt keeps its widths searchable: the stem conv opens the slot of the residual stream, which
    its LayerNormalizations, depthwise convs (Conv2Ds whose groups are their channels) and LayerScales
    follow and the adds tie to the projecting Dense layers; each expanding Dense on a feature map opens
    a slot of its own, as a 1x1 conv does; the classifier Dense on the pooled vector is fixed."""
    space = read_model(convnext_cnn())
    assert [(slot.name, slot.full_width) for slot in space.searchable_slots] == [
        ("stem", 8), ("b1_expand", 32), ("b2_expand", 32), ("b3_expand", 32), ("down", 12), ("b4_expand", 48)]
    for block, stream in (("b1", "stem"), ("b2", "stem"), ("b3", "stem"), ("b4", "down")):
        assert [_slot_of(space, f"{block}_{name}") for name in ("dw", "ln", "expand", "gelu", "project", "scale")] == [
            stream, stream, f"{block}_expand", f"{block}_expand", stream, stream]
    assert [_slot_of(space, name) for name in ("stem_ln", "down_ln", "head_ln")] == ["stem", "stem", "down"]
    assert space.layer("b1_dw").kind == "grouped" and space.layer("b1_expand").kernel == (1, 1)
    assert space.slot("head").fixed_reason == "a Dense on a vector is not searched"
    # The blocks `x + y` closes are named after their layers, as those an Add layer closes are.
    assert [(stage.opener, [block.name for block in stage.blocks]) for stage in space.stages] == [
        ("", ["b1", "b2", "b3"]), ("", ["b4"])]
    assert GraphSpace.from_json(space.to_json()) == space


@pytest.mark.parametrize("application, stages", [
    # The published block repeats per stage: EfficientNet-B0 1, 2, 2, 3, 3, 4, 1 and EfficientNetV2-B0
    # 1, 2, 2, 3, 5, 8 (a stage of one block has no depth choice); MobileNetV3-Small's bottlenecks 1, 2, 3,
    # 2, 3 (its first alone), MobileNetV3-Large's 1 (a residual block of its own after the stem), 2, 3, 4, 2, 3.
    ("EfficientNetB0", [("block2a", 2), ("block3a", 2), ("block4a", 3), ("block5a", 3), ("block6a", 4)]),
    ("EfficientNetV2B0", [("block2a", 2), ("block3a", 2), ("block4a", 3), ("block5a", 5), ("block6a", 8)]),
    ("MobileNetV3Small", [("expanded_conv_1", 2), ("expanded_conv_3", 3), ("expanded_conv_6", 2),
                          ("expanded_conv_8", 3)]),
    ("MobileNetV3Large", [("", 1), ("expanded_conv_1", 2), ("expanded_conv_3", 3), ("expanded_conv_6", 4),
                          ("expanded_conv_10", 2), ("expanded_conv_12", 3)]),
])
def test_stages_of_the_efficientnets_and_mobilenet_v3(application, stages):
    """A stage-opening block without an Add is found through its squeeze-excitation gate and although
    only the residual blocks have dropout."""
    model = getattr(keras.applications, application)(input_shape=(32, 32, 3), weights=None, classes=4)
    space = read_model(model)
    assert [(stage.opener, stage.num_blocks) for stage in space.stages] == stages


def _resnet_v2_cnn(identity_blocks):
    """keras.applications.ResNet50V2's stacks (`resnet.stack2`), narrow: pre-activation bottlenecks (BN, ReLU,
    1x1, padded 3x3, 1x1, added to the shortcut). Stack "a": a projection block, `identity_blocks[0]`
    identity blocks and a last block of stride 2 whose shortcut is a 1x1 max pool with that stride; stack
    "b": a projection block and `identity_blocks[1]` identity blocks (stride 1, as ResNet50V2's last)."""
    inputs = keras.Input((16, 16, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", name="stem")(inputs)

    def block(x, name, projection=False, strides=1):
        preact = L.ReLU(name=f"{name}_preact_relu")(L.BatchNormalization(name=f"{name}_preact_bn")(x))
        if projection:
            shortcut = L.Conv2D(8, 1, name=f"{name}_0_conv")(preact)
        else:
            shortcut = L.MaxPooling2D(1, strides=strides, name=f"{name}_pool")(x) if strides > 1 else x
        y = L.Conv2D(2, 1, use_bias=False, name=f"{name}_1_conv")(preact)
        y = L.ReLU(name=f"{name}_1_relu")(L.BatchNormalization(name=f"{name}_1_bn")(y))
        y = L.Conv2D(2, 3, strides=strides, use_bias=False, name=f"{name}_2_conv")(
            L.ZeroPadding2D(name=f"{name}_2_pad")(y))
        y = L.ReLU(name=f"{name}_2_relu")(L.BatchNormalization(name=f"{name}_2_bn")(y))
        y = L.Conv2D(8, 1, name=f"{name}_3_conv")(y)
        return L.Add(name=f"{name}_add")([shortcut, y])

    x = block(x, "a1", projection=True)
    for index in range(identity_blocks[0]):
        x = block(x, f"a{index + 2}")
    x = block(x, "a_last", strides=2)
    x = block(x, "b1", projection=True)
    for index in range(identity_blocks[1]):
        x = block(x, f"b{index + 2}")
    x = L.GlobalAveragePooling2D(name="pool")(L.ReLU(name="post_relu")(L.BatchNormalization(name="post_bn")(x)))
    return keras.Model(inputs, L.Dense(4, name="head")(x), name="resnet_v2_cnn")


def _ops_residual_cnn(blocks):
    """Residual blocks written `x + f(x)` with keras.ops, as keras.applications' ConvNeXt writes them:
    `blocks[0]` blocks, a strided conv, `blocks[1]` blocks."""
    inputs = keras.Input((16, 16, 3), name="image")
    x = L.Conv2D(4, 3, padding="same", name="stem")(inputs)
    for stack, count in (("b", blocks[0]), ("c", blocks[1])):
        if stack == "c":
            x = L.Conv2D(6, 2, strides=2, name="down")(x)
        for index in range(count):
            name = f"{stack}{index + 1}"
            y = L.Activation("gelu", name=f"{name}_gelu")(L.Conv2D(8, 3, padding="same", name=f"{name}_conv1")(x))
            x = x + L.Conv2D(x.shape[-1], 1, name=f"{name}_conv2")(y)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(4, name="head")(x), name="ops_residual_cnn")


def _assert_dropping_blocks_removes_their_branches(model, space, depths, reference):
    """The derived network keeping `depths` blocks computes what `reference` (the model built without the
    dropped blocks, holding the model's weights) computes."""
    for layer in reference.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    derived = derive_model(model, space, space.shape(space.full_shape().widths, depths))
    assert sorted(layer.name for layer in derived.layers if layer.weights) == sorted(
        layer.name for layer in reference.layers if layer.weights)
    images = np.random.default_rng(0).uniform(-1, 1, (2, *model.input_shape[1:])).astype("float32")
    expected = np.asarray(reference(images, training=False))
    assert np.max(np.abs(expected - np.asarray(model(images, training=False)))) > 1e-3  # the blocks mattered
    np.testing.assert_allclose(np.asarray(derived(images, training=False)), expected, rtol=1e-5, atol=1e-5)


def test_a_block_whose_shortcut_pools_ends_the_stage_before_it():
    """ResNetV2's stacks: the identity blocks after a stack's projection block are a stage (the projection
    block its first); the last block, whose max-pooled shortcut is not its input, is not droppable and is
    in no stage, and the next stack's stage starts at its projection block. Dropping blocks leaves the
    network without their residual branches."""
    keras.utils.set_random_seed(0)
    model = _resnet_v2_cnn(identity_blocks=(2, 1))
    space = read_model(model)
    assert [(stage.opener, [block.name for block in stage.blocks], stage.choices) for stage in space.stages] == [
        ("a1", ["a2", "a3"], (1, 2, 3)), ("b1", ["b2"], (1, 2))]
    _assert_dropping_blocks_removes_their_branches(model, space, {"stage1": 2, "stage2": 1},
                                                   _resnet_v2_cnn(identity_blocks=(1, 0)))


def test_residuals_written_with_keras_ops_are_droppable_blocks():
    """`x + f(x)` closes a droppable block as an Add layer does: each run of them is a stage (with no
    stage opener here: the first block is the stage's first), its blocks named after their layers."""
    keras.utils.set_random_seed(0)
    model = _ops_residual_cnn(blocks=(3, 2))
    space = read_model(model)
    assert [(stage.opener, [block.name for block in stage.blocks], stage.choices) for stage in space.stages] == [
        ("", ["b1", "b2", "b3"], (1, 2, 3)), ("", ["c1", "c2"], (1, 2))]
    _assert_dropping_blocks_removes_their_branches(model, space, {"stage1": 2, "stage2": 1},
                                                   _ops_residual_cnn(blocks=(2, 1)))


def test_space_and_shape_round_trip_through_json():
    space = read_model(build_model("resnet20"), add_mode=INDEPENDENT)
    assert GraphSpace.from_json(space.to_json()) == space
    shape = space.full_shape()
    assert GraphShape.from_json(json.dumps(json.loads(shape.to_json()))) == shape


def test_shapes_outside_the_space_are_refused():
    space = read_model(build_model("resnet20"), add_mode=INDEPENDENT)
    full = space.full_shape()
    with pytest.raises(ValueError, match=r"s1_b1_conv_a: width 17 is outside 1..16"):
        space.validate(space.shape({**full.widths, "s1_b1_conv_a": 17}, full.depths))
    with pytest.raises(ValueError, match=r"stage2: 4 blocks kept is outside 1..3"):
        space.validate(space.shape(full.widths, {**full.depths, "stage2": 4}))
    with pytest.raises(ValueError, match=r"missing \['stem_conv'\]"):
        space.validate(space.shape({k: v for k, v in full.widths.items() if k != "stem_conv"}, full.depths))


# FLOPs.

def test_bias_terms_are_counted_as_the_reference_counter_does():
    inputs = keras.Input((10, 10, 3))
    x = L.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.Conv2D(4, 1, use_bias=False, name="pointwise")(x)
    x = L.SeparableConv2D(5, 3, strides=2, padding="same", depth_multiplier=2, name="separable")(x)
    x = L.Dense(6, name="fc", use_bias=False)(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, L.Dense(2, name="out")(x))
    by_hand = {"conv": (9 * 3 * 8 + 8) * 100, "dw": (9 * 8 + 8) * 100, "pointwise": 8 * 4 * 100,
               "separable": (9 * 4 * 2 + 4 * 2 * 5 + 5) * 25, "fc": 5 * 6, "out": 6 * 2 + 2}
    space = read_model(model)
    for report in (count_shape(space, space.full_shape()), count_model(model)):
        assert {layer.name: layer.flops for layer in report.layers} == by_hand


def test_a_transposed_conv_is_counted_per_input_position():
    """A Conv2DTranspose scatters each input position through its whole kernel: k*k*C_in*C_out multiply-adds
    per input position, plus C_out per output position for a bias. "valid" 3x3 at stride 2 takes 5x5 to
    11x11 (4 * 2 + 3), "same" 2x2 at stride 2 takes 11x11 to 22x22."""
    inputs = keras.Input((5, 5, 2))
    x = L.Conv2DTranspose(4, 3, strides=2, name="up")(inputs)
    model = keras.Model(inputs, L.Conv2DTranspose(3, 2, strides=2, padding="same", use_bias=False, name="up_same")(x))
    space = read_model(model)
    for up in (4, 2):
        by_hand = {"up": (9 * 2 * up * 25 + up * 121, 9 * 2 * up + up), "up_same": (4 * up * 3 * 121, 4 * up * 3)}
        shape = space.shape({"up": up}, {})
        for report in (count_shape(space, shape), count_model(derive_model(model, space, shape))):
            assert {layer.name: (layer.flops, layer.params) for layer in report.layers} == by_hand


def test_convnext_idioms_are_counted_by_hand():
    """A narrower shape of the ConvNeXt-like CNN, counted by hand: a Dense on a feature map is a 1x1 conv
    (in * out + out per position), a depthwise conv written as a grouped Conv2D k * k * C + C per position;
    LayerNormalizations (gamma and beta) and LayerScales (gamma) have parameters and no FLOPs. 8x8 maps,
    4x4 after the downsampling conv; the first stage keeps b1 and b2."""
    model = convnext_cnn()
    space = read_model(model)
    shape = space.shape({"stem": 6, "b1_expand": 19, "b2_expand": 12, "b3_expand": 28, "down": 9, "b4_expand": 28},
                        {"stage1": 2, "stage2": 1})

    def block(width, expanded, positions):  # {layer: (FLOPs, parameters)} of a block at those widths
        dw, expand, project = 49 * width + width, width * expanded + expanded, expanded * width + width
        return {"dw": (dw * positions, dw), "ln": (0, 2 * width), "expand": (expand * positions, expand),
                "project": (project * positions, project), "scale": (0, width)}

    by_hand = {"stem": ((4 * 3 * 6 + 6) * 64, 4 * 3 * 6 + 6), "stem_ln": (0, 12), "down_ln": (0, 12),
               "down": ((4 * 6 * 9 + 9) * 16, 4 * 6 * 9 + 9), "head_ln": (0, 18), "head": (9 * 4 + 4, 9 * 4 + 4)}
    for name, width, expanded, positions in (("b1", 6, 19, 64), ("b2", 6, 12, 64), ("b4", 9, 28, 16)):
        by_hand.update({f"{name}_{layer}": counts for layer, counts in block(width, expanded, positions).items()})
    derived = derive_model(model, space, shape)
    for report in (count_shape(space, shape), count_model(derived)):
        assert {layer.name: (layer.flops, layer.params) for layer in report.layers} == by_hand
    assert count_model(derived).params == derived.count_params()


def test_mobilenet_v2_flops_match_the_published_count(imagenet_models):
    space = read_model(imagenet_models["mobilenet_v2"])
    flops = count_shape(space, space.full_shape()).flops
    assert flops == pytest.approx(300e6, rel=0.01)  # Sandler et al. 2018: 300M multiply-adds


def test_resnet50_flops_match_a_count_by_hand(imagenet_models):
    # keras.applications' ResNet50 at 224 px, 1000 classes, from its architecture table: a 7x7/2 stem
    # conv to 112x112 and a 3x3/2 max pool to 56x56; stages of (width, blocks) (64, 3), (128, 4),
    # (256, 6), (512, 3) of bottlenecks 1x1 -> 3x3 -> 1x1 (x4 width); a stage's first block has a 1x1
    # projection shortcut and, in stages 3-5, Keras puts its stride 2 on the block's first 1x1 conv (so
    # the whole block runs at the reduced size; torchvision strides the 3x3 instead: 4.1 G). Every
    # Keras conv has a bias: one more addition per output value.
    def conv(kernel, c_in, c_out, side):
        return (kernel * kernel * c_in + 1) * c_out * side * side

    expected, c_in, side = conv(7, 3, 64, 112), 64, 56
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        side //= stride
        expected += conv(1, c_in, width, side) + conv(1, c_in, 4 * width, side)  # 1x1 and projection
        expected += conv(3, width, width, side) + conv(1, width, 4 * width, side)
        expected += (blocks - 1) * (conv(1, 4 * width, width, side) + conv(3, width, width, side)
                                    + conv(1, width, 4 * width, side))
        c_in = 4 * width
    expected += 2048 * 1000 + 1000
    space = read_model(imagenet_models["resnet50"])
    assert count_shape(space, space.full_shape()).flops == expected


def test_convnext_tiny_flops_match_a_count_by_hand():
    # keras.applications' ConvNeXtTiny at 224 px, 1000 classes (Liu et al. 2022: 4.5 G FLOPs, 28 M
    # parameters): a 4x4/4 stem conv to 56x56; stages of (width, blocks) (96, 3), (192, 3), (384, 9),
    # (768, 3) at 56, 28, 14, 7 px, the last three opened by a 2x2/2 conv; a block is a 7x7 depthwise conv,
    # a Dense to 4x the width and one back (1x1 convs), all with biases. LayerNormalizations and
    # LayerScales hold parameters only.
    expected, previous = (4 * 4 * 3 + 1) * 96 * 56 * 56, None
    for width, blocks, side in ((96, 3, 56), (192, 3, 28), (384, 9, 14), (768, 3, 7)):
        if previous:
            expected += (2 * 2 * previous + 1) * width * side * side
        expected += blocks * ((7 * 7 + 1) * width + (width + 1) * 4 * width + (4 * width + 1) * width) * side * side
        previous = width
    expected += 768 * 1000 + 1000
    model = keras.applications.ConvNeXtTiny(weights=None)
    space = read_model(model)
    report = count_shape(space, space.full_shape())
    assert (report.flops, report.params) == (expected, model.count_params())
    assert expected == pytest.approx(4.5e9, rel=0.01) and model.count_params() == pytest.approx(28e6, rel=0.03)


def test_resnet18_flops_and_params_match_torchvision(imagenet_models):
    model = imagenet_models["resnet18"]
    space = read_model(model)
    report = count_shape(space, space.full_shape())
    # By hand: stem 7x7 at 112x112; stage 1 four 3x3 64->64 at 56x56; stages 2-4 a strided 3x3, three
    # 3x3 and a 1x1 projection at 28, 14 and 7 px; no conv biases; Dense 512 -> 1000.
    stages = sum(9 * c * 2 * c * s * s + 3 * 9 * (2 * c) ** 2 * s * s + c * 2 * c * s * s
                 for c, s in ((64, 28), (128, 14), (256, 7)))
    assert report.flops == 49 * 3 * 64 * 112 ** 2 + 4 * 9 * 64 * 64 * 56 ** 2 + stages + 512 * 1000 + 1000
    assert report.flops == pytest.approx(1.814e9, rel=0.001)  # torchvision's published 1.81 GFLOPS
    assert report.params == 11_689_512  # torchvision's resnet18 parameter count
    assert [stage.num_blocks for stage in space.stages] == [2, 2, 2, 2]
    assert space.stages[0].opener == "" and space.stages[1].opener == "conv3_block1"


def test_resnet34_matches_torchvision():
    space = read_model(build_model("resnet34"))
    report = count_shape(space, space.full_shape())
    assert report.flops == pytest.approx(3.664e9, rel=0.001) and report.params == 21_797_672  # torchvision
    assert [stage.num_blocks for stage in space.stages] == [3, 4, 6, 3]


@pytest.mark.parametrize("model, mflops", [("resnet20", 40.81), ("resnet56", 125.75)])
def test_cifar_flops_through_the_graph_match_the_design_table(model, mflops):
    space = read_model(build_model(model), add_mode=INDEPENDENT)
    report = count_shape(space, space.full_shape())
    assert round(report.mflops, 2) == mflops  # docs/design.md section 3
    assert report.flops == count_arch(ArchConfig.full(model)).flops


def _flops_cli(*args):
    return subprocess.run([sys.executable, "-m", "train.flops", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=180)


def test_flops_cli_counts_any_model(tmp_path):
    result = _flops_cli("mobilenet_v2", "--image_size=224", "--num_classes=1000", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["flops"] == pytest.approx(300e6, rel=0.01)
    assert {layer["kind"] for layer in report["layers"]} == {"conv", "depthwise", "dense", "batch_norm"}
    inputs = keras.Input((24, 24, 3))
    x = L.ReLU()(L.Conv2D(8, 3, strides=2, padding="same", name="first")(inputs))
    model = keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(x)), name="mine")
    path = tmp_path / "mine.keras"
    model.save(path)
    table = _flops_cli(str(path))
    expected = (9 * 3 * 8 + 8) * 12 * 12 + 8 * 3 + 3
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith("mine, input 24x24x3, 3 outputs") and f"({expected:,} MACs)" in table.stdout
    with pytest.raises(ValueError, match="brings its own input shape and classes"):
        build_model(str(path), num_classes=5)
