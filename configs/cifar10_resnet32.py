r"""Lottery-jackpot search on CIFAR-10: the reference ResNet-32 (widths 32/64/128) at 90%.

    python -m jackpots_jax.main --config configs/cifar10_resnet32.py \
        --workdir workdir/cifar10_resnet32 --config.weights.path=<.pth, .safetensors or .npz>

Make the dense model first if you have none (the paper's authors trained their own):

    python -m jackpots_jax.main --config configs/cifar10_resnet32.py:pretrain \
        --workdir workdir/cifar10_resnet32

(the search then finds its weights in `<workdir>/pretrain/model.safetensors`). The paper's other
settings by override: `--config.search.sparsity=0.95`, `--config.search.epochs=160`.

The reference code's recipe: scores from the magnitude init (gap 0.01), a global-magnitude
budget, SGD lr 0.1 with momentum 0.9 and weight decay 5e-4 on the scores, cosine to 0, batch 256,
random crop 32 (padding 4) + flip, masks refreshed to the exact top-k after every step. Paper:
Zhang et al., "Lottery Jackpots Exist in Pre-trained Models" (TPAMI 2023); the reference
code's top-1 test accuracies for ResNet-32 on CIFAR-10, weights never trained:

    sparsity   30 search epochs   160 search epochs
    90%        93.70              94.39
    95%        92.90              93.41

This config is the 90% / 30-epoch cell. Report the final epoch's accuracy: choosing the best
epoch by test accuracy, as the reference code did, leaks the test set.
Prepare `cifar10` once with tfds (see `docs/configs.md`, "Data").

Variants: `pretrain`, `tiny` and `tiny_pretrain` (a few steps on tiny data, for the tests).
"""

from jackpots_jax.experiment.config import cifar_recipe


def get_config(arg: str | None = None):
    return cifar_recipe("cifar10", "resnet32_w2", arg)
