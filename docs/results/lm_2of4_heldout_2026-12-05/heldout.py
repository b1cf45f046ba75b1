"""A seed's masks of the SmolLM2 2:4 study, evaluated on a text none of them saw.

    python docs/results/lm_2of4_heldout_2026-12-05/heldout.py STUDY [CORPUS [WINDOWS [SEEDS]]]

(`STUDY`: the study's work directory.)

Every mask of the study (`configs/lm_2of4.py`) was chosen on CPython's help topics: Wanda's and
SparseGPT's calibrated on 32 training windows of them, each jackpot searched on 128 steps of
their training windows. A search sees 8 times the calibration's tokens of that one text, so part
of what it gains may be the text rather than the model. This evaluates dense, magnitude, Wanda,
SparseGPT's mask (weights frozen) and the three jackpots of each seed (default 0,1,2) on the
validation windows of another corpus (default `fortunes`, Debian's fortune cookies: English
prose and verse, no Python), and again on the study's own validation windows (each must equal
the study's row: the check that these are the study's masks). Wanda's and SparseGPT's masks are
recomputed as the study's job computes them (the same config, each seed); the jackpots are read
from `STUDY/studies/seed_<seed>/export_2of4_<init>/masks.npz`. Writes
`STUDY/heldout_<corpus>.json`.
"""

import dataclasses
import importlib.util
import json
import os
import sys

import jax
import numpy as np

from jackpots_jax import baselines
from jackpots_jax.experiment import context, lm, modes, phases, recipes
from jackpots_jax.io.export import masks_from_npz
from jackpots_jax.masks import init_scores

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _config(seed, corpus=None, windows=None):
    spec = importlib.util.spec_from_file_location("c", os.path.join(ROOT, "configs/lm_2of4.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(None)
    config.mode, config.seed = "jackpot", seed
    if corpus:
        config.dataset.name = corpus
    if windows is not None:
        config.dataset.num_eval = windows
    return config


def _masks(own, params, budget, config, seed_dir):
    """The seed's masks: one-shot ones recomputed as the study's job does, jackpots from disk."""
    p = config.prune
    stats = lm.calibration_stats(
        own, params, budget, num_windows=p.calibration_windows,
        batch_size=p.calibration_batch, seed=config.seed, gram=True,
    )  # fmt: skip
    _, magnitude = init_scores(params, budget, "magnitude")
    sparsegpt, _ = baselines.sparsegpt_masks(
        params, budget, stats, blocksize=p.sparsegpt_blocksize, percdamp=p.sparsegpt_damp
    )
    masks = {
        "dense": None,
        "magnitude pruning (2:4)": magnitude,
        "Wanda (2:4)": baselines.wanda_masks(params, budget, stats),
        "SparseGPT mask, weights frozen (2:4)": sparsegpt,
    }
    for init in ("magnitude", "wanda", "sparsegpt"):
        path = os.path.join(seed_dir, f"export_2of4_{init}", "masks.npz")
        masks[f"jackpot (2:4, from {init})"] = masks_from_npz(path, budget)
    return masks


def main(study, corpus="fortunes", windows="32", seeds="0,1,2"):
    config = _config(0)
    own = modes._context(config, os.path.join("/tmp", "heldout_own"), 1)
    other_config = _config(0, corpus, int(windows))
    other = modes._context(other_config, os.path.join("/tmp", "heldout_other"), 1)
    variables, _, _ = context.pretrained(own, lm.weights_recipe(own, config))
    params = variables["params"]
    recipe = dataclasses.replace(recipes.search_recipe(config), pattern="2:4")
    budget = recipe.budget(params, own.network.spec)
    print(f"# python {' '.join(sys.argv)}")
    print(f"# {corpus}: the first {windows} validation windows of {other.data.seq_len} tokens")
    out = {}
    for seed in map(int, seeds.split(",")):
        seed_dir = os.path.join(study, "studies", f"seed_{seed}")
        masks = _masks(own, params, budget, _config(seed), seed_dir)
        with open(os.path.join(seed_dir, "results.json")) as f:
            study_rows = {r["model"]: r for r in json.load(f)}
        print(f"\n## seed {seed}\n")
        print(f"| row | perplexity, study's text (the study's row) | perplexity, {corpus} |")
        print("|---|---:|---:|")
        out[seed] = {}
        for name, m in masks.items():
            mine = phases.evaluate(own, params, {}, m)
            theirs = phases.evaluate(other, params, {}, m)
            study_ppl = study_rows[name]["perplexity"]
            out[seed][name] = {"own": mine, "study": study_ppl, corpus: theirs}
            print(
                f"| {name} | {mine['perplexity']:,.2f} ({study_ppl:,.2f}) | "
                f"{theirs['perplexity']:,.2f} |",
                flush=True,
            )
        print(f"\n{corpus} tokens scored: {theirs['count']}; the study's text: {mine['count']}")
    print(f"\n## mean over seeds {seeds}\n")
    print(f"| row | perplexity, study's text | perplexity, {corpus} |")
    print("|---|---:|---:|")
    for name in out[next(iter(out))]:
        mine = np.mean([out[s][name]["own"]["perplexity"] for s in out])
        theirs = np.mean([out[s][name][corpus]["perplexity"] for s in out])
        print(f"| {name} | {mine:,.2f} | {theirs:,.2f} |")
    print(f"\ndevice: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    with open(os.path.join(study, f"heldout_{corpus}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
