"""The MPMD step as an instruction program: lowering, checker, liveness, text and memory.

The pure tests lower schedules without compiling anything; the memory test runs a pipeline in
timeline mode and compares the liveness prediction, instruction by instruction, with the bytes of
live device arrays that ``jax.live_arrays()`` reports (an independent measurement).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import hkpipe
from hkpipe import schedules
from hkpipe._src import stage as stage_lib
from hkpipe._src.backends import _mpmd_plan
from hkpipe._src.backends import _mpmd_programs as progs
from hkpipe._src.backends.mpmd import _check
from hkpipe._src.backends.mpmd import _instr as ir
from hkpipe._src.backends.mpmd import _lower
from hkpipe.schedules import _engine
from tests import helpers


def facts(name: str, ranks: int, m: int, *, owned=None, process: int = 0, rank_process=None,
          ties=(), scaled: bool = True) -> _lower.Facts:
  sched = schedules.get(name, num_ranks=ranks, num_microbatches=m,
                        virtual_stages=2 if name == "interleaved_1f1b" else None)
  rank_process = rank_process or (0,) * ranks
  procs = sorted(set(rank_process))
  return _lower.Facts(
      num_stages=sched.num_stages, rank_of=tuple(sched.stage_to_rank), num_ranks=ranks,
      owned=frozenset(owned if owned is not None else range(ranks)),
      rank_process=tuple(rank_process), process=process,
      order=_mpmd_plan.issue_order(sched), ties=tuple(ties), scaled=scaled, donate=True,
      num_microbatches=m, other_processes=tuple(q for q in procs if q != process)
      if len(procs) > 1 else ())


@pytest.mark.parametrize("name", schedules.names())
@pytest.mark.parametrize("ranks, m", [(2, 3), (4, 8)])
def test_lowered_programs_check_and_their_stash_peak_is_the_simulators(name, ranks, m):
  f = facts(name, ranks, m)
  sched = schedules.get(name, num_ranks=ranks, num_microbatches=m,
                        virtual_stages=2 if name == "interleaved_1f1b" else None)
  for with_update in (True, False):
    program = _lower.lower_train(f, with_update)
    _check.check(program)
    assert _check.liveness(program, ranks).peak_stash == schedules.peak_activations(sched)
    runs = [str(ins) for ins in program.instrs if isinstance(ins, ir.Run)]
    assert runs == [f"rank {r}: {a.kind.name} of stage {a.stage}, microbatch {a.mb}"
                    for r, a in f.order]
  _check.check(_lower.lower_eval(f))


def _break(program: ir.Program, i: int, **changes) -> ir.Program:
  instrs = list(program.instrs)
  instrs[i] = dataclasses.replace(instrs[i], **changes)
  return dataclasses.replace(program, instrs=tuple(instrs))


def test_checker_rejects_misused_buffers():
  program = _lower.lower_train(facts("1f1b", 2, 3))
  first_free = next(i for i, ins in enumerate(program.instrs) if isinstance(ins, ir.Free))
  freed = program.instrs[first_free].reads[0]
  reader = next(i for i, ins in enumerate(program.instrs) if isinstance(ins, ir.Run)
                and i > first_free)
  run = program.instrs[reader]
  cases = [
      (dataclasses.replace(program, instrs=program.instrs[:first_free]
                           + program.instrs[first_free + 1:]), r"is never freed"),
      (_break(program, reader, reads=run.reads + (freed,)), r"reads the freed buffer"),
      (_break(program, first_free, reads=(freed, freed)), r"frees the freed buffer"),
      (_break(program, 0, reads=program.instrs[0].reads + (len(program.buffers) - 1,)),
       r"reads, before anything writes,"),
      (_break(program, reader, writes=run.writes[:1] + program.instrs[0].writes[:1]),
       r"writes, a second time,"),
  ]
  _check.check(program)
  for bad, message in cases:
    with pytest.raises(ValueError, match=message):
      _check.check(bad)


def test_processes_programs_pair_every_post_with_a_pull():
  """Two processes, two ranks each (4-rank 1F1B, tied first and last stages): every message one
  process posts, the other pulls, with the same key; nothing else crosses."""
  kw = dict(rank_process=(0, 0, 1, 1), ties=((0, 0, 3, 1),))
  programs = [_lower.lower_train(facts("1f1b", 4, 4, owned={0, 1} if q == 0 else {2, 3},
                                       process=q, **kw)) for q in (0, 1)]
  for q, program in enumerate(programs):
    _check.check(program)
    other = programs[1 - q]
    posted = {ins.key for ins in program.instrs if isinstance(ins, ir.Send) and ins.remote}
    posted |= {("tie", t, k) for ins in program.instrs if isinstance(ins, ir.TieSend)
               for (t, k, _), w in zip(ins.targets, ins.writes) if w < 0}
    pulled = {ins.key for ins in other.instrs if isinstance(ins, ir.Recv)}
    assert posted == pulled and posted
    # Pulls come first (they wait without blocking the host).
    kinds = [isinstance(ins, ir.Recv) for ins in other.instrs]
    assert kinds == sorted(kinds, reverse=True)
    # Only this process's ranks run anything.
    assert {ins.rank for ins in program.instrs if isinstance(ins, ir.Run)} == (
        {0, 1} if q == 0 else {2, 3})


@pytest.mark.parametrize("name", schedules.names())
def test_transfers_are_the_lowered_schedules_messages(name):
  """Every cross-rank Send of a program is one SEND/RECV pair of ``schedules.lower`` (same
  ``message_key``, from the SEND's rank to the RECV's), and every such pair is one Send: the
  program and the lowered schedule name messages by the engine's one rule."""
  f = facts(name, 4, 8)
  sched = schedules.get(name, num_ranks=4, num_microbatches=8,
                        virtual_stages=2 if name == "interleaved_1f1b" else None)
  lowered = schedules.lower(sched)
  sends, recvs = {}, {}
  for rank, row in enumerate(lowered.actions):
    for a in row:
      if a.kind in (schedules.Kind.SEND_F, schedules.Kind.SEND_B):
        sends[_engine.message_key(a)] = rank
      elif a.kind.is_comm:
        recvs[_engine.message_key(a)] = rank
  expected = {key: (sends[key], recvs[key]) for key in sends}
  assert sends.keys() == recvs.keys() and expected
  for program in (_lower.lower_train(f), _lower.lower_train(f, False), _lower.lower_eval(f)):
    moved = {ins.key: (ins.src_rank, ins.dst_rank) for ins in program.instrs
             if isinstance(ins, ir.Send) and ins.key[0] in ("F", "G")}
    count = sum(isinstance(ins, ir.Send) and ins.key[0] in ("F", "G") for ins in program.instrs)
    assert count == len(moved)
    if program.name == "eval":      # forward only: the activation messages
      assert moved == {k: v for k, v in expected.items() if k[0] == "F"}
    else:
      assert moved == expected


def test_describe_prints_the_one_f_one_b_program():
  pipe = hkpipe.Pipeline(helpers.hetero_model(n_mid=2), optax.sgd(0.1), backend="mpmd",
                         num_microbatches=4, devices=jax.devices()[:4], schedule="1f1b",
                         max_grad_norm=1.0)
  text = pipe.describe(helpers.token_batch())
  lines = text.splitlines()
  assert "rank 0: F of stage 0, microbatch 0" in lines[2] and "fwd(p0, x0.0) -> y0.0" in lines[2]
  assert re.search(r"rank 3: F of stage 3, microbatch 0 +last\(p3, x3\.0, t\.0, acc3, loss0\) "
                   r"-> acc3\.1, loss\.0, dx3\.0", text)
  assert re.search(r"rank 0: send activations 0F0 to rank 1 +copy\(y0\.0\) -> x1\.0", text)
  assert "process 0: clip and update its stages [0, 1, 2, 3]" in text
  assert lines[-1] == "# peak stashes per rank: rank 0: 4, rank 1: 3, rank 2: 2, rank 3: 1"
  assert sum(bool(re.match(r" *\d+  rank \d: [FB] of stage", ln)) for ln in lines) == 2 * 4 * 4
  assert "eval" in pipe.describe(helpers.token_batch(), "eval")
  with pytest.raises(ValueError, match="call must be 'train', 'grads' or 'eval', got 'step'"):
    pipe.describe(helpers.token_batch(), "step")


def _tied_model() -> hkpipe.SequentialModel:
  m = helpers.hetero_model(n_mid=4)
  return hkpipe.SequentialModel(m.layers, m.loss_fn,
                                (hkpipe.Tie(("mid_0", "linear", "w"), ("mid_3", "linear", "w")),))


@pytest.mark.parametrize("schedule, ranks, variant", [
    ("1f1b", 2, "plain"), ("zbv", 2, "plain"), ("zb_h1", 2, "plain"),
    ("1f1b", 2, "dp"), ("1f1b", 2, "tied_fused")])
def test_predicted_bytes_equal_live_device_bytes_at_every_instruction(schedule, ranks, variant):
  """The liveness pass (from the compiled programs' output avals, before the step runs) equals
  the bytes of live device arrays per rank above those before the step, after every instruction
  (measured with ``jax.live_arrays()`` in timeline mode). Variants: a (pp=2, dp=2) mesh; a tie
  between stages with no clipping and no skip guard (tie exchange, finalize fused into update)."""
  model = _tied_model() if variant == "tied_fused" else helpers.hetero_model(n_mid=2)
  placement = (dict(mesh=jax.make_mesh((2, 2), ("pp", "dp"), devices=jax.devices()[:4]))
               if variant == "dp" else dict(devices=jax.devices()[:ranks]))
  clip = (dict(skip_nonfinite=False) if variant == "tied_fused" else dict(max_grad_norm=1.0))
  pipe = hkpipe.Pipeline(model, optax.adam(0.1), backend="mpmd", num_microbatches=4,
                         schedule=schedule, record_timeline=True, **placement, **clip)
  batch = helpers.token_batch()
  state = pipe.init(jax.random.key(0), batch)
  for _ in range(2):          # the second step reuses the accumulators the first handed back
    state, _ = pipe.train_step(state, batch)
  measured, predicted = pipe.last_measured_bytes, pipe.last_predicted_bytes
  assert len(measured) == len(predicted) > 0
  assert measured == predicted
  assert all(peak > 0 for peak in pipe.last_stash_peak_bytes)
  if variant == "tied_fused":
    text = pipe.describe(batch)
    assert "send the tied gradients of stage 0" in text and "finalize and update stage 1" in text
  assert pipe.last_stash_peak_bytes == tuple(max(p[r] for p in predicted) for r in range(ranks))


def test_stash_packing_round_trips_and_keeps_large_entries_whole():
  """Small stash entries are packed per dtype into one flat array each and come back exactly;
  entries over the size limit, and every entry without packing, travel whole."""
  big = progs.PACK_MAX_BYTES // 4 + 1                      # float32 entries just over the limit
  stash = [jnp.arange(6.0).reshape(2, 3), jnp.arange(4, dtype=jnp.int32),
           jnp.ones((big,), jnp.float32), jnp.float32(7.0), jnp.arange(3, dtype=jnp.int32) + 9]
  residuals = stage_lib.Residuals(None, tuple(("out", i) for i in range(len(stash))), len(stash))
  layout, arrays = progs.pack_stash(residuals, stash, pack=True)
  assert layout.num_out == len(arrays) == 3                 # the big one, float32s, int32s
  assert arrays[0] is stash[2] and layout.slots[2] == (0, None, (big,))
  assert sorted(a.dtype.name for a in arrays[1:]) == ["float32", "int32"]
  for got, want in zip(progs.unpack_stash(layout, arrays), stash):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert bool(jnp.array_equal(got, want))
  layout, arrays = progs.pack_stash(residuals, stash, pack=False)
  assert layout.num_out == len(stash) and all(a is b for a, b in zip(arrays, stash))
