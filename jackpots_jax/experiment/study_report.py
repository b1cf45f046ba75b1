"""The studies' `results.json` (`assemble`) and its `report.md` with plots (`write`).

`assemble` turns the cells' results (`experiment.studies`) into one JSON document: for every
study its settings, every statistic the report shows (mean, sample standard deviation, min, max,
number of seeds, and the per-seed values), and the conclusions, written as text from those
numbers. `render` makes the Markdown report from that document alone, so every number in the
report is one of `results.json` (the tests check it), and `write` writes both and the plots.

Statistics are over seeds: `stat(values)` gives `{"mean", "std" (sample, ddof 1; 0 for one value),
"min", "max", "n", "values"}`. Paired comparisons (a policy against rate 1, fine-tuned against the
jackpot) are statistics of the per-seed differences; a difference is called *beyond the seeds'
spread* when its mean is more than two standard errors (`2 std / sqrt(n)`) from zero.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jackpots_jax.experiment import report
from jackpots_jax.experiment.recipes import parse_policy
from jackpots_jax.io.files import read_json, write_json, write_text

# A jackpot "performs as well as the dense model" within this many accuracy points.
CLAIM1_TOLERANCE = 0.01
# The paper's claim 2: the magnitude init is at least this many times cheaper.
PAPER_RATIO = 3.0


# ---------------------------------------------------------------------------------------------
# Statistics.


def stat(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation, min, max and count of `values` (NaN-free)."""
    v = [float(x) for x in values]
    if not v:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "mean": float(np.mean(v)),
        "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
        "min": min(v),
        "max": max(v),
        "n": len(v),
        "values": v,
    }


def beyond_spread(s: Mapping[str, Any]) -> bool:
    """Whether a paired difference's mean is more than two standard errors from zero."""
    if not s["n"] or s["n"] < 2:
        return False
    return abs(s["mean"]) > 2 * s["std"] / math.sqrt(s["n"])


# ---------------------------------------------------------------------------------------------
# From cells to results.


def _by_seed(cells: Sequence[Mapping], seeds: Sequence[int]) -> dict[int, Mapping]:
    out = {}
    for c in cells:
        seed = c["identity"].get("seed")
        if seed in seeds:
            out[seed] = c
    return {s: out[s] for s in seeds if s in out}


def _searches(cells, seeds, every: int = 0, **recipe) -> dict[int, Mapping]:
    """The search cells of `recipe` by seed, evaluated every `every` steps (0: at epochs' ends)."""

    def matches(c):
        if c["identity"]["kind"] != "search":
            return False
        if c["identity"].get("eval_every_steps", 0) != every:
            return False
        r = c["identity"]["recipe"]
        return all(r.get(k) == v for k, v in recipe.items())

    return _by_seed([c for c in cells if matches(c)], seeds)


def _rate(schedule: str, value: float = 1.0, power: float = 1.0) -> dict:
    return {"schedule": schedule, "value": value, "power": power}


def _layers(runs: Mapping[int, Mapping], groups: Mapping[str, Mapping[str, str]]) -> dict:
    """Per layer and per group: weights, kept, sparsity, IoU with the magnitude mask over seeds."""
    if not runs:
        return {}
    first = next(iter(runs.values()))
    names = [n for n, r in first["sparsity"]["layers"].items() if r["masked"]]

    def rows(members: Mapping[str, list[str]]) -> list[dict]:
        out = []
        for group, layers in members.items():
            size = sum(first["sparsity"]["layers"][n]["size"] for n in layers)
            kept = sum(first["sparsity"]["layers"][n]["kept"] for n in layers)
            ious, shares = [], []
            for run in runs.values():
                o = run["overlap_magnitude"]["layers"]
                inter = sum(o[n]["intersection"] for n in layers)
                a = sum(o[n]["a_kept"] for n in layers)
                b = sum(o[n]["b_kept"] for n in layers)
                ious.append(inter / (a + b - inter) if a + b - inter else 1.0)
                shares.append(inter / b if b else 1.0)
            out.append(
                {
                    "group": group,
                    "layers": len(layers),
                    "weights": size,
                    "kept": kept,
                    "sparsity": (size - kept) / size if size else 0.0,
                    "iou_magnitude": stat(ious),
                    "magnitude_kept_share": stat(shares),
                }
            )
        return out

    grouped = {"layer": rows({n: [n] for n in names})}
    for grouping, assignment in groups.items():
        members: dict[str, list[str]] = {}
        for n in names:
            members.setdefault(assignment.get(n, "other"), []).append(n)
        grouped[grouping] = rows(members)
    return grouped


def _claim1(plan, cells, dense, groups) -> dict:
    seeds, c = plan["seeds"], plan["claim1"]
    rows, per_layer = [], []
    dense_acc = dense["eval"]["accuracy"]
    for s in c["sparsities"]:
        prune = _by_seed(
            [
                x
                for x in cells
                if x["identity"]["kind"] == "prune"
                and x["identity"]["sparsity"] == s
                and x["identity"]["rule"] == c["rule"]
            ],
            seeds,
        )
        runs = _searches(
            cells,
            seeds,
            sparsity=s,
            rule=c["rule"],
            init="magnitude",
            epochs=c["epochs"],
            rate=_rate("constant"),
            policy="rate",
        )
        jackpot = [r["eval"]["accuracy"] for r in runs.values()]
        rows.append(
            {
                "sparsity": s,
                "sparsity_all_kernels": stat(
                    [r["sparsity"]["prunable"]["sparsity"] for r in runs.values()]
                ),
                "magnitude": stat([p["eval"]["accuracy"] for p in prune.values()]),
                "magnitude_bn": stat([p["eval_bn"]["accuracy"] for p in prune.values()]),
                "jackpot": stat(jackpot),
                "jackpot_top5": stat([r["eval"]["top5_accuracy"] for r in runs.values()]),
                "jackpot_minus_dense": stat([a - dense_acc for a in jackpot]),
                "jackpot_minus_magnitude_bn": stat(
                    [
                        runs[k]["eval"]["accuracy"] - prune[k]["eval_bn"]["accuracy"]
                        for k in runs
                        if k in prune
                    ]
                ),
                "seconds": stat([r["seconds"] for r in runs.values()]),
            }
        )
        per_layer.append({"sparsity": s, "groups": _layers(runs, groups)})
    return {
        "epochs": c["epochs"],
        "rule": c["rule"],
        "tolerance": CLAIM1_TOLERANCE,
        "dense": stat([dense_acc]),
        "rows": rows,
        "per_layer": per_layer,
    }


def _points(run: Mapping) -> list[tuple[int, float]]:
    """(step, test accuracy) of every evaluation of a search cell, in order of steps.

    Cells written before `curve_steps` existed hold their epochs' ends only.
    """
    spe = run["steps_per_epoch"]
    points = run.get("curve_steps") or [
        {"step": p["epoch"] * spe, "accuracy": p["accuracy"]} for p in run["curve"]
    ]
    return sorted((int(p["step"]), float(p["accuracy"])) for p in points)


def _steps_to(run: Mapping, target: float, *, sustained: bool = False) -> int | None:
    """The first evaluated step whose test accuracy reaches `target` (None: never).

    With `sustained`, the first evaluated step from which every later evaluation, to the end of
    the run, stays at or above `target` (None when the last one is below it): one evaluation
    that touches the target and falls back does not count.
    """
    points = _points(run)
    if not sustained:
        return next((step for step, accuracy in points if accuracy >= target), None)
    found = None
    for step, accuracy in reversed(points):
        if accuracy < target:
            break
        found = step
    return found


def _costs(reached: Mapping, base: Mapping, spe: Mapping, epochs: int) -> dict:
    """Steps and epochs to a target per seed, and the ratios to the magnitude init's (`base`).

    A seed that never reaches the target bounds its ratio from below by `epochs * spe / base`.
    """
    ratios, bounds = [], []
    for k, steps in reached.items():
        if base.get(k) is None:
            continue
        if steps is None:  # not reached within the cap: the ratio is above cap / base
            bounds.append(epochs * spe[k] / base[k])
        else:
            ratios.append(steps / base[k])
    return {
        "epochs_to_target": {
            "per_seed": {str(k): None if v is None else v / spe[k] for k, v in reached.items()},
            "steps_per_seed": {str(k): v for k, v in reached.items()},
            "reached": sum(v is not None for v in reached.values()),
            "of": len(reached),
            "epochs": stat([v / spe[k] for k, v in reached.items() if v is not None]),
            "steps": stat([v for v in reached.values() if v is not None]),
        },
        "ratio": stat(ratios),
        "ratio_lower_bounds": stat(bounds),
    }


def _claim2(plan, cells) -> dict:
    seeds, c = plan["seeds"], plan["claim2"]
    every = c.get("eval_every_steps", 0)
    out = []
    for s in c["sparsities"]:
        per_init = {}
        for spec in c["inits"]:
            init, _, rule = spec.partition("/")
            runs = _searches(
                cells,
                seeds,
                every=every,
                sparsity=s,
                rule=rule,
                init=init,
                epochs=c["epochs"],
                rate=_rate("constant"),
                policy="rate",
            )
            per_init[spec] = runs
        magnitude = per_init.get("magnitude/global_magnitude", {})
        if not magnitude:
            continue
        epochs = c["epochs"]
        # The best mean accuracy at an epoch's end: the target does not depend on how often the
        # searches were evaluated within an epoch.
        mean_curve = [
            float(np.mean([r["curve"][e]["accuracy"] for r in magnitude.values()]))
            for e in range(epochs)
        ]
        best = max(mean_curve)
        target = c["target"] * best
        mag_steps = {k: _steps_to(r, target) for k, r in magnitude.items()}
        mag_held = {k: _steps_to(r, target, sustained=True) for k, r in magnitude.items()}
        inits = []
        for spec, runs in per_init.items():
            spe = {k: r["steps_per_epoch"] for k, r in runs.items()}
            first_touch = _costs(
                {k: _steps_to(r, target) for k, r in runs.items()}, mag_steps, spe, epochs
            )
            held = {k: _steps_to(r, target, sustained=True) for k, r in runs.items()}
            # The mean curve over the steps every seed was evaluated at.
            points = {k: dict(_points(r)) for k, r in runs.items()}  # {seed: {step: accuracy}}
            grid = sorted(set.intersection(*(set(p) for p in points.values())))
            first = next(iter(runs.values()))
            inits.append(
                {
                    "init": spec,
                    "rank_by": "abs" if spec.startswith("kaiming") else "score",
                    "final": stat([r["eval"]["accuracy"] for r in runs.values()]),
                    "curve": [
                        {
                            "step": step,
                            "epoch": step / first["steps_per_epoch"],
                            "accuracy": stat([p[step] for p in points.values()]),
                        }
                        for step in grid
                    ],
                    **first_touch,
                    # From the evaluation after which the accuracy stays at or above the target.
                    "sustained": _costs(held, mag_held, spe, epochs),
                    "churn_first_epoch": stat([r["churn"][0]["churn"] for r in runs.values()]),
                    "churn_last_epoch": stat([r["churn"][-1]["churn"] for r in runs.values()]),
                    "score_scale_initial": stat([r["score_scale"][0] for r in runs.values()]),
                    "score_scale_final": stat([r["score_scale"][1] for r in runs.values()]),
                    "bn_after_minus_final": stat(
                        [
                            r["eval_bn_after"]["accuracy"] - r["eval"]["accuracy"]
                            for r in runs.values()
                        ]
                    ),
                }
            )
        out.append(
            {
                "sparsity": s,
                "best_magnitude": best,
                "target": target,
                "inits": inits,
            }
        )
    return {
        "epochs": c["epochs"],
        "eval_every_steps": every,
        "target_share": c["target"],
        "paper_ratio": PAPER_RATIO,
        "sparsities": out,
    }


def _overlap(plan, cells) -> dict:
    seeds, c = plan["seeds"], plan["overlap"]
    out = []
    for s in c["sparsities"]:
        runs = _by_seed(
            [
                x
                for x in cells
                if x["identity"]["kind"] == "overlap" and x["identity"]["sparsity"] == s
            ],
            seeds,
        )
        if not runs:
            continue
        criteria = []
        for name in c["criteria"]:
            if not all(name in r["criteria"] for r in runs.values()):
                continue
            per = [r["criteria"][name] for r in runs.values()]
            layers = list(per[0]["layers"])
            criteria.append(
                {
                    "criterion": name,
                    "iou": stat([p["total"]["iou"] for p in per]),
                    "layers": {n: stat([p["layers"][n]["iou"] for p in per]) for n in layers},
                }
            )
        out.append(
            {
                "sparsity": s,
                "chance_iou": stat([r["chance_iou"] for r in runs.values()]),
                "criteria": criteria,
            }
        )
    return {"criteria": list(c["criteria"]), "batches": c["batches"], "sparsities": out}


def _claim3(plan, cells) -> dict:
    seeds, c = plan["seeds"], plan["claim3"]
    policies = []
    runs_of = {}
    init, _, rule = c.get("init", f"magnitude/{plan['claim1']['rule']}").partition("/")
    for spec in c["policies"]:
        rate, policy = parse_policy(spec)
        runs_of[spec] = _searches(
            cells,
            seeds,
            sparsity=c["sparsity"],
            rule=rule,
            init=init,
            epochs=c["epochs"],
            rate=_rate(rate.schedule, rate.value, rate.power),
            policy=policy,
        )
    reference = runs_of.get("constant:1") or runs_of.get("constant:1.0") or {}
    for spec, runs in runs_of.items():
        if not runs:
            continue
        epochs = c["epochs"]
        paired = [k for k in runs if k in reference]
        policies.append(
            {
                "policy": spec,
                "final": stat([r["eval"]["accuracy"] for r in runs.values()]),
                "oscillation": stat([r["steps"]["oscillation"] for r in runs.values()]),
                "churn_per_step": stat([r["steps"]["churn_per_step"] for r in runs.values()]),
                "final_minus_rate1": stat(
                    [runs[k]["eval"]["accuracy"] - reference[k]["eval"]["accuracy"] for k in paired]
                ),
                "oscillation_minus_rate1": stat(
                    [
                        runs[k]["steps"]["oscillation"] - reference[k]["steps"]["oscillation"]
                        for k in paired
                    ]
                ),
                "per_epoch": [
                    {
                        "epoch": e + 1,
                        "accuracy": stat([r["curve"][e]["accuracy"] for r in runs.values()]),
                        "oscillation": stat(
                            [r["steps"]["per_epoch"][e]["oscillation"] for r in runs.values()]
                        ),
                        "churn_per_step": stat(
                            [r["steps"]["per_epoch"][e]["churn_per_step"] for r in runs.values()]
                        ),
                    }
                    for e in range(epochs)
                ],
            }
        )
    return {
        "init": f"{init}/{rule}",
        "sparsity": c["sparsity"],
        "epochs": c["epochs"],
        "window": c["window"],
        "reference": "constant:1",
        "policies": policies,
    }


def _finetune(plan, cells) -> dict:
    seeds, c = plan["seeds"], plan["finetune"]
    rows = []
    for s in c["sparsities"]:
        runs = _by_seed(
            [
                x
                for x in cells
                if x["identity"]["kind"] == "finetune" and x["identity"]["sparsity"] == s
            ],
            seeds,
        )
        if not runs:
            continue
        rows.append(
            {
                "sparsity": s,
                "jackpot": stat([r["jackpot"]["accuracy"] for r in runs.values()]),
                "finetuned": stat([r["eval"]["accuracy"] for r in runs.values()]),
                "gain": stat(
                    [r["eval"]["accuracy"] - r["jackpot"]["accuracy"] for r in runs.values()]
                ),
                "pruned_weights_zero": all(r["pruned_weights_zero"] for r in runs.values()),
            }
        )
    return {**{k: v for k, v in c.items() if k != "sparsities"}, "rows": rows}


def assemble(
    plan: Mapping[str, Any],
    cells: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    groups: Mapping[str, Mapping[str, str]],
) -> dict[str, Any]:
    """The studies' results document from the cells' results (see the module docstring).

    Args:
      plan: `dataclasses.asdict(studies.Plan)`.
      cells: every cell's `result.json` (in any order; each cell once).
      meta: model, dataset, seeds, recipe, machine, wall time, command.
      groups: `{grouping: {layer: group}}` of the masked layers (`models.spec.layer_groups`).
    """
    unique = {(c["label"], str(c["identity"])): c for c in cells}
    cells = list(unique.values())
    dense = next(c for c in cells if c["identity"]["kind"] == "dense")
    results: dict[str, Any] = {
        "meta": {
            **meta,
            "test_images": dense["eval"]["count"],
            "n_seeds": len(plan["seeds"]),
            "cells": len(cells),
            "cell_seconds": sum(c["seconds"] for c in cells),
            "load_average": stat([c["load_average"][1] for c in cells]),
        },
        "run": list(plan["run"]),
    }
    if "claim1" in plan["run"]:
        results["claim1"] = _claim1(plan, cells, dense, groups)
    if "claim2" in plan["run"]:
        results["claim2"] = _claim2(plan, cells)
    if "overlap" in plan["run"]:
        results["overlap"] = _overlap(plan, cells)
    if "claim3" in plan["run"]:
        results["claim3"] = _claim3(plan, cells)
    if "finetune" in plan["run"]:
        results["finetune"] = _finetune(plan, cells)
    results["conclusions"] = conclusions(results)
    return results


# ---------------------------------------------------------------------------------------------
# Numbers as text. Every number the report prints goes through one of these, from results.json.


def pct(x: float | None) -> str:
    """A fraction as a percentage with two decimals (`0.9219` -> `92.19`)."""
    return "n/a" if x is None else f"{100 * x:.2f}"


# The number of seeds planned: a statistic over fewer (a study cut short) says how many.
_planned_seeds = 0


def _n(s: Mapping[str, Any]) -> str:
    return f" (n = {s['n']})" if s["n"] < _planned_seeds else ""


def pm(s: Mapping[str, Any], fmt=pct) -> str:
    """`mean ± std` of a statistic (`n/a` without values; the count when seeds are missing)."""
    if not s or not s["n"]:
        return "n/a"
    return f"{fmt(s['mean'])} ± {fmt(s['std'])}{_n(s)}"


def points(s: Mapping[str, Any]) -> str:
    """A paired accuracy difference in points, signed, with its spread."""
    if not s or not s["n"]:
        return "n/a"
    return f"{100 * s['mean']:+.2f} ± {100 * s['std']:.2f}{_n(s)}"


def num(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def sparsity_label(s: float) -> str:
    return f"{100 * s:g}%"


def _spread_word(s: Mapping[str, Any]) -> str:
    return "beyond the seeds' spread" if beyond_spread(s) else "within the seeds' spread"


# ---------------------------------------------------------------------------------------------
# Conclusions, written from the numbers.


def _claim1_text(c: Mapping) -> str:
    tol = c["tolerance"]
    dense = c["dense"]["mean"]
    rows = [r for r in c["rows"] if r["jackpot"]["n"]]
    if not rows:
        return "No claim-1 search finished."
    holds = [r for r in rows if r["jackpot_minus_dense"]["mean"] >= -tol]
    fails = [r for r in rows if r["jackpot_minus_dense"]["mean"] < -tol]
    parts = []
    if holds:
        parts.append(
            f"At {', '.join(sparsity_label(r['sparsity']) for r in holds)} sparsity the jackpot "
            f"is within {100 * tol:.0f} point of the dense model's {pct(dense)}% "
            f"({'; '.join(points(r['jackpot_minus_dense']) for r in holds)} points): claim 1 "
            "holds there."
        )
    if fails:
        parts.append(
            f"At {', '.join(sparsity_label(r['sparsity']) for r in fails)} it does not: the "
            f"jackpot is {'; '.join(points(r['jackpot_minus_dense']) for r in fails)} points "
            "from the dense model."
        )
    gains = [r["jackpot_minus_magnitude_bn"] for r in rows if r["jackpot_minus_magnitude_bn"]["n"]]
    if gains:
        lo = min(gains, key=lambda s: s["mean"])
        hi = max(gains, key=lambda s: s["mean"])
        parts.append(
            f"The search adds {points(lo)} to {points(hi)} points to one-shot magnitude pruning "
            "with re-estimated batch norm (the same budget, weights unchanged in both)."
        )
    return " ".join(parts)


def _claim2_text(c: Mapping) -> str:
    first = _claim2_costs_text(c, lambda init: init, "reaches the target")
    held = _claim2_costs_text(
        c, lambda init: init.get("sustained"), "is at or above the target for good"
    )
    if not held:
        return first
    return (
        first + " Counting instead from the evaluation after which the accuracy stays at or "
        "above the target to the end of the run (one evaluation that touches the target and "
        "falls back does not count): " + held
    )


def _ratio_verdict(costs: Mapping, paper: float) -> str | None:
    # A seed that never reached the target bounds the ratio from below only: it decides the
    # claim only where that bound is already the paper's ratio.
    measured, bounds = costs["ratio"]["values"], costs["ratio_lower_bounds"]["values"]
    if any(r < paper for r in measured):
        return "not"
    if measured + bounds and all(r >= paper for r in measured + bounds):
        return "holds"
    return "open" if bounds else None


def _claim2_costs_text(c: Mapping, costs_of, reach: str) -> str:
    """The claim-2 conclusion from one way of counting the cost (`costs_of(init)`)."""
    parts = []
    verdicts = []
    for block in c["sparsities"]:
        s = sparsity_label(block["sparsity"])
        mag = next(i for i in block["inits"] if i["init"] == "magnitude/global_magnitude")
        if costs_of(mag) is None:
            return ""  # results written before this way of counting existed
        m = costs_of(mag)["epochs_to_target"]
        line = [
            f"At {s}, the magnitude init {reach} ({pct(block['target'])}%, "
            f"{100 * c['target_share']:.0f}% of its best mean accuracy) after "
            + (
                f"{pm(m['epochs'], num)} epochs ({pm(m['steps'], num0)} steps)"
                + (f" in {m['reached']} of {m['of']} seeds" if m["reached"] < m["of"] else "")
                if m["reached"]
                else "no evaluation in any seed"
            )
            + "."
        ]
        for init in block["inits"]:
            if init is mag:
                continue
            costs = costs_of(init)
            e = costs["epochs_to_target"]
            text = f"{init['init']}:"
            if costs["ratio"]["n"]:
                text += (
                    f" {pm(costs['ratio'], num)} times the magnitude init's epochs "
                    f"({costs['ratio']['n']} of {e['of']} seeds reached it)"
                )
            if costs["ratio_lower_bounds"]["n"]:
                text += (
                    f"{';' if costs['ratio']['n'] else ''} not reached in {c['epochs']} epochs "
                    f"in {costs['ratio_lower_bounds']['n']} of {e['of']} seeds (ratio above "
                    f"{num(costs['ratio_lower_bounds']['min'])})"
                )
            line.append(text + f"; final accuracy {pm(init['final'])}%.")
            verdicts.append((init["init"], s, _ratio_verdict(costs, c["paper_ratio"])))
        parts.append(" ".join(line))
    paper = f"'at least {c['paper_ratio']:.0f}x cheaper'"

    def which(kind):
        return ", ".join(f"{i} at {s}" for i, s, v in verdicts if v == kind)

    if which("not"):
        parts.append(f"The paper's {paper} does not hold here against {which('not')}.")
    if which("holds"):
        parts.append(f"It holds against {which('holds')}.")
    if which("open"):
        parts.append(
            f"Against {which('open')} the search did not reach the target within its "
            f"{c['epochs']} epochs in some seed, so the ratio there is only bounded from below: "
            f"these runs neither confirm nor refute {paper} (longer searches would decide it)."
        )
    return " ".join(parts)


def _overlap_text(c: Mapping) -> str:
    parts = []
    for block in c["sparsities"]:
        ranked = sorted(block["criteria"], key=lambda x: -x["iou"]["mean"])
        if not ranked:
            continue
        order = ", ".join(f"{x['criterion']} {pm(x['iou'], num3)}" for x in ranked)
        top = ranked[0]["criterion"]
        verdict = (
            "magnitude pruning's mask is the closest to the jackpot, as the paper observes"
            if top == "magnitude"
            else f"{top}'s mask is the closest, not magnitude pruning's"
        )
        parts.append(
            f"At {sparsity_label(block['sparsity'])}, IoU with the jackpot: {order} (chance "
            f"{num3(block['chance_iou']['mean'])}): {verdict}."
        )
    return " ".join(parts)


def num3(x: float | None) -> str:
    return num(x, 3)


def _claim3_text(c: Mapping) -> str:
    ref = next((p for p in c["policies"] if p["policy"] == c["reference"]), None)
    if ref is None:
        return "The rate-1 reference did not run."
    parts = [
        f"Rate 1 (every proposed swap made) flips {pm(ref['churn_per_step'], num1)} mask entries "
        f"per step, with loss oscillation {pm(ref['oscillation'], num4)} and final accuracy "
        f"{pm(ref['final'])}%."
    ]
    calmer = []
    for p in c["policies"]:
        if p is ref:
            continue
        d_osc, d_acc = p["oscillation_minus_rate1"], p["final_minus_rate1"]
        parts.append(
            f"{p['policy']}: {pm(p['churn_per_step'], num1)} flips per step, oscillation "
            f"{pm(p['oscillation'], num4)} ({_signed(d_osc, num4)}, {_spread_word(d_osc)}), "
            f"final accuracy {points(d_acc)} points against rate 1 ({_spread_word(d_acc)})."
        )
        if d_osc["n"] and d_osc["mean"] < 0 and beyond_spread(d_osc):
            worse = d_acc["n"] and d_acc["mean"] < 0 and beyond_spread(d_acc)
            calmer.append((p["policy"], not worse))
    if calmer and any(ok for _, ok in calmer):
        names = ", ".join(n for n, ok in calmer if ok)
        parts.append(
            f"Restricting the swaps ({names}) lowers the loss oscillation without a loss of "
            "final accuracy beyond the seeds' spread: claim 3's smoother search is reproduced."
        )
    else:
        parts.append(
            "No restriction lowers the loss oscillation beyond the seeds' spread without "
            "costing accuracy: claim 3 is not reproduced at this scale."
        )
    return " ".join(parts)


def num0(x):
    return num(x, 0)


def num1(x):
    return num(x, 1)


def num4(x):
    return num(x, 4)


def _signed(s: Mapping[str, Any], fmt) -> str:
    if not s["n"]:
        return "n/a"
    sign = "-" if s["mean"] < 0 else "+"
    return f"{sign}{fmt(abs(s['mean']))} ± {fmt(s['std'])} against rate 1"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _finetune_text(c: Mapping) -> str:
    parts = []
    for r in c["rows"]:
        parts.append(
            f"At {sparsity_label(r['sparsity'])}, {_count(c['epochs'], 'epoch')} of training the "
            f"kept weights change the accuracy by {points(r['gain'])} points "
            f"({pm(r['jackpot'])}% -> {pm(r['finetuned'])}%, {_spread_word(r['gain'])})."
        )
    if parts:
        parts.append(
            "The fine-tuned network is no longer a sub-network of the pre-trained weights."
        )
    return " ".join(parts)


def conclusions(results: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    if "claim1" in results:
        out["claim1"] = _claim1_text(results["claim1"])
    if "claim2" in results:
        out["claim2"] = _claim2_text(results["claim2"])
    if "overlap" in results:
        out["overlap"] = _overlap_text(results["overlap"])
    if "claim3" in results:
        out["claim3"] = _claim3_text(results["claim3"])
    if "finetune" in results:
        out["finetune"] = _finetune_text(results["finetune"])
    return out


# ---------------------------------------------------------------------------------------------
# The report: Markdown from results.json alone.

PLOTS = {
    "claim1": "plots/claim1_accuracy_vs_sparsity.png",
    "claim2": "plots/claim2_curves.png",
    "overlap": "plots/overlap_heatmap.png",
    "claim3": "plots/claim3_restriction.png",
}


def _seeds_text(meta: Mapping) -> str:
    return f"{meta['n_seeds']} seeds ({', '.join(str(s) for s in meta['seeds'])})"


def _intro(r: Mapping) -> str:
    m = r["meta"]
    s = m["search"]
    return "\n\n".join(
        [
            f"Model `{m['model']}` pre-trained dense on `{m['dataset']}` "
            f"({m['pretrain_epochs']} epochs, one model for every study); every search keeps its "
            "weights frozen and trains only the scores.",
            f"**What every number is over.** Accuracy is top-1 on all {m['test_images']:,} test "
            "images, after the last epoch of each run (no epoch is chosen by its test accuracy). "
            f"`mean ± std` is over {_seeds_text(m)}: a seed sets the order of the search's "
            "batches, its initial scores where they are random (`kaiming`, `random`), the batches "
            "of batch-norm re-estimation, of the pruning criteria and of fine-tuning; the "
            "pre-trained model is the same. `std` is the sample standard deviation (n - 1). A "
            "paired difference (per seed) is called beyond the seeds' spread when its mean is "
            "more than two standard errors from zero.",
            f"Search recipe (every study): SGD, learning rate {s['learning_rate']} with cosine "
            f"decay to 0, momentum {s['momentum']}, weight decay {s['weight_decay']} on the "
            f"scores, batch {s['batch_size']}, magnitude-init gap {s['gap']}, masks refreshed "
            "after every step; batch-norm statistics re-estimated during the search. Sparsity is "
            "over the masked layers (the classifier is held dense).",
        ]
    )


def _claim1_md(c: Mapping, meta: Mapping) -> str:
    rows = [
        [
            sparsity_label(r["sparsity"]),
            pct(c["dense"]["mean"]),
            pm(r["magnitude"]),
            pm(r["magnitude_bn"]),
            f"**{pm(r['jackpot'])}**",
            points(r["jackpot_minus_dense"]),
            pm(r["jackpot_top5"]),
            pm(r["sparsity_all_kernels"]),
        ]
        for r in c["rows"]
    ]
    table = report.markdown_table(
        [
            "sparsity (masked layers)",
            "dense",
            "magnitude, no re-estimation",
            "magnitude + BN re-estimation",
            "jackpot (search)",
            "jackpot - dense (points)",
            "jackpot top-5",
            "sparsity (all kernels)",
        ],
        rows,
    )
    text = [
        "## Claim 1: jackpots exist",
        f"Top-1 accuracy (%), mean ± std over {_seeds_text(meta)}. Magnitude pruning keeps the "
        f"largest weights at the `{c['rule']}` budget, once, without search; its batch-norm "
        f"statistics are the pre-trained ones or re-estimated on {meta['bn_batches']} training "
        "batches. The jackpot is searched from the magnitude init for "
        f"{c['epochs']} epochs. Without re-estimation the result is the same for every seed.",
        table,
        f"![accuracy against sparsity]({PLOTS['claim1']})",
    ]
    blocks = [b for b in c["per_layer"] if b["groups"]]
    # A fixed order: results.json stores its keys sorted, and the report is rendered from it.
    groupings = [g for g in blocks[0]["groups"] if g != "layer"] if blocks else []
    for grouping in ["layer", *sorted(groupings)] if blocks else ():
        first = blocks[0]["groups"][grouping]
        if grouping != "layer" and len(first) < 2:
            continue
        text.append(
            f"Per {grouping}: the jackpot's sparsity (%) / the IoU of its kept weights with the "
            "magnitude mask's (mean over seeds; the budget is the same for every seed) at each "
            "sparsity of the masked layers:"
        )
        rows = []
        for i, x in enumerate(first):
            row = [x["group"], f"{x['weights']:,}"]
            for b in blocks:
                g = b["groups"][grouping][i]
                row.append(f"{pct(g['sparsity'])} / {num3(g['iou_magnitude']['mean'])}")
            rows.append(row)
        header = [grouping, "weights", *(sparsity_label(b["sparsity"]) for b in blocks)]
        text.append(report.markdown_table(header, rows))
    return "\n\n".join(text)


def _claim2_md(c: Mapping, meta: Mapping) -> str:
    text = [
        "## Claim 2: the magnitude init is at least 3x cheaper",
        "Every init runs the same optimiser for the same "
        f"{c['epochs']} epochs (its cosine schedule spans them). `kaiming` is edge-popup's init: "
        "Kaiming-uniform scores ranked by |score|, with the chain rule through the absolute "
        "value (see below), at its own budget rule (`uniform`, as edge-popup, and `erk`); "
        "`random` draws uniform scores at the magnitude init's budget. The target is "
        f"{100 * c['target_share']:.0f}% of the best mean test accuracy of the magnitude init "
        "at the end of an epoch; 'epochs to target' is the steps searched, in epochs, at the "
        "first evaluation whose test accuracy reaches it ("
        + (
            f"evaluated every {c['eval_every_steps']} steps and at each epoch's end"
            if c.get("eval_every_steps")
            else "evaluated at each epoch's end"
        )
        + "), per seed, and the ratio (of steps, the same as of epochs) is taken per seed against "
        "the magnitude init of that seed; where an init does not reach the target within its "
        f"{c['epochs']} epochs, the ratio is only bounded from below.",
    ]

    def cost_rows(block, costs_of):
        rows = []
        for init in block["inits"]:
            costs = costs_of(init)
            e = costs["epochs_to_target"]
            per_seed = ", ".join("-" if v is None else num(v) for v in e["per_seed"].values())
            ratio = pm(costs["ratio"], num) if costs["ratio"]["n"] else "-"
            if costs["ratio_lower_bounds"]["n"]:
                ratio += f" (> {num(costs['ratio_lower_bounds']['min'])} where not reached)"
            rows.append(
                [
                    f"`{init['init']}`",
                    pm(init["final"]),
                    per_seed,
                    f"{e['reached']} of {e['of']}",
                    pm(e["epochs"], num),
                    pm(e["steps"], num0),
                    ratio,
                ]
            )
        return rows

    header = [
        "init / budget rule",
        "final accuracy",
        "epochs to target, per seed",
        "seeds reaching it",
        "epochs to target",
        "steps to target",
        "ratio to magnitude init",
    ]
    for block in c["sparsities"]:
        text.append(
            f"At {sparsity_label(block['sparsity'])}: target {pct(block['target'])}% "
            f"(best magnitude-init mean {pct(block['best_magnitude'])}%)."
        )
        text.append(report.markdown_table(header, cost_rows(block, lambda init: init)))
        if all("sustained" in init for init in block["inits"]):
            text.append(
                "The same, counted from the evaluation after which the test accuracy stays at "
                "or above the target to the end of the run (a seed whose last evaluation is "
                "below it has not reached it):"
            )
            held = cost_rows(block, lambda init: init["sustained"])
            text.append(report.markdown_table(header, held))
    text.append(f"![accuracy against search epochs]({PLOTS['claim2']})")
    text.append(
        "**Fairness of the edge-popup baseline.** With scores ranked by |score| the "
        "straight-through gradient `g * w` is the gradient with respect to |S|; the search "
        "multiplies it by `sign(S)` before the optimizer (`abs_rank_gradients`), as edge-popup's "
        "code does through `scores.abs()`, so no negative score moves the wrong way. Two other "
        "things that could handicap a baseline are measured below for every init: stale "
        "batch-norm statistics under a churning mask (the accuracy after "
        "re-estimating the statistics once more after the search, against the final one), and "
        "the scale of the scores against the learning rate (the mean |score| at the start and "
        "the end, and the mask entries flipped in the first and last epoch). The budget rule "
        "matters as much as the init: compare `magnitude/uniform` with `kaiming/uniform` for "
        "the init alone."
    )
    for block in c["sparsities"]:
        rows = [
            [
                f"`{init['init']}`",
                pm(init["score_scale_initial"], num4),
                pm(init["score_scale_final"], num4),
                pm(init["churn_first_epoch"], num0),
                pm(init["churn_last_epoch"], num0),
                points(init["bn_after_minus_final"]),
            ]
            for init in block["inits"]
        ]
        text.append(f"Fairness checks at {sparsity_label(block['sparsity'])}:")
        text.append(
            report.markdown_table(
                [
                    "init / budget rule",
                    "mean abs(score), start",
                    "mean abs(score), end",
                    "flips, first epoch",
                    "flips, last epoch",
                    "BN re-estimated after the search (points)",
                ],
                rows,
            )
        )
    return "\n\n".join(text)


def _overlap_md(c: Mapping, meta: Mapping) -> str:
    text = [
        "## Overlap of pruning criteria with the jackpot",
        "Each criterion's mask keeps, in every layer, as many weights as the claim-1 jackpot of "
        "the same seed, chosen by its own score: `magnitude` |w|, `random` uniform, `snip` "
        f"|g * w| (loss gradient summed over {c['batches']} training batches), `wanda` "
        f"|w| * ||x|| (input-channel activation norms over {c['batches']} batches; ranked within "
        "the layer, not per output). Intersection over union of the kept weights with the "
        f"jackpot's, mean ± std over {_seeds_text(meta)}; chance is the expected IoU of random "
        "masks at these per-layer counts.",
    ]
    for block in c["sparsities"]:
        layers = list(block["criteria"][0]["layers"]) if block["criteria"] else []
        rows = [
            [f"`{x['criterion']}`", pm(x["iou"], num3)]
            + [num3(x["layers"][n]["mean"]) for n in layers]
            for x in block["criteria"]
        ]
        text.append(
            f"At {sparsity_label(block['sparsity'])} (chance {num3(block['chance_iou']['mean'])}; "
            "per-layer columns: means):"
        )
        text.append(report.markdown_table(["criterion", "IoU, all masked layers", *layers], rows))
    text.append(f"![IoU with the jackpot per layer]({PLOTS['overlap']})")
    return "\n\n".join(text)


def _claim3_md(c: Mapping, meta: Mapping) -> str:
    rows = [
        [
            f"`{p['policy']}`",
            pm(p["final"]),
            points(p["final_minus_rate1"]),
            pm(p["oscillation"], num4),
            pm(p["churn_per_step"], num1),
        ]
        for p in c["policies"]
    ]
    return "\n\n".join(
        [
            "## Claim 3: short restriction",
            f"Init `{c.get('init', 'magnitude/global_magnitude')}` at "
            f"{sparsity_label(c['sparsity'])}, {c['epochs']} epochs, the same "
            "recipe; only the restriction differs. `constant:r` makes a share r of the swaps the "
            "top-k proposes at every step; `cosine` and `polynomial:q` decay that share from 1 to "
            "0 over the search; `first_order` proposes every swap (rate 1) and makes a swap "
            "(revival i, removal j) only where `g_i w_i - g_j w_j < 0`, its first-order loss "
            "change (`restriction.first_order_check`). Oscillation: the standard deviation of "
            f"the step-to-step change of the training loss within windows of {c['window']} "
            "steps, averaged over the windows (the batches are the same for every policy of a "
            "seed). Churn: mask entries flipped per step (a swap flips two).",
            report.markdown_table(
                [
                    "policy",
                    "final accuracy",
                    "against rate 1 (points)",
                    "loss oscillation",
                    "flips per step",
                ],
                rows,
            ),
            f"![restriction policies]({PLOTS['claim3']})",
        ]
    )


def _finetune_md(c: Mapping, meta: Mapping) -> str:
    rows = [
        [
            sparsity_label(r["sparsity"]),
            pm(r["jackpot"]),
            pm(r["finetuned"]),
            points(r["gain"]),
            "yes" if r["pruned_weights_zero"] else "NO",
        ]
        for r in c["rows"]
    ]
    return "\n\n".join(
        [
            "## Fine-tuning after the search",
            "The claim-1 jackpot's kept weights trained for "
            f"{_count(c['epochs'], 'epoch')} with its mask frozen (the reference code's ImageNet "
            f"'30s10t'): SGD, learning rate {c['learning_rate']} with cosine decay, momentum "
            f"{c['momentum']}, weight decay {c['weight_decay']}. Mean ± std over "
            f"{_seeds_text(meta)}.",
            report.markdown_table(
                ["sparsity", "jackpot", "fine-tuned", "gain (points)", "pruned weights still 0"],
                rows,
            ),
        ]
    )


def _cost_md(r: Mapping) -> str:
    m = r["meta"]
    return "\n\n".join(
        [
            "## Cost",
            f"{m['cells']} cells; {m['cell_seconds'] / 3600:.2f} hours of cell time on "
            f"{m['cpus']} CPU cores, load average {pm(m['load_average'], num1)} at the cells' ends "
            "(the machine may be shared); this invocation took "
            f"{m['wall_seconds'] / 3600:.2f} hours (cells finished earlier are not rerun).",
            f"Command: `{m['command']}`",
        ]
    )


def render(results: Mapping[str, Any]) -> str:
    """The Markdown report of a results document (nothing else is read)."""
    global _planned_seeds
    meta = results["meta"]
    _planned_seeds = meta["n_seeds"]
    sections = [f"# Lottery jackpots: the paper's claims on {meta['model']} / {meta['dataset']}"]
    sections.append(_intro(results))
    missing = meta.get("missing_cells") or []
    if missing:
        sections.append(
            f"**Partial results.** {len(missing)} of {len(missing) + meta['cells']} cells have "
            "not finished (listed in results.json, `meta.missing_cells`); a statistic over fewer "
            "seeds than planned says how many (n). Run the command at the end again to finish "
            "them: finished cells are not rerun."
        )
    names = {
        "claim1": "Claim 1",
        "claim2": "Claim 2",
        "overlap": "Overlap",
        "claim3": "Claim 3",
        "finetune": "Fine-tuning",
    }
    conclusions = results.get("conclusions", {})
    if conclusions:
        sections.append(
            "## Conclusions (written from the numbers below)\n\n"
            + "\n".join(
                f"- **{v}.** {conclusions[k]}" for k, v in names.items() if conclusions.get(k)
            )
        )
    render_fns = {
        "claim1": _claim1_md,
        "claim2": _claim2_md,
        "overlap": _overlap_md,
        "claim3": _claim3_md,
        "finetune": _finetune_md,
    }
    for key, fn in render_fns.items():
        if key in results:
            sections.append(fn(results[key], meta))
    sections.append(_cost_md(results))
    return "\n\n".join(sections) + "\n"


# ---------------------------------------------------------------------------------------------
# Plots.


# The run report's figure and PNG writer (matplotlib loaded only when a plot is drawn).


def _mean_std(stats: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray]:
    mean = np.array([np.nan if s["mean"] is None else 100 * s["mean"] for s in stats])
    std = np.array([np.nan if s["std"] is None else 100 * s["std"] for s in stats])
    return mean, std


def plot_claim1(c: Mapping, path) -> str:
    fig, axes = report.figure(7, 4.5)
    ax = axes[0][0]
    x = [100 * r["sparsity"] for r in c["rows"]]
    ax.axhline(100 * c["dense"]["mean"], color="black", ls="--", label="dense")
    for key, label, colour in (
        ("magnitude", "magnitude pruning", "C7"),
        ("magnitude_bn", "magnitude + BN re-estimation", "C1"),
        ("jackpot", "jackpot (search)", "C0"),
    ):
        mean, std = _mean_std([r[key] for r in c["rows"]])
        ax.errorbar(x, mean, yerr=std, marker="o", ms=4, capsize=3, color=colour, label=label)
    ax.set(xlabel="sparsity of the masked layers (%)", ylabel="test accuracy (%)")
    ax.set_title("claim 1: accuracy against sparsity (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return report.save_figure(fig, path)


def plot_claim2(c: Mapping, path) -> str:
    blocks = c["sparsities"]
    fig, axes = report.figure(6 * max(1, len(blocks)), 4.5, 1, max(1, len(blocks)))
    for ax, block in zip(axes[0], blocks, strict=False):
        for i, init in enumerate(block["inits"]):
            x = [p["epoch"] for p in init["curve"]]
            mean, std = _mean_std([p["accuracy"] for p in init["curve"]])
            ax.plot(x, mean, marker="o", ms=3, color=f"C{i}", label=init["init"])
            ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.2)
        ax.axhline(100 * block["target"], color="black", ls=":", label="target")
        ax.set(xlabel="search epoch", ylabel="test accuracy (%)")
        ax.set_title(f"claim 2 at {sparsity_label(block['sparsity'])} sparsity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return report.save_figure(fig, path)


def plot_overlap(c: Mapping, path) -> str:
    blocks = [b for b in c["sparsities"] if b["criteria"]]
    fig, axes = report.figure(8, 1.2 + 2.2 * max(1, len(blocks)), max(1, len(blocks)), 1)
    for ax, block in zip(axes[:, 0], blocks, strict=False):
        layers = list(block["criteria"][0]["layers"])
        names = [x["criterion"] for x in block["criteria"]]
        grid = np.array(
            [
                [x["layers"][n]["mean"] for n in layers] + [x["iou"]["mean"]]
                for x in block["criteria"]
            ]
        )
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(layers) + 1), [*layers, "all"], rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
        ax.set_title(f"IoU with the jackpot at {sparsity_label(block['sparsity'])} (mean)")
        fig.colorbar(image, ax=ax)
    return report.save_figure(fig, path)


def plot_claim3(c: Mapping, path) -> str:
    fig, axes = report.figure(15, 4.2, 1, 3)
    keys = (
        ("accuracy", "test accuracy (%)", 100.0),
        ("oscillation", "loss oscillation", 1.0),
        ("churn_per_step", "mask flips per step", 1.0),
    )
    for ax, (key, label, scale) in zip(axes[0], keys, strict=True):
        for i, p in enumerate(c["policies"]):
            x = [e["epoch"] for e in p["per_epoch"]]
            mean = np.array([scale * e[key]["mean"] for e in p["per_epoch"]])
            std = np.array([scale * e[key]["std"] for e in p["per_epoch"]])
            ax.plot(x, mean, marker="o", ms=3, color=f"C{i}", label=p["policy"])
            ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.2)
        ax.set(xlabel="search epoch", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="x-small")
    axes[0][1].set_title(f"claim 3 at {sparsity_label(c['sparsity'])} (mean ± std over seeds)")
    return report.save_figure(fig, path)


def write(directory: str | os.PathLike, results: Mapping[str, Any]) -> str:
    """Writes `results.json`, `report.md` and the plots into `directory`; returns the report."""
    directory = Path(directory)
    # The report and plots are drawn from the file as written (keys sorted, floats as JSON holds
    # them), so that `render(read_json(results.json))` is exactly report.md.
    results = read_json(write_json(directory / "results.json", results, "studies results"))
    plotters = {
        "claim1": plot_claim1,
        "claim2": plot_claim2,
        "overlap": plot_overlap,
        "claim3": plot_claim3,
    }
    for key, plot in plotters.items():
        if key in results:
            plot(results[key], directory / PLOTS[key])
    return write_text(directory / "report.md", render(results))
