"""The text form of an MPMD instruction program (``MpmdBackend.describe``)."""

from __future__ import annotations

from hkpipe._src.backends.mpmd import _check
from hkpipe._src.backends.mpmd import _instr as ir

# Inputs every stage program reads; left out of the printed reads.
_QUIET = ("rng@", "step@", "mb", "lidx")


def _names(program: ir.Program, bufs: tuple[int, ...]) -> str:
  names = [program.buffers[b].name for b in bufs if b >= 0]
  return ", ".join(n for n in names if not n.startswith(_QUIET))


def _detail(program: ir.Program, ins: ir.Instr) -> str:
  """What an instruction computes: ``program(reads) -> writes``."""
  if isinstance(ins, ir.Free):
    return f"drop {_names(program, ins.reads)}"
  if isinstance(ins, ir.Update):
    return "\n        ".join(f"update{s}({_names(program, r)}) -> {_names(program, w)}"
                     for s, r, w in zip(ins.stages, ins.reads, ins.writes))
  if isinstance(ins, ir.Run):
    what = ins.program or "pass"
  elif isinstance(ins, ir.Send):
    what = "post" if ins.remote else "copy"
  elif isinstance(ins, ir.Recv):
    what = "pull"
  elif isinstance(ins, ir.TieSend):
    what = f"copy leaves {list(ins.leaves)} of"
  elif isinstance(ins, ir.Finalize):
    what = "update" if ins.fused else "finalize"
  else:
    what = type(ins).__name__.lower()
  writes = _names(program, ir.writes_of(ins)) or "-"
  if isinstance(ins, ir.Send) and ins.remote or isinstance(ins, ir.TieSend) and -1 in ins.writes:
    writes += " (posted to another process)"
  return f"{what}({_names(program, ir.reads_of(ins))}) -> {writes}"


def describe(program: ir.Program, live: _check.Liveness | None = None) -> str:
  """One line per instruction (``index  where: what  program(reads) -> writes``), then per rank
  the predicted peak number of stashes (and bytes, when known)."""
  lines = [f"# {program.name} program of process {program.process}: {len(program.instrs)} "
           f"instructions over {len(program.buffers)} buffers",
           "# (stage programs also read their rank's key, step, microbatch and layer indices)"]
  width = max((len(str(ins)) for ins in program.instrs), default=0)
  for i, ins in enumerate(program.instrs):
    detail = _detail(program, ins).replace("\n", "\n" + " " * (width + 8))
    lines.append(f"{i:4d}  {str(ins):<{width}}  {detail}")
  if live is not None:
    lines.append("# peak stashes per rank: " + ", ".join(
        f"rank {r}: {n}" for r, n in enumerate(live.peak_stash)))
    if live.peak_bytes is not None:
      lines.append("# peak bytes per rank: " + ", ".join(
          f"rank {r}: {n}" for r, n in enumerate(live.peak_bytes)))
  return "\n".join(lines)
