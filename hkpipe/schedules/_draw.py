"""Pictures of timelines: an ASCII grid and SVG (pure string generation, no plotting library).

Every function takes *records*: any iterable of ``(rank, kind, stage, mb, start, end)`` tuples
(:class:`Record` is one), simulated (``SimResult.records()``) or measured by a backend. ``kind`` is
a label such as ``"F"``, ``"B"``, ``"I"``, ``"W"`` (a :class:`Kind` is accepted too); other labels
are drawn in grey. Times may be in any unit; the picture starts at the earliest start.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence
from xml.sax.saxutils import escape

from hkpipe.schedules._ir import Kind
from hkpipe.schedules._simulate import Record

COLORS = {"F": "#4c78a8", "B": "#54a24b", "I": "#8cd17d", "W": "#b279a2"}
OTHER_COLOR = "#bab0ac"
_EPS = 1e-9


def normalize(records: Iterable[Sequence[Any]]) -> list[Record]:
  """Turns any ``(rank, kind, stage, mb, start, end)`` iterable into a list of :class:`Record`.

  Raises:
    ValueError: a record does not have 6 fields, or ends before it starts.
  """
  out = []
  for i, rec in enumerate(records):
    if len(rec) != 6:
      raise ValueError(f"Record {i} {rec!r} must be (rank, kind, stage, mb, start, end).")
    rank, kind, stage, mb, start, end = rec
    kind = kind.value if isinstance(kind, Kind) else str(kind)
    if float(end) < float(start):
      raise ValueError(f"Record {i} {rec!r} ends before it starts.")
    out.append(Record(int(rank), kind, int(stage), int(mb), float(start), float(end)))
  return out


def _multi_stage(records: Sequence[Record]) -> bool:
  stages: dict[int, set[int]] = {}
  for r in records:
    stages.setdefault(r.rank, set()).add(r.stage)
  return any(len(s) > 1 for s in stages.values())


def _label(r: Record, show_stage: bool) -> str:
  return f"{r.stage}{r.kind}{r.mb}" if show_stage else f"{r.kind}{r.mb}"


def ascii_grid(records: Iterable[Sequence[Any]], *, slot: float | None = None,
               num_ranks: int | None = None, show_stage: bool | None = None) -> str:
  """Draws a timeline as text: one row per rank, one column per time slot, ``.`` when idle.

  An action spanning ``k`` slots fills ``k`` cells with its label, e.g. ``F3`` (forward of
  microbatch 3) or ``B3 B3`` for a two-slot backward.

  Args:
    records: the timeline.
    slot: time per column; default the shortest action.
    num_ranks: rows to draw (default: 1 + the largest rank seen).
    show_stage: prefix labels with the stage (``5F3``); default when a rank runs several stages.

  Returns:
    The grid, one line per rank, ending with a newline.
  """
  recs = normalize(records)
  if not recs:
    return ""
  show_stage = _multi_stage(recs) if show_stage is None else show_stage
  t0 = min(r.start for r in recs)
  if slot is None:
    durations = [r.end - r.start for r in recs if r.end - r.start > _EPS]
    slot = min(durations) if durations else 1.0
  if not slot > 0:
    raise ValueError(f"slot must be > 0, got {slot!r}.")
  num_ranks = 1 + max(r.rank for r in recs) if num_ranks is None else num_ranks
  span = max(r.end for r in recs) - t0
  cols = max(1, math.ceil(span / slot - _EPS))
  grid = [["."] * cols for _ in range(num_ranks)]
  for r in sorted(recs, key=lambda r: r.start):
    c0 = min(cols - 1, int(math.floor((r.start - t0) / slot + _EPS)))
    c1 = max(c0 + 1, math.ceil((r.end - t0) / slot - _EPS))
    for c in range(c0, min(c1, cols)):
      grid[r.rank][c] = _label(r, show_stage)
  width = max(len(cell) for row in grid for cell in row)
  name_w = len(f"rank {num_ranks - 1}")
  lines = [f"{f'rank {i}':<{name_w}} | " + " ".join(c.rjust(width) for c in row)
           for i, row in enumerate(grid)]
  return "\n".join(lines) + "\n"


def _chunk_index(records: Sequence[Record]) -> dict[tuple[int, int], int]:
  """(rank, stage) -> index of the stage among the rank's stages (0 for the first)."""
  stages: dict[int, set[int]] = {}
  for r in records:
    stages.setdefault(r.rank, set()).add(r.stage)
  return {(rank, st): i for rank, ss in stages.items() for i, st in enumerate(sorted(ss))}


def _shade(color: str, chunk: int) -> str:
  """Darkens ``#rrggbb`` by 30% per chunk index (later stages of a rank are drawn darker)."""
  factor = 0.7 ** min(chunk, 3)
  rgb = [int(int(color[i:i + 2], 16) * factor) for i in (1, 3, 5)]
  return "#" + "".join(f"{c:02x}" for c in rgb)


def _nice_step(span: float, target: int = 8) -> float:
  raw = span / max(target, 1)
  if raw <= 0:
    return 1.0
  mag = 10 ** math.floor(math.log10(raw))
  for mult in (1, 2, 5, 10):
    if mult * mag >= raw:
      return mult * mag
  return 10 * mag


def _fmt(x: float) -> str:
  return f"{x:.6g}"


def _panel(recs: list[Record], title: str | None, y0: float, width: float, t_span: float | None,
           row_h: float, left: float) -> tuple[list[str], float]:
  """SVG elements of one timeline panel starting at height ``y0``; returns (elements, height)."""
  parts: list[str] = []
  y = y0
  if title:
    parts.append(f'<text x="{left}" y="{y + 16}" font-size="14" font-weight="bold">'
                 f'{escape(title)}</text>')
    y += 24
  if not recs:
    parts.append(f'<text x="{left}" y="{y + 14}" font-size="12">(empty timeline)</text>')
    return parts, y + 24 - y0
  chunk_of = _chunk_index(recs)
  t0 = min(r.start for r in recs)
  span = t_span if t_span is not None else max(r.end for r in recs) - t0
  span = span if span > 0 else 1.0
  scale = width / span
  num_ranks = 1 + max(r.rank for r in recs)
  for rank in range(num_ranks):
    ry = y + rank * row_h
    parts.append(f'<text x="{left - 6}" y="{ry + row_h * 0.65:.1f}" font-size="12" '
                 f'text-anchor="end">rank {rank}</text>')
    parts.append(f'<rect x="{left}" y="{ry:.1f}" width="{width:.1f}" height="{row_h - 2:.1f}" '
                 'fill="#f4f4f4"/>')
  for r in recs:
    x = left + (r.start - t0) * scale
    w = max((r.end - r.start) * scale, 0.5)
    ry = y + r.rank * row_h
    color = _shade(COLORS.get(r.kind, OTHER_COLOR), chunk_of[(r.rank, r.stage)])
    parts.append(f'<rect x="{x:.2f}" y="{ry:.1f}" width="{w:.2f}" height="{row_h - 2:.1f}" '
                 f'fill="{color}" stroke="#ffffff" stroke-width="0.5">'
                 f'<title>{escape(_label(r, True))} [{_fmt(r.start)}, {_fmt(r.end)}]</title>'
                 '</rect>')
    text = str(r.mb)
    if w >= 7 * len(text):
      parts.append(f'<text x="{x + w / 2:.2f}" y="{ry + row_h * 0.62:.1f}" font-size="11" '
                   f'text-anchor="middle" fill="#ffffff">{escape(text)}</text>')
  axis_y = y + num_ranks * row_h + 2
  step = _nice_step(span)
  parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + width}" y2="{axis_y}" '
               'stroke="#333333"/>')
  k = 0
  while k * step <= span + _EPS:
    tx = left + k * step * scale
    parts.append(f'<line x1="{tx:.2f}" y1="{axis_y}" x2="{tx:.2f}" y2="{axis_y + 4}" '
                 'stroke="#333333"/>')
    parts.append(f'<text x="{tx:.2f}" y="{axis_y + 16}" font-size="10" text-anchor="middle">'
                 f'{_fmt(k * step)}</text>')
    k += 1
  return parts, axis_y + 24 - y0


def svg_timelines(panels: Sequence[tuple[str | None, Iterable[Sequence[Any]]]], *,
                  width: float = 960.0, row_height: float = 22.0,
                  same_scale: bool = False) -> str:
  """Draws several timelines one above the other, each with its title, as one SVG document.

  Args:
    panels: ``(title, records)`` pairs, drawn top to bottom.
    width: width of the time axis in pixels.
    row_height: height of one rank row in pixels.
    same_scale: use one time scale for all panels (only meaningful when they share a time unit);
      by default each panel fills the width.

  Returns:
    The SVG document as a string. Colours: F blue, B green, I light green, W purple, other labels
    grey, each darker for a rank's later stages (chunk 1 of ZBV is darker than chunk 0); cells
    show the microbatch number when wide enough; hovering shows ``{stage}{KIND}{mb} [start, end]``.
  """
  left, pad = 64.0, 10.0
  normalized = [(title, normalize(recs)) for title, recs in panels]
  spans = [max(r.end for r in recs) - min(r.start for r in recs) for _, recs in normalized if recs]
  t_span = max(spans) if same_scale and spans else None
  body: list[str] = []
  y = pad
  for title, recs in normalized:
    parts, height = _panel(recs, title, y, width, t_span, row_height, left)
    body += parts
    y += height + pad
  legend_x = left
  for label, color in list(COLORS.items()) + [("other", OTHER_COLOR)]:
    body.append(f'<rect x="{legend_x}" y="{y}" width="12" height="12" fill="{color}"/>')
    body.append(f'<text x="{legend_x + 16}" y="{y + 10}" font-size="11">{label}</text>')
    legend_x += 64
  if any(i > 0 for _, recs in normalized for i in _chunk_index(recs).values()):
    body.append(f'<text x="{legend_x}" y="{y + 10}" font-size="11">darker: a rank\'s later '
                'stage</text>')
  total_w = left + width + pad
  total_h = y + 12 + pad
  head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w:.0f}" height="{total_h:.0f}" '
          f'viewBox="0 0 {total_w:.0f} {total_h:.0f}" font-family="monospace">')
  background = f'<rect width="{total_w:.0f}" height="{total_h:.0f}" fill="#ffffff"/>'
  return "\n".join([head, background] + body + ["</svg>"]) + "\n"


def svg_timeline(records: Iterable[Sequence[Any]], *, title: str | None = None,
                 width: float = 960.0, row_height: float = 22.0) -> str:
  """Draws one timeline (one row per rank) as an SVG document; see :func:`svg_timelines`."""
  return svg_timelines([(title, records)], width=width, row_height=row_height)


def svg_compare(top: Iterable[Sequence[Any]], bottom: Iterable[Sequence[Any]], *,
                titles: tuple[str, str] = ("simulated", "measured"), width: float = 960.0,
                row_height: float = 22.0, same_scale: bool = False) -> str:
  """Draws two timelines one above the other (e.g. simulated vs measured) with titles."""
  return svg_timelines([(titles[0], top), (titles[1], bottom)], width=width,
                       row_height=row_height, same_scale=same_scale)
