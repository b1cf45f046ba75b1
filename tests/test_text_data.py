"""Text corpora, their split, the token cache, packing, host sharding and perplexity.

References: streams rebuilt with numpy from the documents' UTF-8 bytes (the test tokenizer is
bytes + 3 special ids), window tables cut from those streams by hand, the split rule recomputed
from its definition, and strfile's own record counts for Debian's fortunes.
"""

import hashlib
import json
import math
import os
import re
import struct

import numpy as np
import pytest

from jackpots_jax.data import text

BOS, EOS, PAD = 256, 257, 258
FORTUNES = "/usr/share/games/fortunes"


class ByteTokenizer:
    """UTF-8 bytes, then BOS / EOS / PAD; counts its calls to `encode`."""

    vocab_size = 259
    bos_id = BOS

    def __init__(self, fingerprint="bytes-1", eos_id=EOS):
        self.fingerprint = fingerprint
        self.eos_id = eos_id
        self.calls = 0

    def encode(self, s):
        self.calls += 1
        return list(s.encode("utf-8"))


def write_fortunes(folder, files):
    """Writes strfile-format files (records separated by `%` lines) and a stray index/link."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        (folder / name).write_text("".join(r + "\n%\n" for r in records), encoding="utf-8")
        (folder / f"{name}.dat").write_bytes(b"\x00" * 24)  # strfile's index: not a text
        os.symlink(name, folder / f"{name}.u8")  # Debian's UTF-8 alias: the same file
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~240 random-word records in 3 fortune files, with one duplicate across files."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "jax", "grain", "token", "ünïcode", "%", "\t--"]
    files = {}
    for f in ("a", "b", "c"):
        files[f] = [
            f"{f}{i}: " + " ".join(rng.choice(words, size=rng.integers(0, 30))) for i in range(80)
        ]
    files["c"][5] = files["a"][7]
    return write_fortunes(tmp_path_factory.mktemp("fortunes"), files), files


def prepare(folder, cache, tokenizer=None, fraction=0.25):
    return text.prepare_text(
        "fortunes",
        tokenizer or ByteTokenizer(),
        cache_dir=cache,
        corpus_path=folder,
        validation_fraction=fraction,
    )


def stream(texts, eos=True):
    """The reference stream: [BOS] + bytes + [EOS] per text, concatenated."""
    parts = [[BOS, *t.encode("utf-8"), *([EOS] if eos else [])] for t in texts]
    return np.array([x for p in parts for x in p], dtype=np.int32)


# ----------------------------------------------------------------------------------------------
# Corpora and the split


def test_fortune_records_by_hand(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "x").write_text("one\n%\ntwo lines\n100%\n%\n\n%\nlast\n%\none\n%\n")
    (folder / "x.dat").write_bytes(b"\x00" * 24)
    os.symlink("x", folder / "x.u8")
    docs = text.load_corpus("fortunes", folder)
    # The blank record and the repeated "one" (x/4) go; `%` inside a line stays.
    assert docs == [
        text.Document("x/0", "one"),
        text.Document("x/1", "two lines\n100%"),
        text.Document("x/3", "last"),
    ]


def test_split_follows_the_rule_and_keeps_splits_apart(corpus, tmp_path):
    folder, files = corpus
    data = prepare(folder, tmp_path)
    docs = {d.title: d.text for d in text.load_corpus("fortunes", folder)}
    assert len(docs) == 3 * 80 - 1  # the duplicate is kept once
    assert not set(data.train_titles) & set(data.validation_titles)
    assert set(data.train_titles) | set(data.validation_titles) == set(docs)
    want = sorted(
        t
        for t, s in docs.items()
        if int(hashlib.sha256(s.encode()).hexdigest()[:16], 16) < 0.25 * 2**64
    )
    assert sorted(data.validation_titles) == want
    assert 30 < len(want) < 90  # about a quarter of 239
    train_texts = {docs[t] for t in data.train_titles}
    assert not train_texts & {docs[t] for t in data.validation_titles}
    # Streams: the documents in title order, each [BOS] + bytes + [EOS].
    np.testing.assert_array_equal(
        data.train_tokens, stream([docs[t] for t in sorted(data.train_titles)])
    )
    np.testing.assert_array_equal(
        data.validation_tokens, stream([docs[t] for t in sorted(data.validation_titles)])
    )
    assert data.train_tokens.dtype == np.int32

    # Deterministic, and independent of where a record sits: the same texts in other files
    # and another order land in the same split.
    moved = {"z": files["c"][::-1], "y": files["a"] + files["b"]}
    again = prepare(write_fortunes(tmp_path / "moved", moved), tmp_path / "c2")
    val = {docs[t] for t in data.validation_titles}
    again_docs = {d.title: d.text for d in text.load_corpus("fortunes", tmp_path / "moved")}
    assert {again_docs[t] for t in again.validation_titles} == val


def test_no_eos_tokenizer(corpus, tmp_path):
    folder, _ = corpus
    data = prepare(folder, tmp_path, ByteTokenizer(eos_id=None))
    docs = {d.title: d.text for d in text.load_corpus("fortunes", folder)}
    want = stream([docs[t] for t in data.validation_titles], eos=False)
    np.testing.assert_array_equal(data.validation_tokens, want)
    assert data.token_count == sum(len(docs[t].encode()) for t in data.validation_titles)


# ----------------------------------------------------------------------------------------------
# The cache


def test_cache_is_reused_rebuilt_on_new_tokenizer_and_on_corruption(corpus, tmp_path, caplog):
    folder, _ = corpus
    tok = ByteTokenizer()
    first = prepare(folder, tmp_path, tok)
    assert tok.calls == 3 * 80 - 1  # once per document
    (file,) = tmp_path.glob("*.npz")
    assert file.name == f"fortunes-{first.key[:16]}.npz"
    assert not [p for p in tmp_path.iterdir() if p != file]  # no temporary left behind

    second = prepare(folder, tmp_path, tok)
    assert tok.calls == 3 * 80 - 1  # read from the cache
    np.testing.assert_array_equal(second.train_tokens, first.train_tokens)
    assert second.validation_titles == first.validation_titles

    other = ByteTokenizer(fingerprint="bytes-2")
    renewed = prepare(folder, tmp_path, other)
    assert other.calls == 3 * 80 - 1 and renewed.key != first.key
    assert len(list(tmp_path.glob("*.npz"))) == 2

    # Corruption: flipped bytes in the middle, then a truncated file, then a foreign key.
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 16] = b"\xff" * 16
    corrupt = [bytes(raw), file.read_bytes()[:100]]
    for content in corrupt:
        file.write_bytes(content)
        tok.calls = 0
        with caplog.at_level("WARNING"):
            rebuilt = prepare(folder, tmp_path, tok)
        assert tok.calls == 3 * 80 - 1
        assert "Rebuilding the token cache" in caplog.text
        np.testing.assert_array_equal(rebuilt.train_tokens, first.train_tokens)
        np.testing.assert_array_equal(rebuilt.validation_tokens, first.validation_tokens)
    with np.load(file) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["key"] = np.array("0" * 64)
    with open(file, "wb") as f:
        np.savez(f, **arrays)
    tok.calls = 0
    prepare(folder, tmp_path, tok)
    assert tok.calls == 3 * 80 - 1


# ----------------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_train_windows_reconstruct_the_stream(corpus, tmp_path, seq_len):
    folder, _ = corpus
    data = prepare(folder, tmp_path)
    s = data.train_tokens
    n = text.num_train_windows(len(s), seq_len)
    assert n == (len(s) - 1) // seq_len
    b = text.train_windows(s, np.arange(n), seq_len, BOS)
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        "inputs": ((n, seq_len), np.int32),
        "targets": ((n, seq_len), np.int32),
        "weights": ((n, seq_len), np.float32),
    }
    # Window i is s[i*T : i*T + T + 1]: the inputs tile the stream, the targets are it shifted.
    np.testing.assert_array_equal(b["inputs"].ravel(), s[: n * seq_len])
    np.testing.assert_array_equal(b["targets"].ravel(), s[1 : n * seq_len + 1])
    np.testing.assert_array_equal(b["weights"], (b["targets"] != BOS).astype(np.float32))


@pytest.mark.parametrize("seq_len", [1, 5, 64, 100_000])
def test_every_validation_token_is_a_target_once(corpus, tmp_path, seq_len):
    folder, _ = corpus
    data = prepare(folder, tmp_path)
    s = data.validation_tokens
    n = text.num_eval_windows(len(s), seq_len)
    assert n == math.ceil((len(s) - 1) / seq_len)
    b = text.eval_windows(s, np.arange(n + 2), seq_len, BOS)  # two windows past the end
    assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (n + 2, seq_len)
    assert b["weights"].dtype == np.float32 and b["inputs"].dtype == np.int32
    # Position k of the stream (k >= 1) is the target of row (k - 1) // T, column (k - 1) % T.
    targets, weights = b["targets"].ravel(), b["weights"].ravel()
    m = len(s) - 1
    np.testing.assert_array_equal(targets[:m], s[1:])
    np.testing.assert_array_equal(weights[:m], (s[1:] != BOS).astype(np.float32))
    np.testing.assert_array_equal(b["inputs"].ravel()[:m], s[:-1])
    assert not weights[m:].any() and not targets[m:].any()
    assert not b["inputs"][n:].any()
    # Scored: every text byte and every EOS of the validation documents.
    docs = {d.title: d.text for d in text.load_corpus("fortunes", folder)}
    count = sum(len(docs[t].encode()) + 1 for t in data.validation_titles)
    assert weights.sum() == data.token_count == count


def test_perplexity():
    assert text.perplexity(2 * math.log(4.0), 2) == pytest.approx(4.0)
    # A uniform model over V tokens has perplexity V, whatever the count.
    assert text.perplexity(137 * math.log(259), 137.0) == pytest.approx(259)
    assert text.perplexity(0.0, 5) == 1.0
    with pytest.raises(ValueError, match="token_count"):
        text.perplexity(1.0, 0)


# ----------------------------------------------------------------------------------------------
# Iterators and hosts


def window_ids(data, batch, seq_len):
    """The window index of every row (by its inputs), from the reference table."""
    s = data.train_tokens
    n = text.num_train_windows(len(s), seq_len)
    table = {s[i * seq_len : i * seq_len + seq_len].tobytes(): i for i in range(n)}
    return [table[row.tobytes()] for row in batch["inputs"]]


@pytest.mark.parametrize("hosts", [2, 3])
def test_hosts_split_the_one_host_batches(corpus, tmp_path, hosts):
    folder, _ = corpus
    data = prepare(folder, tmp_path)
    seq_len, batch = 97, 4 * hosts
    kw = dict(seq_len=seq_len, global_batch_size=batch, seed=3, local_device_count=1)
    whole = text.text_train_iterator(data, **kw)
    parts = [
        text.text_train_iterator(data, process_index=h, process_count=hosts, **kw)
        for h in range(hosts)
    ]
    steps = text.num_train_windows(len(data.train_tokens), seq_len) // batch
    assert whole.steps_per_epoch == steps and all(p.steps_per_epoch == steps for p in parts)
    seen = []
    for _ in range(steps + 2):  # across an epoch boundary
        want = next(whole)
        got = [next(p) for p in parts]
        for key in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
        seen.append(window_ids(data, want, seq_len))
    epoch = np.concatenate(seen[:steps])
    assert len(set(epoch.tolist())) == steps * batch  # no window twice in an epoch
    assert seen[steps] != seen[0]  # the next epoch is reshuffled


def test_train_is_deterministic_and_resumes(corpus, tmp_path):
    folder, _ = corpus
    data = prepare(folder, tmp_path)
    kw = dict(seq_len=16, global_batch_size=8, local_device_count=1)
    it = text.text_train_iterator(data, seed=0, **kw)
    expected = [next(it)["inputs"] for _ in range(6)]
    again = text.text_train_iterator(data, seed=0, **kw)
    for _ in range(2):
        next(again)
    state = json.loads(json.dumps(again.get_state()))
    resumed = text.text_train_iterator(data, seed=0, **kw)
    resumed.set_state(state)
    for want in expected[2:]:
        np.testing.assert_array_equal(next(resumed)["inputs"], want)
    other = text.text_train_iterator(data, seed=1, **kw)
    assert not np.array_equal(next(other)["inputs"], expected[0])
    with pytest.raises(ValueError, match="seed: saved 0, now 1"):
        other.set_state(state)
    longer = text.text_train_iterator(data, seed=0, **{**kw, "seq_len": 17})
    with pytest.raises(ValueError, match="seq_len: saved 16, now 17"):
        longer.set_state(state)


@pytest.mark.parametrize("hosts", [1, 2, 3])
def test_eval_iterator_counts_every_target_once_over_hosts(corpus, tmp_path, hosts):
    folder, _ = corpus
    data = prepare(folder, tmp_path)
    seq_len, local = 50, 4
    s = data.validation_tokens
    n = text.num_eval_windows(len(s), seq_len)
    steps = text.text_eval_steps(
        data, seq_len=seq_len, global_batch_size=local * hosts, process_count=hosts
    )
    reference = text.eval_windows(s, np.arange(n), seq_len, BOS)
    rows = {k: [] for k in reference}
    for h in range(hosts):
        batches = list(
            text.text_eval_iterator(
                data,
                seq_len=seq_len,
                global_batch_size=local * hosts,
                process_index=h,
                process_count=hosts,
                local_device_count=1,
            )
        )
        assert len(batches) == steps
        share = (h + 1) * n // hosts - h * n // hosts
        for k in rows:
            host_rows = np.concatenate([b[k] for b in batches])
            assert host_rows.shape == (steps * local, seq_len)
            assert not host_rows[share:].any()  # padding rows: tokens 0, weight 0
            rows[k].append(host_rows[:share])
    for k, want in reference.items():
        np.testing.assert_array_equal(np.concatenate(rows[k]), want)
    assert np.concatenate(rows["weights"]).sum() == data.token_count


# ----------------------------------------------------------------------------------------------
# Errors


def test_errors_name_the_problem(corpus, tmp_path):
    folder, _ = corpus
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}") + ".*apt-get install"):
        text.load_corpus("fortunes", missing)
    with pytest.raises(ValueError, match="unknown text corpus 'wiki'"):
        text.load_corpus("wiki")
    with pytest.raises(ValueError, match=r"validation_fraction.*\(0, 1\), got 1.5"):
        prepare(folder, tmp_path, fraction=1.5)
    with pytest.raises(ValueError, match="leaves the validation split without documents"):
        prepare(folder, tmp_path, fraction=1e-12)
    no_bos = ByteTokenizer()
    no_bos.bos_id = None
    with pytest.raises(ValueError, match="tokenizer.bos_id"):
        prepare(folder, tmp_path, no_bos)
    small = ByteTokenizer()
    small.vocab_size = 200
    with pytest.raises(ValueError, match=r"tokenizer.bos_id` must be in \[0, 200\), got 256"):
        prepare(folder, tmp_path, small)
    small.bos_id, small.eos_id, small.vocab_size = 1, 2, 128  # "ü" is bytes 195, 188
    with pytest.raises(ValueError, match=r"id 1\d\d, outside its vocabulary \[0, 128\)"):
        prepare(folder, tmp_path, small)
    assert not list(tmp_path.glob("*.npz"))  # nothing half-written
    data = prepare(folder, tmp_path)
    with pytest.raises(ValueError, match="exceeds the .* training windows"):
        text.text_train_iterator(
            data, seq_len=4096, global_batch_size=64, seed=0, local_device_count=1
        )
    with pytest.raises(ValueError, match="seq_len"):
        text.text_eval_iterator(data, seq_len=0, global_batch_size=4, local_device_count=1)


# ----------------------------------------------------------------------------------------------
# The real corpora


def test_pydoc_topics(tmp_path):
    from pydoc_data import topics  # the same module, imported: the reference

    docs = text.load_corpus("pydoc_topics")
    assert len(docs) == len({v for v in topics.topics.values() if v.strip()}) > 50
    assert {d.title for d in docs} <= set(topics.topics)
    assert all(topics.topics[d.title] == d.text for d in docs)
    data = text.prepare_text("pydoc_topics", ByteTokenizer(), cache_dir=tmp_path)
    assert data.train_titles and data.validation_titles
    assert len(data.train_tokens) + len(data.validation_tokens) == sum(
        len(d.text.encode()) + 2 for d in docs
    )


def test_debian_fortunes():
    if not os.path.isdir(FORTUNES):
        message = (
            f"Debian's fortunes are not installed ({FORTUNES}); .ci/run must install them: "
            "`apt-get install -y fortunes`"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    # strfile's index (.dat) holds each file's number of non-empty records (big-endian header:
    # version, count, ...): the loader's records before duplicates are dropped.
    counts = {}
    for name in os.listdir(FORTUNES):
        if name.endswith(".dat"):
            with open(os.path.join(FORTUNES, name), "rb") as f:
                counts[name[:-4]] = struct.unpack(">2I", f.read(8))[1]
    docs = text.load_corpus("fortunes")
    per_file = {}
    for d in docs:
        per_file.setdefault(d.title.split("/")[0], []).append(d)
    assert set(per_file) == set(counts)
    assert all(len(per_file[f]) <= counts[f] for f in counts)
    assert sum(counts.values()) - len(docs) < 0.01 * len(docs)  # only repeats left out
    assert len(docs) > 1000 and len({d.text for d in docs}) == len(docs)
