"""Pipeline.generate: KV-cache decoding on the MPMD stages equals single-device decoding."""

import jax
import numpy as np
import optax
import pytest

import hkpipe
import hkpipe.models as M
from tests import helpers

B, T, V = 4, 16, 48
CONFIG = M.LlamaConfig(vocab_size=V, seq_len=T, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2)


def batch():
  x = np.random.default_rng(0).integers(0, V, (B, T)).astype(np.int32)
  return x, x


@pytest.fixture(scope="module")
def model():
  return M.build(CONFIG)


def mpmd(model, stages, **kw):  # stages=None: from the mesh
  """An MPMD pipeline, its initial state and that state's canonical params on one device (the
  single-device reference; gathered here, by the test, before decoding)."""
  pipe = hkpipe.Pipeline(model, optax.adam(1e-2), backend="mpmd", num_ranks=stages,
                         num_microbatches=2, **kw)
  state = pipe.init(jax.random.key(0), batch())
  return pipe, state, jax.device_put(pipe.params(state), jax.devices()[0])


def single_device(model, params, prompt, **kw):
  return np.asarray(M.generate(model, params, prompt, use_cache=True, **kw))


def spy_on_stages(monkeypatch):
  """Records, per stage program call: (first layer, input devices, output devices, the cache
  leaves' shardings after the call)."""
  from hkpipe._src import pipelined_decode
  seen = []
  stage = pipelined_decode._stage

  def spy(layers, params, x, caches, pos):
    where = lambda tree: {d for leaf in jax.tree.leaves(tree) for d in leaf.devices()}
    inputs = where((params, x, caches))
    y, caches = stage(layers, params, x, caches, pos)
    seen.append((layers[0].name, inputs, where((y, caches)),
                 [leaf.sharding for leaf in jax.tree.leaves(caches)]))
    return y, caches

  monkeypatch.setattr(pipelined_decode, "_stage", spy)
  return seen


@pytest.mark.parametrize("stages,dp,groups", [(2, 2, (1, 2)), (4, 1, (4, 4))])
def test_mpmd_decoding_equals_single_device(model, monkeypatch, stages, dp, groups):
  mesh = jax.make_mesh((stages, dp), ("pp", "dp"), devices=jax.devices()[:stages * dp],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  pipe, state, params = mpmd(model, None, mesh=mesh)
  seen = spy_on_stages(monkeypatch)

  def no_gather(*args, **kwargs):
    raise AssertionError("decoding gathered the model")

  pipe.backend.to_canonical = no_gather  # decoding must use the stages where they live
  pipe.backend.params = no_gather
  prompt = batch()[0][:, :6]
  kw = dict(max_new_tokens=T - 6, rng=jax.random.key(0), temperature=0.0)
  greedy = single_device(model, params, prompt, **kw)
  assert len(np.unique(greedy[:, 6:])) > 3
  out = pipe.generate(state, prompt, num_groups=groups[0], **kw)
  np.testing.assert_array_equal(np.asarray(out), greedy)
  kw = dict(max_new_tokens=T - 6, rng=jax.random.key(3), temperature=1.0, top_k=20, top_p=0.9)
  want = single_device(model, params, prompt, **kw)
  sampled = pipe.generate(state, prompt, num_groups=groups[1], **kw)
  np.testing.assert_array_equal(np.asarray(sampled), want)
  kw["end_token"] = int(want[1, 8])  # row 1 stops there, the others when they draw it
  stopped = single_device(model, params, prompt, **kw)
  assert (stopped[1, 8:] == kw["end_token"]).all()
  np.testing.assert_array_equal(
      np.asarray(pipe.generate(state, prompt, num_groups=groups[1], **kw)), stopped)
  ranks = {spec.layer_names[0]: set(pipe.layout.stage_devices(spec.index))
           for spec in pipe.layout.stages}
  for name, inputs, outputs, cache_shardings in seen:  # every stage on its rank, rows over dp
    assert inputs == outputs == ranks[name]
    assert all(sh.spec == (jax.sharding.PartitionSpec("dp") if dp > 1 else
                           jax.sharding.PartitionSpec()) for sh in cache_shardings)


def test_each_stage_decodes_on_its_rank(model, monkeypatch):
  """Every stage program runs with its inputs, caches and outputs on its rank's devices only."""
  ranks = [jax.devices()[5:6], jax.devices()[2:3]]
  pipe, state, _ = mpmd(model, 2, devices=[d for r in ranks for d in r])
  seen = spy_on_stages(monkeypatch)
  out = pipe.generate(state, batch()[0][:, :3], max_new_tokens=4, rng=jax.random.key(0))
  assert out.shape == (B, 7)
  first_layer = [spec.layer_names[0] for spec in pipe.layout.stages]
  assert len(seen) == 2 * 2 * 4  # 2 groups x 2 stages x (prefill + 3 steps)
  for name, inputs, outputs, _ in seen:
    rank = first_layer.index(name)
    assert inputs == outputs == set(ranks[rank]), (name, inputs, outputs)


def test_bad_arguments_fail_before_compiling(model):
  from hkpipe._src import pipelined_decode
  pipe, state, _ = mpmd(model, 2)
  before = pipelined_decode._stage._cache_size()
  prompt = batch()[0][:, :4]
  key = jax.random.key(0)
  with pytest.raises(hkpipe.ConfigError, match=r"num_groups=3 .* \[1, 2, 4\]"):
    pipe.generate(state, prompt, max_new_tokens=2, rng=key, num_groups=3)
  with pytest.raises(hkpipe.ConfigError, match="more than the model's context"):
    pipe.generate(state, batch()[0][:, :1].repeat(T + 1, axis=1), max_new_tokens=1, rng=key)
  with pytest.raises(hkpipe.ConfigError, match="top_p"):
    pipe.generate(state, prompt, max_new_tokens=2, rng=key, top_p=0.0)
  np.testing.assert_array_equal(  # nothing to decode: the prompt, nothing compiled
      np.asarray(pipe.generate(state, prompt, max_new_tokens=0, rng=key)), prompt)
  assert pipelined_decode._stage._cache_size() == before
  pmap = hkpipe.Pipeline(model, optax.adam(1e-2), backend="pmap", num_microbatches=2)
  with pytest.raises(hkpipe.ConfigError, match="decodes where the stages live.*backend='pmap'"):
    pmap.generate(None, prompt, max_new_tokens=2, rng=key)
  assert not pmap.decodes_in_place and pipe.decodes_in_place


def test_spmd_decodes_each_stage_on_its_rank(model, monkeypatch, schedule="zbv"):
  """spmd (2 ranks x 2 dp devices, zbv: 2 stages per rank) decodes every stage on its rank's
  devices from the packed state, without gathering, and equals one device."""
  mesh = jax.make_mesh((2, 2), ("pp", "dp"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  pipe = hkpipe.Pipeline(model, optax.adam(1e-2), backend="spmd", mesh=mesh, schedule=schedule,
                         num_microbatches=2)
  state = pipe.init(jax.random.key(0), batch())
  with helpers.backend_compiles() as compiles:     # arguments are checked before any unpacking
    with pytest.raises(hkpipe.ConfigError, match="num_groups=3"):
      pipe.generate(state, batch()[0][:, :6], max_new_tokens=2, rng=jax.random.key(0),
                    num_groups=3)
    np.testing.assert_array_equal(
        np.asarray(pipe.generate(state, batch()[0][:, :6], max_new_tokens=0,
                                 rng=jax.random.key(0))), batch()[0][:, :6])
  assert not compiles
  params = jax.device_put(pipe.params(state), jax.devices()[0])   # the reference's, gathered
  seen = spy_on_stages(monkeypatch)
  pipe.backend.params = pipe.backend.to_canonical = None          # any gather would fail
  prompt = batch()[0][:, :6]
  kw = dict(max_new_tokens=T - 6, rng=jax.random.key(0), temperature=0.0)
  np.testing.assert_array_equal(np.asarray(pipe.generate(state, prompt, **kw)),
                                single_device(model, params, prompt, **kw))
  kw = dict(max_new_tokens=T - 6, rng=jax.random.key(3), temperature=1.0, top_k=20)
  np.testing.assert_array_equal(np.asarray(pipe.generate(state, prompt, num_groups=4, **kw)),
                                single_device(model, params, prompt, **kw))
  ranks = {spec.layer_names[0]: set(pipe.layout.stage_devices(spec.index))
           for spec in pipe.layout.stages}
  assert len(ranks) == 4 and seen
  for name, inputs, outputs, _ in seen:
    assert inputs == outputs == ranks[name], (name, inputs, outputs)


def test_sharded_stages_decode_in_place(model, monkeypatch):
  """On a pp2 x fsdp2 x tp2 mesh (parameters sharded inside each stage) decoding runs on each
  rank's 4 devices, with the sharded parameters as they are, and equals one device."""
  mesh = jax.make_mesh((2, 2, 2), ("pp", "fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  pipe, state, params = mpmd(model, None, mesh=mesh)
  sharded = [leaf for leaf in jax.tree.leaves(state.params)
             if getattr(leaf, "ndim", 0) == 2 and not leaf.sharding.is_fully_replicated]
  assert sharded  # the rules did shard the stages
  seen = spy_on_stages(monkeypatch)
  pipe.backend.params = pipe.backend.to_canonical = None  # any gather would fail
  prompt = batch()[0][:, :5]
  kw = dict(max_new_tokens=T - 5, rng=jax.random.key(0), temperature=0.0)
  out = pipe.generate(state, prompt, num_groups=2, **kw)
  np.testing.assert_array_equal(np.asarray(out), single_device(model, params, prompt, **kw))
  ranks = {spec.layer_names[0]: set(pipe.layout.stage_devices(spec.index))
           for spec in pipe.layout.stages}
  assert seen and all(len(devs) == 4 for devs in ranks.values())
  for name, inputs, outputs, _ in seen:
    assert inputs == outputs == ranks[name]
