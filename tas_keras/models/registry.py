"""Every network the project prunes, by name: `build_model(name, input_shape, num_classes)`.

  resnet20, resnet32, resnet56, resnet110, resnet164, resnet<6n+2>, resnet<9n+2>_bottleneck
                   the CIFAR ResNets (docs/design.md section 3), 32x32 and 10 classes by default
  resnet18, resnet34   the ImageNet basic-block ResNets (models/imagenet_resnet.py)
  resnet50, mobilenet_v2   keras.applications' ResNet50 and MobileNetV2 (alpha 1.0), weights=None
  efficientnet_lite0   EfficientNet-Lite0 (models/efficientnet_lite.py), random or ImageNet weights
  a path to a .keras file   the user's model, as saved

The ImageNet models default to 224x224 and 1000 classes and take any size from 32 px. `resnet50` is
keras.applications' ResNet50, not the CIFAR basic-block network of that depth.
"""

import collections
import dataclasses
import os
import re

import keras

from tas_keras import data
from tas_keras.graph import load_model
from tas_keras.graph_space import INDEPENDENT, TIED
from tas_keras.layers import BN_MOMENTUM
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.models.efficientnet_lite import efficientnet_lite0
from tas_keras.models.imagenet_resnet import imagenet_resnet
from tas_keras.search_space import ArchConfig, parse_model_name

IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "efficientnet_lite0")
PRETRAINED = {"efficientnet_lite0": ("imagenet",)}  # the weights a registry network can start from
CIFAR_DEFAULTS = ((32, 32, 3), 10)
IMAGENET_DEFAULTS = ((224, 224, 3), 1000)


def is_model_file(name):
    return os.fspath(name).endswith(".keras")


def _is_cifar_model(name):
    """Whether `name` is one of the CIFAR ResNets (the family ArchConfig describes); a ValueError for a name
    the registry does not know."""
    if name in IMAGENET_MODELS or is_model_file(name):
        return False
    if not re.fullmatch(r"resnet\d+(_bottleneck)?", name):
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(IMAGENET_MODELS)}, a CIFAR "
                         "resnet<depth> (resnet20 ... resnet164) or a .keras file")
    parse_model_name(name)  # an invalid depth says which depths are valid
    return True


def check_model_name(name):
    """ValueError unless `name` is a registry network or a .keras path."""
    _is_cifar_model(name)


@dataclasses.dataclass(frozen=True)
class SearchDefaults:
    """How a search reads and runs the space of a network unless told otherwise.

    Args:
        add_mode: how the space reads the network's Adds (`tas_keras.graph.read_model`).
        normalize_every_conv: whether the supernet normalises every searchable conv's output in the search
            forward, as the reference's search of the CIFAR ResNets does (`GraphSupernet`).
    """

    add_mode: str
    normalize_every_conv: bool


def search_defaults(name):
    """The CIFAR ResNets are searched as the reference searches them (independent Adds, every searchable
    conv normalised); every other network keeps its own layers (tied Adds)."""
    cifar = _is_cifar_model(name)
    return SearchDefaults(INDEPENDENT if cifar else TIED, normalize_every_conv=cifar)


def check_weights(name, weights):
    """ValueError unless `weights` is None or pretrained weights the registry offers for `name`."""
    if weights is not None and weights not in PRETRAINED.get(name, ()):
        offered = ", ".join(f"{model} ({', '.join(w)})" for model, w in PRETRAINED.items())
        raise ValueError(f"no {weights!r} weights for {name!r}: pretrained weights exist for {offered}")


def build_model(name, input_shape=None, num_classes=None, weights=None):
    """The full (unpruned) network `name`, randomly initialised or with the pretrained `weights` it offers
    (`PRETRAINED`), or the model saved in a .keras file."""
    check_weights(name, weights)
    if is_model_file(name):
        if input_shape is not None or num_classes is not None:
            raise ValueError(f"{name!r} brings its own input shape and classes; do not give them")
        return load_model(name)
    default_shape, default_classes = CIFAR_DEFAULTS if _is_cifar_model(name) else IMAGENET_DEFAULTS
    input_shape = tuple(input_shape or default_shape)
    num_classes = default_classes if num_classes is None else num_classes
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
    if name == "efficientnet_lite0":
        return efficientnet_lite0(input_shape, num_classes, weights)
    if name in ("resnet18", "resnet34"):
        return imagenet_resnet(int(name[len("resnet"):]), input_shape, num_classes)
    if name in IMAGENET_MODELS:
        application = {"resnet50": keras.applications.ResNet50,
                       "mobilenet_v2": keras.applications.MobileNetV2}[name]
        # A named input, as the project's own models have, instead of a session-numbered "input_layer_N".
        image = keras.Input(shape=input_shape, name="image")
        # Logits, as every network here outputs (the losses and KD take logits), not softmax probabilities.
        model = application(weights=None, input_tensor=image, classes=num_classes, classifier_activation=None)
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                # The project's BN momentum (tas_keras/layers.py): keras.applications' 0.999
                # (MobileNetV2) and 0.99 (ResNet50) suit ImageNet-long schedules; after the few hundred
                # steps of a short run their moving statistics are still far off and evaluation is
                # near chance (MobileNetV2 on Imagenette: 10% test accuracy at 42% training accuracy).
                layer.momentum = BN_MOMENTUM
        _name_numbered_layers(model)
        # keras.applications lists an input_tensor's model inputs ([image]); one tensor, as the others take.
        return keras.Model(image, model.outputs[0], name=model.name)
    return CifarResNet(ArchConfig.full(name, num_classes=num_classes, input_shape=input_shape))


def _name_numbered_layers(model):
    """Names the layers keras.applications leaves unnamed (MobileNetV2's pooling) after their class, in
    order. Keras numbers an unnamed layer per session ("global_average_pooling2d_4"), so two builds of one
    network would name it differently, and a search starting from a saved network's weights matches
    them by name."""
    seen = collections.Counter()
    for layer in model.layers:
        base = re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", type(layer).__name__).lower()
        if re.fullmatch(rf"{re.escape(base)}(_\d+)?", layer.name):
            layer.name = base if not seen[base] else f"{base}_{seen[base]}"
            seen[base] += 1


def image_side(input_shape):
    """The side data is read at for a model taking `input_shape` (height, width, channels): its height
    when square and within data.IMAGE_SIZE_RANGE, else None (the data's own size; the stage then names
    the mismatch)."""
    height, width = input_shape[:2]
    low, high = data.IMAGE_SIZE_RANGE
    return height if height == width and low <= height <= high else None


def image_size_for(name, image_size=None):
    """The image size a stage reads data at for network `name`: `image_size` when given, else a .keras
    model's own input side (the model states its input), else None (a registry network takes the
    data's size). A given size other than the model's is refused where the data meets the model."""
    if image_size is not None or not is_model_file(name) or not os.path.isfile(name):
        return image_size
    return image_side(load_model(name).input_shape[1:])

