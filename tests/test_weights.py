"""The weight importers and exporters (`io.weights`) against independent PyTorch reference modules,
plus strictness."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jackpots_jax import models
from jackpots_jax.io import formats, torch_weights, weights
from jackpots_jax.io.errors import CheckpointMismatchError

TORCH_REASON = "PyTorch is needed to check the importers against PyTorch (pip install torch)"


@pytest.fixture(scope="module")
def ref():
    pytest.importorskip("torch", reason=TORCH_REASON)
    import torch_reference

    return torch_reference


def save_torch(state, path, wrap=None):
    """Saves a torch state dict as the training scripts do: plain, DataParallel, or wrapped."""
    import torch

    if wrap == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    if wrap is not None:
        state = {"state_dict": state, "best_acc": torch.tensor(93.5), "epoch": 30, "cfg": [0.9]}
    torch.save(state, path)


def save_safetensors(state, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def masked(params, masks):
    """W * M at the masked kernels (written here, not taken from the library)."""
    if masks is None:
        return params
    return jax.tree.map(
        lambda w, m: w if m is None else w * m, params, masks, is_leaf=lambda x: x is None
    )


def jax_logits(name, variables, masks, x, **kwargs):
    num_classes = variables["params"]["head"]["kernel"].shape[-1]
    model = models.create(name, num_classes, **kwargs)
    params = masked(variables["params"], masks)
    out = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=False)
    return np.asarray(out)


def assert_logits_close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def images(hw, batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, hw, hw, 3)).astype(np.float32)


# (model name, classes, reference-module options, input size, how the file wraps the state dict)
CASES = {
    "resnet20-linear-dataparallel": (
        "resnet20",
        10,
        dict(classifier="linear", head="linear"),
        32,
        "module",
    ),
    "resnet32-reference": ("resnet32", 10, dict(classifier="conv"), 32, "state_dict"),
    "resnet56-fc-linear": ("resnet56", 100, dict(classifier="linear"), 32, None),
    "resnet32_w2-reference-masked": ("resnet32_w2", 10, dict(masked=True), 32, "state_dict"),
    "vgg19-reference-masked": ("vgg19", 100, dict(masked=True), 32, "state_dict"),
    "vgg19-linear-conv-bias": ("vgg19", 10, dict(classifier="linear", conv_bias=True), 32, None),
    "resnet18-torchvision": ("resnet18", 10, {}, 64, None),
    "resnet50-torchvision": ("resnet50", 10, {}, 64, None),
    "resnet50-reference-masked": ("resnet50", 10, dict(classifier="conv", masked=True), 64, None),
}
SLOW = {"vgg19-reference-masked", "resnet50-torchvision", "resnet50-reference-masked"}


def case_params():
    return [
        pytest.param(case, id=case, marks=[pytest.mark.slow] if case in SLOW else [])
        for case in CASES
    ]


@pytest.mark.parametrize("case", case_params())
def test_import_matches_pytorch(ref, tmp_path, case):
    name, classes, options, hw, wrap = CASES[case]
    torch_model = ref.randomize(ref.build(name, classes, **options), seed=1)
    x = images(hw)
    want = ref.logits(torch_model, x)
    state = torch_model.state_dict()
    save_torch(state, tmp_path / "model.pth", wrap)
    save_safetensors(state, tmp_path / "model.safetensors")

    results = [
        weights.import_checkpoint(tmp_path / "model.pth", name),
        weights.import_checkpoint(tmp_path / "model.safetensors", name, classes),
    ]
    for variables, scores, masks in results:
        assert variables["params"]["head"]["kernel"].shape[-1] == classes
        assert_logits_close(jax_logits(name, variables, masks, x), want)
        if options.get("masked"):
            assert masks is not None and scores is not None
            # Every conv and the classifier of the reference code carry scores and masks.
            kernels = [
                k
                for p, k in jax.tree_util.tree_leaves_with_path(variables["params"])
                if p[-1].key == "kernel"
            ]
            assert len(jax.tree.leaves(masks)) == len(kernels)
            assert all(m.dtype == np.bool_ for m in jax.tree.leaves(masks))
        else:
            assert masks is None and scores is None
    # Both files give identical arrays.
    jax.tree.map(np.testing.assert_array_equal, results[0], results[1])


def test_reference_masks_and_scores_are_transposed_like_kernels(ref):
    torch_model = ref.randomize(ref.build("resnet20", 10, masked=True), seed=2)
    state = torch_model.state_dict()
    variables, scores, masks = torch_weights.to_flax(state, "resnet20")
    conv = "layer2.0.conv1"
    np.testing.assert_array_equal(
        masks["layer2_0"]["conv1"]["kernel"],
        state[f"{conv}.b_mask"].numpy().transpose(2, 3, 1, 0).astype(bool),
    )
    np.testing.assert_array_equal(
        scores["layer2_0"]["conv1"]["kernel"], state[f"{conv}.mask"].numpy().transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        masks["head"]["kernel"], state["fc.b_mask"].numpy()[:, :, 0, 0].T.astype(bool)
    )
    assert masks["bn1"]["scale"] is None and masks["head"]["bias"] is None


@pytest.mark.parametrize(
    "name,hw,options",
    [
        ("resnet32_w2", 32, dict(masked=True)),
        pytest.param("resnet50", 64, {}, marks=pytest.mark.slow),
    ],
)
def test_export_round_trip_and_back_into_pytorch(ref, tmp_path, name, hw, options):
    import torch

    torch_model = ref.randomize(ref.build(name, 10, **options), seed=3)
    variables, scores, masks = torch_weights.to_flax(torch_model.state_dict(), name)
    x = images(hw)
    jax_out = jax_logits(name, variables, masks, x)

    for suffix in (".safetensors", ".npz"):
        path = tmp_path / f"jackpot{suffix}"
        written = weights.export_state_dict(variables, masks, name, path, scores=scores)
        again, scores2, masks2 = weights.import_checkpoint(path, name)
        # The export holds W * M and the masks; importing it and exporting again is exact.
        jax.tree.map(
            np.testing.assert_array_equal,
            {"params": masked(variables["params"], masks), "batch_stats": variables["batch_stats"]},
            again,
        )
        jax.tree.map(np.testing.assert_array_equal, masks2, masks, is_leaf=lambda t: t is None)
        jax.tree.map(np.testing.assert_array_equal, scores2, scores, is_leaf=lambda t: t is None)
        rewritten = torch_weights.to_torch_state_dict(again, masks2, name, scores=scores2)
        assert rewritten.keys() == written.keys()
        for key in written:
            np.testing.assert_array_equal(rewritten[key], written[key])

    # An unmasked PyTorch module with the same layout takes the export strictly, minus the masks.
    plain_options = {k: v for k, v in options.items() if k != "masked"}
    plain = ref.build(name, 10, **plain_options).eval()
    exported = formats.load_state_dict(tmp_path / "jackpot.safetensors")
    mask_keys = {k for k in exported if k.endswith((".b_mask", ".mask"))}
    assert bool(mask_keys) == bool(options.get("masked"))
    plain.load_state_dict(
        {k: torch.from_numpy(v) for k, v in exported.items() if k not in mask_keys}, strict=True
    )
    assert_logits_close(ref.logits(plain, x), jax_out)
    for key in mask_keys:
        if key.endswith(".b_mask"):
            weight = exported[key.replace(".b_mask", ".weight")]
            assert np.all(weight[exported[key] == 0] == 0)


# Strictness and errors; no PyTorch needed.


def random_variables(name, rng, num_classes=10, **kwargs):
    """Variables of the model's shapes filled with random numbers (no initialiser run)."""
    model = models.create(name, num_classes, **kwargs)
    x = jax.ShapeDtypeStruct((1, *models.input_shape(name)), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    return jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(a.dtype), abstract)


def zeros_state(name, num_classes=10, **kwargs):
    """A state dict of the model's keys and shapes, for the strictness tests."""
    model = models.create(name, num_classes, **kwargs)
    x = jax.ShapeDtypeStruct((1, *models.input_shape(name)), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    return torch_weights.to_torch_state_dict(variables, None, name, **kwargs)


def test_missing_unexpected_and_misshapen_keys_are_named():
    state = zeros_state("resnet20")
    del state["layer2.0.conv1.weight"]
    state["layer1.0.conv3.weight"] = np.zeros((16, 16, 3, 3), np.float32)
    state["bn1.running_var"] = np.ones(17, np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        torch_weights.to_flax(state, "resnet20")
    message = str(err.value)
    assert err.value.missing == ["layer2.0.conv1.weight"]
    assert err.value.unexpected == ["layer1.0.conv3.weight"]
    assert err.value.mismatched == [("bn1.running_var", (17,), (16,))]
    for text in ("layer2.0.conv1.weight", "layer1.0.conv3.weight", "bn1.running_var: [17] vs [16]"):
        assert text in message
    assert isinstance(err.value, ValueError)
    assert "hint" not in message  # still a ResNet-20: no guess about another architecture


@pytest.mark.parametrize(
    "source,source_kwargs,target,hint",
    [
        ("resnet20", {}, "vgg19", "CIFAR ResNet-20 of width 1"),
        ("resnet20", {}, "resnet32", "CIFAR ResNet-20"),
        ("resnet32_w2", {}, "resnet32", "CIFAR ResNet-32 of width 2"),
        ("vgg19", {}, "resnet20", "VGG checkpoint with 16 conv layers"),
        ("resnet18", {}, "resnet50", "ImageNet ResNet-18"),
    ],
)
def test_checkpoint_of_another_architecture(source, source_kwargs, target, hint):
    state = zeros_state(source, **source_kwargs)
    with pytest.raises(CheckpointMismatchError) as err:
        torch_weights.to_flax(state, target)
    assert hint in str(err.value)
    assert err.value.missing or err.value.unexpected or err.value.mismatched
    for key in err.value.missing[:3] + err.value.unexpected[:3]:
        assert key in str(err.value)


def test_wrong_num_classes_names_the_classifier():
    state = zeros_state("resnet20", num_classes=10)
    with pytest.raises(CheckpointMismatchError, match="fc.weight: \\[10, 64, 1, 1\\] vs"):
        torch_weights.to_flax(state, "resnet20", num_classes=100)


def test_non_binary_mask_is_an_error():
    state = zeros_state("resnet20")
    state["conv1.b_mask"] = np.full(state["conv1.weight"].shape, 0.5, np.float32)
    with pytest.raises(ValueError, match="conv1.b_mask"):
        torch_weights.to_flax(state, "resnet20")


def test_mask_of_wrong_shape_is_an_error():
    state = zeros_state("resnet20")
    state["conv1.b_mask"] = np.ones((16, 3, 1, 1), np.float32)
    with pytest.raises(CheckpointMismatchError, match="conv1.b_mask"):
        torch_weights.to_flax(state, "resnet20")


def test_conv_bias_is_folded_into_the_running_mean():
    state = zeros_state("resnet20")
    state["conv1.bias"] = np.arange(16, dtype=np.float32)
    state["bn1.running_mean"] = np.full(16, 3.0, np.float32)
    variables, _, _ = torch_weights.to_flax(state, "resnet20")
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["mean"], 3.0 - np.arange(16))
    # Only a conv bias in front of a batch norm is folded; any other extra bias is unexpected.
    state = zeros_state("fmnist_cnn")
    state["fc1.bias"] = np.zeros(128, np.float32)
    with pytest.raises(CheckpointMismatchError, match="unexpected: fc1.bias"):
        torch_weights.to_flax(state, "fmnist_cnn")


def test_export_rejects_variables_of_another_model():
    state = zeros_state("resnet20")
    variables, _, _ = torch_weights.to_flax(state, "resnet20")
    with pytest.raises(CheckpointMismatchError, match="variables do not match model"):
        torch_weights.to_torch_state_dict(variables, None, "resnet32")
    bad_masks = {"conv1": {"kernel": np.ones((3, 3, 3, 8), bool)}}
    with pytest.raises(CheckpointMismatchError, match="masks: params/conv1/kernel"):
        torch_weights.to_torch_state_dict(variables, bad_masks, "resnet20")
    with pytest.raises(ValueError, match="classifier must be"):
        torch_weights.to_torch_state_dict(variables, None, "resnet20", classifier="dense")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model name 'resnet99'"):
        torch_weights.to_flax(zeros_state("resnet20"), "resnet99")


def test_small_model_round_trip_without_torch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    rng = np.random.default_rng(0)
    variables = random_variables("fmnist_cnn", rng)
    masks = {
        "conv2": {"kernel": rng.random((3, 3, 16, 32)) < 0.2},
        "fc1": {"kernel": rng.random((7 * 7 * 32, 128)) < 0.1},
    }
    for suffix in (".safetensors", ".npz"):
        path = tmp_path / f"small{suffix}"
        weights.export_state_dict(variables, masks, "fmnist_cnn", path)
        again, scores, masks2 = weights.import_checkpoint(path, "fmnist_cnn")
        assert scores is None
        np.testing.assert_array_equal(masks2["fc1"]["kernel"], masks["fc1"]["kernel"])
        assert masks2["conv1"]["kernel"] is None and masks2["head"]["kernel"] is None
        np.testing.assert_array_equal(
            again["params"]["fc1"]["kernel"],
            variables["params"]["fc1"]["kernel"] * masks["fc1"]["kernel"],
        )
        np.testing.assert_array_equal(
            again["batch_stats"]["bn3"]["var"], variables["batch_stats"]["bn3"]["var"]
        )


def test_pytorch_files_without_pytorch_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    path = tmp_path / "model.pth"
    path.write_bytes(b"")
    with pytest.raises(ImportError, match="pip install torch"):
        formats.load_state_dict(path)
    with pytest.raises(ImportError, match="pip install torch"):
        formats.save_state_dict({"a": np.zeros(2)}, tmp_path / "out.pt")


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        formats.load_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "model.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="allowed suffixes"):
        formats.load_state_dict(tmp_path / "model.h5")


def test_importing_the_converter_does_not_import_torch():
    code = "import sys, jackpots_jax.io.weights; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_nnx_cnn_takes_the_weights_of_the_linen_cnn(tmp_path):
    """The importer is generic over model specs: the NNX CNN reads the Linen CNN's file."""
    rng = np.random.default_rng(1)
    variables = random_variables("fmnist_cnn", rng)
    path = tmp_path / "cnn.safetensors"
    weights.export_state_dict(variables, None, "fmnist_cnn", path)
    again, _, _ = weights.import_checkpoint(path, "fmnist_cnn_nnx")
    jax.tree.map(np.testing.assert_array_equal, again, variables)
    rewritten = torch_weights.to_torch_state_dict(again, None, "fmnist_cnn_nnx")
    assert rewritten.keys() == formats.load_state_dict(path).keys()


def test_written_weights_respect_the_umask(tmp_path):
    """Files renamed into place get `0o666 & ~umask`, as a plain `open` would give them."""
    variables = random_variables("fmnist_cnn", np.random.default_rng(0))
    old = os.umask(0o022)
    try:
        for umask, mode in ((0o022, 0o644), (0o007, 0o660)):
            os.umask(umask)
            path = tmp_path / f"w{umask:o}.safetensors"
            weights.export_state_dict(variables, None, "fmnist_cnn", path)
            assert stat.S_IMODE(os.stat(path).st_mode) == mode
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["w22.safetensors", "w7.safetensors"]


def test_every_converter_named_by_a_spec_is_one_module_with_both_directions():
    """`ModelSpec.converter` names and `io.weights.CONVERTERS` agree, every registered model's
    converter exists, and each converter module reads and writes with the one signature the
    dispatch calls (keyword `allow_pickle`, `scores`, `classifier`)."""
    import importlib
    import inspect

    spec_lib = importlib.import_module("jackpots_jax.models.spec")

    assert set(weights.CONVERTERS) == set(spec_lib.CONVERTERS)
    assert {models.spec(n).converter for n in models.names()} <= set(weights.CONVERTERS)
    for name, module in weights.CONVERTERS.items():
        read = inspect.signature(module.import_for_model).parameters
        write = inspect.signature(module.export_for_model).parameters
        assert list(read)[:3] == ["path", "model_name", "num_classes"], name
        assert read["allow_pickle"].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert list(write)[:4] == ["variables", "masks", "model_name", "path"], name
        for key in ("scores", "classifier"):
            assert write[key].kind is inspect.Parameter.KEYWORD_ONLY, (name, key)
