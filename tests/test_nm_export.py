"""The N:M export: PyTorch `[out, in]` layout, round trip, the 2:4 rule, what PyTorch accepts."""

import json

import jax
import numpy as np
import pytest

import jackpots_jax as jj
from jackpots_jax.io import nm_export
from jackpots_jax.patterns import nm_violations

INPUT_AXES = {"attn_out": 2}


def _jackpot(seed=0):
    """A 2:4 jackpot (magnitude init) over a conv, a dense layer and an attention output kernel,
    with a dense classifier: `[out, in]` sizes that PyTorch's fp16 semi-structured kernels accept
    (multiples of 32 x 64)."""
    rng = np.random.default_rng(seed)
    params = {
        "conv": {"kernel": rng.standard_normal((3, 3, 64, 32)).astype(np.float32)},
        "fc": {"kernel": rng.standard_normal((128, 64)).astype(np.float32), "bias": np.ones(64)},
        "attn_out": {"kernel": rng.standard_normal((2, 32, 32)).astype(np.float32)},
        "head": {"kernel": rng.standard_normal((64, 10)).astype(np.float32)},
    }
    budget = jj.layer_budgets(params, 0.5, pattern="2:4", input_axes=INPUT_AXES)
    _, masks = jax.jit(lambda p: jj.init_scores(p, budget, "magnitude"))(params)
    return params, jax.device_get(masks), budget


def test_round_trip_layout_and_the_2_of_4_rule(tmp_path):
    params, masks, budget = _jackpot()
    kernels, flat_masks, axes = nm_export.nm_layers(params, masks, budget)
    assert sorted(kernels) == ["attn_out/kernel", "conv/kernel", "fc/kernel"]
    assert axes == {"attn_out/kernel": 2, "conv/kernel": 3, "fc/kernel": 1}
    path = tmp_path / "jackpot_2of4.safetensors"
    written = nm_export.write_nm(
        path, kernels, flat_masks, input_axes=axes, extra={"fc.bias": params["fc"]["bias"]}
    )
    # PyTorch's layout: a Linear weight is the kernel transposed; a conv its [O, kh kw I] matrix.
    np.testing.assert_array_equal(
        written["fc.weight"], (params["fc"]["kernel"] * masks["fc"]["kernel"]).T
    )
    assert written["conv.weight"].shape == (32, 3 * 3 * 64)
    assert written["attn_out.weight"].shape == (32, 2 * 32)
    for name in ("conv", "fc", "attn_out"):
        weight, mask = written[f"{name}.weight"], written[f"{name}.b_mask"]
        assert weight.flags["C_CONTIGUOUS"] and weight.dtype == np.float32
        # Every row, every group of 4 consecutive entries: exactly 2 kept, at most 2 non-zeros.
        groups = mask.reshape(mask.shape[0], -1, 4)
        assert (groups.sum(-1) == 2).all(), name
        assert (np.count_nonzero(weight.reshape(weight.shape[0], -1, 4), axis=-1) <= 2).all()
        np.testing.assert_array_equal(weight[mask == 0], 0.0)
    back, back_masks, info = nm_export.read_nm(path)
    assert info["pattern"] == "2:4" and sorted(info["extra"]) == ["fc.bias"]
    for p, k in kernels.items():
        np.testing.assert_array_equal(back_masks[p], flat_masks[p])
        np.testing.assert_array_equal(back[p], k * flat_masks[p])
    # The conv matrix, reshaped back to PyTorch's conv weight, is the usual OIHW transpose.
    w = written["conv.weight"].reshape(32, 3, 3, 64).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(
        w, (params["conv"]["kernel"] * masks["conv"]["kernel"]).transpose(3, 2, 0, 1)
    )


def test_float16_weights_and_the_metadata(tmp_path):
    params, masks, budget = _jackpot(1)
    kernels, flat_masks, axes = nm_export.nm_layers(params, masks, budget)
    path = tmp_path / "j.safetensors"
    written = nm_export.write_nm(
        path, kernels, flat_masks, {"fc/kernel": "mlp.fc1"}, input_axes=axes, dtype="float16"
    )
    assert written["mlp.fc1.weight"].dtype == np.float16
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    assert meta["format"] == nm_export.FORMAT and meta["pattern"] == "2:4"
    assert json.loads(meta["layers"])["mlp.fc1"] == {
        "path": "fc/kernel",
        "shape": [128, 64],
        "input_axes": 1,
    }


def test_errors_name_the_layer(tmp_path):
    params, masks, budget = _jackpot(2)
    kernels, flat_masks, axes = nm_export.nm_layers(params, masks, budget)
    broken = dict(flat_masks)
    broken["fc/kernel"] = np.ones_like(flat_masks["fc/kernel"])
    with pytest.raises(ValueError, match="the mask of 'fc/kernel' breaks pattern 2:4: 2048 groups"):
        nm_export.write_nm(tmp_path / "x.safetensors", kernels, broken, input_axes=axes)
    with pytest.raises(ValueError, match=r"'odd/kernel': its \[out, in\] matrix \(8, 6\) has"):
        nm_export.write_nm(
            tmp_path / "x.safetensors",
            {"odd/kernel": np.ones((6, 8), np.float32)},
            {"odd/kernel": np.ones((6, 8), bool)},
        )
    with pytest.raises(ValueError, match="only in masks"):
        nm_export.write_nm(tmp_path / "x.safetensors", {}, flat_masks)
    with pytest.raises(ValueError, match="`pattern` must be N:M"):
        nm_export.write_nm(tmp_path / "x.safetensors", kernels, flat_masks, pattern="block:4")
    with pytest.raises(ValueError, match="is not an N:M export"):
        from safetensors.numpy import save_file

        save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "plain.safetensors"))
        nm_export.read_nm(tmp_path / "plain.safetensors")


def test_pytorch_takes_the_export(tmp_path):
    """The file loads in PyTorch as contiguous `[out, in]` tensors. On CPU,
    `to_sparse_semi_structured` refuses (CUDA only, torch 2.13); the CUTLASS packing it would
    run on CUDA is checked on the CPU instead: it compresses every exported weight and
    decompresses it exactly. With CUDA, the conversion itself runs and multiplies correctly."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    from torch.sparse import to_sparse_semi_structured

    params, masks, budget = _jackpot(3)
    kernels, flat_masks, axes = nm_export.nm_layers(params, masks, budget)
    path = tmp_path / "j.safetensors"
    nm_export.write_nm(path, kernels, flat_masks, input_axes=axes, dtype="float16")
    state = load_file(str(path))
    weight = state["fc.weight"]
    assert weight.shape == (64, 128) and weight.is_contiguous() and weight.dtype == torch.float16
    assert nm_violations(state["fc.b_mask"].numpy(), 1, 2, 4) == 0
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="Only CUDA tensors are currently supported"):
            to_sparse_semi_structured(weight)
        conversions = pytest.importorskip("torch.sparse._semi_structured_conversions")
        for name in ("fc", "conv", "attn_out"):
            w = state[f"{name}.weight"]
            packed, meta = conversions.sparse_semi_structured_from_dense_cutlass(w)
            assert packed.shape == (w.shape[0], w.shape[1] // 2)
            back = conversions.sparse_semi_structured_to_dense_cutlass(packed, meta)
            assert torch.equal(back, w), name
        # The packing drops data of a row that is not 2:4: the check above can fail.
        dense = weight.clone()
        dense[0, :4] = 1.0
        packed, meta = conversions.sparse_semi_structured_from_dense_cutlass(dense)
        assert not torch.equal(
            conversions.sparse_semi_structured_to_dense_cutlass(packed, meta), dense
        )
    else:  # pragma: no cover - needs a GPU with sparse tensor cores
        w = weight.cuda()
        sparse = to_sparse_semi_structured(w)
        x = torch.randn(128, 32, dtype=torch.float16, device="cuda")
        torch.testing.assert_close(torch.mm(sparse, x), torch.mm(w, x), rtol=1e-2, atol=1e-2)
