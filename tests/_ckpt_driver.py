"""Test driver for tests/test_checkpoint_faults.py: trains the tiny run in this process.

With ``--stall_step=N`` it first patches orbax (test-only, here, not in hkpipe) so that the save of
step N stops after the step's array files are written into orbax's temporary folder and before
that folder is committed, prints ``STALLED <folder>`` and waits forever: the test then kills the
process with SIGKILL in the middle of the save.

  python tests/_ckpt_driver.py WORKDIR DATA_DIR SOURCE_DIR [--stall_step=N]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(data_dir: str, source: str, **overrides):
  """The tiny GPT run the fault tests train: 8 steps, a checkpoint every 2, dropout on."""
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  from experiments import shakespeare_gpt  # pylint: disable=g-import-not-at-top
  c = shakespeare_gpt.get_config("runlocal")
  c.data.dir, c.data.source = data_dir, source
  c.num_steps = 8
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 2
  c.sample_tokens = 0
  c.model.dropout = 0.1  # the dropout key must be restored too
  for key, value in overrides.items():
    c[key] = value
  return c


def stall_save_of(step: int) -> None:
  """Makes orbax stop forever inside the save of ``step``, before its state item is committed."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    final = self.get_final()
    if final.name == "state" and final.parent.name.startswith(f"{step}.orbax-checkpoint-tmp"):
      print(f"STALLED {self.get()}", flush=True)
      while True:
        time.sleep(60)
    return await original(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("data_dir")
  parser.add_argument("source")
  parser.add_argument("--stall_step", type=int, default=None)
  args = parser.parse_args()
  sys.path.insert(0, str(ROOT))
  if args.stall_step is not None:
    stall_save_of(args.stall_step)
  from hkpipe import train as train_lib  # pylint: disable=g-import-not-at-top
  train_lib.train(tiny_config(args.data_dir, args.source), args.workdir)


if __name__ == "__main__":
  main()
