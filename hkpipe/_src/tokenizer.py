"""Tokenizers for text data: bytes (256 ids) or a byte-level BPE trained locally on the corpus.

The BPE tokenizer is Hugging Face ``tokenizers``' byte-level BPE (GPT-2 style pre-tokenisation,
all 256 bytes in the base alphabet, so every text encodes and ``decode(encode(text)) == text``),
trained on the train split of the corpus only, with exactly ``vocab_size`` ids. Nothing is
downloaded. Its tokenised corpus is cached in a subfolder of the data folder,
``<data.dir>/bpe<vocab_size>-<key>``, where ``key`` hashes the corpus' file names and contents and
``val_fraction``: another vocabulary size or corpus gets a new subfolder, the same request reuses
it. The subfolder holds ``train.bin``/``val.bin`` (``uint16``), ``tokenizer.json`` and
``meta.json``, written by :func:`hkpipe._src.data.prepare_with` (the same atomic, multi-writer-safe
rules as byte-level :func:`hkpipe.data.prepare`); its meta records the split's token and UTF-8
byte counts, from which :func:`val_bits_per_byte` makes validation losses of different tokenizers
comparable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib
from typing import Any, Protocol

import numpy as np

from hkpipe._src import data as data_lib
from hkpipe._src.errors import ConfigError

TOKENIZERS = ("bytes", "bpe")
MIN_BPE_VOCAB = data_lib.BYTE_VOCAB_SIZE + 1  # the 256 bytes and at least one merge
MAX_BPE_VOCAB = 2 ** 16  # ids fit uint16 token files
DEFAULT_BPE_VOCAB = 1024  # config.data.vocab_size unset with config.data.tokenizer="bpe"
_KEY_VERSION = b"hkpipe-bpe-1"  # changes when the BPE recipe below changes


class Tokenizer(Protocol):
  """What the trainer and the sampler need from a tokenizer."""

  @property
  def name(self) -> str:
    """Short name of the tokenizer (``"bytes"``, ``"bpe"``)."""

  @property
  def vocab_size(self) -> int:
    """Number of token ids."""

  def encode(self, text: str) -> np.ndarray:
    """Token ids of ``text``: ``[N]`` unsigned ints."""

  def decode(self, tokens: Any) -> str:
    """Text of token ids (invalid UTF-8 becomes U+FFFD)."""


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
  """The tokenizer a run asks for (``config.data.tokenizer`` and ``config.data.vocab_size``)."""

  name: str = "bytes"
  vocab_size: int = data_lib.BYTE_VOCAB_SIZE


def spec(config: Any) -> TokenizerSpec:
  """The validated tokenizer request of a run config (fields ``data.tokenizer``/``vocab_size``;
  an unset ``vocab_size`` is 256 for bytes, ``DEFAULT_BPE_VOCAB`` for BPE).

  Raises:
    ConfigError: an unknown tokenizer, or a vocabulary size it cannot have, naming the fix.
  """
  data = config.get("data") or {}
  name, vocab = data.get("tokenizer", "bytes"), data.get("vocab_size")
  if name not in TOKENIZERS:
    raise ConfigError(f"config.data.tokenizer={name!r} is unknown; use one of {list(TOKENIZERS)}.")
  if name == "bytes":
    if vocab is not None and vocab != data_lib.BYTE_VOCAB_SIZE:
      raise ConfigError(f"config.data.vocab_size={vocab!r} does not apply to "
                        f"config.data.tokenizer='bytes' (always {data_lib.BYTE_VOCAB_SIZE} ids); "
                        "unset it, or set config.data.tokenizer='bpe' to train a BPE tokenizer "
                        "of that size.")
    return TokenizerSpec()
  vocab = DEFAULT_BPE_VOCAB if vocab is None else vocab
  if config.model.get("name") == "trm":
    raise ConfigError("config.data.tokenizer='bpe' does not apply to model.name='trm' (generated "
                      "puzzles, no text); use config.data.tokenizer='bytes'.")
  if isinstance(vocab, bool) or not isinstance(vocab, int) or not (
      MIN_BPE_VOCAB <= vocab <= MAX_BPE_VOCAB):
    raise ConfigError(f"config.data.vocab_size={vocab!r} is not a BPE vocabulary size: "
                      "config.data.tokenizer='bpe' needs an int from "
                      f"{MIN_BPE_VOCAB} to {MAX_BPE_VOCAB}, e.g. config.data.vocab_size=1024.")
  return TokenizerSpec("bpe", vocab)


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes: ids 0..255."""

  name: str = "bytes"
  vocab_size: int = data_lib.BYTE_VOCAB_SIZE

  def encode(self, text: str) -> np.ndarray:
    return data_lib.encode(text)

  def decode(self, tokens: Any) -> str:
    return data_lib.decode(tokens)


@dataclasses.dataclass(frozen=True)
class BPETokenizer:
  """A byte-level BPE tokenizer (a ``tokenizers.Tokenizer``)."""

  hf: Any
  name: str = "bpe"

  @property
  def vocab_size(self) -> int:
    return self.hf.get_vocab_size()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.hf.encode(text).ids, dtype=np.uint16)

  def decode(self, tokens: Any) -> str:
    return self.hf.decode([int(t) for t in np.asarray(tokens).reshape(-1)])


def _hf():
  import tokenizers  # pylint: disable=g-import-not-at-top
  return tokenizers


def train_bpe(texts: list[str], vocab_size: int) -> BPETokenizer:
  """A byte-level BPE tokenizer of ``vocab_size`` ids trained on ``texts`` (deterministic).

  Raises:
    ConfigError: the texts have too few distinct pairs to reach ``vocab_size``.
  """
  tk = _hf()
  hf = tk.Tokenizer(tk.models.BPE())
  hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                   initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
  hf.train_from_iterator(texts, trainer)
  if hf.get_vocab_size() != vocab_size:
    raise ConfigError(f"config.data.vocab_size={vocab_size} is more than this corpus supports: "
                      f"BPE training stopped at {hf.get_vocab_size()} ids (no pair left to "
                      "merge); use a smaller vocab_size or a larger corpus.")
  return BPETokenizer(hf)


def _split_text(raw: bytes, val_fraction: float) -> tuple[str, str]:
  """``(train, val)`` text of one work: the byte-level split, moved to a character boundary."""
  cut = int(len(raw) * (1.0 - val_fraction))
  while cut < len(raw) and (raw[cut] & 0xC0) == 0x80:  # a UTF-8 continuation byte
    cut += 1
  return raw[:cut].decode("utf-8"), raw[cut:].decode("utf-8")


def _works(src: pathlib.Path) -> list[tuple[str, bytes]]:
  """``(name, UTF-8 text)`` of every text file of ``src``, read like the byte-level data."""
  files = data_lib._text_files(src)  # pylint: disable=protected-access
  base = src if src.is_dir() else src.parent
  return [(p.relative_to(base).as_posix(),
           p.read_text(encoding="utf-8", errors="replace").encode("utf-8")) for p in files]


def corpus_key(src: pathlib.Path, val_fraction: float) -> str:
  """Hex SHA-256 of the corpus under ``src`` (file names and contents) and ``val_fraction``."""
  h = hashlib.sha256(_KEY_VERSION + repr(val_fraction).encode())
  for name, raw in _works(src):
    for part in (name.encode(), raw):
      h.update(len(part).to_bytes(8, "little") + part)
  return h.hexdigest()


def _tokenise_bpe(vocab_size: int, key: str):
  def tokenise(src: pathlib.Path, val_fraction: float) -> tuple[dict, dict[str, Any]]:
    splits = [_split_text(raw, val_fraction) for _, raw in _works(src)]
    tok = train_bpe([t for t, _ in splits], vocab_size)
    ids = {s: [np.asarray(e.ids, np.uint16) for e in tok.hf.encode_batch_fast(
        [parts[i] for parts in splits])] for i, s in enumerate(("train", "val"))}
    arrays = {f"{s}.bin": np.concatenate(v) for s, v in ids.items()}
    nbytes = {s: sum(len(parts[i].encode("utf-8")) for parts in splits)
              for i, s in enumerate(("train", "val"))}
    meta = {"written_by": data_lib.WRITTEN_BY, "vocab_size": vocab_size, "dtype": "uint16",
            "tokenizer": "bpe", "source": str(src.resolve()), "val_fraction": val_fraction,
            "corpus_sha256": key, "tokenizers_version": _hf().__version__,
            "train_tokens": len(arrays["train.bin"]), "val_tokens": len(arrays["val.bin"]),
            "train_bytes": nbytes["train"], "val_bytes": nbytes["val"]}
    return meta, {**arrays, data_lib.TOKENIZER_FILE: tok.hf.to_str()}
  return tokenise


def prepare_tokens(data_dir: str | os.PathLike, source: str | os.PathLike | None,
                   tokenizer: TokenizerSpec, *,
                   val_fraction: float = 0.1) -> tuple[pathlib.Path, dict]:
  """Makes sure the token files of ``tokenizer`` exist; returns their folder and ``meta.json``.

  ``bytes``: :func:`hkpipe.data.prepare` of ``data_dir`` itself. ``bpe``: trains the tokenizer on
  the train split of ``source`` (None: the Shakespeare corpus) and tokenises both splits into
  ``data_dir/bpe<vocab_size>-<key>`` (see the module docstring), or reuses that folder.

  Raises:
    ConfigError: as :func:`hkpipe.data.prepare`, or a corpus too small for the vocabulary.
  """
  if tokenizer.name == "bytes":
    return pathlib.Path(data_dir), data_lib.prepare(data_dir, source, val_fraction=val_fraction)
  out = pathlib.Path(data_dir)
  if out.exists() and not out.is_dir():
    raise ConfigError(f"data.dir {str(out)!r} is a file, not a folder; use a folder path.")
  src = pathlib.Path(source) if source is not None else data_lib.shakespeare_dir()
  key = corpus_key(src, val_fraction)
  folder = out / f"bpe{tokenizer.vocab_size}-{key[:16]}"
  meta = data_lib.prepare_with(
      folder, src, val_fraction=val_fraction,
      expected={"tokenizer": "bpe", "vocab_size": tokenizer.vocab_size, "corpus_sha256": key},
      tokenise=_tokenise_bpe(tokenizer.vocab_size, key))
  return folder, meta


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer | None:
  """The tokenizer of a data folder: its ``tokenizer.json`` (BPE), bytes for a vocabulary of 256,
  None for other token files (your own: hkpipe cannot turn their ids into text)."""
  meta = data_lib.validate(folder)
  if meta.get("tokenizer") == "bpe":
    path = pathlib.Path(folder) / data_lib.TOKENIZER_FILE
    tok = BPETokenizer(_hf().Tokenizer.from_file(str(path)))
    if tok.vocab_size != meta["vocab_size"]:
      raise ConfigError(f"{str(path)!r} has {tok.vocab_size} ids but its meta.json says "
                        f"vocab_size={meta['vocab_size']}: the folder was changed; remove it "
                        "yourself to prepare it again.")
    return tok
  return ByteTokenizer() if meta["vocab_size"] == data_lib.BYTE_VOCAB_SIZE else None


def of_run(data: dict, where: str) -> Tokenizer:
  """The tokenizer a run trained with, from its checkpoint metadata's ``data`` record
  (``vocab_size``, and ``tokenizer_dir`` for BPE); ``where`` names the run in errors.

  Raises:
    ConfigError: the BPE folder is gone or changed, or token files of no known tokenizer.
  """
  vocab, folder = data.get("vocab_size"), data.get("tokenizer_dir")
  if folder is None:
    if vocab != data_lib.BYTE_VOCAB_SIZE:
      raise ConfigError(f"The run in {where} was trained on a vocabulary of {vocab} tokens "
                        "without an hkpipe tokenizer (text prompts are byte-level, "
                        f"{data_lib.BYTE_VOCAB_SIZE} tokens, or BPE with data.tokenizer='bpe'), "
                        "so sample it with hkpipe.models.generate and your tokenizer.")
    return ByteTokenizer()
  try:
    tok = load_tokenizer(folder)
  except FileNotFoundError as e:
    raise ConfigError(f"The run in {where} was trained with the BPE tokenizer in {folder!r}, "
                      f"which is gone ({e}); put the data folder back there (train the same "
                      "config again with that data.dir to rebuild it).") from e
  if tok is None or tok.vocab_size != vocab:
    raise ConfigError(f"The run in {where} was trained with a vocabulary of {vocab} from "
                      f"{folder!r}, which now holds {getattr(tok, 'vocab_size', 'no tokenizer')};"
                      " put the run's data folder back.")
  return tok


def bits_per_byte(loss: float, num_tokens: int, num_bytes: int) -> float:
  """``loss`` (nats per token) in bits per byte of text: ``loss * tokens / bytes / ln 2``."""
  return loss * num_tokens / num_bytes / math.log(2)


def val_bits_per_byte(meta: dict, loss: float) -> float | None:
  """Bits per byte of a validation ``loss`` on the data of ``meta`` (its val split's token and
  byte counts); None where the bytes are unknown (your own token files)."""
  if "val_bytes" in meta:
    return bits_per_byte(loss, meta["val_tokens"], meta["val_bytes"])
  if meta.get("tokenizer") == "bytes":  # one token per byte
    return bits_per_byte(loss, 1, 1)
  return None
