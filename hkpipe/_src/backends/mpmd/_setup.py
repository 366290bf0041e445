"""Placement, shapes and compiled programs of an MPMD pipeline, per microbatch signature.

:class:`_Setup` knows where each stage lives (per-rank meshes and shardings, which process owns
which rank), the stage functions (``_mpmd_programs.StageFns``), tied leaves, program signatures
(identical stages share compiles) and the cross-process message helpers. The program builders
are in ``_build``; the step itself is an instruction program (``_lower``), executed by
``_interp``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hkpipe import schedules
from hkpipe._src import layout as layout_lib
from hkpipe._src import partition as partition_lib
from hkpipe._src import pipeline as pipeline_lib
from hkpipe._src import stage as stage_lib
from hkpipe._src.backends import _mpmd_compile
from hkpipe._src.backends import _mpmd_plan
from hkpipe._src.backends import _mpmd_programs as progs
from hkpipe._src.backends import _mpmd_transfer as xfer_lib
from hkpipe._src.backends.mpmd import _build
from hkpipe._src.backends.mpmd import _lower
from hkpipe._src.backends.mpmd import _shard

Kind = schedules.Kind


def _spec(shape: Any, sharding: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)


def _microbatch_shapes(batch: pipeline_lib.Batch, m: int) -> tuple[Any, Any]:
  return tuple(jax.tree.map(  # type: ignore[return-value]
      lambda x: jax.ShapeDtypeStruct((np.shape(x)[0] // m,) + tuple(np.shape(x)[1:]), x.dtype),
      part) for part in batch)


@dataclasses.dataclass(frozen=True)
class _TieLink:
  """A tie between two stages' gradient leaves: ``(stage_a, leaf_a) <-> (stage_b, leaf_b)``."""

  stage_a: int
  leaf_a: int
  stage_b: int
  leaf_b: int


@dataclasses.dataclass(frozen=True)
class _Family:
  """Compiled programs of one purpose, plus the instruction program that runs them (bound)."""

  programs: Any
  bound: Any = None


class _Setup(_build.Builders):
  """Placement, shapes, compiled programs and driver ops for one microbatch signature.

  Programs are compiled lazily by family (init, train, update, eval), so evaluation programs, for
  instance, are compiled only if evaluation is used.
  """

  def __init__(self, backend: Any, layout: layout_lib.Layout, mb_inputs: Any,
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
    # Each rank's sub-mesh ("dp", "fsdp", "tp"); the batch is split over dp and fsdp.
    self.meshes = [layout.rank_mesh(r) for r in range(self.num_ranks)]
    self.rep = [NamedSharding(mesh, P()) for mesh in self.meshes]
    self.bat = [NamedSharding(mesh, P(("dp", "fsdp"))) for mesh in self.meshes]
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
      # Stash packing is off: on an idle 2-core CPU it cut host dispatch (1F1B 19.0 -> 13.7 ms)
      # but the extra concatenates and slices made the dispatch-bound step slower (20.8 -> 23.4
      # ms; benchmarks/README.md, "MPMD dispatch"), and the step is what users wait for.
      self.fns.append(progs.StageFns(self.model, spec, shapes, self.num_stages, self.m,
                                     self.options.remat, pack_stash=False))
    self._check_dp()
    self.order = _mpmd_plan.issue_order(self.schedule)
    self.ties = self._tie_links()
    # Per stage, the PartitionSpec and sharding of each parameter leaf (also its gradient).
    self.pspecs = _shard.stage_param_specs(self.model, self.options, layout,
                                           [f.shapes.params for f in self.fns])
    self.psh = [_shard.named(self.meshes[self.rank_of[s]], self.pspecs[s])
                for s in range(self.num_stages)]
    self._opt_sh: dict[int, list] = {}
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
                     o.donate, o.skip_nonfinite, layout.sub_mesh_shape,
                     jax.tree.structure(mb_targets),
                     tuple(jax.tree.leaves(mb_targets)))

  # -- placement helpers -----------------------------------------------------------------------

  @property
  def scaled_update(self) -> bool:
    """Whether updates wait for the factor the metrics rank sends (clipping or skip guard)."""
    return self.options.max_grad_norm is not None or self.options.skip_nonfinite

  def owns_stage(self, s: int) -> bool:
    """Whether this process drives stage ``s`` (always, in a single-process run)."""
    return self.rank_of[s] in self.owned

  def remote_leaves(self, s: int, shapes: Sequence[Any], shardings: Sequence[Any]) -> list:
    """Stand-ins (global arrays without a shard here) for leaves of another process's stage."""
    return [xfer_lib.remote_array(_spec(a, sh)) for a, sh in zip(shapes, shardings)]

  def opt_shardings(self, s: int) -> list:
    """Flat shardings of stage ``s``'s optimizer state: parameter-shaped parts follow their
    parameter, the rest (counters) is replicated."""
    if s not in self._opt_sh:
      f = self.fns[s]
      self._opt_sh[s] = _shard.opt_shardings(
          self.backend.optimizer, self.stage_dict(s, f.p_leaves), self.stage_dict(s, self.psh[s]),
          self.rep[self.rank_of[s]])
    return self._opt_sh[s]

  # -- cross-process messages ------------------------------------------------------------------

  def post(self, call: int, key: tuple, arrays: Sequence[Any],
           first_shard_only: bool = False) -> None:
    """Offers ``arrays`` as message ``key`` of this driver call to the process that pulls it."""
    b = self.backend
    assert b.transport is not None  # multi-process pipelines only
    b.transport.post(xfer_lib.uuid(b.namespace, call, key), arrays, first_shard_only)

  def pull(self, call: int, key: tuple, process: int, specs: Sequence[Any],
           label: tuple[str, str] | None = None) -> list:
    """Pulls message ``key`` of this driver call from ``process`` (returns at once)."""
    b = self.backend
    assert b.transport is not None  # multi-process pipelines only
    return b.transport.pull(process, xfer_lib.uuid(b.namespace, call, key), specs,
                            what=f"{key[0]} {key[1:]}", progress=b.progress, label=label)

  def scalar_here(self) -> jax.ShapeDtypeStruct:
    """A float32 scalar on this process's first local device."""
    return jax.ShapeDtypeStruct((), jnp.float32, sharding=self.local0)

  def _label(self, key: tuple, src_rank: int, dst_rank: int | None) -> tuple[str, str]:
    """``(receiver, message)`` texts of a message this process receives (for the watchdog)."""
    me = f"process {self.process}"
    receiver = f"rank {dst_rank} ({me})" if dst_rank is not None else me
    return receiver, xfer_lib.describe(key, src_rank, self.rank_process[src_rank])

  def label(self, key: tuple, src_rank: int, dst_rank: int | None) -> tuple[str, str]:
    """``(receiver, message)`` of message ``key`` (the ``_interp`` io interface)."""
    return self._label(key, src_rank, dst_rank)

  def recv_specs(self, key: tuple) -> list:
    """Shape, dtype and sharding here of each array of message ``key`` from another process."""
    what = key[0]
    if what == "F":      # the activation of stage key[1] for stage key[1] + 1 (message_key)
      leaves = list(self.fns[key[1]].y_leaves)
      r = self.rank_of[key[1] + 1]
      return [_spec(a, sh) for a, sh in zip(leaves, self.act_shardings(r, leaves))]
    if what == "G":      # the input cotangent of stage key[1] for stage key[1] - 1
      f, r = self.fns[key[1]], self.rank_of[key[1] - 1]
      leaves = [a for a, fl in zip(f.x_leaves, f.x_float) if fl]
      return [_spec(a, sh) for a, sh in zip(leaves, self.act_shardings(r, leaves))]
    if what == "tie":
      t, k = key[1], key[2]
      leaf = next(leaf for leaf, _, kk in self.facts().tie_sends(t) if kk == k)
      return [_spec(self.fns[t].p_leaves[leaf], self.psh[t][leaf])]
    if what == "sq":
      return [self._scalar(self.last_rank)]
    if what == "scale":
      return [self._scalar(key[1])]
    if what == "metrics":
      return [self.scalar_here()] * 3
    assert what == "eval", key
    return [self.scalar_here()]

  def facts(self) -> _lower.Facts:
    """What lowering needs to know about this pipeline (on this process)."""
    return _lower.Facts(
        num_stages=self.num_stages, rank_of=self.rank_of, num_ranks=self.num_ranks,
        owned=self.owned, rank_process=self.rank_process, process=self.process,
        order=tuple(self.order),
        ties=tuple((t.stage_a, t.leaf_a, t.stage_b, t.leaf_b) for t in self.ties),
        scaled=self.scaled_update, donate=bool(self.options.donate), num_microbatches=self.m,
        other_processes=self.other_processes)

  def gather(self, call: int, what: str, per_stage: Sequence[Sequence[Any] | None]) -> list:
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
          self.post(call, ("gather", what, s, q), here)
        out.append(here)
      else:
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.local0)
                 for a in self.fns[s].p_leaves]
        out.append(self.pull(call, ("gather", what, s, self.process),
                             self.rank_process[self.rank_of[s]], specs))
    return out

  def _check_dp(self) -> None:
    dp = self.layout.dp * self.layout.fsdp      # FSDP splits the batch too
    if dp == 1:
      return
    width = (f"dp={dp} (mesh axis 'dp')" if self.layout.fsdp == 1 else
             f"dp x fsdp = {self.layout.dp} x {self.layout.fsdp} = {dp} (mesh axes 'dp', 'fsdp')")
    sizes = {x.shape[0] for x in jax.tree.leaves((self.mb_inputs, self.mb_targets)) if x.shape}
    mb = sizes.pop() if len(sizes) == 1 else 0
    if not mb or mb % dp:
      raise ValueError(f"The microbatch size {mb} is not divisible by the data-parallel width "
                       f"{width}; use a batch size that is a multiple of "
                       f"num_microbatches x {dp} = {self.m * dp}.")
    for f in self.fns:
      for what, leaves in (("input", f.x_leaves), ("output", f.y_leaves)):
        for leaf in leaves:
          if not leaf.shape or leaf.shape[0] != mb:
            raise ValueError(f"With {width}, every activation between stages must have the "
                             f"microbatch ({mb}) as leading axis; stage {f.spec.index}'s {what} "
                             f"has shape {leaf.shape}.")

  def act_shardings(self, rank: int, leaves: Sequence[Any]) -> list:
    """Activations are split over the rank's ``dp`` x ``fsdp`` devices along the batch axis."""
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

  def family(self, name: str, build: Callable[[], Any]) -> Any:
    """The compiled programs of family ``name``, built by ``build`` once."""
    if name not in self._families:
      self._families[name] = build()
    return self._families[name]

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
    key = (sig, name, extra, self._context, self.pspecs[s])
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

  def tie_partner(self, k: int, s: int) -> tuple[int, int]:
    """``(stage, leaf)`` of the other side of cross-stage tie ``k``, seen from stage ``s``."""
    link = self.ties[k]
    return (link.stage_b, link.leaf_b) if link.stage_a == s else (link.stage_a, link.leaf_a)

  def tie_wire(self, s: int, k: int) -> NamedSharding:
    """How stage ``s``'s gradient of cross-stage tie ``k`` is laid out when it leaves its rank:
    on its rank's mesh with the partner leaf's ``PartitionSpec``, so its shards line up with the
    partner's devices (the same layout as the leaf's own when both sides share the spec)."""
    t, partner = self.tie_partner(k, s)
    return NamedSharding(self.meshes[self.rank_of[s]], self.pspecs[t][partner])
