r"""A lottery jackpot in a pre-trained ViT-B/16 on ImageNet, from weights the user names (not run).

    python -m jackpots_jax.main --config configs/imagenet_vit.py --workdir workdir/imagenet_vit \
        --config.weights.path=/path/to/ViT-B_16.npz --config.model.kwargs.gelu_approximate=True

`weights.path` takes the `.npz` of google-research/vision_transformer (e.g. the augreg
`ViT-B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz`)
or big_vision (both trained with the tanh GELU: pass `gelu_approximate=True` as above), or a timm
/ Hugging Face `model.safetensors` of `vit_base_patch16_224` (exact GELU: leave it out); the
layout is recognised from the keys and every mismatch is listed (`jackpots_jax.io.vit_weights`).
The ImageNet copy is tfds' `imagenet2012` (see `docs/configs.md`, "Data"). These checkpoints were
trained on inputs scaled to [-1, 1] (vision_transformer, big_vision) or normalised by ImageNet's
mean and standard deviation (timm); the input pipeline normalises by ImageNet's mean and standard
deviation, so evaluate the dense model first (`--config.mode=evaluate`) and expect a gap for the
JAX checkpoints.

The search: 50% sparsity (transformers lose far more than CNNs to one-shot magnitude pruning; 90%
is the CNN recipe's figure) over the patch embedding and the six kernels of every block
(`vit.DENSE`), global magnitude budget, magnitude init, 10 epochs, batch 512 on the accelerators
the job finds, the paper's score optimiser. Nothing here was run: no ImageNet copy or accelerator
was available; a 2:4 variant is `--config.search.pattern=2:4 --config.search.sparsity=0.5
--config.search.indivisible=dense` (the patch embedding's 3 input channels are not a multiple of
4).

Variants: `tiny` (a 1-block, width-32 ViT for a few steps on a few images of an ImageNet-format
dataset, random weights on purpose: for the end-to-end tests).
"""

from jackpots_jax.experiment.config import base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.mode = "search"
    config.model.name = "vit_b16"
    config.model.num_classes = 1000
    config.dataset.name = "imagenet2012"

    config.search.sparsity = 0.5
    config.search.rule = "global_magnitude"
    config.search.init = "magnitude"
    config.search.epochs = 10
    config.search.batch_size = 512
    config.search.learning_rate = 0.1
    config.search.momentum = 0.9
    config.search.weight_decay = 1e-4
    config.search.augment = True

    config.eval.batch_size = 500
    config.checkpoint.every_steps = 1000
    config.log_every_steps = 100
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant {arg!r} of configs/imagenet_vit.py; allowed: 'tiny'")
    if arg == "tiny":
        config.model.kwargs.depth = 1
        config.model.kwargs.width = 32
        config.model.kwargs.mlp_dim = 64
        config.model.kwargs.num_heads = 2
        config.weights.random = True
        config.dataset.num_train = 4
        config.dataset.num_eval = 4
        config.search.epochs = 1
        config.search.batch_size = 2
        config.eval.batch_size = 2
        config.checkpoint.every_steps = 1
        config.log_every_steps = 1
    return config
