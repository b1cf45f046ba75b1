"""Test setup, before JAX is imported: 8 CPU devices, one compilation cache, CI's skip policy.

* Eight virtual CPU devices for the data-parallel tests, whatever `XLA_FLAGS` held before (its
  other flags are kept): a preset device count would otherwise skip the 8-device tests.
* One persistent compilation cache for the whole run, the subprocesses included (they inherit
  the environment): the tests compile the same small steps again and again, in-process and in
  every `python -m jackpots_jax.main` they start. It lives outside the clone
  (`$JACKPOTS_JAX_TEST_CACHE`, default `~/.cache/jackpots_jax_tests/jax`) so that it is kept
  between runs; an empty or missing folder only means compiling again. Every program is cached,
  however small or quick to compile.
* With `CI=true` a skipped test fails unless its reason names missing hardware (a GPU, a TPU):
  in CI everything else the tests need is installed, so a skip there hides a broken setup.
"""

import os
import re

import pytest

DEVICES = 8
_COUNT = "--xla_force_host_platform_device_count"
_flags = re.sub(rf"{_COUNT}=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
os.environ["XLA_FLAGS"] = " ".join([*_flags, f"{_COUNT}={DEVICES}"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

CACHE_DIR = os.environ.get("JACKPOTS_JAX_TEST_CACHE") or os.path.join(
    os.path.expanduser("~"), ".cache", "jackpots_jax_tests", "jax"
)
os.environ["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
# -1: no size threshold at all (0 lets JAX pick one for the file system).
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HARDWARE = re.compile(r"\b(GPU|TPU|CUDA|ROCm|accelerator)s?\b", re.IGNORECASE)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (IN_CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not HARDWARE.search(reason):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped in CI (CI=true) for a reason that is not missing hardware: {reason}\n"
            "Install what the test needs (`pip install -e '.[test]'` and torch), or name the "
            "hardware it needs in the skip reason."
        )


# ---------------------------------------------------------------------------------------------
# What many tests read, made once per run: the data, one pre-trained tiny model, one finished
# tiny search (`tests/test_main.py` has the helpers; imported here lazily, after the settings).


@pytest.fixture(scope="session")
def fmnist_source(tmp_path_factory):
    """A folder of Fashion-MNIST IDX files (300 train, 120 test) of learnable band images."""
    from test_main import write_fmnist_source

    return write_fmnist_source(tmp_path_factory.mktemp("fmnist_src"))


@pytest.fixture(scope="session")
def pretrained_tiny(tmp_path_factory, fmnist_source):
    """`default.py:tiny` pre-trained once: `(weights file, the dataset flags it was made with)`.

    The flags name a tfds folder that holds the prepared dataset, so runs that pass them do not
    prepare it again.
    """
    from test_main import check_ok, run_main

    root = tmp_path_factory.mktemp("pretrained")
    common = [
        f"--config.dataset.data_dir={root / 'tfds'}",
        f"--config.dataset.source_dir={fmnist_source}",
    ]
    check_ok(run_main("default.py:tiny", root / "pre", *common, "--config.mode=pretrain"))
    return root / "pre" / "pretrain" / "model.safetensors", common


@pytest.fixture(scope="session")
def straight_search(tmp_path_factory, pretrained_tiny):
    """A tiny search from `pretrained_tiny`, never stopped: `(its work directory, its flags)`.

    Checkpoints every 3 of its 16 steps, metrics every step, a cosine restriction rate (rate < 1:
    the restriction's count matters too). Tests that resume, kill or damage a search start from
    these flags and compare with this run; they must not write into its work directory.
    """
    from test_main import check_ok, run_main

    weights_path, common = pretrained_tiny
    search = [
        *common,
        "--config.mode=search",
        f"--config.weights.path={weights_path}",
        "--config.checkpoint.every_steps=3",
        "--config.log_every_steps=1",
        "--config.search.rate.schedule=cosine",
    ]
    workdir = tmp_path_factory.mktemp("straight") / "work"
    check_ok(run_main("default.py:tiny", workdir, *search))
    return workdir, search
