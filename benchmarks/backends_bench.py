"""Step time and compile time of every backend on the same GPT, measured in one run.

Usage::

  python benchmarks/backends_bench.py                 # writes benchmarks/results/backends.json
  python benchmarks/backends_bench.py --steps 5 --out /tmp/b.json

Model and data: GPT (d_model 256, 8 layers, 4 heads, byte vocabulary 256, seq 64), batch 32 of
random tokens, 8 microbatches, AdamW, fp32. Rows: single device; pmap (dp=2); spmd (pp=2) and
(pp=2, dp=2); mpmd (pp=2) and (pp=2, dp=2); pipelined rows use the 1F1B schedule.

What is measured, per row, in this one process on simulated CPU devices (4 of them):

- ``first_step_s``: wall time of the first ``train_step`` (tracing + compilation + one step);
- ``compile_s``: ``first_step_s - step_median_s`` (the first step's overhead over a warm step);
- ``step_median_s`` / ``step_min_s``: over ``--steps`` warm steps, each timed to completion;
- ``loss_step1``: the first step's loss (all rows must agree: same model, data and init).

Plus ``spmd_memory``: for spmd (pp=2) with GPipe and with 1F1B, XLA's memory analysis of the
compiled train program (per device) and the backend's padded-layout report
(``SpmdBackend.layout_report``), which docs/backends.md quotes.

Caveat (see ``shared/notes/anchors.md``): simulated CPU devices in one process share the same
cores, so pipeline and data parallelism cannot run faster than one device here; the numbers
measure each backend's overhead, not its speedup on real accelerators.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import optax  # noqa: E402

import hkpipe  # noqa: E402
from hkpipe import models  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "backends.json"


def _config() -> models.GPTConfig:
  return models.GPTConfig(vocab_size=256, seq_len=64, d_model=256, n_layers=8, n_heads=4)


def _batch(batch_size: int, seq: int, vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch_size, seq + 1), dtype=np.int32)
  return tokens[:, :-1], tokens[:, 1:]


def _rows(devices: list[Any]) -> list[tuple[str, str, Callable[[], dict]]]:
  """(backend, layout, options factory) for every row of the table."""
  two, four = devices[:2], devices[:4]
  mesh = lambda: jax.make_mesh((2, 2), ("pp", "dp"), devices=four)
  return [
      ("single", "1 device", lambda: {"devices": devices[:1]}),
      ("pmap", "dp=2", lambda: {"devices": two}),
      ("spmd", "pp=2", lambda: {"devices": two, "schedule": "1f1b"}),
      ("spmd", "pp=2, dp=2", lambda: {"mesh": mesh(), "schedule": "1f1b"}),
      ("mpmd", "pp=2", lambda: {"devices": two, "schedule": "1f1b"}),
      ("mpmd", "pp=2, dp=2", lambda: {"mesh": mesh(), "schedule": "1f1b"}),
  ]


def _importable(backend: str) -> str | None:
  """None if the backend's module imports, else the reason."""
  try:
    importlib.import_module(f"hkpipe._src.backends.{backend}")
  except ImportError as e:  # the backend module is not there (yet)
    return f"{type(e).__name__}: {e}"
  return None


def _measure(model, batch, backend: str, options: dict, m: int, steps: int) -> dict:
  """Times init, the first step and ``steps`` warm steps of one configuration."""
  load_before = os.getloadavg()[0]
  pipe = hkpipe.Pipeline(model, optax.adamw(3e-4), backend=backend, num_microbatches=m,
                         **options)
  t0 = time.perf_counter()
  state = pipe.init(jax.random.key(0), batch)
  jax.block_until_ready(jax.tree.leaves(state.params))
  init_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, metrics = pipe.train_step(state, batch)
  loss1 = float(metrics["loss"])  # blocks
  first = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = pipe.train_step(state, batch)
    jax.block_until_ready(metrics)
    jax.block_until_ready(jax.tree.leaves(state.params))
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  return {"init_s": init_s, "first_step_s": first, "compile_s": first - median,
          "step_median_s": median, "step_min_s": min(times), "step_times_s": times,
          "loss_step1": loss1, "loss_last": float(metrics["loss"]),
          "loadavg_1min": [load_before, os.getloadavg()[0]]}


def _spmd_memory(model, batch, m: int, devices: list[Any]) -> dict:
  """Compiled-program memory and padded-layout bytes of spmd (pp=2), GPipe vs 1F1B."""
  out = {}
  for schedule in ("gpipe", "1f1b"):
    pipe = hkpipe.Pipeline(model, optax.adamw(3e-4), backend="spmd", num_microbatches=m,
                           schedule=schedule, devices=devices[:2])
    state = pipe.init(jax.random.key(0), batch)
    analysis = pipe.memory_analysis(state, batch)
    out[schedule] = {
        "xla_per_device": {k: int(getattr(analysis, k)) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes")},
        "layout": pipe.layout_report(batch),
    }
  return out


def markdown(result: dict) -> str:
  """The measured rows as a markdown table (plus skipped rows, if any)."""
  lines = ["| backend | layout | step median (ms) | step min (ms) | first step (s) | "
           "compile (s) | loss after step 1 | load avg (start, end) |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
  for r in result["rows"]:
    load = ", ".join(f"{x:.1f}" for x in r.get("loadavg_1min", []))
    lines.append(f"| {r['backend']} | {r['layout']} | {1e3 * r['step_median_s']:.0f} | "
                 f"{1e3 * r['step_min_s']:.0f} | {r['first_step_s']:.1f} | {r['compile_s']:.1f} | "
                 f"{r['loss_step1']:.5f} | {load} |")
  for s in result["skipped"]:
    lines.append(f"| {s['backend']} | {s['layout']} | skipped: {s['reason']} | | | | | |")
  memory = result.get("spmd_memory")
  if memory:
    mb = lambda b: f"{b / 2**20:.1f}"
    lines += ["", "| spmd pp=2 | XLA temp per device (MiB) | stash slots | stash row (MiB) | "
              "per-rank peak stash |", "|---|---:|---:|---:|---|"]
    for name, rec in memory.items():
      lay = rec["layout"]
      lines.append(f"| {name} | {mb(rec['xla_per_device']['temp_size_in_bytes'])} | "
                   f"{lay['stash_slots']} | {mb(lay['stash_row_bytes'])} | "
                   f"{lay['per_rank_peak_stash']} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=10, help="timed warm steps per row")
  parser.add_argument("--microbatches", type=int, default=8)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--only", default="", help="comma-separated backends to run (default all)")
  parser.add_argument("--out", default=str(RESULTS), help="JSON output path")
  args = parser.parse_args(argv)

  devices = jax.devices()
  if len(devices) < 4:
    raise SystemExit(f"Needs 4 devices, found {len(devices)}; set XLA_FLAGS="
                     "--xla_force_host_platform_device_count=4.")
  config = _config()
  model = models.build(config)
  batch = _batch(args.batch, config.seq_len, config.vocab_size)
  only = set(filter(None, args.only.split(",")))
  result: dict[str, Any] = {
      "what": "train_step wall time per backend, GPT d256 L8 seq64 batch32, AdamW, fp32",
      "config": {"model": {"d_model": config.d_model, "n_layers": config.n_layers,
                           "n_heads": config.n_heads, "vocab_size": config.vocab_size,
                           "seq_len": config.seq_len},
                 "batch": args.batch, "num_microbatches": args.microbatches,
                 "timed_steps": args.steps, "schedule": "1f1b"},
      "environment": {"jax": jax.__version__, "python": platform.python_version(),
                      "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
                      "devices": [str(d) for d in devices[:4]],
                      "loadavg_start": list(os.getloadavg()),
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat()},
      "rows": [], "skipped": [],
  }
  for backend, layout, options in _rows(devices):
    if only and backend not in only:
      continue
    reason = _importable(backend)
    if reason is not None:
      print(f"SKIP {backend} ({layout}): backend not importable: {reason}", file=sys.stderr)
      result["skipped"].append({"backend": backend, "layout": layout, "reason": reason})
      continue
    print(f"running {backend} ({layout}) ...", file=sys.stderr, flush=True)
    row = _measure(model, batch, backend, options(), args.microbatches, args.steps)
    row.update(backend=backend, layout=layout)
    print(f"  step median {1e3 * row['step_median_s']:.0f} ms, first step "
          f"{row['first_step_s']:.1f} s, loss {row['loss_step1']:.5f}", file=sys.stderr,
          flush=True)
    result["rows"].append(row)
  if (not only or "spmd" in only) and _importable("spmd") is None:
    print("measuring spmd memory (gpipe vs 1f1b, pp=2) ...", file=sys.stderr, flush=True)
    result["spmd_memory"] = _spmd_memory(model, batch, args.microbatches, devices)
  result["environment"]["loadavg_end"] = list(os.getloadavg())
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  table = markdown(result)
  out.with_suffix(".md").write_text(table + "\n")
  print(table)
  return result


if __name__ == "__main__":
  main()
