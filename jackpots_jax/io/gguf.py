"""GGUF files (llama.cpp's format): the metadata and the tensors, dequantized to float32 numpy.

Parsing and the block formats' dequantization are the `gguf` package's (llama.cpp's own Python
library); this module picks the tensor types it accepts (`SUPPORTED`), turns llama.cpp's tensor
shapes into numpy's (`[out, in]` for a weight matrix, as in Hugging Face checkpoints) and undoes the
row permutation llama.cpp's converter applies to the query and key projections of `llama`
models: llama.cpp rotates interleaved pairs `(x[2j], x[2j+1])`, Hugging Face rotate-half pairs
`(x[j], x[j + hd/2])`, so the converter reorders each head's rows; `unpermute_heads` undoes it
and the weights come out in the Hugging Face layout. (`qwen2` files are not permuted: llama.cpp
runs them with rotate-half rotary embeddings.)

Example:
  >>> f = read("SmolLM2-135M-Instruct.Q4_1.gguf")
  >>> f.metadata["llama.block_count"], f.tensors["blk.0.attn_q.weight"].shape
  (30, (576, 576))
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jackpots_jax.io.errors import FileContentError

# The tensor types read: float, bfloat and the legacy 8- and 4-bit block formats.
SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """What `read` found in a GGUF file.

    Attributes:
      metadata: `{key: value}` of the header (strings, numbers, lists).
      tensors: `{name: float32 numpy array}`, numpy shapes (llama.cpp's reversed), the query and
        key weights of `llama` files in the Hugging Face (rotate-half) row order.
      types: `{name: tensor type name}` as stored (`'Q4_1'`, `'F32'`, ...).
    """

    metadata: Mapping[str, Any]
    tensors: Mapping[str, np.ndarray]
    types: Mapping[str, str]


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(
            "reading GGUF files needs the `gguf` package: pip install 'jackpots_jax[lm]'"
        ) from None
    return gguf


def _open(path: str):
    """The file's `gguf.GGUFReader`, parsed once per file version (path, size, mtime).

    Parsing the header of a file with a tokenizer inside (SmolLM2's 49,152 tokens and their
    merges) takes seconds; the tokenizer and the weights each read it, so the reader is kept
    (it maps the tensors, it does not copy them). A file rewritten in place is parsed again.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path!r}")
    with open(path, "rb"):
        pass  # a file that may not be read: PermissionError, not the reader's own error
    stat = os.stat(path)
    try:
        return _parse(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise FileContentError(
            f"{path!r} is not a readable GGUF file ({stat.st_size} bytes; the reader says: "
            f"{err}); download it again, or use another file"
        ) from None


@functools.lru_cache(maxsize=2)
def _parse(path: str, size: int, mtime_ns: int):
    del size, mtime_ns  # the cache key: another version of the file is another entry
    return _gguf().GGUFReader(path)


def read_metadata(reader_or_path: Any) -> dict[str, Any]:
    """The header's `{key: value}` of a GGUF file (a path, or an open `gguf.GGUFReader`)."""
    reader = (
        _open(reader_or_path) if isinstance(reader_or_path, (str, os.PathLike)) else reader_or_path
    )
    return {key: field.contents() for key, field in reader.fields.items()}


def unpermute_heads(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head row permutation of a query or key weight (or bias).

    llama.cpp's converter sends row `h*hd + i*hd/2 + j` (rotate-half) to `h*hd + 2j + i`
    (interleaved); this sends it back.

    Args:
      weight: `[num_heads * head_dim, ...]` as stored in the GGUF file.
      num_heads: query heads for the query weight, key/value heads for the key weight.

    Returns:
      The same rows in the Hugging Face order.
    """
    rows = weight.shape[0]
    split = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def read(path: str | os.PathLike) -> GGUFFile:
    """Reads a GGUF file: its metadata and every tensor, dequantized to float32.

    Raises:
      FileNotFoundError: no file at `path`.
      PermissionError: it may not be read.
      FileContentError: not a GGUF file, or a tensor of a type not in `SUPPORTED` (named with its
        tensor).
    """
    gguf = _gguf()
    reader = _open(path)
    metadata = read_metadata(reader)
    tensors, types = {}, {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in SUPPORTED:
            raise FileContentError(
                f"{os.fspath(path)!r}: tensor {t.name!r} has type {kind}, which is not "
                f"supported (supported: {', '.join(SUPPORTED)}); convert the model with one of "
                "those (llama.cpp's llama-quantize)"
            )
        shape = tuple(int(n) for n in reversed(t.shape))
        tensors[t.name] = np.asarray(gguf.dequantize(t.data, t.tensor_type), np.float32).reshape(
            shape
        )
        types[t.name] = kind
    arch = metadata.get("general.architecture")
    if arch == "llama":
        heads = int(metadata["llama.attention.head_count"])
        kv_heads = int(metadata.get("llama.attention.head_count_kv", heads))
        for name in tensors:
            if name.endswith(("attn_q.weight", "attn_q.bias")):
                tensors[name] = unpermute_heads(tensors[name], heads)
            elif name.endswith(("attn_k.weight", "attn_k.bias")):
                tensors[name] = unpermute_heads(tensors[name], kv_heads)
    return GGUFFile(metadata, tensors, types)
