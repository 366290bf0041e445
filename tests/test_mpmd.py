"""Correctness suite of the MPMD backend against the single-device reference.

All pipelines of this module share one :class:`ProgramCache`, so a stage program compiled for one
schedule (or rank count) is reused, or cloned onto other devices, by the next: the suite pays XLA
compile once per distinct program. References (single device) are computed once per model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkpipe
from hkpipe import models
from hkpipe import schedules
from hkpipe._src.backends import _mpmd_compile
from hkpipe._src.backends import _mpmd_plan

from tests import helpers

M = 4                # microbatches
LR = 0.5             # plain SGD, large lr (as in helpers.assert_matches_reference)
STEPS = 2            # optimizer steps compared per configuration
RANKS = (2, 4)
SCHEDULES = schedules.names()
KEY = jax.random.key(42)
Kind = schedules.Kind


# -- models and references -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  """A model, a batch and (optionally) explicit uneven stage boundaries per stage count."""

  model: hkpipe.SequentialModel
  batch: tuple[np.ndarray, np.ndarray]
  boundaries: Callable[[int], list[int]] | None = None


def _uneven(num_stages: int) -> list[int]:
  # 9 layers: embed, widen, mid_0..mid_4, narrow, head.
  return {2: [1], 4: [1, 2, 8], 8: [1, 2, 3, 4, 5, 6, 8]}[num_stages]


def _gpt(**kw) -> hkpipe.SequentialModel:
  return models.build(models.GPTConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=6,
                                       n_heads=2, **kw))


def _dropout_model() -> hkpipe.SequentialModel:
  """embed -> 3 x dropout(tanh(linear)) -> head: dropout in every stage of a 2-rank cut."""

  def embed(x, is_training):
    del is_training
    return hk.Embed(11, 8)(x)                                        # [B, T, 8]

  def noisy(x, is_training):
    h = jnp.tanh(hk.Linear(8)(x))                                    # [B, T, 8]
    return hk.dropout(hk.next_rng_key(), 0.3, h) if is_training else h

  def head(x, is_training):
    del is_training
    return hk.Linear(11)(x)                                          # [B, T, 11]

  layers = [hkpipe.Layer.from_fn("embed", embed)]
  layers += [hkpipe.Layer.from_fn(f"noisy_{i}", noisy) for i in range(3)]
  layers.append(hkpipe.Layer.from_fn("head", head))
  return hkpipe.SequentialModel(layers, helpers.token_ce)


@functools.lru_cache(maxsize=None)
def case(name: str) -> Case:
  lm_batch = helpers.token_batch(batch=8, seq=8, vocab=32, seed=1)
  if name == "hetero":     # 8 layers, activations change shape and dtype between stages
    return Case(helpers.hetero_model(n_mid=4), helpers.token_batch(batch=8, seq=5))
  if name == "uneven":     # 9 layers cut by hand into stages of very different sizes
    return Case(helpers.hetero_model(n_mid=5), helpers.token_batch(batch=8, seq=5), _uneven)
  if name == "gpt":        # tied embedding/head on the first and last stage
    return Case(_gpt(), lm_batch)
  if name == "dropout":
    return Case(_dropout_model(), helpers.token_batch(batch=8, seq=5))
  if name == "tied":       # mid_0.w = mid_1.w (stages 0 and 1), mid_2.w = mid_3.w (stage 1)
    m = helpers.hetero_model(n_mid=4)
    ties = (hkpipe.Tie(("mid_0", "linear", "w"), ("mid_1", "linear", "w")),
            hkpipe.Tie(("mid_2", "linear", "w"), ("mid_3", "linear", "w")))
    return Case(hkpipe.SequentialModel(m.layers, m.loss_fn, ties),
                helpers.token_batch(batch=8, seq=5), lambda n: {2: [3], 1: []}[n])
  if name == "llama":
    return Case(models.build(models.LlamaConfig(vocab_size=32, seq_len=8, d_model=16,
                                                n_layers=6, n_heads=2, n_kv_heads=1)), lm_batch)
  raise KeyError(name)


@dataclasses.dataclass(frozen=True)
class Reference:
  params: Any
  loss: Any
  grads: Any
  step_losses: tuple
  step_norms: tuple
  final_params: Any


@functools.lru_cache(maxsize=None)
def _single(name: str) -> hkpipe.Pipeline:
  """One single-device pipeline per model (its compiled programs serve every reference)."""
  return hkpipe.Pipeline(case(name).model, optax.sgd(LR), backend="single", num_microbatches=M,
                         donate=False)


@functools.lru_cache(maxsize=None)
def reference(name: str, max_grad_norm: float | None = None) -> Reference:
  """The single-device run every pipelined configuration must reproduce.

  Init, loss and gradients come from the single backend; the STEPS plain-SGD steps apply
  ``p - lr * clip * g`` to the single backend's gradients at each step (the single backend's
  ``train_step`` computes the same update; its own tests check that), which saves compiling its
  train step once per model and clipping threshold.
  """
  c = case(name)
  pipe = _single(name)
  state = pipe.init(KEY, c.batch)
  params = jax.device_get(pipe.params(state))
  loss, grads = jax.device_get(pipe.loss_and_grads(state, c.batch))
  losses, norms, p, g, step_loss = [], [], params, grads, loss
  for step in range(STEPS):
    # Each tied weight counts once: its target copy holds the same summed gradient as its source.
    targets = [g[layer][mod][name] for layer, mod, name in (t.target for t in c.model.ties)]
    norm = np.sqrt(sum(np.sum(np.square(x.astype(np.float64))) for x in jax.tree.leaves(g))
                   - sum(np.sum(np.square(x.astype(np.float64))) for x in targets))
    scale = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / norm)
    losses.append(step_loss)
    norms.append(np.float32(norm))
    p = jax.tree.map(lambda w, d: (w - np.float32(LR) * (d * np.float32(scale))).astype(w.dtype),
                     p, g)
    state = pipe.from_canonical({"params": p, "opt_state": optax.sgd(LR).init(p),
                                 "rng": state.rng}, step + 1)
    if step + 1 < STEPS:
      step_loss, g = jax.device_get(pipe.loss_and_grads(state, c.batch))
  return Reference(params, loss, grads, tuple(losses), tuple(norms), p)


@pytest.fixture(scope="module")
def cache():
  return _mpmd_compile.ProgramCache()


def mpmd(name: str, cache, *, schedule="1f1b", ranks=2, optimizer=None, **kw) -> hkpipe.Pipeline:
  """An MPMD pipeline on the first ``ranks`` devices sharing the module's program cache."""
  c = case(name)
  if isinstance(schedule, str) and "virtual_stages" not in kw:
    kw["virtual_stages"] = 2 if schedule == "interleaved_1f1b" else None
  if c.boundaries is not None and "partition" not in kw:
    v = kw["virtual_stages"] or (2 if schedule in ("zbv", "dualpipev") else 1)
    kw["partition"] = c.boundaries(ranks * v)
  kw.setdefault("devices", jax.devices()[:ranks] if "mesh" not in kw else None)
  if kw["devices"] is None:
    kw.pop("devices")
  kw.setdefault("donate", False)
  pipe = hkpipe.Pipeline(c.model, optimizer or optax.sgd(LR), backend="mpmd",
                         num_microbatches=M, schedule=schedule, **kw)
  pipe.backend.cache = cache
  return pipe


def assert_on_owners(pipe: hkpipe.Pipeline, state) -> None:
  """Every parameter and optimizer-state leaf of stage s lives exactly on its rank's devices."""
  layout = pipe.layout
  for s, spec in enumerate(layout.stages):
    owner = set(layout.stage_devices(s))
    assert set(state.params[s]) == set(spec.layer_names)
    for leaf in jax.tree.leaves((state.params[s], state.opt_state[s])):
      assert leaf.devices() == owner, (s, leaf.devices(), owner)


def executed_order(timeline, num_ranks: int) -> list[list[str]]:
  rows = [[] for _ in range(num_ranks)]
  for rec in sorted(timeline, key=lambda r: r.start):
    rows[rec.rank].append(f"{rec.stage}{rec.kind}{rec.mb}")
  return rows


def check_against(pipe: hkpipe.Pipeline, ref: Reference, batch) -> None:
  """Init, loss, gradients and STEPS optimizer steps of ``pipe`` equal the reference."""
  state = pipe.init(KEY, batch)
  helpers.assert_trees_close(pipe.params(state), ref.params)
  assert_on_owners(pipe, state)
  loss, grads = pipe.loss_and_grads(state, batch)
  helpers.assert_trees_close(loss, ref.loss)
  helpers.assert_trees_close(grads, ref.grads)
  for i in range(STEPS):
    state, metrics = pipe.train_step(state, batch)
    helpers.assert_trees_close(metrics["loss"], ref.step_losses[i])
    helpers.assert_trees_close(metrics["grad_norm"], ref.step_norms[i])
  helpers.assert_trees_close(pipe.params(state), ref.final_params, rtol=1e-4, atol=1e-5)
  assert_on_owners(pipe, state)


# -- issue order -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("ranks, microbatches", [(2, 3), (4, 8)])
def test_issue_order_keeps_rank_order_and_dependencies(name, ranks, microbatches):
  sched = schedules.get(name, num_ranks=ranks, num_microbatches=microbatches,
                        virtual_stages=2 if name == "interleaved_1f1b" else None)
  order = _mpmd_plan.issue_order(sched)
  assert sorted(map(str, (a for _, a in order))) == sorted(
      str(a) for r in range(ranks) for a in sched.compute_actions(r))
  for r in range(ranks):
    assert [a for rank, a in order if rank == r] == list(sched.compute_actions(r))
  position = {(a.kind, a.stage, a.mb): i for i, (_, a) in enumerate(order)}
  last = sched.num_stages - 1
  for i, (_, a) in enumerate(order):
    grad = lambda s: position.get((Kind.B, s, a.mb), position.get((Kind.I, s, a.mb)))
    if a.kind is Kind.F and a.stage > 0:
      assert position[(Kind.F, a.stage - 1, a.mb)] < i
    if a.kind in (Kind.B, Kind.I):
      assert position[(Kind.F, a.stage, a.mb)] < i
      assert a.stage == last or grad(a.stage + 1) < i
    if a.kind is Kind.W:
      assert position[(Kind.I, a.stage, a.mb)] < i


def test_issue_order_reports_deadlock():
  # Rank 1 starts with 1F1, which needs 0F1; rank 0 runs 0F1 only after 0B0, which needs 1B0.
  sched = schedules.from_text("0F0 0B0 0F1 0B1\n1F1 1B1 1F0 1B0\n")
  with pytest.raises(ValueError, match=r"deadlocks.*rank 0: 0B0; rank 1: 1F1"):
    _mpmd_plan.issue_order(sched)


# -- the equivalence matrix ------------------------------------------------------------------


# Every schedule x model on 2 ranks; on 4 ranks the tied GPT (ties across 4 ranks) and the
# uneven model (stages of different sizes) only (suite time: the hetero model and GQA Llama
# change what a stage computes, not how the ranks exchange it, and run every schedule on 2 ranks).
MATRIX = [(s, m, r) for s in SCHEDULES for m in ("hetero", "uneven", "gpt", "llama")
          for r in (2, 4) if r == 2 or m in ("uneven", "gpt")]


@pytest.mark.parametrize("schedule,model_name,ranks", [
    c if c[2] == 2 else pytest.param(*c, marks=pytest.mark.slow) for c in MATRIX])
def test_matches_single_device(schedule, model_name, ranks, cache):
  """Loss, every gradient leaf and K SGD steps equal the single device; the executed per-rank
  order equals the schedule; the driver's peak stash per rank equals the simulator's."""
  pipe = mpmd(model_name, cache, schedule=schedule, ranks=ranks, record_timeline=True)
  check_against(pipe, reference(model_name), case(model_name).batch)
  sched = pipe.layout.schedule
  expected = [[str(a) for a in sched.compute_actions(r)] for r in range(ranks)]
  assert executed_order(pipe.last_timeline, ranks) == expected
  assert pipe.last_stash_peaks == schedules.peak_activations(sched)
  if model_name == "uneven":
    sizes = [s.stop - s.start for s in pipe.layout.stages]
    assert len(set(sizes)) > 1, sizes


def test_wrong_layer_order_fails_the_comparison(cache):
  """Negative control: the same parameters through a chain with two layers swapped differ."""
  c = case("hetero")
  layers = list(c.model.layers)
  layers[2], layers[3] = layers[3], layers[2]             # mid_0 <-> mid_1 (same shapes)
  swapped = hkpipe.SequentialModel(layers, c.model.loss_fn, c.model.ties)
  pipe = hkpipe.Pipeline(swapped, optax.sgd(LR), backend="mpmd", num_microbatches=M,
                         devices=jax.devices()[:2], donate=False)
  pipe.backend.cache = cache
  ref = reference("hetero")
  pipe.init(KEY, c.batch)
  state = pipe.from_canonical({"params": ref.params, "opt_state": optax.sgd(LR).init(ref.params),
                               "rng": jax.random.split(KEY)[1]}, 0)
  loss, grads = pipe.loss_and_grads(state, c.batch)
  with pytest.raises(AssertionError):
    helpers.assert_trees_close((loss, grads), (ref.loss, ref.grads))


# -- features --------------------------------------------------------------------------------


def test_gradient_clipping_uses_the_norm_over_all_stages(cache):
  ref = reference("gpt", max_grad_norm=0.05)
  assert float(ref.step_norms[0]) > 0.05                  # clipping is active
  pipe = mpmd("gpt", cache, ranks=2, schedule="zb_h1", max_grad_norm=0.05)
  check_against(pipe, ref, case("gpt").batch)


def test_dropout_matches_single_device(cache):
  """Dropout keys depend on (step, microbatch, layer) only, as on the single device."""
  pipe = mpmd("dropout", cache, schedule="zb_h1", ranks=2)
  check_against(pipe, reference("dropout"), case("dropout").batch)
  assert pipe.layout.stages[1].start < 4                   # dropout layers on both ranks


def test_tied_embeddings_on_different_stages_stay_identical(cache):
  c = case("gpt")
  pipe = mpmd("gpt", cache, schedule="1f1b", ranks=4, donate=True)
  state = pipe.init(KEY, c.batch)
  for _ in range(STEPS):
    state, _ = pipe.train_step(state, c.batch)
  wte = state.params[0]["embed"]["wte"]["embeddings"]
  head = state.params[-1]["head"]["lm_head"]["w"]
  assert wte.devices() != head.devices()
  chex.assert_trees_all_equal(np.asarray(wte), np.asarray(head))
  helpers.assert_trees_close(pipe.params(state), reference("gpt").final_params, rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize("schedule, ranks", [("1f1b", 2), ("interleaved_1f1b", 1)])
def test_ties_within_a_stage_and_a_rank(schedule, ranks, cache):
  """Ties between two stages on two ranks or on one rank (interleaved: both stages on one
  device), and between two layers of one stage."""
  pipe = mpmd("tied", cache, schedule=schedule, ranks=ranks)
  check_against(pipe, reference("tied"), case("tied").batch)
  state = pipe.init(KEY, case("tied").batch)
  state, _ = pipe.train_step(state, case("tied").batch)
  p = pipe.params(state)
  for tie in case("tied").model.ties:
    (a, am, an), (b, bm, bn) = tie.source, tie.target
    chex.assert_trees_all_equal(np.asarray(p[a][am][an]), np.asarray(p[b][bm][bn]))


@pytest.mark.parametrize("name", ["hetero", "dropout"])
def test_pp_dp_mesh(name, cache):
  """A (pp=2, dp=2) mesh: each stage's microbatch is split over its 2 devices; one SPMD program
  per stage computes on the whole microbatch, so even dropout masks equal the single device's."""
  mesh = jax.make_mesh((2, 2), ("pp", "dp"), devices=jax.devices()[:4])
  pipe = mpmd(name, cache, mesh=mesh, devices=None, schedule="1f1b")
  check_against(pipe, reference(name), case(name).batch)
  state = pipe.init(KEY, case(name).batch)
  grid = np.asarray(mesh.devices)
  for s in range(2):
    for leaf in jax.tree.leaves(state.params[s]):
      assert leaf.devices() == set(grid[s]) and leaf.sharding.is_fully_replicated


def test_remat_matches_and_stashes_only_inputs(cache):
  pipe = mpmd("hetero", cache, schedule="gpipe", remat=True)
  check_against(pipe, reference("hetero"), case("hetero").batch)
  setup = next(iter(pipe.backend._setups.values()))  # pylint: disable=protected-access
  # With remat, the only residual a middle stage keeps besides its inputs is its dropout key.
  assert len(setup.fns[0].res.slots) <= 1


def test_donating_steps_match(cache):
  pipe = mpmd("llama", cache, schedule="dualpipev", donate=True)
  c = case("llama")
  state = pipe.init(KEY, c.batch)
  old = state
  for _ in range(STEPS):
    state, _ = pipe.train_step(state, c.batch)
  assert jax.tree.leaves(old.params)[0].is_deleted()
  helpers.assert_trees_close(pipe.params(state), reference("llama").final_params, rtol=1e-4,
                             atol=1e-5)


def test_eval_step_matches_single_device(cache):
  """Without dropout, the evaluation loss is the training loss of the reference."""
  c = case("gpt")
  pipe = mpmd("gpt", cache, schedule="zbv")
  state = pipe.init(KEY, c.batch)
  helpers.assert_trees_close(pipe.eval_step(state, c.batch)["loss"], reference("gpt").loss)


def test_jax_array_batches_match_numpy_batches(cache):
  c = case("hetero")
  pipe = mpmd("hetero", cache)
  state = pipe.init(KEY, c.batch)
  on_device = jax.device_put(c.batch, jax.devices()[5])
  helpers.assert_trees_close(pipe.loss_and_grads(state, on_device),
                             pipe.loss_and_grads(state, c.batch))


def test_no_recompilation_after_the_first_step(cache):
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if "compile" in event:
      compiles.append(event)

  c = case("llama")
  pipe = mpmd("llama", cache, schedule="zb_h1", optimizer=optax.adamw(1e-2), donate=True)
  state = pipe.init(KEY, c.batch)
  state, metrics = pipe.train_step(state, c.batch)
  jax.block_until_ready(metrics)
  built = pipe.compile_stats.traced
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for _ in range(3):
      state, metrics = pipe.train_step(state, c.batch)
    jax.block_until_ready(metrics)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles, compiles
  assert pipe.compile_stats.traced == built


def test_identical_stages_share_one_compile(cache):
  """GPT cut into 8 one-layer stages on 4 ranks: the six block stages run one executable."""
  c = case("gpt")
  pipe = mpmd("gpt", cache, schedule="interleaved_1f1b", ranks=4)
  state = pipe.init(KEY, c.batch)
  stats = pipe.compile_stats
  before, traced = len(stats.log), dict(stats.traced_by_name)
  pipe.loss_and_grads(state, c.batch)
  log = stats.log[before:]
  for name, stages in (("stage_fwd", 7), ("stage_bwd", 7), ("stage_last", 1)):
    entries = [(how, key) for n, how, _, key in log if n == name]
    assert len(entries) == stages
    # one program for the embedding stage and one for all six block stages
    assert len({key for _, key in entries}) == min(stages, 2)
    assert sum(how == "compiled" for how, _ in entries) <= min(stages, 2)
  # Stages identical to an earlier one are placed without tracing: 2 forward and backward
  # traces (embedding stage, first block stage), one fused last stage.
  new = {k: v - traced.get(k, 0) for k, v in stats.traced_by_name.items()}
  assert (new["stage_fwd"], new["stage_bwd"], new["stage_last"]) == (2, 2, 1)


# -- checkpoints -----------------------------------------------------------------------------


def test_canonical_round_trip_and_resume_under_another_layout(cache):
  """Train 2 AdamW steps on 2 ranks, restore the canonical state on 4 ranks (V schedule) and take
  a third step: equal to three steps on 2 ranks. (MPMD = single device is the matrix's job.)"""
  c = case("gpt")
  opt = optax.adamw(1e-2)

  a = mpmd("gpt", cache, optimizer=opt, schedule="1f1b", ranks=2)
  state = a.init(KEY, c.batch)
  for _ in range(3):
    state, _ = a.train_step(state, c.batch)
  three = a.params(state)
  state = a.init(KEY, c.batch)
  for _ in range(2):
    state, _ = a.train_step(state, c.batch)
  canonical = a.to_canonical(state)
  chex.assert_trees_all_equal_structs(
      canonical["opt_state"], opt.init(jax.device_get(canonical["params"])))
  again = a.to_canonical(a.from_canonical(canonical, state.step))
  helpers.assert_trees_close((again["params"], again["opt_state"]),
                             (canonical["params"], canonical["opt_state"]), rtol=0, atol=0)
  np.testing.assert_array_equal(jax.random.key_data(again["rng"]),
                                jax.random.key_data(canonical["rng"]))

  b = mpmd("gpt", cache, optimizer=opt, schedule="zbv", ranks=4)
  b.init(KEY, c.batch)
  b_state, _ = b.train_step(b.from_canonical(jax.device_get(canonical), state.step), c.batch)
  assert b_state.step == 3
  assert_on_owners(b, b_state)
  helpers.assert_trees_close(b.params(b_state), three, rtol=1e-4, atol=1e-5)


# -- bad inputs ------------------------------------------------------------------------------


def _bad(build: Callable[[], hkpipe.Pipeline], batch, match: str) -> None:
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if "backend_compile" in event:
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with pytest.raises(ValueError, match=match):
      pipe = build()
      pipe.init(KEY, batch)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles, "an error was raised only after compiling"


def test_batch_not_divisible_by_microbatches():
  c = case("hetero")
  x, y = c.batch
  _bad(lambda: hkpipe.Pipeline(c.model, optax.sgd(LR), backend="mpmd", num_microbatches=3,
                               devices=jax.devices()[:2]),
       (x[:7], y[:7]), "not divisible by num_microbatches=3")


def test_more_stages_than_layers():
  c = case("hetero")      # 8 layers; 4 ranks x 2 x ... zbv on 8 ranks needs 16 stages
  _bad(lambda: hkpipe.Pipeline(c.model, optax.sgd(LR), backend="mpmd", num_microbatches=M,
                               schedule="zbv", devices=jax.devices()[:8]),
       c.batch, "needs 16 stages .* only 8 layers")


def test_schedule_for_other_rank_count():
  c = case("hetero")
  two = schedules.get("1f1b", num_ranks=2, num_microbatches=M)
  _bad(lambda: hkpipe.Pipeline(c.model, optax.sgd(LR), backend="mpmd", num_microbatches=M,
                               schedule=two, devices=jax.devices()[:4]),
       c.batch, "schedule has 2 ranks but the pipeline has 4")


def test_wrong_mesh_axes():
  c = case("hetero")
  mesh = jax.make_mesh((2, 2), ("x", "y"), devices=jax.devices()[:4])
  _bad(lambda: hkpipe.Pipeline(c.model, optax.sgd(LR), backend="mpmd", num_microbatches=M,
                               mesh=mesh),
       c.batch, r"Mesh axis 'x' is not a pipeline axis")


def test_microbatch_not_divisible_by_dp():
  c = case("hetero")
  mesh = jax.make_mesh((2, 4), ("pp", "dp"), devices=jax.devices()[:8])
  _bad(lambda: hkpipe.Pipeline(c.model, optax.sgd(LR), backend="mpmd", num_microbatches=M,
                               mesh=mesh),
       c.batch, "microbatch size 2 is not divisible by the data-parallel width dp=4")


def test_bad_boundaries():
  c = case("hetero")
  _bad(lambda: hkpipe.Pipeline(c.model, optax.sgd(LR), backend="mpmd", num_microbatches=M,
                               devices=jax.devices()[:2], partition=[5, 3]),
       c.batch, "2 stages need 1 boundaries")


def test_timeline_is_drawable(cache):
  # num_ranks=2 (pipeline ranks) without devices: the first two devices.
  pipe = mpmd("hetero", cache, schedule="zb_h1", record_timeline=True, devices=None,
              num_ranks=2)
  state = pipe.init(KEY, case("hetero").batch)
  assert pipe.layout.rank_devices(1) == (jax.devices()[1],)
  pipe.train_step(state, case("hetero").batch)
  picture = schedules.ascii_grid(pipe.last_timeline)
  assert "rank 0" in picture and "W3" in picture
  assert "<svg" in schedules.svg_timeline(pipe.last_timeline)
