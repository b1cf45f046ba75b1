r"""2:4 masks for a language model against the one-shot baselines: MaskLLM's table, on SmolLM2-135M.

    python -m jackpots_jax.main --config configs/lm_2of4.py --workdir workdir/lm_2of4

The job of `configs/lm_smollm2.py` (the packaged SmolLM2-135M-Instruct GGUF, CPython's help
topics in 128-token windows, every q/k/v/o and MLP kernel masked, the weights frozen) with the
rows of MaskLLM's table (Fang et al. 2024), at 2:4 (and unstructured 50% in `both` and `full`):

* dense; one-shot magnitude pruning; Wanda; SparseGPT's mask over the frozen weights; SparseGPT
  with its updated weights (the only row that changes weights);
* a jackpot search from each of three initial masks: magnitude's (the paper's init), Wanda's and
  SparseGPT's (the "prior" of MaskLLM), each kept / pruned at scores 1 / 1 - gap.

Every row is also evaluated on two corpora no mask saw (`eval.also_on`: Debian's fortunes and
the standard library's source, the first `dataset.num_eval` validation windows of each): a mask
searched on one text fits that text (`docs/lm_runner.md`), and these columns say how much.

The report adds the loss by block: every mask over the frozen weights evaluated with one block
pruned at a time (the rest dense), which blocks lose most under each method (`eval.by_block`;
on SmolLM2 one evaluation of the validation text per block and mask, 30 x 6).

Wanda and SparseGPT are calibrated on `prune.calibration_windows` (32) training windows of 128
tokens drawn with the seed: 4,096 tokens (the SparseGPT paper used 128 x 2,048). Each layer is
pruned from the dense model's inputs to it (not in sequence through the pruned layers).

The job runs in `studies` mode: the whole table at each seed of `studies.seeds` (0, 1, 2; the
seed draws the calibration windows and the order of the search's training windows), each seed in
`<workdir>/studies/seed_<s>/`, then `<workdir>/studies/report.md` and `results.json`: per pattern
each row's perplexity per seed, mean and spread, the share of the gap to dense each row closes,
tokens seen and wall time, the device; the perplexity of every search against the tokens searched;
the loss by block of the first seed (`experiment.lm_studies`). A finished seed is not run again;
`--config.studies.report_only=True` writes the report of the seeds finished so far. One seed as a
plain job (results in the workdir itself): `--config.mode=jackpot --config.seed=<s>`.

Variants:

* default: 2:4, the CPU schedule of `lm_smollm2.py` searched twice as long: 128 search steps
  of 2 windows (32,768 tokens), Adam on the scores at learning rate 0.0003
  (`docs/results/lm_2of4_adam_probe_2026-12-05/`), the validation perplexity every 16 steps;
* `both`: also unstructured 50% (a second table);
* `full`: for an accelerator: every validation token, 256-token windows, 128 calibration
  windows, 2 epochs of the training windows at batch 16, both patterns;
* `quick`: the random two-block Llama of `tests/test_lm_main.py`, both patterns, 8 search steps,
  seeds 0 and 1 (the end-to-end test of CI).
"""

import importlib.util
import os

import ml_collections

VARIANTS = ("", "both", "full", "quick")


def _smollm2_config(arg):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_smollm2.py")
    spec = importlib.util.spec_from_file_location("_lm_smollm2_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None):
    if arg not in (None, *VARIANTS):
        raise ValueError(
            f"unknown variant {arg!r} of configs/lm_2of4.py; allowed: 'both', 'full', 'quick'"
        )
    config = _smollm2_config({"full": "full", "quick": "tiny"}.get(arg))
    config.mode = "studies"
    patterns = ("2:4", "unstructured") if arg in ("both", "full", "quick") else ("2:4",)
    config.search.patterns = patterns
    config.search.inits = ("magnitude", "wanda", "sparsegpt")
    config.prune.baselines = ("wanda", "sparsegpt")
    config.eval.by_block = True  # the loss by block (first seed): one evaluation per block and mask
    # Every row also on texts no mask saw: the first `dataset.num_eval` validation windows of each.
    config.eval.also_on = ("fortunes", "python_stdlib")
    config.unlock()
    config.studies = ml_collections.ConfigDict()
    config.studies.seeds = (0, 1, 2)
    config.studies.report_only = False  # True: the report of the seeds finished so far, no run
    config.studies.keep_checkpoints = False  # a finished seed's search checkpoints are deleted
    if arg != "full":  # the accelerator's schedule is 2 epochs (`max_steps` 0)
        config.search.max_steps = 128  # the perplexity still fell at 64 (the Adam probe)
    if arg == "full":
        config.prune.calibration_windows = 128
    if arg == "quick":
        config.eval.also_on = ("pydoc_topics",)  # the test's corpus is a fortunes folder
        config.studies.seeds = (0, 1)
        config.prune.calibration_windows = 6
        config.prune.calibration_batch = 4  # a last batch of 2
        config.search.max_steps = 8
    return config
