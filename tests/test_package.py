"""The package's layout: the library never imports the runner; no module is left at an old name."""

import ast
import pathlib
import subprocess
import sys

import pytest

OLD_NAMES = ("train", "checkpoints", "convert", "config_schema")


@pytest.mark.parametrize("name", OLD_NAMES)
def test_the_old_top_level_modules_are_gone(name):
    """Their contents live in `experiment` and `io`; the package top holds only the library."""
    assert not (ROOT / f"{name}.py").exists()


ROOT = pathlib.Path(__file__).resolve().parents[1] / "jackpots_jax"
# The runner: the experiment package and the command line.
RUNNER = ("jackpots_jax.experiment", "jackpots_jax.main")


def library_files():
    runner_files = {"main.py"}
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] != "experiment" and str(relative) not in runner_files:
            yield relative, path


def test_the_library_never_imports_the_runner():
    files = list(library_files())
    assert {"step.py", "io/checkpoints.py", "models/spec.py"} <= {str(r) for r, _ in files}
    for relative, path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            bad = [n for n in names if n.startswith(RUNNER)]
            assert not bad, f"{relative} imports the runner: {bad}"
    # And at run time: the whole library loads without a runner module.
    code = (
        "import sys, jackpots_jax, jackpots_jax.io, jackpots_jax.models, jackpots_jax.data, "
        "jackpots_jax.parallel; "
        f"loaded = [m for m in sys.modules if m.startswith({RUNNER!r})]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_engine_loads_without_the_data_and_runner_dependencies():
    """The accelerator benchmarks run where only jax, flax, optax and numpy are installed.

    The GPU machines' image lacks grain, tensorflow-datasets and ml_collections: importing the
    engine (selection, masks, restriction, steps, parallel runners, models) must not need them.
    """
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top in ("grain", "tensorflow_datasets", "ml_collections", "orbax", "tensorboardX"):
            raise ImportError("not installed here: " + name)
sys.meta_path.insert(0, Block())
import jackpots_jax, jackpots_jax.select, jackpots_jax.step, jackpots_jax.parallel
import jackpots_jax.models
"""
    subprocess.run([sys.executable, "-c", code], check=True)
