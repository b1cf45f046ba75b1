"""Structured sparsity patterns (N:M, blocks, channels) against numpy brute force.

Every jitted function is compiled once per tree structure (cached); hypothesis varies only traced
values (scores with heavy ties, signed zeros, infinities and NaN; current masks; the rate).
"""

import functools
import math
import re
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from reference import (
    expand_tiles,
    nm_restricted_refresh,
    nm_topk_mask,
    restricted_refresh,
    tile_sums,
    topk_mask,
)

import jackpots_jax as jj
from jackpots_jax import patterns

NEG_NAN = np.frombuffer(np.uint32(0xFFC00000).tobytes(), np.float32)[0]
POOL = np.array(
    [-np.inf, -2.5, -1.0, -0.0, 0.0, 1e-30, 0.5, 0.99, 1.0, 3.0, np.inf, np.nan, NEG_NAN],
    np.float32,
)
SELECTIONS = ("batched", "bracketed")
# Flax attention kernels: q/k/v `[D, heads, head_dim]` (one input axis), out
# `[heads, head_dim, D]` (two).
INPUT_AXES = {"^q$": 1, "^out$": 2}


def _nm_params(m, seed=0):
    """Kernels of every layout whose input axis is a multiple of `m`, a bias, a dense head."""
    rng = np.random.default_rng(seed)
    shapes = {
        "conv": (2, 2, 2 * m, 3),  # HWIO: groups along I
        "dense": (3 * m, 5),  # [in, out]: groups along in
        "q": (m, 2, 3),  # groups along D
        "out": (2, m, 4),  # groups along head_dim
        "head": (4, 3),
    }
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    params["bias"] = np.zeros(5, np.float32)
    return params


NM_PATTERNS = ("2:4", "4:8", "1:3")


@functools.cache
def _nm_budget(pattern):
    m = jj.Pattern.parse(pattern).m
    return jj.layer_budgets(_nm_params(m), None, pattern=pattern, input_axes=INPUT_AXES)


def _block_params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"conv": (2, 2, 4, 6), "dense": (6, 4), "q": (4, 2, 6), "out": (2, 4, 6)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    params["bias"] = np.zeros(6, np.float32)
    return params


@functools.cache
def _block_budget(pattern):
    """Budgets that keep no tile, one tile, all but one and all (and one from the rule)."""
    params = _block_params()
    budget = jj.layer_budgets(params, 0.6, "uniform", pattern=pattern, input_axes=INPUT_AXES)
    out = dict(budget)
    units = {k: int(np.prod(e.score_shape)) for k, e in budget.items() if e is not None}
    for name, keep in zip(("conv", "dense", "q"), (0, 1, units["q"] - 1), strict=True):
        e = budget[name]
        out[name] = jj.Structured(e.size - keep * e.unit, e.pattern, e.shape, e.input_axes)
    e = budget["out"]
    out["out"] = jj.Structured(0, e.pattern, e.shape, e.input_axes)
    return out


@functools.cache
def _compiled(kind, pattern, selection):
    budget = (_nm_budget if kind == "nm" else _block_budget)(pattern)

    def fn(scores, old, rate):
        return (
            jj.topk_masks(scores, budget, selection=selection),
            jj.topk_masks(scores, budget, old, selection=selection),
            jj.refresh_masks(scores, old, budget, rate, selection=selection),
        )

    return jax.jit(fn)


def _draw(rng, shape, tied):
    if rng.random() < tied:
        return rng.choice(POOL, shape).astype(np.float32)
    return (rng.standard_normal(shape) * np.float32(10.0 ** rng.integers(-3, 4))).astype(np.float32)


def _random_nm_masks(rng, entry):
    keys = rng.random(entry.shape).astype(np.float32)
    return nm_topk_mask(keys, entry.pattern.n, entry.pattern.m, entry.axis)


def _random_unit_masks(rng, entry):
    units = int(np.prod(entry.score_shape))
    m = np.zeros(units, bool)
    m[rng.choice(units, entry.keep_units, replace=False)] = True
    return m.reshape(entry.score_shape)


def _masked(budget):
    return {k: e for k, e in budget.items() if e is not None}


def _full(budget, fn):
    """A tree of the budget's structure: `fn(entry)` at masked leaves, None elsewhere."""
    return {k: None if e is None else fn(e) for k, e in budget.items()}


@settings(max_examples=8, deadline=None)
@given(
    st.sampled_from(NM_PATTERNS),
    st.integers(0, 2**31 - 1),
    st.sampled_from([1.0, 0.5, 0.05, 0.0]),
    st.sampled_from([0.0, 0.5, 1.0]),
)
def test_nm_topk_and_refresh_equal_brute_force(pattern, seed, rate, tied):
    rng = np.random.default_rng(seed)
    budget = _nm_budget(pattern)
    entries = _masked(budget)
    scores = _full(budget, lambda e: _draw(rng, e.shape, tied))
    old = _full(budget, lambda e: _random_nm_masks(rng, e))
    for selection in SELECTIONS:
        plain, with_old, refreshed = _compiled("nm", pattern, selection)(
            scores, old, jnp.float32(rate)
        )
        for k, e in entries.items():
            n, m, axis = e.pattern.n, e.pattern.m, e.axis
            s = scores[k]
            where = f"{selection} {pattern} {k} rate {rate}"
            np.testing.assert_array_equal(np.asarray(plain[k]), nm_topk_mask(s, n, m, axis), where)
            np.testing.assert_array_equal(
                np.asarray(with_old[k]), nm_topk_mask(s, n, m, axis, old[k]), where
            )
            expected, _, _ = nm_restricted_refresh(s, old[k], n, m, axis, rate)
            np.testing.assert_array_equal(np.asarray(refreshed[k]), expected, where)
            assert patterns.nm_violations(np.asarray(refreshed[k]), axis, n, m) == 0, where


@settings(max_examples=8, deadline=None)
@given(
    st.sampled_from(["block:2", "channel"]),
    st.integers(0, 2**31 - 1),
    st.sampled_from([1.0, 0.5, 0.05, 0.0]),
    st.sampled_from([0.0, 0.5, 1.0]),
)
def test_block_and_channel_masks_equal_brute_force_on_tile_scores(pattern, seed, rate, tied):
    rng = np.random.default_rng(seed)
    budget = _block_budget(pattern)
    entries = _masked(budget)
    scores = _full(budget, lambda e: _draw(rng, e.score_shape, tied))
    old_units = _full(budget, lambda e: _random_unit_masks(rng, e))
    old = {k: None if u is None else expand_tiles(u, budget[k].tile) for k, u in old_units.items()}
    for selection in SELECTIONS:
        plain, with_old, refreshed = _compiled("block", pattern, selection)(
            scores, old, jnp.float32(rate)
        )
        for k, e in entries.items():
            where = f"{selection} {pattern} {k} rate {rate}"
            keep = e.keep_units
            want = expand_tiles(topk_mask(scores[k], keep), e.tile)
            np.testing.assert_array_equal(np.asarray(plain[k]), want, where)
            want = expand_tiles(topk_mask(scores[k], keep, old_units[k]), e.tile)
            np.testing.assert_array_equal(np.asarray(with_old[k]), want, where)
            units, _, _ = restricted_refresh(scores[k], old_units[k], keep, rate)
            np.testing.assert_array_equal(
                np.asarray(refreshed[k]), expand_tiles(units, e.tile), where
            )
            assert int(np.asarray(refreshed[k]).sum()) == e.keep


def test_tiles_are_aligned_squares_of_the_fan_in_fan_out_view():
    """A block:2 tile is an aligned 2 x 2 square of `kernel.reshape(fan_in, fan_out)`, and a
    channel tile one column of it (conv HWIO: fan_in = H W I)."""
    budget = jj.layer_budgets(_block_params(), 0.5, "uniform", pattern="block:2")
    e = budget["conv"]
    assert e.tile == (1, 1, 2, 2) and e.score_shape == (2, 2, 2, 3)
    ids = np.arange(int(np.prod(e.score_shape))).reshape(e.score_shape)
    view = expand_tiles(ids, e.tile).reshape(2 * 2 * 4, 6)
    for r in range(0, view.shape[0], 2):
        for c in range(0, view.shape[1], 2):
            square = view[r : r + 2, c : c + 2]
            assert (square == square[0, 0]).all()
    assert len(np.unique(view)) == ids.size
    c = jj.layer_budgets(_block_params(), 0.5, "uniform", pattern="channel")["conv"]
    assert c.tile == (2, 2, 4, 1) and c.score_shape == (1, 1, 1, 6) and c.unit == 16


def test_budgets_under_patterns():
    params = _nm_params(4)
    b = jj.layer_budgets(params, 0.5, pattern="2:4", input_axes=INPUT_AXES)
    assert b["head"] is None and b["bias"] is None  # the classifier is held dense by default
    for k in ("conv", "dense", "q", "out"):
        assert isinstance(b[k], jj.Structured) and int(b[k]) == params[k].size // 2
    assert b["q"].axis == 0 and b["out"].axis == 1 and b["conv"].axis == 2
    r = jj.sparsity_report(b, params)
    assert r["budgeted"]["sparsity"] == 0.5
    # 1:3 implies 2/3; the float the user writes agrees.
    jj.layer_budgets(_nm_params(3), 1 - 1 / 3, pattern="1:3", input_axes=INPUT_AXES)
    # Blocks: the rule's count rounded down to whole tiles; uniform = floor(s * tiles).
    params = _block_params()
    for pattern in ("block:2", "channel"):
        bb = jj.layer_budgets(params, 0.7, "uniform", pattern=pattern, dense=())
        for k, e in _masked(bb).items():
            units = int(np.prod(e.score_shape))
            assert e.pruned == math.floor(Fraction(7, 10) * units) * e.unit, (pattern, k)
        gm = jj.layer_budgets(params, 0.7, "global_magnitude", pattern=pattern, dense=())
        plain = jj.layer_budgets(params, 0.7, "global_magnitude", dense=())
        for k, e in _masked(gm).items():
            assert e.pruned == plain[k] // e.unit * e.unit
    # Unstructured budgets are the plain ints of before.
    assert jj.layer_budgets(params, 0.7, pattern="unstructured") == jj.layer_budgets(params, 0.7)


def test_pattern_errors_name_the_field_and_the_leaf():
    params = _nm_params(4)
    with pytest.raises(ValueError, match=r"`sparsity`=0.9 disagrees with pattern 2:4.*0.5"):
        jj.layer_budgets(params, 0.9, pattern="2:4")
    with pytest.raises(ValueError, match="unknown `pattern` '2-4'"):
        jj.layer_budgets(params, 0.5, pattern="2-4")
    with pytest.raises(ValueError, match="needs 0 < N < M, got N=4, M=4"):
        jj.Pattern.parse("4:4")
    with pytest.raises(ValueError, match="block side must be at least 2"):
        jj.Pattern.parse("block:1")
    with pytest.raises(ValueError, match="only an N:M pattern implies the sparsity"):
        jj.layer_budgets(params, None, pattern="block:2")
    # By default q's input axis is `heads` (size 2): not a multiple of 4.
    with pytest.raises(ValueError, match=r"pattern 2:4 does not fit 'q' \(shape \(4, 2, 3\)"):
        jj.layer_budgets(params, 0.5, pattern="2:4")
    held = jj.layer_budgets(params, 0.5, pattern="2:4", indivisible="dense")
    assert held["q"] is None and held["out"] is not None and held["dense"] is not None
    with pytest.raises(ValueError, match=r"`input_axes` patterns \['\^nothing'\] match no"):
        jj.layer_budgets(params, 0.5, pattern="2:4", input_axes={**INPUT_AXES, "^nothing": 1})
    with pytest.raises(ValueError, match=r"gives 'q' \(shape \(4, 2, 3\)\) 3 input axes"):
        jj.layer_budgets(params, 0.5, pattern="2:4", input_axes={"^q$": 3})
    with pytest.raises(ValueError, match="unknown `indivisible`"):
        jj.layer_budgets(params, 0.5, pattern="2:4", indivisible="skip")
    with pytest.raises(ValueError, match="axis 3 \\(size 6\\) not a multiple of the block side 4"):
        jj.layer_budgets(_block_params(), 0.5, pattern="block:4", input_axes=INPUT_AXES)
    budget = jj.layer_budgets(_block_params(), 0.5, pattern="block:2", input_axes=INPUT_AXES)
    wrong = {k: (None if e is None else jnp.zeros(e.shape)) for k, e in budget.items()}
    with pytest.raises(
        ValueError, match=r"scores for 'conv' have shape \(2, 2, 4, 6\).*\(2, 2, 2, 3\)"
    ):
        jj.topk_masks(wrong, budget)
    e = budget["dense"]
    with pytest.raises(ValueError, match="must be a multiple of 4"):
        jj.Structured(3, e.pattern, e.shape, e.input_axes)
    with pytest.raises(ValueError, match="prunes exactly 12 weights"):
        jj.Structured(8, jj.Pattern.parse("2:4"), (4, 6), 1)
    # A budget made for kernels of the same sizes and other shapes.
    flipped = {k: np.ones(v.shape[::-1], np.float32) for k, v in _block_params().items()}
    other = jj.layer_budgets(flipped, 0.5, "uniform", pattern="block:2", input_axes=INPUT_AXES)
    with pytest.raises(ValueError, match=r"'conv' was made for a kernel of shape \(6, 4, 2, 2\)"):
        jj.init_scores(_block_params(), other)


def test_magnitude_init_is_one_shot_magnitude_nm_and_tile_magnitude():
    params = _nm_params(4, seed=3)
    budget = _nm_budget("2:4")
    scores, masks = jax.jit(lambda p: jj.init_scores(p, budget, "magnitude", gap=0.05))(params)
    for k, e in _masked(budget).items():
        want = nm_topk_mask(np.abs(params[k]), 2, 4, e.axis)  # ties: the lower index
        np.testing.assert_array_equal(np.asarray(masks[k]), want, k)
        np.testing.assert_allclose(np.asarray(scores[k]), np.where(want, 1.0, 0.95), err_msg=k)
    # Tiles rank by their summed |w| (integer weights: the float32 sums are exact).
    rng = np.random.default_rng(4)
    ints = {k: rng.integers(-3, 4, v.shape).astype(np.float32) for k, v in _block_params().items()}
    for pattern in ("block:2", "channel"):
        budget = jj.layer_budgets(ints, 0.5, "uniform", pattern=pattern, input_axes=INPUT_AXES)
        inits = jax.jit(
            lambda p, b=budget: (
                jj.init_scores(p, b, "weight_magnitude"),
                jj.init_scores(p, b, "magnitude"),
                jj.init_scores(p, b, "kaiming", jax.random.key(0), rank_by="abs"),
            )
        )
        (scores, masks), (mag_scores, mag_masks), (ks, km) = inits(ints)
        for k, e in _masked(budget).items():
            sums = tile_sums(np.abs(ints[k]), e.tile)
            np.testing.assert_array_equal(np.asarray(scores[k]), sums)
            units = topk_mask(sums, e.keep_units)
            want = expand_tiles(units, e.tile)
            np.testing.assert_array_equal(np.asarray(masks[k]), want, k)
            np.testing.assert_array_equal(np.asarray(mag_masks[k]), want, k)
            np.testing.assert_allclose(np.asarray(mag_scores[k]), np.where(units, 1.0, 0.99))
            assert ks[k].shape == e.score_shape
            assert int(np.asarray(km[k]).sum()) == e.keep


def test_block_ste_gradient_is_the_sum_of_entry_gradients():
    """dL/dS_tile = sum over the tile of dL/d(W*M) W: the element STE's gradient summed."""
    params = _block_params(5)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((7, 2 * 2 * 4)), jnp.float32)

    def loss(weights):
        h = jnp.tanh(x @ weights["conv"].reshape(16, 6))  # HWIO as its [fan_in, fan_out] view
        h = jnp.tanh(h @ weights["dense"])
        h = jnp.tanh(jnp.einsum("bd,dhe->bhe", h, weights["q"]))  # q: [D, heads, head_dim]
        h = jnp.einsum("bhd,hdo->bo", h[:, :, :4], weights["out"])  # out: [heads, head_dim, D]
        return jnp.sum(jnp.sin(h))

    grad = jax.jit(jax.grad(lambda s, m: loss(jj.masked_weights(params, s, m))))
    for pattern in ("block:2", "channel"):
        budget = jj.layer_budgets(params, 0.5, "uniform", pattern=pattern, input_axes=INPUT_AXES)
        scores, masks = jax.jit(lambda p, b=budget: jj.init_scores(p, b, "magnitude"))(params)
        # Scores that differ per tile (the gradient must not depend on them).
        scores = jax.tree.map(lambda s: s + jnp.arange(s.size).reshape(s.shape), scores)
        block_grads = grad(scores, masks)
        # One score per weight: the plain STE, dL/dS = dL/d(W*M) * W.
        elem_grads = grad(jax.tree.map(lambda w: jnp.zeros(w.shape), params), masks)
        for k, e in _masked(budget).items():
            np.testing.assert_allclose(
                np.asarray(block_grads[k]),
                tile_sums(np.asarray(elem_grads[k]), e.tile),
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{pattern} {k}",
            )
        # Forward: W * M.
        out = jax.jit(jj.masked_weights)(params, scores, masks)
        for k in _masked(budget):
            np.testing.assert_array_equal(out[k], params[k] * np.asarray(masks[k]))
    with pytest.raises(ValueError, match=r"a score of shape \(3, 3\) does not fit"):
        jj.masked_weights({"w": jnp.ones((6, 4))}, {"w": jnp.ones((3, 3))}, {"w": jnp.ones((6, 4))})


@pytest.mark.parametrize("pattern", ["2:4", "block:2"])
def test_restriction_in_an_optax_chain_keeps_the_pattern_for_hundreds_of_steps(pattern):
    kind = "nm" if jj.Pattern.parse(pattern).kind == "n:m" else "block"
    params = _nm_params(4, 7) if kind == "nm" else _block_params(7)
    budget = (_nm_budget if kind == "nm" else _block_budget)(pattern)
    entries = _masked(budget)
    scores, masks0 = jj.init_scores(params, budget, "magnitude")
    steps = 300
    schedule = jj.schedules.polynomial(steps, 2.0)
    tx = optax.chain(
        optax.add_decayed_weights(5e-4),
        optax.sgd(0.1, momentum=0.9),
        jj.short_restriction(budget, rate=schedule),
    )

    @jax.jit
    def step(scores, state, grads):
        updates, state = tx.update(grads, state, scores)
        return optax.apply_updates(scores, updates), state

    state = tx.init(scores)
    rng = np.random.default_rng(8)
    prev = jax.device_get(jj.current_masks(state))
    swaps = 0
    for t in range(steps):
        grads = _full(budget, lambda e: rng.standard_normal(e.score_shape).astype(np.float32))
        new_scores, state = step(scores, state, grads)
        masks = jax.device_get(jj.current_masks(state))
        rate = float(schedule(t))
        for k, e in entries.items():
            if kind == "nm":
                assert patterns.nm_violations(masks[k], e.axis, 2, 4) == 0
                if t % 25 == 0:  # the brute force of the whole step, now and then
                    want, _, _ = nm_restricted_refresh(
                        np.asarray(new_scores[k]), prev[k], 2, 4, e.axis, rate
                    )
                    np.testing.assert_array_equal(masks[k], want, f"step {t} {k}")
            else:
                units = masks[k][tuple(slice(None, None, s) for s in e.tile)]
                np.testing.assert_array_equal(masks[k], expand_tiles(units, e.tile))
                assert int(units.sum()) == e.keep_units
            swaps += int(np.sum(masks[k] != prev[k]))
        scores, prev = new_scores, masks
    assert swaps > 0
    assert int(jj.mask_churn(masks0, prev)["total"]) > 0


def test_nm_restriction_counts_swaps_per_layer_over_its_groups():
    """Hand-worked: 2:4 on one row of three groups; every group proposes one swap (c = 3)."""
    e = jj.layer_budgets({"w": np.ones((12, 1), np.float32)}, 0.5, pattern="2:4", dense=())
    old = np.array([1, 1, 0, 0] * 3, bool).reshape(12, 1)
    # The third entry of each group rises above the second: revivals 0.9, 0.7, 0.8.
    new = np.array([1, 0.5, 0.9, 0, 1, 0.5, 0.7, 0, 1, 0.6, 0.8, 0], np.float32).reshape(12, 1)
    refresh = jax.jit(lambda s, m, r: jj.refresh_masks({"w": s}, {"w": m}, e, r)["w"])
    for rate, come_in in ((1.0, (2, 6, 10)), (0.5, (2, 10)), (0.1, (2,)), (0.0, ())):
        got = np.asarray(refresh(new, old, jnp.float32(rate)))
        want = old.ravel().copy()
        for i in come_in:  # each revival sends out the lowest kept entry of its own group
            want[i], want[i - 1] = True, False
        np.testing.assert_array_equal(got.ravel(), want, f"rate {rate}")
    # Ranked by |score|: -3 and 2 are the top two of the group.
    one = jj.layer_budgets({"w": np.ones((4, 1), np.float32)}, 0.5, pattern="2:4", dense=())
    got = jj.topk_masks({"w": jnp.array([[-3.0, 1.0, 2.0, 0.0]]).T}, one, rank_by="abs")["w"]
    np.testing.assert_array_equal(np.asarray(got).ravel(), [True, False, True, False])


def test_sharded_scores_give_the_single_device_masks():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = Mesh(np.array(devices[:8]).reshape(2, 4), ("data", "fsdp"))
    rng = np.random.default_rng(9)
    for kind, pattern in (("nm", "2:4"), ("block", "block:2")):
        budget = (_nm_budget if kind == "nm" else _block_budget)(pattern)
        if kind == "nm":
            scores = _full(budget, lambda e: _draw(rng, e.shape, 0.5))
            old = _full(budget, lambda e: _random_nm_masks(rng, e))
        else:
            scores = _full(budget, lambda e: _draw(rng, e.score_shape, 0.5))
            old = _full(budget, lambda e: expand_tiles(_random_unit_masks(rng, e), e.tile))

        def spec(x):
            """'fsdp' (4 ways) on an axis it divides, 'data' (2 ways) on another one."""
            axes = [None] * x.ndim
            for name, ways in (("fsdp", 4), ("data", 2)):
                free = [d for d in range(x.ndim) if axes[d] is None and x.shape[d] % ways == 0]
                if free:
                    axes[max(free, key=lambda d: x.shape[d])] = name
            return NamedSharding(mesh, P(*axes))

        def put(tree):
            return {k: None if v is None else jax.device_put(v, spec(v)) for k, v in tree.items()}

        for selection in ("batched",):  # the accelerator path; the CPU path is per leaf
            fn = _compiled(kind, pattern, selection)
            for rate in (1.0, 0.5):
                want = jax.device_get(fn(scores, old, jnp.float32(rate)))
                got = jax.device_get(fn(put(scores), put(old), jnp.float32(rate)))
                for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
                    np.testing.assert_array_equal(a, b, f"{pattern} {selection}")


def test_the_batched_nm_refresh_has_no_loops_or_conditionals():
    budget = _nm_budget("2:4")
    rng = np.random.default_rng(10)
    scores = _full(budget, lambda e: rng.standard_normal(e.shape).astype(np.float32))
    old = _full(budget, lambda e: _random_nm_masks(rng, e))
    fn = jax.jit(lambda s, m, r: jj.refresh_masks(s, m, budget, r, selection="batched"))
    text = fn.lower(scores, old, jnp.float32(0.5)).compile().as_text()
    assert not re.findall(r"\bwhile\(", text) and not re.findall(r"\bconditional\(", text)
