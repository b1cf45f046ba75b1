"""Top-k masks, score initialisers, the straight-through estimator, mask statistics."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import topk_mask

import jackpots_jax as jj
from jackpots_jax.masks import ordered_keys, select_top

# A pool with heavy ties, signed zeros, negatives and infinities.
POOL = [-np.inf, -2.5, -1.0, -0.0, 0.0, 1e-30, 0.5, 0.99, 1.0, 3.0, np.inf]


SIZES = (1, 2, 3, 8, 61, 300)


@functools.cache
def _jitted_select(n):
    # One compilation per size: keep and current are traced, so hypothesis examples are cheap.
    del n
    return jax.jit(lambda s, keep, cur: select_top(ordered_keys(s), keep, prefer=cur))


@st.composite
def tied_scores(draw):
    n = draw(st.sampled_from(SIZES))
    values = draw(st.lists(st.sampled_from(POOL), min_size=n, max_size=n))
    keep = draw(st.integers(0, n))
    current = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return np.asarray(values, np.float32), keep, np.asarray(current)


@settings(max_examples=300, deadline=None)
@given(tied_scores())
def test_select_top_matches_stable_sort_with_ties(case):
    scores, keep, current = case
    got = _jitted_select(scores.size)(scores, keep, current)
    np.testing.assert_array_equal(np.asarray(got), topk_mask(scores, keep, current))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(SIZES + (2000,)), st.integers(0, 2**31 - 1), st.data())
def test_select_top_matches_stable_sort_on_continuous_scores(n, seed, data):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal(n).astype(np.float32) * np.float32(10.0 ** rng.integers(-30, 30))
    keep = data.draw(st.sampled_from(sorted({0, 1, n - 1, n, n // 2, n // 10})))
    got = _jitted_select(n)(scores, keep, np.zeros(n, bool))
    np.testing.assert_array_equal(np.asarray(got), topk_mask(scores, keep))


@pytest.mark.parametrize("n", [1, 5, 77])
def test_topk_masks_over_a_tree_equals_stable_sort_per_leaf(n):
    rng = np.random.default_rng(n)
    scores = {
        "a": rng.choice(POOL, size=(n, 3)).astype(np.float32),
        "b": None,
        "c": rng.standard_normal((2, n)).astype(np.float32),
    }
    budget = {"a": n, "b": None, "c": 1}
    current = {"a": rng.random((n, 3)) < 0.5, "b": None, "c": rng.random((2, n)) < 0.5}
    got = jj.topk_masks(scores, budget, current)
    assert got["b"] is None
    np.testing.assert_array_equal(got["a"], topk_mask(scores["a"], 2 * n, current["a"]))
    np.testing.assert_array_equal(got["c"], topk_mask(scores["c"], 2 * n - 1, current["c"]))


@pytest.mark.parametrize("n", [1, 7, 1000, 300_001])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_topk_large_two_level_scores_with_current(n, density):
    # The magnitude init has two values only: almost everything is a tie.
    rng = np.random.default_rng(n)
    scores = np.where(rng.random(n) < 0.3, 1.0, 0.99).astype(np.float32)
    current = rng.random(n) < 0.5
    keep = int(round(density * n))
    got = jax.jit(lambda s, c: jj.topk_masks(s, {"w": n - keep}, c))(
        {"w": jnp.asarray(scores)}, {"w": jnp.asarray(current)}
    )["w"]
    assert int(got.sum()) == keep
    np.testing.assert_array_equal(np.asarray(got), topk_mask(scores, keep, current))


def test_topk_hand_worked():
    scores = jnp.array([[0.3, -1.0], [0.3, 2.0]])
    np.testing.assert_array_equal(
        jj.topk_masks({"w": scores}, {"w": 2})["w"], [[True, False], [False, True]]
    )
    # The tie at 0.3 goes to the entry already kept.
    cur = {"w": jnp.array([[False, False], [True, False]])}
    np.testing.assert_array_equal(
        jj.topk_masks({"w": scores}, {"w": 2}, cur)["w"], [[False, False], [True, True]]
    )
    # Signed: a negative score ranks below zero; by |score| it ranks first.
    np.testing.assert_array_equal(
        jj.topk_masks({"w": scores}, {"w": 3}, rank_by="abs")["w"], [[False, False], [False, True]]
    )


def test_ordered_keys_order_like_floats():
    x = np.array([-np.inf, -3.0, -1e-38, -0.0, 0.0, 1e-45, 2.0, np.inf], np.float32)
    keys = np.asarray(ordered_keys(jnp.asarray(x)))
    assert np.all(np.diff(keys.astype(np.int64))[[0, 1, 2, 4, 5, 6]] > 0)
    assert keys[3] == keys[4]  # -0.0 == +0.0


def _params(rng):
    return {
        "conv": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32)},
        "bn": {"scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)},
        "dense": {"kernel": rng.standard_normal((36, 5)).astype(np.float32), "bias": np.zeros(5)},
        "head": {"kernel": rng.standard_normal((5, 3)).astype(np.float32)},
    }


def test_init_magnitude_is_per_layer_magnitude_pruning():
    params = _params(np.random.default_rng(0))
    budget = jj.layer_budgets(params, 0.7, rule="uniform")
    scores, masks = jj.init_scores(params, budget, "magnitude", gap=0.05)
    for layer in ("conv", "dense"):
        w = params[layer]["kernel"]
        pruned = budget[layer]["kernel"]
        # The p smallest |w| are pruned (a stable ascending sort, ties to the lower index).
        order = np.argsort(np.abs(w).ravel(), kind="stable")
        expected = np.ones(w.size, bool)
        expected[order[:pruned]] = False
        np.testing.assert_array_equal(np.asarray(masks[layer]["kernel"]).ravel(), expected)
        s = np.asarray(scores[layer]["kernel"]).ravel()
        np.testing.assert_allclose(s[expected], 1.0)
        np.testing.assert_allclose(s[~expected], 0.95)
    assert masks["head"]["kernel"] is None and scores["bn"]["scale"] is None


def test_init_other_methods():
    params = _params(np.random.default_rng(1))
    budget = jj.layer_budgets(params, 0.5, rule="uniform")
    _, mag = jj.init_scores(params, budget, "magnitude")
    wm_scores, wm = jj.init_scores(params, budget, "weight_magnitude")
    np.testing.assert_array_equal(wm["conv"]["kernel"], mag["conv"]["kernel"])
    np.testing.assert_allclose(wm_scores["dense"]["kernel"], np.abs(params["dense"]["kernel"]))
    key = jax.random.key(0)
    ks, km = jj.init_scores(params, budget, "kaiming", key, rank_by="abs")
    bound = 1 / np.sqrt(3 * 3 * 2)
    assert np.abs(np.asarray(ks["conv"]["kernel"])).max() <= bound
    assert np.abs(np.asarray(ks["conv"]["kernel"])).max() > 0.8 * bound
    np.testing.assert_array_equal(km["conv"]["kernel"], topk_mask(np.abs(ks["conv"]["kernel"]), 36))
    rs, rm = jj.init_scores(params, budget, "random", key)
    for layer in ("conv", "dense"):
        n = params[layer]["kernel"].size
        assert int(rm[layer]["kernel"].sum()) == n - budget[layer]["kernel"]
    # Same key, same scores: every random choice comes from the key.
    rs2, _ = jj.init_scores(params, budget, "random", key)
    np.testing.assert_array_equal(rs["dense"]["kernel"], rs2["dense"]["kernel"])


def test_init_errors():
    params = _params(np.random.default_rng(2))
    budget = jj.layer_budgets(params, 0.5, rule="uniform")
    with pytest.raises(ValueError, match="unknown score init `method` 'sign'"):
        jj.init_scores(params, budget, "sign")
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        jj.init_scores(params, budget, "kaiming")
    with pytest.raises(ValueError, match="`gap` must be > 0"):
        jj.init_scores(params, budget, "magnitude", gap=0.0)
    other = jj.layer_budgets({"a": np.ones((4, 4), np.float32)}, 0.5, rule="uniform")
    with pytest.raises(ValueError, match="structure"):
        jj.init_scores(params, other)
    bad = jax.tree.map(lambda b: b, budget, is_leaf=lambda x: x is None)
    bad["conv"]["kernel"] = 10_000
    with pytest.raises(ValueError, match="'conv/kernel' prunes 10000 weights"):
        jj.topk_masks(params, bad)
    with pytest.raises(ValueError, match="unknown `rank_by`"):
        jj.topk_masks(params, budget, rank_by="sign")


def test_apply_masks_passes_unmasked_leaves_through():
    params = _params(np.random.default_rng(3))
    budget = jj.layer_budgets(params, 0.5, rule="uniform")
    _, masks = jj.init_scores(params, budget)
    out = jj.apply_masks(params, masks)
    np.testing.assert_array_equal(
        out["conv"]["kernel"], params["conv"]["kernel"] * np.asarray(masks["conv"]["kernel"])
    )
    assert out["head"]["kernel"] is params["head"]["kernel"]
    assert out["bn"]["scale"] is params["bn"]["scale"]


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), padding="VALID", name="conv")(x)
        x = jnp.tanh(x).reshape(x.shape[0], -1)
        return nn.Dense(3, name="head")(x)


def test_straight_through_gradient_is_dense_and_equals_g_times_w():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((5, 6, 6, 2)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 5))
    net = _Net()
    params = net.init(jax.random.key(0), x)["params"]
    budget = jj.layer_budgets(params, 0.8, rule="uniform", dense=())
    scores, masks = jj.init_scores(params, budget, "random", jax.random.key(1))

    def loss_of_weights(w):
        logits = net.apply({"params": w}, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    def loss_of_scores(s):
        return loss_of_weights(jj.masked_weights(params, s, masks))

    grads = jax.grad(loss_of_scores)(scores)
    # g_eff: the gradient w.r.t. the effective weights W * M, taken separately.
    g_eff = jax.grad(loss_of_weights)(jj.apply_masks(params, masks))
    for layer in ("conv", "head"):
        w = np.asarray(params[layer]["kernel"])
        expected = np.asarray(g_eff[layer]["kernel"]) * w
        np.testing.assert_allclose(grads[layer]["kernel"], expected, rtol=1e-5, atol=1e-7)
        pruned = ~np.asarray(masks[layer]["kernel"])
        assert np.count_nonzero(np.asarray(grads[layer]["kernel"])[pruned]) > 0.9 * pruned.sum()


def test_straight_through_hand_worked_dense_layer():
    # y = x @ (W * M), L = sum(y * c)  =>  dL/d(WM) = x^T c  and  dL/dS = (x^T c) * W.
    rng = np.random.default_rng(5)
    x, c = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    w = rng.standard_normal((3, 2))
    m = np.array([[1, 0], [0, 0], [1, 1]], bool)
    s = rng.standard_normal((3, 2))

    def loss(scores):
        weff = jj.masked_weights({"w": jnp.asarray(w)}, scores, {"w": jnp.asarray(m)})["w"]
        return jnp.sum((jnp.asarray(x) @ weff) * c)

    np.testing.assert_allclose(loss({"w": jnp.asarray(s)}), np.sum((x @ (w * m)) * c), rtol=1e-5)
    g = jax.grad(loss)({"w": jnp.asarray(s, jnp.float32)})["w"]
    np.testing.assert_allclose(g, (x.T @ c) * w, rtol=1e-5)


def test_nnx_state_and_linen_dict_give_the_same_masks():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.head = nnx.Linear(4, 3, rngs=rngs)

    state = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
    plain = state.to_pure_dict()
    prunable = jj.prunable_leaves(state)
    assert jax.tree.leaves(prunable) == jax.tree.leaves(jj.prunable_leaves(plain))
    for rule in ("global_magnitude", "uniform", "erk"):
        b_state = jj.layer_budgets(state, 0.6, rule=rule, dense=())
        b_plain = jj.layer_budgets(plain, 0.6, rule=rule, dense=())
        assert jax.tree.leaves(b_state) == jax.tree.leaves(b_plain)
    scores, masks = jj.init_scores(state, b_state)
    _, masks_plain = jj.init_scores(plain, b_plain)
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(masks_plain), strict=True):
        np.testing.assert_array_equal(a, b)
    out = jj.apply_masks(state, masks)
    assert isinstance(out, nnx.State)
    kernel = out["conv"]["kernel"].value
    np.testing.assert_array_equal(
        kernel, np.asarray(plain["conv"]["kernel"]) * np.asarray(masks_plain["conv"]["kernel"])
    )
    grads = jax.grad(lambda s: jnp.sum(jj.masked_weights(state, s, masks)["conv"]["kernel"].value))(
        scores
    )
    np.testing.assert_allclose(grads["conv"]["kernel"].value, plain["conv"]["kernel"])


def test_mask_churn_and_overlap_hand_worked():
    a = {"x": jnp.array([1, 1, 0, 0], bool), "y": None, "z": jnp.array([1, 0], bool)}
    b = {"x": jnp.array([1, 0, 1, 0], bool), "y": None, "z": jnp.array([1, 0], bool)}
    churn = jj.mask_churn(a, b)
    assert int(churn["x"]) == 2 and int(churn["z"]) == 0 and int(churn["total"]) == 2
    overlap = jj.mask_overlap(a, b)
    assert overlap["layers"]["x"]["iou"] == pytest.approx(1 / 3)
    assert overlap["layers"]["x"]["b_in_a"] == pytest.approx(1 / 2)
    assert overlap["total"]["iou"] == pytest.approx(2 / 4)
    assert overlap["total"]["b_in_a"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="structure"):
        jj.mask_overlap(a, {"x": a["x"]})


def test_compact_indices_are_the_true_positions_in_order():
    from jackpots_jax.masks import compact_indices

    rng = np.random.default_rng(0)
    # Down to single entries and up to thousands of words in hundreds of blocks of 32 words.
    cases = [(1, 1.0, 1), (33, 0.5, 40), (5000, 0.01, 100), (5000, 0.3, 100)]
    cases += [(100_000, 0.003, 400), (40_000, 0.97, 2000), (1025, 1.0, 1025)]
    for n, density, capacity in cases:
        mask = rng.random(n) < density
        index, total = jax.jit(compact_indices, static_argnums=1)(jnp.asarray(mask), capacity)
        where = np.flatnonzero(mask)
        assert int(total) == where.size
        expected = np.full(capacity, n)
        expected[: min(capacity, where.size)] = where[:capacity]
        np.testing.assert_array_equal(np.asarray(index), expected)


def _large_cases(n, rng):
    """Large leaves that take the bracketed paths, and inputs built to defeat them."""
    normal = rng.standard_normal(n).astype(np.float32)
    return {
        "normal": normal,
        "ascending": np.sort(normal),
        "descending": np.sort(normal)[::-1].copy(),
        "few_values": rng.choice(POOL[1:-1], n).astype(np.float32),
        "two_level": np.where(rng.random(n) < 0.3, 1.0, 0.99).astype(np.float32),
        # Every 4th entry is large: a strided sample sees only those (or none of them).
        "periodic": np.where(np.arange(n) % 4 == 0, 5.0 + normal, normal).astype(np.float32),
    }


@pytest.mark.slow
@pytest.mark.parametrize("n", [20_011, 2**18 + 3])
def test_topk_on_large_leaves_equals_stable_sort(n):
    # Leaves of 2^18 entries or more bracket the threshold from a sample; with `current`, from the
    # current masks. Both paths (and their fallbacks) must give the stable sort's set.
    rng = np.random.default_rng(n)
    topk = jax.jit(lambda s, p: jj.topk_masks({"w": s}, {"w": p})["w"], static_argnums=1)
    topk_cur = jax.jit(
        lambda s, p, c: jj.topk_masks({"w": s}, {"w": p}, {"w": c})["w"], static_argnums=1
    )
    for name, scores in _large_cases(n, rng).items():
        for keep in (1, n // 10, n - 1):
            expected = topk_mask(scores, keep)
            got = np.asarray(topk(scores, n - keep))
            np.testing.assert_array_equal(got, expected, err_msg=f"{name} keep={keep}")
            # Current masks near the answer (a few entries moved), and a random one whose count
            # is wrong (no bounds can be taken from it).
            near = expected.copy()
            flip = rng.choice(n, size=min(keep, n - keep, 50), replace=False)
            near[flip] = ~near[flip]
            for current in (near, rng.random(n) < 0.5):
                got = np.asarray(topk_cur(scores, n - keep, current))
                np.testing.assert_array_equal(
                    got, topk_mask(scores, keep, current), err_msg=f"{name} keep={keep}"
                )


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_eager_selection_is_one_program():
    """`topk_masks` called outside `jit` runs one compiled program, not the selection of every
    leaf op by op: op by op, 120 leaves loaded about 4,900 memory mappings of compiled code
    (SmolLM2's 210 kernels ran the process out of them, 65,530 by default on Linux). The masks
    are those of the selection under `jit`, checked against a stable sort per leaf."""
    rng = np.random.default_rng(0)
    params = {f"l{i}": {"kernel": rng.normal(size=(24, 40)).astype(np.float32)} for i in range(120)}
    budget = jj.layer_budgets(params, 0.5, rule="uniform")

    def mappings():
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    before = mappings()
    masks = jj.topk_masks(params, budget, selection="bracketed")
    assert mappings() - before < 500
    for name, leaf in params.items():
        keep = leaf["kernel"].size - budget[name]["kernel"]
        want = topk_mask(leaf["kernel"], keep).reshape(leaf["kernel"].shape)
        np.testing.assert_array_equal(masks[name]["kernel"], want, err_msg=name)
