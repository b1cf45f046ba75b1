"""Deprecated: the runner moved to `jackpots_jax.experiment` (`experiment.modes`)."""

import warnings

from jackpots_jax.experiment.loop import NonFiniteLossError, train_loop
from jackpots_jax.experiment.modes import MODES, train_and_evaluate

warnings.warn(
    "jackpots_jax.train is deprecated: import train_and_evaluate from jackpots_jax.experiment",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["MODES", "NonFiniteLossError", "train_and_evaluate", "train_loop"]
