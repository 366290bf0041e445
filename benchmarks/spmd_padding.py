"""SPMD padding: bytes every rank allocates vs the bytes the ranks need, per schedule.

Usage::

  python benchmarks/spmd_padding.py                       # layout bytes only (no compile)
  python benchmarks/spmd_padding.py --compile             # + XLA temp bytes of each train step
  python benchmarks/spmd_padding.py --models bench --schedules 1f1b --pp 4 --compile

Under ``shard_map`` every ``pp`` rank allocates the same shapes, so each buffer is as large as
the largest rank's need. From ``SpmdBackend.layout_report`` (shapes only, nothing allocated):

- state: parameters + gradient accumulator + optimizer state (AdamW).
  needed = sum over ranks of (2 x its params + its optimizer state);
  allocated = pp x (2 x param buffer + optimizer buffer).
- stash (one microbatch's backward residuals, per slot): needed = sum over ranks of (its own peak
  number of stashed forwards x its largest stage's stash); allocated = pp x the stash buffer.
  ``stash_rows_x`` is the previous layout's figure, ``pp x max peak x largest stage's stash`` (one
  row per slot, every row as large as the largest stage), from the same report.

Models: ``bench`` is backends_bench.py's GPT (d 256, 8 blocks, vocab 256, seq 64); ``tiny`` is
issue 12's (d 64, 8 blocks, vocab 4096, seq 32). Batch 32, 8 microbatches.
With ``--compile``: XLA's ``temp_size_in_bytes`` per device of the compiled train step.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import optax  # noqa: E402

import hkpipe  # noqa: E402
from hkpipe import models  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "spmd_padding.json"
MODELS = {
    "bench": models.GPTConfig(vocab_size=256, seq_len=64, d_model=256, n_layers=8, n_heads=4),
    "tiny": models.GPTConfig(vocab_size=4096, seq_len=32, d_model=64, n_layers=8, n_heads=4),
}
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zb_h1", 1), ("zbv", 2),
             ("dualpipev", 2)]


def measure(config: models.GPTConfig, schedule: str, v: int, pp: int, compile_: bool) -> dict:
  """Needed vs allocated bytes of one (model, schedule, pp) from the layout report."""
  model = models.build(config)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (32, config.seq_len),
                                             dtype=np.int32)
  batch = (tokens, tokens)
  pipe = hkpipe.Pipeline(model, optax.adamw(3e-4), backend="spmd", num_microbatches=8,
                         schedule=schedule, virtual_stages=v, devices=jax.devices()[:pp])
  backend = pipe.backend
  one = tokens[:4]
  backend._ensure_plan(jax.eval_shape(model.init, jax.random.key(0), one), one)  # shapes only
  rep = pipe.layout_report(batch)
  ranks = [backend.plan.rank_stages(r) for r in range(pp)]
  state_need = sum(2 * p + o for p, o in zip(rep["param_bytes"], rep["opt_bytes"]))
  state_alloc = pp * (2 * rep["param_buffer_bytes"] + rep["opt_buffer_bytes"])
  stash_need = sum(n * max(rep["stash_bytes"][s] for s in stages)
                   for n, stages in zip(rep["per_rank_peak_stash"], ranks))
  stash_alloc = pp * rep["stash_buffer_bytes"]
  stash_rows = pp * rep["stash_slots"] * rep["stash_row_bytes"]
  out = {"state_need": state_need, "state_alloc": state_alloc, "stash_need": stash_need,
         "stash_alloc": stash_alloc, "stash_rows_alloc": stash_rows,
         "state_x": state_alloc / state_need, "stash_x": stash_alloc / stash_need,
         "stash_rows_x": stash_rows / stash_need,
         "total_x": (state_alloc + stash_alloc) / (state_need + stash_need),
         "total_rows_x": (state_alloc + stash_rows) / (state_need + stash_need),
         "param_bytes": rep["param_bytes"], "stash_bytes": rep["stash_bytes"],
         "per_rank_peak_stash": rep["per_rank_peak_stash"]}
  if compile_:
    state = pipe.init(jax.random.key(0), batch)
    out["xla_temp_per_device"] = int(pipe.memory_analysis(state, batch).temp_size_in_bytes)
  return out


def markdown(rows: list[dict]) -> str:
  lines = ["| model | schedule | pp | state alloc/need | stash alloc/need (before: rows) | "
           "total alloc/need (before) | per-rank params (KiB) | per-rank peak stash |",
           "|---|---|---:|---:|---:|---:|---|---|"]
  for r in rows:
    kib = ", ".join(str(b // 1024) for b in r["param_bytes"])
    lines.append(f"| {r['model']} | {r['schedule']} | {r['pp']} | {r['state_x']:.2f}x | "
                 f"{r['stash_x']:.2f}x ({r['stash_rows_x']:.2f}x) | {r['total_x']:.2f}x "
                 f"({r['total_rows_x']:.2f}x) | {kib} | {r['per_rank_peak_stash']} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--compile", action="store_true", help="also compile each train step")
  parser.add_argument("--models", default="bench,tiny")
  parser.add_argument("--schedules", default=",".join(n for n, _ in SCHEDULES))
  parser.add_argument("--pp", default="2,4")
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args(argv)
  rows = []
  for name in args.models.split(","):
    for schedule, v in SCHEDULES:
      if schedule not in args.schedules.split(","):
        continue
      for pp in [int(p) for p in args.pp.split(",")]:
        row = measure(MODELS[name], schedule, v, pp, args.compile)
        row.update(model=name, schedule=schedule, pp=pp)
        rows.append(row)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(rows, indent=2) + "\n")
  print(markdown(rows))
  for r in rows:
    if "xla_temp_per_device" in r:
      print(f"{r['model']} {r['schedule']} pp={r['pp']}: XLA temp per device "
            f"{r['xla_temp_per_device'] / 2**20:.1f} MiB")
  return rows


if __name__ == "__main__":
  main()
