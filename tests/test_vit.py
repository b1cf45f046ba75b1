"""The NNX ViT: its importers and exporter against an independent PyTorch ViT, strictness, and the
core search functions (budgets, top-k, restriction, straight-through gradient) on its NNX state."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jackpots_jax as jj
from jackpots_jax import models
from jackpots_jax._tree import named_leaves, path_str
from jackpots_jax.io import torch_weights
from jackpots_jax.io import vit_weights as vit_convert
from jackpots_jax.io.errors import CheckpointMismatchError
from jackpots_jax.models import vit
from jackpots_jax.models.spec import layer_groups

TORCH_REASON = "PyTorch is needed to check the ViT importers against PyTorch (pip install torch)"

# Small enough for a test, large enough to have several heads, blocks and a non-trivial grid.
SMALL = vit.ViTConfig(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, image_size=16)
CLASSES = 10


@pytest.fixture(scope="module")
def ref():
    pytest.importorskip("torch", reason=TORCH_REASON)
    import torch_vit_reference

    return torch_vit_reference


def torch_model(ref, config: vit.ViTConfig, seed=0):
    gelu = "tanh" if config.gelu_approximate else "none"
    model = ref.VisionTransformer(
        image=config.image_size,
        patch=config.patch_size,
        channels=config.channels,
        dim=config.width,
        depth=config.depth,
        heads=config.num_heads,
        mlp_dim=config.mlp_dim,
        classes=CLASSES,
        pool=config.pool,
        gelu=gelu,
        eps=config.norm_epsilon,
    )
    return ref.randomize(model, seed).eval()


def images(config: vit.ViTConfig, batch=3, seed=0):
    shape = (batch, config.image_size, config.image_size, config.channels)
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def abstract_model(config, num_classes=CLASSES, dtype=jnp.float32):
    return nnx.eval_shape(lambda: vit.ViT(config, num_classes, dtype=dtype, rngs=nnx.Rngs(0)))


@functools.cache
def forward(config, num_classes=CLASSES, dtype=jnp.float32):
    """The jitted `params, images -> logits` of a ViT (eager NNX calls compile op by op)."""
    graphdef = nnx.graphdef(abstract_model(config, num_classes, dtype))
    return jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))


def nnx_logits(params, config, x, dtype=jnp.float32, num_classes=CLASSES):
    return np.asarray(forward(config, num_classes, dtype)(params, jnp.asarray(x)))


def assert_logits_close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def flat(tree):
    return {name: np.asarray(leaf) for name, leaf in named_leaves(tree) if leaf is not None}


def random_params(config=SMALL, seed=0):
    """The model's `nnx.Param` state with random values of a trained network's scale."""
    rng = np.random.default_rng(seed)
    scale = lambda x: 1 / np.sqrt(x.shape[0]) if len(x.shape) >= 2 else 0.2
    return jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape) * scale(x), jnp.float32),
        nnx.state(abstract_model(config), nnx.Param),
    )


# The JAX codes' keys, written out here from their published layout (not from the library).
def jax_checkpoint(layout: str, config: vit.ViTConfig, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = config
    d, h, m, p = c.width, c.num_heads, c.mlp_dim, c.patch_size
    hd = d // h
    ln1, attn, ln2, mlp = {
        "vit_jax": ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
        "big_vision": (
            "LayerNorm_0",
            "MultiHeadDotProductAttention_0",
            "LayerNorm_1",
            "MlpBlock_0",
        ),
    }[layout]
    shapes = {"embedding/kernel": (p, p, c.channels, d), "embedding/bias": (d,)}
    patches = (c.image_size // p) ** 2
    if c.pool == "cls":
        shapes["cls"] = (1, 1, d)
    if layout == "vit_jax":
        shapes["Transformer/posembed_input/pos_embedding"] = (1, patches + (c.pool == "cls"), d)
    else:
        shapes["pos_embedding"] = (1, patches, d)
    for i in range(c.depth):
        b = f"Transformer/encoderblock_{i}"
        for norm in (ln1, ln2):
            shapes[f"{b}/{norm}/scale"] = shapes[f"{b}/{norm}/bias"] = (d,)
        for proj in ("query", "key", "value"):
            shapes[f"{b}/{attn}/{proj}/kernel"] = (d, h, hd)
            shapes[f"{b}/{attn}/{proj}/bias"] = (h, hd)
        shapes[f"{b}/{attn}/out/kernel"], shapes[f"{b}/{attn}/out/bias"] = (h, hd, d), (d,)
        shapes[f"{b}/{mlp}/Dense_0/kernel"], shapes[f"{b}/{mlp}/Dense_0/bias"] = (d, m), (m,)
        shapes[f"{b}/{mlp}/Dense_1/kernel"], shapes[f"{b}/{mlp}/Dense_1/bias"] = (m, d), (d,)
    shapes["Transformer/encoder_norm/scale"] = shapes["Transformer/encoder_norm/bias"] = (d,)
    shapes["head/kernel"], shapes["head/bias"] = (d, CLASSES), (CLASSES,)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("/scale"):
            out[key] = 1 + 0.2 * rng.normal(size=shape)
        elif key.endswith("kernel"):
            # Fan-in: every axis but the output ones ([d, h, hd] q/k/v kernels have one input axis).
            inputs = shape[:1] if len(shape) == 3 and "/out/" not in key else shape[:-1]
            out[key] = rng.normal(size=shape) / np.sqrt(np.prod(inputs))
        else:
            out[key] = 0.2 * rng.normal(size=shape)
    return {k: v.astype(np.float32) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# The model


def hand_count(c: vit.ViTConfig, classes: int) -> int:
    d, m = c.width, c.mlp_dim
    tokens = (c.image_size // c.patch_size) ** 2 + 1
    embed = c.patch_size**2 * c.channels * d + d + d + tokens * d  # conv, bias, cls, posemb
    block = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)
    return embed + c.depth * block + 2 * d + d * classes + classes


@pytest.mark.parametrize(
    "name, dims, published",
    [
        ("vit_ti16", (192, 12, 3, 768, 16), 5_717_416),
        ("vit_s16", (384, 12, 6, 1536, 16), 22_050_664),
        ("vit_b16", (768, 12, 12, 3072, 16), 86_567_656),
        ("vit_b32", (768, 12, 12, 3072, 32), 88_224_232),
    ],
)
def test_standard_sizes(name, dims, published):
    c = vit.get_config(name)
    assert (c.width, c.depth, c.num_heads, c.mlp_dim, c.patch_size, c.image_size) == (*dims, 224)
    abstract = nnx.eval_shape(lambda: vit.create_vit(name, 1000, rngs=nnx.Rngs(0)))
    count = sum(x.size for _, x in named_leaves(nnx.state(abstract, nnx.Param)))
    assert count == hand_count(c, 1000) == published  # timm's published parameter counts


def test_create_vit_fmnist_gives_float32_logits_of_28x28x1_images():
    model = nnx.eval_shape(lambda: vit.create_vit("vit_fmnist", 10, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    x = jax.ShapeDtypeStruct((5, 28, 28, 1), jnp.float32)
    out = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
    assert (out.shape, out.dtype) == ((5, 10), jnp.float32)
    assert vit.get_config("vit_fmnist", pool="gap").pool == "gap"


def test_leaf_paths_and_shapes_of_a_block():
    c = dataclasses.replace(SMALL, depth=1)
    params = nnx.state(abstract_model(c), nnx.Param)
    d, h, hd, m = 32, 2, 16, 64
    want = {
        "embedding/kernel": (4, 4, 3, d),
        "embedding/bias": (d,),
        "cls": (1, 1, d),
        "pos_embedding": (1, 17, d),
        "encoder_norm/scale": (d,),
        "encoder_norm/bias": (d,),
        "head/kernel": (d, CLASSES),
        "head/bias": (CLASSES,),
    }
    b = "blocks/0"
    for norm in ("norm1", "norm2"):
        want[f"{b}/{norm}/scale"] = want[f"{b}/{norm}/bias"] = (d,)
    for proj in ("query", "key", "value"):
        want[f"{b}/attn/{proj}/kernel"], want[f"{b}/attn/{proj}/bias"] = (d, h, hd), (h, hd)
    want[f"{b}/attn/out/kernel"], want[f"{b}/attn/out/bias"] = (h, hd, d), (d,)
    want[f"{b}/mlp/fc1/kernel"], want[f"{b}/mlp/fc1/bias"] = (d, m), (m,)
    want[f"{b}/mlp/fc2/kernel"], want[f"{b}/mlp/fc2/bias"] = (m, d), (d,)
    got = {name: tuple(x.shape) for name, x in named_leaves(params)}
    assert got == want
    assert all(x.dtype == jnp.float32 for _, x in named_leaves(params))


def test_layer_groups_of_every_masked_kernel_by_block_and_kind():
    """The ViT's `layer_groups`, read by the report and the studies, on the 2-block model's masked
    kernels: written out by hand from the leaf names above."""
    c = dataclasses.replace(SMALL, depth=2)
    shapes = dict(named_leaves(nnx.state(abstract_model(c), nnx.Param)))
    want_block, want_kind = {"embedding/kernel": "embedding"}, {"embedding/kernel": "embedding"}
    for i in range(2):
        for leaf in ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2"):
            name = f"blocks/{i}/{leaf}/kernel"
            want_block[name] = f"block {i}"
            want_kind[name] = "attention" if leaf.startswith("attn") else "MLP"
    masked = {n: tuple(shapes[n].shape) for n in want_block}
    want = {"block": want_block, "kind": want_kind}
    assert layer_groups(models.spec("vit_fmnist"), masked) == want


def test_gap_pool_has_no_class_token():
    params = nnx.state(abstract_model(dataclasses.replace(SMALL, pool="gap"), 3))
    names = {name: x.shape for name, x in named_leaves(params)}
    assert "cls" not in names and names["pos_embedding"] == (1, 16, 32)


def test_bad_configs_and_inputs_are_named():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        dataclasses.replace(SMALL, num_heads=3)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        dataclasses.replace(SMALL, patch_size=5)
    with pytest.raises(ValueError, match="pool"):
        dataclasses.replace(SMALL, pool="map")
    with pytest.raises(ValueError, match="vit_b16"):
        vit.get_config("vit_h14")
    with pytest.raises(ValueError, match="patches"):
        vit.get_config("vit_b16", patches=8)
    with pytest.raises(ValueError, match="num_classes"):
        vit.ViT(SMALL, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dtype"):
        vit.ViT(SMALL, 2, dtype=jnp.float16, rngs=nnx.Rngs(0))
    model = abstract_model(SMALL)  # the check comes before any parameter is touched
    with pytest.raises(ValueError, match=r"\(16, 16, 3\)"):
        model(jnp.zeros((1, 28, 28, 1)))


def test_bfloat16_logits_are_float32_and_close_to_float32():
    params = random_params()
    x = images(SMALL)
    f32 = nnx_logits(params, SMALL, x)
    bf16 = nnx_logits(params, SMALL, x, dtype=jnp.bfloat16)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, f32, atol=0.05 * np.abs(f32).max())
    assert not np.array_equal(bf16, f32)  # the matmuls did run in bfloat16


# ---------------------------------------------------------------------------------------------
# Import against PyTorch


@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        dataclasses.replace(SMALL, pool="gap"),
        dataclasses.replace(SMALL, gelu_approximate=True),
        vit.ViTConfig(24, 1, 3, 48, 7, 28, channels=1),
    ],
    ids=["cls", "gap", "gelu_tanh", "fmnist_like"],
)
def test_timm_safetensors_import_matches_pytorch(ref, tmp_path, config):
    from safetensors.torch import save_file

    model = torch_model(ref, config)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    params, scores, masks = vit_convert.import_checkpoint(path, config)
    assert scores is None and masks is None
    x = images(config)
    assert_logits_close(nnx_logits(params, config, x), ref.logits(model, x))


@pytest.mark.parametrize("layout", ["vit_jax", "big_vision"])
@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_jax_npz_import_matches_pytorch(ref, tmp_path, layout, pool):
    import torch

    config = dataclasses.replace(SMALL, pool=pool)
    checkpoint = jax_checkpoint(layout, config)
    path = tmp_path / "vit.npz"
    np.savez(path, **checkpoint)
    params, _, _ = vit_convert.import_checkpoint(path, config)
    assert vit_convert.detect_layout(checkpoint) == layout

    model = torch_model(ref, config)
    model.load_state_dict(ref.torch_state_from_jax(checkpoint, layout), strict=True)
    with torch.no_grad():  # the class token must matter, or the test would not see it
        assert pool == "gap" or float(model.cls_token.abs().sum()) > 0
    x = images(config)
    assert_logits_close(nnx_logits(params, config, x), ref.logits(model, x))


def test_big_vision_old_posemb_with_class_token_row():
    config = SMALL
    checkpoint = jax_checkpoint("big_vision", config)
    pos = checkpoint["pos_embedding"]
    combined = np.concatenate([np.full_like(pos[:, :1], 0.5), pos], axis=1)
    params, _, _ = vit_convert.to_nnx({**checkpoint, "pos_embedding": combined}, config)
    np.testing.assert_array_equal(flat(params)["pos_embedding"], combined)
    params, _, _ = vit_convert.to_nnx(checkpoint, config)
    np.testing.assert_array_equal(flat(params)["pos_embedding"][:, 1:], pos)
    assert not flat(params)["pos_embedding"][:, 0].any()


def test_prefixes_are_dropped_and_num_classes_read_from_the_head():
    checkpoint = jax_checkpoint("vit_jax", SMALL)
    wrapped = {f"params/{k}": v for k, v in checkpoint.items()}
    params, _, _ = vit_convert.to_nnx(wrapped, SMALL)
    assert flat(params)["head/kernel"].shape == (32, CLASSES)
    np.testing.assert_array_equal(flat(params)["embedding/kernel"], checkpoint["embedding/kernel"])


# ---------------------------------------------------------------------------------------------
# Export, round trips


@functools.cache
def jackpot():
    """`random_params()` and scores and masks of a 70% budget (computed once: a jit compile)."""
    params = random_params()
    budget = jj.layer_budgets(params, 0.7, dense=vit.DENSE)
    scores, masks = jax.jit(lambda p: jj.init_scores(p, budget, "weight_magnitude"))(params)
    return params, scores, masks


def test_round_trip_import_export_import_is_exact(tmp_path):
    params = random_params()
    path = tmp_path / "dense.safetensors"
    written = vit_convert.export_timm(params, SMALL, path)
    assert not any(k.endswith("mask") for k in written)
    back, scores, masks = vit_convert.import_checkpoint(path, SMALL)
    assert scores is None and masks is None
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for (name, a), (_, b) in zip(named_leaves(back), named_leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)

    params, scores, masks = jackpot()
    path = tmp_path / "jackpot.safetensors"
    written = vit_convert.export_timm(params, SMALL, path, masks, scores=scores)
    back, back_scores, back_masks = vit_convert.import_checkpoint(path, SMALL)
    want = flat(jj.apply_masks(params, masks))
    assert flat(back).keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(flat(back)[name], value, err_msg=name)
    for got, expected in ((back_masks, masks), (back_scores, scores)):
        assert jax.tree.structure(got, is_leaf=lambda x: x is None) == jax.tree.structure(
            expected, is_leaf=lambda x: x is None
        )
        assert flat(got).keys() == flat(expected).keys()
        for name, value in flat(expected).items():
            np.testing.assert_array_equal(flat(got)[name], value, err_msg=name)
    assert flat(back_masks)["blocks/0/attn/key/kernel"].dtype == bool
    again = vit_convert.to_timm(back, SMALL, back_masks, scores=back_scores)
    assert again.keys() == written.keys()
    for key, value in written.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_export_layout_and_fused_masks():
    params, _, masks = jackpot()
    state = vit_convert.to_timm(params, SMALL, masks)
    d = SMALL.width
    mask_keys = sorted(k for k in state if k.endswith(".b_mask"))
    want = ["patch_embed.proj.b_mask"] + [
        f"blocks.{i}.{m}.b_mask"
        for i in range(2)
        for m in ("attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2")
    ]
    assert mask_keys == sorted(want)
    for key in mask_keys:
        weight = state[key.replace(".b_mask", ".weight")]
        assert state[key].shape == weight.shape and state[key].dtype == np.float32
        np.testing.assert_array_equal(weight, weight * state[key])  # W * M is what is stored
    # The fused q/k/v mask holds each projection's mask in its own third.
    qkv = state["blocks.0.attn.qkv.b_mask"]
    for j, proj in enumerate(("query", "key", "value")):
        kept = flat(masks)[f"blocks/0/attn/{proj}/kernel"].sum()
        assert qkv[j * d : (j + 1) * d].sum() == kept


def test_exported_jackpot_runs_in_pytorch(ref, tmp_path):
    import torch

    params, _, masks = jackpot()
    state = vit_convert.to_timm(params, SMALL, masks)
    model = torch_model(ref, SMALL)
    weights = {k: torch.from_numpy(v) for k, v in state.items() if not k.endswith("mask")}
    model.load_state_dict(weights, strict=True)
    x = images(SMALL)
    want = nnx_logits(jj.apply_masks(params, masks), SMALL, x)
    assert_logits_close(want, ref.logits(model, x))


def test_export_rejects_bad_masks_and_params():
    params, _, masks = jackpot()
    partial = jax.tree_util.tree_map_with_path(
        lambda p, m: None if "attn/key" in path_str(p) else m,
        masks,
        is_leaf=lambda x: x is None,
    )
    with pytest.raises(ValueError, match="mask all of them or none"):
        vit_convert.to_timm(params, SMALL, partial)
    twos = jax.tree.map(lambda m: m.astype(jnp.int32) * 2, masks)
    with pytest.raises(ValueError, match="not 0/1"):
        vit_convert.to_timm(params, SMALL, twos)
    bias_masked = jj.prunable_leaves(params, dense=())
    bias_masks = jax.tree.map(
        lambda w, f: jnp.ones(w.shape, bool) if f else None, params, bias_masked
    )
    with pytest.raises(CheckpointMismatchError, match="only kernels can be masked"):
        vit_convert.to_timm(params, SMALL, bias_masks)
    other = random_params(dataclasses.replace(SMALL, mlp_dim=48))
    with pytest.raises(CheckpointMismatchError, match="mlp/fc1/kernel"):
        vit_convert.to_timm(other, SMALL)


# ---------------------------------------------------------------------------------------------
# Strictness and clear errors


def timm_state(config=SMALL):
    return vit_convert.to_timm(random_params(config), config)


def test_missing_unexpected_and_misshapen_keys_are_all_listed():
    state = timm_state()
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.1.ls1.gamma"] = np.ones(32, np.float32)
    state["pos_embed"] = np.zeros((1, 16, 32), np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        vit_convert.to_nnx(state, SMALL)
    e = err.value
    assert e.missing == ["blocks.1.mlp.fc2.bias"]
    assert e.unexpected == ["blocks.1.ls1.gamma"]
    assert e.mismatched == [("pos_embed", (1, 16, 32), (1, 17, 32))]
    for text in ("blocks.1.mlp.fc2.bias", "blocks.1.ls1.gamma", "pos_embed: [1, 16, 32]"):
        assert text in str(e)


def test_non_binary_b_mask_is_an_error():
    state = timm_state()
    state["blocks.0.mlp.fc1.b_mask"] = np.full((64, 32), 0.5, np.float32)
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1.b_mask must hold only 0 and 1"):
        vit_convert.to_nnx(state, SMALL)


def shapes_of(name, layout, **overrides):
    """A checkpoint of a named size with only its shapes real (no memory behind the arrays)."""
    config = vit.get_config(name, **overrides)
    if layout == "timm":
        abstract = vit_convert._timm_entries(config, 1000)
        return {e.key: np.broadcast_to(np.float32(0), e.shapes[0]) for e in abstract}
    abstract = vit_convert._jax_entries(config, 1000, layout)
    return {e.key: np.broadcast_to(np.float32(0), e.shapes[0]) for e in abstract}


@pytest.mark.parametrize(
    "source, layout, target, named",
    [
        (
            "vit_s16",
            "vit_jax",
            "vit_ti16",
            ["width 384 vs 192", "num_heads 6 vs 3", "mlp_dim 1536 vs 768"],
        ),
        ("vit_b32", "timm", "vit_b16", ["patch_size 32 vs 16"]),
        ("vit_b16", "big_vision", "vit_b16:384", ["image_size 224 vs 384"]),
        ("vit_ti16", "timm", "vit_ti16:gap", ["pool cls vs gap"]),
    ],
)
def test_checkpoint_of_another_size_names_the_dimensions(source, layout, target, named):
    name, _, variant = target.partition(":")
    overrides = {"image_size": 384} if variant == "384" else {"pool": "gap"} if variant else {}
    with pytest.raises(CheckpointMismatchError) as err:
        vit_convert.to_nnx(shapes_of(source, layout), vit.get_config(name, **overrides))
    for text in named:
        assert text in str(err.value)
    assert "depth" not in str(err.value).split("hint:")[1]  # only the dimensions that differ


def test_num_classes_of_a_model_is_checked():
    model = nnx.eval_shape(lambda: vit.ViT(SMALL, 5, rngs=nnx.Rngs(0)))
    with pytest.raises(CheckpointMismatchError, match="num_classes 10 vs 5"):
        vit_convert.to_nnx(timm_state(), model)
    params, _, _ = vit_convert.to_nnx(timm_state(), SMALL)  # a config: the checkpoint's classes
    assert flat(params)["head/bias"].shape == (CLASSES,)


def test_cnn_checkpoint_given_to_a_vit():
    cnn = models.create("fmnist_cnn", 10)
    variables = jax.eval_shape(lambda: cnn.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    variables = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), variables)
    state = torch_weights.to_torch_state_dict(variables, None, "fmnist_cnn")
    with pytest.raises(CheckpointMismatchError, match="looks like a CNN checkpoint") as err:
        vit_convert.to_nnx(state, "vit_fmnist")
    assert "conv1.weight" in err.value.unexpected
    assert "patch_embed.proj.weight" in err.value.missing


def test_wrong_layout_and_representation_layer_hints():
    checkpoint = jax_checkpoint("vit_jax", SMALL)
    with pytest.raises(CheckpointMismatchError, match="pass layout='vit_jax'"):
        vit_convert.to_nnx(checkpoint, SMALL, layout="big_vision")
    with pytest.raises(ValueError, match="unknown ViT checkpoint layout"):
        vit_convert.to_nnx(checkpoint, SMALL, layout="hf")
    extra = {**checkpoint, "pre_logits/kernel": np.zeros((32, 32), np.float32)}
    with pytest.raises(CheckpointMismatchError, match="representation layer"):
        vit_convert.to_nnx(extra, SMALL)


# ---------------------------------------------------------------------------------------------
# The core functions on the NNX state

# One block: the six kinds of kernels and the patch embedding, at the least compile time.
ONE_BLOCK = dataclasses.replace(SMALL, depth=1)


def test_dense_patterns_mask_the_patch_embedding_and_six_kernels_per_block():
    params = random_params()
    prunable = jj.prunable_leaves(params, dense=vit.DENSE)
    chosen = sorted(name for name, flag in named_leaves(prunable) if flag)
    want = ["embedding/kernel"] + [
        f"blocks/{i}/{kind}/kernel"
        for i in range(SMALL.depth)
        for kind in ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2")
    ]
    assert chosen == sorted(want) == sorted(vit.masked_paths(SMALL))
    budget = jj.layer_budgets(params, 0.9, dense=vit.DENSE)
    assert sorted(n for n, b in named_leaves(budget) if b is not None) == chosen
    # Without the patterns the 2-D q/k/v biases and the 3-D embeddings would be masked too.
    everything = {n for n, f in named_leaves(jj.prunable_leaves(params, dense=())) if f}
    assert {"cls", "pos_embedding", "blocks/0/attn/query/bias", "head/kernel"} <= everything


def brute_force_topk(values: np.ndarray, keep: int) -> np.ndarray:
    order = np.argsort(-values.ravel(), kind="stable")  # ties: the lower index first
    mask = np.zeros(values.size, bool)
    mask[order[:keep]] = True
    return mask.reshape(values.shape)


def pruned_counts(budget):
    return {n: b for n, b in named_leaves(budget) if b is not None}


@pytest.mark.parametrize("rule", ["uniform", "global_magnitude"])
def test_budgets_and_masks_are_exact_on_the_3d_kernels(rule):
    params = random_params(ONE_BLOCK)
    # Ties inside a 3-D kernel: the lower flat index must win.
    q = params["blocks"][0]["attn"]["query"]["kernel"]
    params["blocks"][0]["attn"]["query"]["kernel"] = nnx.Param(q[...].at[:, 0, :].set(0.25))
    budget = jj.layer_budgets(params, 0.8, rule=rule, dense=vit.DENSE)
    weights = flat(params)
    pruned = pruned_counts(budget)
    if rule == "uniform":
        assert pruned == {n: weights[n].size * 8 // 10 for n in pruned}
    else:
        pooled = np.concatenate([np.abs(weights[n]).ravel() for n in pruned])
        threshold = np.sort(pooled)[::-1][pooled.size * 2 // 10 - 1]
        assert pruned == {n: int((np.abs(weights[n]) < threshold).sum()) for n in pruned}

    # A random score tree next to the weights: both selections against the brute force.
    rng = np.random.default_rng(1)
    random_scores = jax.tree.map(
        lambda b, w: None if b is None else jnp.asarray(rng.normal(size=w.shape), jnp.float32),
        budget,
        params,
        is_leaf=lambda x: x is None,
    )

    @jax.jit
    def select(params, random_scores):
        scores, masks = jj.init_scores(params, budget, "magnitude")
        return masks, jj.topk_masks(scores, budget), jj.topk_masks(random_scores, budget)

    masks, again, by_score = map(flat, select(params, random_scores))
    for name, mask in masks.items():
        keep = weights[name].size - pruned[name]
        assert mask.shape == weights[name].shape
        np.testing.assert_array_equal(mask, brute_force_topk(np.abs(weights[name]), keep))
        np.testing.assert_array_equal(again[name], mask, err_msg=name)
        want = brute_force_topk(flat(random_scores)[name], keep)
        np.testing.assert_array_equal(by_score[name], want, err_msg=name)


def test_short_restriction_keeps_exact_counts_and_swaps_a_share():
    params = random_params(ONE_BLOCK)
    budget = jj.layer_budgets(params, 0.7, rule="uniform", dense=vit.DENSE)
    rng = np.random.default_rng(1)
    noise = jax.tree.map(
        lambda b, w: None if b is None else jnp.asarray(rng.normal(size=w.shape) * 0.05),
        budget,
        params,
        is_leaf=lambda x: x is None,
    )
    tx = jj.short_restriction(budget, rate=0.5)

    @jax.jit
    def refresh(params, noise):
        scores, masks = jj.init_scores(params, budget, "weight_magnitude")
        _, state = tx.update(noise, tx.init(scores), scores)
        target = jj.topk_masks(jax.tree.map(jnp.add, scores, noise), budget)
        return masks, jj.current_masks(state), target

    masks, new, target = map(flat, refresh(params, noise))
    pruned = pruned_counts(budget)
    for name, mask in new.items():
        old = masks[name]
        assert mask.sum() == mask.size - pruned[name], name
        proposed = int((target[name] & ~old).sum())
        assert proposed > 1, name  # the noise proposes swaps in every kernel
        assert int((mask & ~old).sum()) == -(-proposed // 2), name  # ceil(0.5 c) of c swaps
        assert not (mask & ~old & ~target[name]).any(), name  # only wanted entries come in


def test_tiny_search_reaches_the_scores_straight_through():
    params = random_params(ONE_BLOCK)
    graphdef = nnx.graphdef(abstract_model(ONE_BLOCK))
    budget = jj.layer_budgets(params, 0.5, rule="uniform", dense=vit.DENSE)
    tx = optax.chain(optax.sgd(1.0, momentum=0.9), jj.short_restriction(budget))

    @jax.jit
    def init(params):
        scores, masks = jj.init_scores(params, budget, "weight_magnitude")
        return scores, masks, tx.init(scores)

    scores, masks, opt_state = init(params)
    x = jnp.asarray(images(ONE_BLOCK, batch=8))
    y = jnp.arange(8) % CLASSES

    def loss_of_weights(weights):
        logits = nnx.merge(graphdef, weights)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def loss_fn(scores, masks):
        return loss_of_weights(jj.masked_weights(params, scores, masks))

    # dL/dS = dL/d(W*M) * W, dense: the right side computed here without the estimator.
    @jax.jit
    def both(scores, masks):
        by_weight = jax.grad(loss_of_weights)(jj.apply_masks(params, masks))
        return jax.grad(loss_fn)(scores, masks), by_weight

    grads, by_weight = map(flat, both(scores, masks))
    weights = flat(params)
    assert grads.keys() == set(vit.masked_paths(ONE_BLOCK))
    for name, g in grads.items():
        np.testing.assert_allclose(g, by_weight[name] * weights[name], rtol=1e-5, atol=1e-9)
        pruned = ~flat(masks)[name]
        assert np.count_nonzero(g[pruned]) > 0.9 * pruned.sum(), name  # pruned entries too

    @jax.jit
    def step(scores, opt_state):
        loss, g = jax.value_and_grad(loss_fn)(scores, jj.current_masks(opt_state))
        updates, opt_state = tx.update(g, opt_state, scores)
        return optax.apply_updates(scores, updates), opt_state, loss

    pruned = pruned_counts(budget)
    first = flat(masks)
    losses = []
    for _ in range(3):
        scores, opt_state, loss = step(scores, opt_state)
        losses.append(float(loss))
        for name, mask in flat(jj.current_masks(opt_state)).items():
            assert mask.sum() == mask.size - pruned[name], name
    churn = sum(int((m != first[n]).sum()) for n, m in flat(jj.current_masks(opt_state)).items())
    assert churn > 0 and np.isfinite(losses).all()
