r"""Starts N training processes on this machine, one ``jax.distributed`` process each.

Usage:
  python launch/local.py N [--pin] [--devices_per_process=K] [--port=P] [--timeout=S] \
      [--script=launch/train.py] -- TRAIN_FLAGS...
  launch/local.sh N [...]          # the same, as a shell command

Every process runs ``SCRIPT --coordinator_address=127.0.0.1:P --num_processes=N
--process_id=i --host_devices=K TRAIN_FLAGS...``. With ``--pin`` process ``i`` is pinned to core
``i % nproc`` (``taskset``), which is how real pipeline overlap is measured on a small CPU machine.
Output lines are prefixed with ``[pI]``. When any process exits non-zero, or on Ctrl-C/SIGTERM, or
after ``--timeout`` seconds, every other process is terminated (then killed) and the launcher exits
non-zero: nothing is left running.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  """An unused TCP port on 127.0.0.1."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return int(s.getsockname()[1])


def build_commands(num: int, script: str, port: int, devices: int, pin: bool,
                   flags: list[str]) -> list[list[str]]:
  """The command line of each process."""
  cores = os.cpu_count() or 1
  cmds = []
  for i in range(num):
    cmd = [sys.executable, "-u", script, f"--coordinator_address=127.0.0.1:{port}",
           f"--num_processes={num}", f"--process_id={i}", f"--host_devices={devices}", *flags]
    if pin:
      cmd = ["taskset", "-c", str(i % cores), *cmd]
    cmds.append(cmd)
  return cmds


def _pump(proc: subprocess.Popen, prefix: str) -> None:
  assert proc.stdout is not None
  for line in proc.stdout:
    sys.stdout.write(f"{prefix} {line}")
    sys.stdout.flush()


def _stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.time() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def run(cmds: list[list[str]], timeout: float | None) -> int:
  """Runs the processes; returns 0 when all succeed, else the first failure's code (or 1)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1) for c in cmds]
  pumps = [threading.Thread(target=_pump, args=(p, f"[p{i}]"), daemon=True)
           for i, p in enumerate(procs)]
  for t in pumps:
    t.start()
  start = time.time()
  code = 0
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        code = failed[0] if failed[0] > 0 else 1
        print(f"[launch] a process exited with {failed[0]}; stopping the others", flush=True)
        break
      if all(c == 0 for c in codes):
        break
      if timeout and time.time() - start > timeout:
        print(f"[launch] timeout after {timeout:.0f}s; stopping every process", flush=True)
        code = 124
        break
      time.sleep(0.1)
  except KeyboardInterrupt:
    print("[launch] interrupted; stopping every process", flush=True)
    code = 130
  finally:
    _stop(procs)
    for t in pumps:
      t.join(timeout=5)
  return code


def main(argv: list[str]) -> int:
  if "--" in argv:
    split = argv.index("--")
    own, flags = argv[:split], argv[split + 1:]
  else:
    own, flags = argv, []
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("num_processes", type=int)
  parser.add_argument("--pin", action="store_true", help="pin process i to core i % nproc")
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--timeout", type=float, default=0, help="seconds; 0: none")
  parser.add_argument("--script", default="launch/train.py")
  args, unknown = parser.parse_known_args(own)
  flags = unknown + flags
  if args.num_processes < 1:
    parser.error(f"num_processes must be >= 1, got {args.num_processes}")
  if args.devices_per_process < 1:
    parser.error(f"--devices_per_process must be >= 1, got {args.devices_per_process}")
  cmds = build_commands(args.num_processes, args.script, args.port or free_port(),
                        args.devices_per_process, args.pin, flags)
  signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
  return run(cmds, args.timeout or None)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
