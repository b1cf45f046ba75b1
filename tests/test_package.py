"""The package's layout: the library never imports the runner; the old module names still work."""

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

from jackpots_jax.experiment import config, modes
from jackpots_jax.io import checkpoints, export, weights

ALIASES = {
    "jackpots_jax.convert": (weights, ["import_checkpoint", "export_state_dict", "to_flax"]),
    "jackpots_jax.checkpoints": (checkpoints, ["Checkpointer", "fingerprint"]),
    "jackpots_jax.config_schema": (config, ["base_config", "ConfigError", "cifar_recipe"]),
    "jackpots_jax.train": (modes, ["train_and_evaluate"]),
}


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_old_module_warns_and_reexports_the_new_home(name):
    sys.modules.pop(name, None)
    with pytest.warns(DeprecationWarning, match=name.replace(".", r"\.") + " is deprecated"):
        old = importlib.import_module(name)
    home, names = ALIASES[name]
    for attr in names:
        assert getattr(old, attr) is getattr(home, attr), attr


def test_one_mismatch_error_and_one_masks_reader():
    sys.modules.pop("jackpots_jax.checkpoints", None)
    with pytest.warns(DeprecationWarning):
        old = importlib.import_module("jackpots_jax.checkpoints")
    assert old.CheckpointMismatchError is weights.CheckpointMismatchError
    assert old.masks_from_npz is export.masks_from_npz


ROOT = pathlib.Path(__file__).resolve().parents[1] / "jackpots_jax"
# The runner: the experiment package, the command line, and the old names of runner modules.
RUNNER = ("jackpots_jax.experiment", "jackpots_jax.main", "jackpots_jax.train",
          "jackpots_jax.config_schema")  # fmt: skip


def library_files():
    runner_files = {"main.py", "train.py", "config_schema.py"}
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
