"""Builders of the compiled programs of an MPMD pipeline (a mixin of ``_setup._Setup``).

Every program is a pure function of flat arrays (``_mpmd_programs``), compiled ahead of time for
the devices of one rank by ``_mpmd_compile``; stages with equal signatures share one compile.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.interpreters import pxla  # pylint: disable=g-bad-import-order

from hkpipe import schedules
from hkpipe._src.backends import _mpmd_compile
from hkpipe._src.backends import _mpmd_plan
from hkpipe._src.backends import _mpmd_programs as progs

Kind = schedules.Kind


def _spec(shape: Any, sharding: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)


class Builders:
  """Program builders; the attributes they read (``fns``, ``rep``, ``rank_of``...) and
  ``_compile`` / ``_stage_program`` / ``_placed_or_built`` come from ``_setup._Setup``."""

  # pylint: disable=no-member

  if TYPE_CHECKING:
    def __getattr__(self, name: str) -> Any: ...
  def _input_specs(self, s: int, rng: Any) -> list:
    f, r = self.fns[s], self.rank_of[s]
    rep = self.rep[r]
    specs = self._param_specs(s)
    specs += [_spec(a, sh) for a, sh in zip(f.x_leaves, self.act_shardings(r, f.x_leaves))]
    if f.is_last:
      specs += [_spec(a, sh) for a, sh in zip(f.t_leaves, self.act_shardings(r, f.t_leaves))]
    i32 = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    return specs + [_spec(rng, rep), i32, i32,
                    jax.ShapeDtypeStruct((len(f.layers),), jnp.int32, sharding=rep)]

  def _param_specs(self, s: int) -> list:
    return [_spec(a, sh) for a, sh in zip(self.fns[s].p_leaves, self.psh[s])]

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

  def build_init(self, rng: Any) -> tuple:
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
      start = 0
      for j, layer in enumerate(f.layers):
        # Each layer's leaves are created directly in their shardings (never whole).
        stop = start + len(jax.tree.leaves(f.shapes.params[j]))
        specs, shardings = self.pspecs[s][start:stop], self.psh[s][start:stop]
        start = stop
        layer_key: tuple = ("layer_init", id(layer),
                            tuple(jax.tree.leaves(f.shapes.layer_inputs[j])), rng.shape,
                            str(rng.dtype), self.layout.sub_mesh_shape, specs)
        build: Callable[[], _mpmd_compile.Program] = functools.partial(
            self._compile, f.layer_init(j), [_spec(rng, rep), index], r,
            out_shardings=shardings)
        inits.append(self._placed_or_built(layer_key, (layer,), r, build))
      key: tuple = ("opt_init", id(self.backend.optimizer), tuple(id(l) for l in f.layers),
                    f.spec.layer_names, tuple(f.p_leaves), self.layout.sub_mesh_shape,
                    self.pspecs[s])
      opt = self._placed_or_built(
          key, (self.backend.optimizer,) + f.layers, r,
          lambda: self._compile(progs.opt_init_fn(self.backend.optimizer, f),
                                self._param_specs(s), r, out_shardings=self.opt_shardings(s)))
      out.append((inits, opt))
    return tuple(out)

  def _build_stage_train(self, s: int, rng: Any, kinds: set) -> dict:
    """The forward/backward programs of stage ``s`` that the schedule uses."""
    f, r = self.fns[s], self.rank_of[s]
    rep, psh = self.rep[r], list(self.psh[s])
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
            out_shardings=(psh, rep, dx), donate=range(n_in, n_in + n_p)))
      if split:
        prog = build("last_fwd_i", lambda: self._compile(
            f.last_fwd_i(), inputs + [self._scalar(r)], r, out_shardings=(rep, dx, None)))
        p["last_fwd_i"] = prog

        def last_w():
          res = list(prog.out_specs()[2])
          return self._compile(f.bwd_w(), inputs + res + acc, r, out_shardings=psh,
                               donate=range(n_in + len(res), n_in + len(res) + n_p))
        p["w"] = build("w", last_w)
    else:
      y = self.act_shardings(r, f.y_leaves)
      # Residuals on a single device: give their (only possible) sharding, so the backward can
      # be lowered before the forward has compiled; with dp > 1 the compiler chooses.
      res_sharding = rep if len(self.rank_devices(r)) == 1 else None
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
        p["bwd"] = build("bwd", lambda: backward(f.bwd(), (psh, dx)))
      if split:
        if not f.is_first:
          p["i"] = build("i", lambda: backward(f.bwd_i(), dx, with_acc=False))
        p["w"] = build("w", lambda: backward(f.bwd_w(), psh))
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
      self._families[key] = self._compile(
          progs.split_fn(self.m, mbs), whole, rank, out_shardings=[shard] * self.m)
    args = [x if isinstance(x, np.ndarray) else jax.device_put(x, sh)
            for x, sh in zip(leaves, shard)]
    return self._families[key].fn(*args)

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

  def build_core(self, rng: Any) -> dict:
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
    return dict(stages=stage_progs, metrics=metrics)

  def _build_finalize(self, s: int) -> _mpmd_compile.Program:
    f, r = self.fns[s], self.rank_of[s]
    same, incoming, partner_specs = self._tie_plan(s)
    return self._stage_program(s, "finalize", lambda: self._compile(
        progs.finalize_fn(f, same, [leaf for _, leaf in incoming]),
        self._acc_specs(s) + partner_specs, r,
        out_shardings=(list(self.psh[s]), self.rep[r]), donate=range(f.np)))

  def build_steps(self, core: Any, opt: Sequence[tuple[Any, list]] | None) -> dict:
    """Programs of a gradient computation, plus optimizer updates when ``opt`` is given.

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
    return dict(core, updates=updates, finalize=fin)

  def _build_update(self, s: int, opt_tree: Any,
                    opt_leaves: Sequence[Any]) -> _mpmd_compile.Program:
    f, r = self.fns[s], self.rank_of[s]
    rep, psh, opt_sh = self.rep[r], list(self.psh[s]), self.opt_shardings(s)
    opt_specs = [_spec(a, sh) for a, sh in zip(opt_leaves, opt_sh)]
    same, incoming, partner_specs = self._tie_plan(s)
    args = self._param_specs(s) + opt_specs + self._acc_specs(s)
    args += [self._scalar(r)] if self.scaled_update else partner_specs
    n = f.np + len(opt_specs)
    # The accumulator is always donated: the fresh zeros for the next step reuse it.
    donate = (list(range(n)) if self.options.donate else []) + list(range(n, n + f.np))
    return self._stage_program(s, "update", lambda: self._compile(
        progs.update_fn(self.backend.optimizer, f, opt_tree, self.options.max_grad_norm, same,
                        [leaf for _, leaf in incoming], self.options.skip_nonfinite), args, r,
        out_shardings=(psh, opt_sh, psh) + (() if self.scaled_update else (rep,)),
        donate=donate),
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
    # A partner gradient arrives in the layout of the leaf it is added to.
    specs = [_spec(self.fns[s].p_leaves[leaf], self.psh[s][leaf]) for _, leaf in incoming]
    return same, incoming, specs

  # -- driver ops ------------------------------------------------------------------------------

  def build_eval(self, rng: Any) -> dict:
    """Forward-only programs (no dropout) per stage, and the loss mean."""
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
    return dict(evals=evals, mean=mean)

