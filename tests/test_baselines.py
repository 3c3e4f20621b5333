import json
import os
import re
import subprocess
import sys
import time

import keras_tuner
import pytest

from tas_keras.baselines import OBJECTIVE, BaselineConfig, FlopBandOracle, make_baseline, shape_from_values
from tas_keras.cost import count_shape
from tas_keras.graph import read_model
from tas_keras.graph_space import INDEPENDENT
from tas_keras.models.cifar_resnet import CifarResNet
from tas_keras.runs import RunMismatchError
from tas_keras.search_space import ArchConfig, candidate_widths

from .conftest import REPO, assert_refused_before_any_work
from .test_prune import _tiny_folder
from .test_supernet import user_cnn


class _Unscored(keras_tuner.Tuner):
    """Runs the oracle's proposals without training anything."""

    def run_trial(self, trial):
        return {OBJECTIVE.name: 0.0}


def _cifar_space(name):
    return read_model(CifarResNet(ArchConfig.full(name)), INDEPENDENT)


def _proposals(directory, space, flops_band, count, seed, max_draws=100_000):
    oracle = FlopBandOracle(space, flops_band, count, seed, max_draws)
    oracle.verbose = 0
    _Unscored(oracle, directory=directory, project_name=f"seed{seed}").search()
    return [oracle.trials[trial_id].hyperparameters.values for trial_id in sorted(oracle.trials)]


def test_random_search_proposes_distinct_in_band_shapes_by_seed(tmp_path):
    space, count = _cifar_space("resnet20"), 5
    base = count_shape(space, space.full_shape()).flops
    band = (0.50 * base, 0.55 * base)  # target 0.55, tolerance 0.05, the code's band
    proposals = _proposals(tmp_path / "a", space, band, count, seed=0)
    assert len(proposals) == count
    networks = []
    for values in proposals:
        depths = {stage: values[f"stage{stage}_depth"] for stage in (1, 2, 3)}
        # Only the convs of kept blocks carry a value (s<stage>_b<block>_...: built when block <= depth),
        # each one of its conv's candidate widths.
        built = {slot.name for slot in space.searchable_slots if slot.name == "stem_conv"
                 or int(slot.name.split("_")[1][1:]) <= depths[int(slot.name[1])]}
        assert set(values) == {"stage1_depth", "stage2_depth", "stage3_depth", *built}
        slots = {slot.name: slot for slot in space.searchable_slots}
        assert all(values[name] in candidate_widths(slots[name].full_width) for name in built)
        assert band[0] <= count_shape(space, shape_from_values(space, values)).flops <= band[1]
        networks.append(tuple(sorted(values.items())))
    assert len(set(networks)) == count
    # Seed 0 is a seed (keras-tuner alone would draw a random one), and seeds give different shapes.
    assert _proposals(tmp_path / "b", space, band, count, seed=0) == proposals
    other = _proposals(tmp_path / "c", space, band, count, seed=1)
    assert not {str(values) for values in other} & {str(values) for values in proposals}


def test_an_unreachable_band_stops_the_search_with_the_band(tmp_path):
    space = _cifar_space("resnet8")
    base = count_shape(space, space.full_shape()).flops
    with pytest.raises(ValueError, match=r"no random shape of resnet8 fell in the FLOP band \[0\.010, 0\.020\] "
                                         r"of the full network in 50 draws"):
        _proposals(tmp_path, space, (0.01 * base, 0.02 * base), 1, seed=0, max_draws=50)


def test_a_random_baseline_needs_a_trial_and_magnitude_a_trained_network(tmp_path):
    assert_refused_before_any_work(make_baseline, tmp_path / "random", "count must be >= 1, got 0", kind="random",
                                   count=0)
    assert_refused_before_any_work(make_baseline, tmp_path / "magnitude", "magnitude pruning scores a trained "
                                   "network: give a .keras model", kind="magnitude", model_name="mobilenet_v2")
    # The files a config names are checked when it runs, not when it is made (a run.json's config stays valid).
    assert BaselineConfig(model_name="missing.keras").trained_model() == "missing.keras"
    assert_refused_before_any_work(make_baseline, tmp_path / "missing", "model file 'missing.keras' does not exist",
                                   kind="magnitude", model_name="missing.keras")


@pytest.mark.parametrize("overrides, message", [
    (dict(kind="best"), r"kind must be one of \('predefined', 'random', 'magnitude', 'taylor'\), got 'best'"),
    (dict(target_ratio=1.5), r"target ratio must be in \(0, 1\), got 1.5"),
    (dict(count=0), "count must be >= 1, got 0"),
    (dict(band="wide"), "band must be one of .* got 'wide'"),
    (dict(kind="taylor"), "taylor pruning scores a trained network: give a .keras model or a trained resnet20"),
    (dict(epochs=0), "epochs, batch_size and learning_rate must be positive, got 0, 256, 0.1"),
    (dict(mixed_precision="float8"), "got 'float8'"),
    (dict(epoch=1), "BaselineConfig has no setting 'epoch'; its settings: dataset_name, .*epochs, "),
])
def test_a_baseline_config_refuses_a_bad_setting_quoting_it(overrides, message):
    with pytest.raises(ValueError, match=message):
        BaselineConfig().replace(**overrides)
    with pytest.raises(ValueError, match=message):
        BaselineConfig.from_dict(overrides)


# The run.json of `make_baseline(out, "predefined")` and of `make_baseline(out, "predefined",
# **GIVEN_SETTINGS)` as the code before BaselineConfig wrote them (commit 1c2c93e): the settings added
# later (add_mode, width_multiple, trained, learning_rate, input_convention) only when given; how the run
# ran (checkpoint_steps, streaming, strategy) never.
PREVIOUS_RUN_FILE = {
    "kind": "predefined", "model_name": "resnet20", "target_ratio": 0.5, "tolerance": 0.05, "band": "code",
    "dataset_name": "cifar10_mini", "data_dir": None, "count": 8, "epochs": 1, "batch_size": 256, "seed": 0,
    "max_train_examples": None, "image_size": None, "stage": "baseline"}
GIVEN_SETTINGS = dict(model_name="resnet8", target_ratio=0.6, tolerance=0.1, band="paper", count=3, epochs=2,
                      batch_size=32, seed=1, max_train_examples=64, add_mode="tied", width_multiple=2,
                      trained="teacher.keras", learning_rate=0.01, input_convention="unit", checkpoint_steps=5,
                      streaming="never", strategy="default")
PREVIOUS_GIVEN_RUN_FILE = {
    "kind": "predefined", "model_name": "resnet8", "target_ratio": 0.6, "tolerance": 0.1, "band": "paper",
    "dataset_name": "cifar10_mini", "data_dir": None, "count": 3, "epochs": 2, "batch_size": 32, "seed": 1,
    "max_train_examples": 64, "image_size": None, "add_mode": "tied", "width_multiple": 2,
    "trained": "teacher.keras", "learning_rate": 0.01, "input_convention": "unit", "stage": "baseline"}


@pytest.fixture
def in_a_directory_with_a_teacher(tmp_path, monkeypatch):
    """`tmp_path` as the working directory, holding the trained network of GIVEN_SETTINGS."""
    monkeypatch.chdir(tmp_path)
    CifarResNet(ArchConfig.full("resnet8")).save("teacher.keras")
    return tmp_path


def test_a_baseline_records_what_the_previous_code_recorded(in_a_directory_with_a_teacher):
    assert BaselineConfig().run_record() == PREVIOUS_RUN_FILE
    given = BaselineConfig(**GIVEN_SETTINGS)
    assert given.run_record() == PREVIOUS_GIVEN_RUN_FILE
    assert BaselineConfig.from_dict(given.run_record()) == given.replace(checkpoint_steps=200, streaming="auto",
                                                                         strategy="auto")
    make_baseline("default", kind="predefined")
    make_baseline("given", kind="predefined", **GIVEN_SETTINGS)
    for name, previous in (("default", PREVIOUS_RUN_FILE), ("given", PREVIOUS_GIVEN_RUN_FILE)):
        assert json.loads((in_a_directory_with_a_teacher / name / "run.json").read_text()) == previous, name


@pytest.mark.parametrize("settings, previous", [
    ({}, PREVIOUS_RUN_FILE), (GIVEN_SETTINGS, PREVIOUS_GIVEN_RUN_FILE)], ids=["default", "given"])
def test_a_finished_baseline_of_the_previous_code_resumes(in_a_directory_with_a_teacher, settings, previous):
    """Its arch.json is returned as it is, nothing recomputed; other settings are refused."""
    out = in_a_directory_with_a_teacher / "baseline"
    out.mkdir()
    (out / "run.json").write_text(json.dumps(previous))
    (out / "arch.json").write_text(json.dumps({"written by": "the previous code"}))
    assert make_baseline(str(out), kind="predefined", **settings) == {"written by": "the previous code"}
    with pytest.raises(RunMismatchError, match="count: .* -> 4"):
        make_baseline(str(out), kind="predefined", **{**settings, "count": 4})


def _baseline_cli(out, *args):
    return subprocess.Popen([sys.executable, "-m", "train.baseline", f"--out={out}", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_the_cli_overrides_only_the_settings_of_the_flags_given(tmp_path):
    """Flags left at their defaults leave the config's; the flags named otherwise than their settings
    (--model, --target_flops_ratio, --num_candidates) set them."""
    runs = {"default": _baseline_cli(tmp_path / "default", "--kind=predefined"),
            "given": _baseline_cli(tmp_path / "given", "--kind=predefined", "--model=resnet8",
                                   "--target_flops_ratio=0.6", "--num_candidates=3", "--learning_rate=0.01",
                                   "--streaming=never")}
    for name, run in runs.items():
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
    assert json.loads((tmp_path / "default" / "run.json").read_text()) == PREVIOUS_RUN_FILE
    assert json.loads((tmp_path / "given" / "run.json").read_text()) == {
        **PREVIOUS_RUN_FILE, "model_name": "resnet8", "target_ratio": 0.6, "count": 3, "learning_rate": 0.01}


def test_a_users_model_states_its_image_size(tmp_path):
    """Without image_size the data is read at the model's input side; another size is refused in one line
    that names both."""
    keras_model = tmp_path / "mine.keras"
    user_cnn().save(keras_model)  # 8 px images, 4 classes
    common = dict(model_name=str(keras_model), target_ratio=0.6, tolerance=0.1,
                  dataset_name=_tiny_folder(tmp_path / "data", 12, 4))
    shape = make_baseline(str(tmp_path / "read_at_8"), kind="predefined", **common)
    assert shape["input_shape"] == [8, 8, 3]
    with pytest.raises(ValueError, match=r"^\S*mine.keras takes 8x8x3 images and gives 4 classes; the dataset .* has "
                                         r"16x16x3 images and 4 classes$"):
        make_baseline(str(tmp_path / "read_at_16"), kind="predefined", image_size=16, **common)


@pytest.mark.slow
def test_baselines_of_a_users_model_are_shapes_of_its_space(tmp_path):
    """A user's .keras model gets every baseline as a shape of its space in the FLOP band (a 10% band: a
    channel of this small model's 8-channel slots moves its FLOPs by several percent); the random
    search's trials start from its weights."""
    keras_model = tmp_path / "mine.keras"
    user_cnn().save(keras_model)  # 8 px images, 4 classes
    common = dict(model_name=str(keras_model), target_ratio=0.6, tolerance=0.1, batch_size=8,
                  dataset_name=_tiny_folder(tmp_path / "data", 12, 4))
    space = read_model(keras_model)
    full = count_shape(space, space.full_shape()).flops
    for kind in ("predefined", "magnitude", "taylor", "random"):
        shape = make_baseline(str(tmp_path / kind), kind=kind, count=2, learning_rate=0.01, **common)
        assert shape["format"] == "tas_keras.PrunedShape" and shape["provenance"]["source"] == kind
        assert 0.5 <= shape["provenance"]["flops_ratio"] <= 0.6
        assert shape["provenance"]["flops"] / full == pytest.approx(shape["provenance"]["flops_ratio"])
        if kind in ("magnitude", "taylor"):  # the network ordered by the ranking's scores, to train the shape from
            assert (tmp_path / kind / "ordered.keras").exists()
    candidates = json.loads((tmp_path / "random" / "candidates.json").read_text())
    assert len(candidates) == 2 and all(0.5 <= c["provenance"]["flops_ratio"] <= 0.6 for c in candidates)


RANDOM_BASELINE = [sys.executable, "-m", "train.baseline", "--kind=random", "--model=resnet8",
                   "--max_train_examples=256", "--batch_size=16", "--epochs=1", "--num_candidates=3",
                   "--checkpoint_steps=2", "--target_flops_ratio=0.5", "--seed=1"]


@pytest.mark.slow
def test_a_random_search_killed_mid_trial_resumes_to_the_uninterrupted_result(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start(name):
        with open(tmp_path / f"{name}.log", "w") as log:
            return subprocess.Popen([*RANDOM_BASELINE, f"--out={tmp_path / name}"], cwd=REPO, env=env,
                                    stdout=subprocess.DEVNULL, stderr=log)

    whole = start("whole")  # alongside the killed run: they share nothing but the CPU
    killed, out = start("killed"), tmp_path / "killed"
    second_trial_backup, deadline = out / "trials" / "1" / "backup" / "latest.weights.h5", time.time() + 300
    while killed.poll() is None and not second_trial_backup.exists() and time.time() < deadline:
        time.sleep(0.01)
    killed.kill()
    assert killed.wait() == -9, (tmp_path / "killed.log").read_text()[-3000:]
    assert not (out / "arch.json").exists()
    # keras-tuner's record: the first trial finished, the second still running.
    status = {trial: json.loads((out / "tuner" / f"trial_{trial}" / "trial.json").read_text())["status"]
              for trial in (0, 1)}
    assert status == {0: "COMPLETED", 1: "RUNNING"}

    resumed = subprocess.run([*RANDOM_BASELINE, f"--out={out}"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step, steps = map(int, re.search(r"resuming \S+/trials/1 at epoch 1, step (\d+) of (\d+)",
                                     resumed.stderr).groups())
    assert 0 < step < steps  # the interrupted trial went on from its backup
    assert "trial 0:" not in resumed.stderr and "trial 2:" in resumed.stderr  # the finished one was kept
    assert whole.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()[-3000:]

    for name in ("arch.json", "candidates.json"):
        assert json.loads((out / name).read_text()) == json.loads((tmp_path / "whole" / name).read_text()), name
    candidates = json.loads((out / "candidates.json").read_text())
    assert [c["provenance"]["trial"] for c in candidates] == ["0", "1", "2"]
    # Same weights at the end of every trial: the validation loss is far finer than the accuracy.
    for trial in ("0", "1", "2"):
        got, expected = (json.loads((tmp_path / name / "trials" / trial / "epochs.json").read_text())
                         for name in ("killed", "whole"))
        assert got[0]["logs"]["val_loss"] == pytest.approx(expected[0]["logs"]["val_loss"], rel=1e-6), trial
