"""Run directories on bad days: a second run on a directory in use, a killed holder, a diverging
training, backups that cannot be read."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import h5py
import keras
import numpy as np
import pytest

from tas_keras.runs import RunLock, RunLockedError, lock_run_dir, locking_stage, prepare_run_dir
from tas_keras.search import run_search
from tas_keras.training import (BackupError, DivergenceError, StopOnDivergence, TrainingCheckpoint,
                                restore_checkpoint)

from .conftest import REPO


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_a_locked_run_directory_is_refused_naming_its_holder(tmp_path):
    holder = RunLock(str(tmp_path)).acquire()  # another open file: flock refuses it to this process too
    try:
        with pytest.raises(RunLockedError) as refused:
            prepare_run_dir(str(tmp_path), {"stage": "test"}, done_file="done.json")
        assert re.fullmatch(rf"{tmp_path} is in use by another run \(pid {os.getpid()} on "
                            rf"{re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\dT\S+: .*\); wait "
                            r"for it to end, stop it, or use another --out", str(refused.value))
        assert not (tmp_path / "run.json").exists()  # refused before touching the directory
    finally:
        holder.release()
    run, finished = prepare_run_dir(str(tmp_path), {"stage": "test"}, done_file="done.json")
    assert (run, finished) == (str(tmp_path), False)


def test_a_stage_releases_its_locks_when_it_returns_or_fails(tmp_path):
    @locking_stage
    def stage(fail):
        lock_run_dir(str(tmp_path / "top"))
        lock_run_dir(str(tmp_path / "top" / "sub"))  # a stage's sub-directory: its own lock
        lock_run_dir(str(tmp_path / "top"))  # held already by this process: no self-refusal
        if fail:
            raise RuntimeError("stage failed")

    for fail in (False, True):
        if fail:
            with pytest.raises(RuntimeError):
                stage(fail)
        else:
            stage(fail)
        for directory in (tmp_path / "top", tmp_path / "top" / "sub"):
            RunLock(str(directory)).acquire().release()  # free again


def _backup_step(path):
    with h5py.File(path, "r") as backup:
        return int(backup["optimizer/vars/0"][()])


@pytest.mark.slow
def test_a_second_run_is_refused_and_a_killed_holder_is_taken_over(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "train.base", f"--out={out}", "--model=resnet8", "--max_train_examples=256",
               "--batch_size=16", "--epochs=2", "--checkpoint_steps=1"]
    first = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "backup" / "latest.weights.h5").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # mid-run, holding the directory
        assert json.loads((out / "run.lock").read_text())["pid"] == first.pid

        start = time.perf_counter()
        second = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
        assert time.perf_counter() - start < 60  # TensorFlow's import and the cached data, no training
        assert second.returncode == 2
        (error,) = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert error.startswith(f"error: {out} is in use by another run (pid {first.pid} on "
                                f"{socket.gethostname()}, started ")
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    killed_at = _backup_step(out / "backup" / "latest.weights.h5")

    third = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"resuming {out} at epoch {killed_at // 16 + 1}, step {killed_at % 16} of 16" in third.stderr
    assert (out / "metrics.json").exists()


@pytest.mark.slow
def test_a_diverging_base_training_stops_at_once_keeping_its_good_backups(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "train.base", f"--out={out}", "--model=resnet8", "--max_train_examples=256",
         "--batch_size=32", "--epochs=3", "--checkpoint_steps=1", "--learning_rate=1e6"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    match = re.fullmatch(r"error: base training diverged at epoch 1, step (\d) of 8: (loss = (nan|inf)|variables "
                         r".+ are not finite)\. Try a lower --learning_rate \(this run: 1e\+06\), and start afresh "
                         rf"with --overwrite; {out}/backup keeps the last training state before it", error)
    assert match, error
    assert "Traceback" not in result.stderr
    # Nothing that looks finished; every backup left holds the finite state of a step before.
    assert not (out / "model.keras").exists() and not (out / "metrics.json").exists()
    backups = [out / "backup" / name for name in ("latest.weights.h5", "previous.weights.h5")]
    assert _backup_step(backups[0]) == int(match.group(1)) - 1
    for path in filter(os.path.exists, backups):
        with h5py.File(path, "r") as backup:
            arrays = []
            backup.visititems(lambda name, item: arrays.append(item[()]) if isinstance(item, h5py.Dataset) else None)
        assert arrays and all(np.isfinite(a).all() for a in arrays if np.issubdtype(a.dtype, np.floating))


@pytest.mark.slow
def test_a_search_stops_when_its_architecture_weights_stop_being_finite(tmp_path):
    # A NaN architecture learning rate without a warm-up: alpha and beta turn NaN after the first
    # update, before any loss does.
    with pytest.raises(DivergenceError, match=r"^search diverged at epoch 1, step 1 of \d+: variables "
                                              r".*\bstem_conv_width/alpha, .* are not finite\. Try a lower "
                                              r"--learning_rate \(0\.1\) or --arch_learning_rate \(this run: nan\)"):
        run_search(str(tmp_path / "search"), model_name="resnet8", max_train_examples=256, batch_size=32,
                   epochs=1, arch_learning_rate=float("nan"), arch_warmup=0.0)
    assert not (tmp_path / "search" / "arch.json").exists()


def _tiny_model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="dense")])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_a_non_finite_weight_stops_training_at_that_step(tmp_path):
    model = _tiny_model()

    class Poison(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:  # after the third step's loss was computed, finite
                model.get_layer("dense").kernel.assign(np.full((2, 1), np.nan, np.float32))

    check = StopOnDivergence("test", 4, "Try something", str(tmp_path))
    with pytest.raises(DivergenceError, match=r"^test diverged at epoch 1, step 3 of 4: variables "
                                              r"sequential/dense/kernel are not finite\. Try something, and "
                                              r"start afresh with --overwrite$"):
        model.fit(np.ones((8, 2)), np.ones((8, 1)), batch_size=2, callbacks=[Poison(), check], verbose=0)


def _save(checkpoint, model, step, kernel_value):
    model.get_layer("dense").kernel.assign(np.full((2, 1), kernel_value, np.float32))
    model.optimizer.iterations.assign(step)
    checkpoint.save()


def test_an_unreadable_backup_falls_back_to_the_previous_one(tmp_path, caplog):
    model = _tiny_model()
    checkpoint = TrainingCheckpoint(str(tmp_path), steps_per_epoch=10)
    checkpoint.set_model(model)
    _save(checkpoint, model, 3, 1.0)
    _save(checkpoint, model, 6, 2.0)
    assert sorted(os.listdir(tmp_path)) == ["latest.weights.h5", "previous.weights.h5"]

    # A new backup that does not read back never replaces the good ones.
    model.save_weights = lambda path: open(path, "wb").write(b"half a file")
    with pytest.raises(OSError):
        _save(checkpoint, model, 9, 3.0)
    assert sorted(os.listdir(tmp_path)) == ["latest.weights.h5", "previous.weights.h5"]
    assert _backup_step(tmp_path / "latest.weights.h5") == 6

    latest = tmp_path / "latest.weights.h5"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated on disk
    restored = _tiny_model()
    assert restore_checkpoint(restored, str(tmp_path)) == 3
    np.testing.assert_array_equal(restored.get_layer("dense").kernel.numpy(), np.full((2, 1), 1.0))
    assert f"cannot read the backup {latest}" in caplog.text
    assert "resuming from the previous backup" in caplog.text

    previous = tmp_path / "previous.weights.h5"
    previous.write_bytes(b"")
    with pytest.raises(BackupError, match=rf"^no readable backup to resume from: {latest} \(.+\); {previous} "
                                          r"\(.+\)\. Start afresh with --overwrite$"):
        restore_checkpoint(_tiny_model(), str(tmp_path))
