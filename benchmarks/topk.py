"""Wall time of the mask refresh (`jj.topk_masks`, `jj.refresh_masks`) against sort-based top-k.

Measures, on this machine, at 90% sparsity (10% of each leaf kept):
  * one layer of each size in `--sizes` (float32 standard-normal scores) and a ResNet-50-shaped
    set of kernels (shapes from `jax.eval_shape` of the model's init, ~25M weights in total);
  * for each: `jj.topk_masks` (with each selection asked for: `batched`, the radix select over
    all leaves at once, or `bracketed`, per-leaf bisection; `auto` is the backend's default), a
    `jnp.sort` threshold per leaf (`scores >= sorted_desc[k - 1]`, exact when there are no ties),
    `lax.top_k` per leaf (indices scattered into a mask) and, for the ResNet-50 set, one
    `jnp.sort` of all leaves concatenated; the masks of all of them are checked identical;
  * on the ResNet-50 set and the largest single layer, `jj.refresh_masks` with rate 1.0 and 0.5
    (traced, as in a search with a schedule), given the masks of the
    previous scores and new scores = previous + a small perturbation. Rate 1.0 must equal the
    sort-based mask of the new scores; rate 0.5 is checked to keep exactly k per layer and to lie
    between the old and the new masks.

Every function is jitted; the first call (compile) is excluded; each timing is the median of
`--repeats` calls, each blocked with `block_until_ready`.

Run:
  python benchmarks/topk.py                      # 1M, 5M, 25M and ResNet-50
  python benchmarks/topk.py --quick              # small sizes, a few seconds
  python benchmarks/topk.py --sizes 1000000 --repeats 5 --no-resnet
  python benchmarks/topk.py --selections batched bracketed   # both exact selections
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jackpots_jax as jj
import jackpots_jax.models
import jackpots_jax.select

SPARSITY = 0.9


# Lines about the batched top-k's candidates, printed after the table.
CANDIDATES: list[str] = []


def kept(n: int) -> int:
    """Entries kept in a leaf of `n` at 90% sparsity (at least one)."""
    return max(1, n - int(n * SPARSITY))


def time_call(fn: Callable, *args, repeats: int) -> tuple[float, object]:
    """Median seconds of `fn(*args)` over `repeats` calls, after one warm-up (compile) call."""
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def sort_mask(s: jax.Array, k: int) -> jax.Array:
    """`s >= sorted_desc[k - 1]`: the top-k mask when `s` has no ties."""
    flat = s.ravel()
    threshold = jnp.sort(flat)[flat.size - k]
    return s >= threshold


def top_k_mask(s: jax.Array, k: int) -> jax.Array:
    """The top-k mask from `lax.top_k` indices."""
    flat = s.ravel()
    _, idx = lax.top_k(flat, k)
    return jnp.zeros(flat.shape, bool).at[idx].set(True).reshape(s.shape)


def resnet50_kernels() -> dict[str, jax.ShapeDtypeStruct]:
    """Kernel shapes (ndim >= 2) of ResNet-50 for 1000 classes, from an abstract init."""
    model = jj.models.create("resnet50", 1000)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype), train=False)
    )
    leaves = jax.tree_util.tree_leaves_with_path(variables["params"])
    return {
        jax.tree_util.keystr(path): leaf
        for path, leaf in leaves
        if len(leaf.shape) >= 2 and leaf.shape[-1] > 0
    }


def distinct(x: np.ndarray) -> np.ndarray:
    """`x` (float32) with every repeated value nudged up by a few ulps, so that there are no ties.

    Float32 normals have ties at these sizes; the sort baseline is only exact without them.
    """
    flat = x.ravel()
    order = np.argsort(flat, kind="stable")
    s = flat[order]
    while (dup := np.flatnonzero(s[1:] <= s[:-1])).size:
        s[dup + 1] = np.nextafter(s[dup], np.float32(np.inf))
    out = np.empty_like(flat)
    out[order] = s
    return out.reshape(x.shape)


def make_scores(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Standard-normal float32 scores per leaf, without ties."""
    rng = np.random.default_rng(seed)
    return {
        name: distinct(rng.standard_normal(shape, dtype=np.float32))
        for name, shape in shapes.items()
    }


def same(a: dict, b: dict) -> bool:
    return all(bool(jnp.array_equal(a[n], b[n])) for n in a)


def concat_sort_mask(s: dict, ks: dict) -> dict:
    """Per-leaf masks from ONE `jnp.sort` of all leaves' scores concatenated (leaf id in the key).

    The sort orders (leaf, score) pairs; each leaf's k-th largest is then read at its offset. The
    baseline the batched selection must beat: one sort of the whole model instead of one per leaf.
    """
    names = list(s)
    flat = jnp.concatenate([s[n].ravel() for n in names])
    leaf = jnp.concatenate(
        [jnp.full((s[n].size,), i, jnp.int32) for i, n in enumerate(names)]
    )  # fmt: skip
    order = jnp.lexsort((flat, leaf))  # ascending by leaf, then by score
    sorted_scores = flat[order]
    out, offset = {}, 0
    for n in names:
        size = s[n].size
        out[n] = s[n] >= sorted_scores[offset + size - ks[n]]
        offset += size
    return out


def bench_set(
    label: str, shapes: dict[str, tuple[int, ...]], repeats: int, seed: int, selections
) -> tuple[list[tuple], dict, tuple[float, float]]:
    """Rows for one set of leaves: ours (each selection), sort, top_k; what the refresh needs."""
    scores = {n: jnp.asarray(x) for n, x in make_scores(shapes, seed).items()}
    ks = {n: kept(int(np.prod(s))) for n, s in shapes.items()}
    budget = {n: int(np.prod(shapes[n])) - ks[n] for n in shapes}

    by_sort = jax.jit(lambda s: {n: sort_mask(s[n], ks[n]) for n in s})
    by_top_k = jax.jit(lambda s: {n: top_k_mask(s[n], ks[n]) for n in s})
    t_sort, m_sort = time_call(by_sort, scores, repeats=repeats)
    t_topk, m_topk = time_call(by_top_k, scores, repeats=repeats)
    counts_ok = all(int(jnp.sum(m_sort[n])) == ks[n] for n in ks)  # no ties in the scores
    rows = []
    masks = None
    for sel in selections:
        ours = jax.jit(lambda s, sel=sel: jj.topk_masks(s, budget, selection=sel))
        t_ours, m_ours = time_call(ours, scores, repeats=repeats)
        masks = m_ours
        name = f"jj.topk_masks {jj.select.resolve(sel)}"
        rows.append((label, name, t_ours, t_sort / t_ours, t_topk / t_ours, same(m_ours, m_sort)))
    rows += [
        (label, "jnp.sort per leaf", t_sort, None, None, "ref" if counts_ok else "ref (ties!)"),
        (label, "lax.top_k per leaf", t_topk, None, None, same(m_topk, m_sort)),
    ]
    if "batched" in selections:
        # The one-device batched top-k ranks the entries of each threshold's sampled bin among
        # themselves when they fit its slots (else it takes the passes over every entry).
        names = list(scores)
        count, slots, fast = jax.jit(
            lambda s: jj.select.sampled_candidates([s[n] for n in names], [ks[n] for n in names])
        )(scores)
        CANDIDATES.append(f"{label}: {int(count):,} candidates in {slots:,} slots, "
                          f"{'ranked among themselves' if fast else 'fallback'}")  # fmt: skip
    if len(shapes) > 1:
        one_sort = jax.jit(lambda s: concat_sort_mask(s, ks))
        t_one, m_one = time_call(one_sort, scores, repeats=repeats)
        rows.append((label, "one jnp.sort of all", t_one, None, None, same(m_one, m_sort)))
    context = {"scores": scores, "masks": masks, "budget": budget, "ks": ks, "by_sort": by_sort}
    return rows, context, (t_sort, t_topk)


def bench_refresh(
    label: str, ctx: dict, base: tuple[float, float], repeats: int, seed: int, selections
):
    """Rows for `jj.refresh_masks` at rate 1.0 and 0.5 on perturbed scores."""
    scores, masks, budget, ks = ctx["scores"], ctx["masks"], ctx["budget"], ctx["ks"]
    noise = make_scores({n: s.shape for n, s in scores.items()}, seed + 1)
    new_scores = {
        n: jnp.asarray(distinct(np.asarray(scores[n]) + np.float32(0.01) * noise[n]))
        for n in scores
    }
    target = ctx["by_sort"](new_scores)
    t_sort, t_topk = base
    rows = []
    for sel in selections:
        for rate in (1.0, 0.5):
            fn = jax.jit(lambda s, m, r, sel=sel: jj.refresh_masks(s, m, budget, r, selection=sel))
            # The rate is traced, as in a search with a schedule.
            t, out = time_call(fn, new_scores, masks, jnp.float32(rate), repeats=repeats)
            if rate == 1.0:
                ok = same(out, target)
            else:
                # Exactly k kept, nothing outside old | target, and ceil(c / 2) of c swaps made.
                ok = True
                for n in out:
                    swaps = int(jnp.sum(out[n] != masks[n])) // 2
                    proposed = int(jnp.sum(target[n] != masks[n])) // 2
                    ok = ok and int(jnp.sum(out[n])) == ks[n] and swaps == -(-proposed // 2)
                    ok = ok and not bool(jnp.any(out[n] & ~masks[n] & ~target[n]))
            name = f"refresh r={rate} {jj.select.resolve(sel)}"
            rows.append((label, name, t, t_sort / t, t_topk / t, ok))
    return rows


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return str(v)


def print_table(rows: list[tuple]) -> None:
    header = ("size", "method", "seconds", "sort/ours", "top_k/ours", "masks identical")
    body = [
        (
            label,
            method,
            f"{t:.4f}",
            "-" if rs is None else f"{rs:.2f}",
            "-" if rt is None else f"{rt:.2f}",
            fmt(ok),
        )
        for label, method, t, rs, rt, ok in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(r):
        cells = zip(r, widths, strict=True)
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(cells))

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in body:
        print(line(r))


def size_label(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}K"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000, 25_000_000],
        help="single-layer sizes (number of float32 scores)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (median)")
    parser.add_argument("--quick", action="store_true", help="small sizes, no ResNet-50")
    parser.add_argument("--no-resnet", action="store_true", help="skip the ResNet-50 set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--selections", nargs="+", default=["auto"], choices=list(jj.select.SELECTIONS),
        help="which exact selections to time (auto: the backend's default)",
    )  # fmt: skip
    args = parser.parse_args()
    sizes = [10_000, 100_000] if args.quick else args.sizes
    sel = args.selections

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    print(f"sparsity {SPARSITY:.0%} (k = 10% kept per leaf), median of {args.repeats} repeats")
    start = time.perf_counter()
    rows = []
    largest = None
    for n in sizes:
        set_rows, ctx, base = bench_set(size_label(n), {"w": (n,)}, args.repeats, args.seed, sel)
        rows += set_rows
        if largest is None or n >= largest[0]:
            largest = (n, ctx, base)
    if not (args.quick or args.no_resnet):
        kernels = resnet50_kernels()
        shapes = {n: tuple(s.shape) for n, s in kernels.items()}
        total = sum(int(np.prod(s)) for s in shapes.values())
        label = f"resnet50 ({len(shapes)} leaves, {total / 1e6:.2f}M)"
        set_rows, ctx, base = bench_set(label, shapes, args.repeats, args.seed, sel)
        rows += set_rows
        rows += bench_refresh("resnet50", ctx, base, args.repeats, args.seed, sel)
    if largest is not None:
        n, ctx, base = largest
        rows += bench_refresh(size_label(n), ctx, base, args.repeats, args.seed, sel)
    print_table(rows)
    for line in CANDIDATES:
        print(f"sampled top-k, {line}")
    print(f"total wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
