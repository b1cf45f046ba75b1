r"""The lottery-jackpot search on ImageNet: ResNet-50 from torchvision's weights, 90% sparsity.

    python -m jackpots_jax.main --config configs/imagenet_resnet50.py --workdir workdir/in1k_r50 \
        --config.weights.path=resnet50-0676ba61.pth --config.dataset.data_dir=<tfds dir>

80% sparsity by override: `--config.search.sparsity=0.8`. The reference code's recipe: scores
from the magnitude init, a global-magnitude budget, SGD lr 0.1 with momentum 0.9 and weight decay
1e-4 on the scores, cosine to 0, batch 256, 30 search epochs, random resized crop 224 + flip
(evaluation: resize 256, centre crop 224). Paper: Zhang et al. (TPAMI 2023), the reference
code's ResNet-50 top-1 after 30 search epochs: 75.19% at 80% sparsity, 72.43% at 90% (the
abstract: more than 70% at 90% with only 5-10 search epochs). The sparsity counts the convolutions
only (the classifier stays dense): 90% of the conv weights is 82.8% of conv + fc. Report top-1
and top-5 separately, at the final epoch: the reference code chose its "best" epoch by top-5.

ImageNet must be downloaded by hand and prepared with tfds once (see `docs/configs.md`, "Data"). A
`.pth` file needs PyTorch installed to be read; convert it once to `.safetensors` to drop that need.

Variants: `tiny` and `tiny_pretrain` (ResNet-18 for a few steps on a few images, for the tests).
"""

from jackpots_jax.experiment.config import imagenet_recipe


def get_config(arg: str | None = None):
    return imagenet_recipe(arg)
