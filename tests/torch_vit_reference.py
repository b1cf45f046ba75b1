"""A PyTorch Vision Transformer with timm's module names and layouts, for the ViT importer tests.

Written for the tests from the published architecture (Dosovitskiy et al. 2021; timm's
`VisionTransformer` key names), independently of `jackpots_jax`: a conv patch embedding
`patch_embed.proj`, `cls_token`, `pos_embed` (with the class token's row), pre-norm blocks
`blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, the final `norm` (before
pooling), and `head`. Attention is computed by hand (no `nn.MultiheadAttention`, no fused SDPA),
so that the reference does not share a kernel with anything it checks. Also here: a converter from
the JAX codes' `.npz` keys to this module's state dict, written from their published layout.
Importing this module needs PyTorch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        hd = d // self.heads
        # Output channels of qkv: (which of q/k/v, head, channel within the head).
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [b, heads, n, hd]
        attn = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(hd), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, gelu: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gelu = gelu

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_dim, gelu, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, gelu)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm-layout ViT. `pool`: "cls" (class token) or "gap" (mean of tokens after `norm`)."""

    def __init__(
        self,
        image=16,
        patch=4,
        channels=3,
        dim=32,
        depth=2,
        heads=2,
        mlp_dim=64,
        classes=10,
        pool="cls",
        gelu="none",
        eps=1e-6,
    ):
        super().__init__()
        self.pool = pool
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(channels, dim, patch, stride=patch)
        tokens = (image // patch) ** 2
        if pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            tokens += 1
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim, gelu, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):  # NCHW
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [b, patches, dim], row-major
        if self.pool == "cls":
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        return self.head(x)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights of sensible scale everywhere (no zeros, norms not at their identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and name not in ("cls_token", "pos_embed"):
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif (
                name.endswith("norm1.weight")
                or name.endswith("norm2.weight")
                or name == ("norm.weight")
            ):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def state_dict(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def logits(model: nn.Module, images_nhwc: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return model(x).numpy()


# The module names inside a JAX encoder block: (first norm, attention, second norm, MLP).
JAX_BLOCK = {
    "vit_jax": ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
    "big_vision": ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"),
}


def torch_state_from_jax(npz: dict[str, np.ndarray], layout: str) -> dict[str, torch.Tensor]:
    """A state dict for `VisionTransformer` from a JAX ViT checkpoint's flat '/'-keyed arrays.

    Flax kernels are `[in, ..., out]`; DenseGeneral q/k/v kernels `[dim, heads, head_dim]`, the
    output kernel `[heads, head_dim, dim]`. big_vision adds its `pos_embedding` (no class-token
    row) to the patches before the class token is prepended: timm's layout with a zero row for
    the class token, the token itself unchanged.
    """
    ln1, attn, ln2, mlp = JAX_BLOCK[layout]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    out = {
        "patch_embed.proj.weight": t(npz["embedding/kernel"].transpose(3, 2, 0, 1)),
        "patch_embed.proj.bias": t(npz["embedding/bias"]),
        "norm.weight": t(npz["Transformer/encoder_norm/scale"]),
        "norm.bias": t(npz["Transformer/encoder_norm/bias"]),
        "head.weight": t(npz["head/kernel"].T),
        "head.bias": t(npz["head/bias"]),
    }
    if layout == "vit_jax":
        pos = npz["Transformer/posembed_input/pos_embedding"]
    else:
        pos = npz["pos_embedding"]
        if "cls" in npz:
            pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    out["pos_embed"] = t(pos)
    if "cls" in npz:
        out["cls_token"] = t(npz["cls"])
    depth = len({k.split("/")[1] for k in npz if k.startswith("Transformer/encoderblock_")})
    for i in range(depth):
        block = f"Transformer/encoderblock_{i}"
        j = lambda name, block=block: npz[f"{block}/{name}"]
        b = f"blocks.{i}"
        out[f"{b}.norm1.weight"], out[f"{b}.norm1.bias"] = t(j(f"{ln1}/scale")), t(j(f"{ln1}/bias"))
        out[f"{b}.norm2.weight"], out[f"{b}.norm2.bias"] = t(j(f"{ln2}/scale")), t(j(f"{ln2}/bias"))
        dim = j(f"{attn}/query/kernel").shape[0]
        qkv_w = [j(f"{attn}/{n}/kernel").reshape(dim, dim).T for n in ("query", "key", "value")]
        qkv_b = [j(f"{attn}/{n}/bias").reshape(dim) for n in ("query", "key", "value")]
        out[f"{b}.attn.qkv.weight"] = t(np.concatenate(qkv_w, axis=0))
        out[f"{b}.attn.qkv.bias"] = t(np.concatenate(qkv_b))
        out[f"{b}.attn.proj.weight"] = t(j(f"{attn}/out/kernel").reshape(dim, dim).T)
        out[f"{b}.attn.proj.bias"] = t(j(f"{attn}/out/bias"))
        for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            out[f"{b}.mlp.{fc}.weight"] = t(j(f"{mlp}/{dense}/kernel").T)
            out[f"{b}.mlp.{fc}.bias"] = t(j(f"{mlp}/{dense}/bias"))
    return out
