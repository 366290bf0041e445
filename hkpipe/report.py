"""Pictures and traces of a training run: ``python -m hkpipe.report WORKDIR``.

Reads what ``hkpipe.train.train`` wrote in ``WORKDIR`` and writes there:

- ``loss.png``: train and validation loss against step and against tokens seen.
- with ``--config.pipeline.record_timeline=True`` (``mpmd``): ``timeline.svg``, the measured
  per-rank timeline of the run's last train step under the schedule simulated with unit costs and
  with the step's measured per-stage costs, each titled with its bubble fraction; and
  ``trace.json``, the Chrome/Perfetto trace of that step (one track per rank, one event per
  instruction, flow arrows for transfers; processes of a multi-process run on one clock).

``train`` writes them at the end of every run; this command redraws them (e.g. while a run is
still going, or after copying a workdir).

Public names: :func:`write_report`, :func:`loss_series`, :func:`plot_losses`,
:func:`bubble_fraction`, :func:`chrome_trace`, :func:`read_timeline`, :class:`StepTimeline`,
:class:`ProcessTimeline`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

from hkpipe._src.report import bubble_fraction
from hkpipe._src.report import loss_series
from hkpipe._src.report import plot_losses
from hkpipe._src.report import write_report
from hkpipe._src.trace import ProcessTimeline
from hkpipe._src.trace import StepTimeline
from hkpipe._src.trace import chrome_trace
from hkpipe._src.trace import read_timeline

__all__ = ("ProcessTimeline", "StepTimeline", "bubble_fraction", "chrome_trace", "loss_series",
           "main", "plot_losses", "read_timeline", "write_report")


def main(argv: Sequence[str] | None = None) -> int:
  """The command line: writes the report files of one workdir and lists them."""
  parser = argparse.ArgumentParser(prog="python -m hkpipe.report", description=__doc__.split(
      "\n\n")[0])
  parser.add_argument("workdir", help="a training run's --workdir")
  args = parser.parse_args(argv)
  work = pathlib.Path(args.workdir)
  if not (work / "metrics.jsonl").exists():
    print(f"hkpipe.report: error: {work} has no metrics.jsonl; give the --workdir of a training "
          "run.", file=sys.stderr)
    return 2
  for path in write_report(work):
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
