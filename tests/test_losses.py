"""Loss functions of the steps: today's classification numbers bit for bit, custom losses against
PyTorch, weighted per-token losses and metrics exact across devices (8 CPU devices)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_step import setup

import jackpots_jax as jj
from jackpots_jax.losses import LossTerms, classification, next_token
from jackpots_jax.parallel import data_parallel, make_mesh, replicate, shard_batch
from jackpots_jax.step import create_train_state, eval_step, search_step, train_step

try:  # the PyTorch references only: the rest of this file runs without it
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs PyTorch (pip install torch==2.13.0)")

# ---------------------------------------------------------------------------------------------
# Classification: the arithmetic of the steps before they took a loss function.


def reference_search_step(state, params, batch, *, apply_fn, tx, label_smoothing=0.0):
    """The search step as it was written: mean cross-entropy over the batch, no loss function."""
    old_masks = jj.current_masks(state.opt_state)

    def loss(scores):
        weights = jj.masked_weights(params, scores, old_masks)
        logits, stats = apply_fn(weights, state.batch_stats, batch["image"], True)
        logits = logits.astype(jnp.float32)
        if label_smoothing:
            targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], 5), label_smoothing)
            per_example = optax.softmax_cross_entropy(logits, targets)
        else:
            per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return jnp.mean(per_example), (logits, stats)

    (value, (logits, stats)), grads = jax.value_and_grad(loss, has_aux=True)(state.scores)
    updates, opt_state = tx.update(grads, state.opt_state, state.scores)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    new = state.replace(
        step=state.step + 1,
        scores=optax.apply_updates(state.scores, updates),
        opt_state=opt_state,
        batch_stats=stats,
        rng=jax.random.split(state.rng)[0],
    )
    return new, {"loss": value, "accuracy": accuracy}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_classification_search_and_train_steps_are_bit_for_bit_the_old_arithmetic(
    label_smoothing,
):
    run = setup(bn=True, rate=0.5, lr=5.0)
    kw = dict(apply_fn=run.apply_fn, tx=run.tx)
    loss_fn = None if label_smoothing == 0 else classification(label_smoothing)
    new = jax.jit(partial(search_step, loss_fn=loss_fn, **kw))
    old = jax.jit(partial(reference_search_step, label_smoothing=label_smoothing, **kw))
    a = b = run.state
    churn = 0
    for i in range(3):
        batch = {**run.batch, "image": run.batch["image"] * (1 + i)}
        a, metrics = new(a, run.params, batch)
        b, want = old(b, run.params, batch)
        assert_trees_equal(a, b)
        np.testing.assert_array_equal(metrics["loss"], want["loss"])
        np.testing.assert_array_equal(metrics["accuracy"], want["accuracy"])
        churn += int(metrics["churn"])
    assert churn > 0  # the masks moved: the comparison covers the refresh

    # Dense training: the same, with the params differentiated.
    tx = optax.sgd(0.1, momentum=0.9)
    variables = run.model.init(jax.random.PRNGKey(3), run.batch["image"][:1])
    start = create_train_state(variables["params"], variables["batch_stats"], tx)

    def reference_train_step(state, batch):
        def loss(params):
            logits, stats = run.apply_fn(params, state.batch_stats, batch["image"], True)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return jnp.mean(ce), (logits, stats)

        (value, (logits, stats)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
        new = state.replace(step=state.step + 1, params=params, batch_stats=stats)
        return new.replace(opt_state=opt_state), {"loss": value, "accuracy": accuracy}

    a, metrics = jax.jit(partial(train_step, apply_fn=run.apply_fn, tx=tx))(start, run.batch)
    b, want = jax.jit(reference_train_step)(start, run.batch)
    assert_trees_equal(a, b)
    assert_trees_equal(metrics, want)


def test_classification_eval_counts_are_the_old_arithmetic():
    run = setup(bn=True)
    valid = np.arange(16) < 13
    batch = {**run.batch, "mask": valid}

    def reference_eval(params, batch_stats, masks, batch):
        """The evaluation as it was written, cross-entropy and counts inline."""
        logits, _ = run.apply_fn(jj.apply_masks(params, masks), batch_stats, batch["image"], False)
        labels, valid = batch["label"], batch["mask"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) & valid, dtype=jnp.int32),
            "loss": jnp.sum(jnp.where(valid, ce, 0.0), dtype=jnp.float32),
            "count": jnp.sum(valid, dtype=jnp.int32),
        }

    args = (run.params, run.state.batch_stats, run.state.masks, batch)
    out = jax.jit(partial(eval_step, apply_fn=run.apply_fn))(*args)
    want = jax.jit(reference_eval)(*args)
    assert set(out) == {"correct", "correct_top5", "loss", "count"}
    for name in want:
        assert out[name].dtype == want[name].dtype
        np.testing.assert_array_equal(out[name], want[name])
    # Top-5 against a sort.
    logits, _ = run.apply_fn(
        jj.apply_masks(run.params, run.state.masks), *args[1:2], batch["image"], False
    )
    order = np.argsort(-np.asarray(logits), axis=-1)
    labels = np.asarray(batch["label"])
    assert int(out["correct_top5"]) == (order[:, :5] == labels[:, None]).any(-1)[valid].sum()


# ---------------------------------------------------------------------------------------------
# A tiny language model and a stash optimiser that keeps the gradients it is given.

V, D, T = 11, 6, 5


def lm_params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "embed": {"embedding": jax.random.normal(k[0], (V, D))},
        "proj": {"kernel": jax.random.normal(k[1], (D, D)) / np.sqrt(D)},
        "head": {"kernel": jax.random.normal(k[2], (D, V)) / np.sqrt(D)},
    }


def lm_apply(params, batch_stats, tokens, train):
    h = jnp.tanh(params["embed"]["embedding"][tokens] @ params["proj"]["kernel"])
    return h @ params["head"]["kernel"], batch_stats


def torch_lm_loss(params, batch):
    """The weighted mean token NLL in PyTorch (float64), and its parameters."""
    p = {k: torch.tensor(np.asarray(v[next(iter(v))], np.float64), requires_grad=True)
         for k, v in params.items()}  # fmt: skip
    h = torch.tanh(p["embed"][torch.tensor(np.asarray(batch["inputs"]))] @ p["proj"])
    logits = (h @ p["head"]).reshape(-1, V)
    targets = torch.tensor(np.asarray(batch["targets"]), dtype=torch.long).reshape(-1)
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    w = torch.tensor(np.asarray(batch["weights"], np.float64)).reshape(-1)
    loss = (nll * w).sum() / w.sum()
    loss.backward()
    return float(loss.detach()), {k: v.grad.numpy() for k, v in p.items()}


def stash():
    """An optax transform that stores the gradients in its state and updates nothing."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


def lm_batch(rows, seed=1):
    """`rows` sequences; row i has `counts[i]` valid tokens (weights 1 then 0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (rows, T + 1)).astype(np.int32)
    counts = rng.permutation(np.arange(rows) % (T + 1))  # 0..T valid tokens, unequal per row
    weights = (np.arange(T)[None, :] < counts[:, None]).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


def hand_weighted_nll(logits, batch):
    """A loss written outside the library: per-token NLL from log-softmax, weighted."""
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return LossTerms(loss=nll, weights=batch["weights"])


@needs_torch
@pytest.mark.parametrize("loss_fn", [next_token(), hand_weighted_nll], ids=["next_token", "hand"])
def test_weighted_token_loss_gradients_match_pytorch(loss_fn):
    params, batch = lm_params(), lm_batch(4)
    state = create_train_state(params, {}, stash())
    step = partial(train_step, apply_fn=lm_apply, tx=stash(), loss_fn=loss_fn, inputs="inputs")
    new, metrics = jax.jit(step)(state, batch)
    want_loss, want_grads = torch_lm_loss(params, batch)
    np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=1e-5)
    for name in params:
        grads = np.asarray(new.opt_state[name][next(iter(params[name]))])
        np.testing.assert_allclose(grads, want_grads[name], rtol=1e-4, atol=1e-6)


def hand_smoothed(logits, batch, eps=0.2):
    """Label smoothing written outside the library (the example of docs/engine.md)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, batch["label"][:, None], -1)[:, 0]
    return LossTerms(loss=(1 - eps) * nll - eps * logp.mean(-1))


@needs_torch
@pytest.mark.parametrize(
    "loss_fn", [classification(0.2), hand_smoothed], ids=["classification", "hand"]
)
def test_label_smoothing_gradients_match_pytorch(loss_fn):
    run = setup(bn=False)
    state = create_train_state(run.params, {}, stash())
    step = partial(train_step, apply_fn=run.apply_fn, tx=stash(), loss_fn=loss_fn)
    new, metrics = jax.jit(step)(state, run.batch)

    # The logits' gradient through PyTorch's smoothed cross-entropy, pulled back through the net.
    logits, vjp = jax.vjp(lambda p: run.apply_fn(p, {}, run.batch["image"], True)[0], run.params)
    t_logits = torch.tensor(np.asarray(logits, np.float64), requires_grad=True)
    labels = torch.tensor(np.asarray(run.batch["label"]), dtype=torch.long)
    loss = torch.nn.functional.cross_entropy(t_logits, labels, label_smoothing=0.2)
    loss.backward()
    (want,) = vjp(jnp.asarray(t_logits.grad.numpy(), jnp.float32))
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    jax.tree.map(partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-7), new.opt_state, want)


# ---------------------------------------------------------------------------------------------
# Unequal numbers of valid tokens per device: the global sums, not means of per-device means.


def numpy_token_figures(params, batch, valid_rows):
    logits = np.asarray(lm_apply(params, {}, batch["inputs"], False)[0], np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    w = batch["weights"] * valid_rows[:, None]
    correct = logits.argmax(-1) == batch["targets"]
    return {"loss": (nll * w).sum(), "count": w.sum(), "correct": (correct * w).sum()}, nll


def test_token_loss_metrics_and_eval_are_exact_across_8_devices():
    assert jax.device_count() == 8
    params, batch = lm_params(2), lm_batch(16, seed=3)
    counts = batch["weights"].sum(1)
    per_device = counts.reshape(8, 2).sum(1)
    assert per_device.min() < per_device.max()  # unequal shares of valid tokens
    kw = dict(apply_fn=lm_apply, loss_fn=next_token(), inputs="inputs")

    # The numpy figures: the global weighted mean, which a mean of per-device means is not.
    sums, nll = numpy_token_figures(params, batch, np.ones(16))
    want_loss = sums["loss"] / sums["count"]
    w = batch["weights"].reshape(8, -1)
    device_means = [
        (n * x).sum() / max(x.sum(), 1) for n, x in zip(nll.reshape(8, -1), w, strict=True)
    ]
    assert abs(np.mean(device_means) - want_loss) > 1e-3

    train = partial(train_step, tx=stash(), **kw)
    state = create_train_state(params, {}, stash())
    one, one_metrics = jax.jit(train)(state, batch)
    np.testing.assert_allclose(float(one_metrics["loss"]), want_loss, rtol=1e-5)
    np.testing.assert_allclose(
        float(one_metrics["accuracy"]), sums["correct"] / sums["count"], rtol=1e-6
    )
    mesh = make_mesh(8)
    for backend in ("shard_map", "pmap"):
        run = data_parallel(train, mesh=mesh, backend=backend)
        data = shard_batch(batch, mesh) if backend == "shard_map" else batch
        start = replicate(state, mesh) if backend == "shard_map" else state
        got, metrics = run(start, data)
        for name in ("loss", "accuracy"):
            np.testing.assert_allclose(float(metrics[name]), float(one_metrics[name]), rtol=1e-6)
        jax.tree.map(
            partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
            jax.tree.map(np.asarray, got.opt_state),
            one.opt_state,
        )

    # The search step: the same masks on 1 and 8 devices.
    budget = jj.layer_budgets(params, 0.5, "uniform")
    scores, _ = jj.init_scores(params, budget, "kaiming", key=jax.random.PRNGKey(4))
    tx = jj.search_optimizer(budget, learning_rate=50.0, total_steps=4)
    search = partial(search_step, tx=tx, **kw)
    s1 = jj.engine.create_search_state(scores, tx)
    s8 = replicate(s1, mesh)
    step8 = data_parallel(search, mesh=mesh, donate_argnums=0)
    for _ in range(2):
        s1, m1 = jax.jit(search)(s1, params, batch)
        s8, m8 = step8(s8, replicate(params, mesh), shard_batch(batch, mesh))
        np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-6)
    assert int(m1["churn"]) > 0
    jax.tree.map(np.testing.assert_array_equal, s1.masks, jax.tree.map(np.asarray, s8.masks))

    # Evaluation: summed NLL and token count (padded rows count nowhere), so the perplexity of
    # the whole batch is exact.
    valid_rows = np.arange(16) < 13
    padded = {**batch, "mask": valid_rows}
    sums, _ = numpy_token_figures(params, batch, valid_rows.astype(np.float64))
    one = jax.jit(partial(eval_step, **kw))(params, {}, None, padded)
    run = data_parallel(eval_step, mesh=mesh, **kw)
    eight = run(replicate(params, mesh), {}, None, shard_batch(padded, mesh))
    for out in (one, eight):
        assert set(out) == {"loss", "count", "correct"}
        assert float(out["count"]) == sums["count"]
        assert float(out["correct"]) == sums["correct"]
        np.testing.assert_allclose(float(out["loss"]), sums["loss"], rtol=1e-5)
    np.testing.assert_allclose(
        np.exp(float(eight["loss"]) / float(eight["count"])),
        np.exp(sums["loss"] / sums["count"]),
        rtol=1e-5,
    )


def test_inputs_by_function_and_a_missing_key_is_named():
    params, batch = lm_params(), lm_batch(4)
    kw = dict(apply_fn=lm_apply, loss_fn=next_token())
    by_key = eval_step(params, {}, None, batch, inputs="inputs", **kw)
    by_function = eval_step(params, {}, None, batch, inputs=lambda b: b["inputs"], **kw)
    assert_trees_equal(by_key, by_function)
    with pytest.raises(KeyError, match="inputs='image' is not a key of the batch"):
        eval_step(params, {}, None, batch, **kw)


# ---------------------------------------------------------------------------------------------
# KL to the dense model: PyTorch's kl_div, and the dense outputs the search step adds.


@needs_torch
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_to_dense_gradients_match_pytorch(temperature):
    """The weighted mean of per-token KL(p_dense || q_masked) at temperature T (times T**2), its
    gradient and the `nll` metric, against PyTorch's `kl_div` and `cross_entropy` in float64,
    the dense logits given in the batch."""
    params, batch = lm_params(), lm_batch(4)
    dense = np.asarray(lm_apply(lm_params(seed=5), {}, batch["inputs"], False)[0])
    batch = {**batch, jj.losses.DENSE_OUTPUTS: dense}
    state = create_train_state(params, {}, stash())
    loss_fn = jj.losses.kl_to_dense(temperature)
    step = partial(train_step, apply_fn=lm_apply, tx=stash(), loss_fn=loss_fn, inputs="inputs")
    new, metrics = jax.jit(step)(state, batch)

    p = {k: torch.tensor(np.asarray(v[next(iter(v))], np.float64), requires_grad=True)
         for k, v in params.items()}  # fmt: skip
    h = torch.tanh(p["embed"][torch.tensor(np.asarray(batch["inputs"]))] @ p["proj"])
    logits = (h @ p["head"]).reshape(-1, V)
    log_q = torch.log_softmax(logits / temperature, -1)
    log_p = torch.log_softmax(
        torch.tensor(dense, dtype=torch.float64).reshape(-1, V) / temperature, -1
    )
    kl = torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    w = torch.tensor(np.asarray(batch["weights"], np.float64)).reshape(-1)
    loss = (kl * w).sum() / w.sum() * temperature**2
    loss.backward()
    targets = torch.tensor(np.asarray(batch["targets"]), dtype=torch.long).reshape(-1)
    nll = torch.nn.functional.cross_entropy(logits.detach(), targets, reduction="none")
    np.testing.assert_allclose(float(metrics["loss"]), float(loss.detach()), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["nll"]), float((nll * w).sum() / w.sum()), rtol=1e-5)
    for name in params:
        grads = np.asarray(new.opt_state[name][next(iter(params[name]))])
        np.testing.assert_allclose(grads, p[name].grad.numpy(), rtol=1e-4, atol=1e-7)


def test_the_search_step_gives_kl_to_dense_the_unmasked_models_outputs():
    """`search_step` with `kl_to_dense()` equals the same step whose loss reads dense logits that
    the test computed itself from the unmasked params; the masked model starts away from dense
    (loss > 0) and the loss is zero when nothing is masked."""
    params, batch = lm_params(2), lm_batch(8, seed=3)
    budget = jj.layer_budgets(params, 0.5, "uniform")
    scores, _ = jj.init_scores(params, budget, "kaiming", key=jax.random.PRNGKey(4))
    tx = jj.search_optimizer(budget, learning_rate=50.0, total_steps=4)
    kl = jj.losses.kl_to_dense()
    dense = lm_apply(params, {}, batch["inputs"], False)[0]

    def given_dense(outputs, b):
        return kl(outputs, {**b, jj.losses.DENSE_OUTPUTS: dense})

    kw = dict(apply_fn=lm_apply, tx=tx, inputs="inputs")
    a = b = jj.engine.create_search_state(scores, tx)
    for _ in range(3):
        a, ma = jax.jit(partial(search_step, loss_fn=kl, **kw))(a, params, batch)
        b, mb = jax.jit(partial(search_step, loss_fn=given_dense, **kw))(b, params, batch)
        np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
        assert float(ma["loss"]) > 1e-3
        # Two programs that fuse the loss differently, at a learning rate of 50: last-bit
        # differences grow to a few parts in a million by step 3 on an AVX-512 EPYC.
        jax.tree.map(partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-6), a.scores, b.scores)
        jax.tree.map(np.testing.assert_array_equal, a.masks, b.masks)

    nothing = jax.tree.map(
        lambda n: None if n is None else 0 * n, budget, is_leaf=lambda x: x is None
    )
    scores0, _ = jj.init_scores(params, nothing, "magnitude")
    tx0 = jj.search_optimizer(nothing, learning_rate=1.0, total_steps=1)
    state0 = jj.engine.create_search_state(scores0, tx0)
    step0 = partial(search_step, apply_fn=lm_apply, tx=tx0, loss_fn=kl, inputs="inputs")
    _, m0 = jax.jit(step0)(state0, params, batch)
    assert abs(float(m0["loss"])) < 1e-6


def test_kl_to_dense_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        jj.losses.kl_to_dense(0)
    with pytest.raises(KeyError, match="dense_outputs"):
        jj.losses.kl_to_dense()(jnp.zeros((2, V)), {"targets": jnp.zeros(2, jnp.int32)})
