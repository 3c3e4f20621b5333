import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
# The paper's released shape files, copied into the repository (tests/data/released_shapes/README.md).
RELEASED_SHAPES = REPO / "tests" / "data" / "released_shapes"
RELEASED_SHAPE_FILES = tuple(f"NeurIPS-2019__C{classes}-ResNet{depth}.config"
                             for classes in ("010", "100") for depth in (110, 164, 20, 32, 56)) + tuple(
    f"compares__{name}.config" for name in ("CIFAR010-TAS-R110", "CIFAR010-TAS-R56", "CIFAR100-FIX-R32",
                                             "CIFAR100-RAND-R32", "CIFAR100-TAS-R110", "CIFAR100-TAS-R32",
                                             "CIFAR100-TAS-R56"))


def assert_refused_before_any_work(stage, out, message, **options):
    """`stage(out, **options)` (a stage function: run_prune, run_search, train_base, ...) raises a
    ValueError matching `message` and leaves `out` unmade."""
    with pytest.raises(ValueError, match=message):
        stage(str(out), **options)
    assert not os.path.exists(out)


@pytest.fixture
def released_shapes():
    """The paper's 17 released shape files, in sorted order. A missing one fails the test that asks for
    them (never a skip): the copies are part of the repository."""
    missing = [name for name in RELEASED_SHAPE_FILES if not (RELEASED_SHAPES / name).is_file()]
    if missing:
        pytest.fail(f"released shape files missing from {RELEASED_SHAPES}: {', '.join(missing)}")
    return sorted(RELEASED_SHAPES / name for name in RELEASED_SHAPE_FILES)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TAS_KERAS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    os.makedirs(os.environ["TAS_KERAS_CACHE"], exist_ok=True)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(items):
    """pytest-xdist (pytest.ini: two workers, --dist loadgroup) spreads the tests over the workers, but a
    module-scoped fixture (a trained model or run several tests inspect, one fixture often built on
    another) must be built once, so a module's tests that use one run on the same worker. Slow groups go
    out first, so that the two workers finish together rather than one waiting for the other's last
    end-to-end run; a group stays in one block, so that a serial run (-n 0) builds its fixtures once too."""
    groups = {}
    for item in items:
        if any(definitions[-1].scope == "module" for definitions in item._fixtureinfo.name2fixturedefs.values()):
            groups[item] = item.module.__name__
            item.add_marker(pytest.mark.xdist_group(groups[item]))
    slow_groups = {groups.get(item, item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: groups.get(item, item) not in slow_groups)


def predefined_arch(full, target_ratio, tolerance=0.05):
    """The pre-defined (uniform) baseline of a CIFAR ResNet `full` (an ArchConfig) as an ArchConfig."""
    from tas_keras.baselines import predefined_shape
    from tas_keras.cifar_shapes import arch_from_shape
    from tas_keras.graph import read_model
    from tas_keras.graph_space import INDEPENDENT
    from tas_keras.models.cifar_resnet import CifarResNet

    space = read_model(CifarResNet(full), INDEPENDENT)
    shape, provenance = predefined_shape(space, target_ratio, tolerance)
    return arch_from_shape(space, shape).replace(provenance=provenance)
