"""End to end: the command line on every config's tiny variant, the default job, and its errors.

Each run that computes is a real subprocess of `python -m jackpots_jax.main` (one device, as a
user runs it); runs that end with a message before any compute run in this process
(`tests/cli.py`). The data are small copies the tests write in the datasets' own formats
(Fashion-MNIST IDX files; tfds array_record copies of CIFAR and ImageNet). The checks are
independent of the code under test: the exported masks hold exactly the budget that
`layer_budgets` gives for the pre-trained weights, re-evaluating the exported jackpot reproduces
the accuracy the search reported, evaluation counts every test example once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from cli import run_main as run_cli
from test_data import Cifar10, Imagenet2012, build_fixture, encode, write_idx

import jackpots_jax as jj
from jackpots_jax.io import weights

# The command line or another program in a process of its own: `-m 'not e2e'` skips them.
pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FAULT_DRIVER = os.path.join(ROOT, "tests", "fault_driver.py")


def run_main(config, workdir, *overrides, devices=1, timeout=600, fault=(), umask=None):
    """The command line in a subprocess; `fault`: `tests/fault_driver.py` FAULT ARG runs it."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    program = [FAULT_DRIVER, *fault] if fault else ["-m", "jackpots_jax.main"]
    cmd = [
        sys.executable,
        *program,
        f"--config={os.path.join(ROOT, 'configs', config)}",
        f"--workdir={workdir}",
        *overrides,
    ]
    preexec = None if umask is None else (lambda: os.umask(umask))
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, preexec_fn=preexec
    )


def run_here(config, workdir, *overrides, cwd=None):
    """`run_main` in this process (`tests/cli.py`), for runs that stop before any compute."""
    args = [f"--config={os.path.join(ROOT, 'configs', config)}", f"--workdir={workdir}"]
    return run_cli([*args, *overrides], cwd=cwd)


def check_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-6000:]}"


def results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return {row["model"]: row for row in json.load(f)}


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def tensorboard_scalars(workdir, phase, tag):
    """`(step, value)` of a tag of a phase's TensorBoard run, as TensorBoard itself reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "tensorboard" / phase))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


# ---------------------------------------------------------------------------------------------
# Small datasets in the real formats.


def learnable_images(n, shape, seed, num_classes):
    """Images whose label can be read off them (a bright row band per class) plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    images = rng.integers(0, 80, (n, *shape), dtype=np.uint8)
    band = shape[0] // num_classes if num_classes <= shape[0] else 1
    for i, label in enumerate(labels):
        row = (label * band) % shape[0]
        images[i, row : row + max(band, 1)] = 250
    return images, labels.astype(np.uint8)


def write_fmnist_source(root):
    """Fashion-MNIST's four IDX files (300 train, 120 test images) of `learnable_images` in `root`.

    The tests get them as the session fixture `fmnist_source` (`tests/conftest.py`).
    """
    names = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 300, 0),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 120, 1),
    }
    for images_name, labels_name, n, seed in names.values():
        images, labels = learnable_images(n, (28, 28), seed, 10)
        write_idx(root / images_name, images, compress=False)
        write_idx(root / labels_name, labels, compress=False)
    return root


class Cifar100(Cifar10, skip_registration=True):
    name = "cifar100"
    VERSION = tfds.core.Version("3.0.2")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": tfds.features.ClassLabel(num_classes=100),
                    "coarse_label": tfds.features.ClassLabel(num_classes=20),
                }
            ),
            supervised_keys=("image", "label"),
        )


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tfds data directory with tiny cifar10, cifar100 and imagenet2012 copies."""
    root = tmp_path_factory.mktemp("tfds")
    for cls, classes in ((Cifar10, 10), (Cifar100, 100)):
        examples = {}
        for split, n, seed in (("train", 40, 2), ("test", 20, 3)):
            images, labels = learnable_images(n, (32, 32, 3), seed, classes)
            examples[split] = [
                {"id": f"{split}_{i}", "image": encode(x, "PNG"), "label": int(y)}
                | ({"coarse_label": int(y) // 5} if classes == 100 else {})
                for i, (x, y) in enumerate(zip(images, labels, strict=True))
            ]
        build_fixture(cls, root, examples)
    rng = np.random.default_rng(5)
    examples = {
        split: [
            {
                "image": encode(rng.integers(0, 256, (64 + 8 * i, 72, 3), dtype=np.uint8), "JPEG"),
                "label": int(rng.integers(0, 1000)),
                "file_name": f"{split}_{i}.JPEG",
            }
            for i in range(n)
        ]
        for split, n in (("train", 6), ("validation", 5))
    }
    build_fixture(Imagenet2012, root, examples)
    return root


# ---------------------------------------------------------------------------------------------
# The default job, cut down.


@pytest.fixture(scope="module")
def default_job(tmp_path_factory, fmnist_source):
    """The whole tiny default job (pre-training, the baselines, the search), under umask 027, on
    a fresh tfds folder: `(work directory, tfds folder, the finished process)`."""
    root = tmp_path_factory.mktemp("default_job")
    workdir, data_dir = root / "work", root / "tfds"
    proc = run_main(
        "default.py:tiny",
        workdir,
        f"--config.dataset.data_dir={data_dir}",
        f"--config.dataset.source_dir={fmnist_source}",
        umask=0o027,
    )
    check_ok(proc)
    return workdir, data_dir, proc


@pytest.fixture(scope="module")
def job_2of4_pretrained(tmp_path_factory, default_job):
    """The tiny 2:4 job (`default.py:2of4_tiny`) on the default job's pre-trained weights."""
    workdir, data_dir, _ = default_job
    out = tmp_path_factory.mktemp("job_2of4") / "work"
    weights_path = workdir / "pretrain" / "model.safetensors"
    check_ok(
        run_main(
            "default.py:2of4_tiny",
            out,
            f"--config.dataset.data_dir={data_dir}",
            f"--config.weights.path={weights_path}",
        )
    )
    return out


# The paper's core claim at the tiny scale, on seed 0: the search beats one-shot magnitude pruning
# (the same budget, no BN re-estimation) on the 100 evaluation images. Measured through the command
# line (`default.py:tiny` and `default.py:2of4_tiny`, each with its own pre-training,
# `--config.seed=S`), evaluation loss of magnitude pruning -> jackpot:
#   default  seed 0: 1.353 -> 0.380 (gap 0.973); seed 1: 1.030 -> 0.264 (0.765);
#            seed 2: 1.347 -> 0.325 (1.022)
#   2:4      seed 0: 0.796 -> 0.229 (gap 0.566); seed 1: 0.555 -> 0.173 (0.382);
#            seed 2: 0.742 -> 0.187 (0.555)
# and accuracy 0.92 -> 1.00 (default, seed 0), 1.00 -> 1.00 in every other run: the band task
# saturates accuracy, so the clear margin is asked of the loss (under half the smallest gap) and
# accuracy may only not fall.
CLAIM_MARGINS = {
    # job: (accuracy, evaluation loss)
    "default": (0.0, 0.35),
    "2:4": (0.0, 0.15),
}


@pytest.mark.slow
@pytest.mark.parametrize("job", ["default", "2:4"])
def test_search_beats_magnitude_pruning(request, job):
    """The jackpot beats magnitude pruning without BN re-estimation by a clear margin, and the
    search lowers the loss it starts from (the magnitude masks with re-estimated BN statistics)
    epoch by epoch.

    Measured values: see `CLAIM_MARGINS`. The per-step training losses of the search are not
    compared: in train mode batch norm fits each batch, so at this size they start near their
    floor (0.06-0.12 from the first step to the last in every run measured).
    """
    workdir = request.getfixturevalue("default_job")[0] if job == "default" else None
    workdir = workdir or request.getfixturevalue("job_2of4_pretrained")
    rows = results(workdir)
    jackpot, magnitude = rows["jackpot (search)"], rows["magnitude pruning"]
    start = rows["magnitude pruning + BN re-estimation"]
    accuracy_margin, loss_margin = CLAIM_MARGINS[job]
    assert jackpot["accuracy"] - magnitude["accuracy"] >= accuracy_margin, (jackpot, magnitude)
    assert magnitude["loss"] - jackpot["loss"] >= loss_margin, (jackpot, magnitude)
    # The search's evaluated loss falls from where it started, epoch over epoch.
    evals = [r["loss"] for r in metrics(workdir) if r["phase"] == "search" and r["kind"] == "eval"]
    assert len(evals) == 2 and evals[-1] == pytest.approx(jackpot["loss"], rel=1e-6)
    assert start["loss"] > evals[0] > evals[1], (start["loss"], evals)


@pytest.mark.slow
def test_default_job_tiny(tmp_path, default_job):
    workdir, data_dir, proc = default_job
    rows = results(workdir)
    assert set(rows) == {
        "dense",
        "magnitude pruning",
        "magnitude pruning + BN re-estimation",
        "jackpot (search)",
    }
    for row in rows.values():
        assert row["count"] == 100  # every evaluation example exactly once (num_eval = 100)
        assert 0.0 <= row["accuracy"] <= 1.0 and np.isfinite(row["loss"])
    # The band task is easy: two tiny epochs of dense training get well above chance (10%).
    assert rows["dense"]["accuracy"] > 0.3
    # The printed table is the one in the report.
    assert "jackpot (search)" in proc.stdout and "report.md" in proc.stdout

    # Files written.
    for name in ("report.md", "metrics.jsonl", "results.json", "config.json"):
        assert (workdir / name).is_file(), name
    plots = sorted(p.name for p in (workdir / "plots").iterdir())
    assert plots and all(p.endswith(".png") for p in plots)
    report = (workdir / "report.md").read_text()
    for section in ("magnitude pruning + BN re-estimation", "conv1/kernel", "fc1/kernel"):
        assert section in report
    export = workdir / "export"
    assert {"masks.npz", "batch_stats.npz", "jackpot.safetensors", "jackpot.json"} <= {
        p.name for p in export.iterdir()
    }
    # Every file and folder the run made has the mode its umask (027) gives, as `open` and
    # `mkdir` would make them: rw-r----- and rwxr-x---, not a temporary file's rw-------.
    made = {p.relative_to(workdir).as_posix(): p for p in workdir.rglob("*")}
    wrong = {
        name: oct(p.stat().st_mode & 0o777)
        for name, p in made.items()
        if p.stat().st_mode & 0o777 != (0o750 if p.is_dir() else 0o640)
    }
    assert not wrong, wrong
    for name in ("report.md", "plots/curves.png", "plots/sparsity.png", "export/masks.npz"):
        assert name in made, name
    for name in ("batch_stats.npz", "jackpot.safetensors", "jackpot.json"):
        assert f"export/{name}" in made, name
    assert "pretrain/model.safetensors" in made and "results.json" in made

    # The exported masks hold exactly the budget of the pre-trained weights at 90% sparsity.
    variables, _, _ = weights.import_checkpoint(
        workdir / "pretrain" / "model.safetensors", "fmnist_cnn"
    )
    budget = jj.layer_budgets(variables["params"], 0.9, "global_magnitude")
    with np.load(export / "masks.npz") as f:
        masks = dict(f)
    expected = {name: b for name, b in jj._tree.named_leaves(budget) if b is not None}
    assert set(masks) == set(expected)
    for name, pruned in expected.items():
        assert masks[name].size - int(masks[name].sum()) == pruned, name
    assert "head/kernel" not in masks  # the classifier stays dense

    # Metrics: the search logged every epoch's churn and evaluation; steps are increasing.
    records = metrics(workdir)
    search = [r for r in records if r["phase"] == "search"]
    assert [r["epoch"] for r in search if r["kind"] == "churn"] == [1, 2]
    assert [r["epoch"] for r in search if r["kind"] == "eval"] == [1, 2]
    steps = [r["step"] for r in search if r["kind"] == "train"]
    assert steps == sorted(steps) and steps[-1] == 2 * (256 // 32)
    # The same numbers in TensorBoard (one run per phase), read back by TensorBoard's own reader.
    assert sorted(p.name for p in (workdir / "tensorboard").iterdir()) == ["pretrain", "search"]
    train = [r for r in search if r["kind"] == "train"]
    logged = tensorboard_scalars(workdir, "search", "train/loss")
    assert logged == [(r["step"], pytest.approx(r["loss"])) for r in train]
    evaluated = [r for r in search if r["kind"] == "eval"]
    logged = tensorboard_scalars(workdir, "search", "eval/accuracy")
    assert logged == [(r["step"], pytest.approx(r["accuracy"])) for r in evaluated]

    # Evaluating the exported jackpot (masked weights, masks and the re-estimated BN statistics,
    # as a PyTorch-style file) reproduces the accuracy the search reported.
    proc = run_main(
        "default.py:tiny",
        workdir,
        f"--config.dataset.data_dir={data_dir}",
        "--config.mode=evaluate",
        f"--config.weights.path={export / 'jackpot.safetensors'}",
    )
    check_ok(proc)
    again = results(workdir)["evaluated"]
    assert again["accuracy"] == rows["jackpot (search)"]["accuracy"]
    assert again["sparsity"] == pytest.approx(rows["jackpot (search)"]["sparsity"])

    # So do the pre-trained weights with `masks.npz`: the search changed no weight, but it
    # re-estimated the BN statistics, which `batch_stats.npz` next to the masks carries.
    def evaluate_masks(masks, run=run_main):
        return run(
            "default.py:tiny",
            tmp_path / "eval",
            f"--config.dataset.data_dir={data_dir}",
            "--config.mode=evaluate",
            f"--config.weights.path={workdir / 'pretrain' / 'model.safetensors'}",
            f"--config.weights.masks={masks}",
        )

    # In this process (`tests/cli.py`): evaluated on its 8 devices, against the search's one.
    proc = evaluate_masks(export / "masks.npz", run=run_here)
    check_ok(proc)
    again = results(tmp_path / "eval")["evaluated"]
    assert again["accuracy"] == rows["jackpot (search)"]["accuracy"]
    assert again["loss"] == pytest.approx(rows["jackpot (search)"]["loss"], rel=1e-6)
    assert str(export / "batch_stats.npz") in again["note"]
    # Masks without their statistics are evaluated with the weights file's own, and it says so.
    alone = tmp_path / "alone" / "masks.npz"
    alone.parent.mkdir()
    alone.write_bytes((export / "masks.npz").read_bytes())
    proc = evaluate_masks(alone)
    check_ok(proc)
    assert "with the batch-norm statistics of the weights file" in proc.stderr
    assert "no batch_stats.npz next to the masks" in proc.stderr
    assert "weights file" in results(tmp_path / "eval")["evaluated"]["note"]


@pytest.mark.slow
def test_default_job_tiny_in_bfloat16(tmp_path, fmnist_source):
    """The whole tiny default job with convs and matmuls in bfloat16: exact budgets, results."""
    workdir = tmp_path / "work"
    proc = run_main(
        "default.py:tiny",
        workdir,
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        f"--config.dataset.source_dir={fmnist_source}",
        "--config.model.dtype=bfloat16",
    )
    check_ok(proc)
    rows = results(workdir)
    assert rows["dense"]["accuracy"] > 0.3 and rows["jackpot (search)"]["count"] == 100
    assert rows["jackpot (search)"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    with open(workdir / "config.json") as f:
        assert json.load(f)["model"]["dtype"] == "bfloat16"
    variables, _, _ = weights.import_checkpoint(
        workdir / "pretrain" / "model.safetensors", "fmnist_cnn"
    )
    assert {np.asarray(x).dtype for x in jax.tree.leaves(variables)} == {np.dtype(np.float32)}
    budget = jj.layer_budgets(variables["params"], 0.9, "global_magnitude")
    with np.load(workdir / "export" / "masks.npz") as f:
        for name, pruned in jj._tree.named_leaves(budget):
            if pruned is not None:
                assert f[name].size - int(f[name].sum()) == pruned, name


# ---------------------------------------------------------------------------------------------
# Every config's tiny variant: pretrain -> search -> evaluate -> export.


def _config_file(name, arg):
    """`get_config(arg)` of `configs/<name>`, loaded as the command line loads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _flat(config, prefix=""):
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("model", ["resnet32", "vgg19"])
@pytest.mark.parametrize("arg", [None, "pretrain", "tiny", "tiny_pretrain"])
def test_cifar100_configs_differ_from_cifar10_only_in_the_dataset(model, arg):
    """What lets `test_tiny_config_end_to_end` run one CIFAR-100 config, not both: each CIFAR-100
    config is its CIFAR-10 twin but for `dataset.name` (the classifier's width follows it)."""
    c10 = _flat(_config_file(f"cifar10_{model}.py", arg))
    c100 = _flat(_config_file(f"cifar100_{model}.py", arg))
    assert set(c10) == set(c100)
    assert {k: (c10[k], c100[k]) for k in c10 if c10[k] != c100[k]} == {
        "dataset.name": ("cifar10", "cifar100")
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, full",
    [
        ("cifar10_resnet32.py", True),
        ("cifar100_vgg19.py", False),
        ("imagenet_resnet50.py", False),
    ],
)
def test_tiny_config_end_to_end(tmp_path, tfds_dir, config, full):
    # `full`: also evaluate and export again (modes that do not depend on the model: once). The
    # VGG-19 runs once, on CIFAR-100: the CIFAR-10 and CIFAR-100 configs differ only in the
    # dataset (`test_cifar100_configs_differ_...`), and CIFAR-10 runs with the ResNet-32.
    workdir = tmp_path / "work"
    common = [f"--config.dataset.data_dir={tfds_dir}"]
    check_ok(run_main(f"{config}:tiny_pretrain", workdir, *common))
    assert (workdir / "pretrain" / "model.safetensors").is_file()
    check_ok(run_main(f"{config}:tiny", workdir, *common))
    rows = results(workdir)
    assert rows["jackpot (search)"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert rows["jackpot (search)"]["count"] == (8 if config.startswith("cifar") else 4)
    if not full:
        return
    # The two modes that only read files run in this process (`tests/cli.py`): on its 8 devices,
    # the evaluation data-parallel, against the search's on one.
    check_ok(
        run_here(
            f"{config}:tiny",
            workdir,
            *common,
            "--config.mode=evaluate",
            f"--config.weights.path={workdir / 'export' / 'jackpot.safetensors'}",
        )
    )
    assert results(workdir)["evaluated"]["accuracy"] == rows["jackpot (search)"]["accuracy"]
    assert results(workdir)["evaluated"]["count"] == rows["jackpot (search)"]["count"]
    # Export from the search checkpoint again (the `export` mode) into the same files.
    masks = dict(np.load(workdir / "export" / "masks.npz"))
    os.remove(workdir / "export" / "masks.npz")
    check_ok(run_here(f"{config}:tiny", workdir, *common, "--config.mode=export"))
    again = dict(np.load(workdir / "export" / "masks.npz"))
    assert again.keys() == masks.keys()
    assert all(np.array_equal(again[k], masks[k]) for k in masks)


# ---------------------------------------------------------------------------------------------
# Errors: a clear message and a non-zero exit before any compute.


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.search.sparsityy=0.9"], "unknown config field(s) search.sparsityy"),
        (["--config.search.sparsity=1.0"], "`search.sparsity` is 1.0"),
        (["--config.search.batch_size=12"], "`search.batch_size` is 12"),
        (["--config.search.rule=magnitude"], "`search.rule` is 'magnitude'"),
        # Calibrated one-shot baselines and priors are a language model's.
        (["--config.prune.baselines=('wanda',)"], "`prune.baselines` is ('wanda',)"),
        (["--config.search.init=sparsegpt"], "a language model also takes 'wanda'"),
        (["--config.search.inits=('magnitude',)"], "`search.inits` is ('magnitude',)"),
        (["--config.search.loss=kl"], "a language model also takes 'kl'"),
        (["--config.search.optimizer=adamw"], "`search.optimizer` is 'adamw'"),
        (["--config.eval.also_on=('fortunes',)"], "() unless the job is a language model's"),
        (["--config.eval.by_block=True"], "unless the job is a language model's `jackpot`"),
    ],
)
def test_bad_config_values(tmp_path, fmnist_source, overrides, message):
    proc = run_here(  # on this process's 8 devices: a batch of 12 does not divide
        "default.py:tiny",
        tmp_path / "work",
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        f"--config.dataset.source_dir={fmnist_source}",
        *overrides,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_weights_is_an_error(tmp_path, fmnist_source):
    proc = run_here(
        "default.py:tiny",
        tmp_path / "work",
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        f"--config.dataset.source_dir={fmnist_source}",
        "--config.mode=search",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no pre-trained weights" in proc.stderr and "weights.random" in proc.stderr
    assert not (tmp_path / "work" / "search").exists()  # nothing started


def test_missing_dataset_is_an_error(tmp_path):
    proc = run_here(
        "cifar10_vgg19.py:tiny", tmp_path / "work", f"--config.dataset.data_dir={tmp_path}"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cifar10" in proc.stderr and "tfds build" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_non_finite_loss_stops_the_run(tmp_path, fmnist_source):
    workdir = tmp_path / "work"
    proc = run_here(
        "default.py:tiny",
        workdir,
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        f"--config.dataset.source_dir={fmnist_source}",
        "--config.mode=pretrain",
        "--config.pretrain.learning_rate=1e30",
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "the loss became nan" in proc.stderr or "the loss became inf" in proc.stderr
    # It diverged at once: no checkpoint is claimed to be intact, since none was written yet.
    assert "no checkpoint was written yet" in proc.stderr and "intact" not in proc.stderr
    assert not (workdir / "pretrain" / "model.safetensors").exists()


@pytest.mark.slow
def test_adamw_pretraining_through_the_command_line(tmp_path, pretrained_tiny):
    """`pretrain.optimizer=adamw` with warm-up and clipping (the ViTs' recipe) on the tiny CNN:
    the logged learning rate is the documented schedule, worked out here (linear from 0 over
    the warm-up epoch's 8 steps, then a cosine to 0 over the other 8), and the loss falls."""
    _, common = pretrained_tiny
    workdir = tmp_path / "work"
    lr = 2e-3
    adamw = [
        "--config.mode=pretrain",
        "--config.pretrain.optimizer=adamw",
        f"--config.pretrain.learning_rate={lr}",
        "--config.pretrain.weight_decay=0.05",
        "--config.pretrain.warmup_epochs=1",
        "--config.pretrain.clip_norm=1.0",
        "--config.log_every_steps=1",
    ]
    check_ok(run_main("default.py:tiny", workdir, *common, *adamw))
    assert (workdir / "pretrain" / "model.safetensors").is_file()
    train = [r for r in metrics(workdir) if r["phase"] == "pretrain" and r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 17))  # 2 epochs of 256 / 32
    for r in train:
        t = r["step"] - 1  # the rate of the update that made step `t + 1`
        want = lr * t / 8 if t < 8 else lr * 0.5 * (1 + np.cos(np.pi * (t - 8) / 8))
        assert r["learning_rate"] == pytest.approx(want, rel=1e-5, abs=1e-12), r
    first, last = np.mean([r["loss"] for r in train[:4]]), np.mean([r["loss"] for r in train[-4:]])
    assert last < 0.5 * first, (first, last)


@pytest.mark.slow
def test_imagenet_vit_tiny_searches_end_to_end(tmp_path, tfds_dir):
    """`configs/imagenet_vit.py:tiny`: a 1-block ViT of random weights searched on the tiny
    ImageNet copy; every evaluation image counted once, the 50% budget kept."""
    workdir = tmp_path / "work"
    check_ok(run_main("imagenet_vit.py:tiny", workdir, f"--config.dataset.data_dir={tfds_dir}"))
    rows = results(workdir)
    assert rows["jackpot (search)"]["count"] == 4
    assert rows["jackpot (search)"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    with np.load(workdir / "export" / "masks.npz") as f:
        kept = sum(int(f[k].sum()) for k in f.files)
        total = sum(f[k].size for k in f.files)
    assert 0.45 <= 1 - kept / total <= 0.55


KILL_DRIVER = os.path.join(ROOT, "tests", "kill_driver.py")


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [2, 7])  # of 16 steps; checkpoints at 3, 6, 9, ...
def test_search_killed_and_restarted_ends_bit_identical(tmp_path, straight_search, kill_after):
    """SIGKILL the search after step 2 (before the first checkpoint) or 7 (one past it).

    The restarted run ends with the same jackpot bit for bit, and its metrics (JSON lines and
    TensorBoard) hold every step once: records past the point it resumed from, including
    "nothing", are dropped.
    """
    from safetensors.numpy import load_file

    straight, search = straight_search
    killed = tmp_path / "killed"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [
        sys.executable,
        KILL_DRIVER,
        str(kill_after),
        f"--config={os.path.join(ROOT, 'configs', 'default.py:tiny')}",
        f"--workdir={killed}",
        *search,
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    logged = [r["step"] for r in metrics(killed) if r["kind"] == "train"]
    assert logged == list(range(1, kill_after + 1))
    saved = sorted(int(p.name) for p in (killed / "search" / "checkpoints").glob("[0-9]*"))
    assert saved == [s for s in (3, 6) if s <= kill_after]
    assert not (killed / "export").exists()
    check_ok(run_main("default.py:tiny", killed, *search))

    a = load_file(straight / "export" / "jackpot.safetensors")
    b = load_file(killed / "export" / "jackpot.safetensors")
    assert set(a) == set(b) and any(k.endswith(".mask") for k in a)  # scores exported too
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with (
        np.load(straight / "export" / "masks.npz") as fa,
        np.load(killed / "export" / "masks.npz") as fb,
    ):
        for key in fa.files:
            np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)
    # The metrics of the resumed run hold each search step once.
    train = [r for r in metrics(killed) if r["phase"] == "search" and r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 17))
    # So does TensorBoard's view, from the killed run's event file and the resumed run's.
    logged = tensorboard_scalars(killed, "search", "train/loss")
    assert logged == [(r["step"], pytest.approx(r["loss"])) for r in train]


@pytest.mark.slow
def test_nnx_model_searched_through_the_command_line(tmp_path, straight_search):
    """`fmnist_cnn_nnx` (an NNX module) from the Linen CNN's weights: the same jackpot.

    The two models compute the same function of the same variables, so the search through the
    command line, over the steps' apply function, must find what the Linen search found.
    """
    straight, search = straight_search
    workdir = tmp_path / "nnx"
    check_ok(run_main("default.py:tiny", workdir, *search, "--config.model.name=fmnist_cnn_nnx"))
    linen, nnx_run = results(straight)["jackpot (search)"], results(workdir)["jackpot (search)"]
    assert nnx_run["count"] == linen["count"] == 100
    assert nnx_run["accuracy"] == linen["accuracy"]
    with (
        np.load(straight / "export" / "masks.npz") as a,
        np.load(workdir / "export" / "masks.npz") as b,
    ):
        assert sorted(a.files) == sorted(b.files) == ["conv1/kernel", "conv2/kernel", "fc1/kernel"]
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_resuming_with_other_weights_is_refused(tmp_path, straight_search):
    """A search checkpoint records the fingerprint of its weights: other weights are an error.

    With the `uniform` rule the budget does not depend on the weights' values, so only the
    fingerprint tells the runs apart (it used to resume with the checkpoint's own weights).
    """
    from safetensors.numpy import load_file, save_file

    _, search = straight_search
    workdir = tmp_path / "work"
    uniform = ["--config.search.rule=uniform", "--config.search.max_steps=1"]
    check_ok(run_main("default.py:tiny", workdir, *search, *uniform))
    pretrained = next(a.split("=", 1)[1] for a in search if a.startswith("--config.weights.path"))
    tensors = load_file(pretrained)
    tensors["conv1.weight"] = tensors["conv1.weight"] * 1.5
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other))
    proc = run_here(
        "default.py:tiny",
        workdir,
        *search,
        *uniform,
        f"--config.weights.path={other}",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the pre-trained weights differ from those the checkpoint was made from" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
def test_data_parallel_job_matches_one_device(tmp_path, fmnist_source, backend):
    """Magnitude pruning of random weights evaluated on 4 devices equals the 1-device run.

    Only the evaluation is compared: a whole tiny search (`straight_search`'s flags) on 4 devices
    ends with masks that differ from the 1-device run's in 4 of conv1's 144 entries (two swaps
    after 16 steps, with shard_map and with pmap alike), since the batch's sums are reordered.
    """
    common = [
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        f"--config.dataset.source_dir={fmnist_source}",
        "--config.mode=prune",
        "--config.weights.random=True",
        "--config.prune.reestimate_bn=False",
    ]
    check_ok(run_main("default.py:tiny", tmp_path / "one", *common, devices=1))
    check_ok(
        run_main(
            "default.py:tiny",
            tmp_path / "four",
            *common,
            f"--config.parallel.backend={backend}",
            devices=4,
        )
    )
    one = results(tmp_path / "one")["magnitude pruning"]
    four = results(tmp_path / "four")["magnitude pruning"]
    assert one["count"] == four["count"] == 100
    assert one["accuracy"] == four["accuracy"] and one["top5_accuracy"] == four["top5_accuracy"]
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Hardening (issue 17): what a user meets with bad input and faults. Each case ends with exit
# code 2 (130 for Ctrl-C), one message that names the field or the path and what to do, no
# traceback, and nothing half-written: the next run works.


def assert_clear_error(proc, *phrases, code=2):
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}\n{output[-4000:]}"
    for phrase in phrases:
        assert phrase in proc.stderr, f"{phrase!r} not in:\n{proc.stderr[-4000:]}"
    assert "Traceback" not in output and "Exception ignored" not in output, output[-6000:]


def pretrained_weights(search):
    return next(a.split("=", 1)[1] for a in search if a.startswith("--config.weights.path="))


def assert_same_jackpot(a, b):
    from safetensors.numpy import load_file

    ta, tb = (
        load_file(a / "export" / "jackpot.safetensors"),
        load_file(b / "export" / "jackpot.safetensors"),
    )
    assert set(ta) == set(tb)
    for key in ta:
        np.testing.assert_array_equal(ta[key], tb[key], err_msg=key)
    for name in ("masks.npz", "batch_stats.npz"):
        with np.load(a / "export" / name) as fa, np.load(b / "export" / name) as fb:
            assert sorted(fa.files) == sorted(fb.files)
            for key in fa.files:
                np.testing.assert_array_equal(fa[key], fb[key], err_msg=f"{name}: {key}")


def search_steps_logged(workdir):
    return [r["step"] for r in metrics(workdir) if r["phase"] == "search" and r["kind"] == "train"]


def checkpoint_folder(workdir):
    return sorted(p.name for p in (workdir / "search" / "checkpoints").iterdir())


@pytest.mark.parametrize("kind", ["empty", "truncated", "not readable", "nan"])
def test_unusable_weights_file(tmp_path, straight_search, kind):
    """An empty, truncated, unreadable or non-finite weights file: the path and the cause."""
    from safetensors.numpy import load_file, save_file

    _, search = straight_search
    good = pretrained_weights(search)
    bad = tmp_path / "weights.safetensors"
    fault = ()
    if kind == "empty":
        bad.write_bytes(b"")
        said = ["is not a readable safetensors file (it is empty"]
    elif kind == "truncated":
        bad.write_bytes(open(good, "rb").read()[:1000])
        said = ["is not a readable safetensors file (1000 bytes: truncated, or another format"]
    elif kind == "not readable":  # what the kernel tells a user without read permission
        bad.write_bytes(open(good, "rb").read())
        fault = ("eacces", str(bad))
        said = ["may not be read (Permission denied)"]
    else:
        tensors = load_file(good)
        tensors["conv2.weight"][1, 0, 2, 2] = np.nan
        save_file(tensors, str(bad))
        said = ["are not all finite: params/conv2/kernel (1 NaN, 0 infinite of 4608)"]
    workdir = tmp_path / "work"
    if fault:  # the driver makes the kernel refuse the read: a process of its own
        proc = run_main(
            "default.py:tiny", workdir, *search, f"--config.weights.path={bad}", fault=fault
        )
    else:
        proc = run_here("default.py:tiny", workdir, *search, f"--config.weights.path={bad}")
    assert_clear_error(proc, str(bad), "weights.path", *said)
    assert not (workdir / "search").exists()  # nothing started


@pytest.mark.parametrize("where", ["work directory", "export"])
def test_unwritable_folder_is_found_before_any_compute(tmp_path, straight_search, where):
    """A work directory the user may not write, or an `export/` that cannot be written into."""
    _, search = straight_search
    workdir = tmp_path / "work"
    workdir.mkdir()
    fault = ()
    if where == "export":
        (workdir / "export").write_text("a file where the export folder goes")
        said = [f"the folder `export` of the work directory ({workdir / 'export'}) is not a folder"]
    else:  # what the kernel tells a user without write permission
        fault = ("eacces", str(workdir))
        said = [f"the work directory ({workdir}) is not writable (Permission denied)"]
    if fault:
        proc = run_main("default.py:tiny", workdir, *search, fault=fault)
    else:
        proc = run_here("default.py:tiny", workdir, *search)
    assert_clear_error(proc, *said, "--workdir")
    # Nothing but the lock file (which stays, unlocked) was made.
    made = sorted(p.name for p in workdir.iterdir())
    assert made == ([".lock", "export"] if where == "export" else [])


def test_config_file_given_from_another_directory(tmp_path):
    workdir = f"--workdir={tmp_path / 'work'}"
    proc = run_cli([workdir, "--config=configs/default.py:tiny"], cwd=tmp_path)
    assert_clear_error(
        proc,
        "config file 'configs/default.py' not found",
        f"the current directory, {tmp_path}",
        f"did you mean {os.path.join(ROOT, 'configs', 'default.py')}?",
    )
    proc = run_cli(
        [workdir, f"--config={os.path.join(ROOT, 'configs', 'default.py')}:tinyy"], cwd=tmp_path
    )
    assert_clear_error(proc, "default.py:tinyy: ValueError: unknown variant 'tinyy'")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("damage", ["shape", "key", "not 0/1"])
def test_masks_file_that_does_not_fit(tmp_path, straight_search, damage):
    straight, search = straight_search
    with np.load(straight / "export" / "masks.npz") as f:
        masks = dict(f)
    if damage == "shape":
        masks["conv1/kernel"] = masks["conv1/kernel"][:2]
        said = ["conv1/kernel: [2, 3, 1, 16] vs [3, 3, 1, 16]"]
    elif damage == "key":
        masks["conv9/kernel"] = masks.pop("conv1/kernel")
        said = ["1 unexpected", "unexpected: conv9/kernel"]
    else:
        masks["conv1/kernel"] = masks["conv1/kernel"] * np.float32(0.5)
        said = ["holds values other than 0 and 1 at conv1/kernel (e.g. 0.5)"]
    path = tmp_path / "masks.npz"
    np.savez(path, **masks)
    workdir = tmp_path / "work"
    proc = run_here(
        "default.py:tiny", workdir, *search, "--config.mode=evaluate",
        f"--config.weights.masks={path}",
    )  # fmt: skip
    assert_clear_error(proc, f"masks file {path}", *said)
    assert not (workdir / "results.json").exists()


def test_export_without_a_checkpoint(tmp_path, straight_search):
    _, search = straight_search
    workdir = tmp_path / "work"
    proc = run_here("default.py:tiny", workdir, *search, "--config.mode=export")
    assert_clear_error(proc, f"no search checkpoint in {workdir / 'search' / 'checkpoints'}")
    # One message, not orbax's noise after it; nothing made while looking.
    assert [line for line in proc.stderr.splitlines() if not line.startswith("I")] == [
        line for line in proc.stderr.splitlines() if line.startswith("error:")
    ]
    assert not (workdir / "search").exists() and not (workdir / "export").exists()


def test_input_that_cannot_be_meant(tmp_path, straight_search):
    """A `search.dense` pattern that matches nothing, a sparsity that empties whole layers."""
    _, search = straight_search
    proc = run_here("default.py:tiny", tmp_path / "a", *search, "--config.search.dense=('haed',)")
    assert_clear_error(
        proc,
        "config field `search.dense` is ('haed',)",
        "'haed' matches none of the model's kernels",
        "conv1/kernel, conv2/kernel, fc1/kernel, head/kernel",
    )
    assert not (tmp_path / "a" / "search").exists()
    # At 0.99999 the global magnitude budget of these weights empties whole layers: which ones,
    # the budget rule itself says.
    variables, _, _ = weights.import_checkpoint(pretrained_weights(search), "fmnist_cnn")
    budget = jj.layer_budgets(variables["params"], 0.99999, "global_magnitude")
    sizes = dict(jj._tree.named_leaves(variables["params"]))
    empty = [
        f"{name} (0 of {sizes[name].size} kept)"
        for name, pruned in jj._tree.named_leaves(budget)
        if pruned is not None and pruned == sizes[name].size
    ]
    assert empty
    proc = run_here("default.py:tiny", tmp_path / "b", *search, "--config.search.sparsity=0.99999")
    assert_clear_error(
        proc,
        "config field `search.sparsity` is 0.99999",
        f"{len(empty)} masked layer(s) would keep no weight at all: {', '.join(empty)}.",
        "search.allow_empty_layers=True",
    )
    assert not (tmp_path / "b" / "search").exists()
    # Asked for on purpose, it runs.
    allow = ["--config.search.allow_empty_layers=True", "--config.mode=prune"]
    proc = run_main("default.py:tiny", tmp_path / "b", *search, "--config.search.sparsity=0.99999",
                    "--config.prune.reestimate_bn=False", *allow)  # fmt: skip
    check_ok(proc)
    assert results(tmp_path / "b")["magnitude pruning"]["sparsity"] > 0.9999


def test_every_checkpoint_corrupt(tmp_path, straight_search):
    straight, search = straight_search
    workdir = tmp_path / "work"
    shutil.copytree(straight / "search", workdir / "search")
    steps = checkpoint_folder(workdir)
    for step in steps:
        (workdir / "search" / "checkpoints" / step / "meta" / "metadata").write_text("garbage")
    proc = run_here("default.py:tiny", workdir, *search)
    folder = workdir / "search" / "checkpoints"
    assert_clear_error(
        proc, f"no readable checkpoint in {folder}", "delete the directory to start afresh"
    )
    assert all(f"step {s}: metadata unreadable" in proc.stderr for s in steps)
    assert checkpoint_folder(workdir) == steps  # kept for inspection


def test_missing_fashion_mnist_names_the_field(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_here(
        "default.py:tiny",
        tmp_path / "work",
        f"--config.dataset.data_dir={tmp_path / 'tfds'}",
        f"--config.dataset.source_dir={tmp_path / 'empty'}",
    )
    assert_clear_error(proc, "--config.dataset.source_dir=", "apt-get install -y dataset-fashion")


def test_resuming_under_another_schedule_is_refused_unless_allowed(tmp_path, straight_search):
    straight, search = straight_search
    workdir = tmp_path / "work"
    shutil.copytree(straight, workdir)
    changed = ["--config.search.epochs=3", "--config.search.learning_rate=0.05"]
    proc = run_here("default.py:tiny", workdir, *search, *changed)
    assert_clear_error(
        proc,
        "the checkpoint this run resumes from was made with another schedule",
        "`search.epochs` was 2, now 3",
        "`search.learning_rate` was 0.1, now 0.05",
        "--config.checkpoint.allow_schedule_change=True",
    )
    assert search_steps_logged(workdir) == list(range(1, 17))  # nothing more was logged
    proc = run_main(
        "default.py:tiny",
        workdir,
        *search,
        *changed,
        "--config.checkpoint.allow_schedule_change=True",
    )
    check_ok(proc)
    assert "resuming under a changed schedule" in proc.stderr
    assert search_steps_logged(workdir) == list(range(1, 25))  # from 16 on, to 3 epochs


@pytest.mark.slow
def test_disk_full_during_a_checkpoint(tmp_path, straight_search):
    """The checkpoint of step 6 fails with ENOSPC half-way: nothing of it stays, and the next
    run resumes from step 3 and ends with the jackpot of a run that never failed."""
    straight, search = straight_search
    workdir = tmp_path / "work"
    proc = run_main("default.py:tiny", workdir, *search, fault=("enospc", "6"))
    folder = workdir / "search" / "checkpoints"
    assert_clear_error(
        proc,
        "error: the disk is full",
        f"the checkpoint of step 6 could not be written in {folder}",
        "the newest complete checkpoint is step 3",
        f"--workdir={workdir}",  # the command that resumes
    )
    assert checkpoint_folder(workdir) == ["3"]  # no orbax temporary folder
    assert not (workdir / "export").exists()
    proc = run_main("default.py:tiny", workdir, *search)
    check_ok(proc)
    assert f"resumed from step 3 in {folder}" in proc.stderr
    assert_same_jackpot(straight, workdir)
    assert search_steps_logged(workdir) == list(range(1, 17))


@pytest.mark.slow
def test_ctrl_c_stops_after_the_step_and_resumes_bit_identical(tmp_path, straight_search):
    straight, search = straight_search
    workdir = tmp_path / "work"
    proc = run_main("default.py:tiny", workdir, *search, fault=("sigint", "5"))
    folder = workdir / "search" / "checkpoints"
    assert_clear_error(
        proc,
        f"stopped by Ctrl-C after step 5 of 16; its checkpoint is saved in {folder}",
        "run the same command again:\n",
        f"-m jackpots_jax.main --config={os.path.join(ROOT, 'configs', 'default.py:tiny')}",
        code=130,
    )
    assert checkpoint_folder(workdir) == ["3", "5"]
    assert search_steps_logged(workdir) == [1, 2, 3, 4, 5]
    assert not (workdir / "export").exists()
    check_ok(run_main("default.py:tiny", workdir, *search))
    assert_same_jackpot(straight, workdir)
    assert search_steps_logged(workdir) == list(range(1, 17))


def test_second_ctrl_c_stops_at_once(tmp_path, straight_search):
    """Ctrl-C twice while step 5 is under way: no step 5, nothing half-saved, the newest
    checkpoint (step 3) kept and the command that resumes from it printed."""
    _, search = straight_search
    workdir = tmp_path / "work"
    proc = run_main("default.py:tiny", workdir, *search, fault=("sigint2", "5"))
    assert_clear_error(
        proc,
        "stopped by Ctrl-C; the newest checkpoints are kept. To resume, run:\n",
        f"-m jackpots_jax.main --config={os.path.join(ROOT, 'configs', 'default.py:tiny')}",
        code=130,
    )
    assert checkpoint_folder(workdir) == ["3"]  # no orbax temporary folder either
    assert search_steps_logged(workdir) == [1, 2, 3, 4]
    assert not (workdir / "export").exists()


@pytest.mark.slow
def test_two_runs_on_one_work_directory(tmp_path, straight_search):
    """The second run is refused, naming the first; a SIGKILL of the first releases the lock."""
    straight, search = straight_search
    workdir = tmp_path / "work"
    flag = tmp_path / "go"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["JAX_PLATFORMS"] = "cpu"
    config = f"--config={os.path.join(ROOT, 'configs', 'default.py:tiny')}"
    first = subprocess.Popen(
        [sys.executable, FAULT_DRIVER, "pause", str(flag), config, f"--workdir={workdir}", *search],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(f"{flag}.ready"):  # the first run is about to take step 1
            assert first.poll() is None and time.monotonic() < deadline, "first run ended"
            time.sleep(0.1)
        proc = run_here("default.py:tiny", workdir, *search)
        assert_clear_error(
            proc,
            f"the work directory {workdir} is in use by another run (process {first.pid} on host",
            "fault_driver.py pause",  # its command
            "use another --workdir",
        )
        assert not (workdir / "metrics.jsonl").exists()  # the second run wrote nothing
    finally:
        first.kill()  # SIGKILL: no clean-up of its own
        first.wait()
    check_ok(run_main("default.py:tiny", workdir, *search))
    assert search_steps_logged(workdir) == list(range(1, 17))
    assert_same_jackpot(straight, workdir)
