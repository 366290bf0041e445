"""Start-up cost: init + first train step of a fresh process, with and without the compile cache.

The model is the anchors' tiny SpectraX comparison model (``mpmd_bench.py``'s "dispatch" case:
GPT vocab 128, seq 32, d 64, 4 layers, batch 16, 8 microbatches) on 4 simulated CPU devices,
MPMD 1F1B over 4 ranks. Each start is a new Python process (what a user restarting a run pays):

- ``off``: no persistent compilation cache (every program compiles);
- ``cold``: the cache on, in an empty folder (compiles and writes the entries);
- ``warm``: a second identical start with the same folder (loads the executables).

Each process reports init and first-step seconds (each waited for with ``block_until_ready``);
the table gives the median over ``--rounds`` starts per mode. SpectraX 0.1.4's first call on
this model (trace + compile + one step) was measured at 3.7-4.5 s on this machine
(``../shared/notes/anchors.md``); compare it with init + first step.

Usage:
  python benchmarks/startup_bench.py [--rounds=3] [--out=benchmarks/results/startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
t_start = time.perf_counter()
import jax
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 4)
cache = sys.argv[1]
if cache != "off":
  import pathlib
  from hkpipe._src import compile_cache
  compile_cache.enable(pathlib.Path(cache))
import numpy as np, optax
import hkpipe
from hkpipe import models
t_imported = time.perf_counter()
model = models.build(models.GPTConfig(vocab_size=128, seq_len=32, d_model=64, n_layers=4,
                                      n_heads=4))
tokens = np.random.default_rng(0).integers(0, 128, (16, 33), dtype=np.int32)
batch = (tokens[:, :-1], tokens[:, 1:])
pipe = hkpipe.Pipeline(model, optax.adamw(1e-3), backend="mpmd", num_ranks=4,
                       schedule="1f1b", num_microbatches=8)
t0 = time.perf_counter()
state = pipe.init(jax.random.key(0), batch)
jax.block_until_ready(state.params)
t1 = time.perf_counter()
state, metrics = pipe.train_step(state, batch)
jax.block_until_ready(metrics)
t2 = time.perf_counter()
print(json.dumps({"import_s": t_imported - t_start, "init_s": t1 - t0, "first_step_s": t2 - t1,
                  "loss": float(metrics["loss"])}))
"""


def start(cache: str) -> dict:
  """One fresh process; returns what it measured."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run([sys.executable, "-c", _CHILD, cache], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "startup.json"))
  args = parser.parse_args(argv)
  if args.rounds < 1:
    parser.error(f"--rounds={args.rounds} must be >= 1")
  runs: dict[str, list[dict]] = {"off": [], "cold": [], "warm": []}
  for _ in range(args.rounds):
    runs["off"].append(start("off"))
    with tempfile.TemporaryDirectory() as folder:
      runs["cold"].append(start(folder))
      runs["warm"].append(start(folder))
  rows = []
  for mode, got in runs.items():
    row = {"mode": mode, "rounds": len(got)}
    for key in ("import_s", "init_s", "first_step_s"):
      row[key] = statistics.median(r[key] for r in got)
    row["init_plus_first_step_s"] = statistics.median(r["init_s"] + r["first_step_s"]
                                                      for r in got)
    row["losses"] = sorted({round(r["loss"], 6) for r in got})
    rows.append(row)
    print(f"{mode:5s}  import {row['import_s']:5.2f} s  init {row['init_s']:5.2f} s  "
          f"first step {row['first_step_s']:5.2f} s  init+first {row['init_plus_first_step_s']:5.2f}"
          f" s  loss {row['losses']}")
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "load": os.getloadavg(),
               "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
