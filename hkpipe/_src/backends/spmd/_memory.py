"""Per-device memory of the SPMD train step from its compiled program, without allocating anything.

``report(backend, batch)`` resolves the plan from ``batch``'s shapes (arrays or
``jax.ShapeDtypeStruct`` s), builds the abstract train state (``abstract_state``: the packed
``[pp, n]`` buffers as ``jax.ShapeDtypeStruct`` s with the shardings ``init`` stores them in),
lowers and compiles the jitted train step for those shapes and returns the report the ``mpmd``
backend returns (``mpmd/_memory.py``), per rank and per device:

- ``params_bytes`` / ``opt_state_bytes``: this device's pieces of the packed parameter and
  optimizer buffers (every rank allocates the largest rank's padded length, split over
  ``fsdp x tp``); ``state_bytes`` is their sum;
- ``grad_acc_bytes`` and ``call_peak_bytes``: 0, the step is one program: the gradient
  accumulator, the whole rank state gathered over ``("fsdp", "tp")``, activations and stash are
  all in its ``temp_size_in_bytes``;
- ``programs``: ``{"train_step": XLA's memory_analysis()}`` (argument, output, alias and temp
  bytes per device; the same program on every device) and ``max_temp_bytes``, its temp;
- ``total_bytes``: ``argument + output - alias + temp``, the program's peak per device (its
  arguments are the state's pieces, the batch and the tick tables).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hkpipe._src import pipeline as pipeline_lib
from hkpipe._src.backends.spmd import _pack as pack
from hkpipe._src.backends.spmd import _zero as zero
from hkpipe._src.backends.spmd._plan import _shape_key

_KEYS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
         "temp_size_in_bytes")


def analysis_dict(stats: Any) -> dict[str, int]:
  """The four per-device byte counts of a compiled program's ``memory_analysis()``."""
  return {k: int(getattr(stats, k)) for k in _KEYS}


def _abstract(x: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(np.shape(x)), x.dtype, sharding=sharding)


def _example_microbatch(batch: pipeline_lib.Batch, size: int, m: int) -> Any:
  """Shapes of ``placement.example_microbatch(batch[0], size, m)`` (works on abstract leaves)."""
  rows = max(1, size // m)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      (min(rows, np.shape(x)[0]),) + tuple(np.shape(x)[1:]), x.dtype), batch[0])


def abstract_state(backend: Any) -> pipeline_lib.TrainState:
  """The state ``init`` returns, as ``jax.ShapeDtypeStruct`` s with its shardings: per dtype, a
  ``[pp, n]`` buffer split ``zero.STATE_SPEC`` (``owners.join_rows``), the key replicated."""
  plan, mesh = backend.plan, backend.mesh
  state = NamedSharding(mesh, zero.STATE_SPEC)
  bufs = lambda sizes: {k: jax.ShapeDtypeStruct((plan.num_ranks, n), np.dtype(k), sharding=state)
                        for k, n in sizes.items()}
  key = jax.eval_shape(lambda: jax.random.split(jax.random.key(0))[1])
  return pipeline_lib.TrainState(step=0, params=bufs(plan.param_sizes),
                                 opt_state=bufs(plan.opt_sizes),
                                 # abstract on purpose: a ShapeDtypeStruct stands for the key
                                 rng=_abstract(key, NamedSharding(mesh, P())))  # type: ignore[arg-type]


def lower_train(backend: Any, state: pipeline_lib.TrainState, batch: pipeline_lib.Batch) -> Any:
  """The train step lowered for ``state`` / ``batch`` (arrays or ``ShapeDtypeStruct`` s with
  shardings; ``batch`` as this process passes it), reusing the cached per-shape ``_Program``
  (built from shapes if ``train_step`` has not run yet). Allocates nothing."""
  feed = backend._feed  # pylint: disable=protected-access
  inputs, targets = (jax.tree.map(lambda x: _abstract(x, feed), t)
                     for t in backend._global_avals(batch))  # pylint: disable=protected-access
  key = (_shape_key((inputs, targets)), _shape_key(state.rng))
  cached = backend._programs.get(key)  # pylint: disable=protected-access
  prog = cached[0] if cached else backend._build_program(  # pylint: disable=protected-access
      (inputs, targets), state.rng)
  tables = NamedSharding(backend.mesh, P("pp"))
  tabs = {k: _abstract(v, tables) for k, v in backend.plan.tables.arrays().items()}
  return backend._jitted["train"].lower(  # pylint: disable=protected-access
      prog, state.params, state.opt_state, state.rng, np.int32(state.step), inputs, targets, tabs)


def report(backend: Any, batch: pipeline_lib.Batch) -> dict:
  """Per-rank, per-device memory of ``backend``'s train step for ``batch``'s shapes (see the
  module docstring).

  Raises:
    ValueError: a batch the step cannot take (not a pair, leading sizes that differ or do not
      split into ``num_microbatches x dp x fsdp`` pieces), before anything is compiled.
  """
  size = backend._check_batch(batch)  # pylint: disable=protected-access
  m = backend.options.num_microbatches
  one = _example_microbatch(batch, size, m)
  avals = jax.eval_shape(lambda x: backend.model.init(jax.random.key(0), x), one)
  plan = backend._ensure_plan(avals, one)  # pylint: disable=protected-access
  stats = analysis_dict(lower_train(backend, abstract_state(backend), batch).compile()
                        .memory_analysis())
  z = backend.state_shards
  per_device = lambda sizes: sum(n // z * np.dtype(k).itemsize for k, n in sizes.items())
  params_bytes, opt_bytes = per_device(plan.param_sizes), per_device(plan.opt_sizes)
  total = (stats["argument_size_in_bytes"] + stats["output_size_in_bytes"]
           - stats["alias_size_in_bytes"] + stats["temp_size_in_bytes"])
  ranks = []
  for r in range(plan.num_ranks):
    ranks.append({"stages": list(plan.rank_stages(r)), "programs": {"train_step": dict(stats)},
                  "devices": len(plan.layout.rank_devices(r)), "params_bytes": params_bytes,
                  "opt_state_bytes": opt_bytes, "grad_acc_bytes": 0,
                  "state_bytes": params_bytes + opt_bytes, "call_peak_bytes": 0,
                  "max_temp_bytes": stats["temp_size_in_bytes"], "total_bytes": total})
  dp, fsdp, tp = (int(s) for s in backend._inner)  # pylint: disable=protected-access
  return {"ranks": ranks, "sub_mesh": {"dp": dp, "fsdp": fsdp, "tp": tp},
          "schedule": getattr(plan.layout.schedule, "name", str(plan.layout.schedule)),
          "num_microbatches": m}


def layout_report(backend: Any, batch: pipeline_lib.Batch, rng: jax.Array | None) -> dict:
  """``SpmdBackend.layout_report``: bytes of the padded layout for this batch shape."""
  backend._check_batch(batch)  # pylint: disable=protected-access
  plan = backend.plan
  prog, _ = backend._program(  # pylint: disable=protected-access
      backend._global_avals(batch),  # pylint: disable=protected-access
      jax.random.key(0) if rng is None else rng)
  nbytes = lambda avals: sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in avals)
  sized = lambda sizes: sum(n * jnp.dtype(k).itemsize for k, n in sizes.items())
  tables = plan.tables
  return {
      "param_bytes": [sum(nbytes(plan.stage_layouts[s].avals) for s in plan.rank_stages(r))
                      for r in range(plan.num_ranks)],
      "opt_bytes": [nbytes(lay.avals) for lay in plan.opt_layouts],
      "stash_bytes": [nbytes(b.layout.avals) for b in prog.backward],
      "boundary_bytes": [c.nbytes for c in prog.act_codecs],
      "param_buffer_bytes": sized(plan.param_sizes),
      "opt_buffer_bytes": sized(plan.opt_sizes),
      "stash_row_bytes": sized(pack.padded_sizes([b.layout for b in prog.backward])),
      "stash_slot_bytes": [sized(st) for st in prog.stash_strides],
      "stash_buffer_bytes": sized(prog.stash_sizes),
      "stash_slots": tables.num_stash,
      "per_rank_peak_stash": list(tables.stash_peak),
      "payload_bytes": prog.payload_bytes,
      "act_slots": tables.num_act,
      "cot_slots": tables.num_cot,
  }
