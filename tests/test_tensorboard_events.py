"""TensorBoard event files written without TensorFlow, read back by TensorBoard's own reader."""

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing import event_file_loader as loader

from jackpots_jax.tensorboard_events import EventWriter, crc32c


def test_crc32c_check_values():
    # The catalogued check value of CRC-32C and the test vectors of RFC 3720, appendix B.4.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


def test_scalars_read_back_by_tensorboard(tmp_path):
    writer = EventWriter(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing on disk before the first write
    values = {1: {"a/loss": 2.5, "a/acc": 0.125}, 7: {"a/loss": -1e-3}, 2**40: {"b": 3.0}}
    for step, scalars in values.items():
        writer.scalars(step, scalars)
    writer.scalars(9, {})  # nothing to write: no event

    events = list(loader.EventFileLoader(writer.path).Load())
    assert events[0].file_version == "brain.Event:2"
    got = {e.step: {v.tag: v.tensor.float_val[0] for v in e.summary.value} for e in events[1:]}
    assert got == {step: pytest.approx(s) for step, s in values.items()}
    assert all(e.wall_time > 1.6e9 for e in events)


def test_a_corrupted_record_is_detected(tmp_path):
    # TensorBoard's reader checks the CRCs: flipping one payload byte of the last record loses
    # that record (and only it), which shows the CRCs of the good records are right.
    writer = EventWriter(tmp_path)
    writer.scalars(1, {"x": 1.0})
    writer.scalars(2, {"x": 2.0})
    data = bytearray(open(writer.path, "rb").read())
    assert len(list(loader.EventFileLoader(writer.path).Load())) == 3
    data[-6] ^= 0x40
    bad = tmp_path / "events.out.tfevents.bad"
    bad.write_bytes(bytes(data))
    assert [e.step for e in loader.EventFileLoader(str(bad)).Load()] == [0, 1]


def test_restart_makes_tensorboard_forget_the_steps_of_the_interrupted_run(tmp_path):
    first = EventWriter(tmp_path)
    for step in range(1, 6):
        first.scalars(step, {"loss": float(step)})
    # The run resumes from its checkpoint at step 2: a new writer (a new process) restarts at 3.
    second = EventWriter(tmp_path)
    second.restart(3)
    for step in (3, 4):
        second.scalars(step, {"loss": 10.0 * step})
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1), (2, 2), (3, 30), (4, 40)]
