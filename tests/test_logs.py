"""Metric records: JSON lines and TensorBoard runs per phase, read back by TensorBoard's reader;
what a restarted phase forgets; the progress bar."""

import json
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jackpots_jax.experiment.logs import MetricsLog, Progress


def scalars(workdir, phase, tag):
    events = EventAccumulator(str(workdir / "tensorboard" / phase))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def lines(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def train(phase, step, loss):
    return {"phase": phase, "kind": "train", "step": step, "epoch": step / 4, "loss": loss}


def test_records_go_to_json_lines_and_to_one_tensorboard_run_per_phase(tmp_path):
    log = MetricsLog(str(tmp_path))
    log.write(train("pretrain", 1, 2.5))
    log.write({**train("search", 1, 0.75), "churn_per_layer": {"conv1/kernel": 3}})
    log.write({"phase": "search", "kind": "eval", "step": 2, "epoch": 1, "accuracy": 0.5})
    log.close()
    assert [r["phase"] for r in lines(tmp_path)] == ["pretrain", "search", "search"]
    assert sorted(os.listdir(tmp_path / "tensorboard")) == ["pretrain", "search"]
    assert scalars(tmp_path, "pretrain", "train/loss") == [(1, 2.5)]
    assert scalars(tmp_path, "search", "train/loss") == [(1, 0.75)]
    assert scalars(tmp_path, "search", "train/churn_per_layer/conv1/kernel") == [(1, 3.0)]
    assert scalars(tmp_path, "search", "eval/accuracy") == [(2, 0.5)]


def test_a_restarted_phase_forgets_its_steps_past_the_restart_and_only_its_own(tmp_path):
    first = MetricsLog(str(tmp_path))  # the run that is killed after search step 5
    for step in range(1, 4):
        first.write(train("pretrain", step, float(step)))
    for step in range(1, 6):
        first.write(train("search", step, float(step)))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"phase": "search", "kind": "tr')  # a line cut short by the kill

    second = MetricsLog(str(tmp_path))  # the restart, from the search checkpoint of step 2
    second.drop_after("search", 2)
    for step in (3, 4):
        second.write(train("search", step, 10.0 * step))
    second.close()
    search = [(r["step"], r["loss"]) for r in lines(tmp_path) if r["phase"] == "search"]
    assert search == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert scalars(tmp_path, "search", "train/loss") == search
    # The pre-training run (its steps go past 2) is left alone, in both logs.
    pretrain = [(r["step"], r["loss"]) for r in lines(tmp_path) if r["phase"] == "pretrain"]
    assert pretrain == scalars(tmp_path, "pretrain", "train/loss") == [(1, 1), (2, 2), (3, 3)]


def test_a_phase_restarted_from_scratch_forgets_everything_it_logged(tmp_path):
    first = MetricsLog(str(tmp_path))
    first.write(train("search", 1, 1.0))
    second = MetricsLog(str(tmp_path))
    second.drop_after("search", 0)
    second.write(train("search", 1, 5.0))
    second.close()
    assert [r["loss"] for r in lines(tmp_path)] == [5.0]
    assert scalars(tmp_path, "search", "train/loss") == [(1, 5.0)]


def test_only_the_main_process_writes(tmp_path):
    log = MetricsLog(str(tmp_path), enabled=False)
    log.write(train("search", 1, 1.0))
    log.drop_after("search", 0)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_shows_the_step_and_the_numbers(capsys, enabled):
    progress = Progress("search", total=10, start=2, enabled=enabled)
    progress.update(6, 0.25, 0.5, 1234.0)
    progress.close()
    err = capsys.readouterr().err
    if not enabled:
        assert err == ""
        return
    assert "search" in err and "6/10" in err and "loss 0.2500 acc 50.00% 1,234 img/s" in err


def test_progress_of_a_language_model_counts_tokens(capsys):
    progress = Progress("search", total=10)
    progress.update(3, 2.5, 0.25, 5120.0, "tok/s")
    progress.close()
    assert "loss 2.5000 acc 25.00% 5,120 tok/s" in capsys.readouterr().err
