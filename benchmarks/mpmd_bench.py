"""MPMD backend overhead: step time, first-step (compile) time and stashed activations.

Usage::

  python benchmarks/mpmd_bench.py                      # writes benchmarks/results/mpmd.json
  python benchmarks/mpmd_bench.py --rounds 3 --out /tmp/mpmd.json

Everything is measured in this one run, in one process with 4 simulated CPU devices. Each device
computes with one thread (``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``,
see ``shared/notes/environment.md``); the single-device reference runs under the same flags.
``--multi-thread`` drops those flags.

1. Dispatch-bound: GPT (d_model 64, 4 blocks, 4 heads, seq 32, vocab 128), batch 16, 8
   microbatches, AdamW; 4 stages on 4 devices with 1F1B and GPipe, against the single-device
   jitted step of the same model and batch. Target: MPMD <= 1.3x single.
2. Compute-bound: GPT (d_model 256, 8 blocks, 4 heads, seq 64, vocab 256), batch 32, 8
   microbatches, AdamW; 2 stages on 2 devices with 1F1B and GPipe. Target: MPMD <= 1.1x single.
3. Compile: first-step time (``train_step`` on a fresh pipeline: tracing + compilation + one step,
   and ``init``) of each row. Target: MPMD <= 1.5x single.
4. Memory: for every registered schedule (4 ranks, 8 microbatches, the case-1 model with 6 blocks
   so that 8-stage schedules fit), the most (stage, microbatch) residual stashes the driver held
   at once per rank, measured while the step runs (``record_timeline=True``), against
   ``hkpipe.schedules.peak_activations``; plus the bytes those stashes held at that moment.

Warm step times are measured in interleaved rounds (each round times ``--steps`` steps of every
row in turn), so background load on the shared machine hits all rows alike; medians and minima
over all rounds are reported, along with the load average before and after. "Dispatch" is the
wall time ``train_step`` takes to return (the host issuing the step; the devices' threads compete
with it for the cores), "dispatch CPU" the CPU time of the calling thread meanwhile
(``time.thread_time``), which other processes' load inflates far less.

Caveat (``shared/notes/anchors.md``): simulated devices in one process share the machine's cores,
so pipelining cannot beat one device here; these numbers measure the MPMD driver's overhead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any

_SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()
if "--multi-thread" not in sys.argv and "multi_thread_eigen" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + _SINGLE_THREAD
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import optax  # noqa: E402

import hkpipe  # noqa: E402
from hkpipe import models  # noqa: E402
from hkpipe import schedules  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "mpmd.json"

CASES = {
    "dispatch": dict(config=dict(vocab_size=128, seq_len=32, d_model=64, n_layers=4, n_heads=4),
                     batch=16, ranks=4, target=1.3),
    "compute": dict(config=dict(vocab_size=256, seq_len=64, d_model=256, n_layers=8, n_heads=4),
                    batch=32, ranks=2, target=1.1),
}
M = 8
COMPILE_TARGET = 1.5


def _batch(batch_size: int, seq: int, vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch_size, seq + 1), dtype=np.int32)
  return tokens[:, :-1], tokens[:, 1:]


class Row:
  """One pipeline being measured: its first step on construction, then warm steps on demand."""

  def __init__(self, label: str, model, batch, **options):
    self.label = label
    self.batch = batch
    self.pipe = hkpipe.Pipeline(model, optax.adamw(1e-3), num_microbatches=M, **options)
    t0 = time.perf_counter()
    self.state = self.pipe.init(jax.random.key(0), batch)
    jax.block_until_ready(self.state.params)
    self.init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    self.state, metrics = self.pipe.train_step(self.state, batch)
    jax.block_until_ready(metrics)
    self.first_step_s = time.perf_counter() - t0
    self.loss_step1 = float(metrics["loss"])
    self.steps: list[float] = []
    self.dispatch: list[float] = []
    self.dispatch_cpu: list[float] = []
    for _ in range(2):                                      # warm-up
      self.state, metrics = self.pipe.train_step(self.state, batch)
    jax.block_until_ready(metrics)

  def measure(self, steps: int) -> None:
    for _ in range(steps):
      t0, c0 = time.perf_counter(), time.thread_time()
      self.state, metrics = self.pipe.train_step(self.state, self.batch)
      t1, c1 = time.perf_counter(), time.thread_time()
      jax.block_until_ready(metrics)
      self.steps.append(time.perf_counter() - t0)
      self.dispatch.append(t1 - t0)
      self.dispatch_cpu.append(c1 - c0)

  def summary(self) -> dict[str, Any]:
    out = dict(label=self.label, init_s=self.init_s, first_step_s=self.first_step_s,
               step_median_s=statistics.median(self.steps), step_min_s=min(self.steps),
               dispatch_median_s=statistics.median(self.dispatch),
               dispatch_cpu_median_s=statistics.median(self.dispatch_cpu),
               loss_step1=self.loss_step1,
               n_steps=len(self.steps))
    s = getattr(self.pipe, "compile_stats", None)
    if s is None and getattr(self.pipe.backend, "cache", None) is not None:
      s = self.pipe.backend.cache.stats       # checkouts before Pipeline.compile_stats
    if s is not None:
      out.update(xla_compiles=s.compiled, clones=s.cloned, traced=s.traced,
                 trace_s=s.trace_s, compile_s=s.compile_s, clone_s=s.clone_s)
    return out


def speed_case(name: str, spec: dict, rounds: int, steps: int) -> dict[str, Any]:
  """Cases 1-3: single device vs MPMD (1F1B, GPipe) on one model, first steps and warm steps."""
  config = models.GPTConfig(**spec["config"])
  model = models.build(config)
  batch = _batch(spec["batch"], config.seq_len, config.vocab_size)
  devices = jax.devices()[:spec["ranks"]]
  rows = [Row("single", model, batch, backend="single", devices=devices[:1])]
  for sched in ("1f1b", "gpipe"):
    rows.append(Row(f"mpmd {sched}", model, batch, backend="mpmd", schedule=sched,
                    devices=devices))
  for _ in range(rounds):
    for row in rows:
      row.measure(steps)
  out = [row.summary() for row in rows]
  single = out[0]
  for row in out[1:]:
    row["step_ratio"] = row["step_median_s"] / single["step_median_s"]
    row["step_min_ratio"] = row["step_min_s"] / single["step_min_s"]
    row["first_step_ratio"] = row["first_step_s"] / single["first_step_s"]
    row["init_plus_first_step_ratio"] = ((row["init_s"] + row["first_step_s"]) /
                                         (single["init_s"] + single["first_step_s"]))
  pipe = rows[1].pipe
  stages = (pipe.layout if hasattr(pipe, "layout") else pipe.backend.layout).stages
  return dict(case=name, config=spec["config"], batch=spec["batch"], microbatches=M,
              ranks=spec["ranks"], params=hkpipe.count_params(rows[0].pipe.params(rows[0].state),
                                                              model.ties),
              stages=[list(s.layer_names) for s in stages], step_target=spec["target"],
              compile_target=COMPILE_TARGET, rows=out)


def memory_case() -> list[dict[str, Any]]:
  """Case 4: the program's stash peaks per rank vs the simulator, and its predicted bytes vs the
  live device bytes measured after every instruction, for every registered schedule.

  The case-1 model with 6 blocks (8 layers), so that V and interleaved schedules (8 stages on 4
  ranks) get one layer per stage.
  """
  spec = CASES["dispatch"]
  config = models.GPTConfig(**dict(spec["config"], n_layers=6))
  model = models.build(config)
  batch = _batch(spec["batch"], config.seq_len, config.vocab_size)
  out = []
  for name in schedules.names():
    pipe = hkpipe.Pipeline(model, optax.adamw(1e-3), backend="mpmd", num_microbatches=M,
                           schedule=name, devices=jax.devices()[:spec["ranks"]],
                           virtual_stages=2 if name == "interleaved_1f1b" else None,
                           record_timeline=True)
    state = pipe.init(jax.random.key(0), batch)
    pipe.train_step(state, batch)
    sched = pipe.layout.schedule
    simulated = schedules.peak_activations(sched)
    liveness = pipe.last_stash_peaks      # the program's liveness pass, before the step ran
    out.append(dict(schedule=name, stages=sched.num_stages, measured=list(liveness),
                    simulated=list(simulated), equal=tuple(liveness) == tuple(simulated),
                    peak_bytes=list(pipe.last_stash_peak_bytes),
                    bytes_equal=pipe.last_measured_bytes == pipe.last_predicted_bytes))
  return out


def _md_speed(case: dict[str, Any]) -> str:
  lines = [f"**{case['case']}** ({case['params']:,} params, batch {case['batch']}, "
           f"{case['microbatches']} microbatches, {case['ranks']} ranks; stages "
           f"{case['stages']})", "",
           "| row | step median (ms) | step min (ms) | dispatch (ms) | dispatch CPU (ms) | "
           "ratio (median) | init (s) | first step (s) | first-step ratio | "
           "XLA compiles / clones |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in case["rows"]:
    ratio = f"{r['step_ratio']:.2f}x" if "step_ratio" in r else "1"
    fratio = f"{r['first_step_ratio']:.2f}x" if "first_step_ratio" in r else "1"
    comp = f"{r['xla_compiles']} / {r['clones']}" if "xla_compiles" in r else "-"
    lines.append(f"| {r['label']} | {r['step_median_s'] * 1e3:.1f} | {r['step_min_s'] * 1e3:.1f} "
                 f"| {r['dispatch_median_s'] * 1e3:.1f} | {r['dispatch_cpu_median_s'] * 1e3:.1f} "
                 f"| {ratio} | {r['init_s']:.2f} | "
                 f"{r['first_step_s']:.2f} | {fratio} | {comp} |")
  return "\n".join(lines)


def _md_memory(rows: list[dict[str, Any]]) -> str:
  lines = ["| schedule | stages | program's peak stashes per rank | simulator | equal | "
           "measured peak MiB per rank | measured bytes = predicted, every instruction |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    mib = ", ".join(f"{b / 2**20:.2f}" for b in r["peak_bytes"])
    lines.append(f"| {r['schedule']} | {r['stages']} | {r['measured']} | {r['simulated']} | "
                 f"{'yes' if r['equal'] else 'NO'} | {mib} | "
                 f"{'yes' if r['bytes_equal'] else 'NO'} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=5, help="interleaved measurement rounds")
  parser.add_argument("--steps", type=int, default=4, help="warm steps per row per round")
  parser.add_argument("--cases", default="dispatch,compute,memory")
  parser.add_argument("--out", default=str(RESULTS))
  parser.add_argument("--multi-thread", action="store_true",
                      help="let XLA use several threads per device (default: one)")
  args = parser.parse_args(argv)
  wanted = args.cases.split(",")
  load_before = os.getloadavg()
  started = time.time()
  result: dict[str, Any] = dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      jax=jax.__version__, python=platform.python_version(), cpus=os.cpu_count(),
      xla_flags=os.environ["XLA_FLAGS"], load_average_before=load_before, cases=[])
  for name in ("dispatch", "compute"):
    if name in wanted:
      result["cases"].append(speed_case(name, CASES[name], args.rounds, args.steps))
  if "memory" in wanted:
    result["memory"] = memory_case()
  result["load_average_after"] = os.getloadavg()
  result["wall_s"] = time.time() - started
  path = pathlib.Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps(result, indent=2))
  print()
  for case in result["cases"]:
    print(_md_speed(case))
    print()
  if "memory" in result:
    print(_md_memory(result["memory"]))
  print(f"\nload average before {load_before}, after {result['load_average_after']}; "
        f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
