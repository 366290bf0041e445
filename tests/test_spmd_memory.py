"""SPMD state never whole: init and ``to_canonical`` keep each rank's share on its own devices.

Bytes are measured on the devices (``jax.live_arrays()`` shards, the compiled init programs'
memory analysis) and compared with shares computed here from the model's abstract shapes alone
(``jax.eval_shape`` of ``model.init`` / ``optimizer.init`` per rank's layers), not from the
backend's packing.
"""

import collections
import gc

import chex
import jax
import numpy as np
import optax
import pytest

import hkpipe
from hkpipe import models

PP = 4
OPT = optax.adam(1e-2)


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _per_device(arrays) -> collections.Counter:
  """Bytes of device memory the arrays hold, per device (a buffer viewed by several arrays, e.g.
  a global array and its shards, counted once)."""
  out: collections.Counter = collections.Counter()
  seen = set()
  for a in arrays:
    for shard in a.addressable_shards:
      key = (shard.device, shard.data.unsafe_buffer_pointer())
      if key not in seen:
        seen.add(key)
        out[shard.device] += shard.data.nbytes
  return out


@pytest.fixture(scope="module")
def setup():
  model = models.build(models.GPTConfig(vocab_size=512, seq_len=8, d_model=32, n_layers=4,
                                        n_heads=2))
  tokens = np.random.default_rng(0).integers(0, 512, (8, 8), dtype=np.int32)
  batch = (tokens, tokens)
  pipe = hkpipe.Pipeline(model, OPT, backend="spmd", num_microbatches=2, schedule="1f1b",
                         devices=jax.devices()[:PP], donate=False)
  return model, batch, pipe


def _shares(model, batch, pipe):
  """Per rank: the bytes of its layers' params + optimizer state; and the whole model's."""
  avals = jax.eval_shape(model.init, jax.random.key(0), batch[0][:4])
  layout = pipe.layout
  shares = []
  for r in range(PP):
    names = [n for s in layout.schedule.stages_of_rank(r) for n in layout.stages[s].layer_names]
    mine = {n: avals[n] for n in names}
    shares.append(_nbytes(mine) + _nbytes(jax.eval_shape(OPT.init, mine)))
  return shares, _nbytes(avals) + _nbytes(jax.eval_shape(OPT.init, avals))


def test_init_builds_each_rank_share_on_its_own_devices(setup):
  model, batch, pipe = setup
  gc.collect()  # other tests' dead arrays must not be freed between the two snapshots
  before = _per_device(jax.live_arrays())
  state = pipe.init(jax.random.key(0), batch)
  jax.block_until_ready(state)
  after = _per_device(jax.live_arrays())
  shares, whole = _shares(model, batch, pipe)
  assert max(shares) < 0.35 * whole  # 4 ranks: the model is really split
  devices = pipe.layout.rank_devices
  for r in range(PP):
    for d in devices(r):
      grown = after[d] - before[d]
      # Every rank allocates the largest rank's share (spmd padding), nothing more.
      assert max(shares) <= grown <= 1.02 * max(shares) + 64, (r, grown, shares)
  # While initialising: each rank's program holds its packed rows plus its unpacked values.
  analyses = pipe.backend.init_memory_analysis(jax.random.key(0), batch)
  for r, analysis in enumerate(analyses):
    peak = analysis.output_size_in_bytes + analysis.temp_size_in_bytes
    assert peak <= 2.1 * max(shares) < 0.75 * whole, (r, peak, shares, whole)


def test_to_canonical_keeps_each_leaf_on_its_owner(setup):
  model, batch, pipe = setup
  ref = hkpipe.Pipeline(model, OPT, num_microbatches=2, donate=False)
  ref_state, _ = ref.train_step(ref.init(jax.random.key(3), batch), batch)  # Adam moments != 0
  expected = ref.to_canonical(ref_state)
  pipe.init(jax.random.key(0), batch)  # resolves the layout (when this test runs alone)
  state = pipe.from_canonical(expected, ref_state.step)
  gc.collect()
  before = _per_device(jax.live_arrays())
  canonical = jax.block_until_ready(pipe.to_canonical(state))
  gc.collect()
  after = _per_device(jax.live_arrays())
  chex.assert_trees_all_equal(jax.device_get(canonical), jax.device_get(expected))
  shares, _ = _shares(model, batch, pipe)
  held = _per_device(jax.tree.leaves(canonical))
  layout = pipe.layout
  for r in range(PP):
    for d in layout.rank_devices(r):
      # Its own layers' params and moments, plus counters and the key (a few bytes).
      assert shares[r] <= held[d] <= shares[r] + 64, (r, held[d], shares)
      assert after[d] - before[d] <= held[d]  # no other copy left behind
  # Each layer's leaves live on its stage's rank only.
  for s, stage in enumerate(layout.stages):
    for name in stage.layer_names:
      for leaf in jax.tree.leaves(canonical["params"][name]):
        assert leaf.sharding.device_set == set(layout.stage_devices(s))
  # And back: packed on the owners, bit for bit.
  again = pipe.to_canonical(pipe.from_canonical(canonical, ref_state.step))
  chex.assert_trees_all_equal(jax.device_get(again), jax.device_get(expected))
