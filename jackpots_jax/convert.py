"""Deprecated: the weight importer and exporter moved to `jackpots_jax.io.weights`."""

import warnings

from jackpots_jax.io.errors import CheckpointMismatchError
from jackpots_jax.io.weights import (
    export_state_dict,
    import_checkpoint,
    load_state_dict,
    save_state_dict,
    to_flax,
    to_torch_state_dict,
)

warnings.warn(
    "jackpots_jax.convert is deprecated: import jackpots_jax.io.weights instead",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "CheckpointMismatchError",
    "export_state_dict",
    "import_checkpoint",
    "load_state_dict",
    "save_state_dict",
    "to_flax",
    "to_torch_state_dict",
]
