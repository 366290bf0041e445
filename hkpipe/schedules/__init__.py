"""Pipeline schedules: one representation read by every backend, simulator and picture.

A :class:`Schedule` lists, for each of ``p`` pipeline ranks, the ordered actions the rank runs on
``m`` microbatches; the model is cut into ``p * v`` stages (``v`` = stages per rank) and
``Schedule.stage_to_rank`` says which rank owns each stage. Compute actions are ``F`` (forward),
``B`` (full backward) or the zero-bubble split ``I`` (input grad) + ``W`` (weight grad).

Library-wide convention: ``num_ranks`` is the number of pipeline ranks ``p`` (devices),
``virtual_stages`` is ``v`` and ``num_stages`` is the number of model stages ``p * v``.

Typical use::

  from hkpipe import schedules
  s = schedules.get("zbv", num_ranks=4, num_microbatches=8)    # 4 ranks, 8 stages
  schedules.validate(s)                        # raises ScheduleError pointing at a bad action
  program = schedules.lower(s)                 # adds SEND/RECV; run each rank's list in order
  result = schedules.simulate(s, schedules.Costs(forward=1, input_grad=1, weight_grad=1))
  print(schedules.ascii_grid(result.records()), result.bubble_ratio, result.peak_activations)
  custom = schedules.from_text("0F0 0F1 0B0 0B1\\n1F0 1B0 1F1 1B1\\n")

Public names:

- IR: :class:`Kind`, :class:`Action`, :class:`Schedule`, :class:`ScheduleError`.
- Registry: :func:`get`, :func:`names`, :func:`describe`.
- Passes and checks: :func:`lower`, :func:`merge_backward`, :func:`validate`.
- Text form: :func:`to_text`, :func:`from_text`.
- Simulation: :class:`Costs`, :func:`simulate`, :class:`SimResult`, :class:`Interval`,
  :class:`Record`, :func:`peak_activations`.
- Pictures (any ``(rank, kind, stage, mb, start, end)`` records, simulated or measured):
  :func:`ascii_grid`, :func:`svg_timeline`, :func:`svg_timelines`, :func:`svg_compare`.

Command line: ``python -m hkpipe.schedules --schedule zbv --ranks 4 --microbatches 8
--svg out.svg``. See ``docs/schedules.md``.
"""

from hkpipe.schedules._builders import describe
from hkpipe.schedules._builders import get
from hkpipe.schedules._builders import names
from hkpipe.schedules._draw import ascii_grid
from hkpipe.schedules._draw import svg_compare
from hkpipe.schedules._draw import svg_timeline
from hkpipe.schedules._draw import svg_timelines
from hkpipe.schedules._engine import Interval
from hkpipe.schedules._ir import Action
from hkpipe.schedules._ir import Kind
from hkpipe.schedules._ir import Schedule
from hkpipe.schedules._ir import ScheduleError
from hkpipe.schedules._lower import lower
from hkpipe.schedules._lower import merge_backward
from hkpipe.schedules._simulate import Costs
from hkpipe.schedules._simulate import Record
from hkpipe.schedules._simulate import SimResult
from hkpipe.schedules._simulate import peak_activations
from hkpipe.schedules._simulate import simulate
from hkpipe.schedules._text import from_text
from hkpipe.schedules._text import to_text
from hkpipe.schedules._validate import validate

__all__ = (
    "Action",
    "Costs",
    "Interval",
    "Kind",
    "Record",
    "Schedule",
    "ScheduleError",
    "SimResult",
    "ascii_grid",
    "describe",
    "from_text",
    "get",
    "lower",
    "merge_backward",
    "names",
    "peak_activations",
    "simulate",
    "svg_compare",
    "svg_timeline",
    "svg_timelines",
    "to_text",
    "validate",
)
