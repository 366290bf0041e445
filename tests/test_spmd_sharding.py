"""SPMD with mesh axes inside stages (fsdp, tp): equivalence with one device, memory, errors.

Each case builds an spmd pipeline on a ``("pp", "fsdp", "tp")`` mesh of the 8 simulated devices
and checks, against the single-device reference (fp32, rtol 1e-5, atol 1e-6): the initial
parameters, the loss and every gradient leaf, and two AdamW steps (losses and parameters).
Memory is measured from the arrays' addressable shards (``shard.data.nbytes``) and
``jax.live_arrays()``; the share it is compared with is computed from the reference's own
parameters and ``optimizer.init`` of each rank's layers, not from the backend's plan.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import hkpipe
from tests import helpers

M = helpers.SHARDED_M
KEY = jax.random.key(helpers.SHARDED_SEED)
_optimizer = helpers.sharded_optimizer
_case = helpers.sharded_case


def _pipeline(name: str, shape: tuple[int, ...], axes: tuple[str, ...], schedule: str,
              **kw) -> hkpipe.Pipeline:
  model, _ = _case(name)
  mesh = jax.make_mesh(shape, axes, devices=jax.devices()[:int(np.prod(shape))])
  return hkpipe.Pipeline(model, _optimizer(), backend="spmd", mesh=mesh, num_microbatches=M,
                         schedule=schedule, donate=False, **kw)


def _nbytes(tree: Any) -> int:
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def _rank_shares(pipe, params: dict) -> list[int]:
  """Per rank, the bytes of its layers' parameters and of ``optimizer.init`` on them."""
  layout = pipe.layout
  out = []
  for r in range(layout.num_ranks):
    names = [n for s in layout.schedule.stages_of_rank(r) for n in layout.stages[s].layer_names]
    mine = {n: params[n] for n in names}
    out.append(_nbytes(mine) + _nbytes(jax.eval_shape(_optimizer().init, mine)))
  return out


def _check_memory(pipe, state, before: set, z: int, ref_params: dict) -> None:
  """Per device: the state's shards take <= the largest rank's share / (fsdp x tp) x 1.1 (every
  rank's buffers are padded to the largest rank); nothing else bigger than one layer's share
  (params + Adam moments) / (fsdp x tp) is alive after init."""
  leaves = jax.tree.leaves((state.params, state.opt_state))
  share = max(_rank_shares(pipe, ref_params))
  measured = hkpipe.sharding.shard_bytes(leaves)
  assert set(measured) == set(pipe.layout.device_grid.flat)
  for d, nbytes in measured.items():
    assert nbytes <= share / z * 1.1, (d, nbytes, share, z)
  for a in leaves:                    # really split: each shard is 1/z of the rank's row
    assert {s.data.shape for s in a.addressable_shards} == {(1, a.shape[1] // z)}
  layer_share = max(_nbytes(p) * 3 / z for p in ref_params.values())
  ids = {id(a) for a in leaves}
  # The state's own per-device buffers (``shard.data`` views of them are live arrays too).
  own = {sh.data.unsafe_buffer_pointer() for a in leaves for sh in a.addressable_shards}
  for a in jax.live_arrays():
    if id(a) in ids or id(a) in before:
      continue
    if a.is_fully_addressable and len(a.addressable_shards) == 1 and (
        a.addressable_shards[0].data.unsafe_buffer_pointer() in own):
      continue
    for shard in a.addressable_shards:
      assert shard.data.nbytes <= layer_share, (a.shape, a.sharding, layer_share)


def _check_equivalence(name, shape, axes, schedule):
  _, batch = _case(name)
  ref = helpers.sharded_reference(name)   # before the live-array snapshot
  pipe = _pipeline(name, shape, axes, schedule)
  before = {id(a) for a in jax.live_arrays()}
  state = pipe.init(KEY, batch)
  sizes = dict(zip(axes, shape))
  _check_memory(pipe, state, before, sizes.get("fsdp", 1) * sizes.get("tp", 1),
                ref.init_params)
  return pipe, helpers.assert_sharded_matches_reference(name, pipe, state, ref)


MESHES = {"fsdp2": ((2, 2), ("pp", "fsdp")), "tp2": ((2, 2), ("pp", "tp")),
          "fsdp2_tp2": ((2, 2, 2), ("pp", "fsdp", "tp"))}
FAST = [("gpt", "fsdp2_tp2", "1f1b"), ("llama", "tp2", "zb_h1"), ("hetero", "fsdp2", "zb_h1")]
ALL = ([(m, mesh, s) for m in ("gpt", "llama") for mesh in MESHES for s in ("1f1b", "zb_h1")]
       + [("hetero", "fsdp2", s) for s in ("1f1b", "zb_h1")])


@pytest.mark.parametrize("name,mesh,schedule", FAST)
def test_matches_single_device(name, mesh, schedule):
  pipe, state = _check_equivalence(name, *MESHES[mesh], schedule)
  if name != "gpt":
    return
  # A canonical round trip (what checkpoints do) puts every buffer back, split alike.
  back = pipe.from_canonical(pipe.to_canonical(state), state.step)
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                  jax.tree.leaves((back.params, back.opt_state))):
    assert a.sharding == b.sharding, (a.sharding, b.sharding)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@pytest.mark.parametrize("name,mesh,schedule", [c for c in ALL if c not in FAST])
def test_matches_single_device_all(name, mesh, schedule):
  _check_equivalence(name, *MESHES[mesh], schedule)


@pytest.mark.parametrize("shape,axes,rules,words", [
    ((2, 2), ("pp", "fsdp"), [(r"attn/w_x$", P("fsdp"))], ["attn/w_x", "matches no parameter"]),
    ((2, 2), ("pp", "fsdp"), [(r"attn/w_q$", P(None, "tp"))],
     ["block_0/attn/w_q", "'tp'", "no 'tp' axis"]),
    ((2, 3), ("pp", "tp"), [(r"attn/w_q$", P(None, "tp"))],
     ["block_0/attn/w_q", "size 16", "tp = 3", "not divisible"]),
])
def test_bad_rules_fail_before_compiling(shape, axes, rules, words):
  model, batch = _case("gpt")
  mesh = jax.make_mesh(shape, axes, devices=jax.devices()[:int(np.prod(shape))])
  pipe = hkpipe.Pipeline(model, _optimizer(), backend="spmd", mesh=mesh, num_microbatches=M,
                         sharding_rules=rules)
  with pytest.raises(hkpipe.ConfigError) as e:
    pipe.init(KEY, batch)
  for w in words:
    assert w in str(e.value), (w, str(e.value))
  assert not pipe.backend._inits and not pipe.backend._programs  # pylint: disable=protected-access


def test_bad_axes_and_batch():
  model, batch = _case("gpt")
  with pytest.raises(hkpipe.ConfigError, match="Mesh axis 'model' is not a pipeline axis"):
    hkpipe.Pipeline(model, _optimizer(), backend="spmd", num_microbatches=M,
                    mesh=jax.make_mesh((2, 2), ("pp", "model"), devices=jax.devices()[:4]))
  # fsdp splits the batch: 6 rows do not make 2 microbatches over fsdp = 4 devices.
  mesh = jax.make_mesh((2, 4), ("pp", "fsdp"), devices=jax.devices()[:8])
  pipe = hkpipe.Pipeline(model, _optimizer(), backend="spmd", mesh=mesh, num_microbatches=M)
  with pytest.raises(ValueError, match=r"dp x fsdp=4 devices.*2 \* 4 = 8; got 6"):
    pipe.init(KEY, (batch[0][:6], batch[1][:6]))
  assert not pipe.backend._inits and not pipe.backend._programs  # pylint: disable=protected-access


def test_zbv_two_stages_per_rank_with_global_norm_clipping():
  """zbv puts GPT's stages 0 and 3 (both sides of the tied embedding) on rank 0: two stages per
  rank, both tie sides in one rank's pieces, tensor-parallel compute, the update layer by layer,
  clipped by the global norm of every piece (``max_grad_norm``), pp2 x fsdp2 x tp2."""
  _, batch = _case("gpt")
  ref = helpers.sharded_reference("gpt", 0.05)
  pipe = _pipeline("gpt", *MESHES["fsdp2_tp2"], "zbv", max_grad_norm=0.05)
  helpers.assert_sharded_matches_reference("gpt", pipe, pipe.init(KEY, batch), ref)
  assert pipe.backend.step_axes.tp_compute
  assert len(pipe.layout.schedule.stages_of_rank(0)) == 2


def test_bf16_parameters_keep_tp_manual_and_train_like_one_device():
  """bfloat16 parameters on pp2 x tp2: jax 0.10's CPU compiler aborts on the tensor-parallel
  backward, so the step keeps ``tp`` manual (storage only) and still trains like one device
  (bf16 tolerances)."""
  config = helpers.SHARDED_GPT.replace(dtype="params=bf16,compute=bf16,output=f32")
  model = hkpipe.models.build(config)
  _, batch = _case("gpt")
  mesh = jax.make_mesh((2, 2), ("pp", "tp"), devices=jax.devices()[:4])
  pipe = hkpipe.Pipeline(model, _optimizer(), backend="spmd", mesh=mesh, num_microbatches=M)
  # bf16 gradients summed in another order: the float32 grad_norm metric moves by ~3e-4.
  hkpipe.testing.assert_pipeline_matches_reference(pipe, batch, steps=1, rng=KEY, rtol=1e-2,
                                                   atol=1e-3)
  assert not pipe.backend.step_axes.tp_compute
  assert pipe.backend.state_shards == 2
