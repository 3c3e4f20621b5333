import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tas_keras.distribute import make_strategy

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
def test_mirrored_step_equals_single_device_step():
    result = subprocess.run([sys.executable, str(REPO / "tests" / "mirrored_step.py")], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    # A scaling mistake (mean vs sum over replicas, an unscaled cost or decay term) moves weights by a
    # sizeable fraction of the update; the search step matches to float precision.
    assert report["search"]["max_weight_diff"] < 1e-5
    assert report["base"]["max_weight_diff"] < 0.01 * report["base"]["max_update"]
    for name in ("base", "search"):
        single, replicated = report[name]["loss"]
        assert replicated == pytest.approx(single, rel=1e-5)  # metrics are global values


@pytest.mark.slow
def test_killed_search_resumes_to_the_same_epoch_count(tmp_path):
    out = tmp_path / "search"
    command = [sys.executable, "-m", "train.search", f"--out={out}", "--epochs=3", *TINY_SEARCH]
    run = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = out / "history.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (history.exists() and json.loads(history.read_text())):
        time.sleep(0.2)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (out / "arch.json").exists()  # an interrupted search never looks finished

    resumed = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    entries = json.loads(history.read_text())
    assert [e["epoch"] for e in entries] == [0, 1, 2]  # no duplicate, none missing
    assert entries[0]["tau"] == pytest.approx(5.0) and entries[2]["tau"] == pytest.approx(0.1)
    arch = json.loads((out / "arch.json").read_text())
    assert arch["widths"] == entries[arch["provenance"]["epoch"]]["widths"] and arch["provenance"]["epochs"] == 3
