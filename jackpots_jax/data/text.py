"""Text corpora for language models: offline documents, tokenized once, packed, read with grain.

    corpus (documents) -> split by document (hash of its text) -> tokenize every document
      ([BOS] + encode(text) + [EOS]), concatenate per split -> cache on disk (.npz)
      -> train: shuffled windows of T + 1 tokens; validation: every target once, in order

Corpora (all on disk, nothing downloaded):

  name           documents                                     where (default)
  pydoc_topics   CPython's help topics, one per topic          `pydoc_data/topics.py` of this Python
  fortunes       Debian's fortune cookies, one per record      /usr/share/games/fortunes
                                                               (`apt-get install fortunes`)
  python_stdlib  CPython's standard library source, one        the `stdlib` path of this Python
                 per `.py` file (tests and site-packages left out)

Split: a document goes to validation when the first 8 bytes of the SHA-256 of its UTF-8 text,
read as a big-endian integer, fall below `validation_fraction * 2**64`. The rule depends on the
text only (not on the order, the file or the machine), and exact duplicates are kept once, so no
validation text is ever trained on.

Tokens: every document becomes `[bos_id] + tokenizer.encode(text) + [eos_id]` (no EOS when the
tokenizer has none), and the documents of a split are concatenated, in title order, into one
int32 stream. A target that is BOS gets weight 0 in training and evaluation: BOS is given, never
predicted, so the scored tokens are each document's text tokens and its EOS.

Packing, for a stream `s` of `N` tokens and a sequence length `T`:
- train: window `i` is `s[i*T : i*T + T + 1]`, inputs its first `T` tokens and targets its last
  `T`; the `(N - 1) // T` windows are shuffled every epoch and the tail that fills no window is
  left out. Each target is trained on at most once per epoch.
- validation: window `j` has inputs `s[j*T : j*T + T]` and targets `s[j*T + 1 : j*T + T + 1]`;
  `ceil((N - 1) / T)` windows, the last padded with weight 0, so every token of the stream after
  the first is a target exactly once. The context of a prediction is its window, not the whole
  history: the first target of a window is predicted from one token. `token_count` (the sum of
  the weights) is then the number of text tokens plus EOS tokens of the validation documents.

Batches are `{"inputs": int32 [b, T], "targets": int32 [b, T], "weights": float32 [b, T]}` and
are sharded over hosts as the image pipelines are (see `pipeline`): training batch `t` is the same
global batch for any number of hosts and host `p` yields its rows; evaluation gives every host a
contiguous share of the windows and the same number of batches, padded with weight 0.

Example:
  >>> data = text.prepare_text("pydoc_topics", tokenizer, cache_dir="/tmp/text")
  >>> it = text.text_train_iterator(data, seq_len=256, global_batch_size=32, seed=0)
  >>> batch = next(it)        # inputs / targets int32 [32, 256], weights float32 [32, 256]
  >>> nll, count = 0.0, 0.0
  >>> for b in text.text_eval_iterator(data, seq_len=256, global_batch_size=32):
  ...   nll += (per_token_nll(b) * b["weights"]).sum(); count += b["weights"].sum()
  >>> text.perplexity(nll, count)
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import sysconfig
import tokenize
import zipfile
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grain
import numpy as np

from jackpots_jax.data.datasets import check_positive, default_data_dir
from jackpots_jax.data.pipeline import (
    TrainIterator,
    _hosts,
    _read_options,
    _seed,
    epoch_permutation,
    eval_layout,
    local_batch_size,
)
from jackpots_jax.io.files import atomic_path

Batch = dict[str, np.ndarray]
CORPORA = ("pydoc_topics", "fortunes", "python_stdlib")
FORTUNES_DIR = "/usr/share/games/fortunes"
DEFAULT_VALIDATION_FRACTION = 0.1
# Bumped whenever the cache's contents or the tokenization rules change.
CACHE_FORMAT = 1


class Tokenizer(Protocol):
    """What the text pipeline needs of a tokenizer."""

    bos_id: int
    eos_id: int | None
    vocab_size: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of a corpus: a title (unique in the corpus) and its text."""

    title: str
    text: str


# ----------------------------------------------------------------------------------------------
# Corpora


def _pydoc_topics(path: str | None) -> list[Document]:
    if path is None:
        found = importlib.util.find_spec("pydoc_data.topics")
        if found is None or not found.origin or not os.path.isfile(found.origin):
            raise FileNotFoundError(
                "corpus 'pydoc_topics': this Python has no pydoc_data/topics.py (some "
                "distributions split it off: on Debian `apt-get install libpython3-stdlib`); "
                "or pass its path"
            )
        path = found.origin
    _exists(path, "pydoc_topics", "CPython's Lib/pydoc_data/topics.py")
    with open(path, encoding="utf-8") as f:
        module = ast.parse(f.read(), filename=path)
    # Read as a literal, never executed: the file is data that happens to be Python.
    for node in module.body:
        targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
            isinstance(t, ast.Name) and t.id == "topics" for t in targets
        ):
            topics = ast.literal_eval(node.value)
            return [Document(k, v) for k, v in topics.items()]
    raise ValueError(f"corpus 'pydoc_topics': {path} assigns no `topics` dict")


# strfile's format: records separated by lines holding a single `%`.
_FORTUNE_SEPARATOR = re.compile(r"^%$", re.MULTILINE)


def _fortunes(path: str | None) -> list[Document]:
    path = FORTUNES_DIR if path is None else path
    _exists(path, "fortunes", "Debian's fortune cookies: `apt-get install fortunes`")
    docs = []
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        # `.dat` are strfile indexes; `.u8` are symlinks to the same files.
        if name.endswith(".dat") or os.path.islink(file) or not os.path.isfile(file):
            continue
        with open(file, encoding="utf-8", errors="replace") as f:
            records = _FORTUNE_SEPARATOR.split(f.read())
        docs += [Document(f"{name}/{i}", r.strip("\n")) for i, r in enumerate(records)]
    if not docs:
        raise FileNotFoundError(
            f"corpus 'fortunes': no fortune files in {path} (`apt-get install fortunes`)"
        )
    return docs


_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _python_stdlib(path: str | None) -> list[Document]:
    path = sysconfig.get_paths()["stdlib"] if path is None else path
    _exists(path, "python_stdlib", "the standard library of a CPython installation")
    docs = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP)
        for name in sorted(files):
            if name.endswith(".py"):
                file = os.path.join(root, name)
                with tokenize.open(file) as f:  # honours a file's coding declaration
                    docs.append(Document(os.path.relpath(file, path), f.read()))
    return docs


def _exists(path: str, corpus: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"corpus {corpus!r}: {path} does not exist ({what})")


_LOADERS: dict[str, Callable[[str | None], list[Document]]] = {
    "pydoc_topics": _pydoc_topics,
    "fortunes": _fortunes,
    "python_stdlib": _python_stdlib,
}


def load_corpus(name: str, path: str | os.PathLike | None = None) -> list[Document]:
    """The documents of a corpus, sorted by title; blank and repeated texts are left out.

    Args:
      name: one of `CORPORA`.
      path: where to read it (None: the default place, see the module docstring): the
        `topics.py` file, the fortunes folder or the standard library folder.

    Returns:
      The documents, each text non-blank and different from every other one (of two equal texts
      the one with the smaller title is kept).

    Raises:
      ValueError: an unknown corpus name.
      FileNotFoundError: the corpus is not there (the message says how to install it).

    Example:
      >>> docs = load_corpus("fortunes")      # after `apt-get install fortunes`
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown text corpus {name!r}; known corpora: {', '.join(CORPORA)}")
    docs = sorted(_LOADERS[name](None if path is None else os.fspath(path)), key=_title)
    seen, kept = set(), []
    for doc in docs:
        if doc.text.strip() and doc.text not in seen:
            seen.add(doc.text)
            kept.append(doc)
    return kept


def _title(doc: Document) -> str:
    return doc.title


def in_validation(text: str, validation_fraction: float) -> bool:
    """Whether a document of this text belongs to the validation split (see the module doc)."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h < validation_fraction * 2**64


def split_documents(
    docs: list[Document], validation_fraction: float = DEFAULT_VALIDATION_FRACTION
) -> tuple[list[Document], list[Document]]:
    """Train and validation documents, by the hash of each text (order kept).

    Args:
      docs: the documents (from `load_corpus`).
      validation_fraction: the expected share of documents in validation, in (0, 1).

    Returns:
      `(train, validation)`.

    Example:
      >>> train, validation = split_documents(load_corpus("pydoc_topics"), 0.1)
    """
    _check_fraction(validation_fraction)
    train, validation = [], []
    for doc in docs:
        (validation if in_validation(doc.text, validation_fraction) else train).append(doc)
    return train, validation


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"`validation_fraction` must be in (0, 1), got {fraction!r}")


# ----------------------------------------------------------------------------------------------
# Tokens, cached on disk


@dataclasses.dataclass(frozen=True)
class TextData:
    """The tokenized splits of a corpus.

    Attributes:
      corpus: the corpus name.
      key: the cache key (corpus content, tokenizer fingerprint, settings), a hex string.
      vocab_size, bos_id, eos_id: the tokenizer's.
      train_tokens, validation_tokens: int32 `[N]`, the documents of the split concatenated, each
        `[BOS] + text + [EOS]`.
      train_titles, validation_titles: the documents of each split, in stream order.
    """

    corpus: str
    key: str
    vocab_size: int
    bos_id: int
    eos_id: int | None
    train_tokens: np.ndarray
    validation_tokens: np.ndarray
    train_titles: tuple[str, ...]
    validation_titles: tuple[str, ...]

    @property
    def token_count(self) -> int:
        """The validation tokens scored: targets that are not BOS (text tokens and EOS)."""
        return int(np.count_nonzero(self.validation_tokens[1:] != self.bos_id))


def corpus_hash(docs: list[Document]) -> str:
    """SHA-256 of the documents' titles and texts (hex), the corpus part of the cache key."""
    h = hashlib.sha256()
    for doc in docs:
        for part in (doc.title, doc.text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def prepare_text(
    corpus: str,
    tokenizer: Tokenizer,
    *,
    cache_dir: str | os.PathLike | None = None,
    corpus_path: str | os.PathLike | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> TextData:
    """Loads, splits and tokenizes a corpus, or reads the tokens cached by an earlier call.

    The cache file is `<cache_dir>/<corpus>-<key[:16]>.npz`, keyed by the corpus content, the
    tokenizer's `fingerprint`, BOS/EOS ids, the split fraction and the cache format; it is
    written atomically, and a cache that cannot be read or holds another key is rebuilt.

    Args:
      corpus: one of `CORPORA`.
      tokenizer: an object with `encode(str) -> list[int]`, `bos_id`, `eos_id` (may be None),
        `vocab_size` and `fingerprint` (a string that changes whenever `encode` does).
      cache_dir: where tokens are cached (None: `<default_data_dir()>/jackpots_text`).
      corpus_path: where the corpus is (None: its default place; see `load_corpus`).
      validation_fraction: see `split_documents`.

    Returns:
      A `TextData`.

    Raises:
      FileNotFoundError: the corpus is not there.
      ValueError: bad settings, a tokenizer without BOS, token ids outside the vocabulary, or a
        split left without documents.

    Example:
      >>> data = prepare_text("fortunes", tokenizer, cache_dir="/tmp/text")
    """
    _check_fraction(validation_fraction)
    bos, eos, vocab = _tokenizer_ids(tokenizer)
    docs = load_corpus(corpus, corpus_path)
    settings = {
        "format": CACHE_FORMAT,
        "corpus": corpus,
        "corpus_sha256": corpus_hash(docs),
        "tokenizer": str(tokenizer.fingerprint),
        "bos_id": bos,
        "eos_id": eos,
        "vocab_size": vocab,
        "validation_fraction": float(validation_fraction),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    if cache_dir is None:
        cache_dir = os.path.join(default_data_dir(), "jackpots_text")
    file = os.path.join(os.fspath(cache_dir), f"{corpus}-{key[:16]}.npz")
    cached = _read_cache(file, key)
    if cached is None:
        train, validation = split_documents(docs, validation_fraction)
        for split, part in (("train", train), ("validation", validation)):
            if not part:
                raise ValueError(
                    f"corpus {corpus!r}: validation_fraction {validation_fraction} leaves the "
                    f"{split} split without documents ({len(docs)} documents in all)"
                )
        cached = {
            "train_tokens": _tokenize(train, tokenizer, bos, eos, vocab),
            "validation_tokens": _tokenize(validation, tokenizer, bos, eos, vocab),
            "train_titles": np.array([d.title for d in train], dtype=np.str_),
            "validation_titles": np.array([d.title for d in validation], dtype=np.str_),
        }
        with atomic_path(file) as tmp, open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), **cached)
    return TextData(
        corpus=corpus,
        key=key,
        vocab_size=vocab,
        bos_id=bos,
        eos_id=eos,
        train_tokens=_readonly(cached["train_tokens"]),
        validation_tokens=_readonly(cached["validation_tokens"]),
        train_titles=tuple(cached["train_titles"].tolist()),
        validation_titles=tuple(cached["validation_titles"].tolist()),
    )


def _tokenizer_ids(tokenizer: Tokenizer) -> tuple[int, int | None, int]:
    vocab, bos, eos = tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id
    check_positive(vocab, "tokenizer.vocab_size")
    for name, value, optional in (("bos_id", bos, False), ("eos_id", eos, True)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(
                f"`tokenizer.{name}` must be an int in [0, {vocab}), got {value!r} (the text "
                "pipeline starts every document with BOS)"
            )
        if not 0 <= value < vocab:
            raise ValueError(f"`tokenizer.{name}` must be in [0, {vocab}), got {value}")
    return int(bos), None if eos is None else int(eos), int(vocab)


def _tokenize(
    docs: list[Document], tokenizer: Tokenizer, bos: int, eos: int | None, vocab: int
) -> np.ndarray:
    pieces = []
    for doc in docs:
        ids = np.asarray(tokenizer.encode(doc.text), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            bad = ids[(ids < 0) | (ids >= vocab)][0]
            raise ValueError(
                f"tokenizer {tokenizer.fingerprint!r} encoded document {doc.title!r} to id {bad}, "
                f"outside its vocabulary [0, {vocab})"
            )
        pieces += [[bos], ids] + ([[eos]] if eos is not None else [])
    return np.concatenate(pieces).astype(np.int32)


def _read_cache(file: str, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file holding `key`, or None (missing, stale or unreadable)."""
    if not os.path.exists(file):
        return None
    names = ("train_tokens", "validation_tokens", "train_titles", "validation_titles")
    try:
        with np.load(file, allow_pickle=False) as f:
            if str(f["key"]) != key:
                raise ValueError(f"it holds key {str(f['key'])[:16]}")
            arrays = {n: f[n] for n in names}  # reading checks every member's CRC
        for n in names[:2]:
            if arrays[n].dtype != np.int32 or arrays[n].ndim != 1:
                raise ValueError(f"{n} is {arrays[n].dtype} {arrays[n].shape}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        logging.warning("Rebuilding the token cache %s, which cannot be used: %s", file, e)
        return None
    return arrays


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


# ----------------------------------------------------------------------------------------------
# Packing


def num_train_windows(num_tokens: int, seq_len: int) -> int:
    """Training windows of `seq_len + 1` tokens in a stream: `(num_tokens - 1) // seq_len`."""
    return max(0, num_tokens - 1) // seq_len


def num_eval_windows(num_tokens: int, seq_len: int) -> int:
    """Validation windows covering every target once: `ceil((num_tokens - 1) / seq_len)`."""
    return -(-max(0, num_tokens - 1) // seq_len)


def train_windows(tokens: np.ndarray, windows: np.ndarray, seq_len: int, bos_id: int) -> Batch:
    """The training examples of the windows `windows` (indices) of a stream.

    Args:
      tokens: int32 `[N]`, the stream.
      windows: int `[b]`, window indices in `[0, num_train_windows(N, seq_len))`.
      seq_len: `T`.
      bos_id: targets equal to it get weight 0.

    Returns:
      `{"inputs": s[i*T : i*T+T], "targets": s[i*T+1 : i*T+T+1], "weights"}` for every window
      `i`: int32, int32 and float32 `[b, T]`.

    Example:
      >>> batch = train_windows(data.train_tokens, np.array([0, 5]), 128, data.bos_id)
    """
    span = tokens[np.asarray(windows)[:, None] * seq_len + np.arange(seq_len + 1)]
    targets = span[:, 1:]
    return {
        "inputs": span[:, :-1],
        "targets": targets,
        "weights": (targets != bos_id).astype(np.float32),
    }


def eval_windows(tokens: np.ndarray, windows: np.ndarray, seq_len: int, bos_id: int) -> Batch:
    """The validation examples of the windows `windows` of a stream; past its end, weight 0.

    Window `j` has inputs `s[j*T : j*T+T]` and targets `s[j*T+1 : j*T+T+1]`; positions past the
    stream's end hold token 0 with weight 0, as do targets equal to `bos_id`.

    Args:
      tokens: int32 `[N]`, the stream.
      windows: int `[b]`, window indices (any; those at or past `num_eval_windows` are all padding).
      seq_len: `T`.
      bos_id: targets equal to it get weight 0.

    Returns:
      `{"inputs", "targets"}` int32 `[b, T]` and `"weights"` float32 `[b, T]`.

    Example:
      >>> batch = eval_windows(data.validation_tokens, np.arange(4), 128, data.bos_id)
    """
    windows = np.asarray(windows)
    positions = windows[:, None] * seq_len + np.arange(seq_len + 1)
    # Window `num_eval_windows` may still start on the last token: rows past it are all padding.
    real = windows < num_eval_windows(len(tokens), seq_len)
    valid = (positions < len(tokens)) & real[:, None]
    span = np.where(valid, tokens[np.minimum(positions, len(tokens) - 1)], 0).astype(np.int32)
    targets = span[:, 1:]
    weights = valid[:, 1:] & (targets != bos_id)
    return {"inputs": span[:, :-1], "targets": targets, "weights": weights.astype(np.float32)}


# ----------------------------------------------------------------------------------------------
# Iterators


def text_train_iterator(
    data: TextData,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
    num_threads: int | None = None,
) -> TrainIterator:
    """Endless training batches of packed windows, reshuffled each epoch, last partial dropped.

    Args:
      data: from `prepare_text`.
      seq_len: tokens per example, `T`.
      global_batch_size: the batch over all hosts (each yields `global_batch_size /
        process_count` rows, a multiple of its device count).
      seed: the shuffle seed (a non-negative integer).
      process_index, process_count: this host and the number of hosts (None: from jax).
      local_device_count: devices per host for the divisibility check (None: from jax).
      num_threads: prefetch threads (None: 1; 0 loads in the calling thread).

    Returns:
      A `TrainIterator` (with `get_state` / `set_state`, `steps_per_epoch`) of batches
      `{"inputs", "targets"}` int32 `[local_batch, T]`, `"weights"` float32 `[local_batch, T]`.

    Raises:
      ValueError: bad settings, or fewer windows than one global batch.

    Example:
      >>> it = text_train_iterator(data, seq_len=128, global_batch_size=16, seed=0)
    """
    check_positive(seq_len, "seq_len")
    index, count = _hosts(process_index, process_count)
    local_batch = local_batch_size(global_batch_size, count, local_device_count)
    n = num_train_windows(len(data.train_tokens), seq_len)
    steps = n // global_batch_size
    if steps == 0:
        raise ValueError(
            f"`global_batch_size` {global_batch_size} exceeds the {n} training windows of "
            f"{seq_len + 1} tokens of corpus {data.corpus!r}: an epoch has no complete batch"
        )
    first = index * local_batch
    shuffle_seed = _seed(seed, 0)

    def windows(step: int, batch_in_epoch: int) -> np.ndarray:
        order = epoch_permutation(shuffle_seed, step // steps, n)
        start = batch_in_epoch * global_batch_size + first
        return order[start : start + local_batch]

    def load(w: np.ndarray) -> Batch:
        return train_windows(data.train_tokens, w, seq_len, data.bos_id)

    ds = grain.MapDataset.range(steps).repeat(None).map_with_index(windows).map(load)
    iterator = ds.to_iter_dataset(_read_options(True, num_threads)).__iter__()
    pipeline = {
        "dataset": f"text/{data.corpus}",
        "cache_key": data.key,
        "seq_len": int(seq_len),
        "num_examples": n,
        "seed": int(seed),
        "global_batch_size": int(global_batch_size),
        "process_count": count,
    }
    return TrainIterator(iterator, pipeline, steps, local_batch)


def text_eval_iterator(
    data: TextData,
    *,
    seq_len: int,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    local_device_count: int | None = None,
    num_threads: int | None = None,
) -> Iterator[Batch]:
    """One pass over the validation windows, in order, every target once over all hosts.

    Host `p` takes the windows `[p * n // P, (p + 1) * n // P)`; every host yields
    `text_eval_steps(...)` batches of the same shape, rows past its share all weight 0.

    Args:
      data: from `prepare_text`.
      seq_len: tokens per example, `T`.
      global_batch_size: the batch over all hosts.
      process_index, process_count: this host and the number of hosts (None: from jax).
      local_device_count: devices per host for the divisibility check (None: from jax).
      num_threads: prefetch threads (None: 1).

    Returns:
      An iterator of `{"inputs", "targets"}` int32 `[local_batch, T]`, `"weights"` float32.

    Example:
      >>> count = sum(b["weights"].sum() for b in text_eval_iterator(
      ...     data, seq_len=128, global_batch_size=16))      # == data.token_count (one host)
    """
    check_positive(seq_len, "seq_len")
    index, count = _hosts(process_index, process_count)
    local_batch = local_batch_size(global_batch_size, count, local_device_count)
    n = num_eval_windows(len(data.validation_tokens), seq_len)
    start, stop, num_batches = eval_layout(n, index, count, local_batch)

    def load(batch_index: int) -> Batch:
        w = start + batch_index * local_batch + np.arange(local_batch)
        # Rows past this host's share point past the last window: all padding.
        w = np.where(w < stop, w, n)
        return eval_windows(data.validation_tokens, w, seq_len, data.bos_id)

    ds = grain.MapDataset.range(num_batches).map(load)
    return ds.to_iter_dataset(_read_options(True, num_threads)).__iter__()


def text_eval_steps(
    data: TextData, *, seq_len: int, global_batch_size: int, process_count: int | None = None
) -> int:
    """The number of batches `text_eval_iterator` yields on every host."""
    check_positive(seq_len, "seq_len")
    _, count = _hosts(0, process_count)
    check_positive(global_batch_size, "global_batch_size")
    if global_batch_size % count:
        raise ValueError(
            f"`global_batch_size` {global_batch_size} must be a multiple of process_count {count}"
        )
    n = num_eval_windows(len(data.validation_tokens), seq_len)
    return eval_layout(n, 0, count, global_batch_size // count)[2]


def perplexity(sum_nll: Any, token_count: Any) -> float:
    """`exp(sum_nll / token_count)`: the perplexity of the tokens scored.

    Args:
      sum_nll: the summed negative log-likelihood (nats) of the scored targets, each weighted by
        its batch weight.
      token_count: the sum of the weights, over a whole pass `data.token_count`.

    Returns:
      The perplexity, a float.

    Raises:
      ValueError: a non-positive token count.

    Example:
      >>> perplexity(2 * math.log(4.0), 2)
      4.0
    """
    count = float(token_count)
    if not count > 0:
        raise ValueError(f"`token_count` must be positive, got {token_count!r}")
    return math.exp(float(sum_nll) / count)
