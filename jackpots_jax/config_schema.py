"""The fields every config has, their defaults, and the checks run before any compute starts.

Every file under `configs/` starts from `base_config()` and changes fields; a field that is not
here is an error (a typo must not be silently ignored). `check_config` names the field, the value
and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import ml_collections

MODES = ("jackpot", "pretrain", "search", "evaluate", "prune", "export")
SCHEDULES = ("constant", "cosine", "polynomial")
DTYPES = ("float32", "bfloat16")
VARIANTS = ("pretrain", "tiny", "tiny_pretrain")


class ConfigError(ValueError):
    """A config field holds a value that cannot work."""


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default (the offline default job: Fashion-MNIST, `fmnist_cnn`).

    Fields:
      mode: `jackpot` (pre-train when no weights exist, evaluate dense, magnitude-prune, search,
        report), `pretrain`, `search`, `evaluate`, `prune` or `export`.
      seed: the one seed every random choice comes from.
      model: `name` (see `jackpots_jax.models.names()`), `kwargs` (model options, e.g. `width`),
        `num_classes` (0: the dataset's), `dtype` (compute dtype of convs and matmuls: `float32`
        or `bfloat16`; params, scores, masks, optimizer state, BN statistics and the loss stay
        float32).
      dataset: `name`, `data_dir` (tfds directory; '' for the default), `source_dir` (the
        Fashion-MNIST IDX files; '' to look for Debian's package), `num_train` / `num_eval` (use the
        first N examples; 0 for all), `dtype`.
      weights: `path` of the pre-trained weights (a `.safetensors`, `.npz` or PyTorch file; '' for
        `<workdir>/pretrain/model.safetensors`), `random` (search on random weights on purpose:
        the edge-popup setting), `classifier`; `masks`: a `masks.npz` to evaluate ('' none).
      pretrain: dense training from scratch: `epochs`, `batch_size`, `learning_rate` (cosine to
        0), `momentum`, `nesterov`, `weight_decay`, `label_smoothing`, `augment`.
      search: `sparsity`, `rule` (budget rule), `dense` (patterns held dense), `init` (score
        init), `gap` (magnitude init barrier), `epochs`, `max_steps` (0: epochs decide),
        `batch_size`, `learning_rate`, `momentum`, `weight_decay`, `label_smoothing`, `augment`,
        `rank_by`, `rate` (the short-restriction schedule: `schedule`, `value`, `power`).
      prune: `reestimate_bn` (also evaluate after re-estimating BN statistics), `bn_batches`.
      eval: `batch_size`, `every_epochs`.
      checkpoint: `every_steps`, `keep`.
      parallel: `backend` (`shard_map` or `pmap`), `num_devices` (0: all).
      log_every_steps: how often a metrics line is written.
    """
    c = ml_collections.ConfigDict()
    c.mode = "jackpot"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "fmnist_cnn"
    c.model.kwargs = ml_collections.ConfigDict()
    c.model.num_classes = 0
    c.model.dtype = "float32"

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "fashion_mnist"
    c.dataset.data_dir = ""
    c.dataset.source_dir = ""
    c.dataset.num_train = 0
    c.dataset.num_eval = 0
    c.dataset.dtype = "float32"

    c.weights = ml_collections.ConfigDict()
    c.weights.path = ""
    c.weights.random = False
    c.weights.masks = ""

    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.epochs = 8
    c.pretrain.batch_size = 128
    c.pretrain.learning_rate = 0.05
    c.pretrain.momentum = 0.9
    c.pretrain.nesterov = False
    c.pretrain.weight_decay = 5e-4
    c.pretrain.label_smoothing = 0.0
    c.pretrain.augment = False

    c.search = ml_collections.ConfigDict()
    c.search.sparsity = 0.9
    c.search.rule = "global_magnitude"
    c.search.dense = ("head",)
    c.search.init = "magnitude"
    c.search.gap = 0.01
    c.search.epochs = 3
    c.search.max_steps = 0
    c.search.batch_size = 128
    c.search.learning_rate = 0.1
    c.search.momentum = 0.9
    c.search.weight_decay = 5e-4
    c.search.label_smoothing = 0.0
    c.search.augment = False
    c.search.rank_by = "score"
    c.search.rate = ml_collections.ConfigDict()
    c.search.rate.schedule = "constant"
    c.search.rate.value = 1.0
    c.search.rate.power = 1.0

    c.prune = ml_collections.ConfigDict()
    c.prune.reestimate_bn = True
    c.prune.bn_batches = 100

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 1000
    c.eval.every_epochs = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 3

    c.parallel = ml_collections.ConfigDict()
    c.parallel.backend = "shard_map"
    c.parallel.num_devices = 0

    c.log_every_steps = 50
    return c


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config field `{field}` is {value!r}; allowed: {allowed}")


def _unknown_keys(config: Mapping, schema: Mapping, prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if key not in schema:
            out.append(path)
        elif isinstance(schema[key], Mapping) and key != "kwargs":
            if not isinstance(value, Mapping):
                out.append(f"{path} (a value where a group of fields belongs)")
            else:
                out += _unknown_keys(value, schema[key], f"{path}.")
    return out


def _int(config, field: str, lo: int, hi: float = math.inf) -> int:
    value = config
    for part in field.split("."):
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        bound = f"an integer >= {lo}" if hi == math.inf else f"an integer in [{lo}, {hi}]"
        _fail(field, value, bound)
    return value


def _number(config, field: str, lo: float, hi: float, *, hi_open: bool = False) -> float:
    value = config
    for part in field.split("."):
        value = value[part]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        _fail(field, value, f"a number in [{lo}, {hi}{')' if hi_open else ']'}")
    return float(value)


def _choice(config, field: str, allowed: tuple[str, ...]) -> str:
    value = config
    for part in field.split("."):
        value = value[part]
    if value not in allowed:
        _fail(field, value, ", ".join(map(repr, allowed)))
    return value


def check_config(config: Mapping, num_devices: int) -> None:
    """Raises `ConfigError` for unknown fields and impossible values, before any compute.

    Args:
      config: the experiment config.
      num_devices: the devices the job runs on (global batches must split evenly over them).
    """
    from jackpots_jax import data, models
    from jackpots_jax.masks import INIT_METHODS
    from jackpots_jax.parallel import BACKENDS
    from jackpots_jax.sparsity import RULES

    if hasattr(config, "to_dict"):
        config = config.to_dict()
    unknown = _unknown_keys(config, base_config().to_dict())
    if unknown:
        raise ConfigError(
            f"unknown config field(s): {', '.join(unknown)}; see `jackpots_jax.config_schema."
            "base_config()` for every field"
        )
    _choice(config, "mode", MODES)
    _int(config, "seed", 0)
    _choice(config, "model.name", models.names())
    _int(config, "model.num_classes", 0)
    _choice(config, "model.dtype", DTYPES)
    name = config["dataset"]["name"]
    if name.split("/")[0] not in data.NAMES:
        _fail("dataset.name", name, ", ".join(map(repr, data.NAMES)))
    _int(config, "dataset.num_train", 0)
    _int(config, "dataset.num_eval", 0)
    _choice(config, "dataset.dtype", DTYPES)
    for group in ("pretrain", "search"):
        _int(config, f"{group}.epochs", 0)
        _number(config, f"{group}.learning_rate", 0.0, math.inf)
        _number(config, f"{group}.momentum", 0.0, 1.0, hi_open=True)
        _number(config, f"{group}.weight_decay", 0.0, math.inf)
        _number(config, f"{group}.label_smoothing", 0.0, 1.0, hi_open=True)
    for field in ("pretrain.batch_size", "search.batch_size", "eval.batch_size"):
        size = _int(config, field, 1)
        if size % num_devices:
            _fail(field, size, f"a multiple of the {num_devices} device(s) the job runs on")
    _number(config, "search.sparsity", 0.0, 1.0, hi_open=True)
    _choice(config, "search.rule", tuple(r for r in RULES if r != "explicit"))
    _choice(config, "search.init", tuple(INIT_METHODS))
    _number(config, "search.gap", 0.0, 1.0, hi_open=True)
    if config["search"]["gap"] <= 0:
        _fail("search.gap", config["search"]["gap"], "a number in (0, 1)")
    _int(config, "search.max_steps", 0)
    _choice(config, "search.rank_by", ("score", "abs"))
    _choice(config, "search.rate.schedule", SCHEDULES)
    _number(config, "search.rate.value", 0.0, 1.0)
    _number(config, "search.rate.power", 0.0, math.inf)
    _int(config, "prune.bn_batches", 1)
    _int(config, "eval.every_epochs", 0)
    _int(config, "checkpoint.every_steps", 1)
    _int(config, "checkpoint.keep", 1)
    _choice(config, "parallel.backend", tuple(BACKENDS))
    _int(config, "parallel.num_devices", 0)
    _int(config, "log_every_steps", 1)
    if config["mode"] in ("search", "jackpot") and config["search"]["epochs"] == 0:
        if config["search"]["max_steps"] == 0:
            _fail("search.epochs", 0, "at least 1 (or set `search.max_steps`)")


def cifar_recipe(dataset: str, model: str, arg: str | None):
    """The search recipe: 30 epochs at 90% sparsity from the magnitude init, batch 256.

    Variants: `pretrain` (train the dense model from scratch: 160 epochs, SGD 0.1, momentum 0.9,
    weight decay 5e-4, cosine, batch 128, the usual CIFAR recipe), `tiny` and `tiny_pretrain`
    (a few steps on a few examples, for the end-to-end tests).
    """
    config = base_config()
    config.mode = "search"
    config.model.name = model
    config.dataset.name = dataset

    config.pretrain.epochs = 160
    config.pretrain.batch_size = 128
    config.pretrain.learning_rate = 0.1
    config.pretrain.weight_decay = 5e-4
    config.pretrain.augment = True

    config.search.sparsity = 0.9
    config.search.rule = "global_magnitude"
    config.search.init = "magnitude"
    config.search.gap = 0.01
    config.search.epochs = 30
    config.search.batch_size = 256
    config.search.learning_rate = 0.1
    config.search.momentum = 0.9
    config.search.weight_decay = 5e-4
    config.search.augment = True
    config.search.rate.schedule = "constant"
    config.search.rate.value = 1.0

    config.eval.batch_size = 1000
    config.checkpoint.every_steps = 500
    config.log_every_steps = 50

    if arg not in (None, "", *VARIANTS):
        raise ValueError(f"unknown config variant {arg!r}; allowed: {', '.join(VARIANTS)}")
    if arg in ("pretrain", "tiny_pretrain"):
        config.mode = "pretrain"
    if arg in ("tiny", "tiny_pretrain"):
        config.dataset.num_train = 32
        config.dataset.num_eval = 16
        config.pretrain.epochs = 1
        config.pretrain.batch_size = 16
        config.search.epochs = 1
        config.search.batch_size = 16
        config.eval.batch_size = 16
        config.prune.bn_batches = 1
        config.checkpoint.every_steps = 1
        config.log_every_steps = 1
    return config


def imagenet_recipe(arg: str | None):
    """ResNet-50 from torchvision's weights: 30 search epochs, weight decay 1e-4, batch 256.

    Variants: `tiny` (a few steps on a few images of an ImageNet-format dataset; the model is
    `resnet18` to keep the end-to-end test cheap on a CPU).
    """
    config = base_config()
    config.mode = "search"
    config.model.name = "resnet50"
    config.dataset.name = "imagenet2012"
    config.search.sparsity = 0.9
    config.search.rule = "global_magnitude"
    config.search.init = "magnitude"
    config.search.epochs = 30
    config.search.batch_size = 256
    config.search.learning_rate = 0.1
    config.search.weight_decay = 1e-4
    config.search.augment = True
    config.eval.batch_size = 500
    config.checkpoint.every_steps = 1000
    config.log_every_steps = 100
    if arg not in (None, "", "tiny", "tiny_pretrain"):
        raise ValueError(f"unknown config variant {arg!r}; allowed: 'tiny', 'tiny_pretrain'")
    if arg in ("tiny", "tiny_pretrain"):
        config.mode = "pretrain" if arg == "tiny_pretrain" else "search"
        config.model.name = "resnet18"
        config.model.num_classes = 1000
        config.dataset.num_train = 4
        config.dataset.num_eval = 4
        config.pretrain.epochs = 1
        config.pretrain.batch_size = 2
        config.search.epochs = 1
        config.search.batch_size = 2
        config.eval.batch_size = 2
        config.prune.bn_batches = 1
        config.checkpoint.every_steps = 1
        config.log_every_steps = 1
    return config
