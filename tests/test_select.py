"""The two exact selections (batched for accelerators, bracketed for CPUs) against each other and
against numpy brute force: top-k and the restricted refresh, over trees of many leaves, heavy
ties, signed zeros, infinities and NaN, under jit, in an optax chain, and on sharded scores.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from reference import restricted_refresh, topk_mask

import jackpots_jax as jj
from jackpots_jax import select

# Heavy ties, signed zeros, negatives, infinities and NaN of both signs.
NEG_NAN = np.frombuffer(np.uint32(0xFFC00000).tobytes(), np.float32)[0]
POOL = np.array(
    [-np.inf, -2.5, -1.0, -0.0, 0.0, 1e-30, 0.5, 0.99, 1.0, 3.0, np.inf, np.nan, NEG_NAN],
    np.float32,
)
SELECTIONS = ("batched", "bracketed")


def _structure(sizes):
    """Leaf shapes of mixed rank for the given sizes, and a budget that covers p in {0, 1,
    n - 1, n} and values between."""
    rng = np.random.default_rng(len(sizes))
    shapes, budget = {}, {}
    for i, n in enumerate(sizes):
        shape = (n,) if i % 3 == 0 else (1, n) if i % 3 == 1 else (n, 1)
        shapes[f"l{i:03d}"] = shape
        budget[f"l{i:03d}"] = int([0, min(1, n), max(n - 1, 0), n, rng.integers(0, n + 1)][i % 5])
    return shapes, budget


# Three tree structures, each compiled once per selection; hypothesis varies everything traced:
# the scores (ties, zeros, infinities, NaN), the current masks and the rate.
STRUCTURES = {
    "one leaf": _structure([37]),
    "mixed": _structure([1, 2, 3, 8, 61, 300, 1500]),
    "a hundred leaves": _structure(
        list(np.random.default_rng(0).integers(1, 400, 95)) + [1, 2, 3, 1025, 2049]
    ),
}


@functools.cache
def _compiled(structure, selection, rank_by):
    """One jitted function: top-k without and with current masks, and the refresh at a rate."""
    budget = STRUCTURES[structure][1]

    def fn(scores, old, rate):
        return (
            jj.topk_masks(scores, budget, rank_by=rank_by, selection=selection),
            jj.topk_masks(scores, budget, old, rank_by=rank_by, selection=selection),
            jj.refresh_masks(scores, old, budget, rate, rank_by=rank_by, selection=selection),
        )

    return jax.jit(fn)


def _draw_scores(rng, shapes, tied):
    out = {}
    for k, shape in shapes.items():
        if rng.random() < tied:
            out[k] = rng.choice(POOL, shape).astype(np.float32)
        else:
            scale = np.float32(10.0 ** rng.integers(-3, 4))
            out[k] = (rng.standard_normal(shape) * scale).astype(np.float32)
    return out


def _old_masks(rng, scores, budget):
    """Valid current masks: exactly n - p entries per leaf, at random."""
    out = {}
    for k, s in scores.items():
        m = np.zeros(s.size, bool)
        m[rng.choice(s.size, s.size - budget[k], replace=False)] = True
        out[k] = m.reshape(s.shape)
    return out


def _check(structure, scores, old, rate, rank_by):
    """Both selections equal numpy brute force: top-k with and without current, the refresh.

    The hundred-leaf tree checks the batched selection only: the per-leaf one takes minutes to
    compile for a hundred leaves (it is the CPU path, where that compile is paid once).
    """
    budget = STRUCTURES[structure][1]
    ranked = {k: np.abs(v) if rank_by == "abs" else v for k, v in scores.items()}
    for selection in SELECTIONS[:1] if structure == "a hundred leaves" else SELECTIONS:
        plain, with_current, refreshed = _compiled(structure, selection, rank_by)(
            scores, old, jnp.float32(rate)
        )
        for k, s in ranked.items():
            keep = s.size - budget[k]
            where = f"{selection} {structure} {k} rate {rate}"
            np.testing.assert_array_equal(np.asarray(plain[k]), topk_mask(s, keep), where)
            np.testing.assert_array_equal(
                np.asarray(with_current[k]), topk_mask(s, keep, old[k]), where
            )
            expected, _, _ = restricted_refresh(s, old[k], keep, rate)
            np.testing.assert_array_equal(np.asarray(refreshed[k]), expected, where)


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from(
        [("one leaf", "score"), ("mixed", "score"), ("mixed", "abs"), ("a hundred leaves", "score")]
    ),
    st.integers(0, 2**31 - 1),
    st.sampled_from([1.0, 0.5, 0.05, 0.0]),
    st.sampled_from([0.0, 0.5, 1.0]),
)
def test_both_selections_equal_brute_force(case, seed, rate, tied):
    structure, rank_by = case
    rng = np.random.default_rng(seed)
    shapes, budget = STRUCTURES[structure]
    scores = _draw_scores(rng, shapes, tied)
    _check(structure, scores, _old_masks(rng, scores, budget), rate, rank_by)


def test_large_leaves_with_long_tie_runs():
    """Leaves of many packed rows: two-level scores, and a leaf whose every entry ties."""
    rng = np.random.default_rng(7)
    n = 70_001
    scores = {
        "two_level": np.where(rng.random(n) < 0.3, 1.0, 0.99).astype(np.float32),
        "normal": rng.standard_normal((130, 300)).astype(np.float32),
        "constant": np.full((5000,), 0.5, np.float32),
    }
    budget = {"two_level": n - n // 10, "normal": 130 * 300 - 4000, "constant": 1234}
    old = _old_masks(rng, scores, budget)
    fn = jax.jit(
        lambda s, m, r: (
            jj.topk_masks(s, budget, m, selection="batched"),
            jj.refresh_masks(s, m, budget, r, selection="batched"),
        )
    )
    for rate in (1.0, 0.3):
        top, refreshed = fn(scores, old, jnp.float32(rate))
        for k, s in scores.items():
            keep = s.size - budget[k]
            np.testing.assert_array_equal(np.asarray(top[k]), topk_mask(s, keep, old[k]), k)
            expected, _, _ = restricted_refresh(s, old[k], keep, rate)
            np.testing.assert_array_equal(np.asarray(refreshed[k]), expected, k)


def _sampled_case(kind, rng):
    """Leaves of the sampled top-k (strided samples from 2,032 entries on) and what they keep."""
    scores = {
        "a": rng.standard_normal(3000).astype(np.float32),
        "b": (rng.standard_normal((64, 80)) * 1e-3).astype(np.float32),
        "c": rng.standard_normal(20_000).astype(np.float32),
        "d": rng.standard_normal(700).astype(np.float32),  # its own sample
    }
    if kind == "ties":  # 200 levels: about a hundred ties in the threshold's bin
        scores["c"] = rng.integers(0, 200, 20_000).astype(np.float32)
    if kind == "all tied":  # every entry of a large leaf in one bin: more than the slots
        scores["c"] = np.full(20_000, 0.25, np.float32)
    if kind == "misleading sample":  # every sampled entry (0, 127, 254, ...) is the largest
        c = rng.standard_normal(20_000).astype(np.float32)
        c[::127] = 1e6
        scores["c"] = c
    keep = {"a": 1500, "b": 4000, "c": 2000, "d": 0}
    return scores, keep


@pytest.mark.parametrize(
    "kind, capacity, sampled",
    [
        ("normal", None, True),
        ("ties", None, True),
        ("normal", 1, False),  # more candidates than slots
        ("all tied", None, False),
        ("misleading sample", None, False),  # the threshold lies outside its bracket
    ],
)
def test_the_sampled_topk_decides_among_its_candidates_or_falls_back_with_the_same_masks(
    kind, capacity, sampled
):
    """The one-device batched top-k brackets every threshold from a strided sample and ranks
    only the entries of the bin that holds it; when they overflow the slots or the bracket
    misses, it runs the radix passes over every entry. Both against numpy, with and without
    preferred entries (the tie rule), and which path ran is checked from the plan itself."""
    rng = np.random.default_rng(len(kind))
    scores, keep = _sampled_case(kind, rng)
    values = list(scores.values())
    counts = list(keep.values())
    prefer = [rng.random(v.shape) < 0.5 for v in values]
    packing = select.Packing.of([v.shape for v in values])
    slots = capacity or select.swap_capacity(packing.total_rows * packing.chunk)
    plan = jax.jit(
        lambda vs: select._sampled_plan(
            packing, packing.row_leaf(), [v.ravel() for v in vs], counts, slots
        )
    )(values)
    assert bool(jnp.all(plan.valid) & (plan.count <= slots)) == sampled, (plan.count, slots)
    if kind == "ties":  # the fast path decides ties: many in the threshold's bin
        assert int(plan.count) >= 50
    fn = jax.jit(
        lambda vs, ps: (
            select.topk(vs, counts, selection="batched", capacity=capacity),
            select.topk(vs, counts, ps, selection="batched", capacity=capacity),
        )
    )
    plain, preferred = fn(values, prefer)
    for i, (v, n) in enumerate(zip(values, counts, strict=True)):
        np.testing.assert_array_equal(np.asarray(plain[i]), topk_mask(v, n), f"{kind} {i}")
        np.testing.assert_array_equal(
            np.asarray(preferred[i]), topk_mask(v, n, prefer[i]), f"{kind} {i} preferred"
        )


@pytest.mark.parametrize("groups", [1, 4])
def test_the_restricted_refresh_selects_the_same_swaps_compacted_or_over_every_entry(groups):
    """The batched refresh's two paths against brute force: the proposed swaps compacted into
    slots (every slot needed: capacity = all entries) and the radix passes over every entry
    (capacity 1: the swaps never fit), from masks that propose many swaps (random) and few (a
    perturbed top-k), with ties, at several rates; in one group and split in four."""
    rng = np.random.default_rng(21)
    shapes, budget = STRUCTURES["mixed"]
    keep = [int(np.prod(shape)) - budget[k] for k, shape in shapes.items()]
    layout = select.Layout((None,) * len(shapes), groups)
    packing = select.Packing.of(list(shapes.values()), None, groups)
    entries = groups * packing.total_rows * packing.chunk
    cases = []
    for tied in (0.0, 1.0):  # distinct scores; every leaf drawn from the pool of ties
        scores = _draw_scores(rng, shapes, tied)
        many = _old_masks(rng, scores, budget)
        few = {
            k: topk_mask(s + rng.normal(0, 0.05, s.shape).astype(np.float32), n).reshape(s.shape)
            for (k, s), n in zip(scores.items(), keep, strict=True)
        }
        cases += [(scores, many), (scores, few)]
    paths = {
        capacity: jax.jit(
            lambda v, m, r, c=capacity: select.refresh(
                v, m, keep, r, selection="batched", layout=layout, capacity=c
            )
        )
        for capacity in (1, None, entries)
    }
    for scores, old in cases:
        for rate in (1.0, 0.5, 0.05):
            expected = [
                restricted_refresh(s, old[k], n, rate)[0]
                for (k, s), n in zip(scores.items(), keep, strict=True)
            ]
            for capacity, fn in paths.items():
                got = fn(list(scores.values()), list(old.values()), jnp.float32(rate))
                for k, a, b in zip(shapes, got, expected, strict=True):
                    np.testing.assert_array_equal(np.asarray(a), b, f"{k} {capacity} {rate}")


def test_masks_of_another_count_give_the_same_result_on_both_paths():
    """Current masks that do not hold the budget (only a user can pass such): same masks."""
    rng = np.random.default_rng(3)
    shapes, budget = STRUCTURES["mixed"]
    scores = _draw_scores(rng, shapes, 0.6)
    wrong = {k: rng.random(v) < 0.5 for k, v in shapes.items()}
    for rate in (1.0, 0.5, 0.0):
        a = _compiled("mixed", "batched", "score")(scores, wrong, jnp.float32(rate))
        b = _compiled("mixed", "bracketed", "score")(scores, wrong, jnp.float32(rate))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nan_ranks_above_inf_whatever_its_sign():
    x = np.array([1.0, np.nan, np.inf, NEG_NAN, -np.inf, 0.0], np.float32)
    keys = np.asarray(select.ordered_keys(jnp.asarray(x)))
    assert keys[1] == keys[3] == np.iinfo(np.uint32).max
    assert keys[1] > keys[2] > keys[0] > keys[5] > keys[4]
    for selection in SELECTIONS:
        m = jj.topk_masks({"w": x}, {"w": 4}, selection=selection)["w"]
        np.testing.assert_array_equal(m, [False, True, False, True, False, False])


def test_in_an_optax_chain_both_selections_agree_step_by_step():
    """40 steps of a short restriction with a schedule: the same masks at every step."""
    rng = np.random.default_rng(11)
    params = {
        "a": rng.standard_normal((30, 20)).astype(np.float32),
        "b": rng.standard_normal((3, 3, 4, 8)).astype(np.float32),
        "c": rng.standard_normal((7, 1)).astype(np.float32),
    }
    budget = jj.layer_budgets(params, 0.8, "global_magnitude", dense=())
    scores, _ = jj.init_scores(params, budget, "magnitude")
    steps = 40

    def run(selection, schedule):
        tx = optax.chain(
            optax.add_decayed_weights(5e-4),
            optax.sgd(0.1, momentum=0.9),
            jj.short_restriction(budget, rate=schedule, selection=selection),
        )

        @jax.jit
        def step(s, st, g):
            updates, st = tx.update(g, st, s)
            return optax.apply_updates(s, updates), st

        s, st = scores, tx.init(scores)
        history = []
        for i in range(steps):
            g_rng = np.random.default_rng(1000 + i)
            grads = {
                k: jnp.asarray(g_rng.standard_normal(v.shape), jnp.float32)
                for k, v in params.items()
            }
            s, st = step(s, st, grads)
            history.append(jax.device_get(jj.current_masks(st)))
        return history

    for schedule in (jj.schedules.cosine(steps),):  # rates from 1 down to 0
        a, b = run("batched", schedule), run("bracketed", schedule)
        for t, (ma, mb) in enumerate(zip(a, b, strict=True)):
            for k in params:
                np.testing.assert_array_equal(ma[k], mb[k], err_msg=f"step {t} {k}")
                assert int(ma[k].sum()) == params[k].size - budget[k]


def _collectives(compiled_text):
    """(kind, element count) of every collective in compiled HLO text."""
    found = re.findall(
        r"= (\w+)\[([\d,]*)\][^ ]* (all-gather|all-reduce|all-to-all|collective-permute)"
        r"(?:-start)?\(",
        compiled_text,
    )
    return [(kind, int(np.prod([int(d) for d in dims.split(",") if d]))) for _, dims, kind in found]


@pytest.mark.parametrize(
    "dims",
    [
        # the largest dimension divisible by 4: ties split by a radix select on the index
        {"conv": 3, "dense": 0, "odd": None},
        # leading dimensions or flat runs: the layout keeps index order, ties split in one pass
        {"conv": None, "dense": 0, "odd": None},
    ],
)
def test_sharded_scores_give_the_single_device_masks(dims):
    """Scores sharded 4 ways (over 'fsdp' of a 2 x 4 mesh of 8 CPU devices), under jit.

    With the layout that follows the shards, the selection moves no leaf between devices: its
    only collectives are the all-reduces of the per-leaf histograms (and the gather of the one
    small replicated leaf's result).
    """
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = Mesh(np.array(devices[:8]).reshape(2, 4), ("data", "fsdp"))
    rng = np.random.default_rng(5)
    scores = {
        "conv": rng.choice(POOL[:-2], (3, 3, 8, 16)).astype(np.float32),
        "dense": rng.standard_normal((64, 12)).astype(np.float32),
        "odd": rng.standard_normal((5, 3)).astype(np.float32),  # no dim divisible by 4
    }
    budget = {"conv": 1000, "dense": 700, "odd": 9}
    old = _old_masks(rng, scores, budget)

    def spec(k):
        d = dims[k]
        names = [("fsdp" if i == d else None) for i in range(scores[k].ndim)]
        return NamedSharding(mesh, P(*names))

    sharded_scores = {k: jax.device_put(v, spec(k)) for k, v in scores.items()}
    sharded_old = {k: jax.device_put(v, spec(k)) for k, v in old.items()}
    assert len(sharded_scores["conv"].sharding.device_set) == 8
    assert select._index_ordered(
        select.Packing.of([v.shape for v in scores.values()], list(dims.values()), 4)
    ) == (dims["conv"] is None)
    layout = select.Layout(dims, 4, NamedSharding(mesh, P("fsdp")))
    out_shardings = {k: spec(k) for k in scores}
    for rate in (1.0, 0.5):
        expected = {
            k: restricted_refresh(scores[k], old[k], scores[k].size - budget[k], rate)[0]
            for k in scores
        }
        for lay in (None, layout):
            fn = jax.jit(
                lambda s, m, r, lay=lay: jj.refresh_masks(
                    s, m, budget, r, selection="batched", layout=lay
                ),
                out_shardings=out_shardings,
            )
            compiled = fn.lower(sharded_scores, sharded_old, jnp.float32(rate)).compile()
            got = jax.block_until_ready(compiled(sharded_scores, sharded_old, jnp.float32(rate)))
            for k in scores:
                np.testing.assert_array_equal(np.asarray(got[k]), expected[k], err_msg=k)
            if lay is not None:
                collectives = _collectives(compiled.as_text())
                # Other than the all-reduces, only small per-leaf counts move (at most 4 tie
                # classes x 4 groups x 3 leaves), the results of the replicated leaves and the
                # restricted refresh's compacted swaps (each group's slots, gathered).
                replicated = {
                    n
                    for k, v in scores.items()
                    if dims[k] is None
                    for n in (v.size, -(-v.size // 4) * 4)
                }
                packing = select.Packing.of([v.shape for v in scores.values()], dims.values(), 4)
                slots = select.swap_capacity(4 * packing.total_rows * packing.chunk)
                assert collectives and all(
                    kind == "all-reduce"
                    or n <= 4 * 4 * 3
                    or n in replicated
                    or (kind == "all-gather" and n == -(-slots // 4) * 4)
                    for kind, n in collectives
                ), collectives
                # The all-reduces are histograms: a few bins per leaf. (On a CPU also the counts
                # of the swaps' pairwise ranking, one block of 128 slots at a time: the slots
                # are the all-gathered ones above, `select._rank_among`.)
                block = 128 if jax.default_backend() == "cpu" else 0
                assert max(n for kind, n in collectives if kind == "all-reduce") <= max(
                    3 * 32, block
                )


def _loops_and_conditionals(n_leaves, selection):
    rng = np.random.default_rng(n_leaves)
    scores = {
        f"l{i}": rng.standard_normal((4 + i % 5, 6)).astype(np.float32) for i in range(n_leaves)
    }
    budget = {k: v.size // 2 for k, v in scores.items()}
    old = _old_masks(rng, scores, budget)
    fn = jax.jit(lambda s, m, r: jj.refresh_masks(s, m, budget, r, selection=selection))
    text = fn.lower(scores, old, jnp.float32(0.5)).compile().as_text()
    whiles = len(re.findall(r"\bwhile\(", text))
    conditionals = len(re.findall(r"\bconditional\(", text))
    return whiles, conditionals


def test_the_batched_refresh_has_no_per_leaf_loops_or_conditionals():
    """A structural guard: 64 leaves compile to as many loops and conditionals as 8 leaves: two
    conditionals (the top-k among its sampled candidates or over every entry; the compacted
    swaps or, when they overflow, every entry) and no loop, but on a CPU, where each of the two
    counts over pairs of slots runs in blocks (`select._rank_among`): two loops."""
    assert _loops_and_conditionals(64, "batched") == _loops_and_conditionals(8, "batched")
    loops = 2 if jax.default_backend() == "cpu" else 0
    assert _loops_and_conditionals(64, "batched") == (loops, 2)
    # The guard can fail: the per-leaf path grows with the leaves.
    few, many = _loops_and_conditionals(2, "bracketed"), _loops_and_conditionals(6, "bracketed")
    assert sum(many) > sum(few) > 0


@pytest.mark.parametrize(
    "shapes, dims, groups",
    [
        ([(1,), (5,), (2 * 255 + 3,), (0,), (7,)], None, 1),
        ([(8, 3), (5, 3), (2, 4, 12), (1,)], (0, None, 2, None), 4),
    ],
)
def test_packing_round_trips_and_indices_are_flat_positions(shapes, dims, groups):
    packing = select.Packing.of(shapes, dims, groups, chunk=255)
    leaves = [
        (jnp.arange(int(np.prod(s)), dtype=jnp.int32) + 1000 * i).reshape(s)
        for i, s in enumerate(shapes)
    ]
    packed = packing.pack(leaves, -1)
    assert packed.shape == (groups, packing.total_rows, 255)
    for a, b in zip(packing.unpack(packed), leaves, strict=True):
        np.testing.assert_array_equal(a, b)
    index, real = packing.indices(packing.row_leaf())
    for i, (x, n) in enumerate(zip(packing.unpack(index), packing.sizes, strict=True)):
        np.testing.assert_array_equal(np.ravel(x), np.arange(n), err_msg=str(i))
    assert int(real.sum()) == sum(packing.sizes)
    # A split leaf's group g holds the g-th block of its dimension (where its shard would be).
    if dims is not None:
        part = packed[1, packing.starts[0] : packing.starts[0] + packing.rows[0]].ravel()
        np.testing.assert_array_equal(part[: packing.parts[0]], np.ravel(leaves[0][2:4]))
    sums = packing.leaf_sums(jnp.sum(real, axis=-1, dtype=jnp.int32)[..., None])
    np.testing.assert_array_equal(sums[:, 0], packing.sizes)


@pytest.mark.parametrize("digit_bits", [1, 2])
def test_every_digit_width_selects_the_same_set(digit_bits):
    rng = np.random.default_rng(digit_bits)
    shapes, budget = STRUCTURES["mixed"]
    scores = _draw_scores(rng, shapes, 0.6)
    keys = [select.ordered_keys(jnp.asarray(v)).ravel() for v in scores.values()]
    keep = [v.size - budget[k] for k, v in scores.items()]
    got = jax.jit(lambda ks: select.topk(ks, keep, selection="batched", digit_bits=digit_bits))(
        keys
    )
    for (k, s), m in zip(scores.items(), got, strict=True):
        np.testing.assert_array_equal(np.asarray(m), topk_mask(s, s.size - budget[k]).ravel())


def test_unknown_selection_is_an_error():
    with pytest.raises(ValueError, match="unknown `selection` 'sorted'; allowed: auto"):
        jj.topk_masks({"w": jnp.ones(3)}, {"w": 1}, selection="sorted")


@pytest.mark.parametrize(
    "backend, expected", [("cpu", "bracketed"), ("gpu", "batched"), ("tpu", "batched")]
)
def test_auto_selection_follows_the_documented_rule(monkeypatch, backend, expected):
    """The module's documented rule: `auto` is `bracketed` on a CPU, `batched` on an accelerator;
    a name given is kept."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert select.resolve("auto") == expected
    assert select.resolve("batched") == "batched" and select.resolve("bracketed") == "bracketed"
