"""Byte-level BPE tokenizers of language models, from a GGUF file's metadata or a tokenizer.json.

Built on Hugging Face's `tokenizers` library. A GGUF file (`tokenizer.ggml.model == "gpt2"`, the
byte-level BPE of GPT-2, Llama 3, SmolLM, Qwen) holds the vocabulary, the merges, the special
tokens and the name of the pre-tokenizer (`tokenizer.ggml.pre`); `from_gguf` rebuilds the
tokenizer from them. The pre-tokenizers implemented are those named in `PRE_TOKENIZERS`.

The interface the text datasets use: `encode(text) -> list[int]` (no BOS/EOS added), `decode`,
`bos_id`, `eos_id`, `vocab_size`, and `fingerprint` (a hash of everything that decides the ids,
for caches).

Example:
  >>> tok = Tokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
  >>> ids = tok.encode("Hello world")
  >>> tok.decode(ids)
  'Hello world'
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

# GPT-2's pre-tokenizer pattern (contractions, letters, digits, other, spaces).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# `tokenizer.ggml.pre` -> whether each digit is split off on its own before the GPT-2 pattern
# (llama.cpp's `smollm` pre-tokenizer is `\p{N}` then GPT-2's).
PRE_TOKENIZERS = {"default": False, "gpt2": False, "smollm": True}

_CONTROL, _USER_DEFINED = 3, 4  # `tokenizer.ggml.token_type` values of special tokens


class Tokenizer:
    """A byte-level BPE tokenizer (wraps a `tokenizers.Tokenizer`).

    Attributes:
      bos_id: the id of the beginning-of-sequence token, or `None`.
      eos_id: the id of the end-of-sequence token, or `None`.
      vocab_size: the number of ids (with the special tokens).
      fingerprint: a hex digest of the vocabulary, merges, special tokens and pre-tokenizer.
    """

    def __init__(self, tokenizer: Any, bos_id: int | None, eos_id: int | None):
        self._tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        digest = hashlib.sha256(tokenizer.to_str().encode())
        digest.update(json.dumps([bos_id, eos_id]).encode())
        self.fingerprint = digest.hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        """The ids of `text`; no BOS or EOS is added. Special tokens written in the text (e.g.
        `<|im_start|>`) are matched as themselves."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Any) -> str:
        """The text of `ids` (a list or an integer array); special tokens are kept."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @classmethod
    def from_gguf(cls, path_or_metadata: str | os.PathLike | dict) -> Tokenizer:
        """The tokenizer of a GGUF file (a path, or its metadata from `io.gguf.read_metadata`).

        Raises:
          ValueError: not a byte-level BPE (`tokenizer.ggml.model` other than `gpt2`), or a
            pre-tokenizer not in `PRE_TOKENIZERS` (use the model's `tokenizer.json` then).
        """
        tokenizers = _tokenizers()
        from tokenizers import decoders, models, pre_tokenizers

        if isinstance(path_or_metadata, dict):
            meta = path_or_metadata
        else:
            from jackpots_jax.io import gguf

            meta = gguf.read_metadata(path_or_metadata)
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"GGUF tokenizer.ggml.model {kind!r}: only byte-level BPE ('gpt2') is read from "
                "GGUF metadata; use the model's tokenizer.json (Tokenizer.from_file)"
            )
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(
                f"GGUF tokenizer.ggml.pre {pre!r} is not implemented (known: "
                f"{', '.join(PRE_TOKENIZERS)}); use the model's tokenizer.json"
            )
        tokens = list(meta["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        splits = [
            pre_tokenizers.Split(tokenizers.Regex(_GPT2), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
        if PRE_TOKENIZERS[pre]:
            splits.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
        tok.decoder = decoders.ByteLevel()
        types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        special = [t for t, k in zip(tokens, types, strict=True) if k in (_CONTROL, _USER_DEFINED)]
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in special])
        bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
        return cls(tok, None if bos is None else int(bos), None if eos is None else int(eos))

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, *, bos_token: str | None = None, eos_token: str | None = None
    ) -> Tokenizer:
        """A Hugging Face `tokenizer.json` (or a folder holding one).

        The BOS/EOS tokens are `bos_token` / `eos_token`, else those of a `tokenizer_config.json`
        beside it, else none.

        Raises:
          FileNotFoundError: no such file.
          ValueError: a named BOS/EOS token that is not in the vocabulary.
        """
        tokenizers = _tokenizers()
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json at {path!r}")
        tok = tokenizers.Tokenizer.from_file(path)
        extra = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        if os.path.isfile(extra):
            with open(extra) as f:
                found = json.load(f)
            bos_token = bos_token or _content(found.get("bos_token"))
            eos_token = eos_token or _content(found.get("eos_token"))

        def token_id(token: str | None) -> int | None:
            if token is None:
                return None
            found = tok.token_to_id(token)
            if found is None:
                raise ValueError(f"{path!r}: token {token!r} is not in the vocabulary")
            return found

        return cls(tok, token_id(bos_token), token_id(eos_token))


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "the tokenizers need the `tokenizers` package: pip install 'jackpots_jax[lm]'"
        ) from None
    return tokenizers


def _content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token
