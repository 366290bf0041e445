"""MPMD with mesh axes inside stages (fsdp, tp): equivalence with one device, memory, errors.

Each case builds an MPMD pipeline on a ``("pp", "fsdp", "tp")`` mesh of the 8 simulated devices
and checks, against the single-device reference (fp32, rtol 1e-5, atol 1e-6): the initial
parameters, the loss and every gradient leaf, and two AdamW steps (losses and parameters).
Memory is measured from the arrays' addressable shards (``shard.data.nbytes``) and
``jax.live_arrays()``, not from the sharding rules.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import hkpipe
from hkpipe._src.backends import _mpmd_compile
from tests import helpers

M = helpers.SHARDED_M
MIN_SIZE = 32          # small leaves stay replicated; the tiny test matrices are sharded
KEY = jax.random.key(helpers.SHARDED_SEED)
GPT, LLAMA = helpers.SHARDED_GPT, helpers.SHARDED_LLAMA
_optimizer = helpers.sharded_optimizer
_case = helpers.sharded_case


@pytest.fixture(scope="module")
def cache():
  return _mpmd_compile.ProgramCache()


def _rules(name: str, axes: tuple[str, ...]) -> Any:
  if name == "hetero" or "tp" not in axes:
    return hkpipe.sharding.Rules(fsdp_min_size=MIN_SIZE)
  return hkpipe.models.sharding_rules(GPT if name == "gpt" else LLAMA,
                                      axes=tuple(a for a in ("fsdp", "tp") if a in axes),
                                      fsdp_min_size=MIN_SIZE)


def _pipeline(name: str, shape: tuple[int, ...], axes: tuple[str, ...], schedule: str, cache,
              **kw) -> hkpipe.Pipeline:
  model, _ = _case(name)
  mesh = jax.make_mesh(shape, axes, devices=jax.devices()[:int(np.prod(shape))])
  kw.setdefault("sharding_rules", _rules(name, axes))
  pipe = hkpipe.Pipeline(model, _optimizer(), backend="mpmd", mesh=mesh, num_microbatches=M,
                         schedule=schedule, donate=False, **kw)
  pipe.backend.cache = cache
  return pipe


def _state_leaves(state) -> list:
  return jax.tree.leaves((state.params, state.opt_state))


def _tied_leaves(pipe, state) -> list:
  """Both copies of every weight tied across stages (GPT: embedding on the first stage, head on
  the last)."""
  out = []
  for tie in pipe.backend.model.ties:
    for layer, module, param in (tie.source, tie.target):
      for s, spec in enumerate(pipe.layout.stages):
        if layer in spec.layer_names:
          out.append(state.params[s][layer][module][param])
  return out


def _check_memory(pipe, state, before: set, fsdp: int, tp: int) -> None:
  """Per device: the shards of the sharded state leaves take <= their share / (fsdp x tp) x 1.1;
  every 2-D parameter (tied ones too) is sharded; nothing else bigger than one layer's share is
  alive."""
  k = fsdp * tp
  leaves = _state_leaves(state)
  for a in _tied_leaves(pipe, state):   # the tie exchange moves sharded gradients
    assert not a.sharding.is_fully_replicated, (a.shape, a.sharding)
    assert max(hkpipe.sharding.shard_bytes([a]).values()) <= a.nbytes / k * 1.1
  for s, spec in enumerate(pipe.layout.stages):
    for layer in spec.layer_names:
      for path, leaf in jax.tree_util.tree_flatten_with_path(state.params[s][layer])[0]:
        if fsdp == 1 and "wpe" in str(path):
          continue          # no tensor-parallel rule for GPT's position table
        if leaf.ndim == 2 and leaf.size >= MIN_SIZE:
          assert not leaf.sharding.is_fully_replicated, (layer, leaf.shape, leaf.sharding)
  sharded = [a for a in leaves if not a.sharding.is_fully_replicated]
  assert sharded
  for r in range(pipe.layout.num_ranks):
    devices = set(pipe.layout.rank_devices(r))
    on_rank = [a for a in sharded if set(a.sharding.device_set) == devices]
    share = sum(a.nbytes for a in on_rank)
    measured = hkpipe.sharding.shard_bytes(on_rank)
    assert set(measured) == devices
    for d, nbytes in measured.items():
      assert nbytes <= share / k * 1.1, (r, d, nbytes, share, k)
  # After init, no other new array bigger than one layer's share on a device.
  layer_share = max(
      sum(a.nbytes for a in jax.tree.leaves(state.params[s][n])) * 3 / k   # params + Adam mu, nu
      for s, spec in enumerate(pipe.layout.stages) for n in spec.layer_names)
  ids = {id(a) for a in leaves}
  for a in jax.live_arrays():
    if id(a) in ids or id(a) in before:
      continue
    for shard in a.addressable_shards:
      assert shard.data.nbytes <= layer_share, (a.shape, a.sharding, layer_share)


def _check_equivalence(name, shape, axes, schedule, cache, **kw):
  _, batch = _case(name)
  ref = helpers.sharded_reference(name, kw.get("max_grad_norm"))   # before the live-array snapshot
  pipe = _pipeline(name, shape, axes, schedule, cache, **kw)
  before = {id(a) for a in jax.live_arrays()}
  state = pipe.init(KEY, batch)
  sizes = dict(zip(axes, shape))
  _check_memory(pipe, state, before, sizes.get("fsdp", 1), sizes.get("tp", 1))
  return pipe, helpers.assert_sharded_matches_reference(name, pipe, state, ref)


MESHES = {"fsdp2": ((2, 2), ("pp", "fsdp")), "tp2": ((2, 2), ("pp", "tp")),
          "fsdp2_tp2": ((2, 2, 2), ("pp", "fsdp", "tp"))}
FAST = [("gpt", "fsdp2_tp2", "1f1b"), ("llama", "tp2", "zb_h1"), ("hetero", "fsdp2", "zb_h1")]
ALL = ([(m, mesh, s) for m in ("gpt", "llama") for mesh in MESHES for s in ("1f1b", "zb_h1")]
       + [("hetero", "fsdp2", s) for s in ("1f1b", "zb_h1")])


@pytest.mark.parametrize("name,mesh,schedule", FAST)
def test_matches_single_device(name, mesh, schedule, cache):
  pipe, state = _check_equivalence(name, *MESHES[mesh], schedule, cache)
  if name != "gpt":
    return
  # A canonical round trip (what checkpoints do) puts every leaf back into its sharding.
  back = pipe.from_canonical(pipe.to_canonical(state), state.step)
  for a, b in zip(_state_leaves(state), _state_leaves(back)):
    assert a.sharding == b.sharding, (a.sharding, b.sharding)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The planner, from abstract shapes only, agrees with the bytes measured on the devices.
  _, batch = _case(name)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  plan = pipe.memory_analysis(None, abstract)
  for r, rank in enumerate(plan["ranks"]):
    stage_state = [_state_leaves(state)[i] for i, a in enumerate(_state_leaves(state))
                   if set(a.sharding.device_set) == set(pipe.layout.rank_devices(r))]
    measured = hkpipe.sharding.shard_bytes(stage_state)
    assert set(measured.values()) == {rank["params_bytes"] + rank["opt_state_bytes"]}, (
        r, measured, rank)
    assert rank["programs"] and all(p["argument_size_in_bytes"] > 0
                                    for p in rank["programs"].values())
    assert rank["total_bytes"] >= rank["state_bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name,mesh,schedule", [c for c in ALL if c not in FAST])
def test_matches_single_device_all(name, mesh, schedule, cache):
  _check_equivalence(name, *MESHES[mesh], schedule, cache)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(skip_nonfinite=False), dict(max_grad_norm=0.05)])
def test_fused_and_clipped_updates(kw, cache):
  """The fused finalize+update program (no guard) and clipping, on sharded state."""
  _check_equivalence("gpt", *MESHES["fsdp2_tp2"], "1f1b", cache, **kw)


def test_tied_weights_in_different_layouts(cache):
  """The two copies of GPT's tied embedding laid out differently (embedding rows over fsdp by
  the default rule, head columns by this rule): the tie exchange reshards each gradient into its
  partner's layout, and training still matches one device."""
  rules = hkpipe.sharding.Rules(((r"^head/lm_head/w$", P(None, "fsdp")),), fsdp_min_size=MIN_SIZE)
  pipe, state = _check_equivalence("gpt", *MESHES["fsdp2"], "zb_h1", cache, sharding_rules=rules)
  embed, head = _tied_leaves(pipe, state)
  assert embed.sharding.spec == P("fsdp") or embed.sharding.spec == P("fsdp", None), embed.sharding
  assert head.sharding.spec == P(None, "fsdp"), head.sharding
  np.testing.assert_array_equal(np.asarray(embed), np.asarray(head))   # still one weight


def test_default_rules_and_layout():
  """No rules given: a GPT on a tp mesh uses hkpipe.models.sharding_rules; the layout reports
  the sub-mesh. Nothing is compiled (``describe`` only lowers the instruction program)."""
  model, batch = _case("gpt")
  mesh = jax.make_mesh((2, 2, 2), ("pp", "fsdp", "tp"))
  pipe = hkpipe.Pipeline(model, _optimizer(), backend="mpmd", mesh=mesh, num_microbatches=M)
  pipe.backend.describe(batch)
  layout = pipe.layout
  assert (layout.dp, layout.fsdp, layout.tp, layout.num_ranks) == (1, 2, 2, 2)
  assert layout.rank_mesh(1).axis_names == ("dp", "fsdp", "tp")
  assert set(layout.rank_mesh(1).devices.flat) == set(jax.devices()[4:8])
  setup = next(iter(pipe.backend._setups.values()))  # pylint: disable=protected-access
  names = jax.tree_util.tree_flatten_with_path(
      setup.stage_dict(0, list(range(setup.fns[0].np))))[0]
  specs = {hkpipe._src.sharding.leaf_path(k): setup.pspecs[0][i] for k, i in names}
  assert specs["block_0/attn/w_q"] == P("fsdp", "tp")
  assert specs["block_0/mlp/w_out"] == P("tp", "fsdp")
  assert specs["block_0/ln_1/scale"] == P()                 # below the default size threshold
  assert specs["embed/wte/embeddings"] == P("tp", "fsdp")   # tied across stages: sharded too
  assert cache_free(pipe)


def cache_free(pipe) -> bool:
  return pipe.backend.cache.stats.compiled == 0 and pipe.backend.cache.stats.traced == 0


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
  pipe = hkpipe.Pipeline(model, _optimizer(), backend="mpmd", mesh=mesh, num_microbatches=M,
                         sharding_rules=rules)
  with pytest.raises(hkpipe.ConfigError) as e:
    pipe.init(KEY, batch)
  for w in words:
    assert w in str(e.value), (w, str(e.value))
  assert cache_free(pipe)


def test_bad_axes_fail_at_construction():
  model, _ = _case("gpt")
  with pytest.raises(hkpipe.ConfigError, match="Mesh axis 'model' is not a pipeline axis"):
    hkpipe.Pipeline(model, _optimizer(), backend="mpmd", num_microbatches=M,
                    mesh=jax.make_mesh((2, 2), ("pp", "model"), devices=jax.devices()[:4]))
  with pytest.raises(hkpipe.ConfigError, match="only over"):
    hkpipe.Pipeline(model, _optimizer(), backend="mpmd", num_microbatches=M,
                    sharding_rules=[("w_q", P("dp"))])
  with pytest.raises(hkpipe.ConfigError, match="does not use sharding_rules"):
    hkpipe.Pipeline(model, _optimizer(), backend="single", sharding_rules=[("w_q", P("tp"))])
