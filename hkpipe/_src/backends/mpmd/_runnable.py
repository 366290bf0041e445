"""A driver call's program made ready to run: checked, bound, measured, with its inputs.

:func:`runnable` checks an instruction program (``_check``), binds it to compiled programs and
store slots (``_interp.bind``) and predicts its memory (``_check.liveness``); :class:`Net` is the
``_interp`` ``net`` interface of one driver call (cross-process messages).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from hkpipe._src.backends.mpmd import _check
from hkpipe._src.backends.mpmd import _instr as ir
from hkpipe._src.backends.mpmd import _interp
from hkpipe._src.backends.mpmd._setup import _Setup
from hkpipe._src.backends.mpmd._setup import _spec


@dataclasses.dataclass(frozen=True)
class Net:
  """Cross-process messages of one driver call (the ``_interp`` ``net`` interface)."""

  setup: _Setup
  call: int

  def post(self, key: tuple, arrays: Sequence[Any], first_shard_only: bool) -> None:
    self.setup.post(self.call, key, arrays, first_shard_only)

  def pull(self, key: tuple, process: int, specs: Sequence[Any], label: Any) -> list:
    return self.setup.pull(self.call, key, process, specs, label)


@dataclasses.dataclass(frozen=True)
class Runnable:
  """A bound program, the store slots of its constant inputs, and its predicted memory."""

  bound: _interp.Bound
  template: tuple
  liveness: _check.Liveness


def runnable(setup: _Setup, program: ir.Program, programs: dict,
             opt: Sequence[Any] | None) -> Runnable:
  """Checks, binds and measures ``program``; fills a store template with constant inputs."""
  _check.check(program)

  def input_specs(name: tuple) -> list:
    if name[0] in ("p", "acc"):
      return setup._param_specs(name[1])  # pylint: disable=protected-access
    if name[0] == "opt" and opt is not None:
      return [_spec(a, sh) for a, sh in zip(opt[name[1]][1], setup.opt_shardings(name[1]))]
    return []      # never donated: outside the liveness count

  bound = _interp.bind(program, setup, programs, setup, input_specs)
  template: list = [None] * len(program.buffers)
  for name, b in program.inputs.items():
    if name[0] == "lidx":
      template[b] = [setup.lidx[name[1]]]
    elif name[0] == "mb":
      template[b] = [setup.mb_ids[name[1]][name[2]]]
    elif name[0] == "loss":
      template[b] = [setup.loss0]
  return Runnable(bound, tuple(template),
                   _check.liveness(program, setup.num_ranks, bound.nbytes))
