"""The studies mode: `configs/studies.py:quick` end to end, its resume, and its parts by hand.

The end-to-end test runs the command line on tiny Fashion-MNIST files (the format of the real
ones) and checks the report's structure, that every number in it is one of `results.json`, that
the report is a function of `results.json` alone, and that a study whose cell was lost reruns that
cell only and gets the same numbers. The parts (loss-oscillation statistics, the pruning criteria,
the masked fine-tuning step, the plan's checks) are checked against numpy by hand.
"""

from __future__ import annotations

import json
import math
import os
import re

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from test_main import check_ok, run_main

import jackpots_jax as jj
from jackpots_jax.experiment import criteria, study_report
from jackpots_jax.experiment.config import ConfigError
from jackpots_jax.experiment.context import Devices
from jackpots_jax.experiment.studies import masked_train_step, read_plan, step_statistics

# The command line or another program in a process of its own: `-m 'not e2e'` skips them.
pytestmark = pytest.mark.e2e

# ---------------------------------------------------------------------------------------------
# The quick study end to end.


def _numbers(value, out):
    """Every number inside a JSON value."""
    if isinstance(value, bool) or value is None:
        return out
    if isinstance(value, int | float):
        if math.isfinite(value):
            out.append(float(value))
    elif isinstance(value, dict):
        for v in value.values():
            _numbers(v, out)
    elif isinstance(value, list):
        for v in value:
            _numbers(v, out)
    elif isinstance(value, str):
        # Numbers quoted inside strings (a label, the command, a conclusion) count as the string's
        # own: the conclusions are checked separately.
        pass
    return out


def _printed_forms(values):
    """The ways the report prints a number of results.json: as is, in percent, in hours."""
    forms = set()
    for v in values:
        for x in (abs(v), 100 * abs(v), abs(v) / 3600):
            for digits in range(5):
                forms.add(f"{x:.{digits}f}")
            if float(x).is_integer():
                forms.add(f"{int(x):,}")
                forms.add(str(int(x)))
        forms.add(f"{100 * abs(v):g}")
    return forms


NUMBER = re.compile(r"(?<![\w./-])\d[\d,]*(?:\.\d+)?(?![\w/])")


def _report_numbers(markdown):
    """Numbers in the report's tables and prose; headings, code and plot links left out."""
    found = []
    in_code = False
    for line in markdown.split("\n"):
        if line.startswith("```"):
            in_code = not in_code
        if in_code or line.startswith("#") or line.startswith("!["):
            continue
        line = re.sub(r"`[^`]*`", "", line)  # identifiers (`constant:0.5`, `claim1`) are names
        found += NUMBER.findall(line)
    return found


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory, fmnist_source):
    root = tmp_path_factory.mktemp("studies")
    args = [
        f"--config.dataset.data_dir={root / 'tfds'}",
        f"--config.dataset.source_dir={fmnist_source}",
    ]
    # The cells compile the same steps again and again (and the rerun below once more): they
    # share compiled programs through the tests' compilation cache (set in conftest.py).
    proc = run_main("studies.py:quick", root / "work", *args)
    check_ok(proc)
    return root / "work", args, proc


@pytest.mark.slow
def test_quick_study_report_holds_only_numbers_of_results_json(quick_study):
    workdir, _, proc = quick_study
    studies = workdir / "studies"
    assert "studies report:" in proc.stdout
    results = json.loads((studies / "results.json").read_text())
    markdown = (studies / "report.md").read_text()

    # Structure: every study's section, its table and its plot.
    for heading in (
        "## Conclusions",
        "## Claim 1: jackpots exist",
        "## Claim 2: the magnitude init is at least 3x cheaper",
        "## Overlap of pruning criteria with the jackpot",
        "## Claim 3: short restriction",
        "## Fine-tuning after the search",
        "## Cost",
    ):
        assert heading in markdown, heading
    for plot in study_report.PLOTS.values():
        assert (studies / plot).read_bytes().startswith(b"\x89PNG"), plot
        assert f"]({plot})" in markdown
    assert set(results["conclusions"]) == {"claim1", "claim2", "overlap", "claim3", "finetune"}

    # What the numbers are over: 2 seeds, the 100 test images (num_eval) of every evaluation.
    assert results["meta"]["n_seeds"] == 2 and results["meta"]["test_images"] == 100
    assert "over 2 seeds (0, 1)" in markdown and "all 100 test images" in markdown
    c1 = results["claim1"]
    assert [r["sparsity"] for r in c1["rows"]] == [0.5, 0.9]
    for row in c1["rows"]:
        for key in ("magnitude", "magnitude_bn", "jackpot"):
            assert row[key]["n"] == 2 and len(row[key]["values"]) == 2
            assert row[key]["mean"] == pytest.approx(np.mean(row[key]["values"]))
            assert row[key]["std"] == pytest.approx(np.std(row[key]["values"], ddof=1))
        # Without re-estimation magnitude pruning does not depend on the seed.
        assert row["magnitude"]["std"] == 0.0
    # The claim-1 table, recomputed here from the per-seed accuracies in results.json: each cell
    # is their mean ± sample standard deviation in percent.
    claim1 = markdown.split("## Claim 1", 1)[1].split("\n## ", 1)[0]
    for row in c1["rows"]:
        for key in ("magnitude", "magnitude_bn", "jackpot"):
            values = np.asarray(row[key]["values"])
            cell = f"{100 * values.mean():.2f} ± {100 * values.std(ddof=1):.2f}"
            assert cell in claim1, (row["sparsity"], key, cell)
    c2 = results["claim2"]["sparsities"][0]
    assert [i["init"] for i in c2["inits"]] == ["magnitude/global_magnitude", "kaiming/uniform"]
    # Evaluated every 2 of the 8 steps (2 epochs of 4): the cost known to 2 steps.
    assert results["claim2"]["eval_every_steps"] == 2
    assert all([p["step"] for p in i["curve"]] == [2, 4, 6, 8] for i in c2["inits"])
    assert c2["target"] == pytest.approx(0.99 * c2["best_magnitude"])
    overlap = results["overlap"]["sparsities"][0]
    assert [x["criterion"] for x in overlap["criteria"]] == ["magnitude", "random", "snip", "wanda"]
    # The claim-1 search starts from the magnitude mask; on this task it keeps most of it.
    assert overlap["criteria"][0]["iou"]["mean"] > overlap["criteria"][1]["iou"]["mean"]
    assert [p["policy"] for p in results["claim3"]["policies"]] == ["constant:1", "first_order"]
    assert results["finetune"]["rows"][0]["pruned_weights_zero"] is True

    # Every number printed is one of results.json (as is, in percent, or in hours).
    forms = _printed_forms(_numbers(results, []))
    printed = _report_numbers(markdown)
    assert len(printed) > 100
    missing = sorted({n for n in printed if n.replace(",", "") not in forms and n not in forms})
    assert not missing, missing
    # The check can fail: against results.json's numbers moved by 1% most printed numbers (all
    # but whole numbers that round alike) come from nowhere.
    moved = _printed_forms([1.01 * v + 0.001 for v in _numbers(results, [])])
    unmatched = {n for n in printed if n.replace(",", "") not in moved and n not in moved}
    assert len(unmatched) > len(set(printed)) / 2, (len(unmatched), len(set(printed)))


@pytest.mark.slow
def test_a_lost_cell_is_rerun_alone_and_finds_the_same(quick_study):
    workdir, args, _ = quick_study
    cells = workdir / "studies" / "cells"
    results = json.loads((workdir / "studies" / "results.json").read_text())
    before = {p.parent.name: p.stat().st_mtime_ns for p in cells.glob("*/result.json")}
    assert len(before) == results["meta"]["cells"]
    lost = next(p for p in cells.iterdir() if p.name.startswith("search-s90-kaiming"))
    old = json.loads((lost / "result.json").read_text())
    os.remove(lost / "result.json")  # as if the study had been killed during this cell
    proc = run_main("studies.py:quick", workdir, *args)
    check_ok(proc)
    after = {p.parent.name: p.stat().st_mtime_ns for p in cells.glob("*/result.json")}
    rerun = {name for name in after if after[name] != before.get(name)}
    assert rerun == {lost.name}
    new = json.loads((lost / "result.json").read_text())
    assert new["eval"] == old["eval"] and new["curve"] == old["curve"]
    again = json.loads((workdir / "studies" / "results.json").read_text())
    assert again["claim2"] == results["claim2"]


# ---------------------------------------------------------------------------------------------
# The parts, by hand.


def test_step_statistics_by_hand():
    losses = [1.0, 0.5, 0.7, 0.4, 0.4, 0.9, 0.1, 0.3]
    churn = [4, 2, 2, 0, 6, 2, 0, 0]
    records = [
        {"kind": "train", "step": i + 1, "loss": loss, "churn": c}
        for i, (loss, c) in enumerate(zip(losses, churn, strict=True))
    ] + [{"kind": "eval", "step": 4, "accuracy": 0.5}]
    got = step_statistics(records, steps_per_epoch=4, window=2)
    changes = np.diff(losses)  # the change at step t is loss_t - loss_{t-1}, t = 2..8
    # Windows of two changes over the whole search; the last window holds one change: left out.
    windows = [changes[0:2], changes[2:4], changes[4:6]]
    assert got["oscillation"] == pytest.approx(np.mean([np.std(w) for w in windows]))
    assert got["churn_per_step"] == pytest.approx(np.mean(churn))
    first, second = got["per_epoch"]
    # Epoch 1: the changes at steps 2, 3, 4; epoch 2: those at steps 5..8.
    e1, e2 = changes[0:3], changes[3:7]
    assert first["oscillation"] == pytest.approx(np.std(e1[0:2]))
    assert second["oscillation"] == pytest.approx(np.mean([np.std(e2[0:2]), np.std(e2[2:4])]))
    assert first["churn_per_step"] == pytest.approx(2.0)
    assert second["churn_per_step"] == pytest.approx(2.0)


def test_statistics_and_spread():
    s = study_report.stat([0.9, 0.92, 0.94])
    assert s["mean"] == pytest.approx(0.92) and s["std"] == pytest.approx(0.02)
    assert (s["min"], s["max"], s["n"]) == (0.9, 0.94, 3)
    # Mean 0.02, standard error 0.01 / sqrt(3): beyond; mean 0.005: within.
    assert study_report.beyond_spread(study_report.stat([0.01, 0.02, 0.03]))
    assert not study_report.beyond_spread(study_report.stat([-0.005, 0.005, 0.015]))
    assert study_report.stat([0.5])["std"] == 0.0


def test_claim2_verdicts_use_lower_bounds_only_where_they_decide():
    stat = study_report.stat

    def init(name, ratios, bounds):
        return {
            "init": name,
            "epochs_to_target": {
                "epochs": stat([2.0, 2.0]),
                "steps": stat([8, 8]),
                "of": 2,
                "reached": 2,
            },
            "ratio": stat(ratios),
            "ratio_lower_bounds": stat(bounds),
            "final": stat([0.9, 0.9]),
        }

    block = {
        "sparsity": 0.9,
        "target": 0.9,
        "inits": [
            init("magnitude/global_magnitude", [1.0, 1.0], []),
            init("a/uniform", [2.0], [2.5]),  # one seed measured below 3x: refuted
            init("b/uniform", [], [2.5, 2.5]),  # never reached within 5 epochs: only > 2.5
            init("c/uniform", [3.5], [3.0]),  # at least 3x in every seed
        ],
    }
    text = study_report._claim2_text(
        {"sparsities": [block], "target_share": 0.99, "epochs": 5, "paper_ratio": 3.0}
    )
    assert "does not hold here against a/uniform at 90%." in text
    assert "It holds against c/uniform at 90%." in text
    assert "Against b/uniform at 90% the search did not reach the target" in text
    assert "neither confirm nor refute" in text


def test_claim2_costs_by_hand_from_evaluations_within_epochs():
    """Steps to the target, ratios and bounds of claim 2, from hand-made cells."""

    def cell(init, seed, accuracies):  # accuracies at steps 5, 10, 15, 20 (2 epochs of 10)
        steps = [5, 10, 15, 20]
        return {
            "identity": {
                "kind": "search",
                "seed": seed,
                "eval_every_steps": 5,
                "recipe": {
                    "sparsity": 0.9,
                    "rule": "global_magnitude" if init != "kaiming" else "uniform",
                    "init": init,
                    "epochs": 2,
                    "rate": {"schedule": "constant", "value": 1.0, "power": 1.0},
                    "policy": "rate",
                },
            },
            "steps_per_epoch": 10,
            "curve": [
                {"epoch": e, "step": 10 * e, "accuracy": accuracies[2 * e - 1]} for e in (1, 2)
            ],
            "curve_steps": [
                {"step": t, "accuracy": a} for t, a in zip(steps, accuracies, strict=True)
            ],
            "eval": {"accuracy": accuracies[-1]},
            "eval_bn_after": {"accuracy": accuracies[-1]},
            "churn": [{"churn": 1}, {"churn": 1}],
            "score_scale": [1.0, 1.0],
        }

    cells = [
        # Magnitude: epoch-end means 0.85 and 0.9 -> best 0.9, target 0.891.
        cell("magnitude", 0, [0.892, 0.85, 0.9, 0.9]),  # reaches it at step 5
        cell("magnitude", 1, [0.5, 0.85, 0.895, 0.9]),  # at step 15
        cell("kaiming", 0, [0.1, 0.2, 0.3, 0.891]),  # at step 20: 4x seed 0's 5 steps
        cell("kaiming", 1, [0.1, 0.2, 0.3, 0.89]),  # never: ratio above 20 / 15
        # The same search evaluated at epochs' ends only is another cell, not one of these.
        {
            **cell("magnitude", 0, [0.0] * 4),
            "identity": {**cell("magnitude", 0, [0] * 4)["identity"], "eval_every_steps": 0},
        },
    ]
    plan = {
        "seeds": [0, 1],
        "claim2": {
            "sparsities": [0.9],
            "epochs": 2,
            "inits": ["magnitude/global_magnitude", "kaiming/uniform"],
            "target": 0.99,
            "eval_every_steps": 5,
        },
    }
    (block,) = study_report._claim2(plan, cells)["sparsities"]
    assert block["best_magnitude"] == pytest.approx(0.9)
    assert block["target"] == pytest.approx(0.891)
    mag, kai = block["inits"]
    assert mag["epochs_to_target"]["steps_per_seed"] == {"0": 5, "1": 15}
    assert mag["epochs_to_target"]["per_seed"] == {"0": 0.5, "1": 1.5}
    assert mag["ratio"]["values"] == [1.0, 1.0]
    assert kai["epochs_to_target"]["steps_per_seed"] == {"0": 20, "1": None}
    assert kai["ratio"]["values"] == [4.0]
    assert kai["ratio_lower_bounds"]["values"] == [pytest.approx(20 / 15)]
    assert [p["step"] for p in kai["curve"]] == [5, 10, 15, 20]
    assert [p["epoch"] for p in kai["curve"]] == [0.5, 1.0, 1.5, 2.0]
    assert kai["curve"][-1]["accuracy"]["mean"] == pytest.approx(0.8905)
    # Sustained: from the evaluation after which every later one stays at or above 0.891.
    # Magnitude seed 0 touches it at step 5, falls to 0.85 at 10 and holds from 15; seed 1
    # holds from 15; kaiming seed 0 only at its last evaluation (20), seed 1 never.
    mag_held, kai_held = mag["sustained"], kai["sustained"]
    assert mag_held["epochs_to_target"]["steps_per_seed"] == {"0": 15, "1": 15}
    assert kai_held["epochs_to_target"]["steps_per_seed"] == {"0": 20, "1": None}
    assert kai_held["ratio"]["values"] == [pytest.approx(20 / 15)]
    assert kai_held["ratio_lower_bounds"]["values"] == [pytest.approx(20 / 15)]
    # Counted at the first touch the claim holds against kaiming (4x; seed 1 bounded above
    # 1.33 only: open); counted from where the accuracy holds, it does not (1.33x < 3).
    text = study_report._claim2_text(study_report._claim2(plan, cells))
    first, held = text.split("Counting instead from the evaluation after which")
    assert "kaiming/uniform: 4.00" in first and "does not hold" not in first
    assert "kaiming/uniform: 1.33" in held
    assert "does not hold here against kaiming/uniform at 90%" in held


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(3, (3, 3), use_bias=False, name="conv")(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        x = nn.Dense(4, use_bias=False, name="fc")(x)
        return nn.Dense(2, name="head")(nn.relu(x))


def _tiny():
    model = _Tiny()
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (6, 4, 4, 2))
    y = jax.random.randint(k2, (6,), 0, 2)
    params = model.init(k3, x)["params"]
    budget = jj.layer_budgets(params, 0.5, "uniform")
    return model, params, budget, {"image": x, "label": y}


def test_wanda_and_snip_scores_by_hand():
    model, params, budget, batch = _tiny()
    apply_fn = jj.engine.linen_apply(model)
    wanda = criteria.wanda_scores(model, params, {}, [batch, batch], budget)
    # Wanda by hand: the conv's input is the image; the dense layer's input is the conv output.
    x = np.asarray(batch["image"])
    conv_norm = np.sqrt(2 * np.sum(x**2, axis=(0, 1, 2)))  # two copies of the batch
    want = np.abs(params["conv"]["kernel"]) * conv_norm[None, None, :, None]
    np.testing.assert_allclose(wanda["conv"]["kernel"], want, rtol=1e-5)
    hidden = nn.relu(
        jax.lax.conv_general_dilated(
            batch["image"],
            params["conv"]["kernel"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    ).reshape(6, -1)
    fc_norm = np.sqrt(2 * np.sum(np.asarray(hidden) ** 2, axis=0))
    want = np.abs(params["fc"]["kernel"]) * fc_norm[:, None]
    np.testing.assert_allclose(wanda["fc"]["kernel"], want, rtol=1e-4)
    assert wanda["head"]["kernel"] is None  # held dense

    snip = criteria.snip_scores(params, {}, [batch, batch], budget, apply_fn=apply_fn)

    def loss(p):
        logits = model.apply({"params": p}, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    g = jax.grad(loss)(params)
    for layer in ("conv", "fc"):
        want = np.abs(2 * g[layer]["kernel"] * params[layer]["kernel"])
        np.testing.assert_allclose(snip[layer]["kernel"], want, rtol=1e-4, atol=1e-7)

    masks = criteria.criterion_masks("wanda", params, {}, budget, module=model, batches=[batch])
    for layer in ("conv", "fc"):
        kept = params[layer]["kernel"].size - budget[layer]["kernel"]
        assert int(np.sum(masks[layer]["kernel"])) == kept
    with pytest.raises(ValueError, match="Linen"):
        criteria.wanda_scores(object(), params, {}, [batch], budget)


@pytest.mark.parametrize("backend, data, fsdp", [("shard_map", 2, 1), ("jit", 1, 2)])
def test_criteria_over_the_runs_devices_match_one_device(backend, data, fsdp):
    # The studies compute snip and wanda over the run's mesh (as its searches run); the sums over
    # the batch's shards are the one-device figures, themselves checked by hand above.
    model, params, budget, batch = _tiny()
    apply_fn = jj.engine.linen_apply(model)
    mesh = jj.parallel.make_mesh(data * fsdp, fsdp=fsdp)
    devices = Devices(mesh, backend)
    for name in ("snip", "wanda"):
        kwargs = dict(apply_fn=apply_fn, module=model, batches=[batch, batch])
        one = getattr(criteria, f"{name}_scores")
        args = (params, {}, [batch, batch], budget)
        if name == "snip":
            want = one(*args, apply_fn=apply_fn)
            got = one(*args, apply_fn=apply_fn, devices=devices)
        else:
            want = one(model, *args)
            got = one(model, *args, devices=devices)
        for layer in ("conv", "fc"):
            np.testing.assert_allclose(
                np.asarray(got[layer]["kernel"]), want[layer]["kernel"], rtol=1e-5, atol=1e-7
            )
        np.testing.assert_array_equal(
            criteria.criterion_masks(name, params, {}, budget, devices=devices, **kwargs)["fc"][
                "kernel"
            ],
            criteria.criterion_masks(name, params, {}, budget, **kwargs)["fc"]["kernel"],
        )


def test_masked_fine_tuning_moves_only_the_kept_weights():
    model, params, budget, batch = _tiny()
    _, masks = jj.init_scores(params, budget, "magnitude")
    masked = jj.apply_masks(params, masks)
    tx = optax.sgd(0.5, momentum=0.9)
    state = jj.engine.create_train_state(masked, {}, tx)
    step = jax.jit(
        lambda s, m, b: masked_train_step(s, m, b, apply_fn=jj.engine.linen_apply(model), tx=tx)
    )
    for _ in range(3):
        state, metrics = step(state, masks, batch)
    for layer in ("conv", "fc"):
        w, m = np.asarray(state.params[layer]["kernel"]), np.asarray(masks[layer]["kernel"])
        assert np.all(w[~m] == 0)  # pruned: no gradient, no decay, still 0
        assert not np.allclose(w[m], np.asarray(params[layer]["kernel"])[m])  # kept: trained
    assert np.isfinite(float(metrics["loss"]))


def test_plan_errors_name_the_field():
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
    import studies as studies_config

    for field, value, message in (
        ("run", ("claim9",), "`studies.run`"),
        ("seeds", (0, 0), "distinct seeds"),
        ("claim2.inits", ("kaiming/everything",), "`studies.claim2.inits`"),
        ("claim2.inits", ("kaiming/uniform",), "'magnitude/global_magnitude'"),
        ("claim2.eval_every_steps", -1, "`studies.claim2.eval_every_steps` is -1"),
        ("claim3.policies", ("constant:2",), "`studies.claim3.policies`"),
        ("claim3.init", "kaiming/everything", "`studies.claim3.init`"),
        ("claim1.sparsities", (0.5, 1.0), "`studies.claim1.sparsities`"),
        ("overlap.criteria", ("grasp",), "`studies.overlap.criteria`"),
    ):
        config = studies_config.get_config("quick")
        group, _, name = field.rpartition(".")
        target = config.studies[group] if group else config.studies
        target[name] = value
        with pytest.raises(ConfigError, match=re.escape(message)):
            read_plan(config)
    from jackpots_jax.experiment.config import base_config

    with pytest.raises(ConfigError, match="no `studies` group"):
        read_plan(base_config())
