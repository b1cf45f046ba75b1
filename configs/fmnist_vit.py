r"""A lottery jackpot in a Vision Transformer pre-trained on Fashion-MNIST (offline, 2 CPU cores).

    python -m jackpots_jax.main --config configs/fmnist_vit.py:pretrain --workdir workdir/fmnist_vit
    for s in 0.5 0.7 0.9; do
      python -m jackpots_jax.main --config configs/fmnist_vit.py --workdir workdir/fmnist_vit/$s \
          --config.search.sparsity=$s \
          --config.weights.path=workdir/fmnist_vit/pretrain/model.safetensors
    done

`vit_fmnist` (width 96, depth 4, 4 heads, MLP 192, 7x7 patches: 16 tokens, global average
pooling; `jackpots_jax.models.vit`) is pre-trained dense with the recipe that
`benchmarks/vit_fmnist_recipe.py` measured (AdamW 1e-3, one warm-up epoch, cosine to 0, weight
decay 0.05 on the kernels, gradients clipped to norm 1, label smoothing 0.1, no augmentation:
88.21% after 8 epochs, about 11 minutes on the loaded 2-core machine; with random flips and 2e-3,
which the runner's `augment` (crops and flips) does not offer, 88.91%). Each sparsity's run then
evaluates the dense model, one-shot magnitude pruning and the jackpot searched from the magnitude
init (3 epochs, the paper's score optimiser) over the masked kernels: the patch embedding and
the q, k, v, output and both MLP kernels of every block (`vit.DENSE` keeps the head, the position
embedding and the biases dense). Its report shows the sparsity per layer, by block and by kind
(attention vs MLP) and the overlap with the magnitude mask.

LayerNorm normalises each token with its own statistics and keeps no running ones, so the CNNs'
"magnitude pruning + BN re-estimation" row does not exist here; the magnitude row's note says so.

Variants: `pretrain` (the dense pre-training only), `tiny` and `tiny_pretrain` (a 1-block,
width-32 ViT for a few steps on a few images: the end-to-end tests).
"""

from jackpots_jax.experiment.config import base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.mode = "jackpot"
    config.model.name = "vit_fmnist"
    config.dataset.name = "fashion_mnist"

    config.pretrain.epochs = 8
    config.pretrain.batch_size = 128
    config.pretrain.optimizer = "adamw"
    config.pretrain.learning_rate = 1e-3
    config.pretrain.momentum = 0.9  # AdamW's b1
    config.pretrain.weight_decay = 0.05
    config.pretrain.warmup_epochs = 1
    config.pretrain.clip_norm = 1.0
    config.pretrain.label_smoothing = 0.1
    config.pretrain.augment = False

    config.search.sparsity = 0.9
    config.search.rule = "global_magnitude"
    config.search.init = "magnitude"
    config.search.epochs = 3
    config.search.batch_size = 128
    config.search.learning_rate = 0.1
    config.search.momentum = 0.9
    config.search.weight_decay = 5e-4

    config.eval.batch_size = 1000
    config.checkpoint.every_steps = 200
    if arg not in (None, "", "pretrain", "tiny", "tiny_pretrain"):
        raise ValueError(
            f"unknown variant {arg!r} of configs/fmnist_vit.py; allowed: 'pretrain', 'tiny', "
            "'tiny_pretrain'"
        )
    if arg in ("pretrain", "tiny_pretrain"):
        config.mode = "pretrain"
    if arg in ("tiny", "tiny_pretrain"):
        config.model.kwargs.depth = 1
        config.model.kwargs.width = 32
        config.model.kwargs.mlp_dim = 64
        config.dataset.num_train = 64
        config.dataset.num_eval = 32
        config.pretrain.epochs = 2
        config.pretrain.batch_size = 16
        config.pretrain.warmup_epochs = 0  # 8 steps: no room for a warm-up
        config.pretrain.learning_rate = 3e-3
        config.search.epochs = 1
        config.search.batch_size = 16
        # Scores cross the magnitude init's 0.01 gap within the few steps of a test, so that the
        # masks change (at 0.1 the tiny search ends on the magnitude mask).
        config.search.learning_rate = 2.0
        config.eval.batch_size = 16
        config.checkpoint.every_steps = 1
        config.log_every_steps = 1
    return config
