"""The spmd executor: per-stage functions and the ``shard_map`` bodies that run the schedule
tick by tick on one ``(pp, dp)`` shard (a mixin of ``SpmdBackend``)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hkpipe._src import model as model_lib
from hkpipe._src import pipeline as pipeline_lib
from hkpipe._src import remat as remat_lib
from hkpipe._src import stage as stage_lib
from hkpipe._src import step as step_lib
from hkpipe._src.backends.spmd import _columns as columns
from hkpipe._src.backends.spmd import _pack as pack
from hkpipe._src.backends.spmd import _zero as zero
from hkpipe._src.backends.spmd._plan import _Plan, _Program, _Tie
from hkpipe.schedules import _ir

Kind = _ir.Kind


class _Executor(pipeline_lib.Backend):
  """Per-stage functions and ``shard_map`` bodies; ``SpmdBackend`` supplies ``plan``, ``dp``
  and ``num_ranks``."""

  if TYPE_CHECKING:  # supplied by SpmdBackend
    @property
    def plan(self) -> _Plan: ...

    @property
    def dp(self) -> int: ...

    @property
    def batch_shards(self) -> int: ...

    @property
    def state_shards(self) -> int: ...

    @property
    def num_ranks(self) -> int: ...

    @property
    def step_axes(self) -> zero.StepAxes: ...

  # -- per-stage functions ---------------------------------------------------------------------

  def _stage_apply(self, s: int, params: Any, x: Any, key: Any, targets: Any,
                   is_training: bool) -> Any:
    """Stage ``s`` on ``{layer: params}``: its output, or the scalar loss on the last stage."""
    stage = self.plan.layout.stages[s]
    return stage_lib.stage_output(self.model, stage.start, stage.stop,
                                  [params[n] for n in stage.layer_names], x, key,
                                  range(stage.start, stage.stop), targets, is_training)

  def _stage_vjp(self, s: int, params: Any, x: Any, key: Any, targets: Any):
    """Forward of stage ``s`` with its pullback split into (residuals, stash); residuals that are
    the parameters themselves are not stashed."""
    fn = lambda p, v: self._stage_apply(s, p, v, key, targets, True)
    fn = remat_lib.wrap(fn, remat_lib.for_stage(self.options.remat, s,
                                                len(self.plan.layout.stages)))
    kept = jax.tree.leaves(params)
    if s == 0:  # the inputs (e.g. tokens) need no cotangent
      y, _, residuals, stash = stage_lib.vjp_with_stash(lambda p: fn(p, x), (params,), kept)
    else:
      y, _, residuals, stash = stage_lib.vjp_with_stash(fn, (params, x), kept)
    return y, residuals, stash

  def _microbatch_key(self, rng: jax.Array, step: jax.Array, mb: jax.Array) -> jax.Array:
    key = model_lib.microbatch_rng(rng, step, mb)
    assert key is not None
    if self.batch_shards > 1:
      key = jax.random.fold_in(key, zero.batch_index())
    return key

  # -- the executor (runs inside shard_map, on one (pp, dp) shard) -------------------------------

  def _branch(self, prog: _Program, kind: Kind | None, s: int, train: bool, ctx: dict):
    """The branch running ``kind`` of stage ``s``: ``fn(carry, *tick inputs) -> carry`` with
    ``carry = (grads, stash, loss, outgoing payload)``; None (nothing to do) when idle."""
    plan = self.plan
    last = s == plan.num_stages - 1
    width = prog.payload_bytes
    index = lambda buf, i: jax.lax.dynamic_index_in_dim(buf, i, 0, keepdims=False)
    nothing = lambda: jnp.zeros((width,), jnp.uint8)

    if kind is None:
      return None
    # The stage's parameters, gathered whole from the rank's pieces for this call only (with
    # tensor-parallel compute: split over tp by their rules' specs, the compiler does the rest).
    axes = self.step_axes
    cols = columns.Columns.of(plan.stage_layouts[s])

    def params():
      tree = cols.gather(ctx["params"], axes.state)
      if axes.tp_compute:
        tree = jax.lax.with_sharding_constraint(tree, plan.stage_tp_specs[s])
      return tree

    strides = prog.stash_strides[plan.rank_of(s)]  # this branch only ever runs on s's rank

    def forward(carry, act_in, cot_in, mb, key, a_slot, c_slot, s_slot):
      del cot_in, c_slot
      grads, stash, loss, _ = carry
      if s == 0:
        x = jax.tree.map(lambda v: index(v, mb), ctx["inputs"])
      else:
        x = prog.act_codecs[s - 1].unpack(index(act_in, a_slot))
      targets = jax.tree.map(lambda v: index(v, mb), ctx["targets"]) if last else None
      if train:
        y, residuals, res = self._stage_vjp(s, params(), x, key, targets)
        info = prog.backward[s]
        if (residuals.source != info.residuals.source
            or pack.FlatLayout.of(res).avals != info.layout.avals):
          raise RuntimeError(f"Stage {s}: the vjp residual structure differs between traces "
                             "(non-deterministic stage function?).")
        stash = info.layout.write_slot(stash, res, s_slot, strides)
      else:
        y = self._stage_apply(s, params(), x, None, targets, False)
      if last:
        return grads, stash, loss + y, nothing()
      return grads, stash, loss, prog.act_codecs[s].pack(y, width)

    def backward(carry, act_in, cot_in, mb, key, a_slot, c_slot, s_slot):
      del act_in, mb, key, a_slot
      grads, stash, loss, _ = carry
      info = prog.backward[s]
      pullback = stage_lib.rebuild_pullback(info.residuals, jax.tree.leaves(params()),
                                            info.layout.read_slot(stash, s_slot, strides))
      ct = (jnp.ones((), jnp.float32) if last
            else prog.cot_codecs[s].unpack(index(cot_in, c_slot)))
      cts = pullback(ct)
      out = nothing()
      if kind in (Kind.B, Kind.W):  # summed over the rank's devices onto their pieces
        grads = cols.scatter_add(grads, cts[0], axes.state)
      if kind in (Kind.B, Kind.I) and s > 0:
        out = prog.cot_codecs[s - 1].pack(cts[1], width)
      return grads, stash, loss, out

    return forward if kind == Kind.F else backward

  def _run_pipeline(self, prog: _Program, train: bool, params: dict, rng: jax.Array,
                    step: jax.Array, inputs: Any, targets: Any, tabs: dict):
    """Runs the schedule on this shard; returns (sum of microbatch losses, summed grads)."""
    plan = self.plan
    tables = plan.tables
    ctx = {"params": params, "rng": rng, "step": step, "inputs": inputs, "targets": targets}
    branches = [self._branch(prog, kind if train or kind == Kind.F else None, s, train, ctx)
                for kind, s in tables.branches]
    width = prog.payload_bytes
    z, rows = self.state_shards, self.step_axes.rows
    grads = ({k: jnp.zeros((rows, n // z), k) for k, n in plan.param_sizes.items()} if train
             else {})
    stash = {k: jnp.zeros((n,), k) for k, n in prog.stash_sizes.items()} if train else {}
    act_in = jnp.zeros((tables.num_act + 1, width), jnp.uint8)  # last row: scratch
    cot_in = jnp.zeros((tables.num_cot + 1 if train else 1, width), jnp.uint8)
    recv_kinds = []  # per delta: does it ever carry activations / (in training) cotangents?
    for k, _ in enumerate(tables.deltas):
      recv_kinds.append((bool((tables.recv_act[:, :, k] != tables.num_act).any()),
                         train and bool((tables.recv_cot[:, :, k] != tables.num_cot).any())))

    def tick(carry, xs):
      grads, stash, act_in, cot_in, loss = carry
      key = self._microbatch_key(rng, step, xs["mb"]) if train else None
      grads, stash, loss, out = _switch_in_place(
          xs["branch"], branches, (grads, stash, loss, jnp.zeros((width,), jnp.uint8)), act_in,
          cot_in, xs["mb"], key, xs["act_slot"], xs["cot_slot"], xs["stash_slot"])
      for k, delta in enumerate(tables.deltas):
        got = out if delta == 0 else jax.lax.ppermute(out, "pp", tables.perms[k])
        to_act, to_cot = recv_kinds[k]
        if to_act:
          act_in = jax.lax.dynamic_update_index_in_dim(act_in, got, xs["recv_act"][k], 0)
        if to_cot:
          cot_in = jax.lax.dynamic_update_index_in_dim(cot_in, got, xs["recv_cot"][k], 0)
      return (grads, stash, act_in, cot_in, loss), None

    init = (grads, stash, act_in, cot_in, jnp.zeros((), jnp.float32))
    (grads, _, _, _, loss), _ = jax.lax.scan(tick, init, tabs)
    return loss, grads

  def _grads_body(self, prog, params, rng, step, inputs, targets, tabs):
    """Inside shard_map: mean loss and this device's pieces of the mean, tied grads.

    Each backward call already summed its gradients over the manual state axes onto their pieces
    (``StepAxes.sum_copies`` per batch shard: the ``fsdp`` shards, times ``tp`` identical copies
    when ``tp`` is manual): dividing by that and averaging over ``dp`` gives the mean over the
    batch shards."""
    m = self.options.num_microbatches
    loss, grads = self._run_pipeline(prog, True, params, rng, step, inputs, targets, tabs)
    loss = jax.lax.pmean(jax.lax.psum(loss, "pp") / m, zero.BATCH_AXES)
    copies = m * self.step_axes.sum_copies
    grads = jax.lax.pmean({k: g / copies for k, g in grads.items()}, "dp")
    return loss, self._tie_grads(grads)

  def _tie_grads(self, grads: dict) -> dict:
    """Replaces both sides of every tie by their sum (a ``psum`` over ``pp`` of each side), piece
    by piece: both sides have the same shape, so a shard holds the same part of each."""
    out = dict(grads)
    cut = lambda g, off, n: jax.lax.dynamic_slice_in_dim(g, off, n, g.ndim - 1)
    paste = lambda g, v, off: jax.lax.dynamic_update_slice_in_dim(g, v, off, g.ndim - 1)
    for tie in self.plan.ties:
      g = out[tie.dtype]
      (src_on, src_off), (tgt_on, tgt_off) = _sides_here(tie)
      src, tgt = cut(g, src_off, tie.size), cut(g, tgt_off, tie.size)
      total = jax.lax.psum(jnp.where(src_on, src, 0) + jnp.where(tgt_on, tgt, 0), "pp")
      g = paste(g, jnp.where(src_on, total, src), src_off)
      tgt = cut(g, tgt_off, tie.size)
      out[tie.dtype] = paste(g, jnp.where(tgt_on, total, tgt), tgt_off)
    return out

  def _tied_copies(self, grads: dict) -> list:
    """This rank's copies of tied weights in its gradient pieces (zeros for sides it lacks)."""
    g = lambda tie: grads[tie.dtype]
    return [jnp.where(on, jax.lax.dynamic_slice_in_dim(g(tie), off, tie.size, g(tie).ndim - 1), 0)
            for tie in self.plan.ties for on, off in _sides_here(tie)]

  def _update_rank(self, rank: int, params: dict, grads: dict, opt: dict, sq: jax.Array):
    """Optimizer update of rank ``rank``'s pieces.

    With the state split (``fsdp x tp > 1``) it runs one layer at a time: each layer's
    parameters, gradients and optimizer state are gathered whole, ``optimizer.update`` runs on
    the layer's own tree and each shard keeps its own rows, so no more than one layer is ever
    whole. A transformation that looks across leaves (a ``clip_by_global_norm`` inside the
    optimizer) then sees one layer; the pipeline's ``max_grad_norm`` clips by the global norm.
    Otherwise (nothing to gather) the rank's layers are updated together, as on one device.
    Shared leaves (step counters) are read from the state before the update and written by
    every group alike.
    """
    plan, axes = self.plan, self.step_axes.state
    names = plan.rank_names(rank)
    groups = [names] if self.state_shards == 1 else [(name,) for name in names]
    new_params, new_opt = params, opt
    for group in groups:
      # Per stage of the rank holding some of the group's layers: (those layers, their columns).
      parts = [(mine, columns.layer_columns(plan.stage_layouts[s], mine))
               for s in plan.rank_stages(rank)
               for mine in [[n for n in plan.layout.stages[s].layer_names if n in group]] if mine]
      o_cols = columns.opt_layer_columns(plan.opt_layouts[rank], group, names)
      gather = lambda bufs: {n: v for _, c in parts for n, v in c.gather(bufs, axes).items()}
      p_tree, o_tree = step_lib.apply_update(
          self.optimizer, self.options.max_grad_norm, gather(grads), gather(params),
          o_cols.gather(opt, axes), sq)
      for mine, c in parts:
        new_params = c.write_own(new_params, {n: p_tree[n] for n in mine}, axes)
      new_opt = o_cols.write_own(new_opt, o_tree, axes)
    return new_params, new_opt

  def _train_body(self, prog, params, opt, rng, step, inputs, targets, tabs):
    rows = self.step_axes.rows
    params, opt = _piece(params, rows), _piece(opt, rows)
    loss, grads = self._grads_body(prog, params, rng, step, _local(inputs), _local(targets),
                                   _rows(tabs))
    sq = jax.lax.psum(step_lib.sq_norm_share(grads, self._tied_copies(grads)),
                      ("pp",) + self.step_axes.state)
    updates = [functools.partial(self._update_rank, r) for r in range(self.num_ranks)]
    update = lambda s: jax.lax.switch(jax.lax.axis_index("pp"), updates, s[0], grads, s[1], sq)
    # loss and norm are global (psum over pp, pmean over dp): every shard decides alike.
    (params, opt), metrics = step_lib.guarded_update(self.options.skip_nonfinite, loss, sq,
                                                     update, (params, opt))
    return _row(params), _row(opt), metrics

  def _loss_grads_body(self, prog, params, rng, step, inputs, targets, tabs):
    loss, grads = self._grads_body(prog, _piece(params, self.step_axes.rows), rng, step,
                                   _local(inputs), _local(targets), _rows(tabs))
    return loss, _row(grads)

  def _eval_body(self, prog, params, inputs, targets, tabs):
    loss, _ = self._run_pipeline(prog, False, _piece(params, self.step_axes.rows), None, None,
                                 _local(inputs), _local(targets), _rows(tabs))
    return jax.lax.pmean(jax.lax.psum(loss, "pp") / self.options.num_microbatches,
                         zero.BATCH_AXES)


def _switch_in_place(index: jax.Array, branches: Sequence[Any], carry: Any, *args: Any) -> Any:
  """``lax.switch`` for branches that update large buffers, without copying them.

  XLA gives a conditional's outputs their own buffers, so every branch (even one that leaves a
  buffer untouched) copies every large operand it returns: here the gradient accumulator and the
  whole stash, every tick. A ``while_loop`` updates its carry in place, so branch ``i`` runs as a
  loop of ``index == i`` trips (0 or 1). ``None`` branches do nothing.

  Args:
    index: which branch runs.
    branches: ``fn(carry, *args) -> carry`` (or None).
    carry: the state the branches update.
    *args: read-only inputs.
  """
  for i, fn in enumerate(branches):
    if fn is None:
      continue
    run = lambda state, fn=fn: (jnp.zeros((), jnp.bool_), fn(state[1], *args))
    carry = jax.lax.while_loop(lambda state: state[0], run, (index == i, carry))[1]
  return carry


def _sides_here(tie: _Tie) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """Inside shard_map: ``((holds source, its offset), (holds target, its offset))`` on this
  ``pp`` rank."""
  r = jax.lax.axis_index("pp")
  pick = lambda t: jnp.asarray(np.asarray(t))[r]
  return (pick(tie.src_on), pick(tie.src_off)), (pick(tie.tgt_on), pick(tie.tgt_off))


def _piece(bufs: Mapping[str, jax.Array], rows: int) -> dict:
  """A shard's ``[1, rows * n / z]`` state blocks as its ``[rows, n / z]`` rows of the column
  view (``_columns``)."""
  return {k: v.reshape(rows, -1) for k, v in bufs.items()}


def _row(bufs: Mapping[str, jax.Array]) -> dict:
  """Inverse of :func:`_piece`."""
  return {k: v.reshape(1, -1) for k, v in bufs.items()}


def _local(tree: Any) -> Any:
  """Drops the size-1 batch-shard axis of a ``[m, 1, b, ...]`` shard."""
  return jax.tree.map(lambda x: x[:, 0], tree)


def _rows(tabs: Mapping[str, jax.Array]) -> dict:
  """Drops the size-1 ``pp`` axis of the per-rank tables."""
  return {k: v[0] for k, v in tabs.items()}
