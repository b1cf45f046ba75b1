"""Tokens per second of a language model's search step against its dense training step, and memory.

Measures, on this machine and one device, with random token windows, for SmolLM2-135M (or
`--quick`: a tiny random Llama):
  * `dense`: `step.train_step` of all parameters with the next-token loss, weight decay 5e-4 and
    SGD momentum 0.9 (the dense step a fine-tune would take);
  * `search <pattern> rate <r>`: `step.search_step` with `step.search_optimizer` (SGD momentum
    0.9, no weight decay, short restriction at the constant rate `r`: 1 is the exact top-k refresh
    after every step, 0.5 the restricted one) over 50%-sparse masks of every q/k/v/o and MLP
    kernel (`uniform` budget, magnitude init), unstructured and 2:4.
Every step is compiled first (not timed) and warmed up; then `--repeats` rounds, each running
`--steps` steps of every variant in turn, every step blocked on. Reported per variant: the median
over rounds of the mean seconds per step, tokens per second, and the median of the per-round
ratios against the dense step. Memory per variant: XLA's memory analysis of the compiled step
(arguments + outputs - aliased + temporaries), and the bytes of the state a step carries (dense:
params + optimiser state; search: scores + optimiser state with the masks; the frozen weights
apart), against the bytes of the dense weights. The processor and load average are printed: the
machine may be shared. Weights are random (the timing does not depend on their values).

Run:
  python benchmarks/lm_step.py                          # SmolLM2-135M, windows of 256, batch 1
  python benchmarks/lm_step.py --quick                  # tiny Llama, seconds
  python benchmarks/lm_step.py --batch 16 --steps 10 --repeats 5 \
      --dtype bfloat16                                  # on a GPU (e.g. an H200)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from step import Variant, load_average, machine_info

import jackpots_jax as jj
from jackpots_jax import models
from jackpots_jax.models import llama

SPARSITY = 0.5
QUICK = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4}


def tree_bytes(tree) -> int:
    return sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def compiled_bytes(variant: Variant) -> int:
    m = variant.step.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def build(args):
    if args.quick:
        name, vocab, options = "llama", 512, QUICK
    else:
        name, vocab, options = "smollm2_135m", llama.SMOLLM2_135M.vocab_size, {}
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    network = models.network(name, vocab, dtype, **options)
    params, _ = jax.jit(lambda k: network.init(k))(jax.random.key(args.seed))
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, vocab, (args.batch, args.seq_len + 1)).astype(np.int32)
    batch = {
        "inputs": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "weights": jnp.ones((args.batch, args.seq_len), jnp.float32),
    }
    loss_fn = jj.losses.next_token()
    common = {"apply_fn": network.apply_fn, "loss_fn": loss_fn, "inputs": "inputs"}
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    dense_state = jj.engine.create_train_state(params, {}, tx)
    variants = [
        Variant(
            "dense",
            lambda s, b: jj.engine.train_step(s, b, tx=tx, **common),
            dense_state,
            (batch,),
        )
    ]
    states = {"dense": tree_bytes((dense_state.params, dense_state.opt_state))}
    for pattern in args.patterns:
        budget = jj.layer_budgets(params, SPARSITY, "uniform", dense=llama.DENSE, pattern=pattern)
        scores, _ = jj.init_scores(params, budget, "magnitude")
        for rate in args.rates:
            stx = jj.search_optimizer(
                budget,
                learning_rate=0.1,
                weight_decay=0.0,
                total_steps=1000,
                rate=rate,
                selection=args.selection,
            )
            state = jj.engine.create_search_state(scores, stx)
            name = f"search {pattern} rate {rate:g}"

            def search(s, p, b, stx=stx):
                return jj.engine.search_step(s, p, b, tx=stx, **common)

            variants.append(Variant(name, search, state, (params, batch)))
            states[name] = tree_bytes((state.scores, state.opt_state))
    return network, params, variants, states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"])
    parser.add_argument("--rates", nargs="+", type=float, default=[1.0, 0.5])
    parser.add_argument("--selection", default="auto", help="exact selection (auto: by backend)")
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--repeats", type=int, default=2, help="rounds (median over rounds)")
    parser.add_argument("--warmup", type=int, default=1, help="steps before timing")
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    print(f"machine: {machine_info()}; device: {jax.devices()[0].device_kind}")
    print(f"load average at start: {load_average()}")
    print(" ".join(sys.argv))
    network, params, variants, states = build(args)
    weights = tree_bytes(params)
    print(
        f"model: {network.spec.name}, {sum(x.size for x in jax.tree.leaves(params)):,} params "
        f"({weights / 2**20:.1f} MiB float32), windows {args.batch} x {args.seq_len}, "
        f"{args.dtype}"
    )
    for v in variants:
        print(f"compiled {v.name} in {v.compile():.1f} s", flush=True)
    for v in variants:
        for _ in range(args.warmup):
            v.once()
        v._round.clear()
    for r in range(args.repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for _ in range(args.steps):
            for v in order:
                v.once()
        for v in variants:
            v.end_round()
    dense = variants[0]
    tokens = args.batch * args.seq_len
    rows = []
    for v in variants:
        seconds = statistics.median(v.rounds)
        ratio = statistics.median(a / b for a, b in zip(v.rounds, dense.rounds, strict=True))
        rows.append(
            {
                "variant": v.name,
                "s_per_step": seconds,
                "tokens_per_s": tokens / seconds,
                "vs_dense": ratio,
                "compiled_bytes": compiled_bytes(v),
                "state_bytes": states[v.name],
            }
        )
    header = "| step | s/step | tokens/s | x dense time | XLA memory (MiB) | state (MiB) |"
    print(f"\n{header}\n|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['s_per_step']:.3f} | {row['tokens_per_s']:,.0f} | "
            f"{row['vs_dense']:.2f} | {row['compiled_bytes'] / 2**20:,.0f} | "
            f"{row['state_bytes'] / 2**20:,.0f} |"
        )
    print(f"\ndense weights: {weights / 2**20:,.0f} MiB (frozen; an argument of the search step)")
    print(f"load average at end: {load_average()}")
    if args.json:
        with open(args.json, "w") as f:
            meta = {"machine": machine_info(), "load_end": load_average(), "args": vars(args)}
            json.dump({"meta": meta, "weights_bytes": weights, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"wall time: {time.perf_counter() - started:.0f} s")
