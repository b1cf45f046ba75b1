r"""The offline default: a lottery jackpot in a small CNN pre-trained on Fashion-MNIST.

    python -m jackpots_jax.main --config configs/default.py --workdir workdir/default

Runs on a fresh machine with no network (Fashion-MNIST from Debian's `dataset-fashion-mnist`):
builds the dataset, pre-trains `fmnist_cnn` dense when the work directory has no weights,
evaluates the dense model and one-shot magnitude pruning at 90% sparsity (with and without
re-estimating batch-norm statistics), searches the jackpot from the magnitude init with the
paper's recipe (SGD 0.1, momentum 0.9, weight decay 5e-4 on the scores, cosine to 0, masks
refreshed after every step), and writes `report.md` with plots. What it measured, with the
machine, date and results files: README and `docs/fidelity.md`.

The paper's claim this reproduces in miniature (Zhang et al., TPAMI 2023, Fig. 1 and Table 1): a
90%-sparse sub-network of the frozen pre-trained weights, found by searching only the mask, keeps
nearly all of the dense accuracy, far above magnitude pruning without training.

Variants: `configs/default.py:tiny` (a few steps on the first few hundred images, for tests).

`configs/default.py:2of4`: the same job with 2:4 masks (NVIDIA's sparse tensor cores): dense vs
one-shot magnitude 2:4 (with and without BN re-estimation) vs the jackpot 2:4, at the 50% sparsity
that 2:4 fixes. `conv1` has 1 input channel, not a multiple of 4, and is held dense
(`search.indivisible='dense'`); every other masked kernel keeps exactly 2 of every 4 weights along
its input axis. The export also writes `jackpot_2of4.safetensors` (PyTorch `[out, in]` weights
and masks for `torch.sparse.to_sparse_semi_structured`). Reuse the default job's pre-trained
weights:

    python -m jackpots_jax.main --config configs/default.py:2of4 --workdir workdir/default_2of4 \
        --config.weights.path=workdir/default/pretrain/model.safetensors

`configs/default.py:2of4_tiny`: the 2:4 job cut down as `tiny`, for tests.
"""

from jackpots_jax.experiment.config import base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.mode = "jackpot"
    config.model.name = "fmnist_cnn"
    config.dataset.name = "fashion_mnist"

    config.pretrain.epochs = 8
    config.pretrain.batch_size = 128
    config.pretrain.learning_rate = 0.05

    config.search.sparsity = 0.9
    config.search.rule = "global_magnitude"
    config.search.init = "magnitude"
    config.search.epochs = 5
    config.search.batch_size = 128
    config.search.learning_rate = 0.1
    config.search.weight_decay = 5e-4

    config.eval.batch_size = 1000
    config.checkpoint.every_steps = 200
    if arg not in (None, "", "tiny", "2of4", "2of4_tiny"):
        raise ValueError(
            f"unknown variant {arg!r} of configs/default.py; allowed: 'tiny', '2of4', '2of4_tiny'"
        )
    if arg in ("2of4", "2of4_tiny"):
        config.search.pattern = "2:4"
        config.search.sparsity = 0.5  # what 2:4 keeps; a sparsity that disagrees is an error
        config.search.indivisible = "dense"  # conv1: 1 input channel
    if arg in ("tiny", "2of4_tiny"):
        _tiny(config)
    return config


def _tiny(config):
    config.dataset.num_train = 256
    config.dataset.num_eval = 100
    config.pretrain.epochs = 2
    config.pretrain.batch_size = 32
    config.search.epochs = 2
    config.search.batch_size = 32
    config.eval.batch_size = 40
    config.prune.bn_batches = 2
    config.checkpoint.every_steps = 4
    config.log_every_steps = 2
