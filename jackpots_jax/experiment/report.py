"""Markdown tables, PNG plots and the `report.md` of a run, from its metrics and mask statistics.

Everything here works on plain dicts: the lines of `<workdir>/metrics.jsonl` (`read_metrics`), a
`sparsity_report`, a `mask_overlap`. The table and plot functions are pure apart from the one file a
plot writes; `write_report` is the edge that writes a whole report.

Figures are made with `matplotlib.figure.Figure` on an Agg canvas, never through `pyplot`: nothing
is registered in pyplot's global list of open figures, the process-wide backend is left alone, and
each figure is cleared as soon as its PNG is written.

Every file is written under a temporary name in its final folder and renamed into place
(`io.files.atomic_path`), so a reader (or a run killed half-way) never sees a half-written report or
PNG.

Metric records (one JSON dict per line):

* `{"phase", "kind": "train", "step", "epoch", "loss", "accuracy", "learning_rate",
  "images_per_s"}` (`"tokens_per_s"` for a language model; search lines may carry `"churn"`
  too);
* `{"phase", "kind": "eval", "step", "epoch", "accuracy", "loss", "count"}`;
* `{"phase": "search", "kind": "churn", "epoch", "churn", "churn_per_layer", "kept"}`: entries
  flipped during that search epoch, summed over its steps.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jackpots_jax.io.errors import FileContentError
from jackpots_jax.io.files import atomic_path, jsonable, write_text
from jackpots_jax.sparsity import format_sparsity_table

# How many layers a churn plot names in its legend; the rest are drawn as one "other layers" band.
MAX_LEGEND_LAYERS = 10

CHURN_DEFINITION = (
    "Churn: the mask entries that flipped (kept to pruned, or pruned to kept) at each step, summed "
    "over the steps of the epoch. One kept weight swapped for another flips two entries, so "
    "'churn (% of kept)' is twice the swaps per kept weight: 170% means 0.85 swaps per kept "
    "weight in that epoch (a weight that leaves and comes back counts each time)."
)


# ---------------------------------------------------------------------------------------------
# Reading metrics.


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a `metrics.jsonl` file, in file order.

    A run killed while writing leaves its last line without the closing newline; that line is
    dropped when it does not parse. Any other line that is not a JSON object is an error: metrics
    are never silently lost from the middle of a file. Blank lines are skipped.

    Args:
      path: the JSON-lines file (one dict per line).

    Returns:
      A list of dicts.

    Raises:
      FileNotFoundError: the file is not there.
      FileContentError: (a `ValueError`) a line other than an unterminated last one is not a
        JSON object; the message names the file and the line number.

    Example:
      >>> records = read_metrics("/tmp/run/metrics.jsonl")
      >>> [r["accuracy"] for r in records if r["kind"] == "eval"]
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    # After a final newline, split leaves an empty string; anything else there is unterminated.
    unterminated = len(lines) - 1 if lines[-1] else None
    records = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if index == unterminated:
                break
            raise FileContentError(
                f"{os.fspath(path)}, line {index + 1}: not valid JSON ({e.msg} at column "
                f"{e.colno}); every line of a metrics file must be one JSON object (a line cut "
                "short by a writer killed outside this program, or by a full disk?): delete "
                "that line, or move the file away"
            ) from None
        if not isinstance(record, dict):
            raise FileContentError(
                f"{os.fspath(path)}, line {index + 1}: expected a JSON object, got "
                f"{type(record).__name__} {line.strip()[:40]!r}: delete that line, or move the "
                "file away"
            )
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# Markdown tables.


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("\n", " ").replace("|", "\\|")


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None
) -> str:
    """A Markdown table; `align` holds one `l` or `r` per column (default: the first left, the
    others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _percent(fraction: Any) -> str:
    if fraction is None:
        return ""
    return f"{float(fraction):.2%}"


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def _check_fraction(value: Any, field: str, where: str) -> None:
    if value is None:
        return
    # numbers.Real takes numpy scalars too (an accuracy straight from a device array's item()).
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: `{field}` must be a number in [0, 1], got {value!r}")
    # NaN passes: a diverged run is still worth a row.
    if not math.isnan(value) and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{where}: `{field}` must be a fraction in [0, 1] (it is printed as a percentage), "
            f"got {value!r}"
        )


def results_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of final results, one row per model.

    Known columns come first (`model`, `sparsity`, `accuracy`, `top5_accuracy`, `loss`), then
    any other keys in the order they first appear, then `note`. A column no row has is left out; a
    row without a key gets an empty cell. `sparsity` and the accuracies are fractions, printed as
    percentages with two decimals; `loss` gets four decimals.

    Args:
      rows: dicts such as `{"model": "dense", "sparsity": 0.0, "accuracy": 0.9271,
        "loss": 0.21, "note": "pre-trained"}`.

    Returns:
      The table as one string (no trailing newline).

    Raises:
      ValueError: `rows` is empty, or a `sparsity`/`accuracy` is outside [0, 1].

    Example:
      >>> print(results_table([{"model": "dense", "sparsity": 0.0, "accuracy": 0.9271}]))
      | model | sparsity | accuracy |
      |---|---:|---:|
      | dense | 0.00% | 92.71% |
    """
    if not rows:
        raise ValueError("results_table needs at least one row, got none")
    known = ("model", "sparsity", "accuracy", "top5_accuracy", "loss")
    extra: list[str] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"results row {i} must be a mapping, got {type(row).__name__}")
        for field in ("sparsity", "accuracy", "top5_accuracy"):
            _check_fraction(row.get(field), field, f"results row {i}")
        extra += [k for k in row if k not in known and k != "note" and k not in extra]
    present = set().union(*(row.keys() for row in rows))
    columns = [k for k in known if k in present] + extra + (["note"] if "note" in present else [])
    formats: dict[str, Callable[[Any], str]] = {
        "sparsity": _percent,
        "accuracy": _percent,
        "top5_accuracy": _percent,
        "loss": _number,
    }
    align = "".join("l" if c in ("model", "note") else "r" for c in columns)
    body = [[formats.get(c, _number)(row.get(c)) for c in columns] for row in rows]
    return markdown_table(columns, body, align)


def _require(mapping: Mapping, keys: Sequence[str], what: str, made_by: str) -> None:
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ValueError(
            f"{what} lacks the keys {missing} (it has {sorted(mapping)}); pass the dict returned "
            f"by {made_by}"
        )


def overlap_table(overlap: Mapping[str, Any], names: tuple[str, str] = ("a", "b")) -> str:
    """A Markdown table of a `mask_overlap(a, b)`: per layer, then the total.

    Columns: the weights each mask keeps, the weights both keep, the IoU of the two kept sets (a
    fraction, four decimals) and the share of `b`'s kept weights that `a` keeps too (%).

    Args:
      overlap: the dict returned by `jackpots_jax.mask_overlap(a, b)`.
      names: what to call `a` and `b` in the header, e.g. `("jackpot", "magnitude")`.

    Returns:
      The table as one string.

    Example:
      >>> print(overlap_table(jj.mask_overlap(found, magnitude), names=("jackpot", "magnitude")))
    """
    _require(overlap, ["layers", "total"], "the overlap", "mask_overlap")
    a, b = names
    header = ["layer", f"{a} kept", f"{b} kept", "both kept", "IoU", f"share of {b} kept by {a}"]

    def row(label, s):
        return [label, s["a_kept"], s["b_kept"], s["intersection"], f"{s['iou']:.4f}"] + [
            _percent(s["b_in_a"])
        ]

    body = [row(name, s) for name, s in overlap["layers"].items()]
    body.append(row("**total**", overlap["total"]))
    return markdown_table(header, body, "lrrrrr")


def _latest(records: Iterable[Mapping], kind: str, key: str) -> list[Mapping]:
    """One record of `kind` per (phase, key): a resumed run logs some again; the last wins."""
    chosen: dict[tuple, Mapping] = {}
    for r in records:
        if r.get("kind") == kind and r.get(key) is not None:
            chosen[(r.get("phase"), r[key])] = r
    return list(chosen.values())


def _churn_records(records: Iterable[Mapping]) -> list[Mapping]:
    return sorted(_latest(records, "churn", "epoch"), key=lambda r: r["epoch"])


def churn_table(records: Iterable[Mapping[str, Any]]) -> str:
    """A Markdown table of the mask churn of every search epoch.

    Churn counts flipped mask entries, summed over the epoch's steps (`CHURN_DEFINITION`): swapping
    one kept weight for another counts 2, and a weight swapped several times counts each time, so
    as a share of the kept weights it can exceed 100%.

    Args:
      records: metric records (e.g. from `read_metrics`); only `kind == "churn"` ones are used. When
        an epoch appears twice (a resumed run), the later record wins.

    Returns:
      The table: epoch, churn, churn as % of kept weights, kept.

    Raises:
      ValueError: there is no churn record.
    """
    rows = _churn_records(records)
    if not rows:
        raise ValueError('churn_table found no record with kind == "churn" (search epochs only)')
    body = []
    for r in rows:
        kept = r.get("kept")
        share = _percent(r["churn"] / kept) if kept else ""
        body.append([r["epoch"], r["churn"], share, kept])
    return markdown_table(["epoch", "churn", "churn (% of kept)", "kept"], body, "rrrr")


# ---------------------------------------------------------------------------------------------
# Plots.


def figure(width: float, height: float, rows: int = 1, cols: int = 1):
    """A matplotlib figure of `rows` x `cols` axes (a 2-D array), drawn without a display."""
    # Imported here so that reading metrics and making tables does not load matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def save_figure(fig, path: str | os.PathLike) -> str:
    """Writes `fig` to `path` as a PNG, whole or not at all; returns the path."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        fig.clear()
    return os.fspath(path)


def _series(records: Iterable[Mapping], phase: str, kind: str, field: str):
    rows = [r for r in records if r.get("phase") == phase and r.get(field) is not None]
    rows = sorted(_latest(rows, kind, "step"), key=lambda r: (r["epoch"], r["step"]))
    return [r["epoch"] for r in rows], [r[field] for r in rows]


def plot_curves(
    records: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """Loss and accuracy against epoch, train and eval, one row of panels per phase, as a PNG.

    Each phase (pre-training, the search) has its own row and its own epoch axis: they do not run
    together. Train records are drawn as thin lines, eval records as dashed lines with markers. A
    step logged twice (a resumed run) is drawn once, from its later record. `baselines` (final
    results such as the dense model and one-shot pruning) are drawn as horizontal lines on the
    search's panels (on the last phase's when there is no search).

    Args:
      records: metric records; `kind` "train" and "eval" ones with an `epoch` and a `step` are used.
      path: where to write the PNG (its folder is created).
      baselines: `{label: {"accuracy": ..., "loss": ...}}` (e.g. rows of `results.json`).

    Returns:
      `path` as a string.

    Raises:
      ValueError: there is no train or eval record.
    """
    records = [r for r in records if r.get("kind") in ("train", "eval") and "epoch" in r]
    if not records:
        raise ValueError('plot_curves found no record with kind "train" or "eval" and an epoch')
    phases = list(dict.fromkeys(r.get("phase") for r in records))
    with_baselines = "search" if "search" in phases else phases[-1]
    fig, axes = figure(11, 3.6 * len(phases), len(phases), 2)
    for row, phase in enumerate(phases):
        loss_ax, acc_ax = axes[row]
        for kind, style in (
            ("train", {"lw": 1, "alpha": 0.8, "color": "C0"}),
            ("eval", {"ls": "--", "marker": "o", "color": "C1"}),
        ):
            x, y = _series(records, phase, kind, "loss")
            if x:
                loss_ax.plot(x, y, label=kind, ms=4, **style)
            x, y = _series(records, phase, kind, "accuracy")
            if x:
                acc_ax.plot(x, [100 * v for v in y], label=kind, ms=4, **style)
        if phase == with_baselines:
            for i, (label, result) in enumerate((baselines or {}).items()):
                colour = f"C{i + 2}"
                if result.get("accuracy") is not None:
                    acc = 100 * result["accuracy"]
                    acc_ax.axhline(acc, color=colour, lw=1, ls=":", label=f"{label}: {acc:.2f}%")
                if result.get("loss") is not None:
                    loss = result["loss"]
                    loss_ax.axhline(loss, color=colour, lw=1, ls=":", label=f"{label}: {loss:.4f}")
        loss_ax.set(xlabel=f"{phase} epoch", ylabel="loss", title=f"{phase}: loss")
        acc_ax.set(xlabel=f"{phase} epoch", ylabel="accuracy (%)", title=f"{phase}: accuracy")
        for ax in (loss_ax, acc_ax):
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_sparsity(report: Mapping[str, Any], path: str | os.PathLike) -> str:
    """A horizontal bar per layer of a `sparsity_report`, with the masked-layer total as a line.

    Args:
      report: the dict returned by `jackpots_jax.sparsity_report`.
      path: where to write the PNG (its folder is created).

    Returns:
      `path` as a string.

    Raises:
      ValueError: the report has no layer.
    """
    _require(report, ["layers", "budgeted"], "the sparsity report", "sparsity_report")
    layers = report["layers"]
    if not layers:
        raise ValueError("plot_sparsity: the sparsity report has no layer")
    names = list(layers)
    values = [100 * layers[n]["sparsity"] for n in names]
    masked = [layers[n].get("masked", True) for n in names]
    colours = ["C0" if m else "C7" for m in masked]
    fig, axes = figure(8, 1.5 + 0.3 * len(names))
    ax = axes[0][0]
    bars = ax.barh(range(len(names)), values, color=colours)
    # Every bar says its value; a layer held dense (an empty bar) says so.
    pairs = list(zip(names, values, masked, strict=True))
    labels = [f"{v:.2f}%" if m else f"{v:.2f}% (held dense)" for _, v, m in pairs]
    ax.bar_label(bars, labels, padding=3, fontsize="small")
    ax.set_yticks(range(len(names)), [n if m else f"{n} (dense)" for n, _, m in pairs])
    ax.invert_yaxis()
    total = 100 * report["budgeted"]["sparsity"]
    ax.axvline(total, color="C3", ls="--", label=f"masked layers: {total:.2f}%")
    # Room on the right for the labels of the bars near 100%.
    ax.set(xlabel="sparsity (%)", xlim=(0, 118), title="sparsity per layer")
    ax.set_xticks(range(0, 101, 20))
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return save_figure(fig, path)


def plot_churn(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> str:
    """Mask churn per search epoch as stacked bars per layer, with the total marked on top.

    The `MAX_LEGEND_LAYERS` layers with the most churn are named; the rest form one grey band. When
    no record has `churn_per_layer`, the bars are the totals.

    Args:
      records: metric records; only `kind == "churn"` ones are used.
      path: where to write the PNG (its folder is created).

    Returns:
      `path` as a string.

    Raises:
      ValueError: there is no churn record.
    """
    rows = _churn_records(records)
    if not rows:
        raise ValueError('plot_churn found no record with kind == "churn" (search epochs only)')
    epochs = [r["epoch"] for r in rows]
    totals = [r["churn"] for r in rows]
    per_layer = [r.get("churn_per_layer") or {} for r in rows]
    layer_sums: dict[str, int] = {}
    for d in per_layer:
        for name, c in d.items():
            layer_sums[name] = layer_sums.get(name, 0) + c
    ranked = sorted(layer_sums, key=lambda n: -layer_sums[n])
    named, rest = ranked[:MAX_LEGEND_LAYERS], ranked[MAX_LEGEND_LAYERS:]
    bands = [(n, [d.get(n, 0) for d in per_layer]) for n in named]
    if rest:
        bands.append(
            (f"{len(rest)} other layers", [sum(d.get(n, 0) for n in rest) for d in per_layer])
        )
    stacked = bool(bands)
    if not stacked:
        bands = [("total", totals)]
    fig, axes = figure(10, 4.5)
    ax = axes[0][0]
    bottom = [0] * len(rows)
    for i, (name, heights) in enumerate(bands):
        colour = "lightgrey" if rest and i == len(bands) - 1 else f"C{i}"
        ax.bar(epochs, heights, bottom=bottom, color=colour, label=name, width=0.8)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    if stacked:
        ax.plot(epochs, totals, color="black", marker="o", ms=4, lw=1, label="total")
    ax.set(xlabel="search epoch", ylabel="mask entries flipped", title="mask churn per epoch")
    ax.grid(axis="y", alpha=0.3)
    # Outside the axes: with many layers the legend would hide the bars.
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# The report.


def sparsity_by_group(
    report: Mapping[str, Any], group_of: Callable[[str], str]
) -> dict[str, dict[str, Any]]:
    """The masked layers of a `sparsity_report` summed by group (`group_of(layer path)`), in
    first-seen order: `{group: {"size", "kept", "sparsity", "layers"}}`."""
    _require(report, ["layers"], "the sparsity report", "sparsity_report")
    groups: dict[str, dict[str, Any]] = {}
    for name, r in report["layers"].items():
        if not r.get("masked", True):
            continue
        g = groups.setdefault(group_of(name), {"size": 0, "kept": 0, "layers": 0})
        g["size"] += int(r["size"])
        g["kept"] += int(r["kept"])
        g["layers"] += 1
    for g in groups.values():
        g["sparsity"] = 1 - g["kept"] / g["size"] if g["size"] else 0.0
    return groups


def grouped_sparsity_table(groups: Mapping[str, Mapping[str, Any]], label: str = "group") -> str:
    """A Markdown table of `sparsity_by_group`: one row per group."""
    return markdown_table(
        (label, "masked kernels", "weights", "kept", "sparsity"),
        (
            (name, g["layers"], g["size"], g["kept"], _percent(g["sparsity"]))
            for name, g in groups.items()
        ),
        "lrrrr",
    )


def _config_text(config: Any) -> str:
    return json.dumps(jsonable(config, "config"), indent=2, sort_keys=True)


def write_report(
    workdir: str | os.PathLike,
    *,
    title: str,
    results: Sequence[Mapping[str, Any]],
    sparsity: Mapping[str, Any] | None = None,
    overlap: Mapping[str, Any] | None = None,
    records: Sequence[Mapping[str, Any]] | None = None,
    config: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    overlap_names: tuple[str, str] = ("jackpot", "magnitude"),
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
    sparsity_groups: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    sections: Mapping[str, str] | None = None,
) -> str:
    """Writes `<workdir>/report.md` and its PNGs in `<workdir>/plots/`.

    Sections, in order: results, notes, sparsity per layer, overlap with the magnitude mask, mask
    churn per search epoch, plots (linked by relative path) and the config (a fenced JSON block).
    A section whose input is `None` or empty is left out, and so is a plot with nothing to draw.
    Every file is written under a temporary name and renamed into place.

    Args:
      workdir: the run's folder (created if missing).
      title: the report's heading.
      results: rows for `results_table`.
      sparsity: a `sparsity_report` of the found masks.
      overlap: `mask_overlap(found_masks, magnitude_masks)`.
      records: metric records (`read_metrics(<workdir>/metrics.jsonl)`).
      config: the run's config (a mapping, or anything with `to_dict()` like a `ConfigDict`).
      notes: free-text remarks, one bullet each.
      overlap_names: what the overlap table calls its `a` and `b` masks.
      baselines: final results drawn as horizontal lines in the curves (`plot_curves`).
      sparsity_groups: `{label: sparsity_by_group(...)}`, one table each after the per-layer
        table (e.g. a ViT's layers by block and by kind).
      sections: `{heading: markdown}`, sections of the caller's placed after the notes.

    Returns:
      The path of `report.md` as a string.

    Example:
      >>> write_report(workdir, title="ResNet-20, 90% sparse", results=rows,
      ...              sparsity=jj.sparsity_report(masks, params),
      ...              records=read_metrics(f"{workdir}/metrics.jsonl"), config=config)
    """
    workdir = Path(workdir)
    records = list(records or ())
    parts = [f"# {title}"]
    if results:
        parts.append("## Results\n\n" + results_table(results))
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes))
    for heading, text in (sections or {}).items():
        parts.append(f"## {heading}\n\n{text}")
    if sparsity:
        parts.append("## Sparsity per layer\n\n" + format_sparsity_table(sparsity))
    for label, groups in (sparsity_groups or {}).items():
        parts.append(f"## Sparsity by {label}\n\n" + grouped_sparsity_table(groups, label))
    if overlap:
        parts.append(
            "## Overlap with the magnitude mask\n\n" + overlap_table(overlap, overlap_names)
        )
    has_churn = bool(_churn_records(records))
    if has_churn:
        parts.append(
            f"## Mask churn per search epoch\n\n{CHURN_DEFINITION}\n\n{churn_table(records)}"
        )

    plots = []
    if any(r.get("kind") in ("train", "eval") and "epoch" in r for r in records):
        curves = plot_curves(records, workdir / "plots" / "curves.png", baselines)
        plots.append(("Loss and accuracy", curves))
    if sparsity and sparsity.get("layers"):
        plots.append(
            ("Sparsity per layer", plot_sparsity(sparsity, workdir / "plots" / "sparsity.png"))
        )
    if has_churn:
        plots.append(("Mask churn", plot_churn(records, workdir / "plots" / "churn.png")))
    if plots:
        links = [f"![{alt}]({Path(p).relative_to(workdir).as_posix()})" for alt, p in plots]
        parts.append("## Plots\n\n" + "\n\n".join(links))

    if config:
        parts.append("## Config\n\n```json\n" + _config_text(config) + "\n```")
    path = workdir / "report.md"
    write_text(path, "\n\n".join(parts) + "\n")
    return str(path)
