"""Checkpoints of the registered models: one entry point, one converter per weight family.

`import_checkpoint` and `export_state_dict` dispatch on the model's `ModelSpec.converter`:

- `'torch'` (`jackpots_jax.io.torch_weights`): the CNNs' PyTorch state dicts (torchvision ResNets,
  the lottery-jackpots reference code's CIFAR and ImageNet checkpoints, the common CIFAR code's);
- `'vit'` (`jackpots_jax.io.vit_weights`): timm safetensors, the `.npz` of vision_transformer and
  big_vision in; the timm layout out;
- `'llama'` (`jackpots_jax.io.llama_weights`): GGUF files, Hugging Face safetensors files and
  folders in; the Hugging Face layout out.

Each converter module has `import_for_model(path, model_name, num_classes, *, allow_pickle,
**options)` and `export_for_model(variables, masks, model_name, path, *, scores, classifier,
**options)`; a new family is one such module and one entry in `CONVERTERS`. The file formats
themselves live in `jackpots_jax.io.formats`: `.safetensors` and `.npz` need only numpy; `.pth` /
`.pt` / `.tar` need PyTorch, imported only when such a file is read or written.

Every mismatch between a checkpoint and the model (a missing key, an unexpected key, a wrong
shape) raises `CheckpointMismatchError` naming the keys: a partial load is never silent.

Example:
  >>> variables, scores, masks = import_checkpoint("vgg19_c10.pth", "vgg19", allow_pickle=True)
  >>> logits = models.create("vgg19", 10).apply(variables, images, train=False)
  >>> export_state_dict(variables, masks, "vgg19", "jackpot.safetensors")
"""

from __future__ import annotations

import os
from typing import Any

from jackpots_jax import models
from jackpots_jax.io import llama_weights, torch_weights, vit_weights
from jackpots_jax.io.formats import StateDict

PyTree = Any

# One converter module per weight family, chosen by the model's `ModelSpec.converter`.
CONVERTERS = {"torch": torch_weights, "vit": vit_weights, "llama": llama_weights}


def import_checkpoint(
    path: str | os.PathLike,
    model_name: str,
    num_classes: int | None = None,
    *,
    allow_pickle: bool = False,
    **model_kwargs,
) -> tuple[PyTree, PyTree | None, PyTree | None]:
    """Reads a checkpoint file and converts it: `to_flax(load_state_dict(path), ...)`.

    Args:
      path: `.safetensors`, `.npz`, or a PyTorch file (`.pth`, `.pt`, ...; needs PyTorch); for
        a Llama-family model (`smollm2_135m`, `llama`) a `.gguf` file, a Hugging Face folder or
        a `.safetensors` file with `config.json` beside it (`io.llama_weights`).
      model_name: a registered model (`jackpots_jax.models.names()`).
      num_classes: number of classes; by default read from the classifier's weight.
      allow_pickle: see `load_state_dict`.
      **model_kwargs: model options passed to `models.create`.

    Returns:
      `(variables, scores, masks)` as from `to_flax`.

    Raises:
      CheckpointMismatchError: the file does not match the model (the keys are listed).
    """
    converter = CONVERTERS[models.spec(model_name).converter]
    return converter.import_for_model(
        path, model_name, num_classes, allow_pickle=allow_pickle, **model_kwargs
    )


def export_state_dict(
    variables: PyTree,
    masks: PyTree | None,
    model_name: str,
    path: str | os.PathLike,
    *,
    scores: PyTree | None = None,
    classifier: str | None = None,
    **model_kwargs,
) -> StateDict:
    """Writes a jackpot (`W * M` plus the masks) as a PyTorch-style state dict file.

    Args:
      variables: `{'params', 'batch_stats'}` of the model.
      masks: the jackpot's masks (see `to_torch_state_dict`), or `None` for dense weights.
      model_name: the registered model the variables belong to.
      path: `.safetensors` (recommended; no PyTorch needed), `.npz`, or `.pth` / `.pt`.
      scores: optional scores, written as `<layer>.mask`.
      classifier: `"linear"` or `"conv1x1"` (see `to_torch_state_dict`).
      **model_kwargs: model options passed to `models.create`.

    Returns:
      The state dict that was written. `import_checkpoint(path, model_name)` reads it back,
      masks included; in PyTorch, `model.load_state_dict` takes it once the `.b_mask` / `.mask`
      entries are popped (or into the reference code's masked layers as they are).
    """
    converter = CONVERTERS[models.spec(model_name).converter]
    return converter.export_for_model(
        variables, masks, model_name, path, scores=scores, classifier=classifier, **model_kwargs
    )
