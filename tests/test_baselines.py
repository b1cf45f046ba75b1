"""One-shot baselines (magnitude, Wanda, SparseGPT) against plain numpy written from the papers.

The references below are written independently of `jackpots_jax.baselines`: Wanda by sorting each
output's (or group's, or layer's) scores with Python's stable order; SparseGPT as the paper's
Algorithm 1 in PyTorch's `[out, in]` orientation, with an explicit inverse and column loops, in
float64 (the library runs under `jax.enable_x64` for the exact comparison).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jackpots_jax as jj
from jackpots_jax import baselines, patterns

# ---------------------------------------------------------------------------------------------
# References.


def keep_first(scores, keep):
    """Indices of the `keep` largest scores, ties to the lower index (a stable descending sort)."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    out = np.zeros(len(scores), bool)
    out[order[:keep]] = True
    return out


def ref_masks(scores, pruned, *, comparison, nm=None):
    """Masks of a `[fan_in, fan_out]` score matrix: per layer, per output, or per N:M group."""
    fan_in, fan_out = scores.shape
    if nm is not None:
        n, m = nm
        mask = np.zeros_like(scores, bool)
        for c in range(fan_out):
            for g in range(0, fan_in, m):
                mask[g : g + m, c] = keep_first(scores[g : g + m, c], n)
        return mask
    if comparison == "layer":
        return keep_first(scores.ravel(), scores.size - pruned).reshape(scores.shape)
    mask = np.zeros_like(scores, bool)
    for c in range(fan_out):
        prune_c = pruned // fan_out + (c < pruned % fan_out)
        mask[:, c] = keep_first(scores[:, c], fan_in - prune_c)
    return mask


def ref_sparsegpt(kernel, gram, *, pruned=None, nm=None, blocksize=128, percdamp=0.01):
    """SparseGPT, Algorithm 1 of Frantar & Alistarh 2023, on W = kernel.T ([out, in]), float64."""
    w = np.array(kernel, np.float64).T.copy()
    rows, cols = w.shape
    h = 2 * np.array(gram, np.float64)
    dead = np.diag(h) == 0
    damp = percdamp * np.mean(np.diag(h))
    h[np.arange(cols), np.arange(cols)] += damp + dead
    w[:, dead] = 0
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, hinv.T @ hinv = H^-1
    pruned_mask = np.zeros_like(w, bool)

    def prune_lowest(score, flat, count):
        # Prune the lowest saliency; among equals the higher index in the [in, out] kernel.
        order = np.lexsort((-flat.ravel(), score.ravel()))
        out = np.zeros(score.size, bool)
        out[order[:count]] = True
        return out.reshape(score.shape)

    kernel_index = (
        np.arange(cols * rows).reshape(cols, rows).T
    )  # flat index of [in, out], as [out, in]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].copy()
        q1 = np.zeros_like(w1)
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        m1 = np.zeros_like(w1, bool)
        if nm is None:
            count = pruned * i2 // cols - pruned * i1 // cols
            score = w1**2 / np.diag(h1)[None, :] ** 2
            m1 = prune_lowest(score, kernel_index[:, i1:i2], count)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = w1[:, i : i + m] ** 2 / np.diag(h1)[None, i : i + m] ** 2
                for r in range(rows):
                    m1[r, i : i + m] = prune_lowest(
                        score[r : r + 1], kernel_index[r : r + 1, i1 + i : i1 + i + m], m - n
                    )[0]
            col = w1[:, i]
            q = np.where(m1[:, i], 0.0, col)
            q1[:, i] = q
            e = (col - q) / h1[i, i]
            w1[:, i:] -= np.outer(e, h1[i, i:])
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        pruned_mask[:, i1:i2] = m1
    return ~pruned_mask.T, w.T


def correlated_inputs(rng, n, d, dead=()):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    x[:, list(dead)] = 0
    return x


# ---------------------------------------------------------------------------------------------
# Calibration statistics.


def test_chunked_statistics_equal_one_shot_gram():
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(3, 7, 10)).astype(np.float32) for _ in range(3)]
    update = jax.jit(baselines.update_stats, static_argnames="chunk")
    stats = baselines.init_stats({"a/kernel": 10, "b/kernel": 10}, gram=True)
    for x in batches:
        stats = update(stats, {"a/kernel": x}, chunk=4)  # 21 rows: chunks of 4 and a padded one
    x = np.concatenate([b.reshape(-1, 10) for b in batches]).astype(np.float64)
    s = stats["a/kernel"]
    np.testing.assert_allclose(s.gram, x.T @ x, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(s.sq_norms, np.sum(x * x, axis=0), rtol=1e-5)
    np.testing.assert_allclose(s.norms, np.linalg.norm(x, axis=0), rtol=1e-5)
    assert int(s.count) == 63
    assert int(stats["b/kernel"].count) == 0  # untouched
    norms_only = baselines.update_stats(
        baselines.init_stats({"a/kernel": 10}, gram=False), {"a/kernel": batches[0]}
    )
    assert norms_only["a/kernel"].gram is None
    with pytest.raises(ValueError, match="fan_in 10"):
        baselines.update_stats(stats, {"a/kernel": np.zeros((2, 9))})
    with pytest.raises(KeyError, match="c/kernel"):
        baselines.update_stats(stats, {"c/kernel": np.zeros((2, 10))})


# ---------------------------------------------------------------------------------------------
# Magnitude and Wanda.


@pytest.mark.parametrize("comparison", ["output", "layer"])
def test_wanda_matches_numpy_with_ties(comparison):
    rng = np.random.default_rng(1)
    # Small integers: many equal scores, within outputs and groups alike.
    w = rng.integers(-3, 4, size=(16, 6)).astype(np.float32)
    norms = rng.integers(1, 3, size=16).astype(np.float32)
    params = {"layer": {"kernel": w}}
    scores = np.abs(w) * norms[:, None]
    for pruned in (0, 47, 96):  # 47: split unevenly over the 6 outputs
        budget = {"layer": {"kernel": pruned}}
        got = baselines.wanda_masks(params, budget, {"layer/kernel": norms}, comparison=comparison)
        want = ref_masks(scores, pruned, comparison=comparison)
        np.testing.assert_array_equal(got["layer"]["kernel"], want)
        assert int(np.sum(~np.asarray(got["layer"]["kernel"]))) == pruned
    for n, m in ((2, 4), (4, 8)):
        budget = jj.layer_budgets(params, None, pattern=f"{n}:{m}")
        got = baselines.wanda_masks(params, budget, {"layer/kernel": norms}, comparison=comparison)
        want = ref_masks(scores, 0, comparison="", nm=(n, m))
        np.testing.assert_array_equal(got["layer"]["kernel"], want)
        assert patterns.nm_violations(got["layer"]["kernel"], 0, n, m) == 0


def test_wanda_and_magnitude_on_a_two_layer_mlp():
    rng = np.random.default_rng(2)
    params = {
        "fc1": {"kernel": rng.normal(size=(8, 16)).astype(np.float32), "bias": np.zeros(16)},
        "fc2": {"kernel": rng.normal(size=(16, 8)).astype(np.float32)},
    }
    batches = [rng.normal(size=(5, 8)).astype(np.float32) for _ in range(3)]

    def calibration_inputs(x):
        hidden = np.maximum(x @ params["fc1"]["kernel"] + params["fc1"]["bias"], 0)
        return {"fc1/kernel": x, "fc2/kernel": hidden}

    stats = baselines.init_stats({"fc1/kernel": 8, "fc2/kernel": 16}, gram=False)
    for x in batches:
        stats = baselines.update_stats(stats, calibration_inputs(x))
    inputs = [calibration_inputs(x) for x in batches]
    for pattern, sparsity in (("unstructured", 0.6), ("2:4", None)):
        budget = jj.layer_budgets(params, sparsity, rule="uniform", pattern=pattern)
        masks = baselines.wanda_masks(params, budget, stats)
        mags = baselines.magnitude_masks(params, budget)
        nm = None if pattern == "unstructured" else tuple(map(int, pattern.split(":")))
        for layer in ("fc1", "fc2"):
            path = f"{layer}/kernel"
            x = np.concatenate([i[path] for i in inputs]).astype(np.float64)
            w = params[layer]["kernel"]
            scores = np.abs(w) * np.linalg.norm(x, axis=0)[:, None]
            pruned = int(budget[layer]["kernel"])
            want = ref_masks(scores, pruned, comparison="output", nm=nm)
            np.testing.assert_array_equal(masks[layer]["kernel"], want)
            assert int(np.sum(~np.asarray(masks[layer]["kernel"]))) == pruned
            np.testing.assert_array_equal(
                mags[layer]["kernel"], ref_masks(np.abs(w), pruned, comparison="layer", nm=nm)
            )
            if nm:
                assert patterns.nm_violations(masks[layer]["kernel"], 0, *nm) == 0
        assert masks["fc1"]["bias"] is None


def test_wanda_on_kernels_with_several_input_axes():
    rng = np.random.default_rng(6)
    conv = rng.normal(size=(2, 2, 4, 3)).astype(np.float32)  # HWIO: fan_in 16, 3 outputs
    attn_out = rng.normal(size=(2, 4, 5)).astype(np.float32)  # [heads, head_dim, D]: 2 input axes
    params = {"conv": conv, "attn": {"out": attn_out}}
    norms = {"conv": rng.uniform(size=(2, 2, 4)), "attn/out": rng.uniform(size=8)}
    budget = {"conv": 25, "attn": {"out": 21}}
    got = baselines.wanda_masks(params, budget, norms, input_axes={"attn/out": 2})
    for w, n, pruned, m in (
        (conv, norms["conv"], 25, got["conv"]),
        (attn_out, norms["attn/out"], 21, got["attn"]["out"]),
    ):
        flat = w.reshape(-1, w.shape[-1])
        want = ref_masks(np.abs(flat) * n.reshape(-1, 1), pruned, comparison="output")
        np.testing.assert_array_equal(np.asarray(m).reshape(flat.shape), want)


def test_wanda_under_block_pattern_and_errors():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 8)).astype(np.float32)
    norms = rng.uniform(0.5, 2, size=8).astype(np.float32)
    params = {"k": w}
    budget = jj.layer_budgets(params, 0.5, rule="uniform", dense=(), pattern="block:2")
    got = np.asarray(baselines.wanda_masks(params, budget, {"k": norms}, comparison="layer")["k"])
    tiles = (np.abs(w) * norms[:, None]).reshape(4, 2, 4, 2).sum(axis=(1, 3))
    want = np.repeat(np.repeat(ref_masks(tiles, 8, comparison="layer"), 2, 0), 2, 1)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="comparison='layer'"):
        baselines.wanda_masks(params, budget, {"k": norms})
    with pytest.raises(KeyError, match="no input norms for masked leaf 'k'"):
        baselines.wanda_masks(params, {"k": 3}, {"other": norms})
    with pytest.raises(ValueError, match="fan_in 8"):
        baselines.wanda_masks(params, {"k": 3}, {"k": norms[:5]})


# ---------------------------------------------------------------------------------------------
# SparseGPT.


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_matches_the_published_algorithm(pattern):
    rng = np.random.default_rng(4)
    d_in, d_out = 40, 6  # blocks of 16: 16, 16 and a padded 8
    x = correlated_inputs(rng, 96, d_in, dead=(5,))
    kernel = rng.normal(size=(d_in, d_out))
    gram = x.T @ x
    nm = None if pattern == "unstructured" else (2, 4)
    pruned = 121 if nm is None else None  # 121 of 240: uneven over the blocks
    want_mask, want_w = ref_sparsegpt(kernel, gram, pruned=pruned or 0, nm=nm, blocksize=16)
    with jax.enable_x64(True):
        mask, w = baselines.sparsegpt(
            jnp.asarray(kernel), jnp.asarray(gram), pruned=pruned, pattern=pattern, blocksize=16
        )
        mask, w = np.asarray(mask), np.asarray(w)
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_allclose(w, want_w, rtol=1e-6, atol=1e-9)
    assert np.all(w[~mask] == 0) and np.all(w[5] == 0)  # the dead input's weights zeroed
    assert int(np.sum(~mask)) == (121 if nm is None else 120)
    if nm:
        assert patterns.nm_violations(mask, 0, *nm) == 0
    # float32 (the default) agrees up to rounding.
    mask32, w32 = baselines.sparsegpt(
        kernel.astype(np.float32),
        gram.astype(np.float32),
        pruned=pruned,
        pattern=pattern,
        blocksize=16,
    )
    assert np.mean(np.asarray(mask32) == want_mask) > 0.97
    assert int(np.sum(~np.asarray(mask32))) == int(np.sum(~mask))


def test_sparsegpt_reconstructs_better_than_magnitude():
    rng = np.random.default_rng(5)
    d_in, d_out = 40, 6  # the shapes above: the compiled sweep is reused
    x = correlated_inputs(rng, 96, d_in).astype(np.float32)
    w = rng.normal(size=(d_in, d_out)).astype(np.float32)
    params = {"fc": {"kernel": w}}
    stats = baselines.update_stats(baselines.init_stats({"fc/kernel": d_in}), {"fc/kernel": x})

    def error(v):
        return float(np.sum((x.astype(np.float64) @ (w - np.asarray(v, np.float64))) ** 2))

    for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
        budget = jj.layer_budgets(params, sparsity, rule="uniform", pattern=pattern)
        masks, weights = baselines.sparsegpt_masks(params, budget, stats, blocksize=16)
        mag = baselines.magnitude_masks(params, budget)
        m = np.asarray(masks["fc"]["kernel"])
        assert int(np.sum(~m)) == int(budget["fc"]["kernel"])
        assert np.all(np.asarray(weights["fc"]["kernel"])[~m] == 0)
        assert error(weights["fc"]["kernel"]) < error(w * np.asarray(mag["fc"]["kernel"]))


def test_sparsegpt_errors_name_the_problem():
    kernel, gram = np.ones((8, 4), np.float32), np.eye(8, dtype=np.float32)
    with pytest.raises(ValueError, match="not supported"):
        baselines.sparsegpt(kernel, gram, pattern="block:2")
    with pytest.raises(ValueError, match=r"needs \(8, 8\)"):
        baselines.sparsegpt(kernel, gram[:4, :4], sparsity=0.5)
    with pytest.raises(ValueError, match="multiple of M=4"):
        baselines.sparsegpt(kernel, gram, pattern="2:4", blocksize=6)
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\)"):
        baselines.sparsegpt(kernel, gram, sparsity=1.5)
    with pytest.raises(ValueError, match="exactly one of"):
        baselines.sparsegpt(kernel, gram)
    with pytest.raises(KeyError, match="no Gram matrices for masked leaf 'k'"):
        baselines.sparsegpt_masks({"k": kernel}, {"k": 3}, {})


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "block:4"])
def test_a_baseline_mask_as_the_search_init(pattern):
    """`scores_from_masks` (a prior): the selection of its scores is the baseline's mask, kept
    scores 1.0 and pruned ones 1 - gap, as the paper's magnitude init; a mask that keeps another
    count than the budget is refused naming the leaf."""
    rng = np.random.default_rng(3)
    params = {
        "a": {"kernel": rng.normal(size=(16, 8)).astype(np.float32)},
        "b": {"kernel": rng.normal(size=(8, 12)).astype(np.float32)},
    }
    budget = jj.layer_budgets(params, 0.5, rule="uniform", pattern=pattern)
    norms = {
        "a/kernel": rng.uniform(0.1, 3.0, size=16).astype(np.float32),
        "b/kernel": rng.uniform(0.1, 3.0, size=8).astype(np.float32),
    }
    comparison = "layer" if pattern.startswith("block") else "output"
    masks = baselines.wanda_masks(params, budget, norms, comparison=comparison)
    scores = jj.scores_from_masks(masks, budget, gap=0.05)
    again = jj.topk_masks(scores, budget)
    for name in ("a", "b"):
        mask = np.asarray(masks[name]["kernel"])
        np.testing.assert_array_equal(np.asarray(again[name]["kernel"]), mask)
        s = np.asarray(scores[name]["kernel"])
        unit = (
            patterns.unit_view(mask, budget[name]["kernel"])
            if pattern.startswith("block")
            else mask
        )
        np.testing.assert_array_equal(s, np.where(np.asarray(unit), 1.0, 0.95).astype(np.float32))
    # The paper's magnitude init (now built on it) against magnitude masks by a stable sort.
    init, _ = jj.init_scores(params, budget, "magnitude", gap=0.05)
    for name in ("a", "b") if not pattern.startswith("block") else ():
        w = np.abs(params[name]["kernel"])
        nm = (2, 4) if pattern == "2:4" else None
        want = ref_masks(w, w.size // 2, comparison="layer", nm=nm)
        np.testing.assert_array_equal(
            init[name]["kernel"], np.where(want, 1.0, 0.95).astype(np.float32), name
        )
    wrong = dict(masks, a={"kernel": np.ones((16, 8), bool)})
    what = "8 of 8 tiles of 16 weights" if pattern == "block:4" else "128 of 128 entries"
    with pytest.raises(ValueError, match=f"the mask of 'a/kernel' keeps {what}; its budget"):
        jj.scores_from_masks(wrong, budget)
