"""The library imports no front end (docs/design.md section 2): nothing under tas_keras/ imports train/,
export/ or bench/, whose command lines sit over it, and importing the library defines no absl flag."""

import ast
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = REPO / "tas_keras"
FRONT_ENDS = {"train", "export", "bench"}


def _front_end_imports(path):
    """The modules of FRONT_ENDS that the file imports anywhere (also inside functions)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module)
    return sorted(name for name in names if name.split(".")[0] in FRONT_ENDS)


def test_the_check_sees_a_front_end_import():
    # `from train import common_flags`, and not the library's own tas_keras.prune
    assert _front_end_imports(REPO / "train" / "prune.py") == ["train"]


def test_no_library_module_imports_a_front_end():
    offending = {str(path.relative_to(REPO)): _front_end_imports(path) for path in LIBRARY.rglob("*.py")
                 if _front_end_imports(path)}
    assert not offending


def test_importing_every_library_module_defines_no_flag_and_loads_no_front_end():
    probe = """
import pkgutil, sys, importlib
import tas_keras
from absl import flags
for module in pkgutil.walk_packages(tas_keras.__path__, "tas_keras."):
    importlib.import_module(module.name)
print(sorted({name.split(".")[0] for name in sys.modules} & {"train", "export", "bench"}))
print(sorted(module for module in flags.FLAGS.flags_by_module_dict() if module.startswith("tas_keras")))
"""
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    front_ends, flag_modules = result.stdout.strip().splitlines()[-2:]
    assert (front_ends, flag_modules) == ("[]", "[]")
