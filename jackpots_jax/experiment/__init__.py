"""The experiment runner behind the command line: one user of the `jackpots_jax` library.

* `config`: every config field, its default and the checks run before any compute;
* `modes`: `train_and_evaluate(config, workdir)` and the table of modes;
* `phases`: pre-training, evaluation, BN re-estimation, the search, the export;
* `loop`: the one training loop (`train_loop`) and its hooks;
* `logs`: `metrics.jsonl`, TensorBoard event files, the progress bar;
* `report`: Markdown tables, plots and `report.md`.

The library (`jackpots_jax.sparsity`, `.masks`, `.restriction`, `.step`, `.parallel`, `.models`,
`.data`, `.io`) never imports this package.
"""

from jackpots_jax.experiment.loop import NonFiniteLossError, train_loop
from jackpots_jax.experiment.modes import MODES, train_and_evaluate

__all__ = ["MODES", "NonFiniteLossError", "train_and_evaluate", "train_loop"]
