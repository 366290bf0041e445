"""The schedule engine (hkpipe/schedules/_engine.py): its order, message keys and deadlock report.

The validator, simulator, MPMD issue order and SPMD tick tables all run this engine; their own
tests (test_schedules*.py, test_mpmd.py, test_spmd.py) check their results. These tests check what
a driver of a lowered program needs from the engine itself.
"""

from __future__ import annotations

import collections

import pytest

from hkpipe import schedules as S
from hkpipe._src.backends import _mpmd_plan
from hkpipe.schedules import Action
from hkpipe.schedules import Kind
from hkpipe.schedules import _engine
from hkpipe.schedules import _lower

CASES = [(name, p, m, {"interleaved_1f1b": 2}.get(name)) for name in S.names()
         for p in (1, 2, 3, 4) for m in (1, 3, 8)]
NOMINAL = {Kind.F: 1.0, Kind.B: 2.0, Kind.I: 1.0, Kind.W: 1.0}
# Independent of the engine: which RECV receives what each SEND sends.
PEER = {Kind.SEND_F: (Kind.RECV_F, +1), Kind.SEND_B: (Kind.RECV_B, -1)}


def build(name, p, m, v):
  return S.get(name, num_ranks=p, num_microbatches=m, virtual_stages=v)


def nominal(a: Action) -> float:
  return NOMINAL[a.kind]


@pytest.mark.parametrize("name, p, m, v", CASES)
def test_message_key_pairs_each_send_with_its_one_recv(name, p, m, v):
  low = S.lower(build(name, p, m, v))
  sends, recvs, num_sends = {}, collections.Counter(), 0
  for rank, row in enumerate(low.actions):
    for a in row:
      if a.kind in PEER:
        num_sends += 1
        recv_kind, step = PEER[a.kind]
        peer = Action(a.stage + step, recv_kind, a.mb)
        sends[_engine.message_key(a)] = (low.rank_of(peer.stage), peer)
      elif a.kind.is_comm:
        recvs[(_engine.message_key(a), rank, a)] += 1
  assert len(sends) == num_sends  # one key per message
  assert sorted(recvs.values()) == [1] * num_sends
  assert set(recvs) == {(key, rank, a) for key, (rank, a) in sends.items()}


@pytest.mark.parametrize("name, p, m, v", CASES)
def test_lowered_run_gives_a_global_issue_order(name, p, m, v):
  """The order of a lowered run keeps each rank's order, puts every RECV after its SEND, and its
  compute actions are the MPMD issue order of the compute-only schedule."""
  sched = build(name, p, m, v)
  low = S.lower(sched)
  run = _engine.run(low, nominal)
  assert run.stuck == ()
  for rank, row in enumerate(low.actions):
    assert [i for r, i in run.order if r == rank] == list(range(len(row)))
  sent = set()
  for rank, i in run.order:
    a = low.actions[rank][i]
    if a.kind in PEER:
      sent.add((a.stage + PEER[a.kind][1], PEER[a.kind][0], a.mb))
    elif a.kind.is_comm:
      assert (a.stage, a.kind, a.mb) in sent, a
  compute = [(r, low.actions[r][i]) for r, i in run.order if low.actions[r][i].kind.is_compute]
  assert compute == list(_mpmd_plan.issue_order(sched))


@pytest.mark.parametrize("name, p, m, v", CASES[::3])
def test_compute_only_run_equals_lowered_run_without_latency(name, p, m, v):
  sched = build(name, p, m, v)
  plain = _engine.run(sched, nominal)
  lowered = _engine.run(S.lower(sched), nominal)
  assert plain.rows == tuple(tuple(iv for iv in row if iv.action.kind.is_compute)
                             for row in lowered.rows)
  assert _lower.strip_comm(S.lower(sched)) == sched


def test_deadlock_is_reported_with_what_each_rank_waits_for():
  # Rank 1 starts with 1F1, which needs 0F1; rank 0 runs 0F1 only after 0B0, which needs 1B0.
  sched = S.from_text("0F0 0B0 0F1 0B1\n1F1 1B1 1F0 1B0\n")
  plain = _engine.run(sched, nominal)
  assert plain.stuck == (0, 1)
  assert [plain.blocked(r) for r in (0, 1)] == [(1, Action(0, Kind.B, 0)),
                                                 (0, Action(1, Kind.F, 1))]
  assert [plain.waiting_for(r) for r in (0, 1)] == [("G", 1, 0), ("F", 0, 1)]
  low = S.lower(sched)
  lowered = _engine.run(low, nominal)
  assert lowered.stuck == (0, 1)
  assert [lowered.blocked(r)[1] for r in (0, 1)] == [Action(0, Kind.RECV_B, 0),
                                                     Action(1, Kind.RECV_F, 1)]
  assert [lowered.waiting_for(r) for r in (0, 1)] == [("G", 1, 0), ("F", 0, 1)]
  # Everything before the blocked actions ran: 0F0 and its SEND on rank 0, nothing on rank 1.
  assert [iv.action for iv in lowered.rows[0]] == [Action(0, Kind.F, 0), Action(0, Kind.SEND_F, 0)]
  assert lowered.rows[1] == ()
