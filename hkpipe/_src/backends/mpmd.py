"""The true MPMD backend: one compiled XLA program per stage, driven by a host loop.

Each pipeline stage is a contiguous range of layers (``hkpipe.partition``) placed on the devices
of one pipeline rank (one device, or ``dp`` devices of a ``("pp", "dp")`` mesh). Its forward,
backward (or input/weight-gradient halves for zero-bubble schedules), optimizer update and a few
helpers are compiled ahead of time as separate executables; identical stages share one XLA
compile (``_mpmd_compile``). A host driver walks the schedule (``_mpmd_plan.issue_order``) and
issues every program through JAX's asynchronous dispatch:

- a forward returns its output and the ``jax.vjp`` residuals the backward needs (minus those that
  are just its inputs); the driver stashes them per (stage, microbatch) until the backward;
- the last stage fuses forward, loss and backward in one program;
- activations and cotangents move to the next rank's devices right after they are produced, by
  the runtime's batched device-to-device copy (stages on the same rank pass them on directly);
- gradients accumulate on the owning devices; tied weights on different stages exchange their
  gradients; each stage measures its squared gradient norm; the global norm (and the clipping
  factor, NaN when a non-finite loss or norm skips the step) is computed on the last rank and sent
  back; each stage applies the optimizer on its own devices. Parameters and optimizer state never
  leave their stage.

Nothing blocks except reading metrics (or ``record_timeline=True``, which blocks after each action
to time it).

Across processes (``jax.distributed``), each process drives only the ranks whose devices it owns:
it compiles their programs, runs the global issue order filtered to them, and exchanges values
with other processes' ranks through ``_mpmd_transfer`` (uuid-keyed transfers; see docs/mpmd.md,
"Across processes"). Every process must make the same driver calls in the same order.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax._src.interpreters import pxla  # pylint: disable=g-bad-import-order
from jax._src.lib import xla_client  # pylint: disable=g-bad-import-order

from hkpipe import schedules
from hkpipe._src import layout as layout_lib
from hkpipe._src import partition as partition_lib
from hkpipe._src import pipeline as pl
from hkpipe._src import stage as stage_lib
from hkpipe._src.backends import _mpmd_compile
from hkpipe._src.backends import _mpmd_plan
from hkpipe._src.backends import _mpmd_programs as progs
from hkpipe._src.backends import _mpmd_transfer as xfer_lib

Kind = schedules.Kind


def _spec(shape: Any, sharding: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)


def _microbatch_shapes(batch: pl.Batch, m: int) -> tuple[Any, Any]:
  return tuple(jax.tree.map(  # type: ignore[return-value]
      lambda x: jax.ShapeDtypeStruct((np.shape(x)[0] // m,) + tuple(np.shape(x)[1:]), x.dtype),
      part) for part in batch)


def _transfer(shardings: Sequence[NamedSharding]) -> Callable[[Sequence[jax.Array]], list]:
  """Returns ``move(arrays)``: copies arrays to ``shardings`` (same layout, other devices).

  The driver's arrays already carry shardings of the same structure on the source rank, so the
  copy goes straight to the runtime's batched device-to-device copy, skipping
  ``jax.device_put``'s per-call argument processing (tens of microseconds per call, a large
  share of a small pipeline's step). Falls back to ``jax.device_put`` if that entry point is
  unavailable or refuses the arrays.
  """
  shardings = list(shardings)
  batched = getattr(xla_client, "batched_copy_array_to_devices_with_sharding", None)
  devices = [sh._internal_device_list for sh in shardings]  # pylint: disable=protected-access
  copy = [xla_client.ArrayCopySemantics.ALWAYS_COPY] * len(shardings)
  if batched is None:
    return lambda arrays: jax.device_put(list(arrays), shardings)

  def move(arrays):
    try:
      return batched(list(arrays), devices, shardings, copy)
    except Exception:  # pylint: disable=broad-except
      return jax.device_put(list(arrays), shardings)
  return move


class _Ctx:
  """Mutable state of one driver call (a train step, a gradient or an evaluation)."""

  __slots__ = ("p", "opt", "acc", "loss", "rng", "step", "xin", "tgt", "acts", "cts", "stash",
               "partner", "sq", "metrics", "new_p", "new_opt", "new_acc", "call", "scale")

  def __init__(self, num_stages: int, call: int = 0):
    self.p: list = []             # per stage: parameter leaves
    self.opt: list = []           # per stage: optimizer-state leaves
    self.acc: list = []           # per stage: gradient accumulator leaves
    self.rng: list = []           # per rank: the base key
    self.step: list = []          # per rank: the step number
    self.xin: list = []           # per microbatch: input leaves (first rank)
    self.tgt: list = []           # per microbatch: target leaves (last rank)
    self.loss: Any = None
    self.acts: dict = {}
    self.cts: dict = {}
    self.stash: dict = {}
    self.partner: dict = {}
    self.sq: list = [None] * num_stages
    self.new_p: list = [None] * num_stages
    self.new_opt: list = [None] * num_stages
    self.new_acc: list = [None] * num_stages
    self.metrics: Any = None
    self.call = call              # the backend's driver-call number (transfer ids)
    self.scale: dict = {}         # per rank: the clipping factor received from another process


@dataclasses.dataclass(frozen=True)
class _Recv:
  """A message this process pulls from another one at the start of a driver call.

  Attributes:
    key: the message key (with the call number, it makes the transfer id).
    process: the sending process.
    specs: shape, dtype and sharding (here) of each array.
    put: ``put(ctx, arrays)`` stores the (not yet ready) arrays where the consumer looks.
    label: ``(receiver, message)`` texts for the hang watchdog (``xfer_lib.describe``).
  """

  key: tuple
  process: int
  specs: tuple
  put: Callable[[Any, list], None]
  label: tuple[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class _Op:
  """One driver step: ``fn(ctx)`` issues work and returns the arrays it produced.

  ``action`` is the schedule action it executes on ``rank`` (None for transfers and helpers,
  which ``what`` describes); ``str(op)`` is the position the hang watchdog prints.
  """

  fn: Callable[[_Ctx], Any]
  rank: int = -1
  action: schedules.Action | None = None
  what: str = ""

  def __str__(self) -> str:
    a = self.action
    if a is None:
      return f"rank {self.rank}: {self.what}" if self.rank >= 0 else self.what
    return f"rank {self.rank}: {a.kind.name} of stage {a.stage}, microbatch {a.mb}"


@dataclasses.dataclass(frozen=True)
class _TieLink:
  """A tie between two stages' gradient leaves: ``(stage_a, leaf_a) <-> (stage_b, leaf_b)``."""

  stage_a: int
  leaf_a: int
  stage_b: int
  leaf_b: int


@dataclasses.dataclass(frozen=True)
class _Family:
  """Compiled programs of one purpose plus the driver ops that run them."""

  programs: Any
  ops: tuple[_Op, ...] = ()


class _Setup:
  """Placement, shapes, compiled programs and driver ops for one microbatch signature.

  Programs are compiled lazily by family (init, train, update, eval), so evaluation programs, for
  instance, are compiled only if evaluation is used.
  """

  def __init__(self, backend: "MpmdBackend", layout: layout_lib.Layout, mb_inputs: Any,
               mb_targets: Any):
    self.backend = backend
    self.model = backend.model
    self.options = backend.options
    self.layout = layout
    self.schedule = layout.schedule
    self.stages = layout.stages
    self.num_stages = len(self.stages)
    self.m = self.options.num_microbatches
    self.rank_of = tuple(self.schedule.stage_to_rank)
    self.num_ranks = layout.num_ranks
    self.meshes = [Mesh(np.asarray(layout.rank_devices(r), dtype=object), ("dp",),
                        axis_types=(jax.sharding.AxisType.Auto,))
                   for r in range(self.num_ranks)]
    self.rep = [NamedSharding(mesh, P()) for mesh in self.meshes]
    self.bat = [NamedSharding(mesh, P("dp")) for mesh in self.meshes]
    self.rank_device_lists = [tuple(mesh.devices.flat) for mesh in self.meshes]
    self.first_rank, self.last_rank = self.rank_of[0], self.rank_of[-1]
    # Across processes each process drives only the ranks whose devices it owns.
    self.multi = backend.multi_process
    self.process = jax.process_index()
    self.rank_process = tuple(int(layout.rank_devices(r)[0].process_index)
                              for r in range(self.num_ranks))
    self.owned = frozenset(r for r in range(self.num_ranks)
                           if not self.multi or self.rank_process[r] == self.process)
    self.other_processes = (tuple(q for q in range(jax.process_count()) if q != self.process)
                            if self.multi else ())
    self.local0 = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    self.mb_inputs, self.mb_targets = mb_inputs, mb_targets
    io = partition_lib.layer_io_shapes(self.model, mb_inputs)
    out_shape = jax.eval_shape(
        lambda p, x: self.model.layers[-1].apply(p, None, x, is_training=False), *io[-1])
    self.fns: list[progs.StageFns] = []
    for spec in self.stages:
      y = io[spec.stop][1] if spec.stop < len(io) else out_shape
      shapes = progs.StageShapes(params=tuple(io[i][0] for i in range(spec.start, spec.stop)),
                                 x=io[spec.start][1], y=y, targets=mb_targets,
                                 layer_inputs=tuple(io[i][1] for i in range(spec.start, spec.stop)))
      self.fns.append(progs.StageFns(self.model, spec, shapes, self.num_stages, self.m,
                                     self.options.remat))
    self._check_dp()
    self.order = _mpmd_plan.issue_order(self.schedule)
    self.ties = self._tie_links()
    self.lidx = [jax.device_put(np.arange(s.start, s.stop, dtype=np.int32),
                                self.rep[self.rank_of[s.index]])
                 if self.owns_stage(s.index) else None for s in self.stages]
    self.mb_ids = [[jax.device_put(np.int32(i), self.rep[r]) for i in range(self.m)]
                   if r in self.owned else None for r in range(self.num_ranks)]
    self.loss0 = (jax.device_put(np.float32(0.0), self.rep[self.last_rank])
                  if self.last_rank in self.owned else None)
    self._families: dict[Any, _Family] = {}
    self._programs: dict[tuple[int, str], _mpmd_compile.Program] = {}
    self._sig: list[Any] | None = None
    # Everything besides a stage's own signature that its programs depend on.
    o = self.options
    self._context = (id(self.model), id(backend.optimizer), self.m, o.remat, o.max_grad_norm,
                     o.donate, o.skip_nonfinite, layout.dp, jax.tree.structure(mb_targets),
                     tuple(jax.tree.leaves(mb_targets)))

  # -- placement helpers -----------------------------------------------------------------------

  @property
  def scaled_update(self) -> bool:
    """Whether updates wait for the factor the metrics rank sends (clipping or skip guard)."""
    return self.options.max_grad_norm is not None or self.options.skip_nonfinite

  def owns_stage(self, s: int) -> bool:
    """Whether this process drives stage ``s`` (always, in a single-process run)."""
    return self.rank_of[s] in self.owned

  def remote_leaves(self, s: int, shapes: Sequence[Any]) -> list:
    """Stand-ins (global arrays without a shard here) for leaves of another process's stage."""
    rep = self.rep[self.rank_of[s]]
    return [xfer_lib.remote_array(_spec(a, rep)) for a in shapes]

  # -- cross-process messages ------------------------------------------------------------------

  def post(self, ctx: _Ctx, key: tuple, arrays: Sequence[Any],
           first_shard_only: bool = False) -> None:
    """Offers ``arrays`` as message ``key`` of this driver call to the process that pulls it."""
    b = self.backend
    assert b.transport is not None  # multi-process pipelines only
    b.transport.post(xfer_lib.uuid(b.namespace, ctx.call, key), arrays, first_shard_only)

  def pull(self, ctx: _Ctx, key: tuple, process: int, specs: Sequence[Any],
           label: tuple[str, str] | None = None) -> list:
    """Pulls message ``key`` of this driver call from ``process`` (returns at once)."""
    b = self.backend
    assert b.transport is not None  # multi-process pipelines only
    return b.transport.pull(process, xfer_lib.uuid(b.namespace, ctx.call, key), specs,
                            what=f"{key[0]} {key[1:]}", progress=b.progress, label=label)

  def recv_op(self, recvs: Sequence[_Recv]) -> _Op:
    """The first op of a multi-process call: pulls every message this process will receive.

    Pulls wait for their posts without blocking the host, so issuing them all at once lets each
    transfer start as soon as its sender has posted it.
    """
    recvs = tuple(recvs)

    def op(ctx):
      for r in recvs:
        r.put(ctx, self.pull(ctx, r.key, r.process, r.specs, r.label))
      return ()
    return _Op(fn=op, what=f"process {self.process}: request this call's messages from other "
                           "processes")

  def _recv(self, store: str, src_rank: int, dst_stage: int, mb: int,
            shapes: Sequence[Any]) -> _Recv:
    """Receipt of activations (``store="acts"``) or cotangents (``"cts"``) for ``dst_stage``."""
    r = self.rank_of[dst_stage]
    specs = tuple(_spec(a, sh) for a, sh in zip(shapes, self.act_shardings(r, shapes)))
    key = (dst_stage, mb)

    def put(ctx, arrays):
      getattr(ctx, store)[key] = arrays
    return _Recv((store, dst_stage, mb), self.rank_process[src_rank], specs, put,
                 self._label((store, dst_stage, mb), src_rank, r))

  def _action_recvs(self, rank: int, a: schedules.Action) -> list[_Recv]:
    """What another process's action ``a`` (on ``rank``) sends to this process's ranks."""
    s, mb = a.stage, a.mb
    f = self.fns[s]
    if a.kind is Kind.F and not f.is_last:
      dst, store, shapes = s + 1, "acts", list(f.y_leaves)
    elif a.kind in (Kind.B, Kind.I) and not f.is_first:
      dst, store = s - 1, "cts"
      shapes = [x for x, fl in zip(f.x_leaves, f.x_float) if fl]
    else:
      return []
    if not self.owns_stage(dst):
      return []
    return [self._recv(store, rank, dst, mb, shapes)]

  def _tie_recvs(self, s: int) -> list[_Recv]:
    """Tied gradient leaves that another process's stage ``s`` sends to this process."""
    out = []
    for leaf, key, sharding in self._tie_sends(s):
      if not self.owns_stage(key[0]):
        continue

      def put(ctx, arrays, key=key):
        ctx.partner[key] = arrays[0]
      out.append(_Recv(("tie",) + key, self.rank_process[self.rank_of[s]],
                       (_spec(self.fns[s].p_leaves[leaf], sharding),), put,
                       self._label(("tie",) + key, self.rank_of[s], self.rank_of[key[0]])))
    return out

  def _sq_recv(self, s: int) -> _Recv:
    """Stage ``s``'s squared gradient norm, received by the metrics rank's process."""

    def put(ctx, arrays):
      ctx.sq[s] = arrays[0]
    return _Recv(("sq", s), self.rank_process[self.rank_of[s]],
                 (self._scalar(self.last_rank),), put,
                 self._label(("sq", s), self.rank_of[s], self.last_rank))

  def _scale_recv(self, rank: int) -> _Recv:
    """The clipping factor for ``rank``, sent by the metrics rank's process."""

    def put(ctx, arrays):
      ctx.scale[rank] = arrays[0]
    return _Recv(("scale", rank), self.rank_process[self.last_rank], (self._scalar(rank),), put,
                 self._label(("scale", rank), self.last_rank, rank))

  def scalar_here(self) -> jax.ShapeDtypeStruct:
    """A float32 scalar on this process's first local device."""
    return jax.ShapeDtypeStruct((), jnp.float32, sharding=self.local0)

  def _metrics_recv(self) -> _Recv:
    """(loss, grad_norm, skipped) of the step, sent by the metrics rank's process to the others."""

    def put(ctx, arrays):
      ctx.metrics = (arrays[0], arrays[1], None, arrays[2])
    return _Recv(("metrics", self.process), self.rank_process[self.last_rank],
                 (self.scalar_here(),) * 3, put,
                 self._label(("metrics", self.process), self.last_rank, None))

  def _label(self, key: tuple, src_rank: int, dst_rank: int | None) -> tuple[str, str]:
    """``(receiver, message)`` texts of a message this process receives (for the watchdog)."""
    me = f"process {self.process}"
    receiver = f"rank {dst_rank} ({me})" if dst_rank is not None else me
    return receiver, xfer_lib.describe(key, src_rank, self.rank_process[src_rank])

  def gather(self, ctx: _Ctx, what: str, per_stage: Sequence[Sequence[Any] | None]) -> list:
    """Per stage, its leaves on this process's first local device (every process calls this).

    Owned stages' leaves are copied to the first local device and posted (copies, so a later
    donation cannot free them before the peer pulled them) to every other process; other
    stages' leaves are pulled from their owner.
    """
    out: list = []
    for s in range(self.num_stages):
      if self.owns_stage(s):
        leaves = list(per_stage[s] or ())
        here = jax.device_put(leaves, [self.local0] * len(leaves), may_alias=False)
        for q in self.other_processes:
          self.post(ctx, ("gather", what, s, q), here)
        out.append(here)
      else:
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.local0)
                 for a in self.fns[s].p_leaves]
        out.append(self.pull(ctx, ("gather", what, s, self.process),
                             self.rank_process[self.rank_of[s]], specs))
    return out

  def _check_dp(self) -> None:
    dp = self.layout.dp
    if dp == 1:
      return
    sizes = {x.shape[0] for x in jax.tree.leaves((self.mb_inputs, self.mb_targets)) if x.shape}
    mb = sizes.pop() if len(sizes) == 1 else 0
    if not mb or mb % dp:
      raise ValueError(f"The microbatch size {mb} is not divisible by the data-parallel width "
                       f"dp={dp} (mesh axis 'dp'); use a batch size that is a multiple of "
                       f"num_microbatches x dp = {self.m * dp}.")
    for f in self.fns:
      for what, leaves in (("input", f.x_leaves), ("output", f.y_leaves)):
        for leaf in leaves:
          if not leaf.shape or leaf.shape[0] != mb:
            raise ValueError(f"With dp={dp}, every activation between stages must have the "
                             f"microbatch ({mb}) as leading axis; stage {f.spec.index}'s {what} "
                             f"has shape {leaf.shape}.")

  def act_shardings(self, rank: int, leaves: Sequence[Any]) -> list:
    """Activations are split over the rank's ``dp`` devices along the batch axis."""
    return [self.bat[rank] if len(leaf.shape) else self.rep[rank] for leaf in leaves]

  def rank_devices(self, rank: int) -> tuple:
    return tuple(self.meshes[rank].devices.flat)

  def _tie_links(self) -> tuple[_TieLink, ...]:
    found = stage_lib.locate_ties(self.model.ties, [f.shapes.params for f in self.fns],
                                  [f.spec.layer_names for f in self.fns])
    return tuple(_TieLink(*t.source, *t.target) for t in found)

  def stage_leaves(self, stage: int, params: Mapping[str, Any]) -> list:
    """Flat parameter leaves of a stage's ``{layer_name: params}`` dict, in stage layer order."""
    return jax.tree.leaves(tuple(params[n] for n in self.stages[stage].layer_names))

  def stage_dict(self, stage: int, leaves: Sequence[Any]) -> dict:
    """Inverse of :meth:`stage_leaves`."""
    f = self.fns[stage]
    return f.names_dict(jax.tree.unflatten(f.p_tree, leaves))

  def canonical(self, per_stage: Sequence[Sequence[Any]]) -> dict:
    """``{layer_name: tree}`` from per-stage flat leaves (params or gradients)."""
    out = {}
    for t, leaves in enumerate(per_stage):
      out.update(self.stage_dict(t, leaves))
    return {layer.name: out[layer.name] for layer in self.model.layers}

  # -- program building ------------------------------------------------------------------------

  def _compile(self, fn: Callable, args: Sequence[jax.ShapeDtypeStruct], rank: int,
               out_shardings: Any = None, donate: Sequence[int] = ()) -> _mpmd_compile.Program:
    return self.backend.cache.build(fn, args, self.rank_devices(rank),
                                    out_shardings=out_shardings, donate_argnums=tuple(donate))

  def _stage_program(self, s: int, name: str, build: Callable[[], _mpmd_compile.Program],
                     extra: Any = ()) -> _mpmd_compile.Program:
    """Program ``name`` of stage ``s``.

    Placed without tracing when a stage with the same signature (see :meth:`find_signatures`)
    built it before, in this pipeline or in another sharing the program cache; built otherwise.
    """
    sig = self._sig[s] if self._sig is not None else None
    if sig is None:
      return build()
    key = (sig, name, extra, self._context)
    refs = (self.model, self.backend.optimizer)
    hit = self._memo_get(key, refs)
    if hit is not None:
      base, res = hit
      placed = self.backend.cache.place(base, self.rank_devices(self.rank_of[s]))
      if placed is not None:
        if res is not None:
          self.fns[s].res = res            # identical stages have identical residual layouts
        return placed
    program = build()
    if hit is None:
      self._memo_put(key, refs, (program, self.fns[s].res if name in ("fwd", "last_fwd_i")
                                 else None))
    return program

  def _memo_get(self, key: Any, refs: Sequence[Any]) -> Any:
    """A memo entry whose key names ``refs`` by ``id``: valid only if it still holds exactly
    those objects (it keeps them alive, so their ids cannot be reused meanwhile)."""
    hit = self.backend.cache.memo.get(key)
    if hit is None or len(hit[0]) != len(refs) or any(a is not b for a, b in zip(hit[0], refs)):
      return None
    return hit[1]

  def _memo_put(self, key: Any, refs: Sequence[Any], value: Any) -> None:
    self.backend.cache.memo[key] = (tuple(refs), value)

  def _placed_or_built(self, key: Any, refs: Sequence[Any], rank: int,
                       build: Callable[[], _mpmd_compile.Program]) -> _mpmd_compile.Program:
    """A program memoised by the identity of the objects it was built from (e.g. the same layer
    of the same model in another pipeline sharing the cache), placed on ``rank``'s devices."""
    hit = self._memo_get(key, refs)
    if hit is not None:
      placed = self.backend.cache.place(hit, self.rank_devices(rank))
      if placed is not None:
        return placed
    program = build()
    if hit is None:
      self._memo_put(key, refs, program)
    return program

  def find_signatures(self, rng: Any) -> None:
    """Computes each stage's signature: its traced computation in training and evaluation mode,
    position (first/last), tie layout and backward kinds. Stages with equal signatures (and
    equal pipeline options) share programs, which are then placed without tracing them again."""
    if self._sig is not None:
      return
    kinds = {(a.stage, a.kind) for row in _mpmd_plan.compute_actions(self.schedule) for a in row}
    self._sig = []
    for f in self.fns:
      stage_kinds = tuple(k for k in (Kind.B, Kind.W) if (f.spec.index, k) in kinds)
      # The same layers of the same model (e.g. another pipeline sharing the cache): reuse.
      key = ("signature", tuple(id(l) for l in f.layers), f.is_first, f.is_last, stage_kinds,
             self._tie_key(f.spec.index), tuple(f.x_leaves), rng.shape, str(rng.dtype))
      sig = self._memo_get(key, f.layers)
      if sig is None:
        sig = self._signature(f, rng, stage_kinds)
        self._memo_put(key, f.layers, sig)
      self._sig.append(sig)

  def _tie_key(self, s: int) -> tuple:
    same, incoming, _ = self._tie_plan(s)
    return tuple(same), tuple(leaf for _, leaf in incoming)

  def _signature(self, f: progs.StageFns, rng: Any, kinds: tuple) -> Any:
    key = jax.ShapeDtypeStruct(rng.shape, rng.dtype)
    lidx = jax.ShapeDtypeStruct((len(f.layers),), jnp.int32)
    train = jax.make_jaxpr(lambda p, x, k, i: f.run(p, x, k, i, True))(
        f.shapes.params, f.shapes.x, key, lidx)
    evaluate = jax.make_jaxpr(lambda p, x, i: f.run(p, x, None, i, False))(
        f.shapes.params, f.shapes.x, lidx)
    if train.consts or evaluate.consts:
      return None  # closed-over constants: compare by value would be needed; do not share
    same, incoming, _ = self._tie_plan(f.spec.index)
    return (str(train.jaxpr), str(evaluate.jaxpr), f.is_first, f.is_last, kinds, tuple(same),
            tuple(leaf for _, leaf in incoming), jax.tree.structure(f.shapes.x),
            jax.tree.structure(f.shapes.y))

  def _input_specs(self, s: int, rng: Any) -> list:
    f, r = self.fns[s], self.rank_of[s]
    rep = self.rep[r]
    specs = [_spec(a, rep) for a in f.p_leaves]
    specs += [_spec(a, sh) for a, sh in zip(f.x_leaves, self.act_shardings(r, f.x_leaves))]
    if f.is_last:
      specs += [_spec(a, sh) for a, sh in zip(f.t_leaves, self.act_shardings(r, f.t_leaves))]
    i32 = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    return specs + [_spec(rng, rep), i32, i32,
                    jax.ShapeDtypeStruct((len(f.layers),), jnp.int32, sharding=rep)]

  def _param_specs(self, s: int) -> list:
    rep = self.rep[self.rank_of[s]]
    return [_spec(a, rep) for a in self.fns[s].p_leaves]

  def _acc_specs(self, s: int) -> list:
    """The gradient accumulator of stage ``s`` (one array per parameter)."""
    return self._param_specs(s)

  def _float_specs(self, s: int, leaves: Sequence[Any], mask: Sequence[bool]) -> list:
    r = self.rank_of[s]
    kept = [a for a, keep in zip(leaves, mask) if keep]
    return [_spec(a, sh) for a, sh in zip(kept, self.act_shardings(r, kept))]

  def _dx_specs(self, s: int) -> list:
    f = self.fns[s]
    return [] if f.is_first else self._float_specs(s, f.x_leaves, f.x_float)

  def _dy_specs(self, s: int) -> list:
    f = self.fns[s]
    return [] if f.is_last else self._float_specs(s, f.y_leaves, f.y_float)

  def _scalar(self, rank: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((), jnp.float32, sharding=self.rep[rank])

  def family(self, name: str, build: Callable[[], _Family]) -> _Family:
    """The compiled programs (and driver ops) of family ``name``, built by ``build`` once."""
    if name not in self._families:
      self._families[name] = build()
    return self._families[name]

  def build_init(self, rng: Any) -> _Family:
    """Per stage: (per-layer parameter init programs, optimizer-state init program).

    Init is compiled per layer, so identical layers (and the same layer under another
    partition) share one compile; XLA's threefry code makes init programs slow to compile.
    """
    out: list = []
    for f in self.fns:
      s, r = f.spec.index, self.rank_of[f.spec.index]
      rep = self.rep[r]
      if r not in self.owned:
        out.append(None)
        continue
      index = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
      inits = []
      for j, layer in enumerate(f.layers):
        layer_key: tuple = ("layer_init", id(layer),
                            tuple(jax.tree.leaves(f.shapes.layer_inputs[j])), rng.shape,
                            str(rng.dtype), self.layout.dp)
        build: Callable[[], _mpmd_compile.Program] = functools.partial(
            self._compile, f.layer_init(j), [_spec(rng, rep), index], r, out_shardings=rep)
        inits.append(self._placed_or_built(layer_key, (layer,), r, build))
      key: tuple = ("opt_init", id(self.backend.optimizer), tuple(id(l) for l in f.layers),
                    f.spec.layer_names, tuple(f.p_leaves), self.layout.dp)
      opt = self._placed_or_built(
          key, (self.backend.optimizer,) + f.layers, r,
          lambda: self._compile(progs.opt_init_fn(self.backend.optimizer, f),
                                self._param_specs(s), r, out_shardings=rep))
      out.append((inits, opt))
    return _Family(programs=tuple(out))

  def _build_stage_train(self, s: int, rng: Any, kinds: set) -> dict:
    """The forward/backward programs of stage ``s`` that the schedule uses."""
    f, r = self.fns[s], self.rank_of[s]
    rep = self.rep[r]
    inputs = self._input_specs(s, rng)
    acc = self._acc_specs(s)
    n_in, n_p = len(inputs), f.np
    dx = [a.sharding for a in self._dx_specs(s)]
    split, full = (s, Kind.W) in kinds, (s, Kind.B) in kinds
    build = functools.partial(self._stage_program, s)
    p: dict[str, Any] = {}
    if f.is_last:
      if full:
        p["last"] = build("last", lambda: self._compile(
            f.last(), inputs + acc + [self._scalar(r)], r,
            out_shardings=([rep] * n_p, rep, dx), donate=range(n_in, n_in + n_p)))
      if split:
        prog = build("last_fwd_i", lambda: self._compile(
            f.last_fwd_i(), inputs + [self._scalar(r)], r, out_shardings=(rep, dx, None)))
        p["last_fwd_i"] = prog

        def last_w():
          res = list(prog.out_specs()[2])
          return self._compile(f.bwd_w(), inputs + res + acc, r, out_shardings=rep,
                               donate=range(n_in + len(res), n_in + len(res) + n_p))
        p["w"] = build("w", last_w)
    else:
      y = self.act_shardings(r, f.y_leaves)
      # Residuals on a single device: give their (only possible) sharding, so the backward can
      # be lowered before the forward has compiled; with dp > 1 the compiler chooses.
      res_sharding = rep if self.layout.dp == 1 else None
      prog = build("fwd", lambda: self._compile(f.fwd(), inputs, r,
                                                out_shardings=(y, res_sharding)))
      p["fwd"] = prog

      def backward(fn, out_shardings, with_acc=True):
        # Built only if not placed from a twin stage: reads the forward's residual specs.
        base = inputs + list(prog.out_specs()[1]) + self._dy_specs(s)
        donate = range(len(base), len(base) + n_p) if with_acc else ()
        return self._compile(fn, base + (acc if with_acc else []), r,
                             out_shardings=out_shardings, donate=donate)
      if full:
        p["bwd"] = build("bwd", lambda: backward(f.bwd(), ([rep] * n_p, dx)))
      if split:
        if not f.is_first:
          p["i"] = build("i", lambda: backward(f.bwd_i(), dx, with_acc=False))
        p["w"] = build("w", lambda: backward(f.bwd_w(), rep))
    return p

  def split(self, rank: int, leaves: Sequence[Any]) -> list[list]:
    """Cuts whole-batch leaves into ``m`` microbatches placed on ``rank``.

    A small compiled program does the cut; NumPy leaves go to it directly (the runtime's host
    transfer is far cheaper than ``jax.device_put`` per microbatch).
    """
    shard = self.act_shardings(rank, leaves)
    key = ("split", rank, tuple((x.shape, jnp.dtype(x.dtype)) for x in leaves))
    if key not in self._families:
      whole = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh) for x, sh in zip(leaves, shard)]
      mbs = leaves[0].shape[0] // self.m if leaves else 0
      self._families[key] = _Family(programs=self._compile(
          progs.split_fn(self.m, mbs), whole, rank, out_shardings=[shard] * self.m))
    args = [x if isinstance(x, np.ndarray) else jax.device_put(x, sh)
            for x, sh in zip(leaves, shard)]
    return self._families[key].programs.fn(*args)

  def scalars_on_ranks(self, value: Any) -> list:
    """``value`` (a host scalar) placed on every rank this process owns (None elsewhere)."""
    if self.multi:
      return [jax.device_put(value, self.rep[r]) if r in self.owned else None
              for r in range(self.num_ranks)]
    try:
      aval = jax.core.ShapedArray((), value.dtype)
      return [pxla.batched_device_put(aval, self.rep[r], [value] * len(devs), list(devs))
              for r, devs in enumerate(self.rank_device_lists)]
    except Exception:  # pylint: disable=broad-except
      return jax.device_put([value] * self.num_ranks, self.rep)

  def build_core(self, rng: Any) -> _Family:
    """Forward/backward and metrics programs (shared by train and grads)."""
    self.find_signatures(rng)
    kinds = {(a.stage, a.kind) for row in _mpmd_plan.compute_actions(self.schedule) for a in row}
    stage_progs = [self._build_stage_train(s, rng, kinds) if self.owns_stage(s) else None
                   for s in range(self.num_stages)]
    lr = self.last_rank
    metrics = None
    if lr in self.owned:
      metrics = self._compile(
          progs.metrics_fn(self.num_stages, self.m, self.options.max_grad_norm,
                           self.options.skip_nonfinite),
          [self._scalar(lr)] * (1 + self.num_stages), lr, out_shardings=self.rep[lr])
    return _Family(programs=dict(stages=stage_progs, metrics=metrics))

  def _build_finalize(self, s: int) -> _mpmd_compile.Program:
    f, r = self.fns[s], self.rank_of[s]
    same, incoming, partner_specs = self._tie_plan(s)
    return self._stage_program(s, "finalize", lambda: self._compile(
        progs.finalize_fn(f, same, [leaf for _, leaf in incoming]),
        self._acc_specs(s) + partner_specs, r,
        out_shardings=([self.rep[r]] * f.np, self.rep[r]), donate=range(f.np)))

  def build_steps(self, core: _Family, opt: Sequence[tuple[Any, list]] | None) -> _Family:
    """Driver ops of a gradient computation, plus optimizer updates when ``opt`` is given.

    Without clipping or skip guard the tied-gradient sums and the norm are fused into each stage's
    update; otherwise (or for gradients only) a separate finalize program comes first.

    Args:
      core: the :meth:`build_core` programs.
      opt: per stage, (treedef, leaves) of its optimizer state; None: gradients only.
    """
    updates = fin = None
    if opt is None or self.scaled_update:
      fin = [self._build_finalize(s) if self.owns_stage(s) else None
             for s in range(self.num_stages)]
    if opt is not None:
      updates = [self._build_update(s, *opt[s]) if self.owns_stage(s) else None
                 for s in range(self.num_stages)]
    p = core.programs
    programs = dict(p, updates=updates, finalize=fin)
    return _Family(programs=programs,
                   ops=self._train_ops(p["stages"], fin, p["metrics"], updates))

  def _build_update(self, s: int, opt_tree: Any,
                    opt_leaves: Sequence[Any]) -> _mpmd_compile.Program:
    f, r = self.fns[s], self.rank_of[s]
    rep = self.rep[r]
    opt_specs = [_spec(a, rep) for a in opt_leaves]
    same, incoming, partner_specs = self._tie_plan(s)
    args = self._param_specs(s) + opt_specs + self._acc_specs(s)
    args += [self._scalar(r)] if self.scaled_update else partner_specs
    n = f.np + len(opt_specs)
    # The accumulator is always donated: the fresh zeros for the next step reuse it.
    donate = (list(range(n)) if self.options.donate else []) + list(range(n, n + f.np))
    return self._stage_program(s, "update", lambda: self._compile(
        progs.update_fn(self.backend.optimizer, f, opt_tree, self.options.max_grad_norm, same,
                        [leaf for _, leaf in incoming], self.options.skip_nonfinite), args, r,
        out_shardings=rep, donate=donate),
        extra=(opt_tree, tuple((a.shape, jnp.dtype(a.dtype)) for a in opt_leaves)))

  def _tie_plan(self, s: int):
    """For stage ``s``: tied leaf pairs within it, incoming partner gradients, their specs."""
    same, incoming = [], []
    for k, link in enumerate(self.ties):
      if link.stage_a == s and link.stage_b == s:
        same.append((link.leaf_a, link.leaf_b))
      elif link.stage_a == s:
        incoming.append((k, link.leaf_a))
      elif link.stage_b == s:
        incoming.append((k, link.leaf_b))
    rep = self.rep[self.rank_of[s]]
    specs = [_spec(self.fns[s].p_leaves[leaf], rep) for _, leaf in incoming]
    return same, incoming, specs

  # -- driver ops ------------------------------------------------------------------------------

  def _deliver(self, store: str, src_rank: int, dst_stage: int, mb: int,
               shapes: Sequence[Any]) -> Callable[[_Ctx, list], list]:
    """Returns ``put(ctx, leaves)``: hands leaves to ``dst_stage`` (moving them if needed)."""
    dst_rank = self.rank_of[dst_stage]
    key = (dst_stage, mb)
    if dst_rank == src_rank:
      def put_local(ctx, leaves):
        getattr(ctx, store)[key] = leaves
        return leaves
      return put_local
    if dst_rank not in self.owned:   # another process pulls it (see _action_recvs)
      msg = (store, dst_stage, mb)

      def put_post(ctx, leaves):
        self.post(ctx, msg, leaves)
        return leaves
      return put_post
    move = _transfer(self.act_shardings(dst_rank, shapes))

    def put_remote(ctx, leaves):
      moved = move(leaves)
      getattr(ctx, store)[key] = moved
      return moved
    return put_remote

  def _action_op(self, rank: int, a: schedules.Action, programs: dict, split: bool) -> _Op:
    """The driver op of one schedule action (see ``_mpmd_programs`` for the conventions)."""
    s, mb = a.stage, a.mb
    f = self.fns[s]
    key = (s, mb)
    ids = self.mb_ids[rank]
    assert ids is not None  # actions of this process's ranks only
    mb_id, lidx = ids[mb], self.lidx[s]
    first, last = f.is_first, f.is_last
    dx_shapes = [x for x, fl in zip(f.x_leaves, f.x_float) if fl]
    send_dx = None if first else self._deliver("cts", rank, s - 1, mb, dx_shapes)
    send_y = None if last else self._deliver("acts", rank, s + 1, mb, f.y_leaves)

    def take_x(ctx):
      return ctx.xin[mb] if first else ctx.acts.pop(key)

    if a.kind is Kind.F and last and not split:
      prog = programs["last"].fn

      def op(ctx):
        x = take_x(ctx)
        acc, loss, dx = prog(*ctx.p[s], *x, *ctx.tgt[mb], ctx.rng[rank], ctx.step[rank], mb_id,
                             lidx, *ctx.acc[s], ctx.loss)
        ctx.acc[s], ctx.loss = acc, loss
        ctx.stash[key] = [None, None, dx]
        return acc, loss, dx
    elif a.kind is Kind.F and last:
      prog = programs["last_fwd_i"].fn

      def op(ctx):
        x = take_x(ctx)
        loss, dx, res = prog(*ctx.p[s], *x, *ctx.tgt[mb], ctx.rng[rank], ctx.step[rank], mb_id,
                             lidx, ctx.loss)
        ctx.loss = loss
        ctx.stash[key] = [x, res, dx]
        return loss, dx, res
    elif a.kind is Kind.F:
      prog = programs["fwd"].fn

      def op(ctx):
        x = take_x(ctx)
        y, res = prog(*ctx.p[s], *x, ctx.rng[rank], ctx.step[rank], mb_id, lidx)
        ctx.stash[key] = [x, res, None]
        send_y(ctx, y)
        return y, res
    elif a.kind in (Kind.B, Kind.I) and last:
      pop = a.kind is Kind.B

      def op(ctx):
        entry = ctx.stash.pop(key) if pop else ctx.stash[key]
        dx, entry[2] = entry[2], None
        return send_dx(ctx, dx) if send_dx else []
    elif a.kind is Kind.B:
      prog = programs["bwd"].fn

      def op(ctx):
        x, res, _ = ctx.stash.pop(key)
        acc, dx = prog(*ctx.p[s], *x, ctx.rng[rank], ctx.step[rank], mb_id, lidx, *res,
                       *ctx.cts.pop(key), *ctx.acc[s])
        ctx.acc[s] = acc
        if send_dx:
          send_dx(ctx, dx)
        return acc, dx
    elif a.kind is Kind.I:
      prog = programs["i"].fn if "i" in programs else None

      def op(ctx):
        entry = ctx.stash[key]
        dy = entry[2] = ctx.cts.pop(key)
        if prog is None:  # first stage: no input gradient to compute
          return dy
        dx = prog(*ctx.p[s], *entry[0], ctx.rng[rank], ctx.step[rank], mb_id, lidx, *entry[1],
                  *dy)
        send_dx(ctx, dx)
        return dx
    else:  # W
      prog = programs["w"].fn
      tgt_of = (lambda ctx: ctx.tgt[mb]) if last else (lambda ctx: ())

      def op(ctx):
        x, res, dy = ctx.stash.pop(key)
        acc = prog(*ctx.p[s], *x, *tgt_of(ctx), ctx.rng[rank], ctx.step[rank], mb_id, lidx,
                   *res, *(dy or ()), *ctx.acc[s])
        ctx.acc[s] = acc
        return acc
    return _Op(fn=op, rank=rank, action=a)

  def _finalize_op(self, s: int, fin: Any, updates: Sequence[Any] | None) -> _Op:
    """After stage ``s``'s last backward: sums its tied gradients, sends its squared norm to the
    metrics rank and, without clipping, applies its update at once (one fused program)."""
    _, incoming, _ = self._tie_plan(s)
    keys = [(s, k) for k, _ in incoming]
    r, lr = self.rank_of[s], self.last_rank
    move = _transfer([self.rep[lr]])

    def to_metrics(ctx, sq):
      if r == lr:
        return sq
      if lr in self.owned:
        return move([sq])[0]
      self.post(ctx, ("sq", s), [sq])   # the metrics rank is on another process
      return None
    if fin is not None:
      finalize = fin.fn

      def op(ctx):
        g, sq = finalize(*ctx.acc[s], *[ctx.partner.pop(k) for k in keys])
        ctx.acc[s] = g
        ctx.sq[s] = to_metrics(ctx, sq)
        return g, sq
      return _Op(fn=op, rank=r, what=f"finalize the gradients of stage {s}")
    assert updates is not None
    update = updates[s].fn

    def fused(ctx):
      p, o, zeros, sq = update(*ctx.p[s], *ctx.opt[s], *ctx.acc[s],
                               *[ctx.partner.pop(k) for k in keys])
      ctx.new_p[s], ctx.new_opt[s], ctx.new_acc[s] = p, o, zeros
      ctx.sq[s] = to_metrics(ctx, sq)
      return p, o, zeros, sq
    return _Op(fn=fused, rank=r, what=f"finalize and update stage {s}")

  def _tie_send_op(self, s: int) -> _Op:
    """Copies stage ``s``'s tied gradient leaves to their partner stages."""
    sends = [x for x in self._tie_sends(s) if self.owns_stage(x[1][0])]
    remote = [x for x in self._tie_sends(s) if not self.owns_stage(x[1][0])]
    # Always a copy: a partner on the same rank must not share a buffer that it donates (and a
    # posted leaf must outlive the accumulator, which the finalize program donates).
    move = _transfer([sharding for _, _, sharding in sends])
    copy = _transfer([self.rep[self.rank_of[s]]] * len(remote))

    def op(ctx):
      moved = move([ctx.acc[s][leaf] for leaf, _, _ in sends]) if sends else []
      for value, (_, key, _) in zip(moved, sends):
        ctx.partner[key] = value
      if remote:
        for value, (_, key, _) in zip(copy([ctx.acc[s][leaf] for leaf, _, _ in remote]), remote):
          self.post(ctx, ("tie",) + key, [value])
      return moved
    return _Op(fn=op, rank=self.rank_of[s], what=f"send the tied gradients of stage {s}")

  def _tie_sends(self, s: int) -> list:
    """(leaf of stage ``s``, (partner stage, tie index), partner sharding) per cross-stage tie."""
    sends = []
    for k, link in enumerate(self.ties):
      if link.stage_a == link.stage_b:
        continue
      if link.stage_a == s:
        sends.append((link.leaf_a, (link.stage_b, k), self.rep[self.rank_of[link.stage_b]]))
      elif link.stage_b == s:
        sends.append((link.leaf_b, (link.stage_a, k), self.rep[self.rank_of[link.stage_a]]))
    return sends

  def _train_ops(self, stage_progs, fin, metrics, updates) -> tuple[_Op, ...]:
    split = {(a.stage, a.mb) for _, a in self.order if a.kind is Kind.W}
    last_grad = _mpmd_plan.last_backward_index(self.order, self.num_stages)
    partners: dict[int, set[int]] = {s: set() for s in range(self.num_stages)}
    for link in self.ties:
      if link.stage_a != link.stage_b:
        partners[link.stage_a].add(link.stage_b)
        partners[link.stage_b].add(link.stage_a)
    complete: set[int] = set()
    finalized: set[int] = set()
    ops: list[_Op] = []
    recvs: list[_Recv] = []       # messages from other processes (multi-process runs only)
    lr = self.last_rank
    for i, (rank, a) in enumerate(self.order):
      # The global order filtered to this process's ranks; another process's actions only
      # tell which messages to expect from it.
      if rank in self.owned:
        ops.append(self._action_op(rank, a, stage_progs[a.stage], (a.stage, a.mb) in split))
      else:
        recvs.extend(self._action_recvs(rank, a))
      if last_grad[a.stage] != i:
        continue
      complete.add(a.stage)
      if partners[a.stage]:
        if rank in self.owned:
          ops.append(self._tie_send_op(a.stage))
        else:
          recvs.extend(self._tie_recvs(a.stage))
      for t in sorted({a.stage} | partners[a.stage]):
        if t not in finalized and t in complete and partners[t] <= complete:
          if self.owns_stage(t):
            ops.append(self._finalize_op(t, fin[t] if fin is not None else None, updates))
          elif lr in self.owned:
            recvs.append(self._sq_recv(t))
          finalized.add(t)
    if lr in self.owned:
      metrics_fn = metrics.fn
      others = self.other_processes

      def metrics_op(ctx):
        ctx.metrics = metrics_fn(ctx.loss, *ctx.sq)
        for q in others:   # every process can read the step's loss, norm and skip flag
          self.post(ctx, ("metrics", q), [ctx.metrics[0], ctx.metrics[1], ctx.metrics[3]],
                    first_shard_only=True)
        return ctx.metrics
      ops.append(_Op(fn=metrics_op, rank=lr, what="global gradient norm and metrics"))
    else:
      recvs.append(self._metrics_recv())
    if updates is not None and self.scaled_update:
      if lr not in self.owned:
        recvs.extend(self._scale_recv(r) for r in sorted(self.owned))
      ops.append(self._clipped_update_op(updates))
    if recvs:
      ops.insert(0, self.recv_op(recvs))
    return tuple(ops)

  def _clipped_update_op(self, updates: Sequence[Any]) -> _Op:
    """Sends the clipping factor (NaN: skip the step) to every rank, then updates every stage."""
    updates = [u.fn if u is not None else None for u in updates]
    lr = self.last_rank
    owns_lr = lr in self.owned
    others = [r for r in range(self.num_ranks) if r != lr and r in self.owned]
    remote = [r for r in range(self.num_ranks) if r not in self.owned] if owns_lr else []
    shardings = [self.rep[r] for r in others]
    stages = [s for s in range(self.num_stages) if self.owns_stage(s)]

    move = _transfer(shardings)

    def op(ctx):
      if owns_lr:
        scale = ctx.metrics[2]
        moved = dict(zip(others, move([scale] * len(others)))) if others else {}
        moved[lr] = scale
        for r in remote:
          self.post(ctx, ("scale", r), [scale])
      else:
        moved = ctx.scale                # received from the metrics rank's process
      for s in stages:
        ctx.new_p[s], ctx.new_opt[s], ctx.new_acc[s] = updates[s](
            *ctx.p[s], *ctx.opt[s], *ctx.acc[s], moved[self.rank_of[s]])
      return ctx.new_p, ctx.new_opt
    return _Op(fn=op, what=f"process {self.process}: clip and update its stages {stages}")

  def build_eval(self, rng: Any) -> _Family:
    """Forward-only programs (no dropout) and their ops, microbatch by microbatch."""
    self.find_signatures(rng)
    evals: list = []
    for f in self.fns:
      s, r = f.spec.index, self.rank_of[f.spec.index]
      rep = self.rep[r]
      if r not in self.owned:
        evals.append(None)
        continue
      lidx = jax.ShapeDtypeStruct((len(f.layers),), jnp.int32, sharding=rep)
      args = self._param_specs(s)
      args += [_spec(a, sh) for a, sh in zip(f.x_leaves, self.act_shardings(r, f.x_leaves))]
      if f.is_last:
        args += [_spec(a, sh) for a, sh in zip(f.t_leaves, self.act_shardings(r, f.t_leaves))]
        build = lambda: self._compile(f.eval_last(), args + [lidx, self._scalar(r)], r,
                                      out_shardings=rep)
      else:
        build = lambda: self._compile(f.eval_fwd(), args + [lidx], r,
                                      out_shardings=self.act_shardings(r, f.y_leaves))
      evals.append(self._stage_program(s, "eval", build))
    lr = self.last_rank
    mean = (self._compile(progs.mean_fn(self.m), [self._scalar(lr)], lr,
                          out_shardings=self.rep[lr]) if lr in self.owned else None)
    ops, recvs = [], []
    for mb in range(self.m):
      for s in range(self.num_stages):
        r = self.rank_of[s]
        if r in self.owned:
          ops.append(self._eval_op(s, mb, evals[s]))
        elif not self.fns[s].is_last and self.owns_stage(s + 1):
          recvs.append(self._recv("acts", r, s + 1, mb, self.fns[s].y_leaves))
    if recvs:
      ops.insert(0, self.recv_op(recvs))
    return _Family(programs=dict(evals=evals, mean=mean), ops=tuple(ops))

  def _eval_op(self, s: int, mb: int, prog: Any) -> _Op:
    prog = prog.fn
    f, r = self.fns[s], self.rank_of[s]
    key, lidx = (s, mb), self.lidx[s]
    first, last = f.is_first, f.is_last
    send_y = None if last else self._deliver("acts", r, s + 1, mb, f.y_leaves)

    def op(ctx):
      x = ctx.xin[mb] if first else ctx.acts.pop(key)
      if last:
        ctx.loss = prog(*ctx.p[s], *x, *ctx.tgt[mb], lidx, ctx.loss)
        return ctx.loss
      return send_y(ctx, prog(*ctx.p[s], *x, lidx))
    return _Op(fn=op, rank=r, action=schedules.Action(s, Kind.F, mb))


class MpmdBackend(pl.Backend):
  """True MPMD pipeline: per-stage compiled programs on per-rank devices, driven asynchronously.

  ``TrainState.params`` and ``TrainState.opt_state`` are tuples indexed by stage: stage ``s``
  holds ``{layer_name: params}`` for its layers and the optimizer state of that dict, all on the
  devices of rank ``schedule.stage_to_rank[s]``.

  Attributes:
    cache: the program cache; ``cache.stats`` counts XLA compiles, clones and their times.
    last_timeline: with ``record_timeline=True``, the executed actions of the last step as
      ``hkpipe.schedules.Record`` (rank, kind, stage, mb, start, end) in seconds (drawable with
      ``hkpipe.schedules.ascii_grid`` / ``svg_timeline``).
    last_stash_peaks: with ``record_timeline=True``, per rank, the most (stage, microbatch)
      residual stashes the driver held at once during the last step.
    last_stash_peak_bytes: with ``record_timeline=True``, per rank, the most bytes those
      stashes held at once (stage inputs, residuals and waiting cotangents).
    batch_is_process_local: False: in a multi-process run every process passes the full global
      batch (the first rank's process reads its inputs, the last rank's process its targets).
  """

  batch_is_process_local = False

  def __init__(self, model, optimizer, options):
    super().__init__(model, optimizer, options)
    self.cache = _mpmd_compile.ProgramCache()
    self.last_timeline: tuple[schedules.Record, ...] = ()
    self.last_stash_peaks: tuple[int, ...] = ()
    self.last_stash_peak_bytes: tuple[int, ...] = ()
    self._layout: layout_lib.Layout | None = None
    self._setups: dict[Any, _Setup] = {}
    self._rng_copies: tuple[Any, list] | None = None
    self._acc_pool: dict[int, list] = {}      # id(setup) -> zeroed accumulators for next step
    # Across processes (jax.distributed with several processes): transfers between ranks of
    # different processes go through this process's transfer server; every driver call has a
    # number, equal on every process, that (with the message) makes each transfer's id.
    self.transport: xfer_lib.Transport | None = None
    self.namespace = 0
    if jax.process_count() > 1:
      self.transport = xfer_lib.transport()
      self.namespace = self.transport.new_namespace()
    self._calls = 0

  # -- layout ----------------------------------------------------------------------------------

  @property
  def multi_process(self) -> bool:
    """Whether the pipeline's ranks live on devices of several processes (known after
    ``init``, or at once with explicit stage boundaries)."""
    if jax.process_count() == 1:
      return False
    return len({int(d.process_index) for d in self.layout.device_grid.flat}) > 1

  @property
  def layout(self) -> layout_lib.Layout:
    """The resolved schedule, stages and device grid (after ``init`` or a first step)."""
    if self._layout is None:
      self._layout = self._resolve(None)
    return self._layout

  def _resolve(self, mb_inputs: Any) -> layout_lib.Layout:
    part = self.options.partition
    explicit = isinstance(part, Sequence) and not isinstance(part, str)
    if mb_inputs is None and not explicit:
      raise ValueError("The MPMD stage partition is not known yet: call init(rng, batch) first "
                       "(it balances layer costs on one microbatch), or pass explicit stage "
                       "boundaries as partition=[...].")
    layout = layout_lib.resolve(self.model, self.options, mb_inputs)
    schedules.validate(layout.schedule)
    layout_lib.check_ranks_within_processes(layout)
    procs = {int(d.process_index) for d in layout.device_grid.flat}
    if len(procs) == 1 and jax.process_index() not in procs:
      raise ValueError(f"Every device of this pipeline belongs to process {procs.pop()}, so "
                       f"process {jax.process_index()} cannot run it: build a pipeline on one "
                       "process's devices only in that process, or spread the ranks over the "
                       "processes (e.g. num_stages=a multiple of jax.process_count()).")
    return layout

  def _setup(self, batch: pl.Batch) -> _Setup:
    mb_inputs, mb_targets = _microbatch_shapes(batch, self.options.num_microbatches)
    key = (jax.tree.structure((mb_inputs, mb_targets)),
           tuple(jax.tree.leaves((mb_inputs, mb_targets))))
    if key not in self._setups:
      if self._layout is None:
        self._layout = self._resolve(mb_inputs)
      self._setups[key] = _Setup(self, self._layout, mb_inputs, mb_targets)
    return self._setups[key]

  def _rep(self, stage: int) -> NamedSharding:
    layout = self.layout
    devices = np.asarray(layout.stage_devices(stage), dtype=object)
    mesh = Mesh(devices, ("dp",), axis_types=(jax.sharding.AxisType.Auto,))
    return NamedSharding(mesh, P())

  # -- per-call context ------------------------------------------------------------------------

  def _rng_on_ranks(self, setup: _Setup, rng: jax.Array) -> list:
    if self._rng_copies is None or self._rng_copies[0] is not rng:
      owned = sorted(setup.owned)
      copies = jax.device_put([rng] * len(owned), [setup.rep[r] for r in owned])
      by_rank = dict(zip(owned, copies))
      self._rng_copies = (rng, [by_rank.get(r) for r in range(setup.num_ranks)])
    return self._rng_copies[1]

  def _next_call(self) -> int:
    """Numbers a driver call (multi-process: raises a transfer failure seen meanwhile)."""
    if self.transport is not None:
      self.transport.check()
    self._calls += 1
    return self._calls

  def _context(self, setup: _Setup, state: pl.TrainState, batch: pl.Batch, programs: dict,
               training: bool) -> _Ctx:
    ctx = _Ctx(setup.num_stages, self._next_call())
    ctx.p = [setup.stage_leaves(s, state.params[s]) for s in range(setup.num_stages)]
    inputs, targets = (jax.tree.leaves(part) for part in batch)
    ctx.xin = setup.split(setup.first_rank, inputs) if setup.first_rank in setup.owned else []
    ctx.tgt = setup.split(setup.last_rank, targets) if setup.last_rank in setup.owned else []
    ctx.loss = setup.loss0
    if training:
      ctx.opt = [jax.tree.leaves(o) for o in state.opt_state]
      ctx.acc = self._accumulators(setup)
      ctx.rng = self._rng_on_ranks(setup, state.rng)
      ctx.step = setup.scalars_on_ranks(np.int32(state.step))
    return ctx

  def _accumulators(self, setup: _Setup) -> list:
    """Zeroed gradient accumulators: the ones the previous train step's updates handed
    back (zeroed in place), or fresh zeros sent from the host."""
    recycled = self._acc_pool.pop(id(setup), None)
    if recycled is not None:
      return recycled
    return [jax.device_put([np.zeros(a.shape, a.dtype) for a in f.p_leaves],
                           setup.rep[setup.rank_of[s]]) if setup.owns_stage(s) else None
            for s, f in enumerate(setup.fns)]

  def _run(self, setup: _Setup, ops: Sequence[_Op], ctx: _Ctx) -> None:
    if not self.options.record_timeline:
      # The loop creates thousands of short-lived objects (array handles, lists) that reference
      # counting frees; Python's cycle collector would only rescan them, so it pauses meanwhile.
      paused = gc.isenabled()
      gc.disable()
      pos = self.progress           # the hang watchdog's position record
      try:
        for op in ops:
          pos.op = op
          op.fn(ctx)
      finally:
        if paused:
          gc.enable()
      return
    jax.block_until_ready([[ctx.p[s] for s in range(setup.num_stages) if setup.owns_stage(s)],
                           ctx.xin, ctx.tgt, ctx.acc])
    records, peaks, peak_bytes = [], [0] * setup.num_ranks, [0] * setup.num_ranks
    t0 = time.perf_counter()
    for op in ops:
      self.progress.op = op
      start = time.perf_counter()
      jax.block_until_ready(op.fn(ctx))
      end = time.perf_counter()
      if op.action is not None:
        a = op.action
        records.append(schedules.Record(op.rank, a.kind.value, a.stage, a.mb, start - t0,
                                        end - t0))
      live = [0] * setup.num_ranks
      held: list[dict[int, int]] = [{} for _ in range(setup.num_ranks)]
      for (s, _), entry in ctx.stash.items():
        r = setup.rank_of[s]
        live[r] += 1
        for leaf in jax.tree.leaves(entry):
          held[r][id(leaf)] = leaf.nbytes
      for r in range(setup.num_ranks):
        if live[r] > peaks[r]:
          peaks[r] = live[r]
        peak_bytes[r] = max(peak_bytes[r], sum(held[r].values()))
    self.last_timeline = tuple(records)
    self.last_stash_peaks = tuple(peaks)
    self.last_stash_peak_bytes = tuple(peak_bytes)

  def _train_family(self, setup: _Setup, state: pl.TrainState, with_update: bool) -> _Family:
    opt = None
    if with_update:
      opt = [(jax.tree.structure(o), jax.tree.leaves(o)) for o in state.opt_state]
    core = setup.family("core", lambda: setup.build_core(state.rng))
    return setup.family("train" if with_update else "grads",
                        lambda: setup.build_steps(core, opt))

  # -- Backend API -----------------------------------------------------------------------------

  def init(self, rng, batch):
    setup = self._setup(batch)
    ctx = _Ctx(setup.num_stages, self._next_call())
    params_rng, state_rng = jax.random.split(rng)
    fam = setup.family("init", lambda: setup.build_init(params_rng))
    owned = sorted(setup.owned)
    keys = dict(zip(owned, jax.device_put([params_rng] * len(owned),
                                          [setup.rep[r] for r in owned])))
    leaves: list = []
    for s, programs in enumerate(fam.programs):
      if programs is None:                  # another process's stage
        leaves.append(None)
        continue
      inits = programs[0]
      r, start = setup.rank_of[s], setup.stages[s].start
      index = jax.device_put([np.int32(start + j) for j in range(len(inits))],
                             [setup.rep[r]] * len(inits))
      leaves.append([leaf for j, init in enumerate(inits) for leaf in init.fn(keys[r], index[j])])
    for link in setup.ties:
      a, b = link.stage_a, link.stage_b
      sharding_b = setup.rep[setup.rank_of[b]]
      if setup.owns_stage(a) and setup.owns_stage(b):
        leaves[b][link.leaf_b] = jax.device_put(leaves[a][link.leaf_a], sharding_b,
                                                may_alias=False)
      elif setup.owns_stage(a):             # a copy: the update may donate the original
        setup.post(ctx, ("tie_init", b, link.leaf_b),
                   [jax.device_put(leaves[a][link.leaf_a], leaves[a][link.leaf_a].sharding,
                                   may_alias=False)])
      elif setup.owns_stage(b):
        spec = _spec(setup.fns[b].p_leaves[link.leaf_b], sharding_b)
        leaves[b][link.leaf_b] = setup.pull(ctx, ("tie_init", b, link.leaf_b),
                                            setup.rank_process[setup.rank_of[a]], [spec])[0]
    params, opt_state = [], []
    for s, programs in enumerate(fam.programs):
      shapes = jax.eval_shape(self.optimizer.init, setup.stage_dict(s, setup.fns[s].p_leaves))
      if programs is None:
        params.append(setup.stage_dict(s, setup.remote_leaves(s, setup.fns[s].p_leaves)))
        opt_state.append(jax.tree.structure(shapes).unflatten(
            setup.remote_leaves(s, jax.tree.leaves(shapes))))
        continue
      params.append(setup.stage_dict(s, leaves[s]))
      opt_state.append(jax.tree.structure(shapes).unflatten(programs[1].fn(*leaves[s])))
    return pl.TrainState(step=0, params=tuple(params), opt_state=tuple(opt_state),
                         rng=state_rng)

  def train_step(self, state, batch):
    setup = self._setup(batch)
    fam = self._train_family(setup, state, with_update=True)
    ctx = self._context(setup, state, batch, fam.programs, training=True)
    self._run(setup, fam.ops, ctx)
    self._acc_pool[id(setup)] = ctx.new_acc
    # Another process's stages keep their stand-ins (same structure on every process).
    params = tuple(setup.stage_dict(s, p) if p is not None else state.params[s]
                   for s, p in enumerate(ctx.new_p))
    opt_state = tuple(jax.tree.structure(o).unflatten(n) if n is not None else o
                      for o, n in zip(state.opt_state, ctx.new_opt))
    loss, norm, _, skipped = ctx.metrics
    return (pl.TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng),
            {"loss": loss, "grad_norm": norm, "skipped": skipped})

  def loss_and_grads(self, state, batch):
    setup = self._setup(batch)
    fam = self._train_family(setup, state, with_update=False)
    ctx = self._context(setup, state, batch, fam.programs, training=True)
    self._run(setup, fam.ops, ctx)
    if setup.multi:
      return ctx.metrics[0], setup.canonical(setup.gather(ctx, "grads", ctx.acc))
    return ctx.metrics[0], setup.canonical(ctx.acc)

  def eval_loss(self, state, batch):
    setup = self._setup(batch)
    fam = setup.family("eval", lambda: setup.build_eval(state.rng))
    ctx = self._context(setup, state, batch, fam.programs, training=False)
    for op in fam.ops:
      self.progress.op = op
      op.fn(ctx)
    lr_process = setup.rank_process[setup.last_rank]
    if setup.last_rank not in setup.owned:
      return setup.pull(ctx, ("eval", setup.process), lr_process, [setup.scalar_here()])[0]
    loss = fam.programs["mean"].fn(ctx.loss)
    for q in setup.other_processes:
      setup.post(ctx, ("eval", q), [loss], first_shard_only=True)
    return loss

  def params(self, state):
    """Canonical ``{layer_name: params}`` of ``state``.

    Across processes, a collective: every process must call it (in the same order as its other
    driver calls); each gets the full parameters on its first local device.
    """
    if not self.multi_process:
      return super().params(state)
    setup = next(iter(self._setups.values()), None)
    if setup is None:
      raise ValueError("params(state) across processes needs the pipeline's stage shapes: call "
                       "init(rng, batch) first.")
    ctx = _Ctx(setup.num_stages, self._next_call())
    per_stage = [setup.stage_leaves(s, state.params[s]) if setup.owns_stage(s) else None
                 for s in range(setup.num_stages)]
    return setup.canonical(setup.gather(ctx, "params", per_stage))

  def to_canonical(self, state):
    names = [spec.layer_names for spec in self.layout.stages]
    params: dict = {}
    for stage_params in state.params:
      params.update(stage_params)
    params = {layer.name: params[layer.name] for layer in self.model.layers}
    opt_state = pl.merge(list(state.opt_state), names)
    if self.multi_process:
      opt_state = self._shared_leaves_everywhere(state.opt_state, names, opt_state)
    return {"params": params, "opt_state": opt_state, "rng": state.rng}

  def _shared_leaves_everywhere(self, parts: Sequence[Any], names: Sequence[Sequence[str]],
                                merged: Any) -> Any:
    """Makes the optimizer-state leaves every stage holds a copy of (step counters...) global.

    ``pl.merge`` takes those leaves from stage 0, whose process may not be this one. Every stage
    updates its copy in lockstep, so the copies are equal: each process contributes the copy of
    a stage it owns to an array replicated over one device per process, which checkpoints save
    once and restore on every process (see :meth:`from_canonical`).
    """
    # Which merged leaves are shared: merging stage markers forwards and backwards gives the
    # same stage for a layer's leaf, but the first part's for a shared leaf.
    marks = [jax.tree.map(lambda _, s=s: s, part) for s, part in enumerate(parts)]
    first = jax.tree.leaves(pl.merge(marks, names))
    last = jax.tree.leaves(pl.merge(marks[::-1], names[::-1]))
    me = jax.process_index()
    mine = next(s for s, spec in enumerate(self.layout.stages)
                if self._rep(spec.index).mesh.devices.flat[0].process_index == me)
    order = [mine] + [s for s in range(len(parts)) if s != mine]
    local = jax.tree.leaves(pl.merge([parts[s] for s in order], [names[s] for s in order]))
    everywhere = NamedSharding(pl.process_mesh(), P())
    here = jax.local_devices()[0]

    def widen(x):
      copy = jax.device_put(x.addressable_shards[0].data, here)
      return jax.make_array_from_single_device_arrays(x.shape, everywhere, [copy])
    leaves, treedef = jax.tree.flatten(merged)
    leaves = [widen(local[i]) if first[i] != last[i] else x for i, x in enumerate(leaves)]
    return jax.tree.unflatten(treedef, leaves)

  def from_canonical(self, canonical: Mapping[str, Any], step: int):
    all_names = self.model.layer_names
    params, opt_state = [], []
    me = jax.process_index()
    for spec in self.layout.stages:
      rep = self._rep(spec.index)
      stage_params = {n: canonical["params"][n] for n in spec.layer_names}
      stage_opt = pl.restrict(canonical["opt_state"], spec.layer_names, all_names)
      if self.multi_process and rep.mesh.devices.flat[0].process_index != me:
        # Another process's stage: stand-ins with its shapes and the owner's sharding.
        def remote(x, rep=rep):
          return xfer_lib.remote_array(jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=rep))
        params.append(jax.tree.map(remote, stage_params))
        opt_state.append(jax.tree.map(remote, stage_opt))
        continue
      # Shared optimizer leaves (counters) may be replicated over every process: the copy here.
      params.append(jax.device_put(stage_params, rep))
      opt_state.append(jax.device_put(jax.tree.map(pl.local_value, stage_opt), rep))
    return pl.TrainState(step=int(step), params=tuple(params), opt_state=tuple(opt_state),
                         rng=canonical["rng"])
