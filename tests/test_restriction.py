"""Short restriction against a brute-force numpy reference of the restricted mask refresh."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import restricted_refresh, topk_mask

import jackpots_jax as jj


def _setup(seed, shapes=((40, 30), (3, 3, 4, 8), (5, 1)), sparsity=0.8):
    rng = np.random.default_rng(seed)
    params = {f"l{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    budget = jj.layer_budgets(params, sparsity, rule="uniform", dense=())
    return rng, params, budget


@functools.cache
def _jitted_refresh(budget_items):
    """One compiled refresh per budget, the rate traced: every rate and seed reuses it."""
    budget = dict(budget_items)
    return jax.jit(lambda s, m, rate: jj.refresh_masks(s, m, budget, rate))


@pytest.mark.parametrize("rate", [1.0, 0.7, 0.3, 0.1, 0.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refresh_matches_brute_force(rate, seed):
    rng, params, budget = _setup(seed)
    scores, masks = jj.init_scores(params, budget, "magnitude")
    # Tied new scores (two-level plus a few distinct values) exercise every tie rule.
    new = {
        k: np.where(rng.random(v.shape) < 0.2, rng.choice([0.99, 1.0, 1.01], v.shape), v).astype(
            np.float32
        )
        for k, v in scores.items()
        if v is not None
    }
    refresh = _jitted_refresh(tuple(sorted(budget.items())))
    got = refresh(new, masks, jnp.float32(rate))
    for k in new:
        keep = new[k].size - budget[k]
        expected, c, n = restricted_refresh(new[k], masks[k], keep, rate)
        np.testing.assert_array_equal(np.asarray(got[k]), expected)
        flips = int(np.sum(np.asarray(got[k]) != np.asarray(masks[k])))
        assert flips == 2 * n and n == (c if rate == 1 else math.ceil(round(rate * c, 9)))


def test_rate_one_equals_topk_with_current():
    rng, params, budget = _setup(3)
    scores, masks = jj.init_scores(params, budget, "weight_magnitude")
    new = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in scores.items()}
    full = jj.refresh_masks(new, masks, budget, 1.0)
    top = jj.topk_masks(new, budget, current=masks)
    for k in new:
        np.testing.assert_array_equal(full[k], top[k])
        np.testing.assert_array_equal(full[k], topk_mask(new[k], new[k].size - budget[k], masks[k]))


def test_in_optax_chain_under_jit_counts_never_change():
    rng, params, budget = _setup(4)
    scores, masks0 = jj.init_scores(params, budget, "magnitude")
    steps = 200
    tx = optax.chain(
        optax.add_decayed_weights(5e-4),
        optax.sgd(0.1, momentum=0.9),
        jj.short_restriction(budget, rate=jj.schedules.cosine(steps)),
    )
    opt_state = tx.init(scores)
    for k in masks0:
        np.testing.assert_array_equal(jj.current_masks(opt_state)[k], masks0[k])

    @jax.jit
    def step(scores, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, scores)
        return optax.apply_updates(scores, updates), opt_state

    keep = {k: v.size - budget[k] for k, v in params.items()}
    total_flips = 0
    prev = masks0
    for _ in range(steps):
        grads = {
            k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()
        }
        scores, opt_state = step(scores, opt_state, grads)
        masks = jj.current_masks(opt_state)
        for k in masks:
            assert int(masks[k].sum()) == keep[k]
        total_flips += int(jj.mask_churn(prev, masks)["total"])
        prev = masks
    assert total_flips > 0
    assert int(opt_state[-1].count) == steps
    # The cosine rate is 0 at the last step: the final update made no swap.
    # (Verified separately below with a schedule that switches off.)


def test_rate_is_evaluated_at_the_count_before_the_update():
    rng, params, budget = _setup(5)
    scores, masks0 = jj.init_scores(params, budget, "magnitude")
    tx = optax.chain(
        optax.sgd(1.0), jj.short_restriction(budget, rate=lambda t: jnp.where(t == 0, 1.0, 0.0))
    )
    state = tx.init(scores)
    grads = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}
    updates, state = tx.update(grads, state, scores)
    new = optax.apply_updates(scores, updates)
    # Step 0: rate 1, the masks are the exact top-k of the new scores.
    for k in new:
        np.testing.assert_array_equal(
            jj.current_masks(state)[k], topk_mask(new[k], new[k].size - budget[k], masks0[k])
        )
    before = jj.current_masks(state)
    updates, state = tx.update(grads, state, new)
    # Step 1: rate 0, no swap at all.
    assert int(jj.mask_churn(before, jj.current_masks(state))["total"]) == 0
    # The updates pass through unchanged.
    np.testing.assert_allclose(updates["l0"], -np.asarray(grads["l0"]))


def test_schedules_follow_their_formulas():
    t = np.arange(0, 12)
    np.testing.assert_allclose(
        [jj.schedules.cosine(10)(i) for i in t],
        0.5 * (1 + np.cos(np.pi * np.minimum(t, 10) / 10)),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        [jj.schedules.polynomial(10, 2.0)(i) for i in t],
        (1 - np.minimum(t, 10) / 10) ** 2,
        atol=1e-6,
    )
    assert float(jj.schedules.constant(0.25)(7)) == 0.25


def test_errors():
    _, params, budget = _setup(6)
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=r"`rate` must be in \[0, 1\]"):
            jj.short_restriction(budget, rate=bad)
    with pytest.raises(ValueError, match=r"`rate\(0\)` must be in \[0, 1\]"):
        jj.short_restriction(budget, rate=lambda t: 2.0)
    with pytest.raises(ValueError, match="`total_steps` must be a positive int"):
        jj.schedules.cosine(0)
    with pytest.raises(ValueError, match="unknown `rank_by`"):
        jj.short_restriction(budget, rank_by="sign")
    tx = jj.short_restriction(budget)
    scores, _ = jj.init_scores(params, budget)
    state = tx.init(scores)
    with pytest.raises(ValueError, match="needs the current scores"):
        tx.update(scores, state)
    with pytest.raises(ValueError, match="exactly one short_restriction state"):
        jj.current_masks(optax.sgd(0.1).init(scores))
    with pytest.raises(ValueError, match="structure"):
        tx.init({"l0": scores["l0"]})


def test_replace_masks():
    _, params, budget = _setup(7)
    scores, masks = jj.init_scores(params, budget, "random", jax.random.key(0))
    tx = optax.chain(optax.sgd(0.1), jj.short_restriction(budget))
    state = tx.init(scores)
    other = jax.tree.map(lambda m: ~m, masks)
    replaced = jj.replace_masks(state, other)
    np.testing.assert_array_equal(jj.current_masks(replaced)["l0"], other["l0"])


@pytest.mark.slow
@pytest.mark.parametrize("rate", [1.0, 0.5, 0.0])
def test_refresh_of_large_leaves_matches_brute_force(rate):
    # Leaves of 8192 entries or more refresh among the entries near the threshold only, and fall
    # back to the whole leaf when too many move or the masks have the wrong count.
    n, keep = 20_000, 2_000
    rng = np.random.default_rng(7)
    base = rng.standard_normal(n).astype(np.float32)
    old = topk_mask(base, keep)
    wrong = old.copy()
    wrong[np.flatnonzero(~old)[:3]] = True
    cases = {
        "small_drift": base + 0.01 * rng.standard_normal(n).astype(np.float32),
        "large_drift": rng.standard_normal(n).astype(np.float32),
        "ties": np.where(rng.random(n) < 0.5, np.round(base, 1), base).astype(np.float32),
        "sorted": np.sort(base + 0.01 * rng.standard_normal(n).astype(np.float32)),
    }
    refresh = _jitted_refresh((("w", n - keep),))
    for name, new in cases.items():
        masks = {"sorted": topk_mask(np.sort(base), keep)}.get(name, old)
        for m in (masks, wrong):
            got = np.asarray(refresh({"w": new}, {"w": m}, jnp.float32(rate))["w"])
            # With the wrong count, rate 1 still gives the exact top-k (as `topk_masks` does); a
            # lower rate makes only swaps, so the count stays what it was.
            expected = (
                topk_mask(new, keep, m) if rate == 1 else restricted_refresh(new, m, keep, rate)[0]
            )
            np.testing.assert_array_equal(got, expected, err_msg=name)
