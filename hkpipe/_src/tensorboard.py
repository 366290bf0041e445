"""A small TensorBoard event-file writer (scalars and text), with no TensorFlow or protobuf
dependency.

An event file is a sequence of TFRecords, each ``uint64 length | uint32 masked_crc32c(length) |
data | uint32 masked_crc32c(data)`` (little endian), whose data is a serialized ``tensorflow.Event``
protocol buffer. This module encodes the few messages it needs by hand (field numbers from
``tensorboard/compat/proto/{event,summary,tensor}.proto``):

- ``Event``: ``wall_time`` (1, double), ``step`` (2, int64), ``file_version`` (3, string),
  ``summary`` (5), ``session_log`` (7).
- ``SessionLog``: ``status`` (1, enum; START = 1). A START at step ``s`` tells TensorBoard to drop
  events of earlier files with steps >= ``s`` (how a resumed run hides the steps it redoes).
- ``Summary``: repeated ``value`` (1); ``Summary.Value``: ``tag`` (1), ``simple_value`` (2, float),
  ``tensor`` (8), ``metadata`` (9).
- ``SummaryMetadata``: ``plugin_data`` (1) = ``PluginData``: ``plugin_name`` (1), ``content`` (2).
- ``TensorProto``: ``dtype`` (1; DT_STRING = 7), ``tensor_shape`` (2; empty = scalar),
  ``string_val`` (8).

:func:`scalar_tags` maps a ``metrics.jsonl`` record to TensorBoard tags; :class:`EventWriter`
writes them (``tensorboard --logdir WORKDIR`` shows them).
"""

from __future__ import annotations

import os
import pathlib
import socket
import struct
import time
from typing import Any, BinaryIO, Mapping

# The tag of each known metrics.jsonl field; other numeric fields go to "metrics/<field>".
TAGS = {
    "loss": "train/loss",
    "val_loss": "val/loss",
    "val_bpb": "val/bpb",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "skipped_steps": "train/skipped_steps",
    "tokens_per_s": "perf/tokens_per_s",
    "step_time_s": "perf/step_time_s",
    "model_tflops": "perf/model_tflops",
    "mfu": "perf/mfu",
}


def scalar_tags(record: Mapping[str, Any]) -> dict[str, float]:
  """The TensorBoard scalars of one ``metrics.jsonl`` record: every numeric field but ``step``,
  under its tag in :data:`TAGS` (or ``metrics/<field>``)."""
  return {TAGS.get(k, f"metrics/{k}"): float(v) for k, v in record.items()
          if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord uses."""
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The masked CRC of a TFRecord: ``rotate_right(crc, 15) + 0xa282ead8`` (mod 2**32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord framing ``data``."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


# Protocol-buffer encoding of the fields used here.
def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # negative int64 values as two's complement
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _len_field(field: int, payload: bytes) -> bytes:
  return _key(field, 2) + _varint(len(payload)) + payload


def _int_field(field: int, value: int) -> bytes:
  return _key(field, 0) + _varint(value)


def _event(step: int, wall_time: float, body: bytes) -> bytes:
  return _key(1, 1) + struct.pack("<d", wall_time) + _int_field(2, step) + body


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
  """A serialized ``Event`` holding one ``simple_value`` summary."""
  value_msg = _len_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", value)
  return _event(step, wall_time, _len_field(5, _len_field(1, value_msg)))


def text_event(tag: str, text: str, step: int, wall_time: float) -> bytes:
  """A serialized ``Event`` holding one text summary (a scalar string tensor of the text
  plugin)."""
  tensor = _int_field(1, 7) + _len_field(2, b"") + _len_field(8, text.encode())
  metadata = _len_field(1, _len_field(1, b"text"))
  value_msg = _len_field(1, tag.encode()) + _len_field(8, tensor) + _len_field(9, metadata)
  return _event(step, wall_time, _len_field(5, _len_field(1, value_msg)))


def file_version_event(wall_time: float) -> bytes:
  """The first event of every file: ``file_version = "brain.Event:2"``."""
  return _event(0, wall_time, _len_field(3, b"brain.Event:2"))


def session_start_event(step: int, wall_time: float) -> bytes:
  """A ``SessionLog`` START at ``step`` (TensorBoard drops older events with steps >= ``step``)."""
  return _event(step, wall_time, _len_field(7, _int_field(1, 1)))


class EventWriter:
  """Writes one new event file under ``logdir``
  (``events.out.tfevents.<seconds>.<host>.<pid>.<nanoseconds>``).

  Args:
    logdir: the folder (created if missing).
    start_step: with a value, a START ``SessionLog`` at that step is written first, so that
      TensorBoard hides what earlier files of the folder logged from that step on (a resumed run
      passes its checkpoint step + 1).
  """

  def __init__(self, logdir: str | os.PathLike, *, start_step: int | None = None):
    folder = pathlib.Path(logdir)
    folder.mkdir(parents=True, exist_ok=True)
    ns = time.time_ns()
    now = ns / 1e9
    # Names sort by creation time (TensorBoard reads a folder's files in name order).
    self.path = folder / (f"events.out.tfevents.{ns // 10**9}.{socket.gethostname()}."
                          f"{os.getpid()}.{ns % 10**9:09d}")
    self._file: BinaryIO = open(self.path, "xb")  # pylint: disable=consider-using-with
    self._write(file_version_event(now))
    if start_step is not None:
      self._write(session_start_event(start_step, now))
    self._file.flush()

  def _write(self, event: bytes) -> None:
    self._file.write(tfrecord(event))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Writes each ``tag: value`` of ``values`` at ``step``."""
    now = time.time()
    for tag, value in values.items():
      self._write(scalar_event(tag, float(value), step, now))
    self._file.flush()

  def write(self, record: Mapping[str, Any]) -> None:
    """Writes the scalars of one ``metrics.jsonl`` record (see :func:`scalar_tags`)."""
    self.scalars(int(record["step"]), scalar_tags(record))

  def text(self, tag: str, text: str, step: int) -> None:
    """Writes ``text`` (shown by TensorBoard's text tab, as markdown) at ``step``."""
    self._write(text_event(tag, text, step, time.time()))
    self._file.flush()

  def close(self) -> None:
    self._file.close()
