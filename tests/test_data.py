"""Data: tokenisation, prepared files, deterministic and process-sharded batch sampling."""

import json

import chex
import numpy as np
import pytest

from hkpipe import data


def test_encode_decode_round_trip():
  text = "To be, or not to be: that is the question. — Ünïcödé"
  tokens = data.encode(text)
  chex.assert_type(tokens, np.uint8)
  assert data.decode(tokens) == text
  assert int(tokens.max()) < data.BYTE_VOCAB_SIZE


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  src = tmp_path_factory.mktemp("src")
  (src / "a.txt").write_text("abcdefghij" * 20)
  (src / "b.txt").write_text("0123456789" * 30)
  out = tmp_path_factory.mktemp("data")
  meta = data.prepare(out, src, val_fraction=0.1)
  return src, out, meta


def test_prepare_splits_every_work(corpus):
  _, out, meta = corpus
  tokens = data.load(out)
  assert meta["train_tokens"] == 180 + 270 and meta["val_tokens"] == 20 + 30
  assert len(tokens.train) == meta["train_tokens"] and len(tokens.val) == meta["val_tokens"]
  assert data.decode(tokens.val) == "abcdefghij" * 2 + "0123456789" * 3
  assert tokens.vocab_size == 256


def test_prepare_reuses_existing_files(corpus):
  src, out, meta = corpus
  before = (out / "train.bin").stat().st_mtime_ns
  assert data.prepare(out, src, val_fraction=0.1) == meta
  assert (out / "train.bin").stat().st_mtime_ns == before


def test_sampler_is_deterministic_and_shifted(corpus):
  _, out, _ = corpus
  tokens = data.load(out).train
  x1, y1 = data.sample_batch(tokens, batch_size=6, seq_len=8, seed=3, step=5)
  x2, y2 = data.sample_batch(tokens, batch_size=6, seq_len=8, seed=3, step=5)
  x3, _ = data.sample_batch(tokens, batch_size=6, seq_len=8, seed=3, step=6)
  chex.assert_shape((x1, y1), (6, 8))
  chex.assert_type((x1, y1), np.int32)
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])
  assert not np.array_equal(x1, x3)


def test_process_shards_partition_the_global_batch(corpus):
  _, out, _ = corpus
  tokens = data.load(out).train
  full, _ = data.sample_batch(tokens, batch_size=8, seq_len=4, seed=0, step=1)
  parts = [data.sample_batch(tokens, batch_size=8, seq_len=4, seed=0, step=1, process_index=i,
                             process_count=4)[0] for i in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), full)


def test_val_split_draws_other_windows(corpus):
  _, out, _ = corpus
  tokens = data.load(out).val
  x, _ = data.sample_batch(tokens, batch_size=2, seq_len=4, seed=0, step=0, split="val")
  assert set(np.unique(x)) <= set(data.encode("abcdefghij0123456789").tolist())


def test_bad_inputs_raise_clear_errors(corpus, tmp_path):
  _, out, _ = corpus
  tokens = data.load(out).train
  with pytest.raises(ValueError, match="divisible by process_count"):
    data.sample_batch(tokens, batch_size=5, seq_len=4, seed=0, step=0, process_count=2)
  with pytest.raises(ValueError, match="seq_len"):
    data.sample_batch(tokens, batch_size=2, seq_len=10_000, seed=0, step=0)
  with pytest.raises(FileNotFoundError, match="prepare"):
    data.load(tmp_path)
  with pytest.raises(ValueError, match="val_fraction"):
    data.prepare(tmp_path, out, val_fraction=1.5)


def test_shakespeare_corpus_is_real_text(tmp_path):
  meta = data.prepare(tmp_path)
  assert meta["train_tokens"] > 8_000_000
  text = data.decode(np.asarray(data.load(tmp_path).train[:200_000]))
  assert "ROMEO" in text or "KING" in text
  assert json.loads((tmp_path / "meta.json").read_text())["tokenizer"] == "bytes"
