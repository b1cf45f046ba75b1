"""What a user meets on the command line with input they can fix, and with signals.

Every case ends with exit code 2 (143 for SIGTERM) and one message that names the field, the path
or the variable and what is allowed, before any compute where the input allows, with nothing
half-written on disk. Most cases call the check that raises the error the command line maps to
exit 2; one subprocess runs each distinct exit path (an environment variable, the launchers,
SIGTERM in the middle of a run).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from jackpots_jax import main as cli
from jackpots_jax import models
from jackpots_jax._tree import named_leaves
from jackpots_jax.experiment import config as config_lib
from jackpots_jax.experiment import context, modes, recipes, studies
from jackpots_jax.experiment.config import ConfigError
from jackpots_jax.experiment.logs import MetricsLog
from jackpots_jax.experiment.loop import Interrupted, Terminated, raise_terminated, train_loop
from jackpots_jax.experiment.report import read_metrics
from jackpots_jax.experiment.workdir import LOCK, WorkdirError, claim
from jackpots_jax.io import formats, vit_weights
from jackpots_jax.io.errors import CheckpointMismatchError, FileContentError, MissingDependencyError
from jackpots_jax.models import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def assert_one_message(proc, *phrases, code=2):
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}\n{output[-4000:]}"
    for phrase in phrases:
        assert phrase in proc.stderr, f"{phrase!r} not in:\n{proc.stderr[-4000:]}"
    assert "Traceback" not in output, output[-4000:]


def config_file(name):
    """A config file of `configs/` as the command line loads it (`name` may carry `:variant`)."""
    import importlib.util

    path, _, arg = name.partition(":")
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(CONFIGS, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


# ---------------------------------------------------------------------------------------------
# The config: patterns, sharding rules, model options, studies.


def test_one_in_three_accepts_the_sparsity_it_prints_and_runs_at_two_thirds():
    # 1:3 keeps 1 of every 3 weights: sparsity 2/3, printed as 0.666667.
    assert config_lib.pattern_sparsity("1:3", 0.666667) == 2 / 3
    assert config_lib.pattern_sparsity("2:4", 0.5) == 0.5
    assert config_lib.pattern_sparsity("unstructured", 0.9) == 0.9
    with pytest.raises(ConfigError) as e:
        config_lib.pattern_sparsity("1:3", 0.67)
    assert "`search.sparsity` is 0.67" in str(e.value) and "allowed: 0.666667" in str(e.value)
    c = config_lib.base_config()
    c.search.pattern, c.search.sparsity = "1:3", 0.666667
    config_lib.check(c, num_devices=1, modes=tuple(modes.MODES))
    assert recipes.search_recipe(c).sparsity == 2 / 3


def fmnist_cnn_params():
    return models.network("fmnist_cnn", 10).abstract_variables()["params"]


def test_parallel_rules_in_the_documented_comma_form():
    two = (("conv1/kernel", None), ("fc1/kernel", 0))
    # As the docs write it, and as ml_collections hands it over when quoted as one string.
    assert config_lib.parse_rules(("conv1/kernel=none,fc1/kernel=0",)) == two
    assert config_lib.parse_rules("conv1/kernel=none,fc1/kernel=0") == two
    assert cli._rewritten(["x", "--config.parallel.rules=conv1/kernel=none,fc1/kernel=0"]) == [
        "x",
        "--config.parallel.rules=('conv1/kernel=none,fc1/kernel=0',)",
    ]
    # A comma inside a regular expression is not a separator.
    assert config_lib.parse_rules(("conv{1,2}/kernel=0",)) == (("conv{1,2}/kernel", 0),)
    config_lib.check_rules(("conv1/kernel=none,fc1/kernel=0",), fmnist_cnn_params(), 2)


@pytest.mark.parametrize(
    "rule, fsdp, phrases",
    [
        ("conv9/kernel=none", 1, ["'conv9/kernel', which matches none", "conv1/kernel, conv2"]),
        ("conv1/kernel=7", 2, ["'conv1/kernel=7'", "it has 4 dimension(s)", "allowed: a dim"]),
        # conv1's kernel is (3, 3, 1, 16): 3 does not split in two.
        ("conv1/kernel=0", 2, ["3 does not split into 2 equal parts", "`parallel.fsdp`=2"]),
    ],
)
def test_a_parallel_rule_that_matches_nothing_or_does_not_fit_is_an_error(rule, fsdp, phrases):
    params = fmnist_cnn_params()
    assert tuple(params["conv1"]["kernel"].shape) == (3, 3, 1, 16)
    with pytest.raises(ConfigError) as e:
        config_lib.check_rules((rule,), params, fsdp)
    assert str(e.value).startswith("config field `parallel.rules`")
    for phrase in phrases:
        assert phrase in str(e.value)


def parsed(*overrides):
    """`main.parse_flags` on `configs/default.py` with `overrides`; the config it produced."""
    from absl import flags

    flags.FLAGS.unparse_flags()
    argv = ["main", f"--config={os.path.join(CONFIGS, 'fmnist_vit.py')}", "--workdir=w"]
    cli.parse_flags([*argv, *overrides])
    return cli._CONFIG.value


def test_model_options_in_dotted_form(capsys):
    c = parsed("--config.model.kwargs.depth=2", "--config.model.kwargs.gelu_approximate=True")
    assert dict(c.model.kwargs) == {"depth": 2, "gelu_approximate": True}
    modes.check_config(c, 1)
    with pytest.raises(SystemExit) as e:
        parsed("--config.model.kwargs.deepth=2")
    assert e.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: unknown model option(s) model.kwargs.deepth of model")
    assert "allowed: width, depth, num_heads, mlp_dim, patch_size, pool, gelu_approximate" in (
        message
    )
    # The dict form is checked the same way, before any compute.
    c = config_lib.base_config()
    c.model.kwargs.depth = 2
    with pytest.raises(ConfigError, match="model `?'fmnist_cnn'`? does not take; allowed: none"):
        modes.check_config(c, 1)


def test_a_pattern_that_leaves_no_layer_masked_is_refused_before_any_compute():
    c = config_lib.base_config()
    c.mode, c.search.pattern, c.search.indivisible = "search", "block:4096", "dense"
    ctx = types.SimpleNamespace(network=models.network("fmnist_cnn", 10), model_name="fmnist_cnn")
    with pytest.raises(ConfigError) as e:
        modes._check_search_fits(ctx, c)
    message = str(e.value)
    assert message.startswith("config field `search.pattern` is 'block:4096', but no layer")
    assert "allowed: a pattern that fits at least one kernel" in message
    c.search.pattern = "block:4"
    modes._check_search_fits(ctx, c)  # fits conv2 and fc1


def studies_config(**fields):
    c = config_file("studies.py:quick")
    for dotted, value in fields.items():
        group, _, name = dotted.rpartition(".")
        target = c
        for key in group.split("."):
            target = target[key]
        target[name] = value
    return c


def test_study_fields_are_checked_and_named_up_front():
    with pytest.raises(ConfigError) as e:
        studies.read_plan(studies_config(**{"studies.claim1.sparsities": ()}))
    assert "`studies.claim1.sparsities` is (); allowed: a non-empty tuple" in str(e.value)
    c = studies_config(**{"search.pattern": "2:4", "search.sparsity": 0.5})
    with pytest.raises(ConfigError) as e:
        studies.read_plan(c)
    assert str(e.value).startswith("config field `studies.claim1.sparsities` holds 0.9 but")
    assert "allowed: 0.5 with this pattern" in str(e.value)
    # A sparsity at which a layer keeps nothing names the study's field, not `search.sparsity`:
    # conv1's weights are the smallest, and the global magnitude rule at 50% prunes all of them.
    c = studies_config(**{"studies.run": ("claim1",), "studies.claim1.sparsities": (0.5,)})
    plan = studies.read_plan(c)
    one = studies.Studies.__new__(studies.Studies)
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), fmnist_cnn_params())
    params["conv1"]["kernel"] = params["conv1"]["kernel"] * 1e-3
    one.plan, one.base, one.params = plan, recipes.search_recipe(c), params
    one.ctx = types.SimpleNamespace(network=models.network("fmnist_cnn", 10))
    with pytest.raises(ConfigError) as e:
        one.check_budgets()
    assert str(e.value).startswith("config field `studies.claim1.sparsities` holds 0.5: with")
    assert "conv1/kernel (0 of 144 kept)" in str(e.value)
    assert "search.sparsity" not in str(e.value).split(":")[0]


# ---------------------------------------------------------------------------------------------
# The work directory.


def test_an_empty_workdir_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for empty in ("", " "):
        with pytest.raises(WorkdirError, match="--workdir is '.*'; allowed: the path of a folder"):
            with claim(empty):
                pass
    assert os.listdir(tmp_path) == []


def test_report_only_runs_beside_the_study_that_holds_the_lock(tmp_path):
    """The lock is not taken, nothing is pre-trained, no config.json is written over the study's."""
    workdir = tmp_path / "study"
    c = studies_config(**{"studies.report_only": True, "parallel.num_devices": 1})
    c.dataset.num_train = c.dataset.num_eval = 0
    c.dataset.source_dir = str(write_fmnist(tmp_path / "src"))
    c.dataset.data_dir = str(tmp_path / "tfds")
    with claim(workdir):  # the study that runs
        with pytest.raises(FileNotFoundError) as e:
            modes.train_and_evaluate(c, str(workdir))
    assert "`studies.report_only` writes the report of the finished cells, but there are" in (
        str(e.value)
    )
    assert sorted(os.listdir(workdir)) == [LOCK]


def test_more_examples_than_the_dataset_holds_is_a_config_error(tmp_path):
    c = config_lib.base_config()
    c.dataset.source_dir = str(write_fmnist(tmp_path / "src"))
    c.dataset.data_dir = str(tmp_path / "tfds")
    c.dataset.num_train = 65
    with pytest.raises(ConfigError) as e:
        modes._context(c, str(tmp_path / "work"), 1)
    assert str(e.value).startswith("config field `dataset.num_train` is 65, but split 'train'")
    assert "allowed: 0 (all of them) to 64" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Files: weights, masks, results and metrics.


def test_weights_files_of_other_formats_or_needing_pytorch(tmp_path, monkeypatch):
    h5 = tmp_path / "model.h5"
    h5.write_bytes(b"\x89HDF\r\n")
    with pytest.raises(FileContentError) as e:
        formats.load_state_dict(h5)
    assert f"unknown format of {str(h5)!r}" in str(e.value)
    assert "allowed suffixes: .safetensors, .npz, .pth" in str(e.value)
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"PK")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(MissingDependencyError, match="needs PyTorch, which is not installed"):
        formats.load_state_dict(pth)


def test_a_vit_jackpot_with_a_non_binary_mask_is_a_file_error():
    from flax import nnx

    config = vit.ViTConfig(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4, image_size=8)
    abstract = nnx.eval_shape(lambda: vit.ViT(config, num_classes=10, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), nnx.split(abstract, nnx.Param)[1])
    state = vit_weights.to_timm(params, config)
    state["blocks.0.mlp.fc1.b_mask"] = np.full(state["blocks.0.mlp.fc1.weight"].shape, 0.5)
    with pytest.raises(FileContentError, match=r"blocks.0.mlp.fc1.b_mask must hold only 0 and 1"):
        vit_weights.to_nnx(state, config)


MASKED = ("conv1/kernel", "conv2/kernel", "fc1/kernel")


@pytest.fixture
def evaluation(tmp_path):
    """`_masks_to_evaluate`'s inputs for fmnist_cnn: a context, a config and the params."""
    network = models.network("fmnist_cnn", 10)
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), network.abstract_variables())
    ctx = types.SimpleNamespace(
        network=network,
        workdir=str(tmp_path),
        model_name="fmnist_cnn",
        data=types.SimpleNamespace(is_text=False),
    )
    c = config_lib.base_config()
    c.weights.masks = str(tmp_path / "export" / "masks.npz")
    os.makedirs(tmp_path / "export")
    return ctx, c, params["params"]


def write_masks(c, params, names, summary=None, zero=()):
    flat = dict(named_leaves(params))
    np.savez(c.weights.masks, **{n: np.asarray(flat[n]) > (n in zero) for n in names})
    if summary is not None:
        path = os.path.join(os.path.dirname(c.weights.masks), "jackpot.json")
        with open(path, "w") as f:
            json.dump(summary, f)


@pytest.mark.parametrize(
    "names, summary, zero, error, phrases",
    [
        ((), None, (), FileContentError, ["holds no mask", "allowed: the masks.npz"]),
        (
            ("conv1/kernel", "fc1/kernel"),
            None,
            (),
            CheckpointMismatchError,
            ["lacks the masks of layers a search masks", "missing: conv2/kernel"],
        ),
        (
            ("conv1/kernel", "conv2/kernel"),
            {"budget": {"conv1/kernel": 1, "conv2/kernel": 1, "fc1/kernel": 1}},
            (),
            CheckpointMismatchError,
            ["from the budget in", "missing: fc1/kernel"],
        ),
        (
            (*MASKED, "head/kernel"),
            None,
            ("head/kernel",),
            CheckpointMismatchError,
            ["prunes every weight of head/kernel", "search.allow_empty_layers=True"],
        ),
        (
            (*MASKED, "bn1/scale"),
            None,
            (),
            CheckpointMismatchError,
            ["masks leaves that are not kernels: bn1/scale"],
        ),
        (
            MASKED,
            {"weights_fingerprint": "other"},
            (),
            CheckpointMismatchError,
            ["was searched over other weights", "weights.allow_other_weights=True"],
        ),
    ],
)
def test_masks_that_are_not_a_whole_jackpot_of_these_weights(
    evaluation, names, summary, zero, error, phrases
):
    ctx, c, params = evaluation
    write_masks(c, params, names, summary, zero)
    with pytest.raises(error) as e:
        modes._masks_to_evaluate(ctx, c, params, "these")
    assert str(e.value).startswith(f"masks file {c.weights.masks} (`weights.masks`)")
    for phrase in phrases:
        assert phrase in str(e.value)


def test_flags_evaluate_foreign_or_emptied_masks_with_a_warning(evaluation, caplog):
    ctx, c, params = evaluation
    write_masks(
        c, params, (*MASKED, "head/kernel"), {"weights_fingerprint": "old"}, ["head/kernel"]
    )
    c.weights.allow_other_weights = c.search.allow_empty_layers = True
    masks = modes._masks_to_evaluate(ctx, c, params, "new")
    assert not masks["head"]["kernel"].any() and masks["conv1"]["kernel"].all()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("fingerprint old, these weights have new" in w for w in warnings), warnings
    assert any("prunes every weight of head/kernel" in w for w in warnings), warnings


def test_a_cut_results_file_is_a_file_error(tmp_path):
    ctx = types.SimpleNamespace(workdir=str(tmp_path), is_main=True)
    (tmp_path / "results.json").write_text('[{"model": "dense", "accur')
    with pytest.raises(FileContentError) as e:
        context.results(ctx)
    assert f"the results file {tmp_path / 'results.json'} is not valid JSON" in str(e.value)
    assert "restore it, or move it away" in str(e.value)
    assert (tmp_path / "results.json").read_text() == '[{"model": "dense", "accur'


def test_a_cut_metrics_line(tmp_path):
    """A cut last line is dropped before the next record is appended; one in the middle is an
    error naming the file and the line."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    log = MetricsLog(str(tmp_path))
    log.write({"phase": "search", "kind": "note", "step": 3})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 3]
    path.write_text('{"step": 1}\n{"step": 2, "lo{"step": 3}\n')
    with pytest.raises(FileContentError, match=r"metrics.jsonl, line 2: not valid JSON"):
        read_metrics(path)


# ---------------------------------------------------------------------------------------------
# Signals.


class _Batches:
    def __init__(self, signal_at):
        self.served, self.signal_at = 0, signal_at

    def __next__(self):
        self.served += 1
        if self.served == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.served

    def get_state(self):
        return {"served": self.served}

    def set_state(self, state):
        self.served = state["served"]


LOOP = {"total_steps": 10, "steps_per_epoch": 5, "log_every_steps": 1, "step_of": lambda s: s}


def test_sigterm_stops_the_loop_after_the_step_and_a_second_one_at_once(monkeypatch):
    previous = signal.signal(signal.SIGTERM, raise_terminated)  # as the command line does
    try:
        steps = []

        def step(state, batch):
            steps.append(batch)
            return state + 1, {"loss": np.float32(0.5)}

        with pytest.raises(Interrupted) as e:
            train_loop(0, step, _Batches(3), **LOOP)
        assert (e.value.step, e.value.signum) == (3, signal.SIGTERM)
        assert str(e.value).startswith("stopped by SIGTERM after step 3 of 10")
        assert steps == [1, 2, 3]
        assert signal.getsignal(signal.SIGTERM) is raise_terminated  # restored

        def step_twice(state, batch):
            if batch == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return step(state, batch)

        with pytest.raises(Terminated):
            train_loop(0, step_twice, _Batches(2), **LOOP)
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_idx(path, array):
    """An IDX file (the format of the Fashion-MNIST files): magic, dims, then the bytes."""
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_fmnist(root, num_train=64, num_eval=40):
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", num_train), ("t10k", num_eval)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 50, (n, 28, 28)) + (labels[:, None, None] * 20)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root


SIGTERM_AT_BATCH = """
import os, signal, sys
from jackpots_jax.data import pipeline
original, served = pipeline.TrainIterator.__next__, [0]
def next_batch(self):
    served[0] += 1
    if served[0] == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self)
pipeline.TrainIterator.__next__ = next_batch
from jackpots_jax import main
main.run(["jackpots_jax.main", *sys.argv[2:]])
"""


def test_sigterm_on_the_command_line_checkpoints_and_exits_143(tmp_path):
    workdir = tmp_path / "work"
    args = [
        f"--config={os.path.join(CONFIGS, 'default.py:tiny')}",
        f"--workdir={workdir}",
        "--config.mode=pretrain",
        f"--config.dataset.source_dir={write_fmnist(tmp_path / 'src')}",
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        "--config.dataset.num_train=64",
        "--config.dataset.num_eval=40",
        "--config.checkpoint.every_steps=100",
        "--config.eval.every_epochs=0",  # no evaluation to compile: the test is the signal
    ]
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_AT_BATCH, "2", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    folder = workdir / "pretrain" / "checkpoints"
    assert_one_message(
        proc,
        "stopped by SIGTERM after step 2 of ",
        f"; its checkpoint is saved in {folder}",
        "To resume from there, run the same command again:\n",
        code=143,
    )
    assert sorted(os.listdir(folder)) == ["2"]  # step 2 saved though every_steps is 100
    assert not (workdir / "pretrain" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# The environment and the launchers.


def test_unreadable_multi_process_variables_exit_2_before_anything(tmp_path):
    workdir = tmp_path / "work"
    cmd = [sys.executable, "-m", "jackpots_jax.main", f"--workdir={workdir}"]
    cmd += [f"--config={os.path.join(CONFIGS, 'default.py:tiny')}"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=subprocess_env(JAX_NUM_PROCESSES="two")
    )
    assert_one_message(
        proc, "error: the environment of a multi-process run: environment variable "
        "JAX_NUM_PROCESSES='two' must be an integer"
    )  # fmt: skip
    assert not workdir.exists()


def test_tpu_pod_checks_the_config_before_anything_even_in_a_dry_run(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/gcloud.log\n')
    (bin_dir / "gcloud").chmod(0o755)
    env = subprocess_env(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable)
    base = ["bash", "launch/tpu_pod.sh", "--dry-run", "--name", "a", "--zone", "z"]
    base += ["--bucket", "gs://b/run"]
    proc = subprocess.run(
        [*base, "configs/default.py:tiny", "--config.search.sparsityy=0.5"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert_one_message(
        proc,
        "error: unknown config field(s) search.sparsityy",
        "tpu_pod.sh: the config does not pass the check above",
    )
    assert not (tmp_path / "gcloud.log").exists() and "+ gcloud" not in proc.stdout
    outside = tmp_path / "mine.py"
    outside.write_text("")
    proc = subprocess.run([*base, str(outside)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert_one_message(proc, f"tpu_pod.sh: config {outside} is outside the repository")


def test_slurm_script_outside_slurm_says_what_it_needs():
    proc = subprocess.run(
        ["bash", "launch/slurm.sbatch", "configs/default.py", "/tmp/unused"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert_one_message(proc, "launch/slurm.sbatch runs inside a Slurm job", "launch/local.sh")
