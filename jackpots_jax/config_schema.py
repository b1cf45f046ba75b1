"""Deprecated: the config schema moved to `jackpots_jax.experiment.config`."""

import warnings

from jackpots_jax.experiment.config import (
    DTYPES,
    SCHEDULES,
    VARIANTS,
    ConfigError,
    base_config,
    check,
    cifar_recipe,
    imagenet_recipe,
)

warnings.warn(
    "jackpots_jax.config_schema is deprecated: import jackpots_jax.experiment.config instead",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "DTYPES",
    "SCHEDULES",
    "VARIANTS",
    "ConfigError",
    "base_config",
    "check",
    "cifar_recipe",
    "imagenet_recipe",
]
