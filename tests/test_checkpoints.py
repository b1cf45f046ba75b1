"""Checkpoints and export: bit-exact round trips, identity and weights checks, damage recovery,
SIGKILL resume through the runner's loop, the exported jackpot."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from resume_driver import batch, build_search

import jackpots_jax as jj
from jackpots_jax import models
from jackpots_jax._tree import named_leaves
from jackpots_jax.io import weights
from jackpots_jax.io.checkpoints import (
    FORMAT_VERSION,
    CheckpointCorruptError,
    Checkpointer,
    fingerprint,
)
from jackpots_jax.io.errors import CheckpointMismatchError, FileContentError
from jackpots_jax.io.export import batch_stats_from_npz, export_jackpot, masks_from_npz
from jackpots_jax.step import create_train_state, search_step

# A restore that fails on damaged files can leave tensorstore callbacks aimed at the closed asyncio
# loop of orbax's reader ("Event loop is closed", printed by a background thread): harmless noise.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resume_driver.py")
IDENTITY = {
    "kind": "search",
    "model": "TinyNet",
    "num_classes": 5,
    "budget": {"conv1/kernel": 50, "conv2/kernel": 201},
}


@pytest.fixture(scope="module")
def states():
    """A fresh search state (typed PRNG key) and the states after 1, 2 and 3 search steps."""
    apply_fn, params, budget, tx, state = build_search(steps=10)
    step = jax.jit(partial(search_step, apply_fn=apply_fn, tx=tx))
    out = [state]
    for i in range(3):
        state, _ = step(state, params, batch(0, i))
        out.append(state)
    return out


@pytest.fixture(scope="module")
def params():
    """The frozen weights the `states` are searched over (numpy)."""
    return build_search(steps=10)[1]


def flat(tree):
    """`[(path, leaf)]` with `None` leaves kept."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return [(jax.tree_util.keystr(p), leaf) for p, leaf in leaves]


def assert_bit_identical(got, want):
    assert jax.tree.structure(got, is_leaf=lambda x: x is None) == jax.tree.structure(
        want, is_leaf=lambda x: x is None
    )
    for (path, a), (_, b) in zip(flat(got), flat(want), strict=True):
        if b is None:
            assert a is None, path
            continue
        assert a.dtype == b.dtype, (path, a.dtype, b.dtype)
        assert a.shape == b.shape, path
        if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        a, b = np.asarray(a), np.asarray(b)
        # Bytes, not values: NaN payloads and -0.0 must survive too.
        assert a.tobytes() == b.tobytes(), path


def state_files(directory, step):
    """The array data files of a checkpoint's state (orbax's OCDBT layout)."""
    root = os.path.join(directory, str(step), "state")
    return [
        os.path.join(d, f)
        for d, _, files in os.walk(root)
        for f in files
        if os.path.basename(d) == "d"
    ]


# ---------------------------------------------------------------------------------------------
# Round trips, cadence, keep


def test_search_state_round_trip_is_bit_identical(tmp_path, states):
    fresh, state = states[0], states[2]
    masks0, masks = jj.current_masks(fresh.opt_state), jj.current_masks(state.opt_state)
    # The test means something only if the masks moved and the momentum is non-zero.
    pairs = zip(jax.tree.leaves(masks0), jax.tree.leaves(masks), strict=True)
    assert any(not np.array_equal(a, b) for a, b in pairs)
    momentum = state.opt_state[1][0].trace
    assert all(np.any(np.asarray(t) != 0) for t in jax.tree.leaves(momentum))
    assert any(leaf is None for _, leaf in flat(state.scores))  # unmasked leaves are None

    extra = {"data": {"next_index": 2, "pipeline": {"seed": 0}}, "losses": [1.5, 0.25, 1e-30]}
    with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=2) as ckpt:
        assert ckpt.restore(fresh) is None
        assert ckpt.latest_step() is None
        assert ckpt.save(2, state, extra)
    with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=2) as ckpt:
        assert ckpt.latest_step() == 2
        restored, extra2, step = ckpt.restore(fresh)
    assert step == 2 and extra2 == extra
    assert type(restored) is type(state)
    assert_bit_identical(restored, state)
    assert restored.step.dtype == jnp.int32 and int(restored.step) == 2
    for m in jax.tree.leaves(restored.masks):
        assert m.dtype == jnp.bool_
    assert_bit_identical(restored.masks, masks)
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)


def test_train_state_and_raw_keys_round_trip(tmp_path, states, params):
    base = states[1]
    tx = optax.adamw(1e-3)
    train = create_train_state(params, base.batch_stats, tx)
    grads = jax.tree.map(jnp.ones_like, train.params)
    updates, opt_state = tx.update(grads, train.opt_state, train.params)
    train = train.replace(
        step=jnp.int32(7), params=optax.apply_updates(train.params, updates), opt_state=opt_state
    )
    target = create_train_state(params, base.batch_stats, tx)
    raw = {"rng": jax.random.PRNGKey(5), "x": jnp.array([np.nan, -0.0, 1.0], jnp.float32)}
    with Checkpointer(tmp_path, identity={"kind": "train"}, save_every_steps=1) as ckpt:
        assert ckpt.save(7, (train, raw), {})
        got, extra, step = ckpt.restore((target, jax.tree.map(jnp.zeros_like, raw)))
    assert step == 7 and extra == {}
    assert got[1]["rng"].dtype == jnp.uint32
    assert_bit_identical(got, (train, raw))


def test_cadence_and_keep(tmp_path):
    state = {"w": jnp.arange(3, dtype=jnp.float32)}
    with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=3, keep=2) as ckpt:
        assert [s for s in range(11) if ckpt.should_save(s)] == [0, 3, 6, 9]
        saved = [s for s in range(1, 11) if ckpt.save(s, state, {"s": s})]
        assert saved == [3, 6, 9]
        assert ckpt.all_steps() == [6, 9] and ckpt.latest_step() == 9
        assert ckpt.save(10, state, {"s": 10}, force=True)
        assert not ckpt.save(10, state, {"s": 10}, force=True)  # already saved
        assert ckpt.all_steps() == [9, 10]
    assert sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit()) == [9, 10]
    with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=3, keep=2) as ckpt:
        got, extra, step = ckpt.restore({"w": jnp.zeros(3)})
    assert step == 10 and extra == {"s": 10}


def test_bad_arguments_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="save_every_steps"):
        Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=0)
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=1, keep=0)
    with pytest.raises(TypeError, match="identity"):
        Checkpointer(tmp_path, identity={"f": object()}, save_every_steps=1)
    with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=1) as ckpt:
        with pytest.raises(TypeError, match="extra"):
            ckpt.save(1, {"w": jnp.zeros(2)}, {"bad": object()})


# ---------------------------------------------------------------------------------------------
# Mismatches


@pytest.mark.parametrize(
    "change, field, saved, now",
    [
        (
            {"budget": {"conv1/kernel": 50, "conv2/kernel": 200}},
            "budget.conv2/kernel",
            "201",
            "200",
        ),
        ({"model": "resnet20"}, "model", '"TinyNet"', '"resnet20"'),
        ({"num_classes": 10, "width": 2}, "num_classes", "5", "10"),
    ],
)
def test_identity_mismatch_names_each_field(tmp_path, states, change, field, saved, now):
    with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=1) as ckpt:
        ckpt.save(1, states[1], {})
    other = {**IDENTITY, **change}
    with Checkpointer(tmp_path, identity=other, save_every_steps=1) as ckpt:
        with pytest.raises(CheckpointMismatchError) as err:
            ckpt.restore(states[0])
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert f"{field}: checkpoint {saved}, now {now}" in message
    differing = {name for name, _, _ in err.value.fields}
    assert differing == {k if k != "budget" else field for k in change}
    if "width" in change:
        assert "width: checkpoint <absent>, now 2" in message
    # Nothing was moved aside: the checkpoint is good, it just belongs to another run.
    assert os.listdir(tmp_path / "1")


def test_the_frozen_weights_are_not_saved_but_their_fingerprint_is_checked(
    tmp_path, states, params, caplog
):
    """A checkpoint holds no pre-trained weights; resuming with other weights is refused."""
    with Checkpointer(
        tmp_path, identity=IDENTITY, save_every_steps=1, fingerprint=fingerprint(params)
    ) as ckpt:
        ckpt.save(1, states[1], {})
    meta = json.loads((tmp_path / "1" / "meta" / "metadata").read_text())
    assert meta["format"] == FORMAT_VERSION
    assert meta["identity"]["fingerprint"] == fingerprint(params)
    saved = set(meta["layout"])
    assert saved and not any("params" in leaf for leaf in saved)
    assert any(leaf.startswith(".scores") for leaf in saved)

    # The same weights (a copy) resume; weights differing in one value do not.
    same = jax.tree.map(np.copy, params)
    with Checkpointer(
        tmp_path, identity=IDENTITY, save_every_steps=1, fingerprint=fingerprint(same)
    ) as ckpt:
        assert ckpt.restore(states[0])[2] == 1
    other = jax.tree.map(np.copy, params)
    other["conv1"]["kernel"][0, 0, 0, 0] += 1e-6
    assert fingerprint(other) != fingerprint(params)
    with Checkpointer(
        tmp_path, identity=IDENTITY, save_every_steps=1, fingerprint=fingerprint(other)
    ) as ckpt:
        with pytest.raises(CheckpointMismatchError) as err:
            ckpt.restore(states[0])
    message = str(err.value)
    assert "fingerprint: checkpoint" in message
    assert "the pre-trained weights differ from those the checkpoint was made from" in message
    # A checkpoint of an older format (which held the weights) is refused, not misread.
    meta["format"] = 1
    (tmp_path / "1" / "meta" / "metadata").write_text(json.dumps(meta))
    with Checkpointer(
        tmp_path, identity=IDENTITY, save_every_steps=1, fingerprint=fingerprint(params)
    ) as ckpt:
        with pytest.raises(CheckpointMismatchError, match="has format 1"):
            ckpt.restore(states[0])


def test_fingerprint_covers_paths_dtypes_shapes_and_bytes():
    a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
    assert fingerprint(a) == fingerprint(jax.tree.map(jnp.asarray, a))
    assert fingerprint(a) != fingerprint({"v": a["w"], "b": a["b"]})
    assert fingerprint(a) != fingerprint({**a, "w": a["w"].reshape(3, 2)})
    assert fingerprint(a) != fingerprint({**a, "w": a["w"].astype(np.float64)})
    assert fingerprint(a) != fingerprint({**a, "b": np.array([0.0, -0.0, 0.0], np.float32)})


def test_layout_mismatch_names_the_leaf(tmp_path):
    with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=1) as ckpt:
        ckpt.save(1, {"a": jnp.zeros((2, 3)), "b": jnp.zeros(2, jnp.int32)}, {})
        with pytest.raises(CheckpointMismatchError) as err:
            ckpt.restore({"a": jnp.zeros((3, 3)), "c": jnp.zeros(2, jnp.int32)})
    message = str(err.value)
    assert "['a']: float32[2,3] vs float32[3,3]" in message
    assert err.value.missing == ["['c']"] and err.value.unexpected == ["['b']"]


# ---------------------------------------------------------------------------------------------
# Damage


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, states, caplog, damage):
    with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=1) as ckpt:
        ckpt.save(2, states[2], {"at": 2})
        ckpt.save(3, states[3], {"at": 3})
    files = state_files(tmp_path, 3)
    assert files
    if damage == "truncate":
        for path in files:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    else:
        # Same sizes, one byte in every 8 flipped in every data file (zstd-compressed by OCDBT):
        # either the reader fails or the values change, which only the checksums see. (Flipping
        # one run of bytes was flaky: it can land in bytes that no array reads.)
        for path in files:
            with open(path, "r+b") as f:
                data = bytearray(f.read())
                data[::8] = bytes(b ^ 0x5A for b in data[::8])
                f.seek(0)
                f.write(data)

    with caplog.at_level(logging.WARNING):
        with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=1) as ckpt:
            restored, extra, step = ckpt.restore(states[0])
            assert step == 2 and extra == {"at": 2}
            assert_bit_identical(restored, states[2])
            # The damaged step is moved aside, so step 3 can be saved again by the resumed run.
            assert ckpt.all_steps() == [2]
            assert ckpt.save(3, states[3], {"at": 3})
            assert ckpt.restore(states[0])[1] == {"at": 3}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3" in w and "unusable" in w for w in warnings), warnings
    assert os.listdir(tmp_path / "corrupt")[0].startswith("3-")


def digest(x):
    """The checkpoint checksum, computed independently in numpy (uint32 arithmetic wraps)."""
    words = np.ascontiguousarray(np.asarray(x, np.float32)).view(np.uint32).ravel()
    i = np.arange(words.size, dtype=np.uint32)
    with np.errstate(over="ignore"):
        mixed = words ^ (i * np.uint32(0x9E3779B9))
        return int(np.sum(mixed * (i * np.uint32(2) + np.uint32(1)), dtype=np.uint32))


def test_checksums_are_verified(tmp_path, states, caplog):
    """Values that read back fine but differ from what was saved are caught by the checksums."""
    with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=1) as ckpt:
        ckpt.save(2, states[2], {"at": 2})
        ckpt.save(3, states[3], {"at": 3})
    # Storing step 2's scores as step 3's gives a readable checkpoint whose values are not the
    # ones its checksums were computed from (the silent damage a flipped bit can do).
    meta_path = tmp_path / "3" / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    leaf = ".scores['conv2']['kernel']"
    assert meta["checksums"][leaf] == digest(states[3].scores["conv2"]["kernel"])
    meta["checksums"][leaf] = digest(states[2].scores["conv2"]["kernel"])
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=1) as ckpt:
            restored, extra, step = ckpt.restore(states[0])
    assert step == 2
    assert_bit_identical(restored, states[2])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3" in w and f"checksum mismatch at {leaf}" in w for w in warnings), warnings


def test_unfinished_save_is_ignored(tmp_path, states):
    """A save killed before orbax renamed its temporary folder leaves no step behind."""
    with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=1) as ckpt:
        ckpt.save(2, states[2], {"at": 2})
    # What a kill mid-save leaves: orbax's temporary folder of step 3, partly written.
    unfinished = tmp_path / "3.orbax-checkpoint-tmp"
    (unfinished / "state").mkdir(parents=True)
    (unfinished / "state" / "manifest.ocdbt").write_bytes(b"\x00" * 7)
    with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=1) as ckpt:
        assert ckpt.all_steps() == [2] and ckpt.latest_step() == 2
        restored, extra, step = ckpt.restore(states[0])
        assert step == 2 and extra == {"at": 2}
        assert ckpt.save(3, states[3], {"at": 3})
    assert sorted(os.listdir(tmp_path)) == ["2", "3"]


@pytest.mark.parametrize("attempt", range(3))  # thread timing varies: try it a few times
def test_a_full_disk_is_reported_once_and_the_next_save_works(tmp_path, states, attempt):
    """A save that hits ENOSPC half-way raises `CheckpointWriteError` (an `OSError` with that
    errno) and leaves nothing; once space is back, the next save and `close` succeed. (Orbax keeps
    the failed write's error in its thread and raises it again from every later wait.)"""
    import errno

    import orbax.checkpoint as ocp

    from jackpots_jax.io.checkpoints import CheckpointWriteError

    handler = ocp.handlers.JsonCheckpointHandler
    original = handler._save_fn
    full = {"on": True}

    async def fill_the_disk(self, x, directory):
        if full["on"] and f"{os.sep}2.orbax-checkpoint-tmp" in os.fspath(directory):
            path = directory / self._filename
            path.write_text('{"partial')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
        return await original(self, x, directory)

    handler._save_fn = fill_the_disk
    try:
        with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=1) as ckpt:
            assert ckpt.save(1, states[1], {"at": 1})
            with pytest.raises(CheckpointWriteError) as failed:
                ckpt.save(2, states[2], {"at": 2})
            assert failed.value.errno == errno.ENOSPC
            assert "the checkpoint of step 2 could not be written" in str(failed.value)
            assert "the newest complete checkpoint is step 1" in str(failed.value)
            assert sorted(os.listdir(tmp_path)) == ["1"]
            full["on"] = False  # space freed
            assert ckpt.save(3, states[3], {"at": 3})
        assert sorted(os.listdir(tmp_path)) == ["1", "3"]
    finally:
        handler._save_fn = original
    with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=1) as ckpt:
        restored, extra, step = ckpt.restore(states[0])
    assert step == 3 and extra == {"at": 3}
    assert_bit_identical(restored, states[3])


def test_no_readable_checkpoint_raises(tmp_path, states):
    with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=1) as ckpt:
        ckpt.save(1, states[1], {})
    for path in state_files(tmp_path, 1):
        open(path, "wb").close()
    with Checkpointer(tmp_path, identity=IDENTITY, save_every_steps=1) as ckpt:
        with pytest.raises(CheckpointCorruptError, match="step 1: state unreadable"):
            ckpt.restore(states[0])
        assert ckpt.all_steps() == [1]  # kept for inspection


# ---------------------------------------------------------------------------------------------
# SIGKILL and resume


def run_driver(workdir, out, env, kill_after=None):
    """Runs the driver; with `kill_after`, SIGKILLs it once it printed `step k done`, k >= it."""
    cmd = [sys.executable, DRIVER, str(workdir), str(out), "--steps", "12", "--delay", "0.1"]
    with open(os.path.join(os.path.dirname(out), "stderr.txt"), "a") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line.strip())
                done = line.startswith("step ") and int(line.split()[1]) >= (kill_after or 99)
                if done:
                    proc.send_signal(signal.SIGKILL)
                    break
            proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
    if kill_after is None and proc.returncode != 0:
        with open(os.path.join(os.path.dirname(out), "stderr.txt")) as f:
            pytest.fail(f"driver failed ({proc.returncode}):\n{f.read()[-3000:]}")
    return proc.returncode, lines


@pytest.mark.slow
def test_search_killed_and_resumed_ends_bit_identical(tmp_path):
    env = dict(os.environ)
    env |= {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        # The three runs share compiled programs through the tests' compilation cache
        # (`JAX_COMPILATION_CACHE_DIR`, set in conftest.py and inherited).
    }
    (tmp_path / "straight").mkdir()
    (tmp_path / "killed").mkdir()
    rc, lines = run_driver(tmp_path / "straight" / "ckpt", tmp_path / "straight" / "out.npz", env)
    assert lines[-1] == "finished" and not any(x.startswith("resumed") for x in lines)

    kill_after = random.Random(20240601).randint(3, 9)
    workdir, out = tmp_path / "killed" / "ckpt", tmp_path / "killed" / "out.npz"
    rc, lines = run_driver(workdir, out, env, kill_after=kill_after)
    assert rc == -signal.SIGKILL and "finished" not in lines
    assert not any(x.startswith("resumed") for x in lines)
    rc, lines = run_driver(workdir, out, env)
    # The restart resumed from the newest checkpoint written before the kill (every 2 steps).
    resumed = [int(x.split()[1]) for x in lines if x.startswith("resumed")]
    assert len(resumed) == 1 and resumed[0] % 2 == 0, lines
    assert kill_after - 1 <= resumed[0] <= 12
    assert lines[1:] == [f"step {k} done" for k in range(resumed[0] + 1, 13)] + ["finished"]

    with np.load(tmp_path / "straight" / "out.npz") as a, np.load(out) as b:
        assert sorted(a.files) == sorted(b.files)
        assert any("masks" in k for k in a.files) and any(".scores" in k for k in a.files)
        for key in a.files:
            assert a[key].dtype == b[key].dtype, key
            assert a[key].tobytes() == b[key].tobytes(), key
        assert len(a["losses"]) == 12


# ---------------------------------------------------------------------------------------------
# Export


def test_export_jackpot_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    model = models.create("fmnist_cnn", 10)
    x = jax.ShapeDtypeStruct((1, *models.input_shape("fmnist_cnn")), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    variables = jax.tree.map(lambda a: rng.uniform(-1, 1, a.shape).astype(a.dtype), abstract)
    params = variables["params"]
    budget = jj.layer_budgets(params, 0.9, "uniform")
    # A random mask of exactly each layer's budget, and random scores, made here with numpy.
    masks = jax.tree.map(
        lambda b, p: None if b is None else (rng.permutation(p.size) >= b).reshape(p.shape),
        budget,
        params,
        is_leaf=lambda x: x is None,
    )
    scores = jax.tree.map(
        lambda m: None if m is None else rng.normal(size=m.shape).astype(np.float32),
        masks,
        is_leaf=lambda x: x is None,
    )
    config = {"sparsity": 0.9, "model": {"name": "fmnist_cnn"}, "seed": 0}
    metrics = {"test_accuracy": 0.875, "steps": 100}

    out = tmp_path / "export"
    paths = export_jackpot(
        out,
        variables=variables,
        masks=masks,
        model_name="fmnist_cnn",
        budget=budget,
        config=config,
        metrics=metrics,
        scores=scores,
    )
    assert paths == {
        "masks": str(out / "masks.npz"),
        "batch_stats": str(out / "batch_stats.npz"),
        "safetensors": str(out / "jackpot.safetensors"),
        "json": str(out / "jackpot.json"),
    }
    files = ["batch_stats.npz", "jackpot.json", "jackpot.safetensors", "masks.npz"]
    assert sorted(os.listdir(out)) == files

    # The running statistics the jackpot is evaluated with, leaf by leaf, bit for bit.
    stats = variables["batch_stats"]
    with np.load(paths["batch_stats"]) as npz:
        assert sorted(npz.files) == sorted(name for name, _ in named_leaves(stats))
    assert_bit_identical(batch_stats_from_npz(paths["batch_stats"], stats), stats)
    fewer = tmp_path / "fewer.npz"
    np.savez(fewer, **{n: x for n, x in named_leaves(stats) if n != "bn1/var"})
    with pytest.raises(CheckpointMismatchError, match="missing: bn1/var"):
        batch_stats_from_npz(fewer, stats)
    np.savez(fewer, **{n: np.full_like(x, np.nan) for n, x in named_leaves(stats)})
    with pytest.raises(FileContentError, match="NaN or infinite values at bn1/mean"):
        batch_stats_from_npz(fewer, stats)

    masked = {name: np.asarray(m) for name, m in named_leaves(masks) if m is not None}
    assert set(masked) == {"conv1/kernel", "conv2/kernel", "fc1/kernel"}
    with np.load(paths["masks"]) as npz:
        assert sorted(npz.files) == sorted(masked)
        for name, m in masked.items():
            assert npz[name].dtype == np.bool_
            np.testing.assert_array_equal(npz[name], m)
    assert_bit_identical(masks_from_npz(paths["masks"], budget), masks)
    # The one masks reader also takes a file of some layers' masks, against the params.
    subset = tmp_path / "subset.npz"
    np.savez(subset, **{"fc1/kernel": masked["fc1/kernel"]})
    with pytest.raises(CheckpointMismatchError, match="missing: conv1/kernel, conv2/kernel"):
        masks_from_npz(subset, budget)
    got = masks_from_npz(subset, params, exact=False)
    assert got["conv1"]["kernel"] is None and got["head"]["bias"] is None
    np.testing.assert_array_equal(got["fc1"]["kernel"], masked["fc1/kernel"])
    np.savez(subset, **{"fc1/kernel": masked["fc1/kernel"][:5], "fc2/kernel": np.ones(2, bool)})
    with pytest.raises(CheckpointMismatchError) as err:
        masks_from_npz(subset, params, exact=False)
    assert err.value.unexpected == ["fc2/kernel"]
    assert err.value.mismatched == [("fc1/kernel", (5, 128), (1568, 128))]
    # Masks as numbers: 0 and 1 are read as False and True; anything else is refused, not True.
    np.savez(subset, **{"fc1/kernel": masked["fc1/kernel"].astype(np.float32)})
    got = masks_from_npz(subset, params, exact=False)
    np.testing.assert_array_equal(got["fc1"]["kernel"], masked["fc1/kernel"])
    halves = masked["fc1/kernel"] * np.float32(0.5)
    np.savez(subset, **{"fc1/kernel": halves})
    with pytest.raises(FileContentError, match=r"other than 0 and 1 at fc1/kernel \(e.g. 0.5\)"):
        masks_from_npz(subset, params, exact=False)
    subset.write_bytes(b"")
    with pytest.raises(FileContentError, match="not a readable .npz"):
        masks_from_npz(subset, params, exact=False)

    again, scores2, masks2 = weights.import_checkpoint(paths["safetensors"], "fmnist_cnn")
    for layer in ("conv1", "conv2", "fc1"):
        w, m = params[layer]["kernel"], np.asarray(masks[layer]["kernel"])
        np.testing.assert_array_equal(again["params"][layer]["kernel"], np.where(m, w, 0))
        np.testing.assert_array_equal(masks2[layer]["kernel"], m)
        np.testing.assert_array_equal(scores2[layer]["kernel"], scores[layer]["kernel"])
    np.testing.assert_array_equal(again["params"]["head"]["kernel"], params["head"]["kernel"])
    assert masks2["head"]["kernel"] is None

    with open(paths["json"]) as f:
        summary = json.load(f)
    assert summary["model"] == "fmnist_cnn"
    assert summary["config"] == config and summary["metrics"] == metrics
    want_budget = {name: int(b) for name, b in named_leaves(budget) if b is not None}
    assert summary["budget"] == want_budget
    # Sparsity over the masked layers, counted here from the masks themselves.
    size = sum(m.size for m in masked.values())
    pruned = sum(int((~m).sum()) for m in masked.values())
    assert pruned == sum(want_budget.values())
    assert summary["sparsity"]["budgeted"]["sparsity"] == pytest.approx(pruned / size)
    assert summary["sparsity"]["layers"]["fc1/kernel"]["kept"] == int(masked["fc1/kernel"].sum())

    # A second export over the first replaces the files whole and leaves no temporary file.
    export_jackpot(
        out,
        variables=variables,
        masks=masks,
        model_name="fmnist_cnn",
        budget=budget,
        config=config,
        metrics={"test_accuracy": 0.9},
    )
    assert sorted(os.listdir(out)) == files
    with open(paths["json"]) as f:
        assert json.load(f)["metrics"] == {"test_accuracy": 0.9}

    # A writer that fails half-way leaves the previous file whole and no temporary file.
    before = (out / "jackpot.safetensors").read_bytes()

    def failing_save_file(arrays, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        export_jackpot(
            out,
            variables=variables,
            masks=masks,
            model_name="fmnist_cnn",
            budget=budget,
            config=config,
            metrics=metrics,
        )
    assert sorted(os.listdir(out)) == files
    assert (out / "jackpot.safetensors").read_bytes() == before
