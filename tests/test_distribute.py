import json
import os
import signal
import socket
import subprocess
import sys
import time

import h5py
import pytest

from tas_keras import data
from tas_keras.distribute import make_strategy
from tas_keras.runs import holds_own_files
from tas_keras.search import search_batches

from .conftest import REPO

TINY_SEARCH = ["--model=resnet8", "--max_train_examples=256", "--batch_size=32", "--target_flops_ratio=0.5"]


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def test_strategy_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="strategy must be one of .* got 'tpu'"):
        make_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="multi_worker needs TF_CONFIG"):
        make_strategy("multi_worker")


@pytest.mark.slow
@pytest.mark.parametrize("step", ["base", "search"])
def test_mirrored_step_equals_single_device_step(step):
    result = subprocess.run([sys.executable, str(REPO / "tests" / "mirrored_step.py"), step], cwd=REPO,
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    # A scaling mistake (mean vs sum over replicas, an unscaled cost or decay term) moves weights by a
    # sizeable fraction of the update; both steps match to float precision (the base step in float64).
    assert report["max_weight_diff"] < (1e-5 if step == "search" else 1e-9 * report["max_update"])
    single, replicated = report["loss"]
    assert replicated == pytest.approx(single, rel=1e-5)  # metrics are global values


def _backup_step(out):
    """The global step of a run's backup (the optimizer's iteration count), or None."""
    try:
        with h5py.File(out / "backup" / "latest.weights.h5", "r") as backup:
            return int(backup["optimizer/vars/0"][()])
    except (OSError, KeyError):
        return None


def _run_killed_mid_epoch(command, out, steps_per_epoch):
    """Starts `command`, SIGKILLs it once its backup is inside the second epoch, returns that step."""
    run = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None:
        step = _backup_step(out)
        if step and step > steps_per_epoch and step % steps_per_epoch:
            break
    run.send_signal(signal.SIGKILL)
    run.wait()
    killed_at = _backup_step(out)
    assert killed_at % steps_per_epoch and killed_at < 3 * steps_per_epoch, killed_at
    return killed_at


KILLED_RUNS = {
    "search": ["train.search", "--target_flops_ratio=0.5", "--batch_size=16"],
    "base": ["train.base", "--batch_size=32", "--learning_rate=0.05"],
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(KILLED_RUNS))
def test_a_stage_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, stage):
    module, *flags = KILLED_RUNS[stage]

    def command(out):
        return [sys.executable, "-m", module, f"--out={out}", "--epochs=3", "--model=resnet8",
                "--max_train_examples=512", "--seed=3", "--checkpoint_steps=4", *flags]

    uninterrupted = subprocess.run(command(tmp_path / "whole"), cwd=REPO, env=_env(), capture_output=True,
                                   text=True, timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    steps_per_epoch = _backup_step(tmp_path / "whole") // 3

    out = tmp_path / "killed"
    killed_at = _run_killed_mid_epoch(command(out), out, steps_per_epoch)
    done_file = "arch.json" if stage == "search" else "metrics.json"
    assert not (out / done_file).exists()  # an interrupted run never looks finished

    resumed = subprocess.run(command(out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {killed_at % steps_per_epoch} of {steps_per_epoch}" in resumed.stderr
    log = "history.json" if stage == "search" else "epochs.json"
    expected, got = (json.loads((tmp_path / name / log).read_text()) for name in ("whole", "killed"))
    assert [e["epoch"] for e in got] == [0, 1, 2]  # no duplicate, none missing
    # Weights, optimizer states, tau and the data position were restored: the resumed run computes what
    # the uninterrupted one did. Only the interrupted epoch's training metrics cover fewer batches.
    assert got[2]["logs"] == pytest.approx(expected[2]["logs"], rel=1e-6)
    if stage == "search":
        for key in ("widths", "depths", "flops", "tau"):
            assert [e[key] for e in got] == [e[key] for e in expected], key
        # The same --seed gives the same arch.json (a run's wall time aside), resumed or not.
        archs = [json.loads((tmp_path / name / "arch.json").read_text()) for name in ("whole", "killed")]
        for arch in archs:
            del arch["provenance"]["search_wall_time_s"]
        assert archs[0] == archs[1]
    else:
        metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("whole", "killed")]
        assert metrics[1]["test_accuracy"] == metrics[0]["test_accuracy"]
        assert metrics[1]["history"]["val_loss"] == pytest.approx(metrics[0]["history"]["val_loss"], rel=1e-6)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_on_localhost_search_together_and_agree_on_the_shape(tmp_path):
    out, epochs = tmp_path / "search", 2
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    workers = [subprocess.Popen(
        [sys.executable, "-m", "train.search", f"--out={out}", f"--epochs={epochs}", "--strategy=multi_worker",
         *TINY_SEARCH], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})))
        for index in range(2)]
    try:
        errors = [worker.communicate(timeout=600)[1] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for worker, error in zip(workers, errors):
        assert worker.returncode == 0, error[-3000:]

    # The chief wrote the run directory, the other worker its own copy; synchronous training gives both
    # the same shape.
    archs = [json.loads(path.read_text()) for path in (out / "arch.json", out / "workers/worker_1/arch.json")]
    for arch in archs:
        del arch["provenance"]["search_wall_time_s"]
    assert archs[0] == archs[1]
    assert [e["epoch"] for e in json.loads((out / "history.json").read_text())] == list(range(epochs))
    # --batch_size is the global batch: the two workers together took as many steps as one device would.
    dataset = data.load_dataset(data.BUNDLED_DATASET, max_train_examples=256)
    _, steps_per_epoch = search_batches(dataset, batch_size=32, epochs=epochs, seed=0)
    assert _backup_step(out) == epochs * steps_per_epoch


def test_other_workers_directories_do_not_make_a_run_directory_look_used(tmp_path):
    (tmp_path / "base" / "workers" / "worker_1").mkdir(parents=True)
    (tmp_path / "base" / "workers" / "worker_1" / "run.json").write_text("{}")
    assert not holds_own_files(tmp_path)
    (tmp_path / "base" / "notes.txt").write_text("mine")
    assert holds_own_files(tmp_path)
