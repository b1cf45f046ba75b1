"""Report tables, plots and report.md against hand-computed numbers and direct set arithmetic."""

import json
import os
import sys

import numpy as np
import pytest

import jackpots_jax as jj
from jackpots_jax.experiment import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _parse(markdown):
    """Header and body cells of a Markdown table (the alignment row dropped)."""
    lines = [line for line in markdown.strip().split("\n") if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    assert set(lines[1]) <= set("|-:"), lines[1]
    return cells[0], cells[2:]


def _pct(cell):
    assert cell.endswith("%"), cell
    return float(cell[:-1])


def _records():
    rows = []
    for phase, epochs in (("pretrain", 3), ("search", 2)):
        for step in range(1, 4 * epochs + 1):
            rows.append(
                {"phase": phase, "kind": "train", "step": step, "epoch": step / 4,
                 "loss": 2.0 / step, "accuracy": 1 - 1 / (step + 1), "learning_rate": 0.1,
                 "images_per_s": 1000.0}
            )  # fmt: skip
            if step % 4 == 0:
                rows.append(
                    {"phase": phase, "kind": "eval", "step": step, "epoch": step / 4,
                     "accuracy": 0.5 + 0.1 * step / 4, "loss": 1.0 / step, "count": 100}
                )  # fmt: skip
    rows.append(
        {"phase": "search", "kind": "churn", "epoch": 0, "churn": 30, "kept": 200,
         "churn_per_layer": {"conv1/kernel": 10, "conv2/kernel": 20}}
    )  # fmt: skip
    rows.append(
        {"phase": "search", "kind": "churn", "epoch": 1, "churn": 7, "kept": 200,
         "churn_per_layer": {"conv1/kernel": 3, "conv2/kernel": 4}}
    )  # fmt: skip
    return rows


def _check_png(path):
    from matplotlib import image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] >= 200 and pixels.shape[1] >= 300, pixels.shape
    # Something was drawn: a blank canvas has a single colour.
    assert np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 10


def _no_temp_files(root):
    for folder, _, files in os.walk(root):
        for name in files:
            assert not name.endswith(".tmp") and not name.startswith("."), (folder, name)


# ---------------------------------------------------------------------------------------------
# read_metrics


def test_read_metrics_skips_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(r) for r in _records()[:3]]
    path.write_text("\n".join(lines) + "\n\n" + '{"phase": "search", "kind": "tr')
    assert report.read_metrics(path) == [json.loads(line) for line in lines]
    path.write_text("\n".join(lines) + "\n")
    assert report.read_metrics(path) == [json.loads(line) for line in lines]


def test_read_metrics_raises_on_a_corrupt_line_in_the_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": \n{"step": 4}\n')
    with pytest.raises(ValueError, match=r"line 3\b"):
        report.read_metrics(path)
    # A terminated last line is complete: if it does not parse, the file is corrupt.
    path.write_text('{"step": 1}\n{"step": \n')
    with pytest.raises(ValueError, match=r"line 2\b"):
        report.read_metrics(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object"):
        report.read_metrics(path)
    with pytest.raises(FileNotFoundError):
        report.read_metrics(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------------
# Tables


def test_results_table_parses_back_to_the_numbers():
    rows = [
        {
            "model": "dense",
            "sparsity": 0.0,
            "accuracy": 0.9271,
            "loss": 0.21,
            "note": "pre-trained",
        },
        {"model": "jackpot", "sparsity": 0.9, "accuracy": 0.9105, "loss": 0.3333, "epochs": 30},
        {"model": "magnitude | no search", "sparsity": 0.9, "accuracy": 0.1},
    ]
    header, body = _parse(report.results_table(rows))
    assert header == ["model", "sparsity", "accuracy", "loss", "epochs", "note"]
    assert [_pct(r[1]) for r in body] == [0.0, 90.0, 90.0]
    assert [_pct(r[2]) for r in body] == [92.71, 91.05, 10.0]
    assert [r[3] for r in body] == ["0.2100", "0.3333", ""]
    assert [r[4] for r in body] == ["", "30", ""]
    assert body[0][5] == "pre-trained" and body[1][5] == ""
    assert body[2][0] == "magnitude \\| no search"  # an escaped pipe does not split the cell
    # Columns no row has are left out.
    header, _ = _parse(report.results_table([{"model": "m", "accuracy": 0.5}]))
    assert header == ["model", "accuracy"]


def test_results_table_rejects_percentages_and_empty_input():
    with pytest.raises(
        ValueError, match=r"row 0: `accuracy` must be a fraction in \[0, 1\].*92.71"
    ):
        report.results_table([{"model": "dense", "accuracy": 92.71}])
    with pytest.raises(ValueError, match="at least one row"):
        report.results_table([])


def test_sparsity_table_hand_made_report():
    """The report's sparsity section is the library's table (`jj.format_sparsity_table`)."""
    layer = lambda size, kept, masked=True: {
        "size": size, "kept": kept, "pruned": size - kept, "sparsity": 1 - kept / size,
        "density": kept / size, "masked": masked,
    }  # fmt: skip
    rep = {
        "layers": {"conv1/kernel": layer(400, 100), "head/kernel": layer(50, 50, masked=False)},
        "budgeted": layer(400, 100),
        "prunable": layer(450, 150),
        "all": layer(500, 200),
    }
    header, body = _parse(jj.format_sparsity_table(rep))
    assert header == ["layer", "weights", "kept", "sparsity"]
    assert body[0][:3] == ["conv1/kernel", "400", "100"]
    assert _pct(body[0][3]) == 75.0
    assert body[1][0] == "head/kernel (dense)" and _pct(body[1][3]) == 0.0
    assert [r[0] for r in body[2:]] == [
        "**total over masked layers**",
        "**total over all conv/dense kernels**",
        "**total over all parameters**",
    ]
    assert [(int(r[1]), int(r[2]), _pct(r[3])) for r in body[2:]] == [
        (400, 100, 75.0),
        (450, 150, 66.67),
        (500, 200, 60.0),
    ]


def test_sparsity_table_of_a_real_report():
    rng = np.random.default_rng(0)
    params = {
        "conv1": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32)},
        "bn": {"scale": np.ones(4, np.float32)},
        "head": {"kernel": rng.standard_normal((4, 5)).astype(np.float32)},
    }
    mask = np.zeros(72, bool)
    mask[rng.choice(72, size=18, replace=False)] = True
    masks = {"conv1": {"kernel": mask.reshape(3, 3, 2, 4)}, "bn": {"scale": None}}
    masks["head"] = {"kernel": None}
    _, body = _parse(jj.format_sparsity_table(jj.sparsity_report(masks, params)))
    cells = {r[0]: r[1:] for r in body}
    assert cells["conv1/kernel"][:2] == ["72", "18"] and _pct(cells["conv1/kernel"][2]) == 75.0
    assert cells["head/kernel (dense)"][:2] == ["20", "20"]
    assert "bn/scale" not in cells and "bn/scale (dense)" not in cells
    total = cells["**total over all parameters**"]
    assert total[:2] == ["96", "42"] and _pct(total[2]) == round(100 * 54 / 96, 2)


def test_overlap_table_matches_set_arithmetic():
    rng = np.random.default_rng(1)
    a = {"x": rng.random((6, 5)) < 0.4, "y": rng.random((4, 4)) < 0.5, "b": None}
    b = {"x": rng.random((6, 5)) < 0.3, "y": rng.random((4, 4)) < 0.5, "b": None}
    header, body = _parse(report.overlap_table(jj.mask_overlap(a, b), names=("found", "magn")))
    assert (
        header[1:3] == ["found kept", "magn kept"] and header[-1] == "share of magn kept by found"
    )
    sets = lambda m: (set(np.flatnonzero(m["x"])), set(100 + np.flatnonzero(m["y"])))
    (ax, ay), (bx, by) = sets(a), sets(b)
    expected = {"x": (ax, bx), "y": (ay, by), "**total**": (ax | ay, bx | by)}
    assert [r[0] for r in body] == ["x", "y", "**total**"]
    for row in body:
        sa, sb = expected[row[0]]
        assert [int(c) for c in row[1:4]] == [len(sa), len(sb), len(sa & sb)]
        assert float(row[4]) == round(len(sa & sb) / len(sa | sb), 4)
        assert _pct(row[5]) == round(100 * len(sa & sb) / len(sb), 2)


def test_churn_table_percent_of_kept():
    records = _records()
    # A resumed run logs epoch 1 again; the later record wins.
    records.append({"phase": "search", "kind": "churn", "epoch": 1, "churn": 9, "kept": 300})
    header, body = _parse(report.churn_table(records))
    assert header == ["epoch", "churn", "churn (% of kept)", "kept"]
    assert [(int(r[0]), int(r[1]), _pct(r[2]), int(r[3])) for r in body] == [
        (0, 30, 15.0, 200),  # 30 / 200
        (1, 9, 3.0, 300),  # 9 / 300
    ]
    with pytest.raises(ValueError, match="no record"):
        report.churn_table([r for r in records if r["kind"] != "churn"])


# ---------------------------------------------------------------------------------------------
# Plots and report.md


def test_plots_are_valid_pngs(tmp_path):
    records = _records()
    rep = jj.sparsity_report(
        {"a": np.eye(8, dtype=bool), "b": np.ones((4, 4), bool)},
        {"a": np.ones((8, 8), np.float32), "b": np.ones((4, 4), np.float32)},
    )
    pyplot = sys.modules.get("matplotlib.pyplot")
    open_figures = pyplot.get_fignums() if pyplot else None
    out = [
        report.plot_curves(records, tmp_path / "p" / "curves.png"),
        report.plot_sparsity(rep, tmp_path / "p" / "sparsity.png"),
        report.plot_churn(records, tmp_path / "p" / "churn.png"),
    ]
    assert out == [str(tmp_path / "p" / n) for n in ("curves.png", "sparsity.png", "churn.png")]
    for path in out:
        _check_png(path)
    # Totals only (no per-layer counts) still make a plot.
    totals_only = [{k: v for k, v in r.items() if k != "churn_per_layer"} for r in records]
    _check_png(report.plot_churn(totals_only, tmp_path / "totals.png"))
    # No figure was left open in pyplot's global state (or pyplot was never loaded at all).
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or pyplot.get_fignums() == (open_figures or [])
    _no_temp_files(tmp_path)
    with pytest.raises(ValueError, match="no record"):
        report.plot_curves([r for r in records if r["kind"] == "churn"], tmp_path / "x.png")


def _drawn(monkeypatch):
    """The figures the plot functions draw, kept instead of written."""
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig) or str(path))
    return figures


def test_curves_give_each_phase_its_own_epochs_and_draw_the_baselines(monkeypatch):
    figures = _drawn(monkeypatch)
    baselines = {"dense": {"accuracy": 0.9, "loss": 0.3}, "magnitude pruning": {"accuracy": 0.6}}
    report.plot_curves(_records(), "curves.png", baselines)
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == [
        "pretrain: loss", "pretrain: accuracy", "search: loss", "search: accuracy",
    ]  # fmt: skip
    # The search's epochs start again at its own beginning (2 epochs of 4 steps each), not after
    # the 3 epochs of pre-training.
    train = {ax.get_title(): ax.lines[0].get_xdata() for ax in axes}
    assert list(train["search: loss"]) == [step / 4 for step in range(1, 9)]
    assert list(train["pretrain: loss"]) == [step / 4 for step in range(1, 13)]
    # The baselines are horizontal lines at their value, on the search's panels only.
    lines = lambda ax: {ln.get_label(): list(ln.get_ydata()) for ln in ax.lines}
    assert lines(axes[3])["dense: 90.00%"] == [90.0, 90.0]
    assert lines(axes[3])["magnitude pruning: 60.00%"] == [60.0, 60.0]
    assert lines(axes[2])["dense: 0.3000"] == [0.3, 0.3]
    assert "magnitude pruning" not in " ".join(lines(axes[2]))  # it has no loss
    assert set(lines(axes[0])) == set(lines(axes[1])) == {"train", "eval"}
    assert axes[3].get_legend() is not None


def test_sparsity_plot_labels_every_bar(monkeypatch):
    figures = _drawn(monkeypatch)
    masks = {"a": np.eye(8, dtype=bool), "b": np.arange(16).reshape(4, 4) < 5, "head": None}
    params = {n: np.ones(shape, np.float32) for n, shape in (("a", (8, 8)), ("b", (4, 4)))}
    params["head"] = np.ones((4, 2), np.float32)
    report.plot_sparsity(jj.sparsity_report(masks, params), "sparsity.png")
    ax = figures[0].axes[0]
    # 56 of 64 and 11 of 16 pruned; the classifier held dense is labelled as such, not left empty.
    assert [t.get_text() for t in ax.texts] == ["87.50%", "68.75%", "0.00% (held dense)"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "head (dense)"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "churn.png"
    path.write_bytes(b"old")

    def broken(self, f, **kwargs):
        f.write(PNG_SIGNATURE)
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        report.plot_churn(_records(), path)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["churn.png"]


def test_write_report_with_every_section(tmp_path):
    records = _records()
    masks = {"conv": np.arange(20).reshape(4, 5) % 3 == 0, "head": None}
    params = {"conv": np.ones((4, 5), np.float32), "head": np.ones((5, 2), np.float32)}
    magnitude = {"conv": np.arange(20).reshape(4, 5) < 7, "head": None}
    results = [{"model": "jackpot", "sparsity": 0.65, "accuracy": 0.8123}]
    path = report.write_report(
        tmp_path / "run",
        title="Tiny run",
        results=results,
        sparsity=jj.sparsity_report(masks, params),
        overlap=jj.mask_overlap(masks, magnitude),
        records=records,
        config={"model": "cnn", "search": {"sparsity": 0.65, "epochs": 2}},
        notes=["first note", "second note"],
    )
    assert path == str(tmp_path / "run" / "report.md")
    text = open(path).read()
    headings = [line for line in text.split("\n") if line.startswith("#")]
    assert headings == [
        "# Tiny run",
        "## Results",
        "## Notes",
        "## Sparsity per layer",
        "## Overlap with the magnitude mask",
        "## Mask churn per search epoch",
        "## Plots",
        "## Config",
    ]
    assert report.results_table(results) in text
    assert jj.format_sparsity_table(jj.sparsity_report(masks, params)) in text
    assert "- first note\n- second note" in text
    assert report.churn_table(records) in text
    for name in ("curves", "sparsity", "churn"):
        assert f"(plots/{name}.png)" in text
        _check_png(tmp_path / "run" / "plots" / f"{name}.png")
    config = text.split("```json\n")[1].split("\n```")[0]
    assert json.loads(config) == {"model": "cnn", "search": {"sparsity": 0.65, "epochs": 2}}
    assert sorted(os.listdir(tmp_path / "run")) == ["plots", "report.md"]
    _no_temp_files(tmp_path)


def test_write_report_leaves_out_missing_sections(tmp_path):
    results = [{"model": "dense", "sparsity": 0.0, "accuracy": 0.9}]
    path = report.write_report(tmp_path, title="Only results", results=results, records=[])
    text = open(path).read()
    assert [line for line in text.split("\n") if line.startswith("#")] == [
        "# Only results",
        "## Results",
    ]
    assert os.listdir(tmp_path) == ["report.md"]  # no plots folder either
    # Training records but no churn: curves are plotted, the churn table and plot are left out.
    train_only = [r for r in _records() if r["kind"] != "churn"]
    text = open(report.write_report(tmp_path, title="t", results=(), records=train_only)).read()
    assert "## Results" not in text and "## Mask churn" not in text and "churn.png" not in text
    assert "(plots/curves.png)" in text and os.listdir(tmp_path / "plots") == ["curves.png"]
    _no_temp_files(tmp_path)


def test_sparsity_by_group_sums_masked_layers_by_hand():
    """Two blocks, attention and MLP kernels, one held-dense kernel (left out): worked by hand."""
    layers = {
        "blocks/0/attn/q": {"size": 100, "kept": 10, "sparsity": 0.9, "masked": True},
        "blocks/0/mlp/fc1": {"size": 200, "kept": 50, "sparsity": 0.75, "masked": True},
        "blocks/1/attn/q": {"size": 100, "kept": 30, "sparsity": 0.7, "masked": True},
        "head/kernel": {"size": 40, "kept": 40, "sparsity": 0.0, "masked": False},
    }
    by_block = report.sparsity_by_group({"layers": layers}, lambda n: n.split("/")[1])
    assert by_block == {
        "0": {"size": 300, "kept": 60, "layers": 2, "sparsity": 0.8},
        "1": {"size": 100, "kept": 30, "layers": 1, "sparsity": pytest.approx(0.7)},
    }
    by_kind = report.sparsity_by_group({"layers": layers}, lambda n: n.split("/")[2])
    assert by_kind["attn"] == {"size": 200, "kept": 40, "layers": 2, "sparsity": 0.8}
    table = report.grouped_sparsity_table(by_kind, "kind")
    assert table.splitlines()[2] == "| attn | 2 | 200 | 40 | 80.00% |"
    assert table.splitlines()[3] == "| mlp | 1 | 200 | 50 | 75.00% |"
