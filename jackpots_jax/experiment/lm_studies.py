"""The `studies` mode of a language model: MaskLLM's table over seeds (`configs/lm_2of4.py`).

For each seed of `studies.seeds` the language-model jackpot job (`lm.run_jackpot`: dense, the
one-shot rows, a search from each init, for every pattern of `search.patterns`) runs with that
seed in `<workdir>/studies/seed_<s>/`. The seed draws the calibration windows of Wanda and
SparseGPT and the order of each search's training windows; dense and magnitude pruning do not
depend on it (the report says whether they came out the same). `eval.by_block` applies to the
first seed only (it costs one evaluation per block and mask).

`<workdir>/studies/report.md` and `results.json` then gather one table per pattern: each row's
validation perplexity per seed, mean and spread, the share of the gap between the best one-shot
mask over frozen weights and dense that it closes (per seed), the training tokens it saw and its
wall time; the device; the validation perplexity of every search against the tokens searched
(mean over seeds); the loss by block of the first seed.

A finished seed (`finished.json`, written last) is not run again by the same command, and
another config (but for `eval.by_block`) is refused before any compute, naming what differs; a
seed cut short resumes its searches from their checkpoints. A finished seed's search checkpoints
are deleted unless `studies.keep_checkpoints` (on SmolLM2-135M each is 1.1 GB; the exported
jackpots stay). `studies.report_only` writes the report from the seeds finished so far and runs
nothing.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import platform
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jackpots_jax.experiment import lm, phases, report, studies
from jackpots_jax.experiment.config import ConfigError
from jackpots_jax.experiment.context import Context
from jackpots_jax.experiment.logs import MetricsLog
from jackpots_jax.io.files import json_round_trip, read_json_file, write_json, write_text

Config = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Plan:
    seeds: tuple[int, ...]
    report_only: bool
    keep_checkpoints: bool


def read_plan(config: Config) -> Plan:
    """The `studies` group of a language-model config; `ConfigError` naming a bad field."""
    s = config.get("studies")
    if s is None:
        raise ConfigError(
            "config field `studies` is missing; a language model's `studies` mode needs "
            "`studies.seeds` (e.g. (0, 1, 2)) and `studies.report_only` (configs/lm_2of4.py)"
        )
    seeds = s.get("seeds")
    if (
        not isinstance(seeds, (tuple, list))
        or not seeds
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ConfigError(
            f"config field `studies.seeds` is {seeds!r}; allowed: a non-empty tuple of distinct "
            "integers >= 0, e.g. (0, 1, 2)"
        )
    flags = {}
    for field in ("report_only", "keep_checkpoints"):
        flags[field] = s.get(field, False)
        if not isinstance(flags[field], bool):
            raise ConfigError(
                f"config field `studies.{field}` is {flags[field]!r}; allowed: True or False"
            )
    return Plan(seeds=tuple(seeds), **flags)


def seed_config(config: Config, seed: int, first: bool) -> Config:
    """The jackpot job of one seed: `config` in `jackpot` mode with `seed`; the loss by block
    on the first seed only."""
    out = ml_collections.ConfigDict(config.to_dict())
    out.mode = "jackpot"
    out.seed = seed
    out.eval.by_block = bool(config.eval.by_block and first)
    del out["studies"]
    return out


def processor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The host CPU as `/proc/cpuinfo` names it, with its family and widest vector unit (XLA's
    CPU numerics differ between them), e.g. `AMD EPYC (family 26, AVX-512)`."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    vector = next((v for f, v in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if f in flags), None)
    details = [f"family {fields['cpu family']}"] if "cpu family" in fields else []
    details += [vector] if vector else []
    return f"{name} ({', '.join(details)})" if details else name


def device() -> dict[str, Any]:
    """What ran the study: the platform, the devices, and the host processor."""
    devices = jax.devices()
    return {
        "platform": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "processes": jax.process_count(),
        "processor": processor(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
    }


def _identity(config: Mapping[str, Any]) -> dict:
    """A seed's config without `eval.by_block`, which adds a table but changes no row (it is on
    for the first seed of `studies.seeds`, whichever that is)."""
    out = dict(config)
    out["eval"] = {k: v for k, v in out.get("eval", {}).items() if k != "by_block"}
    return out


def _differences(before: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list:
    """`field: before -> now` for every config field that differs (nested groups dotted)."""
    out = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"`{prefix}{key}`: {a!r} -> {b!r}")
    return out


def _describe(d: Mapping[str, Any]) -> str:
    kind = d["device_kind"] if d["platform"] != "cpu" else "CPU"
    return (
        f"{d['devices']} x {kind} ({d['platform']}), host processor {d['processor']} "
        f"({d['cpus']} logical CPUs), jax {d['jax']}"
    )


def run(ctx: Context, config: Config) -> dict:
    """Every seed's job (unless finished or `report_only`), then the report (process 0)."""
    plan = read_plan(config)
    root = os.path.join(ctx.workdir, "studies")
    jobs = {s: seed_config(config, s, first=i == 0) for i, s in enumerate(plan.seeds)}
    finished = {}  # the seeds finished before, checked against this config before any compute
    for seed, job in jobs.items():
        path = os.path.join(root, f"seed_{seed}", "finished.json")
        if plan.report_only or not os.path.exists(path):
            continue
        done = _identity(read_json_file(path, "a finished seed's record").get("config") or {})
        now = _identity(json_round_trip(job.to_dict(), "config"))
        if done != now:
            raise ConfigError(
                f"seed {seed} of this study finished under another config "
                f"({', '.join(_differences(done, now))}) in {os.path.dirname(path)}; allowed: "
                "the config it ran with, or another --workdir (or delete that folder to run the "
                "seed again)"
            )
        finished[seed] = path
    for seed, job in jobs.items():
        if plan.report_only:
            break
        directory = os.path.join(root, f"seed_{seed}")
        if seed in finished:
            logging.info("studies: seed %d finished before, not run again", seed)
            continue
        logging.info("studies: seed %d in %s", seed, directory)
        os.makedirs(directory, exist_ok=True)
        start = time.perf_counter()
        seed_ctx = dataclasses.replace(
            ctx, workdir=directory, log=MetricsLog(directory, ctx.is_main)
        )
        try:
            if ctx.is_main:
                write_json(os.path.join(directory, "config.json"), job.to_dict(), "config")
            calibration = lm.run_jackpot(seed_ctx, job)
        finally:
            seed_ctx.log.close()
        if ctx.is_main:
            record = {
                "seed": seed,
                "config": job.to_dict(),
                "seconds": time.perf_counter() - start,
                "seq_len": seed_ctx.data.seq_len,
                "device": device(),
                **calibration,
            }
            write_json(os.path.join(directory, "finished.json"), record, "a finished seed's record")
            if not plan.keep_checkpoints:
                for folder in glob.glob(os.path.join(directory, "search_*", "checkpoints")):
                    shutil.rmtree(folder)
    if not ctx.is_main:
        return {}
    results = assemble(root, plan.seeds, config)
    if results is None:
        print("studies: no seed finished yet, no report")
        return {}
    results["command"] = studies.command(ctx.workdir, "configs/lm_2of4.py")
    write_json(os.path.join(root, "results.json"), results, "the study's results")
    path = os.path.join(root, "report.md")
    write_text(path, render(results))
    missing = results["missing_seeds"]
    print(f"\nstudies report: {path}" + (f" (seeds {missing} not finished)" if missing else ""))
    return results


def _weights(name: str) -> str:
    if name == "dense":
        return "pre-trained"
    return "changed" if name.startswith("SparseGPT, weights changed") else "frozen"


def _pattern_of(name: str) -> str | None:
    """`2:4` of `Wanda (2:4)` and of `jackpot (2:4, from wanda)`; None for dense."""
    if not name.endswith(")") or "(" not in name:
        return None
    return name[name.rindex("(") + 1 : -1].split(", from ")[0]


def _curves(
    directory: str, rows: Sequence[Mapping[str, Any]], tokens_per_step: int
) -> dict[str, dict[int, float]]:
    """`{jackpot row: {tokens searched: perplexity}}` from a seed's metrics log (step 0: the
    initial mask, the prior's row)."""
    path = os.path.join(directory, "metrics.jsonl")
    records = report.read_metrics(path) if os.path.exists(path) else []
    by_model = {r["model"]: r for r in rows}
    out = {}
    for row in rows:
        name = row["model"]
        if not name.startswith("jackpot ("):
            continue
        label = name[len("jackpot (") : -1]
        pattern, _, init = label.partition(", from ")
        tag = lm._tag(pattern) + (f"_{init}" if init else "")
        phase = f"search_{tag}"
        evals = {
            r["step"]: r["perplexity"]
            for r in records
            if r.get("phase") == phase and r.get("kind") == "eval" and "perplexity" in r
        }
        if not evals:
            continue
        curve = {int(step * tokens_per_step): ppl for step, ppl in sorted(evals.items())}
        prior = {
            "magnitude": f"magnitude pruning ({pattern})",
            "wanda": f"Wanda ({pattern})",
            "sparsegpt": f"SparseGPT mask, weights frozen ({pattern})",
        }.get(init or "magnitude")
        if prior in by_model:
            curve = {0: by_model[prior]["perplexity"], **curve}
        out[name] = curve
    return out


def assemble(root: str, seeds: Sequence[int], config: Config) -> dict | None:
    """The study's results from the finished seeds' folders; None if none finished."""
    runs = {}
    for seed in seeds:
        directory = os.path.join(root, f"seed_{seed}")
        finished = os.path.join(directory, "finished.json")
        if os.path.exists(finished):
            runs[seed] = {
                "record": read_json_file(finished, "a finished seed's record"),
                "rows": read_json_file(os.path.join(directory, "results.json"), "results"),
                "directory": directory,
            }
    if not runs:
        return None
    done = list(runs)
    names = list(dict.fromkeys(r["model"] for run in runs.values() for r in run["rows"]))
    by_seed = {s: {r["model"]: r for r in run["rows"]} for s, run in runs.items()}
    gaps = {s: phases.gap_closed(run["rows"]) for s, run in runs.items()}
    first = runs[done[0]]["record"]["config"]
    seq_len = None
    tables: dict[str, list[dict]] = {}
    for name in names:
        present = [s for s in done if name in by_seed[s]]
        values = {k: [by_seed[s][name].get(k) for s in present] for k in ("perplexity", "loss")}
        row = {
            "model": name,
            "weights": _weights(name),
            "seeds": present,
            "perplexity": values["perplexity"],
            "loss": values["loss"],
            "accuracy": [by_seed[s][name].get("accuracy") for s in present],
            "count": [by_seed[s][name].get("count") for s in present],
            "perplexity_mean": float(np.mean(values["perplexity"])),
            "perplexity_sd": float(np.std(values["perplexity"], ddof=1)) if len(present) > 1 else 0,
            "loss_mean": float(np.mean(values["loss"])),
            "tokens": [by_seed[s][name].get("tokens") for s in present],
            "seconds": [
                by_seed[s][name].get("seconds", 0) + by_seed[s][name].get("calibration_seconds", 0)
                for s in present
            ],
            "gap_closed": [gaps[s].get(name, {}).get("loss") for s in present],
            "gap_closed_perplexity": [gaps[s].get(name, {}).get("perplexity") for s in present],
            "best_one_shot": [gaps[s].get(name, {}).get("best") for s in present],
        }
        closed = [g for g in row["gap_closed"] if g is not None]
        row["gap_closed_mean"] = float(np.mean(closed)) if closed else None
        row["also_on"] = {}
        for corpus in first["eval"].get("also_on", ()):
            ppl = [by_seed[s][name].get(f"{corpus} perplexity") for s in present]
            if None not in ppl:
                row["also_on"][corpus] = {
                    "perplexity": ppl,
                    "perplexity_mean": float(np.mean(ppl)),
                    "count": [by_seed[s][name][f"{corpus} count"] for s in present],
                }
        pattern = _pattern_of(name)
        for p in (pattern,) if pattern else lm._patterns(config):
            tables.setdefault(p, []).append(row)
    curves: dict[str, dict[str, list]] = {}
    for run in runs.values():
        seq_len = run["record"]["seq_len"]
        per_step = run["record"]["config"]["search"]["batch_size"] * seq_len
        for name, curve in _curves(run["directory"], run["rows"], per_step).items():
            for tokens, ppl in curve.items():
                curves.setdefault(name, {}).setdefault(str(tokens), []).append(ppl)
    deterministic = {}
    for name in names:
        if name == "dense" or name.startswith("magnitude pruning"):
            values = {by_seed[s][name]["loss"] for s in done if name in by_seed[s]}
            deterministic[name] = len(values) == 1
    first_dir = runs[done[0]]["directory"]
    block_file = os.path.join(first_dir, "block_losses.json")
    by_block = None
    if os.path.exists(block_file):
        # The JSON file's keys are sorted: the rows in the results' order, blocks by number.
        losses = read_json_file(block_file, "the losses by block")
        order = [r["model"] for r in runs[done[0]]["rows"]]
        labels = sorted(losses["masks"], key=lambda x: order.index(x) if x in order else len(order))
        masks = {
            label: dict(
                sorted(losses["masks"][label].items(), key=lambda kv: lm.natural_key(kv[0]))
            )
            for label in labels
        }
        by_block = {"seed": done[0], "dense": losses["dense"], "masks": masks}
    return {
        "model": config.model.name,
        "dataset": config.dataset.name,
        "seq_len": seq_len,
        "seeds": list(seeds),
        "finished_seeds": done,
        "missing_seeds": [s for s in seeds if s not in runs],
        "device": runs[done[0]]["record"]["device"],
        "seed_seconds": {str(s): run["record"]["seconds"] for s, run in runs.items()},
        "calibration": {
            "windows": first["prune"]["calibration_windows"],
            "tokens": runs[done[0]]["record"]["calibration_tokens"],
            "seconds": [runs[s]["record"]["calibration_seconds"] for s in done],
        },
        "search": {
            k: first["search"][k]
            for k in (
                "batch_size",
                "max_steps",
                "epochs",
                "optimizer",
                "learning_rate",
                "momentum",
                "gap",
                "loss",
            )
        },
        "num_eval": first["dataset"]["num_eval"],
        "tables": tables,
        "curves": {n: {t: float(np.mean(v)) for t, v in c.items()} for n, c in curves.items()},
        "curve_seeds": {n: len(next(iter(c.values()))) for n, c in curves.items() if c},
        "seed_independent": deterministic,
        "block_losses": by_block,
        "first_seed_rows": runs[done[0]]["rows"],
    }


def _seconds(values: Sequence[float]) -> str:
    t = float(np.mean(values))
    if t < 60:
        return f"{t:.1f} s"
    t = round(t)
    return f"{t // 60} min {t % 60} s"


def _ppl(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}"


def _share(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _optimizer(search: Mapping[str, Any]) -> str:
    """How the scores were optimised, in words (a study from before `search.optimizer`: SGD)."""
    lr, momentum = search["learning_rate"], search["momentum"]
    if search.get("optimizer", "sgd") == "adam":
        return f"Adam on the scores at learning rate {lr:g} (b1 {momentum:g})"
    return f"SGD at learning rate {lr:g}, momentum {momentum:g}"


def render(results: Mapping[str, Any]) -> str:
    """`report.md` of `assemble`'s results."""
    seeds = results["finished_seeds"]
    d = results["device"]
    s = results["search"]
    steps = f"{s['max_steps']} steps" if s["max_steps"] else f"{s['epochs']} epoch(s)"
    loss = "KL divergence to the dense model" if s["loss"] == "kl" else "next-token NLL"
    lines = [
        f"# {results['model']} on {results['dataset']}: one-shot masks and jackpots, "
        f"seeds {', '.join(map(str, seeds))}",
        "",
        f"Command: `{results.get('command', '')}`",
        "",
        f"Device: {_describe(d)}. Wall time per seed: "
        + ", ".join(f"seed {k}: {_seconds([v])}" for k, v in results["seed_seconds"].items())
        + ".",
        "",
        f"Validation: windows of {results['seq_len']} tokens"
        + (f" (the first {results['num_eval']})" if results["num_eval"] else " (all)")
        + f"; calibration of Wanda and SparseGPT: {results['calibration']['windows']} training "
        f"windows drawn with the seed ({results['calibration']['tokens']:,} tokens, "
        f"{_seconds(results['calibration']['seconds'])} on average); each search: {steps} of "
        f"{s['batch_size']} windows, {_optimizer(s)}, gap {s['gap']:g}, loss: {loss}, the "
        "weights frozen.",
    ]
    if results["missing_seeds"]:
        lines += ["", f"Not finished: seeds {results['missing_seeds']} (not in the tables)."]
    per_seed = " / ".join(map(str, seeds))
    for pattern, rows in results["tables"].items():
        lines += [
            "",
            f"## {pattern}",
            "",
            f"| row | weights | perplexity, seeds {per_seed} | mean +- sd | mean NLL | "
            "gap closed, per seed | gap closed, mean | tokens seen | wall time |",
            "|---|---|---|---:|---:|---|---:|---:|---:|",
        ]
        for r in rows:
            sd = f" +- {r['perplexity_sd']:,.2f}" if len(r["seeds"]) > 1 else ""
            closed = ", ".join(_share(g) for g in r["gap_closed"]) if r["gap_closed_mean"] else ""
            tokens = sorted({t for t in r["tokens"] if t is not None})
            lines.append(
                f"| {r['model']} | {r['weights']} | "
                + " / ".join(_ppl(x) for x in r["perplexity"])
                + f" | {_ppl(r['perplexity_mean'])}{sd} | {r['loss_mean']:.4f} | {closed} | "
                f"{_share(r['gap_closed_mean'])} | "
                + " or ".join(f"{t:,}" for t in tokens)
                + f" | {_seconds(r['seconds'])} |"
            )
        corpora = list(dict.fromkeys(c for r in rows for c in r.get("also_on", {})))
        if corpora:
            lines += [
                "",
                f"On texts the masks never saw (`eval.also_on`): perplexity on the first "
                f"validation windows of each, seeds {per_seed}, and the mean.",
                "",
                "| row | " + " | ".join(corpora) + " |",
                "|---|" + "---:|" * len(corpora),
            ]
            for r in rows:
                cells = []
                for c in corpora:
                    v = r["also_on"].get(c)
                    cells.append(
                        " / ".join(_ppl(x) for x in v["perplexity"])
                        + f" (mean {_ppl(v['perplexity_mean'])})"
                        if v
                        else ""
                    )
                lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    best = {
        g
        for rows in results["tables"].values()
        for r in rows
        for g in r["best_one_shot"]
        if g is not None
    }
    lines += [
        "",
        'Perplexity: exp(summed NLL / count) over every scored validation token. "Gap closed": '
        "(best - NLL) / (best - dense NLL) of the mean NLL, where best is the seed's lowest "
        "one-shot mask over frozen weights ("
        + (", ".join(sorted(best)) or "none")
        + " here); SparseGPT with its weights changed is not one. Tokens seen: the training "
        "tokens a row's method ran through the model (calibration windows, search steps). Wall "
        "time: mean over seeds of the row's own work (pruning or searching, then evaluating; a "
        "resumed search counts its last run only), the calibration included where used.",
    ]
    same = results["seed_independent"]
    if same:
        varied = [n for n, ok in same.items() if not ok]
        lines += [
            "",
            "Dense and magnitude pruning do not depend on the seed: "
            + (
                "the same NLL in every seed."
                if not varied
                else f"{', '.join(varied)} differ between seeds (they should not)."
            ),
        ]
    if results["curves"]:
        names = list(results["curves"])
        tokens = sorted({int(t) for c in results["curves"].values() for t in c})
        lines += [
            "",
            "## Validation perplexity against the tokens searched",
            "",
            "Mean over the finished seeds; 0: the search's initial mask (its prior's row).",
            "",
            "| tokens | " + " | ".join(names) + " |",
            "|---:|" + "---:|" * len(names),
        ]
        for t in tokens:
            cells = [_ppl(results["curves"][n].get(str(t))) for n in names]
            lines.append(f"| {t:,} | " + " | ".join(cells) + " |")
    if results["block_losses"]:
        b = results["block_losses"]
        table, notes = phases.block_loss_table(results["first_seed_rows"], b["masks"])
        lines += [
            "",
            f"## Loss by block (seed {b['seed']})",
            "",
            "The mean validation NLL (nats) added to the dense model's when only one block's "
            "kernels take a row's masks (every other kernel dense), and with every block pruned "
            "at once.",
            "",
            table,
            "",
            *[f"- {n}" for n in notes],
        ]
    lines += [
        "",
        "Per seed: `seed_<s>/` (results.json, report.md, metrics.jsonl, the exported jackpots).",
    ]
    return "\n".join(lines) + "\n"
