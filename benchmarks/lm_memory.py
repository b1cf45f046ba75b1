"""Memory per device of a language model's jackpot search under FSDP, sized from shapes alone.

For a Llama-family model (SmolLM2-135M, LLaMA-2-7B, Llama-3-8B, or any `--options`), builds the
search state the runner builds (`jj.init_scores`, `jj.search_optimizer` with SGD momentum,
`jj.engine.create_search_state`) under `jax.eval_shape`: nothing is allocated, so a 7B model is
sized on a laptop. Every leaf is then placed as `jj.parallel.fsdp_dims` places it on a
`('data', 'fsdp')` mesh (the largest dimension the `fsdp` size divides; a leaf none divides is
whole on every device), and the bytes each device holds are summed by kind:

  * frozen weights (float32, as the library holds them also under `model.dtype=bfloat16`,
    which casts them for the matmuls; only a search's input, never changed or saved);
  * scores (float32, one per masked weight);
  * optimiser state (the momentum of the scores, float32);
  * masks (bool, one byte per masked weight, inside the optimiser state);
  * for comparison, a dense fine-tune's state: float32 params and their SGD momentum.

Not counted: activations and their gradients (they depend on batch, sequence length and
rematerialisation; `benchmarks/lm_step.py` reports XLA's figure for a compiled step), the
dense model's outputs of `search.loss=kl` (batch x sequence x vocabulary), and XLA's temporaries.
`tests/test_benchmarks.py` checks the accounting against the bytes that arrays placed on 8 CPU
devices by `jj.parallel.place_state` really hold.

Run:
  python benchmarks/lm_memory.py                       # LLaMA-2-7B, 2:4, fsdp 1..256
  python benchmarks/lm_memory.py --model smollm2_135m --fsdp 1 8
  python benchmarks/lm_memory.py --model llama3_8b --pattern unstructured
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh

import jackpots_jax as jj
from jackpots_jax import models
from jackpots_jax._tree import named_leaves
from jackpots_jax.models import llama

# name: (registered model, vocabulary, model options). The published architectures.
MODELS = {
    "smollm2_135m": ("smollm2_135m", llama.SMOLLM2_135M.vocab_size, {}),
    "llama2_7b": (
        "llama",
        32000,
        {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_layers": 32,
            "num_heads": 32,
            "num_kv_heads": 32,
            "max_seq_len": 4096,
        },
    ),
    "llama3_8b": (
        "llama",
        128256,
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_layers": 32,
            "num_heads": 32,
            "num_kv_heads": 8,
            "rope_theta": 500000.0,
            "max_seq_len": 8192,
        },
    ),
}
KINDS = ("weights", "scores", "optimizer", "masks")


def abstract_search(
    name: str, vocab: int, options: dict, *, sparsity: float, pattern: str, rate: float
):
    """`(params, state)` of a search as `jax.ShapeDtypeStruct`s: the runner's recipe, no memory."""
    network = models.network(name, vocab, jnp.float32, **options)
    params = jax.eval_shape(lambda k: network.init(k)[0], jax.random.key(0))
    # The uniform budget depends on shapes only: it takes the abstract leaves as they are.
    budget = jj.layer_budgets(params, sparsity, "uniform", dense=llama.DENSE, pattern=pattern)
    tx = jj.search_optimizer(budget, learning_rate=0.1, total_steps=1000, rate=rate)

    def build(p):
        scores, _ = jj.init_scores(p, budget, "magnitude")
        return jj.engine.create_search_state(scores, tx)

    return params, jax.eval_shape(build, params)


def leaf_bytes(leaf) -> int:
    return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def per_device(tree, fsdp: int) -> int:
    """Bytes of `tree` on one device when its leaves are placed as `jj.parallel` places them."""
    mesh = AbstractMesh((1, fsdp), ("data", "fsdp"))
    dims = jj.parallel.fsdp_dims(tree, mesh)

    def one(leaf, dim):
        return 0 if leaf is None else leaf_bytes(leaf) // (fsdp if dim is not None else 1)

    return sum(jax.tree.leaves(jax.tree.map(one, tree, dims, is_leaf=lambda x: x is None)))


def split_state(state) -> dict:
    """The search state's trees by kind: scores, masks, the rest of the optimiser state."""
    masks, rest = {}, {}
    for path, leaf in named_leaves(state.opt_state):
        if leaf is not None:
            (masks if leaf.dtype == jnp.bool_ else rest)[path] = leaf
    return {"scores": state.scores, "optimizer": rest, "masks": masks}


def table(params, state, fsdps) -> list[dict]:
    trees = {"weights": params, **split_state(state)}
    dense_f32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
    rows = []
    for n in fsdps:
        row = {"fsdp": n, **{k: per_device(trees[k], n) for k in KINDS}}
        row["search_total"] = sum(row[k] for k in KINDS)
        row["finetune_total"] = 2 * per_device(dense_f32, n)  # float32 params + momentum
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama2_7b", choices=sorted(MODELS))
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--fsdp", type=int, nargs="+", default=[1, 8, 16, 32, 64, 256])
    args = parser.parse_args()
    name, vocab, options = MODELS[args.model]
    params, state = abstract_search(
        name, vocab, options, sparsity=args.sparsity, pattern=args.pattern, rate=args.rate
    )
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    masked = sum(math.prod(x.shape) for x in jax.tree.leaves(state.scores))
    print(
        f"model: {args.model} ({count:,} parameters, {masked:,} masked), pattern {args.pattern} "
        f"at sparsity {args.sparsity}, rate {args.rate}"
    )
    gib = 2**30
    print(
        "\n| fsdp | frozen weights | scores | optimizer | masks | search state in all "
        "| dense fine-tune (float32 params + momentum) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in table(params, state, args.fsdp):
        cells = [f"{row[k] / gib:.2f}" for k in (*KINDS, "search_total", "finetune_total")]
        print(f"| {row['fsdp']} | " + " | ".join(cells) + " |")
    print("\nGiB per device; activations, the KL loss's dense outputs and XLA temporaries apart.")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"wall time: {time.perf_counter() - started:.1f} s")
