r"""The paper's three claims as reproducible studies, with error bars (Fashion-MNIST, `fmnist_cnn`).

    python -m jackpots_jax.main --config configs/studies.py --workdir workdir/studies

Pre-trains `fmnist_cnn` dense as the default job does (unless `<workdir>/pretrain/
model.safetensors` exists), then runs every study from those frozen weights, three seeds each,
and writes `<workdir>/studies/report.md`, `results.json` and `plots/` (`experiment.studies`,
`experiment.study_report`):

1. claim 1: dense, one-shot magnitude pruning (with and without batch-norm re-estimation) and the
   jackpot at 50/70/80/90/95/98% sparsity (5 search epochs);
2. claim 2: search cost of the magnitude init against edge-popup's Kaiming init (uniform and ERK
   budgets), a random init, and the magnitude init at the uniform budget, at 90 and 95% (6
   epochs each, the same optimiser, evaluated 9 times per epoch): epochs (and steps) to 99% of
   the best magnitude-init accuracy, counted at the first evaluation that reaches it and from
   the evaluation after which it holds (a study per `claim2.epochs` gives the cost as the
   shortest search whose final accuracy reaches it, as `docs/fidelity.md` does);
3. overlap: IoU of the masks of magnitude, random, SNIP and Wanda pruning with the jackpot;
4. claim 3: rate 1, constant 0.5, cosine, polynomial (q = 2) and a first-order swap check at 95%
   from the magnitude init (`studies.claim3.init='kaiming/uniform'`: where the mask churns);
5. fine-tuning the 90/95/98% jackpots' weights for 2 epochs with the mask frozen.

A stopped study resumes cell by cell with the same command. Every cell compiles its steps again;
`JAX_COMPILATION_CACHE_DIR=<dir>` in the environment lets the cells (and a resumed run) share the
compiled programs, which saves about a third of a short cell's time on CPU. Not yet run in full:
estimated at about 4 hours on 2 idle CPU cores. `docs/fidelity.md` has what was run, each with
its command and time: claim 1 (4 sparsities), claim 2 (90%, 3 inits, searches of 1 to 24
epochs) and claim 3 (from a random init at 98%, edge-popup's at 90%, and on `vit_fmnist`) on
all the training data, and an earlier reduced grid.
Any field can be overridden, e.g. only claim 1 for another registered model with one seed (what a
model's first study needs):

    python -m jackpots_jax.main --config configs/studies.py --workdir workdir/vit \
      --config.model.name=<name> --config.weights.path=<weights.safetensors> \
      --config.studies.run="('claim1',)" --config.studies.seeds="(0,)"

The report's per-layer tables are grouped by the groupings the model declares
(`ModelSpec.layer_groups`, e.g. block and attention/MLP) and by kind of kernel.

Variants: `configs/studies.py:quick` (two seeds, a few steps per search on the first 128 training
images: the end-to-end test of CI).
"""

import ml_collections

from jackpots_jax.experiment.config import base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.mode = "studies"
    config.model.name = "fmnist_cnn"
    config.dataset.name = "fashion_mnist"

    # The pre-trained model: the default job's.
    config.pretrain.epochs = 8
    config.pretrain.batch_size = 128
    config.pretrain.learning_rate = 0.05

    # The search recipe every study starts from (the paper's; studies change the fields they vary).
    config.search.batch_size = 128
    config.search.learning_rate = 0.1
    config.search.momentum = 0.9
    config.search.weight_decay = 5e-4
    config.search.gap = 0.01
    config.prune.bn_batches = 100
    config.eval.batch_size = 1000
    config.checkpoint.every_steps = 200

    config.unlock()
    config.studies = ml_collections.ConfigDict()
    s = config.studies
    s.run = ("claim1", "claim2", "overlap", "claim3", "finetune")
    s.seeds = (0, 1, 2)
    s.keep_checkpoints = False
    s.report_only = False  # True: write the report from the cells finished so far, run nothing

    s.claim1 = ml_collections.ConfigDict()
    s.claim1.sparsities = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
    s.claim1.epochs = 5
    s.claim1.rule = "global_magnitude"

    s.claim2 = ml_collections.ConfigDict()
    s.claim2.sparsities = (0.9, 0.95)
    s.claim2.epochs = 6
    s.claim2.inits = (
        "magnitude/global_magnitude",
        "magnitude/uniform",
        "kaiming/uniform",
        "kaiming/erk",
        "random/global_magnitude",
    )
    s.claim2.target = 0.99
    s.claim2.eval_every_steps = 52  # 9 times per epoch of 468 steps: the cost to 52 steps

    s.overlap = ml_collections.ConfigDict()
    s.overlap.sparsities = (0.5, 0.9, 0.98)
    s.overlap.criteria = ("magnitude", "random", "snip", "wanda")
    s.overlap.batches = 8

    s.claim3 = ml_collections.ConfigDict()
    s.claim3.init = "magnitude/global_magnitude"  # 'kaiming/uniform': the mask moves far more
    s.claim3.sparsity = 0.95
    s.claim3.epochs = 5
    s.claim3.policies = ("constant:1", "constant:0.5", "cosine", "polynomial:2", "first_order")
    s.claim3.window = 50

    s.finetune = ml_collections.ConfigDict()
    s.finetune.sparsities = (0.9, 0.95, 0.98)
    s.finetune.epochs = 2
    s.finetune.learning_rate = 0.01
    s.finetune.momentum = 0.9
    s.finetune.weight_decay = 0.0
    config.lock()

    if arg == "quick":
        _quick(config)
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/studies.py; allowed: 'quick'")
    return config


def _quick(config):
    config.dataset.num_train = 128
    config.dataset.num_eval = 100
    config.pretrain.epochs = 2
    config.pretrain.batch_size = 32
    config.search.batch_size = 32
    config.eval.batch_size = 50
    config.prune.bn_batches = 2
    config.checkpoint.every_steps = 4
    config.log_every_steps = 2
    s = config.studies
    s.seeds = (0, 1)
    s.claim1.sparsities = (0.5, 0.9)
    s.claim1.epochs = 2
    s.claim2.sparsities = (0.9,)
    s.claim2.epochs = 2
    s.claim2.inits = ("magnitude/global_magnitude", "kaiming/uniform")
    s.claim2.eval_every_steps = 2
    s.overlap.sparsities = (0.9,)
    s.overlap.batches = 2
    s.claim3.sparsity = 0.9
    s.claim3.epochs = 2
    s.claim3.policies = ("constant:1", "first_order")
    s.claim3.window = 2
    s.finetune.sparsities = (0.9,)
    s.finetune.epochs = 1
