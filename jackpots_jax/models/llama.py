"""A Llama-family decoder-only language model in Flax NNX (Llama, SmolLM2, Mistral, Qwen2).

The Hugging Face `LlamaForCausalLM` numerics, layer for layer: token embedding, `num_layers`
pre-norm blocks (RMSNorm, grouped-query self-attention with rotary position embeddings in the
rotate-half layout and a causal mask, RMSNorm, SwiGLU MLP), a final RMSNorm and the output head
(the embedding matrix itself when tied). Parameters (Flax kernels are `[in, out]`):

  embed/embedding                                  [vocab, D]
  layers/<i>/input_norm/scale                      [D]
  layers/<i>/attn/q_proj/kernel                    [D, H * hd]   (+ bias [H * hd], Qwen2)
  layers/<i>/attn/{k_proj,v_proj}/kernel           [D, KV * hd]  (+ bias [KV * hd], Qwen2)
  layers/<i>/attn/o_proj/kernel                    [H * hd, D]
  layers/<i>/post_attn_norm/scale                  [D]
  layers/<i>/mlp/{gate_proj,up_proj}/kernel        [D, F]
  layers/<i>/mlp/down_proj/kernel                  [F, D]
  norm/scale                                       [D]
  lm_head/kernel                                   [D, vocab]    (untied models only)

A search masks the seven projection kernels of every block (`MASKED`); the embedding, the norms and
the output head stay dense (`DENSE`). `kernel_inputs` gives, for calibration (Wanda, SparseGPT),
the inputs of every masked kernel on a batch of tokens.

Compute dtype: parameters are float32; with `dtype=jnp.bfloat16` the matmuls run in bfloat16,
while the residual stream, the RMSNorm statistics, the rotary embedding, the softmax and the
logits are float32.

Example:
  >>> config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
  ...                      num_heads=4, num_kv_heads=2)
  >>> model = Llama(config, rngs=nnx.Rngs(0))
  >>> logits = model(jnp.zeros((1, 8), jnp.int32))   # [1, 8, 256] float32
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jackpots_jax.models import layers

# Regular expressions over leaf paths: the leaves a search keeps dense by default.
DENSE = (r"^embed/", r"^lm_head/", r"/scale$", r"/bias$")

# The masked kernels of one block, relative to `layers/<i>/`, in the order of the computation.
BLOCK_KERNELS = (
    "attn/q_proj/kernel",
    "attn/k_proj/kernel",
    "attn/v_proj/kernel",
    "attn/o_proj/kernel",
    "mlp/gate_proj/kernel",
    "mlp/up_proj/kernel",
    "mlp/down_proj/kernel",
)

_HF_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture of a Llama-family decoder.

    Attributes:
      vocab_size: number of tokens (rows of the embedding, logits per position).
      hidden_size: width `D` of the residual stream.
      intermediate_size: width `F` of the SwiGLU MLP.
      num_layers: number of blocks.
      num_heads: query heads `H`.
      num_kv_heads: key/value heads `KV` (grouped-query attention; `H % KV == 0`).
      head_dim: width of one head; `None`: `hidden_size // num_heads`.
      rope_theta: base of the rotary embedding's frequencies.
      rms_norm_eps: epsilon of every RMSNorm.
      tie_embeddings: the output head is the embedding matrix (no `lm_head`).
      attention_bias: q, k and v projections have biases (Qwen2); o never has one.
      max_seq_len: the longest sequence the model accepts.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"LlamaConfig.head_dim must be even (rotary pairs), got {self.head_dim}"
            )
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(
                f"LlamaConfig.rope_theta and rms_norm_eps must be positive, got "
                f"{self.rope_theta!r} and {self.rms_norm_eps!r}"
            )

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> LlamaConfig:
        """The config of a Hugging Face `config.json` (Llama, SmolLM2, Mistral, Qwen2).

        Raises:
          ValueError: another `model_type`, or a feature this model does not implement (rope
            scaling other than the default, an activation other than SiLU, an o-projection or MLP
            bias, a sliding window on some layers only), named with its value.
        """
        kind = hf.get("model_type")
        if kind not in _HF_ARCHITECTURES:
            raise ValueError(
                f"config.json: model_type {kind!r} is not supported; allowed: "
                f"{', '.join(_HF_ARCHITECTURES)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"config.json: hidden_act {hf['hidden_act']!r}: only 'silu' is supported"
            )
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        rope_type = scaling.get("rope_type", scaling.get("type", rope.get("rope_type", "default")))
        if rope_type != "default":
            raise ValueError(
                f"config.json: rope type {rope_type!r} is not supported; only 'default' (no rope "
                "scaling)"
            )
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        for key in ("mlp_bias",) + (("attention_bias",) if kind != "qwen2" else ()):
            if hf.get(key):
                raise ValueError(f"config.json: {key}=true is not supported")
        max_len = int(hf.get("max_position_embeddings", 2048))
        window = hf.get("sliding_window")
        uses_window = window is not None and (kind != "qwen2" or hf.get("use_sliding_window"))
        if uses_window:
            if kind == "qwen2" and hf.get("max_window_layers", 0) < hf["num_hidden_layers"]:
                raise ValueError(
                    "config.json: a sliding window on the first max_window_layers="
                    f"{hf.get('max_window_layers')} layers only is not supported"
                )
            # Up to the window length, windowed attention is full causal attention.
            max_len = min(max_len, int(window))
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=kind == "qwen2",
            max_seq_len=max_len,
        )

    @classmethod
    def from_gguf_metadata(
        cls, metadata: Mapping[str, Any], tensor_names: tuple[str, ...] = ()
    ) -> LlamaConfig:
        """The config of a GGUF file's metadata (`io.gguf.read_metadata`), llama/qwen2 arch.

        Args:
          metadata: `{key: value}` of the GGUF header (`general.architecture`, `<arch>.*`).
          tensor_names: the file's tensor names; tied embeddings are a file without
            `output.weight`, biases one with `blk.0.attn_q.bias`.

        Raises:
          ValueError: another architecture, or rope scaling / a key-value width it does not
            implement.
        """
        arch = metadata.get("general.architecture")
        if arch not in ("llama", "qwen2"):
            raise ValueError(
                f"GGUF general.architecture {arch!r} is not supported; allowed: llama, qwen2"
            )

        def get(key, default=None):
            value = metadata.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"GGUF metadata lacks {arch}.{key}")
            return value

        scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", "linear") or (
            scaling == "linear" and metadata.get(f"{arch}.rope.scaling.factor", 1.0) != 1.0
        ):
            raise ValueError(f"GGUF {arch}.rope.scaling.type {scaling!r} is not supported")
        hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
        head_dim = int(metadata.get(f"{arch}.attention.key_length", hidden // heads))
        if int(get("rope.dimension_count", head_dim)) != head_dim:
            raise ValueError(f"GGUF {arch}.rope.dimension_count: partial rotary is not supported")
        vocab = metadata.get(f"{arch}.vocab_size") or len(metadata["tokenizer.ggml.tokens"])
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            tie_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            max_seq_len=int(get("context_length", 2048)),
        )


def masked_paths(config: LlamaConfig) -> tuple[str, ...]:
    """The leaf paths `DENSE` leaves prunable, in model order (block by block)."""
    return tuple(f"layers/{i}/{k}" for i in range(config.num_layers) for k in BLOCK_KERNELS)


class RMSNorm(nnx.Module):
    """`x / sqrt(mean(x^2) + eps) * scale`, statistics in float32 (as Hugging Face's)."""

    def __init__(self, features: int, eps: float):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x


def rotary(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """`(cos, sin)` `[t, head_dim]`, rotate-half layout: frequency `j` at `j` and `j + hd/2`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates `x` `[b, t, heads, hd]`: pairs `(x[j], x[j + hd/2])` by the angle of frequency j."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _linear(d_in: int, d_out: int, bias: bool, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Grouped-query causal self-attention with rotary embeddings."""

    def __init__(self, c: LlamaConfig, dtype: Any, rngs: nnx.Rngs):
        self.config = c
        self.dtype = dtype
        self.q_proj = _linear(
            c.hidden_size, c.num_heads * c.head_dim, c.attention_bias, dtype, rngs
        )
        self.k_proj = _linear(
            c.hidden_size, c.num_kv_heads * c.head_dim, c.attention_bias, dtype, rngs
        )
        self.v_proj = _linear(
            c.hidden_size, c.num_kv_heads * c.head_dim, c.attention_bias, dtype, rngs
        )
        self.o_proj = _linear(c.num_heads * c.head_dim, c.hidden_size, False, dtype, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, capture: bool) -> jax.Array:
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).astype(jnp.float32).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(x).astype(jnp.float32).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Each key/value head serves `group` consecutive query heads (Hugging Face's repeat_kv).
        group = c.num_heads // c.num_kv_heads
        q = q.reshape(b, t, c.num_kv_heads, group, c.head_dim).astype(self.dtype)
        scores = jnp.einsum(
            "bqkgd,bskd->bkgqs", q, k.astype(self.dtype), preferred_element_type=jnp.float32
        )
        scores = scores / np.sqrt(c.head_dim).astype(np.float32)
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v.astype(self.dtype))
        out = out.reshape(b, t, c.num_heads * c.head_dim)
        if capture:
            self.sow(nnx.Intermediate, "o_proj_inputs", out)
        return self.o_proj(out).astype(jnp.float32)


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, c: LlamaConfig, dtype: Any, rngs: nnx.Rngs):
        self.gate_proj = _linear(c.hidden_size, c.intermediate_size, False, dtype, rngs)
        self.up_proj = _linear(c.hidden_size, c.intermediate_size, False, dtype, rngs)
        self.down_proj = _linear(c.intermediate_size, c.hidden_size, False, dtype, rngs)

    def __call__(self, x: jax.Array, capture: bool) -> jax.Array:
        h = nnx.silu(self.gate_proj(x)) * self.up_proj(x)
        if capture:
            self.sow(nnx.Intermediate, "down_proj_inputs", h)
        return self.down_proj(h).astype(jnp.float32)


class Block(nnx.Module):
    """Pre-norm decoder block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, c: LlamaConfig, dtype: Any, rngs: nnx.Rngs):
        self.dtype = dtype
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c, dtype, rngs)
        self.post_attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c, dtype, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, capture: bool) -> jax.Array:
        h = self.input_norm(x).astype(self.dtype)
        if capture:
            self.sow(nnx.Intermediate, "attn_inputs", h)
        x = x + self.attn(h, cos, sin, capture)
        h = self.post_attn_norm(x).astype(self.dtype)
        if capture:
            self.sow(nnx.Intermediate, "mlp_inputs", h)
        return x + self.mlp(h, capture)


class Llama(nnx.Module):
    """A Llama-family causal language model.

    Example:
      >>> model = Llama(LlamaConfig(256, 64, 128, 2, 4, 2), rngs=nnx.Rngs(0))
      >>> logits = model(jnp.zeros((1, 8), jnp.int32))   # [1, 8, 256] float32
    """

    def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        c = self.config = config
        self.dtype = layers.compute_dtype(dtype)
        self.embed = nnx.Embed(
            c.vocab_size,
            c.hidden_size,
            param_dtype=jnp.float32,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.layers = nnx.List([Block(c, self.dtype, rngs) for _ in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if not c.tie_embeddings:
            self.lm_head = _linear(c.hidden_size, c.vocab_size, False, self.dtype, rngs)

    def __call__(self, tokens: jax.Array, *, capture: bool = False) -> jax.Array:
        """Float32 logits `[b, t, vocab]` of int32 tokens `[b, t]` (position `i` sees `<= i`).

        Args:
          tokens: token ids `[batch, seq]`, `seq <= config.max_seq_len`.
          capture: sow the inputs of every masked kernel as `nnx.Intermediate`s (what
            `kernel_inputs` reads).
        """
        c = self.config
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"Llama takes integer tokens [batch, seq], got {tokens.dtype} {tokens.shape}"
            )
        if tokens.shape[1] > c.max_seq_len:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds the model's max_seq_len {c.max_seq_len}"
            )
        x = self.embed.embedding[...][tokens]
        cos, sin = rotary(jnp.arange(tokens.shape[1]), c.head_dim, c.rope_theta)
        for block in self.layers:
            x = block(x, cos, sin, capture)
        x = self.norm(x).astype(self.dtype)
        if c.tie_embeddings:
            table = self.embed.embedding[...].astype(self.dtype)
            logits = jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x)
        return layers.logits(logits)


_SOWN = {
    "attn_inputs": ("attn/q_proj/kernel", "attn/k_proj/kernel", "attn/v_proj/kernel"),
    "attn/o_proj_inputs": ("attn/o_proj/kernel",),
    "mlp_inputs": ("mlp/gate_proj/kernel", "mlp/up_proj/kernel"),
    "mlp/down_proj_inputs": ("mlp/down_proj/kernel",),
}


def kernel_inputs(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array) -> dict[str, jax.Array]:
    """The inputs of every masked kernel on a batch of tokens, for calibration (Wanda, SparseGPT).

    A pure function of the parameters: the model runs once with `capture=True`, which sows the
    input of each projection (in the compute dtype) as an `nnx.Intermediate`; q/k/v share one
    input, and so do gate/up.

    Args:
      graphdef: `nnx.split(model, nnx.Param, ...)[0]` (or `Network.module`).
      params: the model's parameters, an `nnx.State` or a plain nested dict (masked weights
        `W * M` to calibrate a later layer on the pruned earlier ones).
      tokens: int32 `[b, t]`.

    Returns:
      `{kernel path: inputs [b * t, d_in]}` for every path of `masked_paths(config)`.

    Example:
      >>> graphdef, params = nnx.split(model, nnx.Param)
      >>> acts = jax.jit(kernel_inputs, static_argnums=0)(graphdef, params, tokens)
      >>> acts["layers/0/attn/q_proj/kernel"].shape   # (b * t, hidden_size)
    """
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    model = nnx.merge(graphdef, params)
    model(tokens, capture=True)
    sown = nnx.to_pure_dict(nnx.pop(model, nnx.Intermediate))
    out = {}
    for i, block in sown["layers"].items():
        for name, kernels in _SOWN.items():
            value = block
            for part in name.split("/"):
                value = value[part]
            (value,) = value  # `sow` keeps a tuple of the values sown
            for kernel in kernels:
                out[f"layers/{i}/{kernel}"] = value.reshape(-1, value.shape[-1])
    return out


# ---------------------------------------------------------------------------------------------
# The registry's specs (`--config.model.name=smollm2_135m`, or `llama` with sizes as options).

SMOLLM2_135M = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_embeddings=True,
    max_seq_len=8192,
)


def layer_groups(path: str) -> dict[str, str]:
    """`{"block": "block i", "kind": "attention" | "mlp"}` of a masked kernel's path."""
    found = re.match(r"layers/(\d+)/(attn|mlp)/", path)
    if not found:
        return {}
    return {
        "block": f"block {found.group(1)}",
        "kind": "attention" if found.group(2) == "attn" else "mlp",
    }


def _smollm2_build(num_classes: int, dtype: Any, *, rngs: nnx.Rngs) -> Llama:
    if num_classes != SMOLLM2_135M.vocab_size:
        raise ValueError(
            f"smollm2_135m has {SMOLLM2_135M.vocab_size} tokens; num_classes (the vocabulary size) "
            f"must be that, got {num_classes}"
        )
    return Llama(SMOLLM2_135M, dtype=dtype, rngs=rngs)


def _llama_build(
    num_classes: int,
    dtype: Any,
    *,
    rngs: nnx.Rngs,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-5,
    tie_embeddings: bool = False,
    attention_bias: bool = False,
    max_seq_len: int = 2048,
) -> Llama:
    """A Llama of any size; the vocabulary size is the number of classes."""
    config = LlamaConfig(
        vocab_size=num_classes,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope_theta=rope_theta,
        rms_norm_eps=rms_norm_eps,
        tie_embeddings=tie_embeddings,
        attention_bias=attention_bias,
        max_seq_len=max_seq_len,
    )
    return Llama(config, dtype=dtype, rngs=rngs)


def config_of(model_name: str, num_classes: int, **options) -> LlamaConfig:
    """The `LlamaConfig` of a registered model (`smollm2_135m`, or `llama` with its options).

    Example:
      >>> config_of("llama", 256, num_layers=4).num_layers
      4
    """
    if model_name == "smollm2_135m":
        return SMOLLM2_135M
    defaults = {
        k: p.default
        for k, p in inspect.signature(_llama_build).parameters.items()
        if p.default is not p.empty
    }
    return LlamaConfig(vocab_size=num_classes, **{**defaults, **options})


def _spec(name: str, build, seq_len: int):
    from jackpots_jax.models.spec import ModelSpec

    return ModelSpec(
        name=name,
        build=build,
        input_shape=(seq_len,),
        input_dtype=jnp.int32,
        kind="nnx",
        classifier="lm_head",
        dense=DENSE,
        torch=None,  # checkpoints go through `io.llama_weights`
        converter="llama",
        layer_groups=layer_groups,
    )


SPECS = (_spec("smollm2_135m", _smollm2_build, 256), _spec("llama", _llama_build, 128))
