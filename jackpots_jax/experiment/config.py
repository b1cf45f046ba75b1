"""The fields every config has, their defaults, and the checks run before any compute starts.

Every file under `configs/` starts from `base_config()` and changes fields. The config is a locked
`ml_collections.ConfigDict`: a field that is not here cannot be set, in a config file or on the
command line (a typo must not be silently ignored), and a value of the wrong type is refused when it
is set. `check` adds what types cannot say (ranges, choices, batches that split over the devices)
and names the field, the value and what is allowed.

The runner reads the config once, in `experiment.modes`; nothing below it sees a config object.
"""

from __future__ import annotations

import math
import re
from typing import Any

import ml_collections

SCHEDULES = ("constant", "cosine", "polynomial")
DTYPES = ("float32", "bfloat16")
VARIANTS = ("pretrain", "tiny", "tiny_pretrain")
# One-shot baselines calibrated on a language model's inputs: rows of its jackpot job
# (`prune.baselines`) and masks a search can start from (`search.init`, `search.inits`).
CALIBRATED = ("wanda", "sparsegpt")


class ConfigError(ValueError):
    """A config field holds a value that cannot work."""


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default (the offline default job: Fashion-MNIST, `fmnist_cnn`).

    Fields:
      mode: `jackpot` (pre-train when no weights exist, evaluate dense, magnitude-prune, search,
        report), `pretrain`, `search`, `evaluate`, `prune` or `export` (`experiment.modes`).
      seed: the one seed every random choice comes from.
      model: `name` (see `jackpots_jax.models.names()`), `kwargs` (model options, e.g. `width`),
        `num_classes` (0: the dataset's), `dtype` (compute dtype of convs and matmuls: `float32`
        or `bfloat16`; params, scores, masks, optimizer state, BN statistics and the loss stay
        float32).
      dataset: `name`, `data_dir` (tfds directory; '' for the default), `source_dir` (the
        Fashion-MNIST IDX files; '' to look for Debian's package), `num_train` / `num_eval` (use the
        first N examples; 0 for all), `dtype`. A text corpus (`data.text.CORPORA`) makes a
        language-model job: `source_dir` is where the corpus is ('' its default place),
        `data_dir` the token cache, `seq_len` the tokens of a window (0: the model's default),
        `num_train` / `num_eval` the first N windows; the tokenizer is the weights file's.
      weights: `path` of the pre-trained weights (a `.safetensors`, `.npz` or PyTorch file; '' for
        `<workdir>/pretrain/model.safetensors`; a language model's GGUF file or Hugging Face
        folder, '' for `smollm2_135m`'s packaged GGUF), `random` (search on random weights on
        purpose: the edge-popup setting), `classifier`; `masks`: a `masks.npz` to evaluate
        ('' none); `batch_stats`: the batch-norm statistics to evaluate with (a
        `batch_stats.npz`; '' for the one next to `masks` when there is one, else the weights
        file's own); `allow_other_weights`: evaluate `masks` whose `jackpot.json` records the
        fingerprint of other weights than `path` (a warning names both; without it, an error).
      pretrain: dense training from scratch: `epochs`, `batch_size`, `learning_rate` (cosine to
        0), `momentum`, `nesterov`, `weight_decay`, `label_smoothing`, `augment`, `optimizer`
        (`sgd`, or `adamw` for the ViTs: `momentum` is its b1, weight decay on kernels only),
        `warmup_epochs` (linear warm-up), `clip_norm` (global gradient norm; 0: no clipping).
      search: `sparsity`, `rule` (budget rule), `dense` (regular expressions of the leaves held
        dense; `None` for the model's default, its classifier `head`), `init` (score
        init), `gap` (magnitude init barrier), `epochs`, `max_steps` (0: epochs decide),
        `batch_size`, `learning_rate`, `momentum`, `weight_decay`, `label_smoothing`, `augment`,
        `rank_by`, `rate` (the short-restriction schedule: `schedule`, `value`, `power`),
        `selection` (the exact selection of the masks: `auto` picks by backend and mesh,
        `batched` for accelerators and sharded state, `bracketed` for CPUs; the same masks),
        `allow_empty_layers` (a sparsity at which a masked layer keeps no weight is an error
        unless this is True),
        `pattern` (`unstructured`, `N:M` such as `2:4`, `block:B` such as `block:8`, or
        `channel`; see `jackpots_jax.patterns`), `indivisible` (`error` or `dense`: a masked
        leaf the pattern does not fit, e.g. a first conv with 1 input channel under 2:4, is an
        error naming it, or held dense). An N:M pattern fixes the sparsity of every masked leaf
        at 1 - N/M: `sparsity` must say so (`2:4` needs `sparsity=0.5`), it is never overridden
        silently; block and channel patterns round each leaf's count down to whole tiles.
        `patterns`: a language-model jackpot job searches each of these patterns in turn, all at
        `sparsity` (empty: `pattern` alone). `inits`: a language-model jackpot job runs one
        search per pattern from each of these inits (empty: `init` alone); a language model
        also takes the inits `wanda` and `sparsegpt`: the search starts from that one-shot
        baseline's mask (`jj.scores_from_masks`, with `gap`). `loss`: what a search minimises:
        `cross_entropy` (the task's: of the labels, or a language model's next-token negative
        log-likelihood) or, for a language model, `kl` (the KL divergence from the dense
        model's next-token distribution, `jj.losses.kl_to_dense()`; one more forward pass per
        step). Evaluation always reports the task's loss (perplexity for text). `optimizer`:
        of the scores, `sgd` (the paper's) or `adam` (`momentum` is its b1; each score moves by
        about the learning rate per step, whatever its gradient's scale).
      prune: `reestimate_bn` (also evaluate after re-estimating BN statistics), `bn_batches`;
        for a language model, `baselines` (one-shot rows besides magnitude pruning: `wanda`,
        `sparsegpt`, the latter as two rows, its mask over the frozen weights and its updated
        weights), calibrated on `calibration_windows` training windows drawn with the seed,
        `calibration_batch` windows at a time; `sparsegpt_blocksize`, `sparsegpt_damp`.
      eval: `batch_size`, `every_epochs`, `every_steps` (a search is also evaluated every this
        many steps, for a curve of the validation figures against the examples or tokens seen;
        0: never), `by_block` (a language model's jackpot job also evaluates every mask over
        the frozen weights with one block pruned at a time, the rest dense: the report's "loss
        by block" and `<workdir>/block_losses.json`; one evaluation per block and mask),
        `also_on` (a language model's jackpot job also evaluates every row on the validation
        windows of these other corpora, the first `dataset.num_eval` of each, read from their
        default places: what a mask chosen on one text does on texts it never saw; each row
        gains `<corpus> perplexity`, `<corpus> loss` and `<corpus> count`).
      checkpoint: `every_steps`, `keep`, `allow_schedule_change` (resuming a phase whose
        schedule fields changed since its checkpoint, e.g. `search.epochs` or
        `search.learning_rate`, is an error unless this is True; then it continues under the new
        schedule).
      parallel: `backend` (`auto`, the default: `jit` when `fsdp` > 1, else `shard_map`;
        `shard_map` or `pmap`: data parallelism; `jit`: XLA partitions the step from the
        shardings of its arguments, needed for `fsdp` > 1), `num_devices` (0: all),
        `fsdp` (devices each leaf of params, scores, optimiser state and masks is sharded over; 1:
        every device holds all of it), `data` (the batch axis; 0: `num_devices / fsdp`), `rules`
        (`'pattern=dim'` overrides of the dimension a leaf is sharded along, e.g.
        `'head/kernel=none'`; on the command line `--config.parallel.rules=a=none,b=0`, commas
        between rules; a rule that matches no leaf of the model is an error).
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
    c.dataset.seq_len = 0

    c.weights = ml_collections.ConfigDict()
    c.weights.path = ""
    c.weights.random = False
    c.weights.masks = ""
    c.weights.batch_stats = ""
    c.weights.allow_other_weights = False

    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.epochs = 8
    c.pretrain.batch_size = 128
    c.pretrain.learning_rate = 0.05
    c.pretrain.momentum = 0.9
    c.pretrain.nesterov = False
    c.pretrain.weight_decay = 5e-4
    c.pretrain.label_smoothing = 0.0
    c.pretrain.augment = False
    c.pretrain.optimizer = "sgd"
    c.pretrain.warmup_epochs = 0
    c.pretrain.clip_norm = 0.0

    c.search = ml_collections.ConfigDict()
    c.search.sparsity = 0.9
    c.search.rule = "global_magnitude"
    # None: the model's own default (`ModelSpec.dense`; every classifier `head` is held dense).
    c.search.dense = ml_collections.config_dict.placeholder(tuple)
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
    c.search.selection = "auto"
    c.search.allow_empty_layers = False
    c.search.pattern = "unstructured"
    c.search.indivisible = "error"
    c.search.patterns = ()
    c.search.inits = ()
    c.search.loss = "cross_entropy"
    c.search.optimizer = "sgd"

    c.prune = ml_collections.ConfigDict()
    c.prune.reestimate_bn = True
    c.prune.bn_batches = 100
    c.prune.baselines = ()
    c.prune.calibration_windows = 32
    c.prune.calibration_batch = 4
    c.prune.sparsegpt_blocksize = 128
    c.prune.sparsegpt_damp = 0.01

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 1000
    c.eval.every_epochs = 1
    c.eval.every_steps = 0
    c.eval.by_block = False
    c.eval.also_on = ()

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 3
    c.checkpoint.allow_schedule_change = False

    c.parallel = ml_collections.ConfigDict()
    c.parallel.backend = "auto"
    c.parallel.num_devices = 0
    c.parallel.data = 0
    c.parallel.fsdp = 1
    c.parallel.rules = ()

    c.log_every_steps = 50

    c.lock()  # unknown fields are errors...
    c.model.kwargs.unlock()  # ...except the model's own options, which each config may name
    return c


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config field `{field}` is {value!r}; allowed: {allowed}")


def _int(field: str, value: Any, lo: int, hi: float = math.inf) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        bound = f"an integer >= {lo}" if hi == math.inf else f"an integer in [{lo}, {hi}]"
        _fail(field, value, bound)
    return value


def _number(field: str, value: Any, lo: float, hi: float, *, hi_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        _fail(field, value, f"a number in [{lo}, {hi}{')' if hi_open else ']'}")
    return float(value)


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        _fail(field, value, ", ".join(map(repr, allowed)))
    return value


def check(
    config: ml_collections.ConfigDict, *, num_devices: int | None, modes: tuple[str, ...]
) -> None:
    """Raises `ConfigError` for an impossible value, before any compute.

    Args:
      config: the experiment config (from `base_config()`, so its fields and types are known).
      num_devices: the devices the job runs on (global batches must split evenly over them);
        `None` where they are not known (a launcher checking the config elsewhere): the checks
        that need them are left out.
      modes: the modes the runner knows (`experiment.modes.MODES`).
    """
    from jackpots_jax import data, models
    from jackpots_jax.masks import INIT_METHODS
    from jackpots_jax.parallel import BACKENDS
    from jackpots_jax.select import SELECTIONS
    from jackpots_jax.sparsity import RULES

    c = config
    _choice("mode", c.mode, modes)
    _int("seed", c.seed, 0)
    _choice("model.name", c.model.name, models.names())
    _int("model.num_classes", c.model.num_classes, 0)
    _choice("model.dtype", c.model.dtype, DTYPES)
    names = (*data.NAMES, *data.text.CORPORA)
    if c.dataset.name.split("/")[0] not in names:
        _fail("dataset.name", c.dataset.name, ", ".join(map(repr, names)))
    _int("dataset.seq_len", c.dataset.seq_len, 0)
    if c.dataset.name in data.text.CORPORA:
        _check_language_model(c)
    else:
        for name in ("search.patterns", "search.inits", "prune.baselines"):
            group, field = name.split(".")
            if value := c[group][field]:
                _fail(name, value, "() for an image dataset (a field of language-model jobs)")
    _int("dataset.num_train", c.dataset.num_train, 0)
    _int("dataset.num_eval", c.dataset.num_eval, 0)
    _choice("dataset.dtype", c.dataset.dtype, DTYPES)
    for name in ("pretrain", "search"):
        group = c[name]
        _int(f"{name}.epochs", group.epochs, 0)
        _number(f"{name}.learning_rate", group.learning_rate, 0.0, math.inf)
        _number(f"{name}.momentum", group.momentum, 0.0, 1.0, hi_open=True)
        _number(f"{name}.weight_decay", group.weight_decay, 0.0, math.inf)
        _number(f"{name}.label_smoothing", group.label_smoothing, 0.0, 1.0, hi_open=True)
    for name in ("pretrain", "search", "eval"):
        size = _int(f"{name}.batch_size", c[name].batch_size, 1)
        if num_devices and size % num_devices:
            _fail(f"{name}.batch_size", size, f"a multiple of the {num_devices} device(s)")
    _choice("pretrain.optimizer", c.pretrain.optimizer, ("sgd", "adamw"))
    _int("pretrain.warmup_epochs", c.pretrain.warmup_epochs, 0)
    _number("pretrain.clip_norm", c.pretrain.clip_norm, 0.0, math.inf)
    s = c.search
    _number("search.sparsity", s.sparsity, 0.0, 1.0, hi_open=True)
    _choice("search.rule", s.rule, tuple(r for r in RULES if r != "explicit"))
    text = c.dataset.name in data.text.CORPORA
    for field, init in (("search.init", s.init), *(("search.inits", i) for i in s.inits)):
        if init in CALIBRATED and not text:
            _fail(field, init, f"{', '.join(map(repr, INIT_METHODS))} (a language model also "
                  "takes 'wanda' and 'sparsegpt', calibrated on its text)")  # fmt: skip
        _choice(field, init, (*INIT_METHODS, *CALIBRATED) if text else tuple(INIT_METHODS))
    for method in c.prune.baselines:
        _choice("prune.baselines", method, CALIBRATED)
    if s.loss == "kl" and not text:
        _fail("search.loss", s.loss, "'cross_entropy' (a language model also takes 'kl')")
    _choice("search.loss", s.loss, ("cross_entropy", "kl"))
    _choice("search.optimizer", s.optimizer, ("sgd", "adam"))
    _int("prune.calibration_windows", c.prune.calibration_windows, 1)
    _int("prune.calibration_batch", c.prune.calibration_batch, 1)
    _int("prune.sparsegpt_blocksize", c.prune.sparsegpt_blocksize, 1)
    _number("prune.sparsegpt_damp", c.prune.sparsegpt_damp, 0.0, math.inf)
    if not 0 < s.gap < 1:
        _fail("search.gap", s.gap, "a number in (0, 1)")
    for pattern in s.dense or ():
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            _fail("search.dense", s.dense, f"regular expressions ({pattern!r}: {e})")
    _int("search.max_steps", s.max_steps, 0)
    _choice("search.rank_by", s.rank_by, ("score", "abs"))
    _choice("search.rate.schedule", s.rate.schedule, SCHEDULES)
    _number("search.rate.value", s.rate.value, 0.0, 1.0)
    _number("search.rate.power", s.rate.power, 0.0, math.inf)
    searches = c.mode in ("search", "jackpot") or (c.mode == "studies" and text)
    if searches and s.epochs == 0 and s.max_steps == 0:
        _fail("search.epochs", 0, "at least 1 (or set `search.max_steps`)")
    _int("prune.bn_batches", c.prune.bn_batches, 1)
    _int("eval.every_epochs", c.eval.every_epochs, 0)
    _int("eval.every_steps", c.eval.every_steps, 0)
    if not isinstance(c.eval.by_block, bool):
        _fail("eval.by_block", c.eval.by_block, "True or False")
    lm_mode = c.mode in ("jackpot", "studies") and c.dataset.name in data.text.CORPORA
    if c.eval.by_block and not lm_mode:
        _fail(
            "eval.by_block",
            c.eval.by_block,
            "False unless the job is a language model's `jackpot` or `studies` mode (a text "
            "corpus)",
        )
    also_on = c.eval.also_on
    others = tuple(n for n in data.text.CORPORA if n != c.dataset.name)
    if also_on and not lm_mode:
        _fail(
            "eval.also_on",
            also_on,
            "() unless the job is a language model's `jackpot` or `studies` mode (a text corpus)",
        )
    if not isinstance(also_on, tuple) or len(set(also_on)) != len(also_on):
        _fail("eval.also_on", also_on, f"a tuple of distinct corpora among {others}")
    for corpus in also_on:
        _choice("eval.also_on", corpus, others)
    _int("checkpoint.every_steps", c.checkpoint.every_steps, 1)
    _int("checkpoint.keep", c.checkpoint.keep, 1)
    _choice("parallel.backend", c.parallel.backend, ("auto", *BACKENDS))
    _int("parallel.num_devices", c.parallel.num_devices, 0)
    fsdp = _int("parallel.fsdp", c.parallel.fsdp, 1)
    data_size = _int("parallel.data", c.parallel.data, 0)
    if num_devices and num_devices % fsdp:
        _fail("parallel.fsdp", fsdp, f"a divisor of the {num_devices} device(s) the job runs on")
    if num_devices and data_size and data_size * fsdp != num_devices:
        _fail(
            "parallel.data",
            data_size,
            f"0 (all devices not on 'fsdp') or {num_devices // fsdp}: parallel.data x "
            f"parallel.fsdp must be the {num_devices} device(s) the job runs on",
        )
    if fsdp > 1 and c.parallel.backend not in ("auto", "jit"):
        _fail(
            "parallel.backend",
            c.parallel.backend,
            f"'auto' or 'jit' when `parallel.fsdp` is {fsdp}: pmap and shard_map run data "
            "parallelism only; sharded state runs under jit",
        )
    parse_rules(c.parallel.rules)
    _choice("search.selection", s.selection, tuple(SELECTIONS))
    _check_pattern(s)
    _int("log_every_steps", c.log_every_steps, 1)


def _check_language_model(c: ml_collections.ConfigDict) -> None:
    """What a language-model job (a text corpus) cannot take."""
    from jackpots_jax import models

    if models.spec(c.model.name).converter != "llama":
        llms = [n for n in models.names() if models.spec(n).converter == "llama"]
        _fail(
            "model.name",
            c.model.name,
            f"a language model for text corpus {c.dataset.name!r}: {', '.join(map(repr, llms))}",
        )
    if c.mode not in ("jackpot", "search", "evaluate", "prune", "export", "studies"):
        _fail(
            "mode",
            c.mode,
            "'jackpot', 'search', 'evaluate', 'prune', 'export' or 'studies' for a language model",
        )
    for name in ("search.label_smoothing", "search.augment"):
        group, field = name.split(".")
        if c[group][field]:
            _fail(name, c[group][field], "0 / False for a language model (next-token loss)")
    for pattern in c.search.patterns:
        copy = ml_collections.ConfigDict(c.search.to_dict())
        copy.pattern = pattern
        _check_pattern(copy, field="search.patterns")


def _check_pattern(s: ml_collections.ConfigDict, field: str = "search.pattern") -> None:
    """`search.pattern` parses, and an N:M pattern agrees with `search.sparsity`."""
    from jackpots_jax.patterns import INDIVISIBLE, PATTERNS, Pattern

    _choice("search.indivisible", s.indivisible, INDIVISIBLE)
    try:
        Pattern.parse(s.pattern)
    except (TypeError, ValueError) as e:
        _fail(field, s.pattern, f"{', '.join(PATTERNS)} ({e})")
    pattern_sparsity(s.pattern, s.sparsity, "search.sparsity")


def pattern_sparsity(pattern: str, sparsity: float, field: str = "search.sparsity") -> float:
    """The sparsity a search runs at: `sparsity`, or the exact one an N:M `pattern` fixes.

    An N:M pattern keeps N of every M weights, so its sparsity is `1 - N/M`; `sparsity` must say so,
    to the precision this program prints it (`1:3` is sparsity 0.666667: that is accepted, and
    the search runs at exactly 2/3).

    Args:
      pattern: `search.pattern` (already checked to parse).
      sparsity: the sparsity asked for.
      field: the config field `sparsity` comes from, named in the error.

    Returns:
      `1 - N/M` for an N:M pattern, else `sparsity` as a float.

    Raises:
      ConfigError: `sparsity` disagrees with an N:M pattern (the field is named).

    Example:
      >>> pattern_sparsity("1:3", 0.666667)
      0.6666666666666667
    """
    from fractions import Fraction

    from jackpots_jax.patterns import Pattern

    parsed = Pattern.parse(pattern)
    if parsed.kind != "n:m":
        return float(sparsity)
    implied = Fraction(parsed.m - parsed.n, parsed.m)
    close = abs(Fraction(repr(float(sparsity))) - implied) <= Fraction(1, 10**9)
    if not (close or f"{float(sparsity):g}" == f"{float(implied):g}"):
        verb = "holds" if field.endswith("sparsities") else "is"
        raise ConfigError(
            f"config field `{field}` {verb} {sparsity!r} but `search.pattern` {pattern!r} keeps "
            f"{parsed.n} of every {parsed.m} weights, which is sparsity {float(implied):g}; "
            f"allowed: {float(implied):g} with this pattern (an N:M pattern fixes the sparsity; "
            "it is never overridden silently)"
        )
    return float(implied)


def _rule_pieces(rule: str) -> list[str]:
    """One `parallel.rules` entry, split at its commas when every piece is a `pattern=dim` rule.

    `'conv1/kernel=none,fc1/kernel=0'` is two rules; `'conv{1,2}/kernel=0'` is one (its pieces
    are not rules).
    """
    pieces = rule.split(",")
    if len(pieces) > 1 and all(_RULE.fullmatch(p.strip()) for p in pieces):
        return [p.strip() for p in pieces]
    return [rule]


_RULE = re.compile(r"(.+)=\s*(none|None|-?\d+)\s*")


def parse_rules(rules: Any) -> tuple[tuple[str, int | None], ...]:
    """`parallel.rules` (`'pattern=dim'` strings, dim an int or `none`) as (pattern, dim) pairs.

    An entry may hold several rules separated by commas (`'conv1/kernel=none,fc1/kernel=0'`, as
    the command line's `--config.parallel.rules=conv1/kernel=none,fc1/kernel=0` gives them).

    Raises:
      ConfigError: a rule that is not `pattern=dim`, or a pattern that is not a regular expression.
    """
    if isinstance(rules, str):
        rules = (rules,)
    out = []
    for entry in rules or ():
        for rule in _rule_pieces(str(entry)):
            pattern, sep, dim = rule.rpartition("=")
            ok = bool(sep and pattern)
            if ok:
                try:
                    re.compile(pattern)
                    value = None if dim.strip().lower() == "none" else int(dim)
                except (re.error, ValueError):
                    ok = False
            if not ok:
                _fail(
                    "parallel.rules",
                    tuple(rules),
                    "'pattern=dim' entries: a regular expression searched in each leaf's path "
                    "and the dimension to shard over 'fsdp' (an int, or none to replicate), e.g. "
                    "'head/kernel=none'; several in one entry are separated by commas",
                )
            out.append((pattern, value))
    return tuple(out)


def check_rules(rules: Any, params: Any, fsdp: int) -> None:
    """Every `parallel.rules` entry matches a leaf of `params` and fits the leaves it matches.

    Checked on the shapes alone (abstract params do), before any compute: a rule that matches
    nothing is a typo that would leave the placement to the default silently, and a dimension a
    matched leaf does not have, or that `fsdp` does not divide, would fail once the state is
    placed.

    Args:
      rules: `parallel.rules`.
      params: the model's params (arrays or `jax.ShapeDtypeStruct`s).
      fsdp: the size of the `'fsdp'` axis (`parallel.fsdp`).

    Raises:
      ConfigError: naming the rule, the leaves and what is allowed.
    """
    from jackpots_jax._tree import named_leaves

    shapes = {
        name: tuple(leaf.shape) for name, leaf in named_leaves(params) if hasattr(leaf, "shape")
    }
    placed: set[str] = set()  # leaves an earlier rule decides (the first matching rule wins)
    for pattern, dim in parse_rules(rules):
        matched = {n: shape for n, shape in shapes.items() if re.search(pattern, n)}
        decides = {n: shape for n, shape in matched.items() if n not in placed}
        placed.update(matched)
        if not matched:
            raise ConfigError(
                f"config field `parallel.rules` has {pattern!r}, which matches none of the "
                f"model's leaves (a typo?); allowed: regular expressions searched in these "
                f"paths: {', '.join(shapes)}"
            )
        if dim is None or fsdp == 1:
            continue
        for name, shape in decides.items():
            if not -len(shape) <= dim < len(shape) or shape[dim] % fsdp:
                raise ConfigError(
                    f"config field `parallel.rules` has '{pattern}={dim}', which puts leaf "
                    f"{name} of shape {shape} on dimension {dim}: "
                    + (
                        f"it has {len(shape)} dimension(s)"
                        if not -len(shape) <= dim < len(shape)
                        else f"{shape[dim]} does not split into {fsdp} equal parts"
                    )
                    + f"; allowed: a dimension in [{-len(shape)}, {len(shape)}) whose size "
                    f"`parallel.fsdp`={fsdp} divides, or none (replicated)"
                )


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
        config.dataset.num_train = 16
        config.dataset.num_eval = 8
        config.pretrain.epochs = 1
        config.pretrain.batch_size = 8
        config.search.epochs = 1
        config.search.batch_size = 8
        config.eval.batch_size = 8
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
