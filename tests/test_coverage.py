"""The fast subset of bench.coverage (issue 23, item 5): every keras.applications family of the coverage
bench (and the registry's EfficientNet-Lite0), random weights at 32 px (a family's minimum when larger) and
10 classes, is read, and its full shape derives the logits model's outputs within 1e-5 relative; a family
the reader does not take yet is refused with UnsupportedModelError in one line. The sets below are the
current state: a family that starts to read fails its test until it is moved."""

import numpy as np
import pytest

from bench.coverage import FAMILIES, TOLERANCE, build_family, with_statistics
from tas_keras.derive import derive_model
from tas_keras.graph import load_model, read_model
from tas_keras.layer_rules import UnsupportedModelError

SIZE = 32
# Read today, with the full shape derived within TOLERANCE.
DERIVED = ("ResNet50", "ResNet50V2", "MobileNet", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large",
           "EfficientNetB0", "EfficientNetV2B0", "DenseNet121", "InceptionV3", "Xception", "NASNetMobile",
           "RegNetX002", "ConvNeXtTiny", "efficientnet_lite0")
# Refused today: a piece of the one-line message.
REFUSED = {}


def test_the_sets_name_every_family_once():
    named = [*DERIVED, *REFUSED]
    assert sorted(named) == sorted(FAMILIES)


def _derive(family):
    model = load_model(with_statistics(build_family(family, SIZE)))
    space = read_model(model)
    derived = derive_model(model, space, space.full_shape())
    assert [layer.name for layer in derived.layers] == [layer.name for layer in model.layers]
    images = np.random.default_rng(1).uniform(0, 255, (2, *model.input_shape[1:])).astype("float32")
    original = np.asarray(model(images, training=False))
    difference = np.max(np.abs(np.asarray(derived(images, training=False)) - original))
    assert np.max(np.abs(original)) > 0.1  # random BN statistics: the outputs are not ~0
    assert difference <= TOLERANCE * np.max(np.abs(original)), family


@pytest.mark.parametrize("family", DERIVED)
def test_family_is_read_and_its_full_shape_reproduces_it(family):
    _derive(family)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_family_is_refused_in_one_line(family):
    model = load_model(build_family(family, SIZE))
    with pytest.raises(UnsupportedModelError) as refusal:
        read_model(model)
    message = str(refusal.value)
    assert "\n" not in message and REFUSED[family] in message, message
