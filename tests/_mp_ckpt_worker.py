"""One process of the 2-process checkpoint test (started by tests/test_checkpoint_owners.py).

Usage (flags as ``launch/local.py`` passes them, plus the test's own):
  python tests/_mp_ckpt_worker.py --coordinator_address=127.0.0.1:P --num_processes=2 \
      --process_id=I --host_devices=1 --out=DIR

An MPMD pipeline (pp=2, rank r on process r, one device each) of a wide MLP with Adam gives the
canonical shardings: each stage's parameters and Adam moments live on their own process only.
The saved tree has those shardings (plus one small leaf split over both processes) and
deterministic random values (one generator per leaf path,
so every process knows every value without any exchange). After a warm-up save and restore (so
compiles, imports and orbax's caches are not measured), the process measures its peak RSS growth
(``VmHWM`` reset through ``/proc/self/clear_refs`` after ``malloc_trim``) during a save, during a
restore into the pipeline's own shardings, during a restore into swapped shardings (stage 0's
leaves onto process 1 and back), and, as a control that the measurement sees a whole-state read,
while reading every array of the checkpoint as numpy. Everything goes to DIR/mem_pI.npz.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import haiku as hk  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position,g-multiple-import

import hkpipe  # pylint: disable=g-import-not-at-top,wrong-import-position
from hkpipe._src import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from hkpipe._src import distributed  # pylint: disable=g-import-not-at-top,wrong-import-position

WIDTH, LAYERS = 512, 32   # 1 MiB per weight: 48 MiB of params + Adam moments per stage
INFLIGHT = 2 * 2**20       # orbax's bytes in flight per process (raised to 2 x 1 MiB + 1)


def wide_model(width: int = WIDTH, layers: int = LAYERS) -> hkpipe.SequentialModel:
  """Inputs [B, width] -> layers x tanh(linear(width)); mean squared error."""

  def layer(x, is_training):
    del is_training
    return jnp.tanh(hk.Linear(width)(x))                           # [B, width]

  def loss(y, t):
    return jnp.mean((y - t) ** 2)

  return hkpipe.SequentialModel(
      [hkpipe.Layer.from_fn(f"l{i}", layer) for i in range(layers)], loss)


def _parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser()
  parser.add_argument("--coordinator_address", required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--host_devices", type=int, default=1)
  parser.add_argument("--out", required=True)
  return parser.parse_args(argv)


def host_value(path: str, shape: tuple, dtype) -> np.ndarray:
  """The value every process agrees the leaf at ``path`` holds (computed, never exchanged)."""
  rng = np.random.default_rng(zlib.crc32(path.encode()))
  if np.issubdtype(dtype, np.integer):
    return rng.integers(0, 1000, shape).astype(dtype)
  return rng.normal(size=shape).astype(dtype)


def with_values(like: dict) -> dict:
  """``like``'s arrays (same shardings) holding :func:`host_value`; only own shards are made."""

  def one(path, leaf):
    if not isinstance(leaf, jax.Array) or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return leaf
    if not leaf.addressable_shards:
      return jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, [],
                                                      dtype=leaf.dtype)
    value = host_value(jax.tree_util.keystr(path), leaf.shape, leaf.dtype)
    return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda i: value[i],
                                        dtype=leaf.dtype)

  return jax.tree_util.tree_map_with_path(one, like)


def across(like: dict) -> dict:
  """``like`` plus a leaf split over both processes (an FSDP-style shard on each: written by both)."""
  devices = [jax.local_devices(process_index=p)[0] for p in range(2)]
  sharding = NamedSharding(Mesh(np.asarray(devices, dtype=object), ("x",)), P("x"))
  cross = jax.make_array_from_callback((64, 8), sharding, lambda i: np.zeros((64, 8))[i],
                                       dtype=np.float32)
  return {**like, "extra": {"cross": cross}}


def swapped(like: dict) -> dict:
  """Abstract targets with every leaf that lives on one process moved to the other process, and
  the leaf split over both with its halves exchanged."""
  mine = {p: jax.local_devices(process_index=p)[0] for p in range(2)}

  def one(leaf):
    if not isinstance(leaf, jax.Array) or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return leaf
    procs = {d.process_index for d in leaf.sharding.device_set}
    if len(procs) != 1:
      sharding = leaf.sharding
      if leaf.ndim == 2:  # the split leaf: process 0 now holds the rows process 1 held
        mesh = Mesh(np.asarray([mine[1], mine[0]], dtype=object), ("x",))
        sharding = NamedSharding(mesh, P("x"))
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    device = mine[1 - procs.pop()]
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                sharding=jax.sharding.SingleDeviceSharding(device))

  return jax.tree.map(one, like)


def _rss_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(field)


def measure(fn):
  """``(result, peak RSS growth in bytes)`` of ``fn()``: free heap returned to the OS first, then
  the high-water mark reset, so the growth counts every page touched during ``fn``."""
  gc.collect()
  ctypes.CDLL("libc.so.6").malloc_trim(0)
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  base = _rss_kib("VmRSS")
  result = fn()
  return result, (_rss_kib("VmHWM") - base) * 1024


def own_bytes(tree) -> int:
  """Bytes of the shards this process holds (replica 0 of each: what it writes)."""
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)
             for s in x.addressable_shards if s.replica_id == 0)


def local_bytes(tree) -> int:
  """Bytes of every shard on this process's devices (device buffers: host RAM on CPU)."""
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)
             for s in x.addressable_shards)


def mismatches(restored: dict, targets: dict) -> list[str]:
  """Leaves whose placement or shards here differ from the target's sharding and the saved values."""
  bad = []
  flat = jax.tree_util.tree_flatten_with_path(restored)[0]
  for (path, leaf), target in zip(flat, jax.tree.leaves(targets)):
    name = jax.tree_util.keystr(path)
    if not isinstance(leaf, jax.Array) or name == "['rng']":
      continue
    if leaf.sharding != target.sharding:
      bad.append(f"{name}: sharding {leaf.sharding} != {target.sharding}")
      continue
    want = {d: i for d, i in target.sharding.addressable_devices_indices_map(leaf.shape).items()}
    if {s.device for s in leaf.addressable_shards} != set(want):
      bad.append(f"{name}: shards on {[s.device for s in leaf.addressable_shards]}")
      continue
    value = host_value(name, leaf.shape, leaf.dtype) if want else None
    for s in leaf.addressable_shards:
      if not np.array_equal(np.asarray(s.data), value[s.index]):
        bad.append(f"{name}: values differ on {s.device}")
  return bad


def main(argv: list[str]) -> None:
  args = _parse(argv)
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", args.host_devices)
  distributed.initialize(distributed.DistributedConfig(
      coordinator_address=args.coordinator_address, num_processes=args.num_processes,
      process_id=args.process_id))
  me = jax.process_index()
  pipe = hkpipe.Pipeline(wide_model(), optax.adam(1e-3), backend="mpmd", num_ranks=2,
                         num_microbatches=2)
  example = (np.zeros((4, WIDTH), np.float32), np.zeros((4, WIDTH), np.float32))
  like = across(pipe.to_canonical(pipe.init(jax.random.key(0), example)))
  saved = with_values(like)
  ckpt = checkpoint.Checkpointer(os.path.join(args.out, "ckpt"), inflight_bytes=INFLIGHT)
  # Warm-up: compiles, imports and orbax's first-use allocations.
  ckpt.save(1, saved, {"step": 1})
  ckpt.wait()
  ckpt.restore(1, like)
  ckpt.restore(1, swapped(like))

  out = {"own": own_bytes(saved), "total": sum(x.nbytes for x in jax.tree.leaves(saved)
                                               if isinstance(x, jax.Array))}

  def save():
    ckpt.save(2, saved, {"step": 2})
    ckpt.wait()

  _, out["save"] = measure(save)
  (restored, _), out["restore"] = measure(lambda: ckpt.restore(2, like))
  out["restore_result"] = local_bytes(restored)
  bad = mismatches(restored, like)
  del restored
  moved_like = swapped(like)
  (moved, _), out["restore_swapped"] = measure(lambda: ckpt.restore(2, moved_like))
  out["restore_swapped_result"] = local_bytes(moved)
  bad += mismatches(moved, moved_like)
  del moved
  # Control: every array of the checkpoint read as numpy (what a whole-state restore holds).
  state_dir = os.path.join(ckpt.step_dir(2), "state")
  whole = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype) if isinstance(x, jax.Array)
                       else np.asarray(x), checkpoint._to_storable(saved))  # pylint: disable=protected-access
  _, out["control_whole_read"] = measure(
      lambda: checkpoint.checkpoint_arrays.read(state_dir, whole, INFLIGHT))
  ckpt.close()
  out["mismatches"] = np.asarray("\n".join(bad))
  np.savez(os.path.join(args.out, f"mem_p{me}.npz"), **out)
  print(f"[worker p{me}] " + ", ".join(f"{k}={int(v) / 2**20:.1f}MiB" for k, v in out.items()
                                       if k != "mismatches") + f"; mismatches: {len(bad)}",
        flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
