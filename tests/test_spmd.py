"""The shard_map SPMD pipeline backend equals the single-device reference, schedule by schedule."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkpipe
from hkpipe import models
from hkpipe import schedules
from hkpipe._src.backends import spmd
from hkpipe._src.backends.spmd import _pack as _spmd_pack
from hkpipe._src.backends.spmd import _tables as _spmd_tables
from tests import helpers

M = 4          # microbatches
LR = 0.5       # plain SGD with a large step: scaling bugs show
STEPS = 2      # K-step equality

# (name, virtual stages): every schedule the backend advertises.
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zb_h1", 1), ("zbv", 2),
             ("dualpipev", 2)]


def test_advertised_schedules_are_the_tested_ones():
  assert sorted(spmd.SUPPORTED_SCHEDULES) == sorted(name for name, _ in SCHEDULES)


@pytest.fixture(scope="module")
def model():
  return helpers.hetero_model(n_mid=4)  # 8 layers: pp=4 with 2 stages per rank fits


@pytest.fixture(scope="module")
def batch():
  return helpers.token_batch(batch=8)


@pytest.fixture(scope="module")
def reference(model, batch):
  """The single backend's init, loss/grads, K-step metrics and params, computed once."""
  ref = hkpipe.Pipeline(model, optax.sgd(LR), num_microbatches=M, donate=False)
  state = ref.init(jax.random.key(42), batch)
  out = {"init": ref.params(state), "loss_grads": ref.loss_and_grads(state, batch),
         "metrics": []}
  for _ in range(STEPS):
    state, metrics = ref.train_step(state, batch)
    out["metrics"].append(metrics)
  out["params"] = ref.params(state)
  out["eval"] = ref.eval_step(state, batch)
  return out


def _check(pipe, batch, reference, *, steps=STEPS):
  state = pipe.init(jax.random.key(42), batch)
  chex.assert_trees_all_equal(jax.device_get(pipe.params(state)),
                              jax.device_get(reference["init"]))  # bit-exact init
  loss, grads = pipe.loss_and_grads(state, batch)
  helpers.assert_trees_close(loss, reference["loss_grads"][0])
  helpers.assert_trees_close(grads, reference["loss_grads"][1])
  for k in range(steps):
    state, metrics = pipe.train_step(state, batch)
    helpers.assert_trees_close(metrics, reference["metrics"][k])
  if steps == STEPS:
    helpers.assert_trees_close(pipe.params(state), reference["params"], rtol=1e-4, atol=1e-5)
  return state


@pytest.fixture(scope="module")
def trained():
  """(schedule, pp) -> (pipeline, state) of the schedule sweep, reused by later tests."""
  return {}


# pp=4 for the schedules whose rank programs differ most with more ranks (virtual stages,
# split backward); gpipe, 1f1b and dualpipev (zbv's order with another warm-up) run on pp=2
# here and on 4 ranks in tests/test_mpmd.py's matrix (suite time).
PP4 = ("interleaved_1f1b", "zb_h1", "zbv")
CASES = [(name, v, pp) for name, v in SCHEDULES for pp in (2, 4) if pp == 2 or name in PP4]


@pytest.mark.parametrize("name,v,pp", [c if c[2] == 2 else pytest.param(*c, marks=pytest.mark.slow)
                                       for c in CASES])
def test_schedule_matches_reference(model, batch, reference, trained, name, v, pp):
  pipe = hkpipe.Pipeline(model, optax.sgd(LR), backend="spmd", num_microbatches=M,
                         schedule=name, virtual_stages=v, devices=jax.devices()[:pp],
                         donate=False)
  state = _check(pipe, batch, reference)
  layout = pipe.layout
  assert len(layout.stages) == pp * v and layout.schedule.name == name
  # Stage s's parameters live only on its pp slice: one row of the stacked buffer per rank.
  for buf in state.params.values():
    assert buf.shape[0] == pp and buf.sharding.spec[0] == "pp"
  trained[(name, pp)] = (pipe, state)


def test_compiled_memory_follows_the_schedule(model, batch, trained):
  """XLA's own memory analysis: GPipe's program needs m stash rows, 1F1B's only p."""
  temp, report = {}, {}
  for name in ("gpipe", "1f1b"):
    if (name, 2) not in trained:  # the sweep was deselected
      pipe = hkpipe.Pipeline(model, optax.sgd(LR), backend="spmd", num_microbatches=M,
                             schedule=name, devices=jax.devices()[:2], donate=False)
      trained[(name, 2)] = (pipe, pipe.init(jax.random.key(42), batch))
    pipe, state = trained[(name, 2)]
    temp[name] = pipe.memory_analysis(state, batch).temp_size_in_bytes
    report[name] = pipe.layout_report(batch)
  assert report["gpipe"]["stash_slots"] == M and report["1f1b"]["stash_slots"] == 2
  assert report["gpipe"]["per_rank_peak_stash"] == [M, M]
  assert report["1f1b"]["per_rank_peak_stash"] == [2, 1]
  row = report["1f1b"]["stash_row_bytes"]
  assert row == report["gpipe"]["stash_row_bytes"] == max(report["1f1b"]["stash_bytes"])
  assert report["1f1b"]["param_buffer_bytes"] == max(report["1f1b"]["param_bytes"])
  # The stash buffer holds each rank's own peak of its own stage's stash (one stage per rank).
  for name in ("gpipe", "1f1b"):
    rep = report[name]
    assert rep["stash_slot_bytes"] == rep["stash_bytes"]  # single-dtype stashes here
    need = max(n * b for n, b in zip(rep["per_rank_peak_stash"], rep["stash_bytes"]))
    assert need <= rep["stash_buffer_bytes"] <= need + 64
  assert report["gpipe"]["stash_buffer_bytes"] == M * row
  np.testing.assert_allclose(temp["gpipe"] - temp["1f1b"], report["gpipe"]["stash_buffer_bytes"]
                             - report["1f1b"]["stash_buffer_bytes"], rtol=0.05)


def test_dp_mesh_matches_reference(model, batch):
  """pp=2 x dp=2: each microbatch split across the dp replicas, grads averaged."""
  mesh = jax.make_mesh((2, 2), ("pp", "dp"), devices=jax.devices()[:4])
  pipe, state = helpers.assert_matches_reference(model, batch, num_microbatches=M,
                                                 backend="spmd", schedule="1f1b", mesh=mesh)
  ref = hkpipe.Pipeline(model, optax.sgd(LR), num_microbatches=M, donate=False)
  ref_state = ref.from_canonical(pipe.to_canonical(state), state.step)
  helpers.assert_trees_close(pipe.eval_step(state, batch), ref.eval_step(ref_state, batch))


@pytest.fixture(scope="module")
def gpt():
  return models.build(models.GPTConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=1,
                                       n_heads=2))


def _tokens(batch_size, vocab=32, seq=8, seed=1):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, vocab, (batch_size, seq), dtype=np.int32),
          rng.integers(0, vocab, (batch_size, seq), dtype=np.int32))


def test_tied_gpt_pp2_dp2(gpt):
  """Ties across the first and last stage (embedding = head) are summed with a psum over pp."""
  assert gpt.ties
  mesh = jax.make_mesh((2, 2), ("pp", "dp"), devices=jax.devices()[4:8])
  helpers.assert_matches_reference(gpt, _tokens(8), num_microbatches=2, steps=2,
                                   backend="spmd", schedule="zb_h1", mesh=mesh)


def test_llama_pp3_one_layer_per_stage():
  """Grouped-query Llama: embed | block | head on three ranks."""
  model = models.build(models.LlamaConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=1,
                                          n_heads=2, n_kv_heads=1))
  pipe, _ = helpers.assert_matches_reference(model, _tokens(6), num_microbatches=3, steps=2,
                                             backend="spmd", schedule="1f1b",
                                             devices=jax.devices()[:3])
  assert [st.layer_names for st in pipe.layout.stages] == [
      ("embed",), ("block_0",), ("head",)]


def test_gpt_dropout_with_remat_reproduces_reference_masks():
  """Dropout keys (microbatch, global layer index) are the reference's; remat stashes only
  the stage inputs (and the key) and recomputes the forward in backward."""
  model = models.build(models.GPTConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=1,
                                        n_heads=2, dropout=0.3))
  batch = _tokens(8)
  ref = hkpipe.Pipeline(model, optax.sgd(LR), num_microbatches=2, donate=False)
  pipe = hkpipe.Pipeline(model, optax.sgd(LR), backend="spmd", num_microbatches=2,
                         schedule="1f1b", remat=True, devices=jax.devices()[:2], donate=False,
                         partition=[2])  # explicit boundaries: from_canonical needs no init
  ref_state = ref.init(jax.random.key(5), batch)
  state = pipe.from_canonical(ref.to_canonical(ref_state), 3)  # a step > 0: keys fold the step
  ref_state = ref.from_canonical(ref.to_canonical(ref_state), 3)
  loss, grads = pipe.loss_and_grads(state, batch)
  ref_loss, ref_grads = ref.loss_and_grads(ref_state, batch)
  helpers.assert_trees_close(loss, ref_loss)
  helpers.assert_trees_close(grads, ref_grads)
  no_dropout = ref.eval_step(ref_state, batch)["loss"]
  assert abs(float(ref_loss) - float(no_dropout)) > 1e-3  # dropout is really active
  assert [st.layer_names for st in pipe.layout.stages] == [
      ("embed", "block_0"), ("head",)]
  prog, _ = next(iter(pipe.backend._programs.values()))
  stash = [leaf.dtype for b in prog.backward for leaf in b.layout.avals]
  assert any(jax.dtypes.issubdtype(d, jax.dtypes.prng_key) for d in stash)


def test_max_grad_norm_eval_and_canonical_adam_state(model, batch):
  """Clipping by the norm over all stages; eval; to_canonical/from_canonical with Adam."""
  kw = dict(num_microbatches=M, max_grad_norm=0.05)
  opt = optax.adam(1e-2)
  ref = hkpipe.Pipeline(model, opt, donate=False, **kw)
  pipe = hkpipe.Pipeline(model, opt, backend="spmd", schedule="1f1b",
                         devices=jax.devices()[:2], **kw)
  state, ref_state = pipe.init(jax.random.key(1), batch), ref.init(jax.random.key(1), batch)
  for _ in range(STEPS):
    state, metrics = pipe.train_step(state, batch)
    ref_state, ref_metrics = ref.train_step(ref_state, batch)
    helpers.assert_trees_close(metrics, ref_metrics)
    assert float(ref_metrics["grad_norm"]) > 2 * 0.05  # the clip is active
  helpers.assert_trees_close(pipe.eval_step(state, batch), ref.eval_step(ref_state, batch))
  canonical, expected = pipe.to_canonical(state), ref.to_canonical(ref_state)
  helpers.assert_trees_close(canonical["opt_state"], expected["opt_state"], rtol=1e-4, atol=1e-5)
  helpers.assert_trees_close(canonical["params"], expected["params"], rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_equal(jax.random.key_data(canonical["rng"]),
                              jax.random.key_data(expected["rng"]))
  again = pipe.to_canonical(pipe.from_canonical(canonical, state.step))
  chex.assert_trees_all_equal(jax.device_get(again["params"]), jax.device_get(canonical["params"]))
  chex.assert_trees_all_equal(jax.device_get(again["opt_state"]),
                              jax.device_get(canonical["opt_state"]))
  # Continue from the reference's own state: identical next step.
  state = pipe.from_canonical(expected, ref_state.step)
  state, metrics = pipe.train_step(state, batch)
  ref_state, ref_metrics = ref.train_step(ref_state, batch)
  helpers.assert_trees_close(metrics, ref_metrics)
  helpers.assert_trees_close(pipe.params(state), ref.params(ref_state))


def test_custom_schedule_object_and_inputs_from_anywhere(model, batch, reference):
  """A hand-written Schedule runs as given; inputs may start committed to any device."""
  text = "\n".join([
      "0F0 0F1 0F2 0F3 0B0 0B1 0B2 0B3",        # rank 0: GPipe order
      "1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3",        # rank 1: 1F1B order
  ])
  custom = schedules.from_text(text)
  pipe = hkpipe.Pipeline(model, optax.sgd(LR), backend="spmd", num_microbatches=M,
                         schedule=custom, devices=jax.devices()[6:8], donate=False)
  elsewhere = jax.device_put(batch, jax.devices()[0])
  _check(pipe, elsewhere, reference, steps=1)


# -- packing of heterogeneous stages ---------------------------------------------------------------


def _mixed_tree():
  key = jax.random.key(7)
  return {"f32": jnp.arange(6.0).reshape(2, 3), "bf16": jnp.linspace(-1, 1, 5, dtype=jnp.bfloat16),
          "i32": jnp.array([[-3], [40000]], jnp.int32), "mask": jnp.array([True, False, True]),
          "key": jax.random.split(key, 2), "empty": jnp.zeros((0, 4))}


def _assert_same(actual, expected):
  actual = jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x, actual)
  expected = jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x, expected)
  chex.assert_trees_all_equal(actual, expected)
  chex.assert_trees_all_equal_dtypes(actual, expected)


def test_byte_codec_round_trips_every_dtype_with_padding():
  tree = _mixed_tree()
  codec = _spmd_pack.ByteCodec.of(tree)
  assert codec.nbytes == 6 * 4 + 5 * 2 + 2 * 4 + 3 * 1 + 2 * 2 * 4
  buf = codec.pack(tree, codec.nbytes + 13)
  assert buf.dtype == jnp.uint8 and buf.shape == (codec.nbytes + 13,)
  np.testing.assert_array_equal(np.asarray(buf[codec.nbytes:]), 0)
  _assert_same(codec.unpack(buf), tree)
  with pytest.raises(ValueError, match="too small"):
    codec.pack(tree, codec.nbytes - 1)


def test_flat_layout_shares_buffers_and_writes_rows():
  a, b = _mixed_tree(), {"w": jnp.ones((2, 2)), "n": jnp.array([5], jnp.int32)}
  lay_a = _spmd_pack.FlatLayout.of(a)
  lay_b = _spmd_pack.FlatLayout.of(b, lay_a.ends)          # b follows a in the same buffers
  sizes = _spmd_pack.padded_sizes([lay_a, lay_b])
  assert sizes["float32"] == 6 + 4 and sizes["uint32"] == 4 and sizes["int32"] == 2 + 1
  bufs = lay_b.pack_into(lay_a.pack_into(_spmd_pack.zeros(sizes), a), b)
  _assert_same(lay_a.unpack(bufs), a)
  _assert_same(lay_b.unpack(bufs), b)
  bufs = lay_b.pack_into(bufs, b, add=True)
  _assert_same(lay_b.unpack(bufs), jax.tree.map(lambda x: 2 * x, b))
  _assert_same(lay_a.unpack(bufs), a)                     # untouched by b's accumulation
  slots = {k: jnp.zeros((3 * n,), k) for k, n in sizes.items()}  # 3 slots of stride `sizes`
  slots = lay_a.write_slot(slots, a, jnp.int32(2), sizes)
  _assert_same(lay_a.read_slot(slots, jnp.int32(2), sizes), a)
  assert all(float(jnp.abs(v[:2 * sizes[k]].astype(jnp.float32)).sum()) == 0
             for k, v in slots.items())
  assert lay_a.slots[lay_a.leaf_index(("i32",))] == ("int32", 0, 2)


# -- memory profile: stash slots are the schedule's simulated peak --------------------------------


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 3)])
@pytest.mark.parametrize("name,v", SCHEDULES)
def test_stash_slots_follow_the_schedule_peak(name, v, p, m):
  schedule = schedules.get(name, num_ranks=p, num_microbatches=m, virtual_stages=v)
  tables = _spmd_tables.build(schedule)
  assert tables.stash_peak == schedules.peak_activations(schedule)
  assert tables.num_stash == max(tables.stash_peak)
  # Each rank runs its own actions in its own order, one per tick.
  for r in range(p):
    ran = [(tables.branches[b], int(mb)) for b, mb in zip(tables.branch[r], tables.mb[r]) if b]
    expected = [((a.kind, a.stage), a.mb) for a in schedule.compute_actions(r)]
    assert ran == expected


def test_gpipe_stashes_every_microbatch_1f1b_only_p():
  p, m = 2, 8
  gpipe = _spmd_tables.build(schedules.get("gpipe", num_ranks=p, num_microbatches=m))
  one_f_one_b = _spmd_tables.build(schedules.get("1f1b", num_ranks=p, num_microbatches=m))
  assert gpipe.stash_peak == (m, m)
  assert one_f_one_b.stash_peak == (p, 1)
  assert gpipe.num_ticks == one_f_one_b.num_ticks == 2 * (m + p - 1)


# -- clear errors before compiling ---------------------------------------------------------------


def test_bad_configurations_raise_before_compiling(model, batch):
  def pipe(**kw):
    kw.setdefault("num_microbatches", M)
    return hkpipe.Pipeline(model, optax.sgd(0.1), backend="spmd", **kw)

  with pytest.raises(hkpipe.ConfigError, match="'pp' as their first axis"):
    pipe(mesh=jax.make_mesh((2, 2), ("dp", "pp")))
  with pytest.raises(hkpipe.ConfigError, match="Mesh axis 'stage' is not a pipeline axis"):
    pipe(mesh=jax.make_mesh((4,), ("stage",)))
  with pytest.raises(ValueError, match="either devices"):
    pipe(mesh=jax.make_mesh((2,), ("pp",)), devices=jax.devices()[:2])
  with pytest.raises(ValueError, match="does not support schedule 'wavefront'"):
    pipe(schedule="wavefront")
  with pytest.raises(ValueError, match=r"multiple of 4 \* 2 = 8"):
    pipe(mesh=jax.make_mesh((2, 2), ("pp", "dp"))).init(jax.random.key(0),
                                                         helpers.token_batch(batch=4))
  # 4 ranks x 2 stages per rank = 8 stages, but a 7-layer model.
  with pytest.raises(ValueError, match="needs 8 stages"):
    hkpipe.Pipeline(helpers.hetero_model(n_mid=3), optax.sgd(0.1), backend="spmd",
                    num_microbatches=M, schedule="interleaved_1f1b", virtual_stages=2,
                    devices=jax.devices()[:4]).init(jax.random.key(0), batch)
  # A schedule object for 4 ranks on a 2-rank pipeline.
  with pytest.raises(ValueError, match="4 ranks but the pipeline has 2"):
    pipe(schedule=schedules.get("1f1b", num_ranks=4, num_microbatches=M),
         devices=jax.devices()[:2]).init(jax.random.key(0), batch)
  with pytest.raises(ValueError, match="num_ranks=3"):
    pipe(num_ranks=3, devices=jax.devices()[:2]).init(jax.random.key(0), batch)
  # A schedule that never runs 1B3.
  broken = schedules.from_text("0F0 0F1 0F2 0F3 0B0 0B1 0B2 0B3\n1F0 1B0 1F1 1B1 1F2 1B2 1F3")
  with pytest.raises(ValueError, match="1B3"):
    pipe(schedule=broken, devices=jax.devices()[:2]).init(jax.random.key(0), batch)
  with pytest.raises(ValueError, match="call init"):
    p = pipe(devices=jax.devices()[:2])
    p.from_canonical({"params": {}, "opt_state": (), "rng": jax.random.key(0)}, 0)
