"""Ranking by |score|: the sign correction cannot be left out of a chain the user builds.

Worked by hand: with `rank_by='abs'` the straight-through gradient `g` is the gradient with
respect to `|S|`, so the gradient with respect to `S` is `sign(S) g`, and it must reach weight
decay and momentum already corrected.
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jackpots_jax as jj

S = {"w": jnp.array([[-2.0, 1.0], [0.5, -0.25]])}
G = {"w": jnp.array([[1.0, 1.0], [-1.0, -1.0]])}  # d loss / d|S|
BUDGET = {"w": 2}


def test_short_restriction_refuses_abs_without_the_correction():
    with pytest.raises(ValueError, match=r"abs_rank_gradients\(\).*sign_corrected=True"):
        jj.short_restriction(BUDGET, rank_by="abs")
    # The signed ranking needs no correction.
    jj.short_restriction(BUDGET, rank_by="score")


def test_a_hand_built_chain_with_the_link_moves_every_score_the_way_its_abs_should():
    lr, wd = 0.1, 0.5
    tx = optax.chain(
        jj.abs_rank_gradients(),
        optax.add_decayed_weights(wd),
        optax.sgd(lr),
        jj.short_restriction(BUDGET, rank_by="abs", sign_corrected=True),
    )
    state = tx.init(S)
    updates, state = tx.update(G, state, S)
    new = optax.apply_updates(S, updates)["w"]
    s, g = np.asarray(S["w"]), np.asarray(G["w"])
    want = s - lr * (np.sign(s) * g + wd * s)  # by hand
    np.testing.assert_allclose(np.asarray(new), want, rtol=1e-6)
    # A positive g (the loss grows with |S|) shrinks |S| whatever the sign of S.
    assert np.all((np.abs(np.asarray(new)) < np.abs(s))[g > 0])
    # The masks: the top 2 of |new scores|.
    order = np.argsort(-np.abs(np.asarray(new)).ravel(), kind="stable")[:2]
    want_mask = np.zeros(4, bool)
    want_mask[order] = True
    np.testing.assert_array_equal(np.asarray(jj.current_masks(state)["w"]).ravel(), want_mask)


def test_search_optimizer_is_that_chain():
    tx = jj.search_optimizer(
        BUDGET, learning_rate=0.1, momentum=0.0, weight_decay=0.5, total_steps=1, rank_by="abs"
    )
    updates, _ = tx.update(G, tx.init(S), S)
    s, g = np.asarray(S["w"]), np.asarray(G["w"])
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1 * (np.sign(s) * g + 0.5 * s))
