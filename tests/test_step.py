"""Tests of the per-device search, train, eval and BN steps (single device), Linen and NNX."""

from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jackpots_jax as jj
from jackpots_jax.restriction import search_optimizer
from jackpots_jax.step import (
    SearchState,
    bn_stats_step,
    create_search_state,
    create_train_state,
    cross_entropy,
    eval_step,
    linen_apply,
    search_step,
    train_step,
)


class TinyNet(nn.Module):
    """Two convs and a head; batch norm optional (off for exact data-parallel comparisons)."""

    bn: bool = True

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x)
        if self.bn:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
        x = nn.relu(x)
        x = nn.Conv(8, (3, 3), strides=(2, 2), use_bias=False, name="conv2")(x)
        if self.bn:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn2")(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        return nn.Dense(5, name="head")(x)


class Search(NamedTuple):
    """A TinyNet search: the model, its frozen params, budget, optimiser, state and a batch."""

    model: Any
    apply_fn: Any
    params: Any
    budget: Any
    tx: Any
    state: SearchState
    batch: dict


def setup(bn=True, sparsity=0.7, total_steps=10, rate=None, batch=16, seed=0, lr=0.1):
    model = TinyNet(bn=bn)
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(k[0], (batch, 8, 8, 2))
    y = jax.random.randint(k[1], (batch,), 0, 5)
    variables = model.init(k[2], x[:1])
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    budget = jj.layer_budgets(params, 0.7, "uniform")
    scores, _ = jj.init_scores(params, budget, "kaiming", key=k[3])
    tx = search_optimizer(budget, learning_rate=lr, total_steps=total_steps, rate=rate)
    state = create_search_state(scores, tx, batch_stats=stats, rng=jax.random.PRNGKey(1))
    return Search(model, linen_apply(model), params, budget, tx, state, {"image": x, "label": y})


def batches(n, batch=16, seed=0):
    out = []
    for i in range(n):
        k1, k2 = jax.random.split(jax.random.PRNGKey(100 + seed + i))
        out.append(
            {
                "image": jax.random.normal(k1, (batch, 8, 8, 2)),
                "label": jax.random.randint(k2, (batch,), 0, 5),
            }
        )
    return out


def test_only_scores_and_stats_change_and_budget_kept():
    run = setup(bn=True, rate=jj.schedules.cosine(10))
    state, params = run.state, run.params
    step = jax.jit(partial(search_step, apply_fn=run.apply_fn, tx=run.tx))
    params0 = jax.tree.map(np.asarray, params)
    stats0 = jax.tree.map(np.asarray, state.batch_stats)
    scores0 = jax.tree.map(np.asarray, state.scores)
    churn = 0
    for b in batches(4):
        state, metrics = step(state, params, b)
        churn += int(metrics["churn"])
        for layer in ("conv1", "conv2"):
            kept = int(np.sum(state.masks[layer]["kernel"]))
            size = params[layer]["kernel"].size
            assert kept == size - run.budget[layer]["kernel"]
    assert isinstance(state, SearchState)
    assert int(state.step) == 4
    jax.tree.map(np.testing.assert_array_equal, params0, jax.tree.map(np.asarray, params))
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, np.asarray(b)), stats0, state.batch_stats
    )
    assert all(jax.tree.leaves(changed))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), scores0, state.scores)
    assert all(jax.tree.leaves(changed))
    assert np.isfinite(float(metrics["loss"]))
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_the_state_holds_no_frozen_weights_and_can_be_donated():
    run = setup(bn=True)
    state_leaves = {id(x) for x in jax.tree.leaves(run.state)}
    assert not state_leaves & {id(x) for x in jax.tree.leaves(run.params)}
    assert {f.name for f in __import__("dataclasses").fields(SearchState)} == {
        "step",
        "scores",
        "opt_state",
        "batch_stats",
        "rng",
    }
    donated = jax.tree.map(jnp.copy, run.state)
    step = jax.jit(partial(search_step, apply_fn=run.apply_fn, tx=run.tx), donate_argnums=0)
    want, _ = jax.jit(partial(search_step, apply_fn=run.apply_fn, tx=run.tx))(
        run.state, run.params, run.batch
    )
    got, _ = step(donated, run.params, run.batch)
    jax.tree.map(np.testing.assert_array_equal, want, got)


def test_score_gradient_equals_weight_gradient_times_w():
    run = setup(bn=True)
    state, params, batch = run.state, run.params, run.batch
    masks = state.masks

    # Capture the gradient the step feeds the optimiser: an identity-free SGD with lr 1, no
    # momentum, no decay, so update = -grad.
    plain = optax.chain(optax.sgd(1.0), jj.short_restriction(run.budget))
    st = create_search_state(state.scores, plain, batch_stats=state.batch_stats, rng=state.rng)
    new, _ = jax.jit(partial(search_step, apply_fn=run.apply_fn, tx=plain))(st, params, batch)
    grads = jax.tree.map(lambda a, b: a - b, st.scores, new.scores)

    # Independent: d loss / d (effective weights), times W.
    def loss_of_weights(weights):
        logits, _ = run.model.apply(
            {"params": weights, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(cross_entropy(logits, batch["label"]))

    effective = jj.apply_masks(params, masks)
    gw = jax.grad(loss_of_weights)(effective)
    for path in (("conv1", "kernel"), ("conv2", "kernel")):
        g = grads[path[0]][path[1]]
        want = gw[path[0]][path[1]] * params[path[0]][path[1]]
        np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-7)
        # dense: pruned entries get gradients too
        assert np.count_nonzero(np.asarray(g)[~np.asarray(masks[path[0]][path[1]])]) > 0


def test_ranking_by_abs_chains_the_gradient_through_the_absolute_value():
    # Edge-popup ranks |S|: the straight-through gradient is dL/d|S|, so dL/dS = sign(S) * g * w
    # (what its PyTorch code computes through `scores.abs()`); without the sign a negative score
    # would move away from where the gradient sends |S|.
    run = setup(bn=True)
    state, params, batch = run.state, run.params, run.batch
    # Declared corrected without the link on purpose: its update is the raw g * w.
    plain = optax.chain(
        optax.sgd(1.0), jj.short_restriction(run.budget, rank_by="abs", sign_corrected=True)
    )
    st = create_search_state(state.scores, plain, batch_stats=state.batch_stats, rng=state.rng)
    new, _ = jax.jit(partial(search_step, apply_fn=run.apply_fn, tx=plain))(st, params, batch)
    grads = jax.tree.map(lambda a, b: a - b, st.scores, new.scores)  # g * w, same masks
    masks = st.masks
    tx = search_optimizer(
        run.budget, learning_rate=1.0, momentum=0.0, weight_decay=0.0, total_steps=10, rank_by="abs"
    )
    st = create_search_state(state.scores, tx, batch_stats=state.batch_stats, rng=state.rng)
    new, _ = jax.jit(partial(search_step, apply_fn=run.apply_fn, tx=tx))(st, params, batch)
    for layer in ("conv1", "conv2"):
        s = np.asarray(state.scores[layer]["kernel"])
        assert (s < 0).any() and (s > 0).any()  # Kaiming scores of both signs
        want = s - np.sign(s) * np.asarray(grads[layer]["kernel"])  # lr 1 at step 0
        # `grads` is a difference of scores of about 0.2: it carries their rounding, ~1.5e-8.
        np.testing.assert_allclose(
            np.asarray(new.scores[layer]["kernel"]), want, rtol=1e-6, atol=3e-8
        )
    # The masks are the top-k of |new scores|.
    want = jj.topk_masks(new.scores, run.budget, current=masks, rank_by="abs")
    jax.tree.map(np.testing.assert_array_equal, want, new.masks)


def test_first_step_with_rate_one_is_topk_of_new_scores():
    run = setup(bn=True)
    state = run.state
    step = jax.jit(partial(search_step, apply_fn=run.apply_fn, tx=run.tx))
    new, metrics = step(state, run.params, run.batch)
    want = jj.topk_masks(new.scores, run.budget, current=state.masks)
    jax.tree.map(np.testing.assert_array_equal, want, new.masks)
    assert int(metrics["churn"]) == int(jj.mask_churn(state.masks, new.masks)["total"])
    # Per layer: the entries whose mask differs, counted directly.
    for name, leaf in (("conv1/kernel", "conv1"), ("conv2/kernel", "conv2")):
        flipped = np.asarray(state.masks[leaf]["kernel"]) != np.asarray(new.masks[leaf]["kernel"])
        assert int(metrics["churn_per_layer"][name]) == int(flipped.sum())
    assert set(metrics["churn_per_layer"]) == {"conv1/kernel", "conv2/kernel"}


def test_eval_step_counts_only_valid_examples():
    run = setup(bn=True)
    state, params, batch = run.state, run.params, run.batch
    valid = np.arange(16) % 3 != 0
    labels = np.asarray(batch["label"])
    out = eval_step(
        params, state.batch_stats, state.masks, {**batch, "mask": valid}, apply_fn=run.apply_fn
    )
    logits = np.asarray(
        run.model.apply(
            {"params": jj.apply_masks(params, state.masks), "batch_stats": state.batch_stats},
            batch["image"],
        )
    )
    correct = (logits.argmax(-1) == labels)[valid].sum()
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    loss = -logp[np.arange(16), labels][valid].sum()
    assert int(out["count"]) == valid.sum()
    assert int(out["correct"]) == correct
    np.testing.assert_allclose(float(out["loss"]), loss, rtol=1e-5)
    dense = eval_step(params, state.batch_stats, None, batch, apply_fn=run.apply_fn)
    assert int(dense["count"]) == 16


def test_bn_stats_step_is_a_train_mode_forward_of_the_masked_weights():
    run = setup(bn=True)
    state, params, batch = run.state, run.params, run.batch
    got = bn_stats_step(params, state.batch_stats, state.masks, batch, apply_fn=run.apply_fn)
    _, updates = run.model.apply(
        {"params": jj.apply_masks(params, state.masks), "batch_stats": state.batch_stats},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
    )
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], got)
    # Momentum 0.9 from the initial (0, 1): the new mean is a tenth of the batch's mean.
    assert not np.allclose(np.asarray(got["bn1"]["mean"]), 0.0)


class Logits(nn.Module):
    """The "image" is the logits: lets a test choose them."""

    @nn.compact
    def __call__(self, x, train=False):
        return x


def test_eval_step_top1_and_top5_against_a_sort():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 64)
    valid = rng.random(64) < 0.8
    batch = {"image": logits, "label": labels, "mask": valid}
    out = eval_step({}, {}, None, batch, apply_fn=linen_apply(Logits()))
    order = np.argsort(-logits, axis=-1)  # no ties among random normals
    assert int(out["correct"]) == (order[:, 0] == labels)[valid].sum()
    assert int(out["correct_top5"]) == (order[:, :5] == labels[:, None]).any(-1)[valid].sum()
    assert 0 < int(out["correct"]) < int(out["correct_top5"]) < int(valid.sum())


def test_train_step_updates_params():
    run = setup(bn=True)
    tx = optax.sgd(0.1, momentum=0.9)
    ts = create_train_state(run.params, run.state.batch_stats, tx)
    step = jax.jit(partial(train_step, apply_fn=run.apply_fn, tx=tx))
    losses = []
    for _ in range(5):
        ts, m = step(ts, run.batch)
        losses.append(float(m["loss"]))
    assert int(ts.step) == 5
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------
# An NNX model through the same steps.


class TinyNNX(nnx.Module):
    """TinyNet in NNX: same layers, same names."""

    def __init__(self, rngs: nnx.Rngs, bn: bool = True):
        self.conv1 = nnx.Conv(2, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, momentum=0.9, rngs=rngs) if bn else None
        self.conv2 = nnx.Conv(4, 8, (3, 3), strides=(2, 2), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, momentum=0.9, rngs=rngs) if bn else None
        self.head = nnx.Linear(4 * 4 * 8, 5, rngs=rngs)

    def __call__(self, x):
        x = self.conv1(x)
        x = nnx.relu(self.bn1(x) if self.bn1 is not None else x)
        x = self.conv2(x)
        x = nnx.relu(self.bn2(x) if self.bn2 is not None else x)
        return self.head(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("bn", [True, False])
@pytest.mark.parametrize("pure", [True, False])
def test_nnx_model_searched_through_the_public_api(bn, pure):
    """An NNX module searched with `jj.engine.nnx_apply`: the same jackpot as its Linen twin.

    The NNX model's weights are loaded into TinyNet (same layer names, same numerics), so a search
    of each from the same scores must end with the same masks and scores; with `pure` the states
    are plain dicts (`nnx.to_pure_dict`), otherwise `nnx.State`s.
    """
    model = TinyNNX(nnx.Rngs(0), bn=bn)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    if pure:
        params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    budget = jj.layer_budgets(params, 0.7, "uniform")
    assert [n for n, b in jj._tree.named_leaves(budget) if b is not None] == [
        "conv1/kernel",
        "conv2/kernel",
    ]
    scores, _ = jj.init_scores(params, budget, "kaiming", key=jax.random.key(3))
    tx = jj.search_optimizer(budget, learning_rate=0.5, total_steps=4, rate=0.5)
    step = jax.jit(partial(jj.engine.search_step, apply_fn=jj.engine.nnx_apply(graphdef), tx=tx))
    state = jj.engine.create_search_state(scores, tx, batch_stats=stats)

    # The Linen twin, from the same numbers.
    linen = TinyNet(bn=bn)
    pure_params = params if pure else nnx.to_pure_dict(params)
    pure_stats = stats if pure else nnx.to_pure_dict(stats)
    twin_scores = scores if pure else nnx.to_pure_dict(scores)
    linen_tx = jj.search_optimizer(
        jj.layer_budgets(pure_params, 0.7, "uniform"), learning_rate=0.5, total_steps=4, rate=0.5
    )
    linen_step = jax.jit(
        partial(jj.engine.search_step, apply_fn=jj.engine.linen_apply(linen), tx=linen_tx)
    )
    twin = jj.engine.create_search_state(twin_scores, linen_tx, batch_stats=pure_stats)
    churn = 0
    for b in batches(3):
        state, metrics = step(state, params, b)
        twin, twin_metrics = linen_step(twin, pure_params, b)
        churn += int(metrics["churn"])
        assert int(metrics["churn"]) == int(twin_metrics["churn"])
        np.testing.assert_allclose(float(metrics["loss"]), float(twin_metrics["loss"]), rtol=1e-6)
    assert churn > 0  # the masks moved, so equal masks mean something
    as_dict = (lambda t: t) if pure else nnx.to_pure_dict
    jax.tree.map(np.testing.assert_array_equal, as_dict(state.masks), twin.masks)
    jax.tree.map(
        partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
        as_dict(state.scores),
        twin.scores,
    )
    if bn:  # re-estimated running statistics, returned in the form they were given
        assert isinstance(state.batch_stats, dict if pure else nnx.State)
        jax.tree.map(
            partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
            as_dict(state.batch_stats),
            twin.batch_stats,
        )
    out = jj.engine.eval_step(
        params, state.batch_stats, state.masks, b, apply_fn=jj.engine.nnx_apply(graphdef)
    )
    want = jj.engine.eval_step(
        pure_params, twin.batch_stats, twin.masks, b, apply_fn=jj.engine.linen_apply(linen)
    )
    assert int(out["correct"]) == int(want["correct"])
