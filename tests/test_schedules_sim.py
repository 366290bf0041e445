"""Simulator closed forms and property tests for every registered schedule (hkpipe.schedules)."""

from __future__ import annotations

import collections

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from hkpipe import schedules as S
from hkpipe.schedules import Kind

SETTINGS = hypothesis.settings(max_examples=60, deadline=None, derandomize=True,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])
# (forward, input_grad, weight_grad, backward) cost settings; backward None means I + W.
COSTS = [S.Costs(1, 1, 1), S.Costs(forward=1, backward=1), S.Costs(2, 3, 1), S.Costs(1, 0.5, 0.25)]
SIZES = [(p, m) for p in (1, 2, 3, 4, 6) for m in sorted({1, 2, p, p + 1, 2 * p + 1, 12})]


def build(name, p, m, v=None):
  return S.get(name, num_ranks=p, num_microbatches=m, virtual_stages=v)


def full_b(c: S.Costs) -> float:
  return c.backward if c.backward is not None else c.input_grad + c.weight_grad


# ---------------------------------------------------------------------------------------------
# GPipe and 1F1B.


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("costs", COSTS)
def test_gpipe_1f1b_bubble_closed_form(name, costs):
  for p, m in SIZES:
    r = S.simulate(build(name, p, m), costs)
    assert r.bubble_ratio == pytest.approx((p - 1) / (m + p - 1), abs=1e-12), (p, m)
    assert r.makespan == pytest.approx((m + p - 1) * (costs.forward + full_b(costs)))
    # Every rank idles (p-1)(F+B), i.e. (p-1)(F+I+W) with B = I + W.
    np.testing.assert_allclose(r.idle, (p - 1) * (costs.forward + full_b(costs)), atol=1e-9)


def test_peak_activations_gpipe_and_1f1b():
  for p, m in SIZES:
    assert S.peak_activations(build("gpipe", p, m)) == (m,) * p
    assert S.peak_activations(build("1f1b", p, m)) == tuple(min(p - r, m) for r in range(p))


def test_gpipe_per_stage_costs_closed_form():
  # Identical microbatches through a flow shop: sum of stage costs + (m - 1) * the slowest stage,
  # once for the forwards and once (from the last rank back) for the backwards.
  f = [1.0, 3.0, 2.0, 0.5]
  b = [2.0, 1.0, 4.0, 1.5]
  for m in (1, 3, 8):
    r = S.simulate(build("gpipe", 4, m), S.Costs(forward=f, backward=b))
    assert r.makespan == pytest.approx(sum(f) + (m - 1) * max(f) + sum(b) + (m - 1) * max(b))
    np.testing.assert_allclose(r.busy, [m * (fi + bi) for fi, bi in zip(f, b)])


def test_comm_latency_per_sending_stage():
  # GPipe: the forward pipe pays comm[s] for s = 0..p-2, the backward pipe comm[s] for s = 1..p-1.
  comm = [0.25, 0.5, 0.125, 1.0]
  for m in (1, 5):
    r = S.simulate(build("gpipe", 4, m), S.Costs(forward=1, backward=2, comm=comm))
    assert r.makespan == pytest.approx((m + 3) * 3 + sum(comm[:3]) + sum(comm[1:]))
    # Scalar latency: 2 (p - 1) c on top of the compute-only makespan.
    r = S.simulate(build("gpipe", 4, m), S.Costs(forward=1, backward=2, comm=0.5))
    assert r.makespan == pytest.approx((m + 3) * 3 + 2 * 3 * 0.5)
  # Transfers between stages on the same rank are free: one rank never waits.
  r = S.simulate(build("zbv", 1, 4), S.Costs(comm=100.0))
  assert r.makespan == pytest.approx(4 * 6) and r.bubble_ratio == 0.0


def test_costs_validation():
  with pytest.raises(ValueError, match="Costs.forward must be a scalar or have one value per "
                     "stage \\(4\\)"):
    S.simulate(build("1f1b", 4, 2), S.Costs(forward=[1.0, 2.0]))
  with pytest.raises(ValueError, match="Costs.comm must be finite and >= 0"):
    S.simulate(build("1f1b", 2, 2), S.Costs(comm=-1.0))
  with pytest.raises(ValueError, match="must be a hkpipe.schedules.Costs"):
    S.simulate(build("1f1b", 2, 2), {"F": 1.0})


# ---------------------------------------------------------------------------------------------
# Interleaved 1F1B. Derivation (uniform per-stage costs f, b): with p | m the rounds of p
# microbatches keep every rank busy after the warm-up, so the makespan is the ideal v m (f + b)
# plus one pipeline fill and drain of (p - 1)(f + b): bubble (p - 1) / (v m + p - 1), v times
# smaller in absolute time than 1F1B's with the same model. With m <= p no two microbatches ever
# compete for a rank, so the makespan is one microbatch's trip through all p v stages and back
# plus (m - 1) followers: (p v + m - 1)(f + b).


@pytest.mark.parametrize("costs", COSTS)
def test_interleaved_bubble_closed_form(costs):
  fb = costs.forward + full_b(costs)
  for p in (1, 2, 3, 4, 5):
    for v in (2, 3, 4):
      for m in sorted({1, 2, p, 2 * p, 3 * p, p + 1, 2 * p + 1}):
        r = S.simulate(build("interleaved_1f1b", p, m, v), costs)
        lower_bound = (p - 1) / (v * m + p - 1)
        if m % p == 0:
          assert r.makespan == pytest.approx((v * m + p - 1) * fb), (p, v, m)
          assert r.bubble_ratio == pytest.approx(lower_bound, abs=1e-12)
        if m <= p:
          assert r.makespan == pytest.approx((p * v + m - 1) * fb), (p, v, m)
        # Always between the interleaved ideal and plain 1F1B's (p - 1) / (m + p - 1).
        assert lower_bound - 1e-12 <= r.bubble_ratio <= (p - 1) / (m + p - 1) + 1e-12
        if p > 1 and m > 1:
          assert r.bubble_ratio < (p - 1) / (m + p - 1)


def test_interleaved_peak_activations():
  # Rank r runs 2 (p - r - 1) + (v - 1) p warm-up forwards before its first backward; in the
  # steady state one more forward is alive before each backward.
  for p in (2, 3, 4):
    for v in (2, 3):
      for m in (p, 2 * p, 4 * p):
        got = S.peak_activations(build("interleaved_1f1b", p, m, v))
        assert got == tuple(min(2 * (p - r - 1) + (v - 1) * p + 1, v * m) for r in range(p))


# ---------------------------------------------------------------------------------------------
# ZB-H1: with m >= p and W <= min(F, I), every rank idles (p - 1)(F + I - W), against
# (p - 1)(F + I + W) for 1F1B: rank r defers r weight-gradient passes, which exactly fill the
# cool-down bubble, so the remaining idle time is the F+I chain latency minus one W per hop.


@pytest.mark.parametrize("fiw", [(1, 1, 1), (2, 2, 1), (1, 2, 1), (2, 1, 1), (1, 1, 0.5),
                                 (3, 2, 2)])
def test_zb_h1_bubble_closed_form(fiw):
  f, i, w = fiw
  costs = S.Costs(forward=f, input_grad=i, weight_grad=w)
  for p in range(1, 7):
    for m in sorted({p, p + 1, 2 * p, 12}):
      zb = S.simulate(build("zb_h1", p, m), costs)
      one = S.simulate(build("1f1b", p, m), costs)
      np.testing.assert_allclose(zb.idle, (p - 1) * (f + i - w), atol=1e-9)
      np.testing.assert_allclose(one.idle, (p - 1) * (f + i + w), atol=1e-9)
      assert zb.makespan == pytest.approx(m * (f + i + w) + (p - 1) * (f + i - w))


def test_zb_h1_never_slower_than_1f1b_and_memory():
  for p, m in SIZES:
    for costs in [c for c in COSTS if c.backward is None] + [S.Costs(1, 1, 2), S.Costs(1, 3, 2)]:
      # (B = I + W, so both schedules do the same work.)
      zb = S.simulate(build("zb_h1", p, m), costs)
      assert zb.makespan <= S.simulate(build("1f1b", p, m), costs).makespan + 1e-9
    # Deferring r weight gradients on rank r keeps p stashes alive on every rank: 1F1B's peak
    # (rank 0), now on all ranks.
    assert zb.peak_activations == (min(p, m),) * p


# ---------------------------------------------------------------------------------------------
# ZBV: with F = I = W = t and m >= 2p - 1 every rank works without a gap from its first forward
# (at time r t) until its last action, and the run takes (6m + p - 1) t: the lower bound, since
# rank p - 1 cannot start before (p - 1) t and has 6 m t of work. Bubble (p - 1) / (6m + p - 1).


def test_zbv_bubble_closed_form():
  for p in range(1, 9):
    for m in sorted({2 * p - 1, 2 * p, 3 * p + 1, 32}):
      for t in (1.0, 0.5):
        r = S.simulate(build("zbv", p, m), S.Costs(t, t, t))
        assert r.makespan == pytest.approx((6 * m + p - 1) * t), (p, m)
        assert r.bubble_ratio == pytest.approx((p - 1) / (6 * m + p - 1), abs=1e-12)
      # The only idle time is rank r's r slots before its first forward and p - 1 - r at the end.
      first = [row[0].start for row in r.timeline]
      assert first == [float(k) * 0.5 for k in range(p)]
      # 2p chunk stashes on every rank: the same bytes as 1F1B's p full-stage stashes.
      assert r.peak_activations == (2 * p,) * p


def test_zbv_bubble_vanishes_and_beats_zb_h1():
  for p in (2, 4, 8):
    ratios = [S.simulate(build("zbv", p, m)).bubble_ratio for m in (2 * p, 4 * p, 8 * p)]
    assert ratios == sorted(ratios, reverse=True)
    assert ratios[-1] < 0.02
    for m in (2 * p, 4 * p):
      # Same model: a ZBV chunk costs half a ZB-H1 stage; ratios are scale-free.
      assert (S.simulate(build("zbv", p, m)).bubble_ratio <
              S.simulate(build("zb_h1", p, m)).bubble_ratio)


def test_dualpipev_runs_and_beats_1f1b():
  for p in (2, 3, 4):
    for m in (2 * p, 3 * p):
      r = S.simulate(build("dualpipev", p, m))
      # Adjacent F and B of the two chunks run one after the other here (no overlap modelled).
      assert r.bubble_ratio < S.simulate(build("1f1b", p, m)).bubble_ratio
      assert max(r.peak_activations) <= 2 * p + 1


# ---------------------------------------------------------------------------------------------
# Property tests over p in 1..8, m in 1..32, v in 1..4.


def _documented_invalid(name: str, v: int) -> bool:
  if name in ("gpipe", "1f1b", "zb_h1"):
    return v != 1
  if name == "interleaved_1f1b":
    return v < 2
  return v != 2


def _check_timeline(s: S.Schedule, r: S.SimResult, table) -> None:
  ends = {}
  for rank, row in enumerate(r.timeline):
    assert [iv.action for iv in row] == list(s.compute_actions(rank))
    for prev, nxt in zip(row, row[1:]):
      assert prev.end <= nxt.start + 1e-9
    for iv in row:
      assert iv.end - iv.start == pytest.approx(table[iv.action.kind][iv.action.stage])
      ends[(iv.action.kind, iv.action.stage, iv.action.mb)] = (iv.end, rank)
  starts = {(iv.action.kind, iv.action.stage, iv.action.mb): (iv.start, rank)
            for rank, row in enumerate(r.timeline) for iv in row}
  for (kind, stage, mb), (start, rank) in starts.items():
    deps = []
    if kind is Kind.F and stage > 0:
      deps.append(((Kind.F, stage - 1, mb), Kind.SEND_F))
    if kind in (Kind.B, Kind.I) and stage < s.num_stages - 1:
      up = Kind.I if (Kind.I, stage + 1, mb) in ends else Kind.B
      deps.append(((up, stage + 1, mb), Kind.SEND_B))
    for dep, send in deps:
      end, dep_rank = ends[dep]
      latency = table[send][dep[1]] if dep_rank != rank else 0.0
      assert start >= end + latency - 1e-9, ((kind, stage, mb), dep)
  makespan = max((iv.end for row in r.timeline for iv in row), default=0.0)
  assert r.makespan == pytest.approx(makespan)
  busy = sum(r.busy)
  assert r.bubble_ratio == pytest.approx(1 - busy / (s.num_ranks * makespan) if makespan else 0)


@SETTINGS
@hypothesis.given(name=st.sampled_from(S.names()), p=st.integers(1, 8), m=st.integers(1, 32),
                  v=st.integers(1, 4), default_v=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_every_schedule_validates_lowers_and_simulates(name, p, m, v, default_v, seed):
  if default_v:  # half the draws use the schedule's own v (the other half also tests bad v)
    v = max(v, 2) if name == "interleaved_1f1b" else None
  elif _documented_invalid(name, v):
    with pytest.raises(ValueError, match="virtual_stages"):
      build(name, p, m, v)
    return
  s = build(name, p, m, v)
  S.validate(s)
  counts = collections.Counter((a.kind, a.stage, a.mb) for row in s.actions for a in row)
  assert all(c == 1 for c in counts.values())
  assert sum(k is Kind.F for k, _, _ in counts) == s.num_stages * m
  lowered = S.lower(s)
  S.validate(lowered)
  assert S.from_text(S.to_text(s)) == s
  rng = np.random.default_rng(seed)
  costs = S.Costs(forward=rng.uniform(0.1, 2, s.num_stages), input_grad=rng.uniform(0.1, 2),
                  weight_grad=rng.uniform(0.1, 2, s.num_stages), comm=rng.uniform(0, 0.5))
  r = S.simulate(s, costs)
  _check_timeline(s, r, costs.per_stage(s.num_stages))
  assert S.simulate(lowered, costs).timeline == r.timeline
  merged = S.merge_backward(s)
  S.validate(merged)


def _acyclic(s: S.Schedule) -> bool:
  """Independent oracle: program order plus data dependencies form a DAG (Kahn's algorithm)."""
  nodes = [(r, i) for r, row in enumerate(s.actions) for i in range(len(row))]
  where = {(a.kind, a.stage, a.mb): (r, i) for r, row in enumerate(s.actions)
           for i, a in enumerate(row)}
  edges = collections.defaultdict(list)
  indeg = collections.Counter()
  for r, row in enumerate(s.actions):
    for i, a in enumerate(row):
      preds = [(r, i - 1)] if i else []
      if a.kind is Kind.F and a.stage > 0:
        preds.append(where[(Kind.F, a.stage - 1, a.mb)])
      if a.kind in (Kind.B, Kind.I):
        preds.append(where[(Kind.F, a.stage, a.mb)])
        if a.stage < s.num_stages - 1:
          preds.append(where.get((Kind.B, a.stage + 1, a.mb), where.get((Kind.I, a.stage + 1,
                                                                            a.mb))))
      if a.kind is Kind.W:
        preds.append(where[(Kind.I, a.stage, a.mb)])
      for pred in preds:
        edges[pred].append((r, i))
        indeg[(r, i)] += 1
  ready = [n for n in nodes if indeg[n] == 0]
  seen = 0
  while ready:
    n = ready.pop()
    seen += 1
    for nxt in edges[n]:
      indeg[nxt] -= 1
      if indeg[nxt] == 0:
        ready.append(nxt)
  return seen == len(nodes)


@SETTINGS
@hypothesis.given(name=st.sampled_from(S.names()), p=st.integers(1, 6), m=st.integers(1, 12),
                  data=st.data())
def test_reordered_schedules_accepted_iff_deadlock_free(name, p, m, data):
  v = {"interleaved_1f1b": 2, "zbv": 2, "dualpipev": 2}.get(name, 1)
  s = build(name, p, m, v)
  rank = data.draw(st.integers(0, p - 1))
  row = list(s.actions[rank])
  i = data.draw(st.integers(0, len(row) - 1))
  j = data.draw(st.integers(0, len(row) - 1))
  row.insert(j, row.pop(i))  # move one action elsewhere in its rank's list
  bad = s.replace(actions=s.actions[:rank] + (tuple(row),) + s.actions[rank + 1:])
  try:
    S.validate(bad)
    ok = True
  except S.ScheduleError as err:
    ok = False
    assert err.rank is not None and err.position is not None
    assert bad.actions[err.rank][err.position] == err.action
    assert str(err).startswith(f"rank {err.rank}, position {err.position}, action {err.action}: ")
  assert ok == _acyclic(bad)
