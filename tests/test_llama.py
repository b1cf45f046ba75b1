"""The Llama-family decoder, its weights (Hugging Face safetensors, GGUF) and its tokenizer.

References: `transformers`' PyTorch models with random weights (nothing downloaded), GGUF files
written here with llama.cpp's Q/K row permutation re-implemented in this file, a numpy decoding of
the GGUF block formats, and a plain-Python byte-level BPE.
"""

from __future__ import annotations

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


def _write_gguf(path, hf_model, qtype=None, permute=True, raw_override=None):
    c = hf_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
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
    config, params, _ = llama_weights.import_checkpoint(tmp_path / "m.gguf")
    tokens = _tokens()
    ref = _hf_logits(hf, tokens)
    np.testing.assert_allclose(_ours(config, params, tokens), ref, rtol=1e-5, atol=1e-5)
    q = hf.state_dict()["model.layers.1.self_attn.q_proj.weight"].numpy()
    np.testing.assert_array_equal(params["layers"][1]["attn"]["q_proj"]["kernel"], q.T)
    # Without llama.cpp's permutation undone the model is another one.
    _write_gguf(tmp_path / "flat.gguf", hf, permute=False)
    config, wrong, _ = llama_weights.import_checkpoint(tmp_path / "flat.gguf")
    assert np.abs(_ours(config, wrong, tokens) - ref).max() > 0.1


@pytest.mark.parametrize("qname", ["Q8_0", "Q4_1", "Q4_0"])
def test_gguf_quantized_dequantizes_like_the_block_format(tmp_path, qname):
    qtype = gguf.GGMLQuantizationType[qname]
    hf = _hf_model("llama", hidden_size=64, intermediate_size=96, head_dim=16)
    stored = _write_gguf(tmp_path / "m.gguf", hf, qtype)
    found = gguf_io.read(tmp_path / "m.gguf")
    assert found.types["blk.0.ffn_up.weight"] == qname
    for name in ("blk.0.ffn_down.weight", "blk.1.attn_v.weight", "token_embd.weight"):
        np.testing.assert_array_equal(found.tensors[name], _decode_blocks(stored[name], qtype))
    heads = hf.config.num_key_value_heads
    np.testing.assert_array_equal(
        found.tensors["blk.0.attn_k.weight"],
        gguf_io.unpermute_heads(_decode_blocks(stored["blk.0.attn_k.weight"], qtype), heads),
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


# ---------------------------------------------------------------------------------------------
# The model and its registry entry


def test_registry_masks_projections_and_keeps_embeddings_and_norms_dense():
    net = models.network("smollm2_135m", 49152)
    params = net.abstract_variables()["params"]
    flags = dict(named_leaves(prunable_leaves(params, net.spec.dense)))
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
    logits, _ = net.apply_fn(params, stats, tokens, False)
    assert logits.shape == (2, 7, 50) and logits.dtype == jnp.float32
    # Causal: changing the last token changes no earlier position.
    later, _ = net.apply_fn(params, stats, tokens.at[:, -1].set(3), False)
    np.testing.assert_array_equal(np.asarray(later)[:, :-1], np.asarray(logits)[:, :-1])
    groups = models.spec("llama").layer_groups("layers/0/mlp/up_proj/kernel")
    assert groups == {"block": "block 0", "kind": "mlp"}


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
