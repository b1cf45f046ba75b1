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
