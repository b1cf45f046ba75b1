"""Vision Transformer (Dosovitskiy et al. 2021) in Flax NNX, in the layout of the original ViT code.

A conv patch embedding (`embedding`, kernel `[p, p, C, D]`), a learned class token (`cls`) or
global average pooling, learned position embeddings (`pos_embedding`), pre-LayerNorm encoder
blocks (multi-head self-attention with big_vision's `DenseGeneral` kernels, then a GELU MLP), a
final LayerNorm and the classifier `head`. The parameter leaves of a model (`nnx.split(model)`):

  embedding/kernel [p, p, C, D]        embedding/bias [D]
  cls [1, 1, D]                        (only with pool="cls")
  pos_embedding [1, N (+1 with cls), D]
  blocks/<i>/norm1/scale, bias [D]
  blocks/<i>/attn/query/kernel [D, H, D/H]    bias [H, D/H]   (also key, value)
  blocks/<i>/attn/out/kernel [H, D/H, D]      bias [D]
  blocks/<i>/norm2/scale, bias [D]
  blocks/<i>/mlp/fc1/kernel [D, M]     bias [M]
  blocks/<i>/mlp/fc2/kernel [M, D]     bias [D]
  encoder_norm/scale, bias [D]
  head/kernel [D, classes]             head/bias [classes]

The position embedding of the class token is part of `pos_embedding` (its first row), as in the
original ViT code and timm; big_vision's checkpoints, which add the position embedding before the
class token is prepended, import with a zero row there (`jackpots_jax.vit_convert`).

Mixed precision as in the CNNs: `dtype` is the compute dtype of the patch embedding and of every
matmul; parameters are float32; the residual stream, the LayerNorms (statistics and output), the
softmax of the attention and the logits are float32.

`DENSE` holds the patterns (for `jj.prunable_leaves` / `jj.layer_budgets`) that keep everything
but the six kernels of each block and the patch embedding dense: the classifier, the position
embedding, the class token, and the biases (those of q/k/v are 2-D, `[H, D/H]`, so the default
"at least two dimensions" rule alone would mask them).

Example:
  >>> model = create_vit("vit_fmnist", num_classes=10, rngs=nnx.Rngs(0))
  >>> logits = model(jnp.zeros((8, 28, 28, 1)))                    # float32 [8, 10]
  >>> graphdef, params = nnx.split(model, nnx.Param)
  >>> budget = jj.layer_budgets(params, 0.9, dense=DENSE)
  >>> scores, masks = jj.init_scores(params, budget, "magnitude")
  >>> logits = nnx.merge(graphdef, jj.masked_weights(params, scores, masks))(images)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jackpots_jax.models import layers

POOLS = ("cls", "gap")

# Regular expressions over leaf paths ('blocks/0/attn/query/kernel'): the leaves a search keeps
# dense by default. Anchored, so that no other leaf can match by accident.
DENSE = (r"^head/", r"^pos_embedding$", r"^cls$", r"/bias$")

# The masked kernels of one encoder block, relative to `blocks/<i>/`.
BLOCK_KERNELS = (
    "attn/query/kernel",
    "attn/key/kernel",
    "attn/value/kernel",
    "attn/out/kernel",
    "mlp/fc1/kernel",
    "mlp/fc2/kernel",
)

_xavier = nnx.initializers.xavier_uniform()


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """The architecture of a ViT (everything but the number of classes and the dtype).

    Attributes:
      width: the token dimension `D`.
      depth: the number of encoder blocks.
      num_heads: attention heads `H`; `width` must be a multiple of it.
      mlp_dim: hidden width `M` of each block's MLP.
      patch_size: side `p` of the square patches; `image_size` must be a multiple of it.
      image_size: side of the square input images.
      channels: channels `C` of the input images.
      pool: `"cls"` (classify the class token) or `"gap"` (the mean of the tokens).
      gelu_approximate: the tanh approximation of GELU (what the JAX ViT codes use; their
        checkpoints were trained with it) instead of the exact erf form (PyTorch's `nn.GELU()`,
        timm's default).
      norm_epsilon: epsilon of every LayerNorm (1e-6 in the JAX ViT codes and timm).
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    image_size: int
    channels: int = 3
    pool: str = "cls"
    gelu_approximate: bool = False
    norm_epsilon: float = 1e-6

    def __post_init__(self):
        for field in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "image_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ViTConfig.{field} must be a positive integer, got {value!r}")
        if (
            isinstance(self.channels, bool)
            or not isinstance(self.channels, int)
            or self.channels < 1
        ):
            raise ValueError(
                f"ViTConfig.channels must be a positive integer, got {self.channels!r}"
            )
        if self.width % self.num_heads:
            raise ValueError(
                f"ViTConfig.width ({self.width}) must be a multiple of num_heads ({self.num_heads})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.image_size ({self.image_size}) must be a multiple of patch_size "
                f"({self.patch_size})"
            )
        if self.pool not in POOLS:
            raise ValueError(f"ViTConfig.pool must be one of {POOLS}, got {self.pool!r}")

    @property
    def head_dim(self) -> int:
        """`D / H`, the width of one attention head."""
        return self.width // self.num_heads

    @property
    def num_patches(self) -> int:
        """`N`, the number of patch tokens of one image."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """The sequence length: `N`, plus one with a class token."""
        return self.num_patches + (self.pool == "cls")


# Table 2 of "Scaling Vision Transformers" (Ti, S, B), at the usual 224x224 ImageNet resolution.
CONFIGS: dict[str, ViTConfig] = {
    "vit_ti16": ViTConfig(192, 12, 3, 768, 16, 224),
    "vit_s16": ViTConfig(384, 12, 6, 1536, 16, 224),
    "vit_b16": ViTConfig(768, 12, 12, 3072, 16, 224),
    "vit_b32": ViTConfig(768, 12, 12, 3072, 32, 224),
    # Fashion-MNIST: a 4x4 grid of 7x7-pixel patches, cheap enough to pre-train and search on
    # two CPU cores; the recipe and its measured accuracy: benchmarks/vit_fmnist_recipe.py.
    "vit_fmnist": ViTConfig(
        width=96,
        depth=4,
        num_heads=4,
        mlp_dim=192,
        patch_size=7,
        image_size=28,
        channels=1,
        pool="gap",
    ),
}


class Attention(nnx.Module):
    """Multi-head self-attention with big_vision's `DenseGeneral` kernels.

    `query`, `key`, `value`: kernel `[D, H, D/H]`, bias `[H, D/H]`; `out`: kernel `[H, D/H, D]`,
    bias `[D]`. The query is scaled by `1/sqrt(D/H)`; the softmax runs in float32.
    """

    def __init__(self, width: int, num_heads: int, *, dtype: Any, rngs: nnx.Rngs):
        head_dim = width // num_heads
        self.dtype = dtype
        self.head_dim = head_dim

        def proj(n_in, n_out, axis=-1):
            return nnx.LinearGeneral(
                n_in,
                n_out,
                axis=axis,
                dtype=dtype,
                param_dtype=jnp.float32,
                kernel_init=_xavier,
                bias_init=nnx.initializers.zeros,
                rngs=rngs,
            )

        self.query = proj(width, (num_heads, head_dim))
        self.key = proj(width, (num_heads, head_dim))
        self.value = proj(width, (num_heads, head_dim))
        self.out = proj((num_heads, head_dim), width, axis=(-2, -1))

    def __call__(self, x: jax.Array) -> jax.Array:
        q = self.query(x) / jnp.sqrt(self.head_dim).astype(self.dtype)  # [B, L, H, D/H]
        k, v = self.key(x), self.value(x)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v))


class Mlp(nnx.Module):
    """`fc2(gelu(fc1(x)))`: dense `D -> M -> D`."""

    def __init__(self, width: int, mlp_dim: int, *, approximate: bool, dtype: Any, rngs):
        def dense(n_in, n_out):
            return nnx.Linear(
                n_in,
                n_out,
                dtype=dtype,
                param_dtype=jnp.float32,
                kernel_init=_xavier,
                bias_init=nnx.initializers.normal(1e-6),
                rngs=rngs,
            )

        self.approximate = approximate
        self.fc1 = dense(width, mlp_dim)
        self.fc2 = dense(mlp_dim, width)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=self.approximate))


def _layer_norm(width: int, epsilon: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # float32 in and out whatever the compute dtype; the two-pass variance, not E[x^2] - E[x]^2.
    return nnx.LayerNorm(
        width,
        epsilon=epsilon,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        rngs=rngs,
    )


class EncoderBlock(nnx.Module):
    """`x + attn(norm1(x))`, then `x + mlp(norm2(x))` (pre-LayerNorm)."""

    def __init__(self, config: ViTConfig, *, dtype: Any, rngs: nnx.Rngs):
        c = config
        self.norm1 = _layer_norm(c.width, c.norm_epsilon, rngs)
        self.attn = Attention(c.width, c.num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = _layer_norm(c.width, c.norm_epsilon, rngs)
        self.mlp = Mlp(c.width, c.mlp_dim, approximate=c.gelu_approximate, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x)).astype(jnp.float32)
        return x + self.mlp(self.norm2(x)).astype(jnp.float32)


class ViT(nnx.Module):
    """Vision Transformer: NHWC images in, float32 logits out.

    Attributes:
      config: the architecture (`ViTConfig`).
      num_classes: the number of logits.
      dtype: the compute dtype (`jnp.float32` or `jnp.bfloat16`).

    Example:
      >>> config = ViTConfig(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4,
      ...                    image_size=16)
      >>> model = ViT(config, num_classes=10, rngs=nnx.Rngs(0))
      >>> logits = model(jnp.zeros((2, 16, 16, 3)))                   # [2, 10]
    """

    def __init__(
        self,
        config: ViTConfig,
        num_classes: int,
        *,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        c = config
        self.config = config
        self.num_classes = num_classes
        self.dtype = layers.compute_dtype(dtype)
        p = c.patch_size
        self.embedding = nnx.Conv(
            c.channels,
            c.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        if c.pool == "cls":
            self.cls = nnx.Param(jnp.zeros((1, 1, c.width), jnp.float32))
        self.pos_embedding = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (1, c.num_tokens, c.width), jnp.float32)
        )
        self.blocks = nnx.List(
            [EncoderBlock(c, dtype=self.dtype, rngs=rngs) for _ in range(c.depth)]
        )
        self.encoder_norm = _layer_norm(c.width, c.norm_epsilon, rngs)
        # Zero-initialised, as in the JAX ViT codes.
        self.head = nnx.Linear(
            c.width,
            num_classes,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nnx.initializers.zeros,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Float32 logits `[batch, num_classes]` of NHWC images `x` (`image_size` square)."""
        c = self.config
        x = layers.inputs(x)
        if x.shape[1:] != (c.image_size, c.image_size, c.channels):
            raise ValueError(
                f"this ViT takes images of shape {(c.image_size, c.image_size, c.channels)} "
                f"(height, width, channels), got {tuple(x.shape[1:])}"
            )
        x = self.embedding(x.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, c.width).astype(jnp.float32)
        if c.pool == "cls":
            x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (b, 1, c.width)), x], axis=1)
        x = x + self.pos_embedding[...]
        for block in self.blocks:
            x = block(x)
        x = self.encoder_norm(x)
        x = x[:, 0] if c.pool == "cls" else jnp.mean(x, axis=1)
        return layers.logits(self.head(x))


def names() -> tuple[str, ...]:
    """The names of the configs in `CONFIGS`, sorted."""
    return tuple(sorted(CONFIGS))


def get_config(name: str, **overrides) -> ViTConfig:
    """The config of a named ViT, with fields replaced by `overrides` (e.g. `pool="gap"`).

    Raises:
      ValueError: an unknown name or field, or an impossible value.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown ViT name {name!r}; known: {', '.join(names())}")
    fields = [f.name for f in dataclasses.fields(ViTConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"ViTConfig has no field(s) {unknown}; fields: {', '.join(fields)}")
    return dataclasses.replace(CONFIGS[name], **overrides)


def create_vit(
    name: str,
    num_classes: int,
    *,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
    **overrides,
) -> ViT:
    """Builds a named ViT.

    Args:
      name: one of `names()`: `vit_ti16`, `vit_s16`, `vit_b16`, `vit_b32` (224x224x3) or
        `vit_fmnist` (28x28x1).
      num_classes: the number of logits.
      dtype: compute dtype, `jnp.float32` or `jnp.bfloat16` (or their names).
      rngs: the initialisation randomness, e.g. `nnx.Rngs(0)`.
      **overrides: `ViTConfig` fields to change, e.g. `pool="gap"` or `image_size=384`.

    Returns:
      A `ViT`. Shapes without allocation: `nnx.eval_shape(lambda: create_vit(...))`.

    Example:
      >>> model = create_vit("vit_b16", num_classes=1000, rngs=nnx.Rngs(0))
    """
    return ViT(get_config(name, **overrides), num_classes, dtype=dtype, rngs=rngs)


def masked_paths(config: ViTConfig) -> tuple[str, ...]:
    """The leaf paths `DENSE` leaves prunable, in model order: the patch embedding, then per block
    the q, k, v and output projections and the two MLP kernels."""
    paths = ["embedding/kernel"]
    for i in range(config.depth):
        paths += [f"blocks/{i}/{k}" for k in BLOCK_KERNELS]
    return tuple(paths)


# ---------------------------------------------------------------------------------------------
# The registry's specs (`models.create("vit_fmnist", 10)`, `--config.model.name=vit_b16`).

# The input axes of the attention kernels, for structured patterns (N:M groups run along the last
# of them): q/k/v `[D, H, D/H]` contract D, the output `[H, D/H, D]` contracts (H, D/H).
INPUT_AXES = ((r"attn/(query|key|value)/kernel$", 1), (r"attn/out/kernel$", 2))


def layer_groups(path: str) -> dict[str, str]:
    """How reports group a masked kernel: `{"block": "block i", "kind": "attention" | "MLP"}`
    for the encoder blocks (`blocks/<i>/attn/...`, `blocks/<i>/mlp/...`); a kernel outside the
    blocks (the patch embedding) is its own group in both groupings."""
    found = re.match(r"blocks/(\d+)/(attn|mlp)/", path)
    if not found:
        top = path.split("/")[0]
        return {"block": top, "kind": top}
    return {"block": f"block {found[1]}", "kind": "attention" if found[2] == "attn" else "MLP"}


def _spec(name: str):
    from jackpots_jax.models.spec import ModelSpec

    def build(
        num_classes: int,
        dtype: Any,
        *,
        rngs: nnx.Rngs,
        width: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_dim: int | None = None,
        patch_size: int | None = None,
        pool: str | None = None,
        gelu_approximate: bool | None = None,
    ) -> ViT:
        """The named ViT; the options (`--config.model.kwargs.depth=2`) replace its fields."""
        overrides = dict(
            width=width,
            depth=depth,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            patch_size=patch_size,
            pool=pool,
            gelu_approximate=gelu_approximate,
        )
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return create_vit(name, num_classes, dtype=dtype, rngs=rngs, **overrides)

    c = CONFIGS[name]
    return ModelSpec(
        name=name,
        build=build,
        input_shape=(c.image_size, c.image_size, c.channels),
        kind="nnx",
        fixed_input_shape=True,
        dense=DENSE,
        torch=None,  # not the CNNs' layer map: checkpoints go through `io.vit_weights`
        input_axes=INPUT_AXES,
        converter="vit",
        layer_groups=layer_groups,
    )


SPECS = tuple(_spec(name) for name in names())
