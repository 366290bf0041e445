"""Executes an instruction program (``_instr``) against a buffer store.

:func:`bind` resolves every instruction once, when the programs are built: to its compiled
executable, the store slots it reads and writes, and how to unpack the executable's outputs; a
transfer to its batched device-to-device copy. :func:`execute` then walks the bound steps with
an opcode switch: per step it builds the flat argument list from the store, calls, and stores
the results. The store is a list indexed by buffer id; each slot holds a list of arrays.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax._src.lib import xla_client  # pylint: disable=g-bad-import-order

from hkpipe import schedules
from hkpipe._src.backends.mpmd import _instr as ir

# Opcodes of bound steps: (opcode, ...operands, instruction).
CALL, MOVE, SEND, POST, PULL, TIE, UPDATE, FREE = range(8)
# How a CALL stores its program's result: a tuple of groups, one list, or one array.
TUPLE, LIST, ARRAY = range(3)


def transfer(shardings: Sequence[Any]) -> Callable[[Sequence[jax.Array]], list]:
  """Returns ``move(arrays)``: copies arrays to ``shardings`` (same layout, other devices).

  The arrays already carry shardings of the same structure on the source rank, so the copy goes
  straight to the runtime's batched device-to-device copy, skipping ``jax.device_put``'s per-call
  argument processing (tens of microseconds per call). Falls back to ``jax.device_put`` if that
  entry point is unavailable or refuses the arrays. Always a copy (never an alias).
  """
  shardings = list(shardings)
  batched = getattr(xla_client, "batched_copy_array_to_devices_with_sharding", None)
  devices = [sh._internal_device_list for sh in shardings]  # pylint: disable=protected-access
  copy = [xla_client.ArrayCopySemantics.ALWAYS_COPY] * len(shardings)
  if batched is None:
    return lambda arrays: jax.device_put(list(arrays), shardings, may_alias=False)

  def move(arrays):
    try:
      return batched(list(arrays), devices, shardings, copy)
    except Exception:  # pylint: disable=broad-except
      return jax.device_put(list(arrays), shardings, may_alias=False)
  return move


def reshard_transfer(src: Sequence[Any], wire: Sequence[Any],
                     dst: Sequence[Any]) -> Callable[[Sequence[jax.Array]], list]:
  """Returns ``move(arrays)``: copies arrays laid out as ``src`` to ``dst``.

  ``wire[i]`` has ``src[i]``'s devices and ``dst[i]``'s layout (``dst[i]`` may be on other
  devices, with the same mesh shape): an array whose ``src`` differs from its ``wire`` is first
  resharded on its own devices, then every array is copied by :func:`transfer`. Always a copy.
  """
  fix = [i for i, (s, w) in enumerate(zip(src, wire)) if s != w]
  copy = transfer(dst)
  if not fix:
    return copy

  def move(arrays):
    arrays = list(arrays)
    for i, a in zip(fix, jax.device_put([arrays[i] for i in fix], [wire[i] for i in fix])):
      arrays[i] = a
    return copy(arrays)
  return move


@dataclasses.dataclass(frozen=True)
class Bound:
  """A program ready to execute.

  Attributes:
    program: the instruction program.
    steps: per instruction, its resolved step.
    nbytes: per buffer, its bytes on its rank's devices (all shards; 0 for inputs not known).
    fast: ``(step, dropped buffers, pulled reads)`` triples: the steps with each :class:`Free`
      folded into the step before it (what :func:`execute` runs); the pulled reads are the
      buffers the step reads that another process sends (see :func:`execute`).
  """

  program: ir.Program
  steps: tuple
  nbytes: tuple[int, ...]
  fast: tuple = ()


def spec_bytes(specs: Any) -> int:
  """Bytes of ``ShapeDtypeStruct`` leaves on all the devices of their shardings."""
  total = 0
  for s in jax.tree.leaves(specs):
    sharding = s.sharding
    shape = sharding.shard_shape(s.shape) if sharding is not None else s.shape
    devices = len(sharding.device_set) if sharding is not None else 1
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize * devices
  return total


class _Binder:
  """Resolves instructions of one program (see :func:`bind`)."""

  def __init__(self, program: ir.Program, setup: Any, programs: dict, io: Any):
    self.program, self.setup, self.programs, self.io = program, setup, programs, io
    self.nbytes = [0] * len(program.buffers)
    self.specs: list[Any] = [None] * len(program.buffers)   # per buffer: its leaf specs

  def _out(self, writes: Sequence[int], specs: Any, singles: Sequence[bool]) -> tuple:
    outs = []
    for i, (w, single) in enumerate(zip(writes, singles)):
      if w >= 0:
        leaves = [specs[i]] if single else list(specs[i])
        self.specs[w] = leaves
        self.nbytes[w] = spec_bytes(leaves)
        outs.append((i, w, single))
    return tuple(outs)

  def call(self, prog: Any, ins: Any, reads: Sequence[int], writes: Sequence[int],
           singles: Sequence[bool] | None) -> tuple:
    """``singles``: per output component, whether it is one array (None: one list)."""
    specs = prog.out_specs()
    mode = TUPLE
    if singles is None:         # the program returns one list
      specs, singles, mode = (specs,), (False,), LIST
    elif singles == (True,):    # the program returns one array
      specs, mode = (specs,), ARRAY
    outs = self._out(writes, specs, singles)
    return (CALL, prog.fn, tuple(reads), outs, mode, ins)

  def run(self, ins: ir.Run) -> tuple:
    if ins.program is None:
      for r, w in zip(ins.reads, ins.writes):
        self.specs[w], self.nbytes[w] = self.specs[r], self.nbytes[r]
      return (MOVE, tuple(zip(ins.reads, ins.writes)), ins)
    if self.program.name == "eval":
      prog = self.programs["evals"][ins.stage]
      last = ins.stage == self.setup.num_stages - 1
      return self.call(prog, ins, ins.reads, ins.writes, (True,) if last else None)
    progs = self.programs["stages"][ins.stage]
    singles = {"fwd": (False, False), "last": (False, True, False),
               "last_fwd_i": (True, False, False), "bwd": (False, False), "i": None,
               "w": None}[ins.program]
    return self.call(progs[ins.program], ins, ins.reads, ins.writes, singles)

  def send(self, ins: ir.Send) -> tuple:
    src = ins.reads[0]
    if ins.remote:
      return (POST, ins.key, ins.reads, ins.first_shard_only, ins)
    leaves = self.specs[src]
    shardings = self.setup.act_shardings(ins.dst_rank, leaves)
    dst = ins.writes[0]
    self.specs[dst] = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)
                       for a, sh in zip(leaves, shardings)]
    self.nbytes[dst] = spec_bytes(self.specs[dst])
    return (SEND, transfer(shardings), src, dst, ins)

  def recv(self, ins: ir.Recv) -> tuple:
    specs = self.io.recv_specs(ins.key)
    w = ins.writes[0]
    self.specs[w], self.nbytes[w] = specs, spec_bytes(specs)
    label = self.io.label(ins.key, ins.src_rank, ins.dst_rank)
    return (PULL, ins.key, ins.process, tuple(specs), label, w, ins)

  def tie(self, ins: ir.TieSend) -> tuple:
    setup = self.setup
    f, own = setup.fns[ins.stage], setup.psh[ins.stage]
    local, remote = [], []
    for leaf, (t, k, _), w in zip(ins.leaves, ins.targets, ins.writes):
      wire = setup.tie_wire(ins.stage, k)
      if w >= 0:     # into the partner leaf's own sharding, on the partner's rank
        dst = setup.psh[t][setup.tie_partner(k, ins.stage)[1]]
        spec = jax.ShapeDtypeStruct(f.p_leaves[leaf].shape, f.p_leaves[leaf].dtype, sharding=dst)
        self.specs[w], self.nbytes[w] = [spec], spec_bytes([spec])
        local.append((leaf, w, own[leaf], wire, dst))
      else:          # posted in the partner's layout, on this rank's devices
        remote.append((leaf, ("tie", t, k), own[leaf], wire))
    move = reshard_transfer([x[2] for x in local], [x[3] for x in local],
                            [x[4] for x in local])
    copy = reshard_transfer([x[2] for x in remote], [x[3] for x in remote],
                            [x[3] for x in remote])
    return (TIE, ins.reads[0], tuple((x[0], x[1]) for x in local), move,
            tuple((x[0], x[1]) for x in remote), copy, ins)

  def finalize(self, ins: ir.Finalize) -> tuple:
    if ins.fused:
      prog = self.programs["updates"][ins.stage]
      return self.call(prog, ins, ins.reads, ins.writes, (False, False, False, True))
    prog = self.programs["finalize"][ins.stage]
    return self.call(prog, ins, ins.reads, ins.writes, (False, True))

  def update(self, ins: ir.Update) -> tuple:
    calls = []
    for s, reads, writes in zip(ins.stages, ins.reads, ins.writes):
      step = self.call(self.programs["updates"][s], ins, reads, writes, (False, False, False))
      calls.append(step[1:4])
    return (UPDATE, tuple(calls), ins)

  def bind(self, ins: ir.Instr) -> tuple:
    if isinstance(ins, ir.Run):
      return self.run(ins)
    if isinstance(ins, ir.Send):
      return self.send(ins)
    if isinstance(ins, ir.Recv):
      return self.recv(ins)
    if isinstance(ins, ir.TieSend):
      return self.tie(ins)
    if isinstance(ins, ir.Finalize):
      return self.finalize(ins)
    if isinstance(ins, ir.Metrics):
      return self.call(self.programs["metrics"], ins, ins.reads, ins.writes, (True,) * 4)
    if isinstance(ins, ir.Mean):
      return self.call(self.programs["mean"], ins, ins.reads, ins.writes, (True,))
    if isinstance(ins, ir.Update):
      return self.update(ins)
    assert isinstance(ins, ir.Free)
    return (FREE, ins.reads, ins)


def bind(program: ir.Program, setup: Any, programs: dict, io: Any,
         input_specs: Callable[[tuple], list]) -> Bound:
  """Resolves ``program``'s instructions to compiled programs, copies and store slots.

  Args:
    program: the instruction program.
    setup: the pipeline setup (shardings, stage functions).
    programs: compiled programs: ``stages`` (per stage, by name), ``finalize``, ``updates``
      (per stage), ``metrics``; or ``evals`` (per stage) and ``mean``.
    io: cross-process message helpers: ``recv_specs(key)`` and ``label(key, src, dst)``.
    input_specs: ``input_specs(name) -> leaf specs`` of an input buffer (for its bytes).
  """
  b = _Binder(program, setup, programs, io)
  for name, buf in program.inputs.items():
    b.specs[buf] = input_specs(name)
    b.nbytes[buf] = spec_bytes(b.specs[buf])
  steps = tuple(b.bind(ins) for ins in program.instrs)
  fast: list = []
  pulled: set[int] = set()         # buffers holding data another process sends
  for step in steps:
    if step[0] == FREE and fast:
      fast[-1] = (fast[-1][0], fast[-1][1] + step[1], fast[-1][2])
      continue
    if step[0] == PULL:
      pulled.add(step[5])
    elif step[0] == MOVE:           # a pass-through hands the (maybe pulled) arrays on
      pulled.update(w for r, w in step[1] if r in pulled)
    waits = () if step[0] in (PULL, MOVE, FREE) else tuple(
        r for r in ir.reads_of(step[-1]) if r in pulled)
    fast.append((step, (), waits))
  return Bound(program, steps, tuple(b.nbytes), tuple(fast))


def _exec(step: tuple, store: list, net: Any) -> None:
  """Executes one bound step (``net``: ``post(key, arrays, first_shard_only)`` and
  ``pull(key, process, specs, label)`` of the current driver call)."""
  op = step[0]
  if op == CALL:
    _, fn, reads, outs, mode, _ = step
    args: list = []
    for b in reads:
      args += store[b]
    res = fn(*args)
    if mode == LIST:
      store[outs[0][1]] = res
    elif mode == ARRAY:
      store[outs[0][1]] = [res]
    else:
      for i, w, single in outs:
        store[w] = [res[i]] if single else res[i]
  elif op == FREE:
    for b in step[1]:
      store[b] = None
  elif op == SEND:
    store[step[3]] = step[1](store[step[2]])
  elif op == MOVE:
    for r, w in step[1]:
      store[w], store[r] = store[r], None
  elif op == POST:
    arrays = [a for b in step[2] for a in store[b]]
    net.post(step[1], arrays, step[3])
  elif op == PULL:
    store[step[5]] = net.pull(step[1], step[2], step[3], step[4])
  elif op == TIE:
    _, src, local, move, remote, copy, _ = step
    acc = store[src]
    if local:
      for (_, w), value in zip(local, move([acc[leaf] for leaf, _ in local])):
        store[w] = [value]
    if remote:
      for (_, key), value in zip(remote, copy([acc[leaf] for leaf, _ in remote])):
        net.post(key, [value], False)
  else:  # UPDATE
    for fn, reads, outs in step[1]:
      args = []
      for b in reads:
        args += store[b]
      res = fn(*args)
      for i, w, _ in outs:
        store[w] = res[i]


def execute(bound: Bound, store: list, net: Any, progress: Any) -> None:
  """Runs every step; ``progress.op`` names the instruction being issued (hang watchdog; a
  :class:`Free`, folded into the step before it, issues nothing that could hang).

  A step that reads data pulled from another process is issued only once that data has
  arrived. Issued earlier, it would wait on its device, and the CPU runtime admits only about
  32 such in-flight computations per device (jax 0.10.2; not configurable): once they are all
  waiting, further dispatches block, the transfer server's copies of arrays this process
  already computed never run, and two processes that wait on each other stop for good
  (docs/design/multiprocess.md, section 5). Waiting on the host in program order cannot
  deadlock: every process issues its instructions in one global order consistent with the data
  dependencies, and posts each message as soon as its producer is issued.
  """
  for step, drops, pulled in bound.fast:
    progress.op = step[-1]
    if pulled:
      jax.block_until_ready([store[b] for b in pulled])
    _exec(step, store, net)
    for b in drops:
      store[b] = None


def live_device_bytes(device_rank: dict) -> list[int]:
  """Per rank, bytes of the live (not deleted) arrays on its devices, each buffer once
  (measured from ``jax.live_arrays()``, independently of the program's bookkeeping)."""
  out = [0] * (max(device_rank.values(), default=-1) + 1)
  seen = set()
  for a in jax.live_arrays():
    if a.is_deleted():
      continue
    for shard in a.addressable_shards:
      r = device_rank.get(shard.device)
      if r is None:
        continue
      data = shard.data
      key = (shard.device.id, data.unsafe_buffer_pointer())
      if key not in seen:
        seen.add(key)
        out[r] += data.nbytes
  return out


@dataclasses.dataclass(frozen=True)
class Trace:
  """What a timed execution observed.

  Attributes:
    records: the executed schedule actions (``schedules.Record``), times in seconds.
    bytes_after: per instruction, per rank, live device bytes above those before the call.
    origin: ``time.time()`` at the records' time 0 (places them on this process's wall clock).
  """

  records: tuple
  bytes_after: tuple[tuple[int, ...], ...]
  origin: float = 0.0


def execute_timed(bound: Bound, store: list, net: Any, progress: Any,
                  device_rank: dict) -> Trace:
  """Like :func:`execute`, but waits for each step, timing schedule actions and sampling the
  live device bytes per rank after each instruction."""
  base = live_device_bytes(device_rank)
  records, after = [], []
  origin, t0 = time.time(), time.perf_counter()
  for step in bound.steps:
    ins = step[-1]
    if step[0] != FREE:
      progress.op = ins
    if isinstance(ins, ir.Run):  # its inputs first: one may come from another process
      jax.block_until_ready([store[r] for r in ins.reads if store[r] is not None])
    start = time.perf_counter()
    _exec(step, store, net)
    if step[0] != PULL:  # a receive may be issued before its sender ran: its consumer waits
      jax.block_until_ready([store[w] for w in ir.writes_of(ins) if store[w] is not None])
    end = time.perf_counter()
    if isinstance(ins, ir.Run):
      records.append(schedules.Record(ins.rank, schedules.Kind[ins.kind].value, ins.stage,
                                      ins.mb, start - t0, end - t0))
    now = live_device_bytes(device_rank)
    after.append(tuple(n - b for n, b in zip(now, base)))
  return Trace(tuple(records), tuple(after), origin)
