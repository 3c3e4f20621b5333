import json
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tas_keras.cost import count_arch
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.search_space import ArchConfig
from tas_keras.runs import RunMismatchError
from tas_keras.data import from_arrays
from tas_keras.training import (BaseConfig, chance_threshold, check_above_chance, evaluate_classifier,
                                train_base)

from .conftest import REPO, assert_refused_before_any_work


def _cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "train.base", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--model=vgg16"], "error: unknown model 'vgg16'"),
    (["--epochs=-1"], "--epochs=-1"),
    (["stray"], "unexpected arguments: stray"),
])
def test_bad_flags_fail_fast_with_one_line(tmp_path, args, message):
    """What train_base refuses (below), a flag value absl's parser refuses, and a stray argument."""
    result = _cli(f"--out={tmp_path / 'run'}", *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("options, message", [
    (dict(model_name="resnet22"), "depth 22 is not valid for basic blocks"),
    (dict(dataset_name="/no/such/folder"), "/no/such/folder"),
])
def test_train_base_refuses_bad_input_before_any_work(tmp_path, options, message):
    assert_refused_before_any_work(train_base, tmp_path / "run", message, **options)


@pytest.mark.slow
def test_train_base_writes_artifacts_and_does_not_redo(tmp_path):
    out = str(tmp_path / "base")
    args = dict(model_name="resnet8", epochs=1, batch_size=64, max_train_examples=256)
    metrics = train_base(out, **args)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    arch = ArchConfig.full("resnet8")
    assert (metrics["flops"], metrics["params"]) == (count_arch(arch).flops, count_arch(arch).params)
    assert metrics["train_images_per_second"] > 0 and metrics["train_examples"] == 256
    model = keras.saving.load_model(f"{out}/model.keras")
    assert isinstance(model, CifarResNet) and model.arch == arch
    with open(f"{out}/metrics.json") as f:
        assert json.load(f) == metrics

    start = time.perf_counter()
    assert train_base(out, **args) == metrics  # finished: nothing is trained again
    assert time.perf_counter() - start < 5
    with pytest.raises(RunMismatchError, match=r"epochs: 1 -> 2"):
        train_base(out, **{**args, "epochs": 2})


@pytest.mark.slow
def test_train_base_trains_an_imported_shape(tmp_path, released_shapes):
    shape = [p for p in released_shapes if p.name == "NeurIPS-2019__C010-ResNet20.config"][0]
    metrics = train_base(str(tmp_path / "r"), arch_path=str(shape), epochs=1, batch_size=64,
                         max_train_examples=128)
    assert metrics["flops"] == count_arch(ArchConfig.load(shape)).flops


def test_shape_must_match_the_data(tmp_path):
    arch = ArchConfig.full("resnet20", num_classes=100)
    path = tmp_path / "arch.json"
    arch.save(path)
    with pytest.raises(ValueError, match="the shape has 100 classes but cifar10_mini has 10"):
        train_base(str(tmp_path / "r"), arch_path=str(path))


def test_a_file_that_is_not_a_shape_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "shape.json"
    bad.write_text(json.dumps({**ArchConfig.full("resnet20").to_dict(), "widths": [17] + [16] * 18}))
    result = _cli(f"--out={tmp_path / 'run'}", f"--arch={bad}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: shape file '{bad}' is not a valid shape: stem_conv: width 17 is outside 1..16" in result.stderr


@pytest.mark.slow
def test_metrics_count_the_image_files_skipped(tmp_path):
    for split, count in (("train", 4), ("test", 2)):
        for index in range(count):
            folder = tmp_path / "images" / split / ("cat", "dog")[index % 2]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(index).integers(0, 256, (8, 8, 3), np.uint8)
            (folder / f"{index}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    (tmp_path / "images" / "train" / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really")
    (tmp_path / "images" / "train" / "readme.txt").write_text("stray")
    metrics = train_base(str(tmp_path / "run"), model_name="resnet8", dataset_name=str(tmp_path / "images"),
                         epochs=1, batch_size=2)
    assert metrics["files_skipped"] == {"unreadable_images": 1, "non_image_files": 1}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["files_skipped"] == metrics["files_skipped"]


# The run.json of `train_base(out)` and of `train_base(out, arch_path="arch.json", weights=..., input_convention=
# "raw")` as the code before BaseConfig wrote them (commit 671e460): weights and input_convention, later
# settings, only when given.
PREVIOUS_RUN_FILE = {
    "stage": "base", "model": "resnet20", "arch": None, "dataset": "cifar10_mini", "data_dir": None,
    "image_size": None, "epochs": 10, "batch_size": 256, "learning_rate": 0.1, "seed": 0,
    "max_train_examples": None, "mixed_precision": None}


def test_a_base_config_records_what_the_previous_code_recorded_and_refuses_bad_settings():
    config = BaseConfig(streaming="never", checkpoint_steps=5)
    assert config.run_record() == PREVIOUS_RUN_FILE
    fine_tuned = config.replace(model_name="efficientnet_lite0", weights="imagenet", input_convention="raw")
    assert fine_tuned.run_record() == {**PREVIOUS_RUN_FILE, "model": "efficientnet_lite0", "weights": "imagenet",
                                       "input_convention": "raw"}
    assert BaseConfig.from_dict(fine_tuned.run_record()) == fine_tuned.replace(streaming="auto", checkpoint_steps=200)
    assert BaseConfig.from_dict(config.to_dict()) == config
    for overrides, message in ((dict(epochs=0), "epochs, batch_size and learning_rate must be positive, got 0"),
                               (dict(arch_path="arch.json", weights="imagenet"),
                                "pretrained weights \\('imagenet'\\) are for a registry network, not the shape"),
                               (dict(model_name="model.keras"), "model.keras is a trained model already"),
                               (dict(model="resnet20"), "BaseConfig has no setting 'model'")):
        with pytest.raises(ValueError, match=message):
            config.replace(**overrides)


# Two 2x2 images labelled per pixel, and what a model predicts for them, pixel by pixel.
PREDICTED = np.array([0, 0, 1, 1, 2, 2, 0, 1]).reshape(2, 2, 2)
TRUE = np.array([0, 1, 1, 1, 2, 0, 0, 2]).reshape(2, 2, 2)
# By hand: class 0 is predicted at 3 pixels, true at 3, both at 2: IoU 2 / (3 + 3 - 2); class 1 likewise
# 2 / (3 + 3 - 2); class 2 1 / (2 + 2 - 1). 5 of the 8 pixels are right.
MEAN_IOU, PIXEL_ACCURACY = (1 / 2 + 1 / 2 + 1 / 3) / 3, 5 / 8


def test_segmentation_is_scored_by_pixel_accuracy_and_mean_iou():
    images = (255 * np.eye(3, dtype=np.uint8))[PREDICTED]  # the predicted class's channel lit
    dataset = from_arrays(images, TRUE, images, TRUE)
    # Logits = the normalised channels: the lit one is the only one above its mean.
    inputs = keras.Input((2, 2, 3))
    model = keras.Model(inputs, keras.layers.Identity()(inputs))
    metrics = evaluate_classifier(model, dataset, batch_size=2, prefix="base_")
    assert metrics["base_test_mean_iou"] == pytest.approx(MEAN_IOU, abs=1e-6)
    assert metrics["base_test_accuracy"] == pytest.approx(PIXEL_ACCURACY, abs=1e-6)
    # Two images are too few to tell 5 of 8 pixels from always answering the majority class (3 of 8).
    with pytest.raises(ValueError, match=r"scores 62.5% of the pixels of the 2 test images of arrays-"):
        check_above_chance(model, dataset, 2, "the base", "dataset")
    classification = from_arrays(images, TRUE[:, 0, 0], images, TRUE[:, 0, 0])
    assert "test_mean_iou" not in evaluate_classifier(keras.Sequential([inputs, keras.layers.GlobalAveragePooling2D()]),
                                                      classification, batch_size=2)


def test_chance_counts_the_pixels_of_a_mask_and_the_images_of_a_split():
    masks = np.tile(TRUE, (8, 1, 1))  # 16 images: 24 pixels of class 0, 24 of 1, 16 of 2 in 64
    rate = 24 / 64
    assert chance_threshold(masks) == pytest.approx(rate + 3 * np.sqrt(rate * (1 - rate) / 16))
    assert chance_threshold([0, 0, 1, 2]) == pytest.approx(0.5 + 3 * np.sqrt(0.25 / 4))  # one label per image
