"""Tests of the per-device search, train and eval steps (single device)."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jackpots_jax as jj
from jackpots_jax.step import (
    SearchState,
    create_search_state,
    create_train_state,
    cross_entropy,
    eval_step,
    search_optimizer,
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
    state = create_search_state(params, stats, scores, tx, jax.random.PRNGKey(1))
    return model, budget, tx, state, {"image": x, "label": y}


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
    model, budget, tx, state, _ = setup(bn=True, rate=jj.schedules.cosine(10))
    step = jax.jit(lambda s, b: search_step(s, b, model=model, tx=tx, budget=budget))
    params0 = jax.tree.map(np.asarray, state.params)
    stats0 = jax.tree.map(np.asarray, state.batch_stats)
    scores0 = jax.tree.map(np.asarray, state.scores)
    churn = 0
    for b in batches(4):
        state, metrics = step(state, b)
        churn += int(metrics["churn"])
        for layer in ("conv1", "conv2"):
            kept = int(np.sum(state.masks[layer]["kernel"]))
            size = state.params[layer]["kernel"].size
            assert kept == size - budget[layer]["kernel"]
    assert isinstance(state, SearchState)
    assert int(state.step) == 4
    jax.tree.map(np.testing.assert_array_equal, params0, jax.tree.map(np.asarray, state.params))
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, np.asarray(b)), stats0, state.batch_stats
    )
    assert all(jax.tree.leaves(changed))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), scores0, state.scores)
    assert all(jax.tree.leaves(changed))
    assert np.isfinite(float(metrics["loss"]))
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_score_gradient_equals_weight_gradient_times_w():
    model, budget, tx, state, batch = setup(bn=True)
    masks = state.masks

    # Capture the gradient the step feeds the optimiser: an identity-free SGD with lr 1, no
    # momentum, no decay, so update = -grad.
    plain = optax.chain(optax.sgd(1.0), jj.short_restriction(budget))
    st = create_search_state(state.params, state.batch_stats, state.scores, plain, state.rng)
    new, _ = jax.jit(partial(search_step, model=model, tx=plain, budget=budget))(st, batch)
    grads = jax.tree.map(lambda a, b: a - b, st.scores, new.scores)

    # Independent: d loss / d (effective weights), times W.
    def loss_of_weights(weights):
        logits, _ = model.apply(
            {"params": weights, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(cross_entropy(logits, batch["label"]))

    effective = jj.apply_masks(state.params, masks)
    gw = jax.grad(loss_of_weights)(effective)
    for path in (("conv1", "kernel"), ("conv2", "kernel")):
        g = grads[path[0]][path[1]]
        want = gw[path[0]][path[1]] * state.params[path[0]][path[1]]
        np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-7)
        # dense: pruned entries get gradients too
        assert np.count_nonzero(np.asarray(g)[~np.asarray(masks[path[0]][path[1]])]) > 0


def test_first_step_with_rate_one_is_topk_of_new_scores():
    model, budget, tx, state, batch = setup(bn=True)
    new, metrics = jax.jit(partial(search_step, model=model, tx=tx, budget=budget))(state, batch)
    want = jj.topk_masks(new.scores, budget, current=state.masks)
    jax.tree.map(np.testing.assert_array_equal, want, new.masks)
    assert int(metrics["churn"]) == int(jj.mask_churn(state.masks, new.masks)["total"])
    # Per layer: the entries whose mask differs, counted directly.
    for name, leaf in (("conv1/kernel", "conv1"), ("conv2/kernel", "conv2")):
        flipped = np.asarray(state.masks[leaf]["kernel"]) != np.asarray(new.masks[leaf]["kernel"])
        assert int(metrics["churn_per_layer"][name]) == int(flipped.sum())
    assert set(metrics["churn_per_layer"]) == {"conv1/kernel", "conv2/kernel"}


def test_eval_step_counts_only_valid_examples():
    model, budget, tx, state, batch = setup(bn=True)
    valid = np.arange(16) % 3 != 0
    labels = np.asarray(batch["label"])
    out = eval_step(
        state.params, state.batch_stats, state.masks, {**batch, "mask": valid}, model=model
    )
    logits = np.asarray(
        model.apply(
            {"params": jj.apply_masks(state.params, state.masks), "batch_stats": state.batch_stats},
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
    dense = eval_step(state.params, state.batch_stats, None, batch, model=model)
    assert int(dense["count"]) == 16


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
    out = eval_step({}, {}, None, batch, model=Logits())
    order = np.argsort(-logits, axis=-1)  # no ties among random normals
    assert int(out["correct"]) == (order[:, 0] == labels)[valid].sum()
    assert int(out["correct_top5"]) == (order[:, :5] == labels[:, None]).any(-1)[valid].sum()
    assert 0 < int(out["correct"]) < int(out["correct_top5"]) < int(valid.sum())


def test_train_step_updates_params():
    model, budget, _, state, batch = setup(bn=True)
    tx = optax.sgd(0.1, momentum=0.9)
    ts = create_train_state(state.params, state.batch_stats, tx)
    step = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx))
    losses = []
    for _ in range(5):
        ts, m = step(ts, batch)
        losses.append(float(m["loss"]))
    assert int(ts.step) == 5
    assert losses[-1] < losses[0]
