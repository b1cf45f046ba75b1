"""Prunable leaves, per-layer budgets and sparsity reports against direct computations."""

import math

import numpy as np
import pytest

import jackpots_jax as jj


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv1": {"kernel": rng.standard_normal((3, 3, 3, 16)).astype(np.float32)},
        "bn1": {"scale": np.ones(16, np.float32), "bias": np.zeros(16, np.float32)},
        "conv2": {"kernel": rng.standard_normal((3, 3, 16, 32)).astype(np.float32)},
        "dense": {"kernel": rng.standard_normal((128, 64)).astype(np.float32) * 0.1},
        "head": {"kernel": rng.standard_normal((64, 10)).astype(np.float32), "bias": np.zeros(10)},
    }


def test_prunable_leaves_default_and_patterns():
    params = _params()
    p = jj.prunable_leaves(params)
    assert p["conv1"]["kernel"] and p["conv2"]["kernel"] and p["dense"]["kernel"]
    assert not p["head"]["kernel"] and not p["head"]["bias"] and not p["bn1"]["scale"]
    p = jj.prunable_leaves(params, dense=())
    assert p["head"]["kernel"]
    p = jj.prunable_leaves(params, dense=("^conv1/", "head"))
    assert not p["conv1"]["kernel"] and p["conv2"]["kernel"]
    with pytest.raises(ValueError, match="invalid regular expression"):
        jj.prunable_leaves(params, dense=("(",))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.95, 0.999])
def test_global_magnitude_matches_the_formula(sparsity):
    params = _params(1)
    budget = jj.layer_budgets(params, sparsity, rule="global_magnitude")
    layers = ["conv1", "conv2", "dense"]
    pooled = np.concatenate([np.abs(params[n]["kernel"]).ravel() for n in layers])
    n = pooled.size
    keep = math.floor(n * (1 - sparsity) + 1e-9)  # the decimal the user wrote
    if keep == 0:
        expected = {name: params[name]["kernel"].size for name in layers}
    else:
        t = np.sort(pooled)[::-1][keep - 1]  # the keep-th largest
        expected = {name: int((np.abs(params[name]["kernel"]) < t).sum()) for name in layers}
    assert {name: budget[name]["kernel"] for name in layers} == expected
    assert budget["head"]["kernel"] is None and budget["bn1"]["scale"] is None


def test_counts_use_the_decimal_sparsity_not_binary_rounding():
    # int(100 * (1 - 0.9)) == 9 in floats; the budget must keep exactly 10 of 100.
    w = {"a": (np.arange(100, dtype=np.float32) + 1).reshape(10, 10)}
    b = jj.layer_budgets(w, 0.9, rule="global_magnitude", dense=())
    assert b["a"] == 90
    # floor(0.29 * 100): 0.29 * 100 == 28.999999999999996 in floats.
    assert jj.layer_budgets(w, 0.29, rule="uniform", dense=())["a"] == 29


def test_uniform_counts():
    params = _params()
    budget = jj.layer_budgets(params, 0.9, rule="uniform")
    for name in ("conv1", "conv2", "dense"):
        assert budget[name]["kernel"] == math.floor(0.9 * params[name]["kernel"].size)


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.98])
def test_erk_sums_to_target_and_follows_erk_densities(sparsity):
    params = _params(2)
    budget = jj.layer_budgets(params, sparsity, rule="erk")
    layers = ["conv1", "conv2", "dense"]
    sizes = {n: params[n]["kernel"].size for n in layers}
    total = sum(sizes.values())
    assert sum(budget[n]["kernel"] for n in layers) == math.floor(sparsity * total + 1e-9)
    # Independent float reference of RigL's ERK: raw density (sum of dims)/(prod of dims),
    # layers whose density would exceed 1 become dense, the rest rescaled.
    raw = {n: sum(params[n]["kernel"].shape) / sizes[n] for n in layers}
    dense = set()
    while True:
        free = [n for n in layers if n not in dense]
        eps = ((1 - sparsity) * total - sum(sizes[n] for n in dense)) / sum(
            raw[n] * sizes[n] for n in free
        )
        grown = {n for n in free if eps * raw[n] > 1}
        if not grown:
            break
        dense |= grown
    for n in layers:
        kept = sizes[n] - budget[n]["kernel"]
        expected = sizes[n] if n in dense else eps * raw[n] * sizes[n]
        assert abs(kept - expected) <= 1.0
    # Densities are ordered like the raw ERK scores.
    dens = {n: 1 - budget[n]["kernel"] / sizes[n] for n in layers}
    by_raw = sorted(layers, key=raw.get)
    assert [dens[n] for n in by_raw] == sorted(dens[n] for n in by_raw)


def test_explicit_map():
    params = _params()
    spec = {"conv1/kernel": 0.0, "conv2/kernel": 0.5, "dense/kernel": 0.99}
    budget = jj.layer_budgets(params, spec)
    assert budget["conv1"]["kernel"] == 0
    assert budget["conv2"]["kernel"] == 2304
    assert budget["dense"]["kernel"] == math.floor(0.99 * 8192)
    with pytest.raises(ValueError, match=r"prunable paths missing \['dense/kernel'\]"):
        jj.layer_budgets(params, {"conv1/kernel": 0.1, "conv2/kernel": 0.1})
    with pytest.raises(ValueError, match=r"unknown paths \['nope'\]"):
        jj.layer_budgets(params, {**spec, "nope": 0.1})


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan")])
def test_sparsity_out_of_range_is_an_error(bad):
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\)"):
        jj.layer_budgets(_params(), bad)


def test_unknown_rule_is_an_error():
    with pytest.raises(ValueError, match="unknown budget `rule` 'l2'; allowed: global_magnitude"):
        jj.layer_budgets(_params(), 0.5, rule="l2")


def test_sparsity_report_hand_worked():
    params = {
        "a": {"kernel": np.ones((2, 5), np.float32), "bias": np.zeros(5)},
        "head": {"kernel": np.ones((5, 2), np.float32)},
    }
    masks = {
        "a": {"kernel": np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], bool), "bias": None},
        "head": {"kernel": None},
    }
    r = jj.sparsity_report(masks, params)
    assert r["layers"]["a/kernel"]["kept"] == 3 and r["layers"]["a/kernel"]["sparsity"] == 0.7
    assert not r["layers"]["head/kernel"]["masked"]
    assert r["budgeted"] == {"size": 10, "kept": 3, "pruned": 7, "sparsity": 0.7, "density": 0.3}
    assert r["prunable"]["size"] == 20 and r["prunable"]["sparsity"] == pytest.approx(7 / 20)
    assert r["all"]["size"] == 25 and r["all"]["kept"] == 18
    # A budget gives the same report as the masks it describes.
    budget = {"a": {"kernel": 7, "bias": None}, "head": {"kernel": None}}
    assert jj.sparsity_report(budget, params)["budgeted"] == r["budgeted"]
    table = jj.format_sparsity_table(r)
    assert "| a/kernel | 10 | 3 | 70.00% |" in table
