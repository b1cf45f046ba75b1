"""`search_optimizer(optimizer='adam')`: Adam on the scores, against Adam written in numpy.

Adam (Kingma & Ba 2015) with the search's cosine schedule and coupled decay: `g <- g + wd s`,
`m <- b1 m + (1 - b1) g`, `v <- b2 v + (1 - b2) g^2`, `s <- s - lr_t m_hat / (sqrt(v_hat) + eps)`
with `m_hat = m / (1 - b1^t)`, `v_hat = v / (1 - b2^t)` and `lr_t` the cosine from `lr` to 0 over
the search; the restriction then keeps the top scores (rate 1: every proposed swap).
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jackpots_jax as jj


def _numpy_adam(s, grads, *, lr, b1, wd, total, b2=0.999, eps=1e-8):
    m, v = np.zeros_like(s), np.zeros_like(s)
    for t, g in enumerate(grads, start=1):
        g = g + wd * s
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        lr_t = lr * 0.5 * (1 + np.cos(np.pi * (t - 1) / total))
        s = s - lr_t * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return s


def test_adam_on_the_scores_matches_numpy_and_keeps_the_top_scores():
    rng = np.random.default_rng(0)
    s0 = rng.normal(size=(6, 4)).astype(np.float32)
    grads = [rng.normal(size=(6, 4)).astype(np.float32) for _ in range(5)]
    budget = {"w": 10}
    tx = jj.search_optimizer(
        budget, learning_rate=0.3, momentum=0.8, weight_decay=0.1, total_steps=5, optimizer="adam"
    )
    scores, state = {"w": jnp.asarray(s0)}, None
    state = tx.init(scores)
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g)}, state, scores)
        scores = optax.apply_updates(scores, updates)
    want = _numpy_adam(s0.astype(np.float64), grads, lr=0.3, b1=0.8, wd=0.1, total=5)
    np.testing.assert_allclose(np.asarray(scores["w"]), want, rtol=1e-5, atol=2e-5)  # float32
    # Each score moved by about the learning rate per step, whatever its gradient's scale: a
    # gradient 1000 times larger moves the scores the same (Adam is scale-free; SGD is not).
    big = jj.search_optimizer(
        budget, learning_rate=0.3, momentum=0.8, weight_decay=0.0, total_steps=5, optimizer="adam"
    )
    small = jj.search_optimizer(
        budget, learning_rate=0.3, momentum=0.8, weight_decay=0.0, total_steps=5, optimizer="adam"
    )
    g = jnp.asarray(grads[0])
    u_big, _ = big.update({"w": 1000 * g}, big.init(scores), scores)
    u_small, _ = small.update({"w": g}, small.init(scores), scores)
    np.testing.assert_allclose(np.asarray(u_big["w"]), np.asarray(u_small["w"]), rtol=1e-4)
    # The masks: the 24 - 10 highest scores.
    order = np.argsort(-np.asarray(scores["w"]).ravel(), kind="stable")[:14]
    mask = np.zeros(24, bool)
    mask[order] = True
    np.testing.assert_array_equal(np.asarray(jj.current_masks(state)["w"]).ravel(), mask)


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match=r"optimizer is 'rmsprop'; allowed: 'sgd', 'adam'"):
        jj.search_optimizer({"w": 1}, total_steps=1, optimizer="rmsprop")
