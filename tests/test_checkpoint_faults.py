"""Checkpoint faults: resume checks, kill -9 mid-save, damaged checkpoints, non-finite states."""

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import hkpipe
from hkpipe import train as train_lib
from hkpipe._src import integrity
from hkpipe._src import resume
from hkpipe._src.errors import ConfigError
from tests import _ckpt_driver as driver
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


# -- fingerprints -----------------------------------------------------------------------------


def _numpy_fingerprint(a):
  """The fingerprint by its definition, in numpy (uint64 arithmetic wraps mod 2**64)."""
  a = np.asarray(a)
  bits = (a.astype(np.uint64) if a.dtype == bool
          else a.view(f"uint{8 * a.dtype.itemsize}").astype(np.uint64)).ravel()
  weights = 2 * np.arange(bits.size, dtype=np.uint64) + 1
  return int(bits.sum() % 2**32), int((bits * weights).sum() % 2**32)


def test_fingerprints_follow_the_bits_not_the_placement():
  rng = np.random.default_rng(0)
  host = {"w": rng.normal(size=(8, 6)).astype(np.float32),
          "h": rng.normal(size=(16,)).astype(jnp.bfloat16),
          "n": np.arange(5, dtype=np.int32) - 2, "b": np.array([True, False, True]),
          "s": np.float32(3.5)}
  expected = {f"['{k}']": _numpy_fingerprint(v) for k, v in host.items()}
  mesh = jax.make_mesh((8,), ("x",))
  on_devices = dict(host, w=jax.device_put(host["w"], NamedSharding(mesh, P("x"))),
                    h=jax.device_put(host["h"], NamedSharding(mesh, P())),
                    n=jax.device_put(host["n"], jax.devices()[3]))
  shuffled = jax.sharding.Mesh(np.asarray(jax.devices()[:4])[[3, 1, 2, 0]].reshape(2, 2),
                               ("a", "b"))  # a device order the compiler must keep
  other_order = dict(on_devices, w=jax.device_put(host["w"], NamedSharding(shuffled, P("a", "b"))),
                     s=jax.device_put(host["s"], NamedSharding(shuffled, P())))
  for tree in (host, on_devices, other_order):
    got = {s.path: s.fingerprint for s in integrity.summarize(tree)}
    assert got == expected
  # One changed element changes the fingerprint; NaN/Inf clear the finite flag.
  changed = dict(host, w=host["w"].copy())
  changed["w"][5, 1] = np.nextafter(changed["w"][5, 1], np.float32(9))
  assert integrity.changed_leaves(integrity.summarize(host),
                                  integrity.summarize(changed)) == ["['w']"]
  changed["h"] = host["h"].copy()
  changed["h"][3] = np.inf
  flags = {s.path: s.finite for s in integrity.summarize(changed)}
  assert flags == {"['w']": True, "['h']": False, "['n']": True, "['b']": True, "['s']": True}


# -- resume checks ----------------------------------------------------------------------------


def _config_json(**changes):
  c = train_lib.default_config()
  c.model.update({"d_model": 32, "n_layers": 2})
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return json.loads(c.to_json_best_effort())


def test_compare_configs_errors_warnings_and_free_changes():
  saved = _config_json()
  assert resume.compare_configs(saved, _config_json(), saved_vocab=256,
                                current_vocab=256) == ([], [])
  errors, warns = resume.compare_configs(
      saved, _config_json(**{"model.d_model": 64, "seed": 3, "batch_size": 4,
                             "data.dir": "/other", "data.source": "/txt",
                             "data.val_fraction": 0.2, "optim.learning_rate": 0.5,
                             "backend": "mpmd", "pipeline.ranks": 4, "num_steps": 9,
                             "log_every": 2, "checkpoint_every": 7}),
      saved_vocab=256, current_vocab=65)
  assert errors == ["config.model.d_model: 32 in the checkpoint, 64 now",
                    "data vocabulary: 256 in the checkpoint, 65 now (the data in config.data.dir "
                    "changed)"]
  assert warns == ["config.seed: 0 in the checkpoint, 3 now",
                   "config.data.dir: \"\" in the checkpoint, \"/other\" now",
                   "config.data.source: \"\" in the checkpoint, \"/txt\" now",
                   "config.data.val_fraction: 0.1 in the checkpoint, 0.2 now",
                   "config.batch_size: 32 in the checkpoint, 4 now",
                   "config.num_steps: 1000 in the checkpoint, 9 now",
                   "config.optim.learning_rate: 0.001 in the checkpoint, 0.5 now"]
  # A model field only one side has is a change too.
  extra = _config_json()
  extra["model"]["rope"] = True
  assert resume.compare_configs(saved, extra)[0] == [
      "config.model.rope: (absent) in the checkpoint, true now"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """(data_dir, source): a small byte-level corpus made of this repository's docs."""
  source = tmp_path_factory.mktemp("corpus")
  for doc in sorted((ROOT / "docs").glob("*.md")):
    shutil.copy(doc, source / f"{doc.stem}.txt")
  data_dir = tmp_path_factory.mktemp("data")
  hkpipe.data.prepare(data_dir, source)
  return str(data_dir), str(source)


def _losses(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
  """The workdir of an uninterrupted tiny run: 8 steps, checkpoints 4, 6 and 8 kept."""
  work = tmp_path_factory.mktemp("reference")
  train_lib.train(driver.tiny_config(*corpus), work, log=io.StringIO())
  assert sorted(os.listdir(work / "checkpoints")) == ["4", "6", "8"]
  return work


def test_resume_refuses_another_model_and_warns_on_another_seed(tmp_path, corpus, reference):
  work = tmp_path / "run"
  shutil.copytree(reference, work)
  # The model changed: a ConfigError naming the field, both values and the fix (not an orbax error).
  changed = driver.tiny_config(*corpus, num_steps=10)
  changed.model.d_model = 64
  with pytest.raises(ConfigError) as error:
    train_lib.train(changed, work, log=io.StringIO())
  message = str(error.value)
  assert "config.model.d_model: 32 in the checkpoint, 64 now" in message, message
  assert "checkpoint step 8" in message and "new --workdir" in message, message
  assert sorted(os.listdir(work / "checkpoints")) == ["4", "6", "8"]  # nothing moved or written
  # Another seed and step count (the learning-rate schedule's length), and another logging
  # cadence: one warning naming the seed and the step count only; it resumes.
  other = driver.tiny_config(*corpus, num_steps=10, seed=5, log_every=5)
  log = io.StringIO()
  summary = train_lib.train(other, work, log=log)
  assert summary["resumed_from"] == 8 and summary["steps"] == 10
  warnings = [l for l in log.getvalue().splitlines() if l.startswith("Warning")]
  assert len(warnings) == 1, log.getvalue()
  assert "config.seed: 0 in the checkpoint, 5 now" in warnings[0]
  assert "config.num_steps: 8 in the checkpoint, 10 now" in warnings[0]
  assert "log_every" not in warnings[0]


# -- damaged checkpoints ----------------------------------------------------------------------


VOCAB = 512  # an embedding of 16 KiB: orbax stores it outside the (checksummed) b-tree nodes


@pytest.fixture(scope="module")
def states():
  """(pipe, (state after 1 step, after 2 steps), a restore target) of a small model."""
  model = helpers.hetero_model(vocab=VOCAB)
  batch = helpers.token_batch(vocab=VOCAB)
  pipe = hkpipe.Pipeline(model, train_lib.adamw(train_lib.OptimizerConfig(warmup_steps=1,
                                                                          total_steps=4)),
                         donate=False)
  one, _ = pipe.train_step(pipe.init(jax.random.key(0), batch), batch)
  two, _ = pipe.train_step(one, batch)
  return pipe, (one, two), pipe.to_canonical(pipe.init(jax.random.key(9), batch))


def _two_checkpoints(directory, states):
  """Checkpoints of the two states at steps 1 and 2; returns (checkpointer, pipe, states,
  a restore target)."""
  pipe, (one, two), like = states
  ckpt = train_lib.Checkpointer(directory)
  ckpt.save(1, pipe.to_canonical(one), {"step": 1})
  ckpt.save(2, pipe.to_canonical(two), {"step": 2})
  ckpt.wait()
  return ckpt, pipe, (one, two), like


def _assert_canonical_equal(got, want):
  chex.assert_trees_all_equal(got["params"], want["params"])
  chex.assert_trees_all_equal(got["opt_state"], want["opt_state"])
  np.testing.assert_array_equal(jax.random.key_data(got["rng"]), jax.random.key_data(want["rng"]))


def _data_files(step_dir):
  """The array files of a step (orbax's OCDBT b-tree nodes and values), largest first."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, f"no data files under {step_dir / 'state'}"
  return sorted(files, key=lambda p: -p.stat().st_size)


def _truncate_data(step_dir):
  for path in _data_files(step_dir):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delete_array_metadata(step_dir):
  (step_dir / "state" / "_METADATA").unlink()


def _delete_manifest(step_dir):
  (step_dir / "state" / "manifest.ocdbt").unlink()


@pytest.mark.parametrize("damage", [_truncate_data, _delete_array_metadata, _delete_manifest])
def test_structural_damage_falls_back_to_the_previous_checkpoint(tmp_path, states, damage):
  ckpt, pipe, (one, two), like = _two_checkpoints(tmp_path / "ck", states)
  damage(tmp_path / "ck" / "2")
  with pytest.raises(train_lib.CorruptCheckpointError, match="checkpoint step 2"):
    ckpt.restore(2, like)  # an explicit restore of that step raises
  reports = []
  restored = ckpt.restore_latest(like, report=reports.append)
  assert restored.step == 1 and restored.meta == {"step": 1}
  _assert_canonical_equal(restored.state, pipe.to_canonical(one))
  assert len(reports) == 1, reports
  assert "step 2" in reports[0] and str(tmp_path / "ck" / "2") in reports[0], reports
  assert "cannot be read" in reports[0] and "Error" in reports[0], reports  # orbax's error
  # Moved aside, not deleted; a new save of step 2 does not collide, and a second damaged step 2
  # gets its own name.
  assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2.corrupt"]
  assert ckpt.all_steps() == [1]
  ckpt.save(2, pipe.to_canonical(two), {"step": 2})
  ckpt.wait()
  again = ckpt.restore_latest(like)
  assert again.step == 2
  _assert_canonical_equal(again.state, pipe.to_canonical(two))
  damage(tmp_path / "ck" / "2")
  with pytest.warns(RuntimeWarning, match="checkpoint step 2"):
    assert ckpt.restore_latest(like).step == 1
  assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2.corrupt", "2.corrupt.2"]
  ckpt.close()
  train_lib.Checkpointer(tmp_path / "ck").close()  # a new one on the folder keeps them too
  assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2.corrupt", "2.corrupt.2"]


def _flip_silently(step_dir, saved_state):
  """Flips a byte of an array file of step_dir such that orbax itself reads the checkpoint without
  an error but with different values (checked here with plain orbax); returns the file."""
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
                          if isinstance(a, jax.Array) else np.asarray(a), saved_state)
  for path in _data_files(step_dir):
    original = path.read_bytes()
    for offset in (len(original) * k // 8 for k in range(2, 8)):
      flipped = bytearray(original)
      flipped[offset] ^= 0x10
      path.write_bytes(bytes(flipped))
      try:
        with ocp.StandardCheckpointer() as plain:
          got = plain.restore(step_dir / "state", abstract)
      except Exception:  # pylint: disable=broad-except  (checksummed b-tree node, zstd frame)
        continue
      if not all(np.array_equal(np.asarray(a), np.asarray(b))
                 for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(saved_state))):
        return path
    path.write_bytes(original)
  raise AssertionError(f"no flipped byte under {step_dir} changes the data without an orbax error")


def test_flipped_bytes_are_caught_by_the_fingerprints(tmp_path, states):
  ckpt, pipe, (one, two), like = _two_checkpoints(tmp_path / "ck", states)
  saved_two = dict(pipe.to_canonical(two), rng=np.asarray(jax.random.key_data(two.rng)))
  _flip_silently(tmp_path / "ck" / "2", saved_two)
  reports = []
  restored = ckpt.restore_latest(like, report=reports.append)
  assert restored.step == 1
  _assert_canonical_equal(restored.state, pipe.to_canonical(one))
  assert len(reports) == 1 and "fingerprint mismatch" in reports[0], reports
  assert str(tmp_path / "ck" / "2") in reports[0] and "['" in reports[0], reports  # names leaves
  assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2.corrupt"]
  ckpt.close()


def test_a_checkpoint_for_another_model_is_a_config_error_not_damage(tmp_path, states):
  ckpt, _, _, like = _two_checkpoints(tmp_path / "ck", states)
  params = jax.tree.map(lambda x: x, like["params"])
  params["embed"]["embed"]["embeddings"] = jnp.zeros((13, 8))  # a model with another vocabulary
  like = dict(like, params=params)
  with pytest.raises(ConfigError, match=r"does not fit this model: \['params'\]\['embed'\]"
                     r"\['embed'\]\['embeddings'\]: float32\[512, 8\] in the checkpoint, "
                     r"float32\[13, 8\] here"):
    ckpt.restore_latest(like)
  assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2"]  # nothing moved
  ckpt.close()


def test_trainer_resumes_past_a_damaged_checkpoint(tmp_path, corpus, reference):
  work = tmp_path / "run"
  shutil.copytree(reference, work)
  _truncate_data(work / "checkpoints" / "8")
  log = io.StringIO()
  summary = train_lib.train(driver.tiny_config(*corpus), work, log=log)
  out = log.getvalue()
  assert summary["resumed_from"] == 6, out
  assert f"Warning: checkpoint step 8 in {work / 'checkpoints' / '8'} is damaged" in out, out
  assert sorted(os.listdir(work / "checkpoints")) == ["4", "6", "8", "8.corrupt"]
  assert _losses(work) == pytest.approx(_losses(reference), rel=1e-6, abs=1e-7)


# -- non-finite states ------------------------------------------------------------------------


def test_save_refuses_a_non_finite_state(tmp_path, states):
  ckpt, pipe, (one, _), _ = _two_checkpoints(tmp_path / "ck", states)
  canonical = pipe.to_canonical(one)
  params = jax.tree.map(lambda x: x, canonical["params"])
  params["mid_1"]["linear"]["w"] = params["mid_1"]["linear"]["w"].at[0, 0].set(jnp.nan)
  with pytest.raises(FloatingPointError,
                     match=r"checkpoint step 3.*\['params'\]\['mid_1'\]\['linear'\]\['w'\]"):
    ckpt.save(3, dict(canonical, params=params), {"step": 3})
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2] and sorted(os.listdir(tmp_path / "ck")) == ["1", "2"]
  ckpt.close()


def test_trainer_never_checkpoints_a_non_finite_state(tmp_path, corpus):
  """A learning rate at the float32 limit makes the parameters non-finite at step 1 (its loss and
  gradients are finite, so the non-finite guard does not skip it):
  the periodic save and the save after the exception both refuse, and say so."""
  config = driver.tiny_config(*corpus, num_steps=3, checkpoint_every=1)
  config.optim.learning_rate = 3.4e38  # finite (the largest float32), but the update overflows
  config.optim.warmup_steps = 0        # the full rate at step 1
  log = io.StringIO()
  with pytest.raises(FloatingPointError, match="Refusing to checkpoint step 1"):
    train_lib.train(config, tmp_path / "run", log=log)
  out = log.getvalue()
  assert "Interrupted: could not save step 1: Refusing to checkpoint step 1" in out, out
  assert np.isfinite(_losses(tmp_path / "run")[1])
  assert os.listdir(tmp_path / "run" / "checkpoints") == []


# -- kill -9 during a save --------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_during_a_save_keeps_the_previous_checkpoint(tmp_path, corpus, reference):
  config = driver.tiny_config(*corpus)

  work = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, "tests/_ckpt_driver.py", str(work), *corpus, "--stall_step=6"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  timer = threading.Timer(240, proc.kill)  # if the marker never comes
  timer.start()
  out = []
  for line in proc.stdout:
    out.append(line)
    if line.startswith("STALLED"):
      proc.kill()  # SIGKILL in the middle of the save of step 6
      break
  proc.wait()
  timer.cancel()
  proc.stdout.close()
  assert out and out[-1].startswith("STALLED"), "".join(out)
  ckpts = work / "checkpoints"
  # orbax left its temporary folder, with the arrays written and uncommitted; 2 and 4 are intact.
  assert sorted(os.listdir(ckpts)) == ["2", "4", "6.orbax-checkpoint-tmp"]
  assert (ckpts / "6.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp").is_dir()

  log = io.StringIO()
  summary = train_lib.train(config, work, log=log)
  assert summary["resumed_from"] == 4 and "Warning" not in log.getvalue(), log.getvalue()
  # The temporary folder is gone and step 6 was saved again.
  assert sorted(os.listdir(ckpts)) == ["4", "6", "8"]
  assert sorted(_losses(work)) == list(range(1, 9))
  assert _losses(work) == pytest.approx(_losses(reference), rel=1e-6, abs=1e-7)
