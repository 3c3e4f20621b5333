import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
RELEASED_SHAPES = SHARED / "reference" / "tas-released-shapes"


@pytest.fixture
def released_shapes():
    """The paper's released shape files; the tests that read them need ../shared beside the checkout."""
    if not RELEASED_SHAPES.is_dir():
        pytest.skip(f"{RELEASED_SHAPES} is not present")
    return sorted(p for p in RELEASED_SHAPES.glob("*.config"))


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TAS_KERAS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    os.makedirs(os.environ["TAS_KERAS_CACHE"], exist_ok=True)
