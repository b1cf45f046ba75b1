"""The command line with the search state sharded over an `fsdp` mesh axis (4 CPU devices).

A search on a (data, fsdp) = (2, 2) mesh, killed with SIGKILL after step 7 and started again with
the same command, ends with the jackpot of the run that was never stopped, bit for bit: the
sharded checkpoint (each leaf saved and checksummed where its shards are) restores onto the
same layout. The same checkpoint resumed on a (1, 4) mesh, its shards cut elsewhere, ends with
masks that hold exactly the budget of the pre-trained weights in every layer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_main import ROOT, check_ok, metrics, run_main

import jackpots_jax as jj
from jackpots_jax.io import weights

# The command line or another program in a process of its own: `-m 'not e2e'` skips them.
pytestmark = pytest.mark.e2e

KILL_DRIVER = os.path.join(ROOT, "tests", "kill_driver.py")
MESH = ["--config.parallel.backend=jit", "--config.parallel.num_devices=4"]
FSDP_2, FSDP_4 = "--config.parallel.fsdp=2", "--config.parallel.fsdp=4"


@pytest.fixture(scope="module")
def sharded_search(tmp_path_factory, pretrained_tiny):
    root = tmp_path_factory.mktemp("fsdp")
    pretrained, common = pretrained_tiny
    search = [
        *common,
        *MESH,
        "--config.mode=search",
        f"--config.weights.path={pretrained}",
        "--config.checkpoint.every_steps=3",
        "--config.log_every_steps=1",
        "--config.search.rate.schedule=cosine",
    ]
    check_ok(run_main("default.py:tiny", root / "straight", *search, FSDP_2, devices=4))
    return root, search


def _jackpot(workdir):
    return load_file(workdir / "export" / "jackpot.safetensors")


@pytest.mark.slow
def test_sharded_search_killed_and_resumed(tmp_path, sharded_search):
    root, search = sharded_search
    killed = tmp_path / "killed"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [
        sys.executable,
        KILL_DRIVER,
        "7",
        f"--config={os.path.join(ROOT, 'configs', 'default.py:tiny')}",
        f"--workdir={killed}",
        *search,
        FSDP_2,
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    saved = sorted(int(p.name) for p in (killed / "search" / "checkpoints").glob("[0-9]*"))
    assert saved == [3, 6]
    other_mesh = tmp_path / "other_mesh"
    shutil.copytree(killed, other_mesh)

    check_ok(run_main("default.py:tiny", killed, *search, FSDP_2, devices=4))
    want, got = _jackpot(root / "straight"), _jackpot(killed)
    assert set(want) == set(got) and any(k.endswith(".mask") for k in want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    train = [r for r in metrics(killed) if r["phase"] == "search" and r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 17))

    # Restored onto a (1, 4) mesh: every layer keeps exactly its budget of the frozen weights.
    check_ok(run_main("default.py:tiny", other_mesh, *search, FSDP_4, devices=4))
    pretrained = next(a.split("=", 1)[1] for a in search if a.startswith("--config.weights.path="))
    variables, _, _ = weights.import_checkpoint(pretrained, "fmnist_cnn")
    budget = jj.layer_budgets(variables["params"], 0.9, "global_magnitude")
    expected = {name: b for name, b in jj._tree.named_leaves(budget) if b is not None}
    with np.load(other_mesh / "export" / "masks.npz") as f:
        masks = dict(f)
    assert set(masks) == set(expected)
    for name, pruned in expected.items():
        assert masks[name].size - int(masks[name].sum()) == pruned, name
