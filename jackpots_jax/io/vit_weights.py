"""ViT checkpoints <-> the parameter state of `jackpots_jax.models.vit.ViT`, strictly, with masks.

Import (`to_nnx`, `import_checkpoint`) reads three key layouts (`LAYOUTS`):

- `vit_jax`: the `.npz` files of google-research/vision_transformer. Flax layout, '/'-joined paths:
  `embedding/kernel`, `cls`, `Transformer/posembed_input/pos_embedding`,
  `Transformer/encoderblock_<i>/LayerNorm_0`, `.../MultiHeadDotProductAttention_1/{query,key,
  value,out}`, `.../LayerNorm_2`, `.../MlpBlock_3/Dense_{0,1}`, `Transformer/encoder_norm`, `head`.
- `big_vision`: the `.npz` files of google-research/big_vision: the same, except
  `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`, and a top-level `pos_embedding`
  that has no row for the class token (big_vision adds it before prepending the token); it is
  imported with a zero row there, which gives the same outputs.
- `timm`: PyTorch state dicts of timm's `VisionTransformer` (also the `model.safetensors` of the
  timm models on the Hugging Face hub): `patch_embed.proj.weight` (OIHW), `cls_token`,
  `pos_embed`, `blocks.<i>.norm1`, `blocks.<i>.attn.qkv` (q, k, v fused: `[3D, D]`),
  `blocks.<i>.attn.proj`, `blocks.<i>.norm2`, `blocks.<i>.mlp.fc{1,2}`, `norm`, `head`; linear
  weights `[out, in]`. A timm model with `global_pool='avg'` matches `pool="gap"` only when built
  with `fc_norm=False` (timm's default then normalises after pooling; this model before).

Export (`to_timm`, `export_timm`) writes the timm layout, masked weights `W * M`, and per masked
kernel its mask as `<module>.b_mask` (float32 0/1, the weight's layout; for the attention one
fused `attn.qkv.b_mask`) and optionally the scores as `<module>.mask`, as `jackpots_jax.io.weights`
does for the CNNs; `to_nnx` reads them back (the masks as bool).

What a checkpoint cannot say: the number of heads of a timm checkpoint (q, k and v are fused),
the GELU form and the LayerNorm epsilon come from the config the caller gives.

Every disagreement (a missing key, an unexpected key, a wrong shape) raises one
`jackpots_jax.io.errors.CheckpointMismatchError` listing them all, with a hint naming the dimensions
in which the checkpoint differs from the model (width, depth, heads, MLP width, patch size, ...).

Example:
  >>> params, scores, masks = import_checkpoint("ViT-B_16.npz", "vit_b16")
  >>> model = vit.create_vit("vit_b16", 1000, rngs=nnx.Rngs(0))
  >>> nnx.update(model, params)
  >>> export_timm(params, "vit_b16", "jackpot.safetensors", masks=masks)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jackpots_jax._tree import named_leaves, path_str
from jackpots_jax.io.errors import CheckpointMismatchError, FileContentError
from jackpots_jax.io.formats import load_state_dict, save_state_dict
from jackpots_jax.models import vit

PyTree = Any
StateDict = dict[str, np.ndarray]

LAYOUTS = ("timm", "vit_jax", "big_vision")

# The module names inside an encoder block: (first norm, attention, second norm, MLP).
_BLOCK_NAMES = {
    "vit_jax": ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
    "big_vision": ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"),
}
_POS_KEY = {"vit_jax": "Transformer/posembed_input/pos_embedding", "big_vision": "pos_embedding"}


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One checkpoint tensor and the model leaves it holds.

    `to_ours(array)` gives the leaves' arrays (in the order of `paths`) and `to_theirs(*arrays)`
    the checkpoint tensor back. `maskable`: a kernel, whose mask and scores a timm export writes.
    """

    key: str
    shapes: tuple[tuple[int, ...], ...]  # the accepted checkpoint shapes (the first is written)
    paths: tuple[str, ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_theirs: Callable[..., np.ndarray]
    maskable: bool = False


def _same(x):
    return (x,)


def _identity(x):
    return x


def _transposed(x):
    return (np.ascontiguousarray(x.T),)


def _transpose(x):
    return np.ascontiguousarray(x.T)


def _jax_entries(config: vit.ViTConfig, num_classes: int, fmt: str) -> list[_Entry]:
    """The checkpoint entries of the two JAX layouts (Flax layout: arrays as they are)."""
    c = config
    d, h, hd, m, p = c.width, c.num_heads, c.head_dim, c.mlp_dim, c.patch_size
    entries = []

    def add(key, path, shape):
        entries.append(_Entry(key, (shape,), (path,), _same, _identity))

    add("embedding/kernel", "embedding/kernel", (p, p, c.channels, d))
    add("embedding/bias", "embedding/bias", (d,))
    if c.pool == "cls":
        add("cls", "cls", (1, 1, d))
    pos_shape = (1, c.num_tokens, d)
    if fmt == "big_vision" and c.pool == "cls":
        # big_vision's posemb has no class-token row; its older checkpoints do (see its
        # `fix_old_checkpoints`): accept both, a missing row is zero.
        def pos_to_ours(x):
            if x.shape[1] == c.num_patches:
                x = np.concatenate([np.zeros((1, 1, d), x.dtype), x], axis=1)
            return (x,)

        entries.append(
            _Entry(
                _POS_KEY[fmt],
                ((1, c.num_patches, d), pos_shape),
                ("pos_embedding",),
                pos_to_ours,
                lambda x: x[:, 1:],
            )
        )
    else:
        add(_POS_KEY[fmt], "pos_embedding", pos_shape)
    ln1, attn, ln2, mlp = _BLOCK_NAMES[fmt]
    for i in range(c.depth):
        ours, theirs = f"blocks/{i}", f"Transformer/encoderblock_{i}"
        for norm, name in (("norm1", ln1), ("norm2", ln2)):
            add(f"{theirs}/{name}/scale", f"{ours}/{norm}/scale", (d,))
            add(f"{theirs}/{name}/bias", f"{ours}/{norm}/bias", (d,))
        for proj in ("query", "key", "value"):
            add(f"{theirs}/{attn}/{proj}/kernel", f"{ours}/attn/{proj}/kernel", (d, h, hd))
            add(f"{theirs}/{attn}/{proj}/bias", f"{ours}/attn/{proj}/bias", (h, hd))
        add(f"{theirs}/{attn}/out/kernel", f"{ours}/attn/out/kernel", (h, hd, d))
        add(f"{theirs}/{attn}/out/bias", f"{ours}/attn/out/bias", (d,))
        add(f"{theirs}/{mlp}/Dense_0/kernel", f"{ours}/mlp/fc1/kernel", (d, m))
        add(f"{theirs}/{mlp}/Dense_0/bias", f"{ours}/mlp/fc1/bias", (m,))
        add(f"{theirs}/{mlp}/Dense_1/kernel", f"{ours}/mlp/fc2/kernel", (m, d))
        add(f"{theirs}/{mlp}/Dense_1/bias", f"{ours}/mlp/fc2/bias", (d,))
    add("Transformer/encoder_norm/scale", "encoder_norm/scale", (d,))
    add("Transformer/encoder_norm/bias", "encoder_norm/bias", (d,))
    add("head/kernel", "head/kernel", (d, num_classes))
    add("head/bias", "head/bias", (num_classes,))
    return entries


def _timm_entries(config: vit.ViTConfig, num_classes: int) -> list[_Entry]:
    """The checkpoint entries of timm's layout (PyTorch: OIHW convs, `[out, in]` linears)."""
    c = config
    d, h, hd, m, p = c.width, c.num_heads, c.head_dim, c.mlp_dim, c.patch_size
    entries = []

    def add(key, paths, shape, to_ours=_same, to_theirs=_identity, maskable=False):
        paths = (paths,) if isinstance(paths, str) else paths
        entries.append(_Entry(key, (shape,), paths, to_ours, to_theirs, maskable))

    add(
        "patch_embed.proj.weight",
        "embedding/kernel",
        (d, c.channels, p, p),
        lambda x: (np.ascontiguousarray(x.transpose(2, 3, 1, 0)),),  # OIHW -> HWIO
        lambda k: np.ascontiguousarray(k.transpose(3, 2, 0, 1)),
        maskable=True,
    )
    add("patch_embed.proj.bias", "embedding/bias", (d,))
    if c.pool == "cls":
        add("cls_token", "cls", (1, 1, d))
    add("pos_embed", "pos_embedding", (1, c.num_tokens, d))

    # timm splits the fused output as (3, heads, head_dim) and merges heads as (heads, head_dim):
    # output channel j*D + h*hd + e is head h, entry e of q (j=0), k (j=1) or v (j=2).
    def qkv_to_ours(w):
        return tuple(
            np.ascontiguousarray(w[j * d : (j + 1) * d].T.reshape(d, h, hd)) for j in range(3)
        )

    def qkv_to_theirs(*kernels):
        return np.concatenate([k.reshape(d, d).T for k in kernels], axis=0)

    def qkv_bias_to_ours(b):
        return tuple(b[j * d : (j + 1) * d].reshape(h, hd) for j in range(3))

    def qkv_bias_to_theirs(*biases):
        return np.concatenate([b.reshape(d) for b in biases])

    for i in range(c.depth):
        ours, theirs = f"blocks/{i}", f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            add(f"{theirs}.{norm}.weight", f"{ours}/{norm}/scale", (d,))
            add(f"{theirs}.{norm}.bias", f"{ours}/{norm}/bias", (d,))
        q, k, v = (f"{ours}/attn/{proj}" for proj in ("query", "key", "value"))
        add(
            f"{theirs}.attn.qkv.weight",
            (f"{q}/kernel", f"{k}/kernel", f"{v}/kernel"),
            (3 * d, d),
            qkv_to_ours,
            qkv_to_theirs,
            maskable=True,
        )
        add(
            f"{theirs}.attn.qkv.bias",
            (f"{q}/bias", f"{k}/bias", f"{v}/bias"),
            (3 * d,),
            qkv_bias_to_ours,
            qkv_bias_to_theirs,
        )
        add(
            f"{theirs}.attn.proj.weight",
            f"{ours}/attn/out/kernel",
            (d, d),
            lambda w: (np.ascontiguousarray(w.T.reshape(h, hd, d)),),
            lambda k: np.ascontiguousarray(k.reshape(d, d).T),
            maskable=True,
        )
        add(f"{theirs}.attn.proj.bias", f"{ours}/attn/out/bias", (d,))
        for fc, shape in (("fc1", (m, d)), ("fc2", (d, m))):
            kernel = f"{ours}/mlp/{fc}/kernel"
            add(f"{theirs}.mlp.{fc}.weight", kernel, shape, _transposed, _transpose, True)
            add(f"{theirs}.mlp.{fc}.bias", f"{ours}/mlp/{fc}/bias", shape[:1])
    add("norm.weight", "encoder_norm/scale", (d,))
    add("norm.bias", "encoder_norm/bias", (d,))
    add("head.weight", "head/kernel", (num_classes, d), _transposed, _transpose, maskable=True)
    add("head.bias", "head/bias", (num_classes,))
    return entries


def _entries(config: vit.ViTConfig, num_classes: int, fmt: str) -> list[_Entry]:
    if fmt == "timm":
        return _timm_entries(config, num_classes)
    return _jax_entries(config, num_classes, fmt)


@functools.lru_cache(maxsize=16)
def _abstract_params(config: vit.ViTConfig, num_classes: int):
    """The model's `nnx.Param` state with `ShapeDtypeStruct` leaves (nothing allocated)."""
    model = nnx.eval_shape(lambda: vit.ViT(config, num_classes, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def _resolve(model: Any) -> tuple[vit.ViTConfig, int | None]:
    """`(config, num_classes or None)` of a ViT, a ViTConfig or a name of `vit.CONFIGS`."""
    if isinstance(model, vit.ViT):
        return model.config, model.num_classes
    if isinstance(model, vit.ViTConfig):
        return model, None
    if isinstance(model, str):
        return vit.get_config(model), None
    raise TypeError(
        f"`model` must be a ViT, a ViTConfig or one of {vit.names()}, got {type(model).__name__}"
    )


# ---------------------------------------------------------------------------------------------
# Import


def detect_layout(state_dict: Mapping[str, Any]) -> str | None:
    """The layout of a ViT checkpoint's keys: one of `LAYOUTS`, or None if it is none of them."""
    keys = set(state_dict)
    if "patch_embed.proj.weight" in keys or any(k.startswith("blocks.") for k in keys):
        return "timm"
    if any("MultiHeadDotProductAttention_1/" in k or "posembed_input/" in k for k in keys):
        return "vit_jax"
    if any("MultiHeadDotProductAttention_0/" in k for k in keys) or "pos_embedding" in keys:
        return "big_vision"
    return None


def _strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops a prefix every key has: `module.` (PyTorch DataParallel) or `params/` (JAX)."""
    for prefix in ("module.", "params/"):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _num_classes_of(state: Mapping[str, np.ndarray], fmt: str) -> int | None:
    head = state.get("head.weight" if fmt == "timm" else "head/kernel")
    if head is None or np.ndim(head) != 2:
        return None
    return int(head.shape[0] if fmt == "timm" else head.shape[1])


def to_nnx(
    state_dict: Mapping[str, Any],
    model: Any,
    num_classes: int | None = None,
    *,
    layout: str | None = None,
) -> tuple[PyTree, PyTree | None, PyTree | None]:
    """Converts a ViT checkpoint to the `nnx.Param` state of a `vit.ViT`.

    Args:
      state_dict: `{key: array or tensor}` in one of the `LAYOUTS` (a `module.` or `params/`
        prefix on every key is dropped).
      model: the architecture: a `vit.ViT` (or its abstract form from `nnx.eval_shape`), a
        `vit.ViTConfig`, or a name of `vit.CONFIGS`. The GELU form and LayerNorm epsilon are the
        config's; so is the number of heads for a timm checkpoint.
      num_classes: the number of logits; by default the model's (a `ViT`), else the checkpoint's.
      layout: one of `LAYOUTS`; by default detected from the keys (`detect_layout`).

    Returns:
      `(params, scores, masks)`. `params` is an `nnx.State` of `nnx.Param` with the structure of
      `nnx.split(model, nnx.Param)[1]` (float32 jax arrays), ready for `nnx.update(model, params)`
      or `nnx.merge(graphdef, params)`. `scores` and `masks` are None when the checkpoint holds
      none (a timm checkpoint written by `export_timm` may); otherwise states of that structure
      with `None` except at the kernels that carry `<module>.mask` (float32) / `.b_mask` (bool)
      entries: the structure of `jj.layer_budgets(params, ..., dense=vit.DENSE)` when the
      exported masks came from such a budget. The weights are returned as stored (an exported
      jackpot stores `W * M`).

    Raises:
      CheckpointMismatchError: missing keys, unexpected keys or wrong shapes, all listed, with
        the dimensions in which the checkpoint's architecture differs from the model's.
      ValueError: an unknown layout, a `num_classes` other than the model's, or a `b_mask` that
        is not 0/1.
    """
    config, model_classes = _resolve(model)
    state = {k: _as_numpy(v) for k, v in state_dict.items()}
    state = _strip_prefix(state)
    detected = detect_layout(state)
    if layout is None:
        layout = detected or "timm"
    elif layout not in LAYOUTS:
        raise ValueError(f"unknown ViT checkpoint layout {layout!r}; allowed: {LAYOUTS}")
    if num_classes is None:
        num_classes = model_classes or _num_classes_of(state, layout) or 1
    elif model_classes is not None and num_classes != model_classes:
        raise ValueError(
            f"num_classes={num_classes} contradicts the model's num_classes={model_classes}"
        )
    entries = _entries(config, num_classes, layout)
    _check(state, entries, config, num_classes, layout, detected)

    values: dict[str, np.ndarray] = {}
    scores: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    for e in entries:
        for path, array in zip(e.paths, e.to_ours(state[e.key]), strict=True):
            values[path] = array
        base = e.key.removesuffix(".weight")
        if e.maskable and f"{base}.b_mask" in state:
            raw = state[f"{base}.b_mask"]
            if not np.isin(raw, (0, 1)).all():
                raise FileContentError(
                    f"{base}.b_mask must hold only 0 and 1 (a binary mask): a mask says which "
                    "weights are kept (1) and which are pruned (0)"
                )
            for path, array in zip(e.paths, e.to_ours(raw), strict=True):
                masks[path] = array.astype(bool)
        if e.maskable and f"{base}.mask" in state:
            for path, array in zip(e.paths, e.to_ours(state[f"{base}.mask"]), strict=True):
                scores[path] = array

    abstract = _abstract_params(config, num_classes)
    fill = lambda found: jax.tree_util.tree_map_with_path(
        lambda p, _: _to_jax(found.get(path_str(p))), abstract
    )
    params = fill(values)
    return params, fill(scores) if scores else None, fill(masks) if masks else None


def import_checkpoint(
    path: str | os.PathLike,
    model: Any,
    num_classes: int | None = None,
    *,
    layout: str | None = None,
    allow_pickle: bool = False,
) -> tuple[PyTree, PyTree | None, PyTree | None]:
    """Reads a ViT checkpoint file and converts it: `to_nnx(load_state_dict(path), ...)`.

    Args:
      path: `.npz` (the JAX codes), `.safetensors` (timm, the Hugging Face hub), or a PyTorch file
        (`.pth`, `.bin`, ...; needs PyTorch).
      model, num_classes, layout: see `to_nnx`.
      allow_pickle: see `jackpots_jax.io.formats.load_state_dict`.

    Returns:
      `(params, scores, masks)` as from `to_nnx`.
    """
    state = load_state_dict(path, allow_pickle=allow_pickle)
    return to_nnx(state, model, num_classes, layout=layout)


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16
        value = value.detach().cpu().float() if value.is_floating_point() else value.detach()
        return value.numpy()
    array = np.asarray(value)
    if array.dtype.kind == "f" or str(array.dtype) == "bfloat16":
        array = array.astype(np.float32, copy=False)
    return array


def _to_jax(x: np.ndarray | None) -> jax.Array | None:
    if x is None:
        return None
    return jnp.asarray(x, jnp.bool_ if x.dtype == bool else jnp.float32)


def _check(
    state: Mapping[str, np.ndarray],
    entries: list[_Entry],
    config: vit.ViTConfig,
    num_classes: int,
    fmt: str,
    detected: str | None,
) -> None:
    """Raises CheckpointMismatchError unless `state` has exactly the entries' keys and shapes."""
    required = {e.key: e.shapes for e in entries}
    optional = {}
    if fmt == "timm":
        for e in entries:
            if e.maskable:
                base = e.key.removesuffix(".weight")
                optional[f"{base}.b_mask"] = optional[f"{base}.mask"] = e.shapes
    missing = [k for k in required if k not in state]
    unexpected = [k for k in state if k not in required and k not in optional]
    mismatched = []
    for key, value in state.items():
        shapes = required.get(key, optional.get(key))
        if shapes is not None and tuple(value.shape) not in shapes:
            mismatched.append((key, tuple(value.shape), shapes[0]))
    if not (missing or unexpected or mismatched):
        return
    subject = f"{fmt} checkpoint does not match the ViT (num_classes={num_classes}, {config})"
    raise CheckpointMismatchError(
        subject,
        missing=missing,
        unexpected=unexpected,
        mismatched=mismatched,
        hint=_hint(state, config, num_classes, fmt, detected),
    )


def _hint(state, config: vit.ViTConfig, num_classes: int, fmt: str, detected) -> str | None:
    if detected is None:
        convs = sorted(k for k, v in state.items() if np.ndim(v) == 4)
        if convs:
            return (
                f"the keys match no ViT layout ({', '.join(LAYOUTS)}); with {len(convs)} 4-D conv "
                f"weights (e.g. {convs[0]!r}) it looks like a CNN checkpoint"
            )
        return f"the keys match no ViT layout ({', '.join(LAYOUTS)})"
    if detected != fmt:
        return f"the keys look like the {detected!r} layout, not {fmt!r}: pass layout={detected!r}"
    found = _architecture(state, fmt)
    want = dataclasses.asdict(config) | {"num_classes": num_classes}
    diffs = [f"{k} {found[k]} vs {want[k]}" for k in found if found[k] != want[k]]
    notes = []
    if diffs:
        notes.append("the checkpoint differs from the model in " + ", ".join(diffs))
    if any(k.startswith("pre_logits") for k in state):
        notes.append(
            "`pre_logits` is a representation layer (ImageNet-21k checkpoints with a "
            "representation_size), which this ViT does not have"
        )
    if any(k.startswith("fc_norm.") for k in state):
        notes.append(
            "`fc_norm` normalises after pooling (timm's global_pool='avg'); this ViT normalises "
            "before (`norm`): timm models with fc_norm=False match pool='gap'"
        )
    if any(k.startswith("MAPHead") for k in state):
        notes.append("`MAPHead_0` is attention pooling (pool_type='map'), not supported")
    return "; ".join(notes) or None


def _architecture(state: Mapping[str, np.ndarray], fmt: str) -> dict[str, Any]:
    """The ViT dimensions a checkpoint's shapes show (only those it shows)."""
    found: dict[str, Any] = {}
    shape = lambda key: tuple(state[key].shape) if key in state else None
    if fmt == "timm":
        embed = shape("patch_embed.proj.weight")
        if embed and len(embed) == 4:
            found |= {"width": embed[0], "channels": embed[1], "patch_size": embed[2]}
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
        fc1 = shape("blocks.0.mlp.fc1.weight")
        head = shape("head.weight")
        cls, pos = "cls_token" in state, shape("pos_embed")
        classes = head[0] if head and len(head) == 2 else None
    else:
        embed = shape("embedding/kernel")
        if embed and len(embed) == 4:
            found |= {"width": embed[3], "channels": embed[2], "patch_size": embed[0]}
        pattern = r"Transformer/encoderblock_(\d+)/"
        blocks = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
        ln1, attn, ln2, mlp = _BLOCK_NAMES[fmt]
        query = shape(f"Transformer/encoderblock_0/{attn}/query/kernel")
        if query and len(query) == 3:
            found["num_heads"] = query[1]
        fc1 = shape(f"Transformer/encoderblock_0/{mlp}/Dense_0/kernel")
        fc1 = fc1[::-1] if fc1 else None
        head = shape("head/kernel")
        cls, pos = "cls" in state, shape(_POS_KEY[fmt])
        classes = head[1] if head and len(head) == 2 else None
    if blocks:
        found["depth"] = max(blocks) + 1
    if fc1 and len(fc1) == 2:
        found["mlp_dim"] = fc1[0]
    found["pool"] = "cls" if cls else "gap"
    if pos and len(pos) == 3 and "patch_size" in found:
        # A square token count has no class-token row (N + 1 is never square for N >= 1).
        patches = pos[1] if _is_square(pos[1]) else pos[1] - 1
        if _is_square(patches):
            found["image_size"] = int(round(patches**0.5)) * found["patch_size"]
    if classes is not None:
        found["num_classes"] = classes
    return found


def _is_square(n: int) -> bool:
    return int(round(n**0.5)) ** 2 == n


# ---------------------------------------------------------------------------------------------
# Export


def to_timm(
    params: PyTree,
    model: Any,
    masks: PyTree | None = None,
    *,
    scores: PyTree | None = None,
) -> StateDict:
    """Converts a ViT's params (and a jackpot's masks) to a timm state dict.

    Args:
      params: the `nnx.Param` state of the ViT (`nnx.split(model, nnx.Param)[1]`), or a nested
        dict of the same paths (`state.to_pure_dict()`).
      model: a `vit.ViT`, a `vit.ViTConfig` or a name of `vit.CONFIGS` (the number of classes is
        read from `head/kernel`).
      masks: None (the weights as they are) or bool / 0-1 masks with the structure of `params` (or
        of a budget of it), `None` at unmasked leaves. Only kernels may be masked, and the q, k, v
        kernels of a block all or none (timm fuses them).
      scores: optional scores like `masks`, written as `<module>.mask`.

    Returns:
      `{key: float32 numpy array}`: the weights (masked ones as `W * M`), `<module>.b_mask` per
      masked kernel, `<module>.mask` per scored kernel.

    Raises:
      CheckpointMismatchError: params, masks or scores that do not fit the model (paths listed).
      ValueError: a mask that is not 0/1, or q/k/v masked only in part.
    """
    config, _ = _resolve(model)
    flat = {name: np.asarray(leaf, np.float32) for name, leaf in named_leaves(params)}
    head = flat.get("head/kernel")
    num_classes = int(head.shape[1]) if head is not None and head.ndim == 2 else 1
    abstract = {n: tuple(x.shape) for n, x in named_leaves(_abstract_params(config, num_classes))}
    flat_masks = _present(masks)
    flat_scores = _present(scores)
    _check_params(flat, flat_masks, flat_scores, abstract, config, num_classes)

    state: StateDict = {}
    for e in _entries(config, num_classes, "timm"):
        arrays = [flat[p] for p in e.paths]
        kernel_masks = [flat_masks.get(p) for p in e.paths]
        if any(m is not None for m in kernel_masks):
            if any(m is None for m in kernel_masks):
                raise ValueError(
                    f"{e.key} fuses {', '.join(e.paths)}: mask all of them or none (masked: "
                    f"{[p for p, m in zip(e.paths, kernel_masks, strict=True) if m is not None]})"
                )
            for p, m in zip(e.paths, kernel_masks, strict=True):
                if not np.isin(m, (0, 1)).all():
                    raise ValueError(f"the mask of params/{p} is not 0/1")
            bits = [np.asarray(m, np.float32) for m in kernel_masks]
            arrays = [w * b for w, b in zip(arrays, bits, strict=True)]
            state[f"{e.key.removesuffix('.weight')}.b_mask"] = _f32(e.to_theirs(*bits))
        state[e.key] = _f32(e.to_theirs(*arrays))
        kernel_scores = [flat_scores.get(p) for p in e.paths]
        if all(s is not None for s in kernel_scores):
            scored = [np.asarray(s, np.float32) for s in kernel_scores]
            state[f"{e.key.removesuffix('.weight')}.mask"] = _f32(e.to_theirs(*scored))
        elif any(s is not None for s in kernel_scores):
            raise ValueError(f"{e.key} fuses {', '.join(e.paths)}: score all of them or none")
    return state


def export_timm(
    params: PyTree,
    model: Any,
    path: str | os.PathLike,
    masks: PyTree | None = None,
    *,
    scores: PyTree | None = None,
) -> StateDict:
    """Writes a ViT jackpot (`W * M` plus the masks) as a timm state dict file.

    Args:
      params, model, masks, scores: see `to_timm`.
      path: `.safetensors` (recommended; no PyTorch needed), `.npz`, or `.pth` / `.pt`.

    Returns:
      The state dict written. `import_checkpoint(path, model)` reads it back, masks included; a
      timm `VisionTransformer` of the same architecture loads it once the `.b_mask` / `.mask`
      entries are popped.
    """
    state = to_timm(params, model, masks, scores=scores)
    save_state_dict(state, path)
    return state


def _present(tree: PyTree | None) -> dict[str, np.ndarray]:
    if tree is None:
        return {}
    return {name: np.asarray(leaf) for name, leaf in named_leaves(tree) if leaf is not None}


def _f32(x: np.ndarray) -> np.ndarray:
    # A fresh, writable array: `torch.from_numpy` of the result must not alias a jax buffer.
    return np.array(x, np.float32, order="C")


def _check_params(flat, flat_masks, flat_scores, abstract, config, num_classes) -> None:
    missing = [k for k in abstract if k not in flat]
    unexpected = [k for k in flat if k not in abstract]
    mismatched = [(k, flat[k].shape, abstract[k]) for k in abstract if k in flat]
    mismatched = [m for m in mismatched if tuple(m[1]) != m[2]]
    for name, tree in (("masks", flat_masks), ("scores", flat_scores)):
        for key, value in tree.items():
            if key not in abstract or not key.endswith("/kernel"):
                unexpected.append(f"{name}: {key} (only kernels can be masked)")
            elif tuple(value.shape) != abstract[key]:
                mismatched.append((f"{name}: {key}", tuple(value.shape), abstract[key]))
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"params do not match the ViT (num_classes={num_classes}, {config})",
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )


def import_for_model(
    path: str | os.PathLike,
    model_name: str,
    num_classes: int | None = None,
    *,
    allow_pickle: bool = False,
    **options,
) -> tuple[dict, PyTree | None, PyTree | None]:
    """A ViT checkpoint (timm safetensors, vision_transformer / big_vision `.npz`, or an export
    of this package) as the plain-dict variables of the registry's ViT `model_name`
    (`io.weights.import_checkpoint`'s ViT case): `(variables, scores, masks)`, the scores and
    masks `None` where absent, in the structure of `variables['params']`."""
    config = vit.get_config(model_name, **options)
    state, scores, masks = import_checkpoint(path, config, num_classes, allow_pickle=allow_pickle)
    params = jax.tree.map(
        np.asarray, nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
    )

    def like_params(tree):
        if tree is None:
            return None
        found = {n: np.asarray(v) for n, v in named_leaves(tree) if v is not None}
        return jax.tree_util.tree_map_with_path(lambda p, _: found.get(path_str(p)), params)

    return {"params": params, "batch_stats": {}}, like_params(scores), like_params(masks)


def export_for_model(
    variables: Mapping,
    masks: PyTree | None,
    model_name: str,
    path: str | os.PathLike,
    *,
    scores: PyTree | None = None,
    classifier: str | None = None,
    **options,
) -> dict[str, np.ndarray]:
    """`export_timm` of the registry's ViT `model_name` (`io.weights.export_state_dict`'s ViT
    case; `classifier` is for the CNNs and ignored: a ViT's head is always a linear layer)."""
    config = vit.get_config(model_name, **options)
    return export_timm(variables["params"], config, path, masks, scores=scores)
