"""Dense against 2:4 semi-structured linear layers in PyTorch: where 2:4 pays and where it does not.

Weights: the `[out, in]` matrices of an N:M export (`--weights jackpot.safetensors`, written by
`jackpots_jax.io.nm_export.write_nm`), or random 2:4 matrices of `--shapes` (default: the MLP of a
7B-class transformer on CUDA, smaller ones on a CPU). Every weight is first checked to be 2:4
(each group of 4 consecutive entries of a row holds at most 2 non-zeros).

On CUDA (fp16): `y = F.linear(x, W)` with `x` of `[batch, in]`, dense against
`F.linear(x, to_sparse_semi_structured(W))` (cuSPARSELt, or CUTLASS with `--cutlass`) at each
`--batches`; the sparse output is checked against the dense one. The table gives the median time
per call (`torch.utils.benchmark`, `blocked_autorange`) and the speed-up; a closing line per
shape names the batch sizes where 2:4 pays (speed-up > 1.05) and where it does not.

On a CPU: PyTorch 2.13 has no semi-structured kernels there, and `to_sparse_semi_structured`
refuses a CPU tensor ("Only CUDA tensors are currently supported"); the script shows that error,
checks that the CUTLASS packing (`torch.sparse._semi_structured_conversions`, the compression
that the CUDA CUTLASS backend runs; pure PyTorch, so it runs on the CPU) compresses every weight
to `[out, in / 2]` plus metadata and decompresses it exactly, and times what a CPU offers instead:
dense `F.linear` in float32 against a CSR sparse matmul of the same 50%-sparse weight.

Run:
  python benchmarks/sparse_speed.py                                  # random 2:4 weights
  python benchmarks/sparse_speed.py --weights jackpot_2of4.safetensors --batches 1 64 1024
  python benchmarks/sparse_speed.py --shapes 4096x4096 --cutlass     # CUDA: the CUTLASS backend
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from torch.utils import benchmark

CUDA_SHAPES = ("4096x4096", "11008x4096", "4096x11008")
CPU_SHAPES = ("1024x1024", "4096x1024")
CUDA_BATCHES = (1, 16, 64, 256, 1024, 4096, 16384)
CPU_BATCHES = (1, 16, 64, 256, 1024)
PAYS = 1.05


def random_2of4(out: int, inp: int, dtype, device, seed: int) -> torch.Tensor:
    """A random `[out, in]` weight whose every group of 4 along `in` keeps 2 (random) entries."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    keep = torch.rand(out, inp // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(out, inp // 4, 4, dtype=torch.bool).scatter_(2, keep, True)
    return (w * mask.reshape(out, inp)).to(dtype=dtype, device=device)


def is_2of4(w: torch.Tensor) -> bool:
    """Every group of 4 consecutive entries of every row holds at most 2 non-zeros."""
    if w.dim() != 2 or w.shape[1] % 4:
        return False
    return bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def load_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(path)
    return {k[: -len(".weight")]: v for k, v in state.items() if k.endswith(".weight")}


def median_ms(stmt: str, env: dict, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def run_cuda(weights, batches, min_run_time, cutlass: bool) -> None:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if not cutlass and not torch.backends.cusparselt.is_available():
        print("cuSPARSELt is not available in this PyTorch build: the CUTLASS backend is used")
        cutlass = True
    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    backend = "CUTLASS" if cutlass else "cuSPARSELt"
    print(f"device: {torch.cuda.get_device_name()}, fp16, 2:4 backend {backend}\n")
    print("| weight [out, in] | batch | dense ms | 2:4 ms | speed-up |")
    print("|---|---:|---:|---:|---:|")
    verdicts = []
    for name, w in weights.items():
        w = w.to(device="cuda", dtype=torch.float16).contiguous()
        try:
            sparse = to_sparse_semi_structured(w)
        except RuntimeError as e:
            print(f"| {name} {tuple(w.shape)} | - | - | - | not convertible: {e} |")
            continue
        pays, not_pays = [], []
        for b in batches:
            x = torch.randn(b, w.shape[1], dtype=torch.float16, device="cuda")
            torch.testing.assert_close(F.linear(x, sparse), F.linear(x, w), rtol=2e-2, atol=2e-1)
            env = {"F": F, "x": x, "w": w, "s": sparse}
            dense_ms = median_ms("F.linear(x, w)", env, min_run_time)
            sparse_ms = median_ms("F.linear(x, s)", env, min_run_time)
            speedup = dense_ms / sparse_ms
            (pays if speedup > PAYS else not_pays).append(b)
            print(
                f"| {name} {tuple(w.shape)} | {b} | {dense_ms:.4f} | {sparse_ms:.4f} | "
                f"{speedup:.2f}x |"
            )
        verdicts.append(
            f"{name} {tuple(w.shape)}: 2:4 pays at batch {pays or 'none'}; "
            f"not at {not_pays or 'none'}"
        )
    print()
    print("\n".join(verdicts))


def run_cpu(weights, batches, min_run_time) -> None:
    from torch.sparse import to_sparse_semi_structured
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
        sparse_semi_structured_to_dense_cutlass,
    )

    print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}\n")
    first = next(iter(weights.values())).to(torch.float16).contiguous()
    try:
        to_sparse_semi_structured(first)
        print("to_sparse_semi_structured converted a CPU tensor (unexpected for torch 2.13)")
    except RuntimeError as e:
        print(f"to_sparse_semi_structured on CPU: RuntimeError: {e}")
        print("semi-structured (2:4) kernels need CUDA (sparse tensor cores, sm80+); on a CPU")
        print("the export is checked and packed, and dense is timed against CSR instead.\n")
    for name, w in weights.items():
        half = w.to(torch.float16).contiguous()
        packed, meta = sparse_semi_structured_from_dense_cutlass(half)
        exact = torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta), half)
        print(
            f"{name} {tuple(w.shape)}: CUTLASS packing -> values {tuple(packed.shape)} + meta "
            f"{tuple(meta.shape)} {meta.dtype}, round trip exact: {exact}"
        )
        if not exact:
            raise SystemExit(f"{name}: the 2:4 packing does not round-trip")
    print()
    print("| weight [out, in] | batch | dense fp32 ms | CSR (50% zeros) ms | CSR time / dense |")
    print("|---|---:|---:|---:|---:|")
    for name, w in weights.items():
        w = w.float().contiguous()
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            csr = w.to_sparse_csr()
        for b in batches:
            x = torch.randn(w.shape[1], b)
            torch.testing.assert_close(torch.sparse.mm(csr, x), w @ x, rtol=1e-4, atol=1e-3)
            env = {"torch": torch, "x": x, "w": w, "csr": csr}
            dense_ms = median_ms("w @ x", env, min_run_time)
            csr_ms = median_ms("torch.sparse.mm(csr, x)", env, min_run_time)
            print(
                f"| {name} {tuple(w.shape)} | {b} | {dense_ms:.3f} | {csr_ms:.3f} | "
                f"{csr_ms / dense_ms:.2f}x |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="an N:M export (.safetensors from nm_export.write_nm)")
    parser.add_argument("--shapes", nargs="+", help="random 2:4 weights, e.g. 4096x4096 (out x in)")
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timing")
    parser.add_argument("--cutlass", action="store_true", help="CUDA: the CUTLASS backend")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.weights:
        weights = load_weights(args.weights)
        print(f"weights: {args.weights} ({len(weights)} matrices)")
    else:
        shapes = args.shapes or (CUDA_SHAPES if cuda else CPU_SHAPES)
        weights = {}
        for i, spec in enumerate(shapes):
            out, inp = (int(d) for d in spec.lower().split("x"))
            weights[f"random{i}"] = random_2of4(out, inp, torch.float32, "cpu", seed=i)
        print(f"weights: random 2:4 of shapes {list(shapes)}")
    bad = [name for name, w in weights.items() if not is_2of4(w)]
    if bad:
        raise SystemExit(f"not 2:4 along `in` (groups of 4 consecutive entries of a row): {bad}")
    batches = args.batches or (CUDA_BATCHES if cuda else CPU_BATCHES)
    if cuda:
        run_cuda(weights, batches, args.min_run_time, args.cutlass)
    else:
        run_cpu(weights, batches, args.min_run_time)


if __name__ == "__main__":
    main()
