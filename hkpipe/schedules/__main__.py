"""Prints a schedule's simulated timeline and numbers; optionally writes an SVG picture.

Examples::

  python -m hkpipe.schedules --schedule zbv --ranks 4 --microbatches 8 --svg zbv.svg
  python -m hkpipe.schedules --schedule interleaved_1f1b --ranks 4 --microbatches 8 \\
      --virtual-stages 2 --backward 1
  python -m hkpipe.schedules --from-file my_schedule.txt --text

``--ranks`` is the number of pipeline ranks ``p``; the model has ``p * v`` stages. ``--stages``
is its deprecated spelling (it warns).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from hkpipe._src import deprecation
from hkpipe.schedules._builders import get
from hkpipe.schedules._builders import names
from hkpipe.schedules._draw import ascii_grid
from hkpipe.schedules._draw import svg_timeline
from hkpipe.schedules._ir import Schedule
from hkpipe.schedules._lower import lower
from hkpipe.schedules._lower import merge_backward
from hkpipe.schedules._simulate import Costs
from hkpipe.schedules._simulate import SimResult
from hkpipe.schedules._simulate import simulate
from hkpipe.schedules._text import from_text
from hkpipe.schedules._text import to_text


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m hkpipe.schedules",
      description="Simulate a pipeline schedule: ASCII grid, bubble ratio, peak activations, SVG.")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--schedule", choices=names(), help="a registered schedule")
  source.add_argument("--from-file", metavar="PATH", help="a schedule in the text form")
  parser.add_argument("--ranks", type=int, default=None,
                      help="number of pipeline ranks p (default 4)")
  parser.add_argument("--stages", type=int, default=None,
                      help="deprecated spelling of --ranks")
  parser.add_argument("--microbatches", type=int, default=8, help="microbatches m (default 8)")
  parser.add_argument("--virtual-stages", type=int, default=None,
                      help="stages per rank v (default: the schedule's)")
  parser.add_argument("--forward", type=float, default=1.0, help="cost of F (default 1)")
  parser.add_argument("--input-grad", type=float, default=1.0, help="cost of I (default 1)")
  parser.add_argument("--weight-grad", type=float, default=1.0, help="cost of W (default 1)")
  parser.add_argument("--backward", type=float, default=None,
                      help="cost of a full B (default input-grad + weight-grad)")
  parser.add_argument("--comm", type=float, default=0.0, help="transfer latency (default 0)")
  parser.add_argument("--merge-backward", action="store_true",
                      help="merge adjacent I+W pairs into B before simulating")
  parser.add_argument("--text", action="store_true", help="also print the text form")
  parser.add_argument("--lowered", action="store_true",
                      help="also print the lowered program (with SEND/RECV) in text form")
  parser.add_argument("--svg", metavar="PATH", help="write an SVG timeline to PATH")
  return parser


def _load(args: argparse.Namespace) -> Schedule:
  if args.from_file:
    with open(args.from_file) as f:
      return from_text(f.read())
  ranks = deprecation.renamed("--stages", args.stages, "--ranks", args.ranks,
                              where="python -m hkpipe.schedules")
  return get(args.schedule, num_ranks=4 if ranks is None else ranks,
             num_microbatches=args.microbatches,
             virtual_stages=args.virtual_stages)


def summary(schedule: Schedule, result: SimResult) -> str:
  """The numbers printed under the grid."""
  c = result.costs
  backward = "I+W" if c.backward is None else f"{c.backward:g}"
  return "\n".join([
      f"{schedule.name}: {schedule.num_ranks} ranks x {schedule.stages_per_rank} stage(s)/rank "
      f"= {schedule.num_stages} stages, {schedule.num_microbatches} microbatches; costs "
      f"F={c.forward:g} I={c.input_grad:g} W={c.weight_grad:g} B={backward} comm={c.comm:g}",
      f"makespan {result.makespan:g}; bubble ratio {result.bubble_ratio:.4f} "
      f"({100 * result.bubble_ratio:.2f}% idle)",
      f"peak live activations per rank: {list(result.peak_activations)}",
  ])


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status."""
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    schedule = _load(args)
    if args.merge_backward:
      schedule = merge_backward(schedule)
    costs = Costs(forward=args.forward, input_grad=args.input_grad,
                  weight_grad=args.weight_grad, backward=args.backward, comm=args.comm)
    result = simulate(schedule, costs)
  except (ValueError, OSError) as e:
    parser.exit(2, f"error: {e}\n")
  print(summary(schedule, result).splitlines()[0])
  print(ascii_grid(result.records(), num_ranks=schedule.num_ranks), end="")
  print("\n".join(summary(schedule, result).splitlines()[1:]))
  if args.text:
    print("\n" + to_text(schedule), end="")
  if args.lowered:
    print("\n" + to_text(lower(schedule)), end="")
  if args.svg:
    title = (f"{schedule.name}: p={schedule.num_ranks}, v={schedule.stages_per_rank}, "
             f"m={schedule.num_microbatches}, bubble {result.bubble_ratio:.3f}, "
             f"peak {max(result.peak_activations)}")
    with open(args.svg, "w") as f:
      f.write(svg_timeline(result.records(), title=title))
    print(f"wrote {args.svg}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
