"""Plans Llama-3 training memory per device with FSDP + TP, without allocating anything.

For each (model, backend, schedule) it builds an MPMD or SPMD pipeline on simulated CPU devices,
calls ``Pipeline.memory_analysis(None, abstract_batch)`` (the programs are compiled for abstract
shapes; no parameter, optimizer state or batch is allocated) and prints one JSON object per
row: per rank, per device, the sharded state (params + AdamW state, + gradient accumulator on
mpmd), the step's peak besides it (activations, stash; mpmd), the largest temporary of any
compiled program, and the total against an 80 GB device. On spmd the step is one program: its
temp holds the gradient accumulator, the rank's gathered state, activations and stash, and the
total is its argument + output - alias + temp bytes.

Usage (each row runs in a fresh subprocess with enough simulated devices)::

    python benchmarks/plan_bench.py --models=8b,70b --schedules=1f1b,zb_h1 > plan.json
    python benchmarks/plan_bench.py --models=8b --backends=spmd   # one backend
    python benchmarks/plan_bench.py --models=tiny        # a smoke run
    python benchmarks/plan_bench.py --models=8b --seq=8192 --no-remat  # other shapes

Each microbatch has one sequence per (dp x fsdp) device group row. Attention materialises its
``[heads, T, T]`` probabilities (no flash attention), so long sequences need ``--remat``
(default: on; each stage's forward is recomputed in its backward and only stage inputs are
stashed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DEVICE_BYTES = 80 * 10**9

# name -> (Llama config kwargs, mesh shape (pp, fsdp, tp), microbatches)
MODELS = {
    "8b": (dict(vocab_size=128256, seq_len=8192, d_model=4096, n_layers=32, n_heads=32,
                n_kv_heads=8, d_ff=14336, rope_theta=500000.0), (4, 2, 2), 8),
    "70b": (dict(vocab_size=128256, seq_len=8192, d_model=8192, n_layers=80, n_heads=64,
                 n_kv_heads=8, d_ff=28672, rope_theta=500000.0), (8, 4, 2), 16),
    "tiny": (dict(vocab_size=256, seq_len=64, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2),
             (2, 2, 2), 4),
}


def _row(model_name: str, schedule: str, backend: str, seq: int, remat: bool) -> dict:
  """One plan, in this process (its XLA_FLAGS must give enough devices)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  import hkpipe  # pylint: disable=g-import-not-at-top

  kwargs, shape, m = MODELS[model_name]
  seq = min(seq, kwargs["seq_len"])
  rows = m * shape[1]                    # one sequence per fsdp device per microbatch
  config = hkpipe.models.LlamaConfig(**kwargs)
  model = hkpipe.models.build(config)
  n = int(np.prod(shape))
  mesh = jax.make_mesh(shape, ("pp", "fsdp", "tp"), devices=jax.devices()[:n])
  pipe = hkpipe.Pipeline(model, optax.adamw(3e-4), backend=backend, mesh=mesh,
                         num_microbatches=m, schedule=schedule, remat=remat,
                         partition=_boundaries(config.n_layers, shape[0]))
  tokens = jax.ShapeDtypeStruct((rows, seq), np.int32)
  t0 = time.perf_counter()
  plan = pipe.memory_analysis(None, (tokens, tokens))
  seconds = time.perf_counter() - t0
  ranks = []
  for r, rank in enumerate(plan["ranks"]):
    ranks.append({k: rank[k] for k in ("stages", "devices", "params_bytes", "opt_state_bytes",
                                       "grad_acc_bytes", "state_bytes", "call_peak_bytes",
                                       "max_temp_bytes", "total_bytes")}
                 | {"rank": r, "temp_bytes_by_program": {
                     name: p["temp_size_in_bytes"] for name, p in rank["programs"].items()}})
  worst = max(r["total_bytes"] for r in ranks)
  stats = pipe.compile_stats  # mpmd's program cache; None on spmd (one jitted step)
  return {"model": f"llama3-{model_name}", "backend": backend, "schedule": schedule,
          "mesh": dict(zip(("pp", "fsdp", "tp"), shape)), "seq_len": seq, "global_batch": rows,
          "num_microbatches": m, "remat": remat, "dtype": "float32 params and compute, AdamW",
          "ranks": ranks,
          "worst_rank_total_bytes": worst, "fits_80GB": worst <= DEVICE_BYTES,
          "plan_seconds": round(seconds, 1),
          "compiled": stats.compiled if stats else 1, "cloned": stats.cloned if stats else 0}


def _boundaries(n_layers: int, pp: int) -> list[int]:
  """Stage starts: embed + first blocks on rank 0, last blocks + head on the last rank, the
  blocks split evenly (layer 0 is the embedding, layer n_layers + 1 the head)."""
  per = n_layers // pp
  return [1 + per * i for i in range(1, pp)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="8b,70b")
  parser.add_argument("--schedules", default="1f1b,zb_h1")
  parser.add_argument("--backends", default="mpmd,spmd")
  parser.add_argument("--seq", type=int, default=4096, help="sequence length (capped by the "
                      "model's)")
  parser.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.row:
    model_name, schedule, backend = args.row.split(":")
    print(json.dumps(_row(model_name, schedule, backend, args.seq, args.remat)))
    return
  for model_name in args.models.split(","):
    shape = MODELS[model_name][1]
    devices = shape[0] * shape[1] * shape[2]
    for backend in args.backends.split(","):
      for schedule in args.schedules.split(","):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={max(devices, 8)}")
        remat = "--remat" if args.remat else "--no-remat"
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__,
                              f"--row={model_name}:{schedule}:{backend}",
                              f"--seq={args.seq}", remat],
                             env=env, capture_output=True, text=True, check=False)
        if out.returncode:
          print(json.dumps({"model": model_name, "backend": backend, "schedule": schedule,
                            "error": out.stderr[-2000:],
                            "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
        else:
          print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
  main()
