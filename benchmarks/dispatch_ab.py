"""MPMD dispatch of two checkouts, measured in alternation on the same machine at the same time.

Usage::

  git worktree add --detach /tmp/old_<sha> <sha>
  python benchmarks/dispatch_ab.py --old /tmp/old_<sha> --new . --rounds 30

Each checkout gets one worker process (``PYTHONPATH`` set to it; the worker prints which
``hkpipe`` it imported) that builds the rows of ``mpmd_bench.py``'s dispatch-bound case (GPT
d=64, 4 blocks, 4 ranks, m=8, 1F1B and GPipe, XLA's default threads as with ``--multi-thread``).
Then the workers take turns: in each round one worker times ``--steps`` steps of each row while
the other waits, then the other does. On a machine shared with other jobs the load changes
within seconds; alternating every round exposes both checkouts to the same load, which
back-to-back runs of ``mpmd_bench.py`` (minutes apart) do not. Reports per row the medians over
all steps of the step time, the dispatch time (``train_step`` returning) and the dispatching
thread's CPU time, with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def worker(steps: int) -> None:
  """Builds the rows, then measures ``steps`` steps of each row per line read from stdin."""
  sys.argv.append("--multi-thread")          # mpmd_bench: keep XLA's default threading
  import jax  # pylint: disable=import-outside-toplevel
  import mpmd_bench  # pylint: disable=import-outside-toplevel
  import hkpipe  # pylint: disable=import-outside-toplevel
  from hkpipe import models  # pylint: disable=import-outside-toplevel

  spec = mpmd_bench.CASES["dispatch"]
  config = models.GPTConfig(**spec["config"])
  model = models.build(config)
  batch = mpmd_bench._batch(  # pylint: disable=protected-access
      spec["batch"], config.seq_len, config.vocab_size)
  devices = jax.devices()[:spec["ranks"]]
  rows = [mpmd_bench.Row(f"mpmd {s}", model, batch, backend="mpmd", schedule=s, devices=devices)
          for s in ("1f1b", "gpipe")]
  print(json.dumps({"hkpipe": hkpipe.__file__}), flush=True)
  for line in sys.stdin:
    if line.strip() != "measure":
      break
    out = {}
    for row in rows:
      n = len(row.steps)
      row.measure(steps)
      out[row.label] = dict(step=row.steps[n:], dispatch=row.dispatch[n:],
                            cpu=row.dispatch_cpu[n:])
    print(json.dumps(out), flush=True)


def _start(checkout: str, steps: int) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(checkout).resolve()))
  return subprocess.Popen([sys.executable, str(HERE / "dispatch_ab.py"), "--worker",
                           "--steps", str(steps)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          env=env, text=True)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--old", help="checkout of the baseline")
  parser.add_argument("--new", help="checkout being measured")
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--steps", type=int, default=2, help="steps per row per turn")
  parser.add_argument("--out", default=str(HERE / "results" / "dispatch_ab.json"))
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    worker(args.steps)
    return 0
  load_before = os.getloadavg()
  started = time.time()
  procs, imported = {}, {}
  for name in ("old", "new"):                # one at a time: compiles do not overlap
    procs[name] = _start(getattr(args, name), args.steps)
    imported[name] = json.loads(procs[name].stdout.readline())["hkpipe"]
  samples: dict = {name: {} for name in procs}
  for _ in range(args.rounds):
    for name, proc in procs.items():
      proc.stdin.write("measure\n")
      proc.stdin.flush()
      for label, values in json.loads(proc.stdout.readline()).items():
        for key, vals in values.items():
          samples[name].setdefault(label, {}).setdefault(key, []).extend(vals)
  for proc in procs.values():
    proc.stdin.close()
    proc.wait(timeout=60)
  load_after = os.getloadavg()
  result = dict(load_average_before=load_before, load_average_after=load_after,
                wall_s=time.time() - started, rounds=args.rounds, steps=args.steps,
                checkouts={n: dict(path=getattr(args, n), hkpipe=imported[n]) for n in procs},
                medians_ms={n: {label: {k: statistics.median(v) * 1e3 for k, v in d.items()}
                                for label, d in rows.items()} for n, rows in samples.items()},
                samples=samples)
  path = pathlib.Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2) + "\n")
  print("| checkout | row | step median (ms) | dispatch median (ms) | dispatch CPU median (ms) |")
  print("|---|---|---:|---:|---:|")
  for name, rows in result["medians_ms"].items():
    for label, m in rows.items():
      print(f"| {name} | {label} | {m['step']:.1f} | {m['dispatch']:.1f} | {m['cpu']:.1f} |")
  for name, path_ in imported.items():
    print(f"{name}: hkpipe from {path_}")
  print(f"load average before {load_before}, after {load_after}; "
        f"{args.rounds} rounds x {args.steps} steps per row; wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
