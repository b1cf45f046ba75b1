"""TensorBoard event files of scalars, written without TensorFlow or protobuf.

An event file is a sequence of records (TFRecord framing: length, masked CRC-32C of the length,
payload, masked CRC-32C of the payload), each payload a serialised `tensorflow.Event` protocol
buffer. The few fields written here are encoded by hand:

    Event      { double wall_time = 1; int64 step = 2; string file_version = 3;
                 Summary summary = 5; SessionLog session_log = 7; }
    Summary    { repeated Value value = 1; }
    Value      { string tag = 1; float simple_value = 2; }
    SessionLog { SessionStatus status = 1; }   // START = 1

`tensorboard --logdir <workdir>/tensorboard` reads them; a `SessionLog START` at step t, written
when a run resumes, tells TensorBoard to drop the events at steps >= t of the interrupted run.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Mapping

_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected.


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_CRC32C_POLY if crc & 1 else 0)
        table.append(crc)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord uses it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return (
        length
        + struct.pack("<I", _masked_crc(length))
        + payload
        + struct.pack("<I", _masked_crc(payload))
    )


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 fields encode negatives as ten-byte two's complement.
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def _event(
    wall_time: float,
    step: int,
    *,
    file_version: str | None = None,
    summary: bytes | None = None,
    session_start: bool = False,
) -> bytes:
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if summary is not None:
        out += _bytes_field(5, summary)
    if session_start:
        out += _bytes_field(7, _field(1, 0) + _varint(1))
    return out


def _summary(scalars: Mapping[str, float]) -> bytes:
    values = (
        _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value)
        for tag, value in scalars.items()
    )
    return b"".join(_bytes_field(1, v) for v in values)


class EventWriter:
    """Appends scalar summaries to one new event file in `logdir` (created on the first write).

    Each write is flushed at once, so a run killed at any point leaves whole records behind.
    """

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = os.fspath(logdir)
        self.path: str | None = None
        self.created = time.time()

    def _append(self, payload: bytes) -> None:
        if self.path is None:
            os.makedirs(self.logdir, exist_ok=True)
            name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
            self.path = os.path.join(self.logdir, name)
            with open(self.path, "ab") as f:
                f.write(_record(_event(self.created, 0, file_version="brain.Event:2")))
        with open(self.path, "ab") as f:
            f.write(_record(payload))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One event at `step` holding a scalar per tag (`{tag: value}`)."""
        if values:
            self._append(_event(time.time(), int(step), summary=_summary(values)))

    def restart(self, step: int) -> None:
        """Marks a resumed run: TensorBoard forgets the earlier events at steps >= `step`."""
        self._append(_event(time.time(), int(step), session_start=True))
