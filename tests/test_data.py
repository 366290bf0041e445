"""Data: tokenisation, prepared files, deterministic and process-sharded batch sampling."""

import io
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time

import chex
import numpy as np
import pytest

from hkpipe import data
from hkpipe._src.errors import ConfigError
from tests import helpers


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


# ---- Data safety: user folders are used as they are, never replaced ------------------------------

GPT2_VOCAB = 50257


def _snapshot(folder):
  """Every entry's bytes and mtime, and the folder's own mtime (changes on any create/delete)."""
  entries = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}
  return entries, folder.stat().st_mtime_ns


def _write_user_folder(folder, train, val, meta, extra=()):
  folder.mkdir(parents=True, exist_ok=True)
  train.tofile(folder / "train.bin")
  val.tofile(folder / "val.bin")
  if meta is not None:
    (folder / "meta.json").write_text(json.dumps(meta))
  for name in extra:
    (folder / name).write_text("user notes\n")
  return folder


@pytest.fixture()
def user_corpus(tmp_path):
  """A nanoGPT-style GPT-2 token folder (uint16, vocab 50257) with a file of the user's own."""
  rng = np.random.default_rng(7)
  train = rng.integers(0, GPT2_VOCAB, 3000).astype(np.uint16)
  train[:2] = [0, GPT2_VOCAB - 1]  # the extreme ids, which uint8 could not hold
  val = rng.integers(0, GPT2_VOCAB, 500).astype(np.uint16)
  meta = {"vocab_size": GPT2_VOCAB, "dtype": "uint16"}
  folder = _write_user_folder(tmp_path / "user", train, val, meta, extra=["prepare.py"])
  return folder, train, val, meta


def test_user_folder_is_used_as_it_is(user_corpus):
  folder, train, val, meta = user_corpus
  before = _snapshot(folder)
  assert data.prepare(folder) == meta
  assert data.prepare(folder, None, val_fraction=0.3) == meta  # val_fraction only splits corpora
  assert _snapshot(folder) == before
  tokens = data.load(folder)
  assert tokens.vocab_size == GPT2_VOCAB and tokens.train.dtype == np.uint16
  np.testing.assert_array_equal(tokens.train, train)
  np.testing.assert_array_equal(tokens.val, val)
  x, y = data.sample_batch(tokens.train, batch_size=4, seq_len=8, seed=0, step=0)
  assert int(x.max()) > 255 and int(y.max()) > 255  # real uint16 ids, not bytes


def test_train_runs_on_user_folder_without_touching_it(user_corpus, tmp_path):
  from hkpipe import train as train_lib  # pylint: disable=g-import-not-at-top
  folder, train, _, _ = user_corpus
  before = _snapshot(folder)
  c = train_lib.default_config()
  c.model.update({"vocab_size": GPT2_VOCAB, "seq_len": 8, "d_model": 16, "n_layers": 1,
                  "n_heads": 2})
  c.data.dir, c.data.source = str(folder), ""
  c.batch_size, c.num_steps, c.log_every = 4, 2, 1
  c.eval_every, c.eval_batches, c.checkpoint_every, c.sample_tokens = 2, 1, 0, 5
  c.optim.warmup_steps = 1
  log = io.StringIO()
  summary = train_lib.train(c, tmp_path / "run", log=log)
  assert summary["steps"] == 2 and np.isfinite(summary["last_loss"])
  # Byte-level samples of uint16 data would be garbage: skipped with one warning.
  assert "warning: sample_tokens=5 is ignored" in log.getvalue() and "50257" in log.getvalue()
  assert "sample" not in summary and not (tmp_path / "run" / "samples.txt").exists()
  # train() read the user's meta.json (vocabulary 50257), not bytes: a byte-sized model is refused.
  c.model.vocab_size = 256
  with pytest.raises(ValueError, match="smaller than the data's vocabulary \\(50257\\)"):
    train_lib.train(c, tmp_path / "run256")
  assert _snapshot(folder) == before
  np.testing.assert_array_equal(np.fromfile(folder / "train.bin", np.uint16), train)
  assert not (tmp_path / "run" / "data").exists()


def test_requesting_a_source_for_a_user_folder_is_an_error(user_corpus, corpus):
  folder, _, _, _ = user_corpus
  src = corpus[0]
  before = _snapshot(folder)
  with pytest.raises(ConfigError) as e:
    data.prepare(folder, src)
  msg = str(e.value)
  assert str(folder) in msg and str(src) in msg and "not written by hkpipe" in msg, msg
  assert "vocab_size=50257" in msg and "'uint16'" in msg, msg
  assert "data.source=''" in msg and "another data.dir" in msg and "remove" in msg, msg
  assert _snapshot(folder) == before


def test_hkpipe_folder_from_another_request_is_an_error(corpus, tmp_path):
  src, out, meta = corpus
  assert meta["written_by"] == "hkpipe.data.prepare" and meta["source"] == str(src.resolve())
  assert data.prepare(out) == meta  # no source requested: the folder's data
  before = _snapshot(out)
  other = tmp_path / "other.txt"
  other.write_text("x" * 100)
  with pytest.raises(ConfigError) as e:
    data.prepare(out, other, val_fraction=0.1)
  msg = str(e.value)
  assert f"source={str(src.resolve())!r}" in msg and f"source={str(other)!r}" in msg, msg
  assert "another data.dir" in msg and "remove" in msg, msg
  with pytest.raises(ConfigError, match=r"val_fraction=0\.1, but .*val_fraction=0\.25"):
    data.prepare(out, src, val_fraction=0.25)
  with pytest.raises(ConfigError, match=r"val_fraction=0\.1, but source=none.*val_fraction=0\.25"):
    data.prepare(out, None, val_fraction=0.25)
  assert _snapshot(out) == before


def test_legacy_hkpipe_folder_is_still_reused(corpus, tmp_path):
  # Folders from before the "written_by" marker: same fields otherwise.
  src, out, meta = corpus
  old = tmp_path / "old"
  old.mkdir()
  for name in ("train.bin", "val.bin"):
    (old / name).write_bytes((out / name).read_bytes())
  legacy = {k: v for k, v in meta.items() if k != "written_by"}
  (old / "meta.json").write_text(json.dumps(legacy))
  before = _snapshot(old)
  assert data.prepare(old, src, val_fraction=0.1) == legacy
  with pytest.raises(ConfigError, match="prepared by hkpipe"):
    data.prepare(old, src, val_fraction=0.2)
  assert _snapshot(old) == before


@pytest.mark.parametrize("present", [("train.bin", "val.bin"), ("train.bin",), ("val.bin",)])
def test_bin_files_without_meta_are_an_error(tmp_path, corpus, present):
  folder = tmp_path / "d"
  folder.mkdir()
  for name in present:
    np.arange(10, dtype=np.uint16).tofile(folder / name)
  before = _snapshot(folder)
  for source in (None, corpus[0]):
    with pytest.raises(ConfigError) as e:
      data.prepare(folder, source)
    msg = str(e.value)
    assert ", ".join(present) + " but no meta.json" in msg, msg
    assert '"vocab_size": 50257, "dtype": "uint16"' in msg and "another data.dir" in msg, msg
  with pytest.raises(FileNotFoundError, match=r"No meta.json.*write a meta.json"):
    data.load(folder)
  assert _snapshot(folder) == before


@pytest.mark.parametrize("missing", ["train.bin", "val.bin"])
def test_meta_without_its_files_is_an_error(user_corpus, missing):
  folder, _, _, _ = user_corpus
  (folder / missing).unlink()
  before = _snapshot(folder)
  with pytest.raises(ConfigError) as e:
    data.prepare(folder)
  msg = str(e.value)
  assert f"but no {missing}" in msg and "put the missing file" in msg, msg
  with pytest.raises(ConfigError, match=f"but no {missing}"):
    data.load(folder)
  assert _snapshot(folder) == before


def test_other_files_block_tokenising(tmp_path, corpus):
  folder = tmp_path / "home"
  folder.mkdir()
  (folder / "notes.txt").write_text("mine")
  (folder / "train.bin.tmp.123").write_bytes(b"\x00")  # not hkpipe's temporary name pattern
  before = _snapshot(folder)
  with pytest.raises(ConfigError) as e:
    data.prepare(folder, corpus[0])
  msg = str(e.value)
  assert "notes.txt, train.bin.tmp.123" in msg and "new or empty folder" in msg, msg
  assert _snapshot(folder) == before
  file_dir = tmp_path / "a_file"
  file_dir.write_text("x")
  with pytest.raises(ConfigError, match="is a file, not a folder"):
    data.prepare(file_dir, corpus[0])


@pytest.mark.parametrize("meta, expected", [
    ({"vocab_size": GPT2_VOCAB}, r"no dtype \(vocab_size=50257\).*\"dtype\": \"uint16\""),
    ({"dtype": "uint16"}, r"vocab_size=None.*positive integer vocab_size"),
    ({"vocab_size": "50257", "dtype": "uint16"}, r"vocab_size='50257'.*positive integer"),
    ({"vocab_size": GPT2_VOCAB, "dtype": "int16"}, r"dtype='int16'.*unsigned integer.*uint16"),
    ({"vocab_size": GPT2_VOCAB, "dtype": "float32"}, r"dtype='float32'.*unsigned integer"),
    ({"vocab_size": GPT2_VOCAB, "dtype": "tokens"}, r"dtype='tokens'.*unsigned integer"),
    ({"vocab_size": GPT2_VOCAB, "dtype": None}, r"dtype=None.*unsigned integer"),
    ({"vocab_size": GPT2_VOCAB, "dtype": "uint8"},
     r"dtype='uint8'.*vocab_size - 1 = 50256 \(max 255\).*fix dtype or vocab_size"),
    ({"vocab_size": GPT2_VOCAB, "dtype": "uint32"},
     r"train.bin. has 6002 bytes, not a multiple of 4 .*dtype=.uint32."),
    ([GPT2_VOCAB, "uint16"], r"holds list, not a JSON object.*vocab_size"),
])
def test_invalid_user_meta_is_an_error(tmp_path, meta, expected):
  folder = _write_user_folder(tmp_path / "d", np.zeros(3001, np.uint16),
                              np.zeros(500, np.uint16), meta)
  before = _snapshot(folder)
  for check in (data.prepare, data.validate, data.load):
    with pytest.raises(ConfigError, match=expected):
      check(folder)
  assert _snapshot(folder) == before


def test_broken_meta_json_and_cut_hkpipe_files_are_errors(tmp_path, corpus):
  folder = _write_user_folder(tmp_path / "d", np.zeros(10, np.uint16), np.zeros(10, np.uint16),
                              None)
  (folder / "meta.json").write_text('{"vocab_size": 50257,')
  with pytest.raises(ConfigError, match=r"meta.json' is not valid JSON"):
    data.prepare(folder)
  _, out, _ = corpus
  cut = tmp_path / "cut"
  cut.mkdir()
  (cut / "meta.json").write_bytes((out / "meta.json").read_bytes())
  (cut / "val.bin").write_bytes((out / "val.bin").read_bytes())
  (cut / "train.bin").write_bytes((out / "train.bin").read_bytes()[:-7])
  with pytest.raises(ConfigError, match=r"train.bin' holds 443 tokens but .* says 450"):
    data.load(cut)


def _dead_pid():
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                        capture_output=True, text=True)
  return int(proc.stdout)


def test_crash_leftovers_of_this_host_are_removed_others_kept(tmp_path, corpus):
  src, _, meta = corpus
  folder = tmp_path / "d"
  folder.mkdir()
  host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
  dead = f"train.bin.hkpipe-tmp.{host}.{_dead_pid()}.0123abcd"
  elsewhere = "val.bin.hkpipe-tmp.otherhost.1.0123abcd"
  for name in (dead, elsewhere):
    (folder / name).write_bytes(b"half")
  assert data.prepare(folder, src) == meta
  assert sorted(p.name for p in folder.iterdir()) == sorted(
      ["train.bin", "val.bin", "meta.json", elsewhere])


def test_waits_for_a_process_renaming_its_files(tmp_path, corpus):
  # Another writer has renamed its .bin files but not yet its meta.json (its temporary file shows
  # it is alive: this process's pid); prepare waits for it instead of calling the folder partial.
  src, out, meta = corpus
  folder = tmp_path / "d"
  folder.mkdir()
  for name in ("train.bin", "val.bin"):
    (folder / name).write_bytes((out / name).read_bytes())
  host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
  pending = folder / f"meta.json.hkpipe-tmp.{host}.{os.getpid()}.0123abcd"
  pending.write_text(json.dumps(meta))
  timer = threading.Timer(0.5, os.replace, (pending, folder / "meta.json"))
  timer.start()
  t0 = time.monotonic()
  try:
    assert data.prepare(folder, src) == meta
  finally:
    timer.join()
  assert time.monotonic() - t0 >= 0.4


def test_concurrent_prepares_agree(tmp_path, corpus):
  src, out, meta = corpus
  for round_ in range(3):
    folder = tmp_path / f"d{round_}"
    results, errors = helpers.run_concurrently(lambda f=folder: data.prepare(f, src), 6)
    assert not errors and results == [meta] * 6
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    for name in ("train.bin", "val.bin"):
      assert (folder / name).read_bytes() == (out / name).read_bytes()


_PREPARE_WHEN_GO = """
import json, os, sys, time
from hkpipe import data
go, folder, src = sys.argv[1:]
open(f"{go}.ready.{os.getpid()}", "w").close()
while not os.path.exists(go):
  time.sleep(0.001)
print(json.dumps(data.prepare(folder, src)))
"""


@pytest.mark.slow
def test_concurrent_processes_prepare_one_folder(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for i in range(8):
    (src / f"w{i}.txt").write_text(f"work {i} " * 120_000)
  folder, go = tmp_path / "d", tmp_path / "go"
  command = [sys.executable, "-c", _PREPARE_WHEN_GO, str(go), str(folder), str(src)]
  procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=pathlib.Path(__file__).resolve().parents[1]) for _ in range(4)]
  deadline = time.monotonic() + 120
  while len(list(tmp_path.glob("go.ready.*"))) < 4 and time.monotonic() < deadline:
    time.sleep(0.01)  # every process has imported hkpipe and waits for the start signal
  go.write_text("")
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0] * 4, [o[1][-2000:] for o in outs]
  metas = [json.loads(o[0]) for o in outs]
  assert all(m == metas[0] for m in metas) and metas[0]["written_by"] == "hkpipe.data.prepare"
  assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.bin", "val.bin"]
  expected = [data.encode(f"work {i} " * 120_000) for i in range(8)]
  cuts = [int(len(t) * 0.9) for t in expected]
  np.testing.assert_array_equal(data.load(folder).train,
                                np.concatenate([t[:c] for t, c in zip(expected, cuts)]))
  np.testing.assert_array_equal(data.load(folder).val,
                                np.concatenate([t[c:] for t, c in zip(expected, cuts)]))
