r"""Real pipelining on a small CPU machine: MPMD across processes pinned to one core each.

Usage::

  python benchmarks/pinned_bench.py                   # writes benchmarks/results/pinned.json
  python benchmarks/pinned_bench.py --schedules 1f1b,zbv --steps 8 --out /tmp/pinned.json

Model and batch (issue #6): GPT d_model 256, 8 blocks, 4 heads, seq 64, vocab 256, batch 32,
AdamW, fp32. Rows, all measured in this one run, one after the other:

- ``1 proc, core 0``: one process pinned to one core (``taskset -c 0``, one XLA thread) running
  the whole model on one device (``backend="single"``) with the whole batch at once (m=1) and with
  the pipeline's 8 microbatches (m=8, gradient accumulation).
- ``1 proc, 2 cores``: one unpinned process, XLA's default threading over both cores, the whole
  model on one device (m=1 and m=8).
- ``mpmd 1 proc, core 0, 2 devices``: a control: the same 2-rank MPMD pipeline (1F1B) in one
  process pinned to one core, so its stage programs run without any overlap.
- ``mpmd 2 procs, cores 0+1``: two processes (``launch/local.py --pin``), one device and one XLA
  thread each, ``backend="mpmd"`` with 2 ranks and m=8, one row per schedule.

Each row is a fresh set of processes: ``--warmup`` steps (compilation included) and then
``--steps`` timed steps, each ended by reading the loss (which blocks on the whole step). The
median step time is reported; speedups are the reference median divided by the row's median.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "pinned.json"
_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
MODEL = dict(vocab_size=256, seq_len=64, d_model=256, n_layers=8, n_heads=4)
BATCH, MICROBATCHES = 32, 8


# -- worker (one process of one row) ---------------------------------------------------------------


def _worker(args: argparse.Namespace) -> None:
  """Times ``train_step`` of one row in this process (one of several for MPMD rows)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", args.devices or 1)
  from hkpipe._src import distributed  # pylint: disable=g-import-not-at-top
  if args.coordinator_address:
    distributed.initialize(distributed.DistributedConfig(
        coordinator_address=args.coordinator_address, num_processes=args.num_processes,
        process_id=args.process_id))
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import hkpipe  # pylint: disable=g-import-not-at-top
  from hkpipe import models  # pylint: disable=g-import-not-at-top

  model = models.build(models.GPTConfig(**MODEL))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, MODEL["vocab_size"], (BATCH, MODEL["seq_len"] + 1), dtype=np.int32)
  batch = (tokens[:, :-1], tokens[:, 1:])
  opts: dict = {"num_microbatches": args.microbatches}
  if args.backend == "mpmd":
    opts.update(devices=jax.devices(), num_ranks=args.ranks, schedule=args.schedule,
                partition="flops")
    if args.virtual_stages:
      opts["virtual_stages"] = args.virtual_stages
  pipe = hkpipe.Pipeline(model, optax.adamw(1e-3), backend=args.backend, **opts)
  state = pipe.init(jax.random.key(0), batch)
  times, losses = [], []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    state, metrics = pipe.train_step(state, batch)
    losses.append(float(metrics["loss"]))
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  if jax.process_index() == 0:
    stages = None
    layout = pipe.layout
    if layout is not None:
      stages = [list(s.layer_names) for s in layout.stages]
    pathlib.Path(args.result).write_text(json.dumps(
        {"times_s": times, "losses": losses, "stages": stages,
         "affinity": sorted(os.sched_getaffinity(0))}))


# -- orchestrator ----------------------------------------------------------------------------------


def _worker_flags(args: argparse.Namespace, result: str, backend: str, microbatches: int,
                  schedule: str = "", ranks: int = 1, virtual: int = 0) -> list[str]:
  return [f"--result={result}", f"--backend={backend}", f"--microbatches={microbatches}",
          f"--schedule={schedule}", f"--ranks={ranks}", f"--virtual_stages={virtual}",
          f"--warmup={args.warmup}", f"--steps={args.steps}"]


def _run_row(cmd: list[str], env: dict, result: str, timeout: float) -> dict:
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                        check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"row failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  out = json.loads(pathlib.Path(result).read_text())
  out["wall_s"] = time.time() - t0
  out["median_ms"] = 1000 * statistics.median(out["times_s"])
  out["min_ms"] = 1000 * min(out["times_s"])
  return out


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--schedules", default="gpipe,1f1b,interleaved_1f1b,zb_h1,zbv,dualpipev")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--timeout", type=float, default=600, help="seconds per row")
  parser.add_argument("--out", default=str(RESULTS))
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  for name, kind in (("result", str), ("backend", str), ("microbatches", int), ("schedule", str),
                     ("ranks", int), ("virtual_stages", int), ("coordinator_address", str),
                     ("num_processes", int), ("process_id", int), ("host_devices", int),
                     ("devices", int)):
    parser.add_argument(f"--{name}", type=kind, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    _worker(args)
    return
  if (os.cpu_count() or 1) < 2:
    raise SystemExit("This benchmark needs at least 2 cores (one per pipeline process).")

  base_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  one_thread_env = dict(base_env, XLA_FLAGS=_ONE_THREAD)
  me = [sys.executable, "-u", str(pathlib.Path(__file__).resolve()), "--worker"]
  rows = []
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    def row(label: str, kind: str, cmd: list[str], env: dict, result: str, **info) -> None:
      print(f"[pinned_bench] {label} ...", flush=True)
      out = _run_row(cmd, env, result, args.timeout)
      out.update(label=label, kind=kind, **info)
      rows.append(out)
      print(f"[pinned_bench] {label}: median {out['median_ms']:.1f} ms, min {out['min_ms']:.1f} "
            f"ms, loss after step 1 {out['losses'][0]:.5f} ({out['wall_s']:.0f} s)", flush=True)

    for m in (1, MICROBATCHES):
      result = os.path.join(tmp, f"pinned_m{m}.json")
      row(f"1 proc, core 0, m={m}", "pinned",
          ["taskset", "-c", "0", *me, *_worker_flags(args, result, "single", m)],
          one_thread_env, result, microbatches=m)
    for m in (1, MICROBATCHES):
      result = os.path.join(tmp, f"unpinned_m{m}.json")
      row(f"1 proc, 2 cores, m={m}", "unpinned", [*me, *_worker_flags(args, result, "single", m)],
          base_env, result, microbatches=m)
    # Control: the same 2-rank MPMD pipeline (1F1B) in one process on one core, two simulated
    # devices: the per-stage programs without any overlap.
    result = os.path.join(tmp, "mpmd_one_core.json")
    row("mpmd 1 proc, core 0, 2 devices, 1f1b", "control",
        ["taskset", "-c", "0", *me, "--devices=2",
         *_worker_flags(args, result, "mpmd", MICROBATCHES, "1f1b", 2)],
        one_thread_env, result, schedule="1f1b", microbatches=MICROBATCHES)
    for schedule in [s for s in args.schedules.split(",") if s]:
      virtual = 2 if schedule in ("interleaved_1f1b", "zbv", "dualpipev") else 0
      result = os.path.join(tmp, f"mpmd_{schedule}.json")
      # launch/local.py drops XLA_FLAGS from the environment, so the workers' one-thread flags
      # travel in HKPIPE_WORKER_XLA_FLAGS (copied into XLA_FLAGS before JAX starts).
      cmd = [sys.executable, "launch/local.py", "2", "--pin", "--devices_per_process=1",
             f"--timeout={args.timeout}", f"--script={me[2]}", "--", "--worker",
             *_worker_flags(args, result, "mpmd", MICROBATCHES, schedule, 2, virtual)]
      row(f"mpmd 2 procs, cores 0+1, {schedule}", "mpmd", cmd,
          dict(base_env, HKPIPE_WORKER_XLA_FLAGS=_ONE_THREAD), result, schedule=schedule,
          microbatches=MICROBATCHES, virtual_stages=virtual or 1)
  load_after = os.getloadavg()

  ref = {r["label"]: r["median_ms"] for r in rows if r["kind"] in ("pinned", "unpinned")}
  pinned_best = min(v for k, v in ref.items() if k.startswith("1 proc, core 0"))
  free_best = min(v for k, v in ref.items() if k.startswith("1 proc, 2 cores"))
  for r in rows:
    r["speedup_vs_1core"] = pinned_best / r["median_ms"]
    r["speedup_vs_2core_process"] = free_best / r["median_ms"]
  record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "cpus": os.cpu_count(), "model": MODEL,
            "batch": BATCH, "microbatches": MICROBATCHES, "warmup": args.warmup,
            "steps": args.steps, "load_average_before": load_before,
            "load_average_after": load_after, "rows": rows}
  import jax  # pylint: disable=g-import-not-at-top
  record["jax"] = jax.__version__
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(record, indent=1))
  print(f"\nGPT {MODEL}, batch {BATCH}; speedups against the fastest 1-core row "
        f"({pinned_best:.1f} ms) and the fastest 2-core one-process row ({free_best:.1f} ms)\n")
  print("| row | step median (ms) | step min (ms) | speedup vs 1 core | vs 1 process on 2 cores "
        "| loss after step 1 |")
  print("|---|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['label']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
          f"{r['speedup_vs_1core']:.2f}x | {r['speedup_vs_2core_process']:.2f}x | "
          f"{r['losses'][0]:.5f} |")
  print(f"\nload average before {load_before}, after {load_after}; wrote {args.out}")


if __name__ == "__main__":
  if "--worker" in sys.argv and os.environ.get("HKPIPE_WORKER_XLA_FLAGS"):
    os.environ["XLA_FLAGS"] = os.environ["HKPIPE_WORKER_XLA_FLAGS"]
  sys.path.insert(0, str(ROOT))
  main(sys.argv[1:])
