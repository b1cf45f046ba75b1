"""Multi-host data parallelism: two real processes against one, and `initialize_distributed`.

The two processes (`multihost_driver.py`, 2 CPU devices each, joined over 127.0.0.1 with gloo
collectives) each see only their half of every global batch, data parallel (`shard_map`, `pmap`)
and with the search state sharded over an `fsdp` axis that spans both processes; the reference
is the single-device search step of this process on the whole global batch.
"""

import os
import socket
import subprocess
import sys
from functools import partial

import jax
import numpy as np
import pytest
from multihost_driver import GLOBAL_BATCH, SETUP, STEPS, flatten
from test_step import batches, setup

from jackpots_jax import parallel
from jackpots_jax.parallel import initialize_distributed
from jackpots_jax.step import search_step

# The command line or another program in a process of its own: `-m 'not e2e'` skips them.
pytestmark = pytest.mark.e2e

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_driver.py")
TIMEOUT_S = 240
# Every variable that could make `initialize_distributed` join a run.
CLUSTER_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    *parallel._SLURM_VARS,
    "OMPI_MCA_orte_hnp_uri",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_PROCESS_ADDRESSES",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(out_dir, n=2):
    """Starts `n` driver processes, waits for all; fails with their output if one fails."""
    root = os.path.dirname(os.path.dirname(DRIVER))
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
    env |= {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")])),
    }
    port = free_port()
    procs, logs = [], []
    for i in range(n):
        log = open(out_dir / f"log_{i}.txt", "w+")  # noqa: SIM115 - closed below
        cmd = [sys.executable, DRIVER, "--process-id", str(i), "--num-processes", str(n)]
        cmd += ["--port", str(port), "--out", str(out_dir)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    failed = []
    try:
        for i, p in enumerate(procs):
            try:
                if p.wait(timeout=TIMEOUT_S) != 0:
                    failed.append(f"process {i} exited with {p.returncode}")
            except subprocess.TimeoutExpired:
                failed.append(f"process {i} timed out after {TIMEOUT_S} s")
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for i, log in enumerate(logs):
        log.seek(0)
        outputs.append(f"--- process {i} ---\n{log.read()}")
        log.close()
    if failed:
        pytest.fail("; ".join(failed) + "\n" + "\n".join(outputs))


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    run_processes(tmp_path)

    # The reference: one device, the whole global batch, the same steps.
    run = setup(**SETUP)
    step = jax.jit(partial(search_step, apply_fn=run.apply_fn, tx=run.tx))
    state = run.state
    losses, churns = [], []
    for batch in batches(STEPS, batch=GLOBAL_BATCH):
        state, metrics = step(state, run.params, batch)
        losses.append(float(metrics["loss"]))
        churns.append(int(metrics["churn"]))
    assert all(c > 0 for c in churns)  # the masks move, so equal masks mean something
    want_masks, want_scores = flatten("masks", state.masks), flatten("scores", state.scores)
    assert len(want_masks) == 2  # conv1, conv2 (the head stays dense)

    for pid in (0, 1):
        got = np.load(tmp_path / f"process_{pid}.npz")
        for backend in ("shard_map", "pmap", "fsdp"):
            for key, want in want_masks.items():
                np.testing.assert_array_equal(got[f"{backend}/{key}"], want, err_msg=key)
            for key, want in want_scores.items():
                np.testing.assert_allclose(
                    got[f"{backend}/{key}"], want, rtol=1e-5, atol=1e-6, err_msg=key
                )
            np.testing.assert_array_equal(got[f"{backend}/churn"], churns)
            np.testing.assert_allclose(got[f"{backend}/loss"], losses, rtol=1e-5)
            assert int(got[f"{backend}/step"]) == STEPS


@pytest.fixture
def no_cluster_env(monkeypatch):
    for name in CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_initialize_distributed_without_cluster_is_a_no_op(no_cluster_env):
    assert not jax.distributed.is_initialized()
    assert initialize_distributed() is False
    assert not jax.distributed.is_initialized()
    # One process asked for explicitly, or a one-task Slurm step: nothing to join either.
    assert initialize_distributed("127.0.0.1:1", num_processes=1, process_id=0) is False
    for name, value in {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "node1",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }.items():
        no_cluster_env.setenv(name, value)
    assert initialize_distributed() is False
    no_cluster_env.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    assert initialize_distributed() is False
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1


def test_initialize_distributed_bad_settings(no_cluster_env):
    no_cluster_env.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="missing coordinator_address, process_id"):
        initialize_distributed()
    with pytest.raises(ValueError, match="process_id"):
        initialize_distributed("127.0.0.1:1", process_id=2)
    no_cluster_env.setenv("JAX_PROCESS_ID", "zero")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='zero'"):
        initialize_distributed("127.0.0.1:1")
    assert not jax.distributed.is_initialized()


def test_cluster_detection(no_cluster_env):
    assert parallel._detected_cluster() is None
    no_cluster_env.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
    no_cluster_env.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert parallel._detected_cluster() is None
    no_cluster_env.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert parallel._detected_cluster() == "ompi"
    no_cluster_env.delenv("OMPI_MCA_orte_hnp_uri")
    no_cluster_env.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
    assert parallel._detected_cluster() == "tpu"
