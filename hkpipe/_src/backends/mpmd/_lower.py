"""Lowering: a pipeline schedule -> the instruction program one process issues (``_instr``).

The compute part follows the schedule engine's global issue order
(``_mpmd_plan.issue_order``, the compute actions of ``schedules.lower`` run by
``schedules._engine``), filtered to this process's ranks. Each value another stage needs is sent
right after it is produced: a :class:`Send` copies it to a rank of this process, or posts it to
another process, whose program starts with the matching :class:`Recv` (pulls wait without
blocking the host, so every pull is issued first). A value is named by the engine's
``message_key`` of the SEND that ``schedules.lower`` puts after its producer, and looked up by
that of the RECV it puts before its consumer: the engine's one rule pairs them. After a stage's
last backward come its tie exchange and its finalize step; then the metrics, and the clipped
updates. A final pass inserts a :class:`Free` after each temporary buffer's last read.

Lowering uses only the layout facts in :class:`Facts`: no compiled program, no array.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hkpipe import schedules
from hkpipe._src.backends import _mpmd_plan
from hkpipe._src.backends.mpmd import _instr as ir
from hkpipe.schedules import _engine

Kind = schedules.Kind


def sent_by(a: schedules.Action, num_stages: int) -> tuple[tuple, int] | None:
  """``(message key, consumer stage)`` of the value compute action ``a`` hands to another
  stage (its activation or input cotangent), None if it hands on nothing. The key is that of the
  SEND ``schedules.lower`` puts after ``a`` when the consumer lives on another rank."""
  for key in _engine.done_keys(a):
    dst = _engine.consumer_stage(key, num_stages)
    if dst is not None:
      send = schedules.Action(a.stage, _engine.COMM[key[0]][0], a.mb)
      return _engine.message_key(send), dst
  return None


def awaited_by(a: schedules.Action, num_stages: int) -> tuple | None:
  """The message key of the value compute action ``a`` needs from another stage (None if it
  needs none): that of the RECV ``schedules.lower`` puts before ``a`` when the producer lives
  on another rank, equal to its SEND's key by ``_engine.message_key``."""
  for key in _engine.dependencies(a, num_stages):
    if key[1] != a.stage:
      return _engine.message_key(schedules.Action(a.stage, _engine.COMM[key[0]][1], a.mb))
  return None


@dataclasses.dataclass(frozen=True)
class Facts:
  """What lowering needs to know about a pipeline.

  Attributes:
    num_stages: stages (``p * v``).
    rank_of: per stage, its rank.
    num_ranks: ranks.
    owned: the ranks this process drives.
    rank_process: per rank, the process owning its devices.
    process: this process.
    order: the global issue order ``((rank, action), ...)``.
    ties: ``(stage_a, leaf_a, stage_b, leaf_b)`` per tied parameter pair.
    scaled: whether updates wait for the global squared gradient norm (clipping or skip guard;
      NaN means skip the step).
    donate: whether updates donate parameters and optimizer state.
    num_microbatches: microbatches per step.
    other_processes: every process but this one (multi-process runs), else ``()``.
  """

  num_stages: int
  rank_of: tuple[int, ...]
  num_ranks: int
  owned: frozenset
  rank_process: tuple[int, ...]
  process: int
  order: tuple
  ties: tuple[tuple[int, int, int, int], ...]
  scaled: bool
  donate: bool
  num_microbatches: int
  other_processes: tuple[int, ...] = ()

  @property
  def last_rank(self) -> int:
    return self.rank_of[-1]

  @property
  def first_rank(self) -> int:
    return self.rank_of[0]

  def owns(self, stage: int) -> bool:
    return self.rank_of[stage] in self.owned

  def tie_sends(self, s: int) -> list[tuple[int, int, int]]:
    """``(leaf of s, partner stage, tie index)`` per tie of stage ``s`` with another stage."""
    out = []
    for k, (sa, la, sb, lb) in enumerate(self.ties):
      if sa != sb and sa == s:
        out.append((la, sb, k))
      elif sa != sb and sb == s:
        out.append((lb, sa, k))
    return out

  def incoming(self, s: int) -> list[int]:
    """Tie indices whose partner gradient stage ``s`` adds (see ``_tie_plan``)."""
    return [k for k, (sa, _, sb, _) in enumerate(self.ties) if sa != sb and s in (sa, sb)]


class _Builder:
  """Accumulates buffers and instructions of one program."""

  def __init__(self, facts: Facts):
    self.f = facts
    self.buffers: list[ir.Buffer] = []
    self.instrs: list[ir.Instr] = []
    self.recvs: list[ir.Recv] = []
    self.inputs: dict = {}
    self.outputs: dict = {}

  def buf(self, name: str, rank: int, role: str = ir.TEMP,
          stash: tuple[int, int] | None = None) -> int:
    self.buffers.append(ir.Buffer(name, rank, role, stash))
    return len(self.buffers) - 1

  def input(self, key: tuple, name: str, rank: int) -> int:
    self.inputs[key] = b = self.buf(name, rank, ir.INPUT)
    return b

  def output(self, key: Any, b: int) -> int:
    old = self.buffers[b]
    self.buffers[b] = dataclasses.replace(old, role=ir.OUTPUT)
    self.outputs[key] = b
    return b

  def recv(self, key: tuple, src_rank: int, dst_rank: int | None, name: str) -> int:
    b = self.buf(name, dst_rank if dst_rank is not None else self.f.last_rank)
    self.recvs.append(ir.Recv(src_rank, dst_rank, key, self.f.rank_process[src_rank], (b,)))
    return b

  def deliver(self, src_rank: int, b: int, key: tuple, dst_rank: int, name: str) -> int | None:
    """Hands buffer ``b`` (on ``src_rank``) to ``dst_rank``: the buffer there, or None if it
    lives on another process (posted as message ``key``)."""
    f = self.f
    if dst_rank == src_rank:
      return b
    if dst_rank in f.owned:
      out = self.buf(name, dst_rank)
      self.instrs.append(ir.Send(src_rank, dst_rank, key, (b,), (out,)))
      return out
    self.instrs.append(ir.Send(src_rank, dst_rank, key, (b,), remote=True,
                               process=f.rank_process[dst_rank]))
    return None

  def program(self, name: str) -> ir.Program:
    instrs = insert_frees(self.buffers, list(self.recvs) + self.instrs)
    return ir.Program(name, self.f.process, tuple(self.buffers), tuple(instrs),
                      dict(self.inputs), dict(self.outputs))


def insert_frees(buffers: Any, instrs: list) -> list:
  """Adds a :class:`Free` after the last read of every temporary buffer (right after the write
  of one nobody reads); buffers a pass-through :class:`Run` moves on are not freed again."""
  last: dict[int, int] = {}
  moved: set[int] = set()
  for i, ins in enumerate(instrs):
    for b in ir.writes_of(ins):
      last.setdefault(b, i)
    for b in ir.reads_of(ins):
      last[b] = i
    if isinstance(ins, ir.Run) and ins.program is None:
      moved.update(ins.reads)
  after: dict[int, dict[int, list[int]]] = {}
  for b, i in sorted(last.items()):
    if buffers[b].role == ir.TEMP and b not in moved:
      after.setdefault(i, {}).setdefault(buffers[b].rank, []).append(b)
  out = []
  for i, ins in enumerate(instrs):
    out.append(ins)
    for rank, bufs in sorted(after.get(i, {}).items()):
      out.append(ir.Free(rank, tuple(bufs)))
  return out


def _common_inputs(b: _Builder, training: bool) -> None:
  f = b.f
  for s in range(f.num_stages):
    if f.owns(s):
      r = f.rank_of[s]
      b.input(("p", s), f"p{s}", r)
      b.input(("lidx", s), f"lidx{s}", r)
  if f.first_rank in f.owned:
    for mb in range(f.num_microbatches):
      b.input(("x", mb), f"x0.{mb}", f.first_rank)
  if f.last_rank in f.owned:
    for mb in range(f.num_microbatches):
      b.input(("t", mb), f"t.{mb}", f.last_rank)
    b.input(("loss",), "loss0", f.last_rank)
  if training:
    for r in sorted(f.owned):
      b.input(("rng", r), f"rng@{r}", r)
      b.input(("step", r), f"step@{r}", r)
      for mb in range(f.num_microbatches):
        b.input(("mb", r, mb), f"mb{mb}@{r}", r)


class _TrainLowering:
  """The train (``with_update``) or gradient program of one process."""

  def __init__(self, facts: Facts, with_update: bool):
    self.f = f = facts
    self.b = b = _Builder(facts)
    self.with_update = with_update
    _common_inputs(b, training=True)
    self.acc = {}
    for s in range(f.num_stages):
      if f.owns(s):
        self.acc[s] = b.input(("acc", s), f"acc{s}", f.rank_of[s])
        if with_update:
          b.input(("opt", s), f"opt{s}", f.rank_of[s])
    self.loss: int = b.inputs.get(("loss",), -1)
    self.inbox: dict = {}         # message key -> the buffer holding it on its consumer's rank
    self.stash: dict = {}
    self.partner: dict = {}
    self.sq: dict = {}
    self.version: dict = {}
    self.split = {(a.stage, a.mb) for _, a in f.order if a.kind is Kind.W}

  def acc_buf(self, s: int) -> int:
    self.version[s] = v = self.version.get(s, 0) + 1
    return self.b.buf(f"acc{s}.{v}", self.f.rank_of[s])

  def _send(self, src_rank: int, a: schedules.Action, buf: int) -> None:
    """Hands what ``a`` produced for another stage (buffer ``buf``) to that stage's rank."""
    sent = sent_by(a, self.f.num_stages)
    assert sent is not None  # callers send only what a hands to another stage
    key, dst = sent
    out = self.b.deliver(src_rank, buf, key, self.f.rank_of[dst], _value_name(key, dst, a.mb))
    if out is not None:
      self.inbox[key] = out

  def _receive(self, a: schedules.Action) -> int:
    """The buffer holding what ``a`` needs from another stage."""
    return self.inbox.pop(awaited_by(a, self.f.num_stages))

  def action(self, r: int, a: schedules.Action) -> None:
    f, b = self.f, self.b
    s, mb, key = a.stage, a.mb, (a.stage, a.mb)
    first, last = s == 0, s == f.num_stages - 1
    inp = b.inputs
    common = (inp[("rng", r)], inp[("step", r)], inp[("mb", r, mb)], inp[("lidx", s)])
    p = inp[("p", s)]
    tgt = (inp[("t", mb)],) if last else ()
    k = a.kind.name

    def x():
      return inp[("x", mb)] if first else self._receive(a)

    def run(program, reads, writes, donates=()):
      b.instrs.append(ir.Run(r, s, k, mb, program, tuple(reads), tuple(writes), tuple(donates)))

    if a.kind is Kind.F:
      xb = x()
      if last and key not in self.split:
        acc, loss = self.acc_buf(s), b.buf(f"loss.{mb}", r)
        dx = b.buf(f"dx{s}.{mb}", r, stash=key)
        run("last", (p, xb) + tgt + common + (self.acc[s], self.loss), (acc, loss, dx),
            (self.acc[s],))
        self.acc[s], self.loss, self.stash[key] = acc, loss, {"dx": dx}
      elif last:
        loss, dx = b.buf(f"loss.{mb}", r), b.buf(f"dx{s}.{mb}", r)
        res = b.buf(f"res{s}.{mb}", r, stash=key)
        run("last_fwd_i", (p, xb) + tgt + common + (self.loss,), (loss, dx, res))
        self.loss, self.stash[key] = loss, {"x": xb, "res": res, "dx": dx}
      else:
        y, res = b.buf(f"y{s}.{mb}", r), b.buf(f"res{s}.{mb}", r, stash=key)
        run("fwd", (p, xb) + common, (y, res))
        self.stash[key] = {"x": xb, "res": res}
        self._send(r, a, y)
    elif last and a.kind in (Kind.B, Kind.I):
      entry = self.stash.pop(key) if a.kind is Kind.B else self.stash[key]
      dx = entry.pop("dx")
      out = () if first else (b.buf(f"dx{s}.{mb}'", r),)
      run(None, (dx,), out)
      if out:
        self._send(r, a, out[0])
    elif a.kind is Kind.B:
      st = self.stash.pop(key)
      acc = self.acc_buf(s)
      dx = -1 if first else b.buf(f"dx{s}.{mb}", r)
      run("bwd", (p, st["x"]) + common + (st["res"], self._receive(a), self.acc[s]),
          (acc, dx), (self.acc[s],))
      self.acc[s] = acc
      if not first:
        self._send(r, a, dx)
    elif a.kind is Kind.I:
      st = self.stash[key]
      st["dy"] = self._receive(a)
      if first:
        run(None, (), ())                 # no input gradient to compute
      else:
        dx = b.buf(f"dx{s}.{mb}", r)
        run("i", (p, st["x"]) + common + (st["res"], st["dy"]), (dx,))
        self._send(r, a, dx)
    else:  # W
      st = self.stash.pop(key)
      acc = self.acc_buf(s)
      dy = (st["dy"],) if "dy" in st else ()
      run("w", (p, st["x"]) + tgt + common + (st["res"],) + dy + (self.acc[s],), (acc,),
          (self.acc[s],))
      self.acc[s] = acc

  def remote_action(self, r: int, a: schedules.Action) -> None:
    """What another process's action sends to this process: expect it."""
    sent = sent_by(a, self.f.num_stages)
    if sent is not None and self.f.owns(sent[1]):
      key, dst = sent
      self.inbox[key] = self.b.recv(key, r, self.f.rank_of[dst], _value_name(key, dst, a.mb))

  def tie_send(self, s: int) -> None:
    f, b = self.f, self.b
    r = f.rank_of[s]
    if r not in f.owned:
      for _, t, k in f.tie_sends(s):
        if f.owns(t):
          self.partner[(t, k)] = b.recv(("tie", t, k), r, f.rank_of[t], f"tie{k}->{t}")
      return
    leaves, targets, writes, procs = [], [], [], []
    for leaf, t, k in f.tie_sends(s):
      leaves.append(leaf)
      targets.append((t, k, f.rank_of[t]))
      if f.owns(t):
        self.partner[(t, k)] = w = b.buf(f"tie{k}->{t}", f.rank_of[t])
        writes.append(w)
        procs.append(-1)
      else:
        writes.append(-1)
        procs.append(f.rank_process[f.rank_of[t]])
    b.instrs.append(ir.TieSend(r, s, (self.acc[s],), tuple(leaves), tuple(targets),
                               tuple(writes), tuple(procs)))

  def finalize(self, s: int) -> None:
    f, b = self.f, self.b
    r, lr = f.rank_of[s], f.last_rank
    if r not in f.owned:
      if lr in f.owned:
        self.sq[s] = b.recv(("sq", s), r, lr, f"sq{s}")
      return
    partners = tuple(self.partner.pop((s, k)) for k in f.incoming(s))
    sq = b.buf(f"sq{s}", r)
    if not self.with_update or f.scaled:
      g = self.acc_buf(s)
      b.instrs.append(ir.Finalize(r, s, False, (self.acc[s],) + partners, (g, sq),
                                  (self.acc[s],)))
      self.acc[s] = g
      if not self.with_update:
        b.output(("grads", s), g)
    else:
      inp = b.inputs
      p, o, z = (b.buf(f"{n}{s}'", r) for n in ("p", "opt", "acc"))
      reads = (inp[("p", s)], inp[("opt", s)], self.acc[s]) + partners
      donates = (inp[("p", s)], inp[("opt", s)]) if f.donate else ()
      b.instrs.append(ir.Finalize(r, s, True, reads, (p, o, z, sq), donates + (self.acc[s],)))
      for n, buf in (("p", p), ("opt", o), ("acc", z)):
        b.output((n, s), buf)
    out = b.deliver(r, sq, ("sq", s), lr, f"sq{s}@{lr}")
    if out is not None:
      self.sq[s] = out

  def metrics(self) -> None:
    f, b = self.f, self.b
    lr = f.last_rank
    if lr not in f.owned:
      b.output(("metrics",), b.recv(("metrics", f.process), lr, None, "metrics"))
      return
    loss, norm, scale, skipped = (b.buf(n, lr) for n in ("loss", "norm", "gsq", "skipped"))
    reads = (self.loss,) + tuple(self.sq[s] for s in range(f.num_stages))
    b.instrs.append(ir.Metrics(lr, reads, (loss, norm, scale, skipped)))
    for n, buf in (("loss", loss), ("norm", norm), ("skipped", skipped)):
      b.output((n,), buf)
    for q in f.other_processes:
      b.instrs.append(ir.Send(lr, -1, ("metrics", q), (loss, norm, skipped), remote=True,
                              process=q, first_shard_only=True))
    self.scale = scale

  def clipped_update(self) -> None:
    f, b = self.f, self.b
    lr = f.last_rank
    scales = {}
    if lr in f.owned:
      scales[lr] = self.scale
      for r in range(f.num_ranks):
        if r != lr:
          out = b.deliver(lr, self.scale, ("scale", r), r, f"gsq@{r}")
          if out is not None:
            scales[r] = out
    else:
      for r in sorted(f.owned):
        scales[r] = b.recv(("scale", r), lr, r, f"gsq@{r}")
    stages = tuple(s for s in range(f.num_stages) if f.owns(s))
    inp = b.inputs
    reads, writes, donates = [], [], []
    for s in stages:
      r = f.rank_of[s]
      reads.append((inp[("p", s)], inp[("opt", s)], self.acc[s], scales[r]))
      outs = tuple(b.buf(f"{n}{s}'", r) for n in ("p", "opt", "acc"))
      for n, buf in zip(("p", "opt", "acc"), outs):
        b.output((n, s), buf)
      writes.append(outs)
      donates += ([inp[("p", s)], inp[("opt", s)]] if f.donate else []) + [self.acc[s]]
    b.instrs.append(ir.Update(f.process, stages, tuple(f.rank_of[s] for s in stages),
                              tuple(reads), tuple(writes), tuple(donates)))

  def lower(self) -> ir.Program:
    f = self.f
    last_grad = _mpmd_plan.last_backward_index(f.order, f.num_stages)
    partners: dict[int, set[int]] = {s: set() for s in range(f.num_stages)}
    for sa, _, sb, _ in f.ties:
      if sa != sb:
        partners[sa].add(sb)
        partners[sb].add(sa)
    complete: set[int] = set()
    finalized: set[int] = set()
    for i, (rank, a) in enumerate(f.order):
      if rank in f.owned:
        self.action(rank, a)
      else:
        self.remote_action(rank, a)
      if last_grad[a.stage] != i:
        continue
      complete.add(a.stage)
      if partners[a.stage]:
        self.tie_send(a.stage)
      for t in sorted({a.stage} | partners[a.stage]):
        if t not in finalized and t in complete and partners[t] <= complete:
          self.finalize(t)
          finalized.add(t)
    self.metrics()
    if self.with_update and f.scaled:
      self.clipped_update()
    return self.b.program("train" if self.with_update else "grads")


def _value_name(key: tuple, stage: int, mb: int) -> str:
  """The buffer name of message ``key`` on its consumer ``stage``: ``x2.0`` (the input of stage
  2, microbatch 0) or ``dy1.0`` (the output cotangent of stage 1)."""
  return f"{'x' if key[0] == 'F' else 'dy'}{stage}.{mb}"


def lower_train(facts: Facts, with_update: bool = True) -> ir.Program:
  """The program of one train step (``with_update``) or gradient computation of this process."""
  return _TrainLowering(facts, with_update).lower()


def lower_eval(facts: Facts) -> ir.Program:
  """The program of one evaluation (forward only, no dropout), microbatch by microbatch."""
  f = facts
  b = _Builder(f)
  _common_inputs(b, training=False)
  inp = b.inputs
  inbox: dict = {}
  loss: int = inp.get(("loss",), -1)
  last = f.num_stages - 1
  for mb in range(f.num_microbatches):
    for s in range(f.num_stages):
      r = f.rank_of[s]
      a = schedules.Action(s, Kind.F, mb)
      sent = sent_by(a, f.num_stages)
      if r not in f.owned:
        if sent is not None and f.owns(sent[1]):
          key, dst = sent
          inbox[key] = b.recv(key, r, f.rank_of[dst], _value_name(key, dst, mb))
        continue
      x = inp[("x", mb)] if s == 0 else inbox.pop(awaited_by(a, f.num_stages))
      if s == last:
        new = b.buf(f"loss.{mb}", r)
        b.instrs.append(ir.Run(r, s, "F", mb, "eval", (inp[("p", s)], x, inp[("t", mb)],
                                                       inp[("lidx", s)], loss), (new,)))
        loss = new
      else:
        y = b.buf(f"y{s}.{mb}", r)
        b.instrs.append(ir.Run(r, s, "F", mb, "eval", (inp[("p", s)], x, inp[("lidx", s)]),
                               (y,)))
        assert sent is not None  # a forward before the last stage hands on its activation
        key, dst = sent
        out = b.deliver(r, y, key, f.rank_of[dst], _value_name(key, dst, mb))
        if out is not None:
          inbox[key] = out
  lr = f.last_rank
  if lr in f.owned:
    mean = b.buf("loss", lr)
    b.instrs.append(ir.Mean(lr, (loss,), (mean,)))
    b.output(("loss",), mean)
    for q in f.other_processes:
      b.instrs.append(ir.Send(lr, -1, ("eval", q), (mean,), remote=True, process=q,
                              first_shard_only=True))
  else:
    b.output(("loss",), b.recv(("eval", f.process), lr, None, "loss"))
  return b.program("eval")
