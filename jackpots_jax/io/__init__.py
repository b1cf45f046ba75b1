"""Reading and writing: one home for each I/O job of the library.

* `checkpoints`: resume a search or a training run exactly (`Checkpointer`, `fingerprint`);
* `export`: what a finished search leaves (`export_jackpot`, `masks_from_npz`);
* `weights`: checkpoint files <-> Flax variables of the registered models (`import_checkpoint`,
  `export_state_dict`), one converter module per weight family chosen by the model's spec:
  `torch_weights` (the CNNs' PyTorch state dicts), `vit_weights` (timm, vision_transformer,
  big_vision), `llama_weights` (GGUF via `gguf`, Hugging Face safetensors);
* `formats`: the files of state dicts (safetensors, npz, PyTorch pickles);
* `files`: the atomic file writer and the JSON conversion every file uses;
* `errors`: `CheckpointMismatchError`, raised by all of them when a file does not fit.
"""

from jackpots_jax.io import checkpoints, export, files, formats, weights
from jackpots_jax.io.checkpoints import CheckpointCorruptError, Checkpointer, fingerprint
from jackpots_jax.io.errors import CheckpointMismatchError
from jackpots_jax.io.export import export_jackpot, masks_from_npz
from jackpots_jax.io.weights import export_state_dict, import_checkpoint

__all__ = [
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "Checkpointer",
    "checkpoints",
    "export",
    "export_jackpot",
    "export_state_dict",
    "files",
    "formats",
    "fingerprint",
    "import_checkpoint",
    "masks_from_npz",
    "weights",
]
