"""Tokenizers: the locally trained BPE, its cached token files, config errors, bits per byte, and
a training run on BPE tokens whose samples decode with the same tokenizer."""

import io
import json
import math
import pathlib
import sys

import jax
import numpy as np
import pytest

import hkpipe
from hkpipe import data
from hkpipe import models
from hkpipe import train as train_lib
from hkpipe._src import sample_run
from hkpipe._src import trainer
from hkpipe._src.errors import ConfigError
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import shakespeare_gpt  # pylint: disable=wrong-import-position

VOCAB = 300
NON_ASCII = "Ünïcödé — “quoted” naïve café 日本語 🎭\r\n\ttabs  and   spaces\n"
ACCENTS = "a" + "é" * 50  # 101 bytes: the 90 % cut (byte 90) falls inside an "é"


def _shakespeare_excerpts(n_files=3, n_chars=12_000):
  files = sorted(data.shakespeare_dir().glob("*.txt"))[:n_files]
  return [p.read_text(encoding="utf-8")[:n_chars] for p in files]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small corpus (Shakespeare excerpts and a non-ASCII work) and its BPE folder."""
  src = tmp_path_factory.mktemp("src")
  works = _shakespeare_excerpts() + [ACCENTS]
  for i, text in enumerate(works):
    (src / f"w{i}.txt").write_text(text, encoding="utf-8")
  root = tmp_path_factory.mktemp("data")
  folder, meta = data.prepare_tokens(root, src, data.TokenizerSpec("bpe", VOCAB))
  return src, works, root, folder, meta


def _splits(works):
  """The expected (train, val) text: each work's first 90 % of bytes, moved past a partial
  character; the non-ASCII work's split is written out by hand."""
  train, val = [], []
  for text in works[:-1]:  # ASCII: the byte cut is a character boundary
    assert text.isascii()
    cut = int(len(text) * 0.9)
    train.append(text[:cut])
    val.append(text[cut:])
  return "".join(train) + "a" + "é" * 45, "".join(val) + "é" * 5


def test_bpe_round_trips_corpus_and_non_ascii_text():
  texts = _shakespeare_excerpts()
  tok = data.train_bpe(texts[:2], 400)
  assert tok.vocab_size == 400
  for text in [texts[2], NON_ASCII, texts[2][:500] + NON_ASCII + "\x00\x7f", "", " "]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids.size == 0 or int(ids.max()) < 400
  ids = tok.encode(texts[2])
  assert ids.size < 0.6 * len(texts[2].encode())  # merges learnt: fewer tokens than bytes
  assert data.train_bpe(texts[:2], 400).hf.to_str() == tok.hf.to_str()  # deterministic


def test_token_files_hold_the_split_text_and_the_vocab_size(corpus):
  _, works, root, folder, meta = corpus
  assert folder.parent == root and folder.name.startswith(f"bpe{VOCAB}-")
  assert sorted(p.name for p in folder.iterdir()) == [
      "meta.json", "tokenizer.json", "train.bin", "val.bin"]
  vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
  assert len(vocab) == VOCAB == meta["vocab_size"]
  tok = data.load_tokenizer(folder)
  assert tok.vocab_size == VOCAB
  tokens = data.load(folder)
  assert tokens.vocab_size == VOCAB and tokens.train.dtype == np.uint16
  assert max(int(tokens.train.max()), int(tokens.val.max())) < VOCAB
  train_text, val_text = _splits(works)
  assert tok.decode(tokens.train) == train_text and tok.decode(tokens.val) == val_text
  assert (meta["train_tokens"], meta["val_tokens"]) == (len(tokens.train), len(tokens.val))
  assert meta["val_bytes"] == len(val_text.encode()) and meta["train_bytes"] == len(
      train_text.encode())


def test_cache_is_reused_and_keyed_by_vocab_and_corpus(corpus, tmp_path):
  src, works, root, folder, meta = corpus
  stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
  again, meta2 = data.prepare_tokens(root, src, data.TokenizerSpec("bpe", VOCAB))
  assert (again, meta2) == (folder, meta)
  assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # no retraining
  other, meta3 = data.prepare_tokens(root, src, data.TokenizerSpec("bpe", VOCAB + 20))
  assert other != folder and meta3["vocab_size"] == VOCAB + 20
  changed = tmp_path / "src"
  changed.mkdir()
  for p in src.iterdir():
    (changed / p.name).write_bytes(p.read_bytes())
  (changed / "w0.txt").write_text(works[0] + "\nEXEUNT.\n", encoding="utf-8")
  moved, meta4 = data.prepare_tokens(root, changed, data.TokenizerSpec("bpe", VOCAB))
  assert moved not in (folder, other) and meta4["corpus_sha256"] != meta["corpus_sha256"]
  # Byte-level data can live in the same folder beside the BPE caches (and the reverse).
  assert data.prepare(root, src)["tokenizer"] == "bytes"
  assert data.load(root).vocab_size == 256
  assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


def test_concurrent_prepares_write_one_folder(corpus, tmp_path):
  src, _, _, folder, meta = corpus
  results, errors = helpers.run_concurrently(
      lambda: data.prepare_tokens(tmp_path, src, data.TokenizerSpec("bpe", VOCAB)), 4)
  assert not errors and len(results) == 4
  assert all(r == (tmp_path / folder.name, meta) for r in results)
  assert sorted(p.name for p in (tmp_path / folder.name).iterdir()) == sorted(
      p.name for p in folder.iterdir())
  for p in folder.iterdir():
    assert (tmp_path / folder.name / p.name).read_bytes() == p.read_bytes()


@pytest.mark.parametrize("fields,expected", [
    ({"tokenizer": "wordpiece"}, r"config.data.tokenizer='wordpiece' is unknown; use one of "
                                 r"\['bytes', 'bpe'\]"),
    ({"vocab_size": 1024}, r"config.data.vocab_size=1024 does not apply to "
                           r"config.data.tokenizer='bytes'.*set config.data.tokenizer='bpe'"),
    ({"tokenizer": "bpe", "vocab_size": 100}, r"config.data.vocab_size=100 is not a BPE "
                                              r"vocabulary size.*from 257 to 65536"),
    ({"tokenizer": "bpe", "vocab_size": 70000}, r"vocab_size=70000 .*from 257 to 65536"),
])
def test_bad_tokenizer_config_fails_before_anything_is_built(tmp_path, fields, expected):
  c = shakespeare_gpt.get_config("runlocal")
  c.data.update(fields)
  with pytest.raises(ConfigError, match=expected):
    train_lib.train(c, tmp_path / "run", log=io.StringIO())
  assert not (tmp_path / "run").exists()  # raised before any folder, data or compile


def test_bpe_does_not_apply_to_puzzles():
  c = train_lib.default_config()
  c.model.name, c.data.tokenizer = "trm", "bpe"
  with pytest.raises(ConfigError, match="tokenizer='bpe' does not apply to model.name='trm'"):
    train_lib.validate_config(c)


def test_vocab_larger_than_the_corpus_supports_is_a_config_error(tmp_path):
  (tmp_path / "tiny.txt").write_text("abab abab")
  with pytest.raises(ConfigError, match=r"config.data.vocab_size=4000 is more than this corpus "
                                        r"supports: BPE training stopped at \d+ ids"):
    data.prepare_tokens(tmp_path / "d", tmp_path / "tiny.txt", data.TokenizerSpec("bpe", 4000))
  assert not list((tmp_path / "d").glob("*/*.bin"))


def test_bits_per_byte_by_hand(corpus):
  # 2.0 nats/token, 400 tokens of 1000 bytes: 0.8 nats/byte = 0.8 / ln 2 bits/byte.
  assert data.bits_per_byte(2.0, 400, 1000) == pytest.approx(0.8 / 0.6931471805599453)
  _, works, _, folder, meta = corpus
  n_tokens = (folder / "val.bin").stat().st_size // 2  # uint16
  n_bytes = len(_splits(works)[1].encode())
  assert data.val_bits_per_byte(meta, 1.5) == pytest.approx(
      1.5 * n_tokens / n_bytes / math.log(2))
  assert data.val_bits_per_byte({"tokenizer": "bytes", "vocab_size": 256}, 1.5) == pytest.approx(
      1.5 / math.log(2))
  assert data.val_bits_per_byte({"vocab_size": 50257, "dtype": "uint16"}, 1.5) is None


def test_training_on_bpe_tokens_end_to_end(corpus, tmp_path):
  src, works, _, _, _ = corpus
  c = shakespeare_gpt.get_config("runlocal")
  c.data.update({"source": str(src), "dir": str(tmp_path / "data"), "tokenizer": "bpe",
                 "vocab_size": VOCAB})
  c.model.n_layers = 2
  c.num_steps, c.eval_every, c.checkpoint_every = 4, 4, 4
  c.sample_tokens, c.sample_temperature = 5, 0.0  # greedy: compared with the layers' below
  assert c.model.vocab_size == 256  # the experiment's byte-level value: replaced by the BPE's
  work = tmp_path / "run"
  summary = train_lib.train(c, work, log=io.StringIO())
  folder, meta = data.prepare_tokens(tmp_path / "data", src, data.TokenizerSpec("bpe", VOCAB))
  tok = data.load_tokenizer(folder)
  records = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  val = [r for r in records if "val_loss" in r][-1]
  n_bytes = len(_splits(works)[1].encode())
  assert val["val_bpb"] == pytest.approx(val["val_loss"] * meta["val_tokens"] / n_bytes
                                         / math.log(2))
  assert summary["val_bpb"] == pytest.approx(val["val_bpb"])
  # The trained model's vocabulary is the tokenizer's: its embedding table has VOCAB rows.
  config, _, run_tok = sample_run.run_config(train_lib.Checkpointer(work / "checkpoints"), {})
  model = models.build(train_lib.model_config(config))
  pipe = hkpipe.Pipeline(model, train_lib.adamw(trainer.optimizer_config(config)))
  rows = np.zeros((config.batch_size, config.model.seq_len), np.int32)
  like = pipe.to_canonical(pipe.init(jax.random.key(0), (rows, rows)))
  params = train_lib.Checkpointer(work / "checkpoints").restore_latest(like).state["params"]
  embed = [l.shape for l in jax.tree.leaves(params) if l.ndim == 2 and l.shape[0] == VOCAB]
  assert embed and tok.vocab_size == VOCAB
  # The end-of-run sample decodes the layers' greedy tokens with the BPE; launch/sample.py
  # (sample_run) resolves the run's tokenizer to the same BPE.
  prompt = tok.encode("ROMEO:").astype(np.int32)[None]
  out = np.asarray(models.generate(model, params, prompt, max_new_tokens=5,
                                   rng=jax.random.key(0), temperature=0.0))
  assert int(out.max()) < VOCAB and int(out[0, prompt.shape[1]:].max()) >= 0
  assert summary["sample"] == tok.decode(out[0]) and summary["sample"].startswith("ROMEO:")
  assert isinstance(run_tok, data.BPETokenizer)
  assert run_tok.hf.to_str() == tok.hf.to_str()


def test_resume_with_another_tokenizer_is_refused():
  """A checkpoint trained with one BPE (its cache folder names the corpus key) does not resume
  with another of the same vocabulary size, nor with bytes; the same BPE in a moved folder does."""
  from hkpipe._src import resume
  saved, now = resume.run_meta({"model": {"name": "gpt"}}, 300), resume.run_meta(
      {"model": {"name": "gpt"}}, 300)
  saved["data"]["tokenizer_dir"] = "/data/bpe300-aaaa"
  now["data"]["tokenizer_dir"] = "/data/bpe300-bbbb"
  with pytest.raises(ConfigError, match="tokenizer: bpe300-aaaa in the checkpoint, bpe300-bbbb now"):
    resume.check_resume(saved, now, where="ckpt")
  del now["data"]["tokenizer_dir"]
  with pytest.raises(ConfigError, match="tokenizer: bpe300-aaaa in the checkpoint, bytes now"):
    resume.check_resume(saved, now, where="ckpt")
  now["data"]["tokenizer_dir"] = "/moved/elsewhere/bpe300-aaaa/"
  assert resume.check_resume(saved, now, where="ckpt") == []
