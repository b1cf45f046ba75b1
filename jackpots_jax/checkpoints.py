"""Deprecated: checkpoints moved to `jackpots_jax.io.checkpoints`, the export to `.io.export`."""

import warnings

from jackpots_jax.io.checkpoints import CheckpointCorruptError, Checkpointer, fingerprint
from jackpots_jax.io.errors import CheckpointMismatchError
from jackpots_jax.io.export import export_jackpot, masks_from_npz

warnings.warn(
    "jackpots_jax.checkpoints is deprecated: import jackpots_jax.io.checkpoints (resume) and "
    "jackpots_jax.io.export (masks and weights of a jackpot) instead",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "Checkpointer",
    "export_jackpot",
    "fingerprint",
    "masks_from_npz",
]
