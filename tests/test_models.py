"""Models: specs and registry, interface, shortcut and batch-norm numerics, parameter counts by
hand, and the NNX CNN against its Linen twin."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jackpots_jax as jj
from jackpots_jax import models
from jackpots_jax.models import layers
from jackpots_jax.models.resnet_cifar import CifarBasicBlock
from jackpots_jax.models.small import max_pool_2x2

ALL = (
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet32_w2",
    "vgg19",
    "resnet18",
    "resnet34",
    "resnet50",
    "fmnist_cnn",
)


def abstract_variables(name, num_classes=10, hw=None, **kwargs):
    model = models.create(name, num_classes, **kwargs)
    h, w, c = models.input_shape(name)
    if hw is not None:
        h = w = hw
    x = jax.ShapeDtypeStruct((2, h, w, c), jnp.float32)
    return model, x, jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def kernels(params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(k.key for k in p): v for p, v in flat if p[-1].key == "kernel"}


NNX = ("fmnist_cnn_nnx",)


VIT = ("vit_ti16", "vit_s16", "vit_b16", "vit_b32", "vit_fmnist")

LLM = ("llama", "smollm2_135m")  # tested in tests/test_llama.py


def test_names_lists_every_model():
    assert set(models.names()) == set(ALL) | set(NNX) | set(VIT) | set(LLM)


@pytest.mark.parametrize("name", VIT)
def test_vit_specs_build_the_named_vit_with_its_options(name):
    """The registry's ViTs: NNX, `vit.DENSE` held dense, shapes of `vit.CONFIGS` (checked on the
    q kernel and the patch embedding), options replacing config fields, unknown ones refused."""
    from jackpots_jax.models import vit

    spec = models.spec(name)
    c = vit.CONFIGS[name]
    assert spec.kind == "nnx" and spec.dense == vit.DENSE and spec.converter == "vit"
    assert spec.input_shape == (c.image_size, c.image_size, c.channels)
    params = models.network(name, 7).abstract_variables()["params"]
    assert params["blocks"][0]["attn"]["query"]["kernel"].shape == (
        c.width,
        c.num_heads,
        c.width // c.num_heads,
    )
    assert params["embedding"]["kernel"].shape == (c.patch_size, c.patch_size, c.channels, c.width)
    assert params["head"]["kernel"].shape == (c.width, 7)
    small = models.network(name, 3, depth=1, width=32, num_heads=2, mlp_dim=48)
    assert small.abstract_variables()["params"]["blocks"][0]["mlp"]["fc1"]["kernel"].shape == (
        32,
        48,
    )
    assert set(small.abstract_variables()["params"]["blocks"]) == {0}
    with pytest.raises(ValueError, match="takes no option"):
        models.network(name, 3, heads=2)


@pytest.mark.parametrize("name", ALL + NNX)
def test_every_spec_builds_a_network_with_plain_dict_variables(name):
    """`network(name)` gives the same interface for Linen and NNX models: plain nested dicts."""
    spec = models.spec(name)
    assert spec.name == name and spec.kind == ("nnx" if name in NNX else "linen")
    assert spec.classifier == "head" and spec.dense == ("head",)
    net = models.network(name, 7)
    variables = net.abstract_variables((32, 32, 3) if "resnet" in name else None)
    assert type(variables["params"]) is dict and type(variables["batch_stats"]) is dict
    assert variables["params"]["head"]["kernel"].shape[-1] == 7
    h, w, c = (32, 32, 3) if "resnet" in name else spec.input_shape
    x = jax.ShapeDtypeStruct((2, h, w, c), jnp.float32)
    for train in (False, True):
        logits, stats = jax.eval_shape(
            lambda p, s, x: net.apply_fn(p, s, x, train),  # noqa: B023 - called at once
            variables["params"],
            variables["batch_stats"],
            x,
        )
        assert logits.shape == (2, 7) and logits.dtype == jnp.float32
        assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])


def test_nnx_cnn_computes_what_the_linen_cnn_computes():
    """`fmnist_cnn_nnx` is `fmnist_cnn` in NNX: the same variables give the same outputs."""
    linen, nnx_net = models.network("fmnist_cnn", 10), models.network("fmnist_cnn_nnx", 10)
    shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
    assert shapes(linen.abstract_variables()) == shapes(nnx_net.abstract_variables())
    params, stats = linen.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
    for train in (False, True):
        want = linen.apply_fn(params, stats, x, train)
        got = nnx_net.apply_fn(params, stats, x, train)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), want, got)
    model = models.create("fmnist_cnn_nnx", 10, rngs=nnx.Rngs(3))
    assert isinstance(model, nnx.Module) and model.head.kernel.shape == (128, 10)
    with pytest.raises(ValueError, match="takes no `rngs`"):
        models.create("fmnist_cnn", 10, rngs=nnx.Rngs(0))


def test_describe_checkpoint_names_the_family():
    assert "VGG" in models.describe_checkpoint({"features.0.weight": (64, 3, 3, 3)})
    resnet = {"conv1.weight": (32, 3, 3, 3), "layer1.0.conv1.weight": (32, 32, 3, 3)}
    assert "CIFAR ResNet-4 of width 2" in models.describe_checkpoint(resnet)
    assert models.describe_checkpoint({"fc1.weight": (2, 3)}) is None


def test_create_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="resnet99") as err:
        models.create("resnet99", 10)
    for name in ALL:
        assert name in str(err.value)


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True])
def test_create_rejects_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        models.create("resnet20", num_classes)


def test_create_rejects_unknown_option():
    with pytest.raises(ValueError, match="depth.*allowed options: \\['width'\\]"):
        models.create("resnet20", 10, depth=3)
    with pytest.raises(ValueError, match="width"):
        models.create("vgg19", 10, width=2)


@pytest.mark.parametrize("name", ALL)
def test_interface(name):
    """Logits [B, classes] float32; classifier `head` at the top; conv kernels HWIO, no bias."""
    model, x, variables = abstract_variables(
        name, num_classes=7, hw=64 if "resnet" in name else None
    )
    assert set(variables) == {"params", "batch_stats"}
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert out.shape == (2, 7) and out.dtype == jnp.float32
    out, updates = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
    )
    assert out.shape == (2, 7) and out.dtype == jnp.float32
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"]
    )

    params = variables["params"]
    assert params["head"]["kernel"].shape[-1] == 7 and params["head"]["bias"].shape == (7,)
    for path, kernel in kernels(params).items():
        assert kernel.ndim in (2, 4), path
        if kernel.ndim == 4:
            module = params
            for key in path.split("/")[:-1]:
                module = module[key]
            assert set(module) == {"kernel"}, f"{path}: a conv followed by batch norm has no bias"
    assert params["conv1"]["kernel"].shape[2] == x.shape[-1]


def test_width_multiplier_and_resnet32_w2():
    _, _, w2 = abstract_variables("resnet32", width=2)
    _, _, ref = abstract_variables("resnet32_w2")
    shapes = lambda v: jax.tree.map(lambda a: a.shape, v)
    assert shapes(w2) == shapes(ref)
    assert ref["params"]["conv1"]["kernel"].shape == (3, 3, 3, 32)
    assert ref["params"]["layer3_4"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert ref["params"]["head"]["kernel"].shape == (128, 10)


@pytest.mark.parametrize("depth,blocks", [(20, 3), (32, 5), (56, 9)])
def test_cifar_resnet_depth(depth, blocks):
    _, _, v = abstract_variables(f"resnet{depth}")
    params = v["params"]
    for stage in (1, 2, 3):
        assert f"layer{stage}_{blocks - 1}" in params and f"layer{stage}_{blocks}" not in params
    # 2 convs per block, the stem and the classifier.
    assert len(kernels(params)) == depth


def test_cifar_resnet_rejects_bad_depth():
    model = models.create("resnet20", 10)
    bad = model.clone(depth=21)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        jax.eval_shape(bad.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_option_a_shortcut_subsamples_and_pads_evenly():
    """With zero conv kernels (and identity batch norms) a block is relu(shortcut(x))."""
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
    identity = {"scale": np.ones(9, np.float32), "bias": np.zeros(9, np.float32)}
    params = {
        "conv1": {"kernel": np.zeros((3, 3, 4, 9), np.float32)},
        "conv2": {"kernel": np.zeros((3, 3, 9, 9), np.float32)},
        "bn1": identity,
        "bn2": identity,
    }
    fresh = {"mean": np.zeros(9, np.float32), "var": np.ones(9, np.float32)}
    variables = {"params": params, "batch_stats": {"bn1": fresh, "bn2": fresh}}
    out = np.asarray(CifarBasicBlock(planes=9, stride=2).apply(variables, x, train=False))
    expected = np.zeros((2, 4, 4, 9), np.float32)
    # 5 zero channels: (9 - 4) // 2 = 2 in front, the other 3 behind (the common CIFAR code).
    expected[..., 2:6] = x[:, ::2, ::2, :]
    np.testing.assert_allclose(out, np.maximum(expected, 0.0), rtol=0, atol=1e-6)


def test_batch_norm_uses_pytorch_numerics():
    """eps 1e-5, running average with PyTorch momentum 0.1 (Flax 0.9), batch stats in train."""
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(4, 5, 5, 3)).astype(np.float32)
    bn = layers.batch_norm(train=True, name="bn")
    variables = bn.init(jax.random.key(0), x)
    out, updates = bn.apply(variables, x, mutable=["batch_stats"])
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)

    # A running variance of the order of eps tells PyTorch's eps (1e-5) from Flax's (1e-6).
    stats = {"mean": np.float32([1.0, -1.0, 0.5]), "var": np.float32([4.0, 1e-5, 1.0])}
    params = {"scale": np.float32([2.0, 1.0, -1.0]), "bias": np.float32([0.0, 1.0, 3.0])}
    out = layers.batch_norm(train=False, name="bn").apply(
        {"params": params, "batch_stats": stats}, x
    )
    expected = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"]
    np.testing.assert_allclose(out, expected + params["bias"], rtol=1e-5, atol=1e-5)


def test_vgg19_layout():
    _, _, v = abstract_variables("vgg19")
    convs = {k: a.shape for k, a in kernels(v["params"]).items() if a.ndim == 4}
    widths = [64, 64, 128, 128] + [256] * 4 + [512] * 8
    assert [convs[f"conv{i}/kernel"][-1] for i in range(1, 17)] == widths
    assert len(convs) == 16
    assert v["params"]["head"]["kernel"].shape == (512, 10)  # no hidden dense layers


def test_bad_input_rank():
    model = models.create("fmnist_cnn", 10)
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((28, 28, 1)))


@pytest.mark.parametrize("hw", [8, 7])
def test_small_model_pool_equals_max_pool(hw):
    x = np.random.default_rng(0).normal(size=(2, hw, hw, 3)).astype(np.float32)
    want = nn.max_pool(x, (2, 2), strides=(2, 2))  # VALID: an odd last row / column is dropped
    np.testing.assert_array_equal(max_pool_2x2(x), want)


def test_small_model_trains_and_updates_batch_stats():
    model = models.create("fmnist_cnn", 10)
    x = np.random.default_rng(0).normal(size=(16, 28, 28, 1)).astype(np.float32)
    y = np.arange(16) % 10
    variables = jax.jit(model.init)(jax.random.key(0), x)

    @jax.jit
    def step(params, stats):
        def loss(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            picked = jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)
            return -picked.mean(), updates["batch_stats"]

        (value, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), new_stats, value

    params, stats = variables["params"], variables["batch_stats"]
    params, new_stats, first = step(params, stats)
    assert not np.allclose(new_stats["bn1"]["mean"], stats["bn1"]["mean"])
    for _ in range(20):
        params, _, value = step(params, stats)
    assert value < 0.5 * first


# Parameter counts, from the architecture arithmetic (k * k * c_in * c_out per conv).


def test_resnet32_w2_masked_weight_count():
    n, widths = 5, (32, 64, 128)
    convs = 3 * 3 * 3 * 32  # stem
    cin = 32
    for w in widths:
        for _ in range(n):
            convs += 3 * 3 * cin * w + 3 * 3 * w * w
            cin = w
    assert convs == 1_844_064  # "about 1.85M" prunable weights of the reference ResNet-32
    _, _, v = abstract_variables("resnet32_w2")
    counted = sum(a.size for a in kernels(v["params"]).values() if a.ndim == 4)
    assert counted == convs


def test_vgg19_conv_weight_count():
    cfg = [64, 64, 128, 128, 256, 256, 256, 256] + [512] * 8
    cins = [3] + cfg[:-1]
    convs = sum(9 * cin * cout for cin, cout in zip(cins, cfg, strict=True))
    assert convs == 20_018_880  # "20.0M"
    _, _, v = abstract_variables("vgg19")
    counted = sum(a.size for a in kernels(v["params"]).values() if a.ndim == 4)
    assert counted == convs


def test_resnet50_total_parameter_count():
    bn = lambda c: 2 * c  # scale and bias (the running statistics are not parameters)
    total = 7 * 7 * 3 * 64 + bn(64)
    cin = 64
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True):
        for i in range(blocks):
            total += cin * planes + bn(planes)
            total += 9 * planes * planes + bn(planes)
            total += planes * 4 * planes + bn(4 * planes)
            if i == 0:
                total += cin * 4 * planes + bn(4 * planes)
            cin = 4 * planes
    total += 2048 * 1000 + 1000
    assert total == 25_557_032  # torchvision's ResNet-50
    _, _, v = abstract_variables("resnet50", num_classes=1000)
    assert sum(a.size for a in jax.tree.leaves(v["params"])) == total


def test_input_shape():
    assert models.input_shape("fmnist_cnn") == (28, 28, 1)
    assert models.input_shape("vgg19") == (32, 32, 3)
    with pytest.raises(ValueError, match="unknown model"):
        models.input_shape("lenet")


@pytest.mark.parametrize("name", ["fmnist_cnn", "resnet20", "vgg19", "resnet18"])
def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state(name):
    """bf16: every conv/dense output is bf16; params, BN statistics and logits stay float32.

    The bf16 logits track the float32 ones of the same weights (bf16 keeps 8 bits of mantissa).
    """
    hw = 32 if name == "resnet18" else None
    f32, x, _ = abstract_variables(name, hw=hw)
    bf16 = models.create(name, 10, dtype="bfloat16")
    images = jax.random.normal(jax.random.key(1), x.shape)
    variables = f32.init(jax.random.key(0), images)
    # Every kernel layer's output, as Flax records it.
    _, inter = bf16.apply(
        variables, images, capture_intermediates=lambda m, _: isinstance(m, nn.Conv | nn.Dense)
    )
    outs = jax.tree.leaves(inter)
    assert outs and all(o.dtype == jnp.bfloat16 for o in outs)
    logits, updates = bf16.apply(variables, images, train=True, mutable=["batch_stats"])
    assert logits.dtype == jnp.float32
    assert {s.dtype for s in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
    want = f32.apply(variables, images, train=False)
    got = bf16.apply(variables, images, train=False)
    assert got.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, atol=0.1 * scale)


def test_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match="float16.*allowed: float32, bfloat16"):
        models.create("resnet20", 10, dtype="float16")


def test_bfloat16_search_keeps_exact_counts_and_float32_state():
    """A few search steps of the bf16 CNN: masks keep the budget; scores and state stay float32."""
    from jackpots_jax.step import create_search_state, linen_apply, search_optimizer, search_step

    model = models.create("fmnist_cnn", 10, dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((16, 28, 28, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
    variables = models.create("fmnist_cnn", 10).init(jax.random.key(0), images[:1])
    params = variables["params"]
    budget = jj.layer_budgets(params, 0.9, "global_magnitude")
    scores, _ = jj.init_scores(params, budget, "magnitude")
    tx = search_optimizer(budget, learning_rate=0.5, total_steps=4, rate=jj.schedules.cosine(4))
    state = create_search_state(scores, tx, batch_stats=variables["batch_stats"])
    apply_fn = linen_apply(model)
    step = jax.jit(lambda s, b: search_step(s, params, b, apply_fn=apply_fn, tx=tx))
    churn = 0
    for i in range(4):
        batch = {"image": images + 0.1 * i, "label": labels}
        state, metrics = step(state, batch)
        churn += int(metrics["churn"])
        assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
    assert churn > 0  # the masks moved
    masks = jj.current_masks(state.opt_state)
    for name, pruned in jj._tree.named_leaves(budget):
        if pruned is None:
            continue
        mask = dict(jj._tree.named_leaves(masks))[name]
        assert mask.size - int(mask.sum()) == pruned, name
    leaves = jax.tree.leaves((state.scores, state.batch_stats, state.opt_state))
    floats = {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}
