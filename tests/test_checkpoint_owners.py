"""Checkpoints from their owners: no gather, no copy to a device that does not hold a leaf, and each
process's host memory bounded by its own share.

The single-process test watches every device's live arrays (``jax.live_arrays()``) around a save
and a restore of an MPMD state whose stages live on different devices. The 2-process test
(``tests/_mp_ckpt_worker.py``, rank r on process r) measures each process's peak RSS growth during
a save and a restore, next to its own share and, as a control, a whole-checkpoint read.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time
from collections import defaultdict

import jax
import numpy as np
import optax
import pytest

import hkpipe
from hkpipe._src import checkpoint

from tests import _mp_ckpt_worker as worker

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 300


def _buffers() -> set:
  """``(device, buffer address)`` of every shard of every live array."""
  return {(s.device, s.data.unsafe_buffer_pointer())
          for a in jax.live_arrays() for s in a.addressable_shards}


def _new_bytes_per_device(before: set) -> dict:
  """``{device: [bytes of each buffer]}`` of the live shards whose buffers are not in ``before``
  (from :func:`_buffers`; a new array object viewing an old buffer, as ``shard.data`` makes, is
  not new memory)."""
  out: dict = defaultdict(list)
  seen = set(before)
  for a in jax.live_arrays():
    for shard in a.addressable_shards:
      key = (shard.device, shard.data.unsafe_buffer_pointer())
      if key not in seen:
        seen.add(key)
        out[shard.device].append(shard.data.nbytes)
  return out


def _devices(leaf) -> set:
  return set(leaf.sharding.device_set)


def test_save_and_restore_touch_only_the_owning_devices(tmp_path):
  """MPMD pp=2 (stage 0 and stage 1 on different devices): a save leaves no new array on any
  device (nothing gathered, widened or copied), a restore leaves exactly the restored leaves, each
  on its own stage's devices, holding the saved values; abstract targets restore the same."""
  pipe = hkpipe.Pipeline(worker.wide_model(width=64, layers=4), optax.adam(1e-3),
                         backend="mpmd", num_ranks=2, num_microbatches=2)
  example = (np.zeros((4, 64), np.float32), np.zeros((4, 64), np.float32))
  state = pipe.init(jax.random.key(0), example)
  like = pipe.to_canonical(state)
  saved = worker.with_values(like)
  stage_devices = [_devices(saved["params"][f"l{i}"]["linear"]["w"]) for i in range(4)]
  assert stage_devices[0] == stage_devices[1] and stage_devices[2] == stage_devices[3]
  assert not stage_devices[0] & stage_devices[2], stage_devices     # two owners
  leaf_bytes = saved["params"]["l0"]["linear"]["w"].nbytes          # 16 KiB

  # The detector sees a copy of one stage onto the other stage's device (what a widen does).
  before = _buffers()
  copied = jax.device_put(saved["params"]["l3"], next(iter(stage_devices[0])))
  seen = _new_bytes_per_device(before)
  assert max(seen[next(iter(stage_devices[0]))]) == leaf_bytes, dict(seen)
  del copied

  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  before = _buffers()
  ckpt.save(3, saved, {"step": 3})
  during = _new_bytes_per_device(before)          # the async write still holds its inputs
  ckpt.wait()
  after = _new_bytes_per_device(before)
  for seen in (during, after):
    assert all(size <= 64 for sizes in seen.values() for size in sizes), dict(seen)

  for target in (like, _abstract_except_rng(like)):
    before = _buffers()
    restored, meta = ckpt.restore(3, target)
    assert meta["step"] == 3
    assert worker.mismatches(restored, like) == []
    # The new buffers on each device are exactly the restored leaves' shards there.
    ours: dict = defaultdict(list)
    for x in jax.tree.leaves(restored):
      if isinstance(x, jax.Array):
        for shard in x.addressable_shards:
          ours[shard.device].append(shard.data.nbytes)
    new = _new_bytes_per_device(before)
    assert {d: sorted(v) for d, v in new.items()} == {d: sorted(v) for d, v in ours.items()}
    for path, leaf in jax.tree_util.tree_flatten_with_path(restored["params"])[0]:
      assert _devices(leaf) == _devices(saved["params"][path[0].key]["linear"]["w"]), path
    del restored
  ckpt.close()


def _abstract_except_rng(like: dict) -> dict:
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          {k: v for k, v in like.items() if k != "rng"})
  return {**abstract, "rng": like["rng"]}


@pytest.mark.slow
def test_two_processes_hold_only_their_share_during_save_and_restore(tmp_path):
  """Rank r of an MPMD pp=2 pipeline on process r, 48 MiB of params + Adam moments per stage.

  Host memory = peak RSS growth during the operation, less (restore) the device buffers it
  creates on this process's CPU device (device memory on an accelerator). Each process's grows by
  at most 1.2 x its own share during a save and a restore (into the same layout and into swapped
  stage placements), and the restored shards hold the saved values; the control, every array of
  the checkpoint read as numpy on one process, grows by more than 2 x the share, so the bound is
  one a whole-state save or restore would break.
  """
  cmd = [sys.executable, "launch/local.py", "2", "--devices_per_process=1",
         f"--timeout={LAUNCH_TIMEOUT_S}", "--script=tests/_mp_ckpt_worker.py", "--",
         f"--out={tmp_path}"]
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=LAUNCH_TIMEOUT_S + 60)
  print(f"{time.time() - t0:.1f}s\n" + "\n".join(
      line for line in proc.stdout.splitlines() if "[worker" in line))
  assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
  for p in (0, 1):
    with np.load(tmp_path / f"mem_p{p}.npz") as f:
      got = {k: f[k] for k in f.files}
    own, total = int(got["own"]), int(got["total"])
    assert own >= 40 * 2**20 and 1.9 * own <= total <= 2.1 * own, (p, own, total)
    assert str(got["mismatches"]) == "", got["mismatches"]
    assert int(got["save"]) <= 1.2 * own, (p, int(got["save"]), own)
    for name in ("restore", "restore_swapped"):
      host = int(got[name]) - int(got[name + "_result"])
      # The restored shards here: the own share (plus the shared Adam counter's copy).
      assert abs(int(got[name + "_result"]) - own) <= 64, (p, name)
      assert host <= 1.2 * own, (p, name, int(got[name]), own)
    assert int(got["control_whole_read"]) > 2 * own, (p, int(got["control_whole_read"]), own)
