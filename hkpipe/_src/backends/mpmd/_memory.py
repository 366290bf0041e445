"""Per-rank memory of an MPMD pipeline from its compiled programs, without allocating anything.

``report(backend, batch)`` builds the pipeline's setup for ``batch``'s shapes (arrays or
``jax.ShapeDtypeStruct`` s), compiles the train-step programs for abstract state (parameter and
optimizer shapes from ``jax.eval_shape``) and reads, per rank and per device:

- ``state_bytes``: the shards of the stage's parameters, optimizer state and gradient
  accumulators on one device (from their shardings);
- ``call_peak_bytes``: the most bytes one train step holds at once besides that state
  (activations, stashed residuals, messages), from the instruction program's liveness pass,
  divided evenly over the rank's devices;
- ``programs``: XLA's ``memory_analysis()`` of every compiled program of the rank (argument,
  output, alias and temporary bytes per device), and ``max_temp_bytes``, their largest temp;
- ``total_bytes``: ``state_bytes + call_peak_bytes + max_temp_bytes``, an upper estimate of the
  rank's peak per device.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from hkpipe._src import pipeline as pipeline_lib


def _device_bytes(shape: Any, dtype: Any, sharding: Any) -> int:
  return int(np.prod(sharding.shard_shape(tuple(shape)), dtype=np.int64)) * np.dtype(
      dtype).itemsize


def _analysis(program: Any) -> dict[str, int]:
  a = program.fn.memory_analysis()
  return {k: int(getattr(a, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                          "alias_size_in_bytes", "temp_size_in_bytes")}


def report(backend: Any, batch: pipeline_lib.Batch) -> dict:
  """Per-rank memory of ``backend``'s train step for ``batch``'s shapes (see module docstring).

  Compiles the train-step programs (into the backend's program cache) but allocates no
  parameters, optimizer state or batch; with ``jax.ShapeDtypeStruct`` batch leaves it needs
  only the devices' descriptions, so a big model can be planned on simulated CPU devices.
  """
  setup = backend._setup(batch)  # pylint: disable=protected-access
  rng: Any = jax.eval_shape(lambda: jax.random.key(0))   # abstract: nothing allocated
  opt_state = []
  for s, f in enumerate(setup.fns):
    shapes = jax.eval_shape(backend.optimizer.init, setup.stage_dict(s, f.p_leaves))
    opt_state.append(shapes)
  state = pipeline_lib.TrainState(step=0, params=None, opt_state=tuple(opt_state), rng=rng)
  family = backend._train_family(setup, state, with_update=True)  # pylint: disable=protected-access
  programs, liveness = family.programs, family.bound.liveness
  per_rank: list[dict] = [{"stages": [], "programs": {}} for _ in range(setup.num_ranks)]
  for s, f in enumerate(setup.fns):
    r = setup.rank_of[s]
    if r not in setup.owned:
      continue
    out = per_rank[r]
    out["stages"].append(s)
    p_bytes = sum(_device_bytes(a.shape, a.dtype, sh) for a, sh in zip(f.p_leaves, setup.psh[s]))
    o_bytes = sum(_device_bytes(a.shape, a.dtype, sh) for a, sh in
                  zip(jax.tree.leaves(opt_state[s]), setup.opt_shardings(s)))
    out["params_bytes"] = out.get("params_bytes", 0) + p_bytes
    out["opt_state_bytes"] = out.get("opt_state_bytes", 0) + o_bytes
    out["grad_acc_bytes"] = out.get("grad_acc_bytes", 0) + p_bytes
    named = dict(programs["stages"][s])
    for key in ("updates", "finalize"):
      if programs.get(key) and programs[key][s] is not None:
        named[key] = programs[key][s]
    for name, prog in named.items():
      out["programs"][f"stage{s}/{name}"] = _analysis(prog)
  for r, out in enumerate(per_rank):
    if not out["stages"]:
      continue
    n = len(setup.rank_devices(r))
    out["devices"] = n
    out["state_bytes"] = out["params_bytes"] + out["opt_state_bytes"] + out["grad_acc_bytes"]
    out["call_peak_bytes"] = int(liveness.peak_bytes[r] // n) if liveness.peak_bytes else 0
    out["max_temp_bytes"] = max(p["temp_size_in_bytes"] for p in out["programs"].values())
    out["total_bytes"] = out["state_bytes"] + out["call_peak_bytes"] + out["max_temp_bytes"]
  return {"ranks": per_rank, "sub_mesh": dict(zip(("dp", "fsdp", "tp"),
                                                  setup.layout.sub_mesh_shape)),
          "schedule": getattr(setup.schedule, "name", str(setup.schedule)),
          "num_microbatches": setup.m}
