"""Restriction policies beyond the rate (`first_order_check`) against numpy brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import first_order_pairs, restricted_refresh

import jackpots_jax as jj
from jackpots_jax.restriction import first_order_check


def _setup(seed, shapes=((40, 30), (3, 3, 4, 8), (5, 1)), sparsity=0.8):
    rng = np.random.default_rng(seed)
    params = {f"l{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    budget = jj.layer_budgets(params, sparsity, rule="uniform", dense=())
    return rng, params, budget


def test_hand_worked_pairs():
    # Scores after the update: entries 0 and 1 were kept, 2 and 3 pruned; the top-2 is {2, 3}.
    # Revivals by score: 3 (0.9) then 2 (0.8); removals by score: 1 (0.1) then 0 (0.2).
    # Pair (3, 1): g_3 - g_1 = -1 - 0 < 0, made. Pair (2, 0): g_2 - g_0 = 1 - 0 > 0, not made.
    values = jnp.array([0.2, 0.1, 0.8, 0.9])
    old = jnp.array([True, True, False, False])
    proposed = jnp.array([False, False, True, True])
    grads = jnp.array([0.0, 0.0, 1.0, -1.0])
    got = jj.restriction.first_order_pairs(values, old, proposed, grads)
    np.testing.assert_array_equal(got, [True, False, False, True])
    np.testing.assert_array_equal(got, first_order_pairs(values, old, proposed, grads))


@pytest.mark.parametrize("seed", range(6))
def test_pairs_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, keep = 300, 60
    # Few distinct score values: ties inside the revivals and the removals.
    values = rng.choice(np.linspace(-1, 1, 9), n).astype(np.float32)
    old = np.zeros(n, bool)
    old[rng.choice(n, keep, replace=False)] = True
    proposed, _, _ = restricted_refresh(values, old, keep, rng.choice([1.0, 0.5, 0.2]))
    grads = rng.choice(np.linspace(-1, 1, 5), n).astype(np.float32)  # ties in g * w too
    expected = first_order_pairs(values, old, proposed, grads)
    swaps = int(np.sum(proposed & ~old))
    # Compacted swaps (the default capacity holds the leaf), and with a capacity below the
    # number of swaps: the whole leaf sorted; the same pairs either way.
    for capacity in (None, max(swaps - 1, 1), swaps):
        pairs = jax.jit(lambda *a, c=capacity: jj.restriction.first_order_pairs(*a, capacity=c))
        got = pairs(values, old, proposed, grads)
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=str(capacity))
        assert int(np.sum(got)) == keep


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_check_in_the_search_optimizer_matches_brute_force(rate):
    rng, params, budget = _setup(1)
    scores, masks = jj.init_scores(params, budget, "weight_magnitude")
    inner = jj.search_optimizer(
        budget, learning_rate=1.0, weight_decay=0.0, total_steps=10, rate=rate
    )
    tx = first_order_check(inner, budget)
    state = tx.init(scores)
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    updates, state = jax.jit(tx.update)(grads, state, scores)
    new_scores = optax.apply_updates(scores, updates)
    got = jj.current_masks(state)
    for k in params:
        keep = params[k].size - budget[k]
        # SGD at lr 1 (step 0 of the cosine) and no momentum history: new = s - g.
        np.testing.assert_allclose(new_scores[k], scores[k] - grads[k], rtol=1e-6)
        proposed, c, n = restricted_refresh(new_scores[k], masks[k], keep, rate)
        expected = first_order_pairs(new_scores[k], masks[k], proposed, grads[k])
        np.testing.assert_array_equal(np.asarray(got[k]).ravel(), expected, err_msg=k)
        assert int(np.sum(got[k])) == keep
        assert c > 0  # the step proposed swaps, so the check had something to decide


def test_only_swaps_predicted_to_lower_the_loss_are_made():
    # An update that moves every kept score below every pruned one (whatever the gradient), so
    # the restriction proposes to swap every entry; the gradient alone decides what is made.
    _, params, budget = _setup(2)
    scores, masks = jj.init_scores(params, budget, "magnitude")
    shift = {k: jnp.where(masks[k], -1.0, 1.0) for k in params}
    move = optax.GradientTransformation(
        lambda p: optax.EmptyState(), lambda u, s, p=None: (shift, s)
    )
    tx = first_order_check(optax.chain(move, jj.short_restriction(budget)), budget)
    state = tx.init(scores)
    # The same g * w everywhere predicts no change for any pair: nothing is swapped.
    flat = {k: jnp.ones(v.shape) for k, v in params.items()}
    _, same = tx.update(flat, state, scores)
    assert int(jj.mask_churn(masks, jj.current_masks(same))["total"]) == 0
    # g * w lower at every revival than at every removal: every proposed swap is made.
    helps = {k: jnp.where(masks[k], 1.0, -1.0) for k in params}
    _, made = tx.update(helps, state, scores)
    plain = optax.chain(move, jj.short_restriction(budget))
    _, plain_state = plain.update(helps, plain.init(scores), scores)
    for k in params:
        np.testing.assert_array_equal(jj.current_masks(made)[k], jj.current_masks(plain_state)[k])
    assert int(jj.mask_churn(masks, jj.current_masks(made))["total"]) > 0


def test_errors():
    _, params, budget = _setup(3)
    with pytest.raises(ValueError, match="unknown `rank_by`"):
        first_order_check(jj.short_restriction(budget), budget, rank_by="sign")
    tx = first_order_check(jj.short_restriction(budget), budget)
    scores, _ = jj.init_scores(params, budget)
    with pytest.raises(ValueError, match="needs the current scores"):
        tx.update(scores, tx.init(scores))
    # Pairs of single weights only: a structured budget is refused, naming the leaf and pattern.
    nm = jj.layer_budgets(params, 0.5, rule="uniform", dense=(), pattern="2:4", indivisible="dense")
    with pytest.raises(ValueError, match=r"'l0'.*'2:4'.*unstructured budgets only"):
        first_order_check(jj.short_restriction(nm), nm)
