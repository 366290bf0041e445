"""Pure, flat-argument programs of one MPMD pipeline stage.

Every function built here takes and returns flat lists of arrays (the pytree structure is closed
over), so two stages made of the same layer types and shapes trace to identical computations and
can share one executable (see ``_mpmd_compile``). The stage's global layer indices, used for
per-layer dropout keys and per-layer init keys, are an *argument* (``lidx``) for the same reason.

Argument conventions (``*p`` = parameter leaves in stage layer order, ``*x`` = input activation
leaves, ``*t`` = target leaves, last stage only):

- ``inputs``: ``*p, *x, [*t], rng, step, mb, lidx`` -- everything a forward reads.
- ``fwd(inputs) -> (y, res)``: forward keeping the ``jax.vjp`` residuals that are not inputs.
- ``bwd(inputs, *res, *dy, *acc) -> (acc', dx)``: backward from the stashed residuals, adding
  the parameter gradient into the accumulator (donated).
- ``bwd_i -> dx`` / ``bwd_w -> acc'``: the two halves of ``bwd`` (input / weight gradient).
- the last stage fuses the loss: ``last(inputs, *acc, loss) -> (acc', loss', dx)``, and in split
  mode ``last_fwd_i(inputs, loss) -> (loss', dx, res)`` plus ``bwd_w`` with a constant cotangent.
- ``dx`` holds only the inexact (float) leaves of ``x``; integer leaves have no gradient.
- ``res`` is the stash as :class:`Stash` lays it out: on a one-device rank, stash entries of at
  most :data:`PACK_MAX_BYTES` are packed per dtype into one flat array each (every array a launch
  takes or returns costs the host about a microsecond; a transformer block stashes dozens);
  larger entries, and every entry on a multi-device rank (whose shardings the compiler chooses
  per entry), stay whole.

Outputs are tuples of flat lists (groups), so that shardings can be given per group (residual
shardings are left to the compiler when a stage spans several devices) and the driver picks
groups without slicing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hkpipe._src import model as model_lib
from hkpipe._src import partition as partition_lib
from hkpipe._src import remat as remat_lib
from hkpipe._src import stage as stage_lib
from hkpipe._src import step as step_lib


def _is_float(a: Any) -> bool:
  return jnp.issubdtype(a.dtype, jnp.inexact)


@dataclasses.dataclass(frozen=True)
class StageShapes:
  """Abstract shapes of a stage's interface (no device placement).

  Attributes:
    params: per layer of the stage, its parameter shapes (a tuple in layer order).
    x: the stage input pytree (shapes), ``y``: the stage output pytree.
    targets: the target pytree of one microbatch (used by the last stage).
    layer_inputs: per layer, the shapes of its input (for parameter init).
  """

  params: tuple[Any, ...]
  x: Any
  y: Any
  targets: Any
  layer_inputs: tuple[Any, ...]


# Stash entries up to this size are packed (a copy into and out of the packed array costs little).
PACK_MAX_BYTES = 1 << 16


@dataclasses.dataclass(frozen=True)
class Stash:
  """Where a stage's stash entries travel between its forward and its backward.

  Attributes:
    residuals: the pullback's structure over the stash entries (``stage_lib.Residuals``).
    slots: per stash entry, ``(array, offset, shape)``: it is ``res[array]`` (offset None) or
      the ``shape``-d slice from ``offset`` of the flat packed array ``res[array]``.
    num_out: the number of stash arrays (``res``) a forward returns and a backward takes.
  """

  residuals: stage_lib.Residuals = stage_lib.Residuals()
  slots: tuple[tuple[int, int | None, tuple[int, ...]], ...] = ()
  num_out: int = 0


def pack_stash(residuals: stage_lib.Residuals, stash: Sequence[Any],
               pack: bool) -> tuple[Stash, list]:
  """Lays ``stash`` out as :class:`Stash` arrays: entries of at most :data:`PACK_MAX_BYTES`
  packed per dtype (if ``pack``), the others whole. Returns (layout, arrays)."""
  whole = [i for i, a in enumerate(stash)
           if not pack or a.size * jnp.dtype(a.dtype).itemsize > PACK_MAX_BYTES]
  groups: dict[Any, list[int]] = {}
  for i, a in enumerate(stash):
    if i not in whole:
      groups.setdefault(jnp.dtype(a.dtype), []).append(i)
  slots: list = [None] * len(stash)
  arrays: list[Any] = []
  for i in whole:
    slots[i] = (len(arrays), None, tuple(stash[i].shape))
    arrays.append(stash[i])
  for members in groups.values():
    offset = 0
    for i in members:
      slots[i] = (len(arrays), offset, tuple(stash[i].shape))
      offset += stash[i].size
    arrays.append(jnp.concatenate([jnp.ravel(stash[i]) for i in members]))
  return Stash(residuals, tuple(slots), len(arrays)), arrays


def unpack_stash(layout: Stash, arrays: Sequence[Any]) -> list:
  """The stash entries from the arrays :func:`pack_stash` returned."""
  out = []
  for k, offset, shape in layout.slots:
    if offset is None:
      out.append(arrays[k])
    else:
      size = int(np.prod(shape, dtype=np.int64))
      out.append(jax.lax.slice(arrays[k], (offset,), (offset + size,)).reshape(shape))
  return out


class StageFns:
  """Builds the flat programs of one stage.

  Args:
    model: the whole model.
    spec: the stage (a contiguous layer range).
    shapes: its interface shapes.
    num_stages: total number of stages (to know whether this one is first/last).
    num_microbatches: ``m``; the loss cotangent is ``1/m`` so gradients are microbatch means.
    remat: recompute the forward in the backward instead of stashing residuals.
    pack_stash: pack small stash entries (the stage runs on one device; see :class:`Stash`).
  """

  def __init__(self, model: model_lib.SequentialModel, spec: partition_lib.StageSpec,
               shapes: StageShapes, num_stages: int, num_microbatches: int, remat: bool,
               pack_stash: bool = False):
    self.model = model
    self.spec = spec
    self.shapes = shapes
    self.is_first = spec.index == 0
    self.is_last = spec.index == num_stages - 1
    self.num_stages = num_stages
    self.m = num_microbatches
    self.remat = remat
    self.layers = model.layers[spec.start:spec.stop]
    self.p_leaves, self.p_tree = jax.tree.flatten(shapes.params)
    self.x_leaves, self.x_tree = jax.tree.flatten(shapes.x)
    self.y_leaves, self.y_tree = jax.tree.flatten(shapes.y)
    self.t_leaves, self.t_tree = jax.tree.flatten(shapes.targets)
    # Float inputs of later stages get a cotangent; the model's own inputs (stage 0) get none.
    self.x_float = tuple(_is_float(a) and not self.is_first for a in self.x_leaves)
    self.y_float = tuple(_is_float(a) for a in self.y_leaves)
    self.np = len(self.p_leaves)
    self.nx = len(self.x_leaves)
    self.ny = len(self.y_leaves)
    self.nt = len(self.t_leaves) if self.is_last else 0
    self.ndx = 0 if self.is_first else sum(self.x_float)
    self.ndy = 0 if self.is_last else sum(self.y_float)
    self.n_inputs = self.np + self.nx + self.nt + 4
    self.pack_stash = pack_stash
    self.res = Stash()  # filled by tracing fwd (or last_fwd_i)

  # -- pieces ----------------------------------------------------------------------------------

  def run(self, params: Sequence[Any], x: Any, key: jax.Array | None, lidx: jax.Array,
          is_training: bool) -> Any:
    """Applies the stage's layers (per-layer dropout keys ``fold_in(key, lidx[j])``; the layer
    index is traced, so identical stages share programs)."""
    return stage_lib.apply_layers(self.layers, params, x, key, lidx, is_training)

  def _split(self, args: Sequence[Any]):
    """Splits ``inputs`` into (params tuple, x leaves, targets tree, rng, step, mb, lidx)."""
    n = 0
    p = jax.tree.unflatten(self.p_tree, args[n:n + self.np]); n += self.np
    x = list(args[n:n + self.nx]); n += self.nx
    t = jax.tree.unflatten(self.t_tree, args[n:n + self.nt]) if self.is_last else None; n += self.nt
    rng, step, mb, lidx = args[n:n + 4]
    return p, x, t, rng, step, mb, lidx

  def _objective(self, x_leaves: list, t: Any, key: jax.Array | None,
                 lidx: jax.Array) -> Callable:
    """``f(params, x_float_leaves) -> y`` (or the scalar loss on the last stage)."""

    def f(params, xf):
      it = iter(xf)
      full = [next(it) if fl else v for v, fl in zip(x_leaves, self.x_float)]
      return stage_lib.stage_output(self.model, self.spec.start, self.spec.stop, params,
                                    jax.tree.unflatten(self.x_tree, full), key, lidx, t, True)

    return remat_lib.wrap(f, remat_lib.for_stage(self.remat, self.spec.index, self.num_stages))

  def _vjp(self, args: Sequence[Any]):
    """Runs the forward under ``jax.vjp``; returns (output, vjp_fn, residuals, stash): residuals
    that are inputs (``args``) are passed to the backward again, not stashed."""
    p, x, t, rng, step, mb, lidx = self._split(args)
    key = model_lib.microbatch_rng(rng, step, mb)
    f = self._objective(x, t, key, lidx)
    if self.is_first:
      return stage_lib.vjp_with_stash(lambda params: f(params, []), (p,), args)
    xf = [v for v, fl in zip(x, self.x_float) if fl]
    return stage_lib.vjp_with_stash(f, (p, xf), args)

  def _rebuild_vjp(self, inputs: Sequence[Any], res: Sequence[Any]) -> Any:
    return stage_lib.rebuild_pullback(self.res.residuals, inputs, unpack_stash(self.res, res))

  def _stash(self, residuals: stage_lib.Residuals, stash: Sequence[Any]) -> list:
    """Records the stash layout (for the backward programs); returns the stash arrays."""
    self.res, arrays = pack_stash(residuals, stash, self.pack_stash)
    return arrays

  @staticmethod
  def _accumulate(acc: Sequence[Any], dp: Sequence[Any]) -> list:
    return [a + g for a, g in zip(acc, dp)]

  def _cotangent(self, dy: Sequence[Any]) -> Any:
    if self.is_last:
      return jnp.asarray(1.0 / self.m, jnp.float32)
    it = iter(dy)
    full = [next(it) if fl else np.zeros(a.shape, jax.dtypes.float0)
            for a, fl in zip(self.y_leaves, self.y_float)]
    return jax.tree.unflatten(self.y_tree, full)

  def _grads(self, vjp_fn: Any, ct: Any) -> tuple[list, list]:
    """(flat parameter gradient, flat input gradient) of the rebuilt vjp."""
    cts = vjp_fn(ct)
    dp = jax.tree.leaves(cts[0])
    dx = [] if self.is_first else list(cts[1])
    return dp, dx

  # -- programs --------------------------------------------------------------------------------

  def fwd(self):
    """``fwd(*inputs) -> (y, res)`` (not for the last stage)."""

    def stage_fwd(*inputs):
      y, _, residuals, stash = self._vjp(inputs)
      return jax.tree.leaves(y), self._stash(residuals, stash)

    return stage_fwd

  def bwd(self):
    """``bwd(*inputs, *res, *dy, *acc) -> (acc', dx)`` (not for the last stage)."""

    def stage_bwd(*args):
      inputs, rest = args[:self.n_inputs], args[self.n_inputs:]
      res, dy, acc = (rest[:self.res.num_out], rest[self.res.num_out:self.res.num_out + self.ndy],
                      rest[self.res.num_out + self.ndy:])
      dp, dx = self._grads(self._rebuild_vjp(inputs, res), self._cotangent(dy))
      return self._accumulate(acc, dp), dx

    return stage_bwd

  def bwd_i(self):
    """``bwd_i(*inputs, *res, *dy) -> dx``: input gradient only (not first or last stage)."""

    def stage_bwd_i(*args):
      inputs, rest = args[:self.n_inputs], args[self.n_inputs:]
      res, dy = rest[:self.res.num_out], rest[self.res.num_out:]
      vjp_fn = self._rebuild_vjp(inputs, res)
      return list(vjp_fn(self._cotangent(dy))[1])

    return stage_bwd_i

  def bwd_w(self):
    """``bwd_w(*inputs, *res, *dy, *acc) -> acc'``: weight gradient only (``dy`` absent on the
    last stage, whose cotangent is the constant ``1/m``)."""

    def stage_bwd_w(*args):
      inputs, rest = args[:self.n_inputs], args[self.n_inputs:]
      res, dy, acc = (rest[:self.res.num_out], rest[self.res.num_out:self.res.num_out + self.ndy],
                      rest[self.res.num_out + self.ndy:])
      vjp_fn = self._rebuild_vjp(inputs, res)
      dp = jax.tree.leaves(vjp_fn(self._cotangent(dy))[0])
      return self._accumulate(acc, dp)

    return stage_bwd_w

  def last(self):
    """``last(*inputs, *acc, loss) -> (acc', loss', dx)``: forward + loss + backward, fused."""

    def stage_last(*args):
      inputs, acc, loss_acc = args[:self.n_inputs], args[self.n_inputs:-1], args[-1]
      loss, vjp_fn, _, _ = self._vjp(inputs)
      dp, dx = self._grads(vjp_fn, self._cotangent(()))
      return self._accumulate(acc, dp), loss_acc + loss, dx

    return stage_last

  def last_fwd_i(self):
    """``last_fwd_i(*inputs, loss) -> (loss', dx, res)``: forward + loss + input gradient."""

    def stage_last_fwd_i(*args):
      inputs, loss_acc = args[:self.n_inputs], args[-1]
      loss, vjp_fn, residuals, stash = self._vjp(inputs)
      _, dx = self._grads(vjp_fn, self._cotangent(()))
      return loss_acc + loss, dx, self._stash(residuals, stash)

    return stage_last_fwd_i

  def eval_fwd(self):
    """``eval_fwd(*p, *x, lidx) -> y`` (no dropout), not for the last stage."""

    def stage_eval(*args):
      p = jax.tree.unflatten(self.p_tree, args[:self.np])
      x = jax.tree.unflatten(self.x_tree, args[self.np:self.np + self.nx])
      return jax.tree.leaves(self.run(p, x, None, args[-1], False))

    return stage_eval

  def eval_last(self):
    """``eval_last(*p, *x, *t, lidx, loss) -> loss'`` (no dropout)."""

    def stage_eval_last(*args):
      p = jax.tree.unflatten(self.p_tree, args[:self.np])
      n = self.np
      x = jax.tree.unflatten(self.x_tree, args[n:n + self.nx]); n += self.nx
      t = jax.tree.unflatten(self.t_tree, args[n:n + self.nt])
      return args[-1] + stage_lib.stage_output(self.model, self.spec.start, self.spec.stop, p, x,
                                               None, args[-2], t, False)

    return stage_eval_last

  def layer_init(self, j: int):
    """``init(rng, index) -> p_j``: layer ``j``'s parameters, exactly as ``SequentialModel.init``
    (key ``fold_in(rng, index)``, zero input of the layer's input shape). The global layer index
    is an argument, so identical layers share one program."""
    layer, x = self.layers[j], self.shapes.layer_inputs[j]

    def layer_init(rng, index):
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), x)
      return jax.tree.leaves(layer.init(jax.random.fold_in(rng, index), zeros))

    return layer_init

  def names_dict(self, tree: Any) -> dict:
    """A stage-ordered tuple of per-layer trees as ``{layer_name: tree}``."""
    return dict(zip(self.spec.layer_names, tree))


def _tied(g: Sequence[Any], same_stage: Sequence[tuple[int, int]],
           incoming: Sequence[int]) -> list:
  """The stage's copies of tied weights among its gradient leaves ``g``."""
  return [g[i] for pair in same_stage for i in pair] + [g[i] for i in incoming]


def finalize_fn(fns: StageFns, same_stage: Sequence[tuple[int, int]],
                incoming: Sequence[int]) -> Callable:
  """``finalize(*acc, *partner) -> (g, sq)``: sums tied gradients and measures the stage's share
  of the squared global norm (``step.sq_norm_share``: each tied weight counted once overall).

  Args:
    fns: the stage.
    same_stage: leaf pairs tied within the stage (both become their sum).
    incoming: for each partner leaf (a tied gradient from another stage, moved here), the leaf it
      is added to.
  """
  n = fns.np

  def stage_finalize(*args):
    g = step_lib.sum_tie_leaves(args[:n], same_stage, incoming, args[n:])
    return g, step_lib.sq_norm_share(g, _tied(g, same_stage, incoming))

  return stage_finalize


def metrics_fn(num_stages: int, num_microbatches: int, max_grad_norm: float | None,
               skip_nonfinite: bool = False) -> Callable:
  """``metrics(loss_sum, *sq) -> (loss, grad_norm, global_sq_norm, skipped)``.

  ``global_sq_norm`` is the one scalar every stage's update receives (it clips by it); with
  ``skip_nonfinite`` it is NaN when the step must be skipped (see ``step.global_metrics``).
  """

  def pipeline_metrics(loss_sum, *sqs):
    return step_lib.global_metrics(num_microbatches, skip_nonfinite, loss_sum, sqs)

  del num_stages, max_grad_norm
  return pipeline_metrics


def update_fn(optimizer: optax.GradientTransformation, fns: StageFns, opt_tree: Any,
              max_grad_norm: float | None, same_stage: Sequence[tuple[int, int]] = (),
              incoming: Sequence[int] = (), skip_nonfinite: bool = False) -> Callable:
  """One optimizer step of one stage, handing back a zeroed accumulator for the next step.

  With clipping or ``skip_nonfinite``: ``update(*p, *opt, *g, sq) -> (p', opt', zeros)`` on
  finalized gradients ``g``, once every stage's norm is known: ``sq`` is the squared global norm
  from :func:`metrics_fn` (``g`` is clipped by it), NaN when the step is skipped (``p``, ``opt``
  then come back unchanged; see ``step.stage_update``). Otherwise the finalize step is fused in,
  ``update(*p, *opt, *acc, *partner) -> (p', opt', zeros, sq)`` (see :func:`finalize_fn`), so a
  stage updates as soon as its own backward is done. The accumulator is donated, so the zeros
  reuse its buffers.
  """
  n_p, n_opt = fns.np, opt_tree.num_leaves
  scaled = max_grad_norm is not None or skip_nonfinite

  def stage_update(*args):
    p = fns.names_dict(jax.tree.unflatten(fns.p_tree, args[:n_p]))
    opt = jax.tree.unflatten(opt_tree, args[n_p:n_p + n_opt])
    acc = args[n_p + n_opt:n_p + n_opt + n_p]
    g = acc if scaled else step_lib.sum_tie_leaves(acc, same_stage, incoming,
                                                   args[n_p + n_opt + n_p:])
    grads = fns.names_dict(jax.tree.unflatten(fns.p_tree, g))
    p, opt = step_lib.stage_update(optimizer, max_grad_norm, skip_nonfinite, p, opt, grads,
                                   args[-1] if scaled else None)
    out = (jax.tree.leaves(tuple(p[n] for n in fns.spec.layer_names)), jax.tree.leaves(opt),
           [jnp.zeros_like(a) for a in acc])
    return out if scaled else out + (step_lib.sq_norm_share(g, _tied(g, same_stage, incoming)),)

  return stage_update


def opt_init_fn(optimizer: optax.GradientTransformation, fns: StageFns) -> Callable:
  """``opt_init(*p) -> opt``: the stage's optimizer state (``optimizer.init`` of its dict)."""

  def stage_opt_init(*p):
    return jax.tree.leaves(optimizer.init(fns.names_dict(jax.tree.unflatten(fns.p_tree, p))))

  return stage_opt_init


def split_fn(num_microbatches: int, mb_size: int) -> Callable:
  """``split(*leaves) -> [[mb 0 leaves], [mb 1 leaves], ...]`` along the batch axis."""

  def split_microbatches(*leaves):
    return [[x[i * mb_size:(i + 1) * mb_size] for x in leaves] for i in range(num_microbatches)]

  return split_microbatches


def mean_fn(num_microbatches: int) -> Callable:
  """``mean(loss_sum) -> loss_sum / m``."""

  def microbatch_mean(loss_sum):
    return loss_sum / num_microbatches

  return microbatch_mean
