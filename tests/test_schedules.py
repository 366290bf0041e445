"""Schedule IR, registry, text form, validator, lowering, pictures and CLI (hkpipe.schedules)."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

import hkpipe
from hkpipe import schedules as S
from hkpipe.schedules import Action
from hkpipe.schedules import Kind

ALL = [("gpipe", None), ("1f1b", None), ("interleaved_1f1b", 2), ("interleaved_1f1b", 3),
       ("zb_h1", None), ("zbv", None), ("dualpipev", None)]


def build(name, p, m, v=None):
  return S.get(name, num_ranks=p, num_microbatches=m, virtual_stages=v)


def row(text):
  return tuple(Action.parse(t) for t in text.split())


# ---------------------------------------------------------------------------------------------
# Registry.


def test_names_lists_every_schedule():
  assert S.names() == ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv", "dualpipev")
  for name in S.names():
    assert S.describe(name)


@pytest.mark.parametrize("name,v", ALL)
def test_get_layout(name, v):
  p, m = 4, 8
  s = build(name, p, m, v)
  vv = {"zbv": 2, "dualpipev": 2}.get(name, v or 1)
  assert (s.name, s.num_ranks, s.num_microbatches, s.stages_per_rank) == (name, p, m, vv)
  assert s.num_stages == p * vv
  assert sorted(st for r in range(p) for st in s.stages_of_rank(r)) == list(range(p * vv))
  for r in range(p):
    assert len(s.stages_of_rank(r)) == vv
    assert all(s.rank_of(st) == r for st in s.stages_of_rank(r))
  assert not s.is_lowered


def test_stage_placement_looped_and_v_shaped():
  assert build("interleaved_1f1b", 3, 3, 2).stage_to_rank == (0, 1, 2, 0, 1, 2)
  zbv = build("zbv", 3, 6)
  assert zbv.stage_to_rank == (0, 1, 2, 2, 1, 0)
  assert zbv.stages_of_rank(0) == (0, 5) and zbv.stages_of_rank(2) == (2, 3)
  assert build("dualpipev", 3, 6).stage_to_rank == (0, 1, 2, 2, 1, 0)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(name="nope"), "Unknown schedule 'nope'"),
    (dict(name="1f1b", virtual_stages=2), "virtual_stages must be 1"),
    (dict(name="gpipe", virtual_stages=3), "virtual_stages must be 1"),
    (dict(name="zb_h1", virtual_stages=2), "virtual_stages must be 1"),
    (dict(name="interleaved_1f1b"), "needs virtual_stages >= 2"),
    (dict(name="interleaved_1f1b", virtual_stages=1), "needs virtual_stages >= 2"),
    (dict(name="zbv", virtual_stages=1), "exactly 2 stages per rank"),
    (dict(name="zbv", num_ranks=3, virtual_stages=3), "odd stage count"),
    (dict(name="dualpipev", virtual_stages=4), "exactly 2 stages per rank"),
    (dict(name="1f1b", num_ranks=0), "num_ranks must be a positive int"),
    (dict(name="1f1b", num_microbatches=0), "num_microbatches must be a positive int"),
    (dict(name="1f1b", num_microbatches=2.0), "num_microbatches must be a positive int"),
    (dict(name="1f1b", num_ranks=True), "num_ranks must be a positive int"),
])
def test_get_rejects_bad_combinations(kwargs, needle):
  args = dict(num_ranks=4, num_microbatches=8, virtual_stages=None) | kwargs
  with pytest.raises(ValueError) as info:
    S.get(args.pop("name"), **args)
  assert needle in str(info.value)


def test_get_num_stages_is_the_deprecated_spelling_of_num_ranks():
  """``num_stages=`` meant ranks in ``get``; it still builds the same schedule, with a warning
  naming ``num_ranks``, and giving both spellings is an error."""
  with pytest.warns(FutureWarning, match=r"num_stages is deprecated; use num_ranks instead "
                    r"\(num_ranks=4\)"):
    old = S.get("zbv", num_stages=4, num_microbatches=8)
  assert old == build("zbv", 4, 8) and (old.num_ranks, old.num_stages) == (4, 8)
  with pytest.raises(hkpipe.ConfigError, match=r"both num_stages=4 \(deprecated\) and "
                     r"num_ranks=2; pass only num_ranks"):
    S.get("zbv", num_stages=4, num_ranks=2, num_microbatches=8)


def test_unknown_name_lists_registry():
  with pytest.raises(ValueError, match="zbv"):
    S.get("zero_bubble", num_ranks=2, num_microbatches=2)


# ---------------------------------------------------------------------------------------------
# IR and text form.


def test_action_text_and_parse():
  for text in ["0F1", "3B0", "2I5", "2W5", "1SEND_F3", "2RECV_F3", "12SEND_B10", "0RECV_B7"]:
    assert str(Action.parse(text)) == text
  assert Action.parse("2I5") == Action(2, Kind.I, 5)
  with pytest.raises(ValueError, match="'0X1'"):
    Action.parse("0X1")


def test_schedule_structure_checked_on_construction():
  with pytest.raises(ValueError, match="stage_to_rank has 3 entries"):
    S.Schedule("x", 2, 1, 1, (0, 1, 1), ((), ()))
  with pytest.raises(ValueError, match="actions has 1 rows but num_ranks = 2"):
    S.Schedule("x", 2, 1, 1, (0, 1), ((),))
  with pytest.raises(S.ScheduleError, match="rank 1, position 0, action 1F4: microbatch 4"):
    S.Schedule("x", 2, 2, 1, (0, 1), ((), (Action(1, Kind.F, 4),)))
  with pytest.raises(ValueError, match="stage_to_rank\\[1\\] = 5"):
    S.Schedule("x", 2, 1, 1, (0, 5), ((), ()))


def test_schedule_accepts_lists_and_stays_hashable():
  s = S.Schedule("x", 2, 1, 1, [0, 1], [[Action(0, Kind.F, 0), Action(0, Kind.B, 0)],
                                        list(row("1F0 1B0"))])
  assert s.stage_to_rank == (0, 1) and s.actions[1] == row("1F0 1B0")
  assert hash(s) == hash(S.from_text(S.to_text(s)))
  S.validate(s)


def test_schedule_error_pickles():
  import pickle
  err = S.ScheduleError("boom", rank=1, position=2, action=Action(1, Kind.F, 0))
  back = pickle.loads(pickle.dumps(err))
  assert (str(back), back.rank, back.position, back.action) == (
      "rank 1, position 2, action 1F0: boom", 1, 2, Action(1, Kind.F, 0))


@pytest.mark.parametrize("name,v", ALL)
def test_text_round_trip(name, v):
  s = build(name, 3, 5, v)
  assert S.from_text(S.to_text(s)) == s
  lowered = S.lower(s)
  assert S.from_text(S.to_text(lowered)) == lowered


def test_text_has_one_row_per_rank():
  text = S.to_text(build("1f1b", 2, 3))
  assert text.splitlines()[1:] == ["0F0 0F1 0B0 0F2 0B1 0B2", "1F0 1B0 1F1 1B1 1F2 1B2"]


def test_from_text_infers_layout_of_hand_written_schedule():
  text = """
    # a hand-written V on 2 ranks
    0F0 0F1 3F0 3B0 3F1 3B1 0B0 0B1
    1F0 2F0 1F1 2F1 2B0 1B0 2B1 1B1
  """
  s = S.from_text(text)
  assert (s.name, s.num_ranks, s.num_microbatches, s.stages_per_rank) == ("custom", 2, 2, 2)
  assert s.stage_to_rank == (0, 1, 1, 0)
  S.validate(s)
  renamed = S.from_text(S.to_text(s), name="mine", num_microbatches=2)
  assert renamed.name == "mine" and renamed.actions == s.actions


def test_from_text_errors_point_at_the_problem():
  with pytest.raises(ValueError, match="line 2 \\(rank 1\\).*'1Q0'"):
    S.from_text("0F0 0B0\n1Q0\n")
  with pytest.raises(S.ScheduleError, match="rank 1, position 1, action 0B0: stage 0 already"):
    S.from_text("0F0\n1F0 0B0 1B0\n")
  with pytest.raises(ValueError, match="Stages \\[1\\] never appear"):
    S.from_text("0F0 0B0\n2F0 2B0\n")
  with pytest.raises(ValueError, match="no rows"):
    S.from_text("# nothing\n\n")
  with pytest.raises(ValueError, match="multiple of the rank count"):
    S.from_text("0F0 1F0 1B0 0B0\n2F0 2B0\n")


def test_from_text_empty_rank_row():
  s = S.Schedule("x", 2, 1, 1, (0, 0), (row("0F0 1F0 1B0 0B0"), ()))
  assert S.to_text(s).splitlines()[-1] == "-"
  assert S.from_text(S.to_text(s)) == s


# ---------------------------------------------------------------------------------------------
# Validator: every built schedule passes; bad ones are rejected with a pointed message.


@pytest.mark.parametrize("name,v", ALL)
@pytest.mark.parametrize("p,m", [(1, 1), (1, 4), (2, 1), (3, 7), (4, 4), (4, 9), (5, 12)])
def test_builtin_schedules_validate(name, v, p, m):
  s = build(name, p, m, v)
  S.validate(s)
  S.validate(S.lower(s))
  kinds = {a.kind for r in s.actions for a in r}
  assert kinds <= {Kind.F, Kind.B, Kind.I, Kind.W}


def two_rank(r0, r1, m=2):
  return S.Schedule("bad", 2, m, 1, (0, 1), (row(r0), row(r1)))


@pytest.mark.parametrize("rows,where,needle", [
    # Backward before its own forward on the same rank.
    (("0F0 0B0 0F1 0B1", "1B0 1F0 1F1 1B1"), (1, 0, "1B0"), "needs 1F0 earlier on rank 1"),
    # Action on the wrong rank.
    (("0F0 0F1 1F0 0B0 0B1", "1B0 1F1 1B1"), (0, 2, "1F0"), "owned by rank 1"),
    # Duplicate forward.
    (("0F0 0F1 0F0 0B0 0B1", "1F0 1B0 1F1 1B1"), (0, 2, "0F0"), "duplicate"),
    # Missing backward (reported at the owner rank, no position).
    (("0F0 0F1 0B0", "1F0 1B0 1F1 1B1"), (0, None, "0B1"), "missing: rank 0 never runs 0B1"),
    # W before its I.
    (("0F0 0F1 0B0 0B1", "1F0 1W0 1I0 1F1 1B1"), (1, 1, "1W0"), "needs 1B/I0 earlier"),
    # Mixing a full B with a split I for the same (stage, mb).
    (("0F0 0F1 0B0 0B1", "1F0 1B0 1I0 1F1 1B1"), (1, 2, "1I0"), "either one B or one I plus one W"),
    # Each rank's own order is fine, but rank 0 waits for the cotangent of mb 0 while rank 1
    # waits for the activation of mb 1: a cross-rank cycle.
    (("0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0"), (0, 1, "0B0"), "deadlock"),
])
def test_bad_schedules_rejected_with_pointed_message(rows, where, needle):
  with pytest.raises(S.ScheduleError) as info:
    S.validate(two_rank(*rows))
  err = info.value
  assert (err.rank, err.position, str(err.action)) == where
  assert needle in str(err)
  prefix = f"rank {where[0]}, " + (f"position {where[1]}, " if where[1] is not None else "")
  assert str(err).startswith(prefix + f"action {where[2]}: ")


def test_deadlock_message_names_every_blocked_rank():
  s = two_rank("0F0 0B0 0F1 0B1", "1F1 1B1 1F0 1B0")
  with pytest.raises(S.ScheduleError) as info:
    S.validate(s)
  msg = str(info.value)
  assert "deadlock" in msg
  assert "rank 0 blocks at position 1 (0B0) waiting for cotangent of stage 1 microbatch 0" in msg
  assert "rank 1 blocks at position 0 (1F1) waiting for activation of stage 0 microbatch 1" in msg


def test_valid_hand_written_schedule_passes():
  S.validate(two_rank("0F0 0F1 0B0 0B1", "1F0 1B0 1F1 1B1"))


def test_bad_lowered_programs_rejected():
  good = S.lower(build("1f1b", 2, 2))
  S.validate(good)
  r0, r1 = good.actions
  # Drop rank 1's first RECV_F.
  missing = good.replace(actions=(r0, r1[1:]))
  with pytest.raises(S.ScheduleError, match="rank 1, position 0, action 1F0: missing 1RECV_F0"):
    S.validate(missing)
  # Move rank 0's first SEND_F before its forward.
  swapped = good.replace(actions=((r0[1], r0[0]) + r0[2:], r1))
  with pytest.raises(S.ScheduleError,
                     match="rank 0, position 0, action 0SEND_F0: must come after 0F0"):
    S.validate(swapped)
  # A transfer nobody needs (stage 1 is the last stage: it sends no activation).
  extra = good.replace(actions=(r0, r1 + (Action(1, Kind.SEND_F, 0),)))
  with pytest.raises(S.ScheduleError, match="action 1SEND_F0: no compute action"):
    S.validate(extra)


# ---------------------------------------------------------------------------------------------
# Lowering and merging.


def test_lowering_places_send_after_producer_and_recv_before_consumer():
  lowered = S.lower(build("1f1b", 2, 2))
  assert " ".join(map(str, lowered.actions[0])) == (
      "0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1")
  assert " ".join(map(str, lowered.actions[1])) == (
      "1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1")


@pytest.mark.parametrize("name", ["zbv", "dualpipev"])
def test_no_transfer_between_stages_on_the_same_rank(name):
  p, m = 3, 6
  lowered = S.lower(build(name, p, m))
  last = lowered.actions[p - 1]
  comm = [a for a in last if a.kind.is_comm]
  # Stages p-1 and p both live on the last rank: the V turn has no SEND/RECV.
  assert not any(a.kind is Kind.SEND_F and a.stage == p - 1 for a in comm)
  assert not any(a.kind is Kind.RECV_F and a.stage == p for a in comm)
  assert not any(a.kind is Kind.SEND_B and a.stage == p for a in comm)
  assert not any(a.kind is Kind.RECV_B and a.stage == p - 1 for a in comm)
  # Every other boundary moves each microbatch once per direction: 2 (p*2 - 2) m transfers,
  # each a SEND plus a RECV.
  total = sum(a.kind.is_comm for r in lowered.actions for a in r)
  assert total == 2 * 2 * (2 * p - 2) * m
  # A single rank never communicates.
  assert not S.lower(build(name, 1, 3)).is_lowered


def test_lower_rejects_lowered_and_merge_rejects_lowered():
  lowered = S.lower(build("1f1b", 2, 2))
  with pytest.raises(ValueError, match="already contains SEND/RECV"):
    S.lower(lowered)
  with pytest.raises(ValueError, match="merge first, then lower"):
    S.merge_backward(lowered)


@pytest.mark.parametrize("name", ["zb_h1", "zbv"])
def test_merge_backward(name):
  s = build(name, 3, 6)
  merged = S.merge_backward(s)
  S.validate(merged)
  for before, after in zip(s.actions, merged.actions):
    pairs = sum(1 for x, y in zip(before, before[1:])
                if x.kind is Kind.I and y.kind is Kind.W and (x.stage, x.mb) == (y.stage, y.mb))
    assert len(after) == len(before) - pairs
    assert sum(a.kind is Kind.B for a in after) == pairs
  # Rank 0 of ZB-H1 never defers W, so its backward is fully merged.
  if name == "zb_h1":
    assert merged.actions[0] == build("1f1b", 3, 6).actions[0]
  assert S.merge_backward(build("1f1b", 2, 3)) == build("1f1b", 2, 3)


# ---------------------------------------------------------------------------------------------
# Pictures.


def test_ascii_grid_of_1f1b():
  result = S.simulate(build("1f1b", 2, 2), S.Costs(forward=1, backward=2))
  # Hand-derived: rank 1 runs F0 at 1, B0 over [2, 4); rank 0 gets the cotangent at 4.
  assert S.ascii_grid(result.records()) == (
      "rank 0 | F0 F1  .  . B0 B0  . B1 B1\n"
      "rank 1 |  . F0 B0 B0 F1 B1 B1  .  .\n")


def test_ascii_grid_shows_stage_when_rank_has_several():
  grid = S.ascii_grid(S.simulate(build("zbv", 2, 3)).records())
  lines = grid.splitlines()
  assert len(lines) == 2
  assert lines[0].split("|")[1].split()[:2] == ["0F0", "0F1"]
  assert "1F0" in lines[1] and "2F0" in lines[1]


def test_ascii_grid_accepts_measured_records():
  measured = [(0, "F", 0, 0, 10.0, 10.5), (1, Kind.F, 1, 0, 10.5, 11.0), (0, "opt", 0, 0, 11.0,
                                                                           11.25)]
  grid = S.ascii_grid(measured, slot=0.25)
  assert grid == ("rank 0 |   F0   F0    .    . opt0\n"
                  "rank 1 |    .    .   F0   F0    .\n")
  with pytest.raises(ValueError, match="must be \\(rank, kind, stage, mb, start, end\\)"):
    S.ascii_grid([(0, "F", 0, 0, 1.0)])
  with pytest.raises(ValueError, match="ends before it starts"):
    S.ascii_grid([(0, "F", 0, 0, 1.0, 0.5)])
  assert S.ascii_grid([]) == ""


def _svg_rects(svg):
  root = ET.fromstring(svg)
  ns = "{http://www.w3.org/2000/svg}"
  return root, [r for r in root.iter(ns + "rect") if r.find(ns + "title") is not None]


def test_svg_timeline_has_one_box_per_action_with_kind_colours():
  result = S.simulate(build("zb_h1", 3, 4))
  svg = S.svg_timeline(result.records(), title="zb_h1 <p=3>")
  root, boxes = _svg_rects(svg)
  assert len(boxes) == sum(len(r) for r in result.timeline)
  fills = {b.get("fill") for b in boxes}
  assert fills == {S._draw.COLORS[k] for k in "FIW"}
  assert "zb_h1 &lt;p=3&gt;" in svg
  texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
  assert "rank 2" in texts and "3" in texts  # rank label and a microbatch number


def test_svg_compare_draws_two_titled_panels():
  sim = S.simulate(build("1f1b", 2, 3)).records()
  measured = [(r.rank, r.kind, r.stage, r.mb, 0.001 * r.start, 0.0012 * r.end) for r in sim]
  svg = S.svg_compare(sim, measured, titles=("simulated", "measured"))
  root, boxes = _svg_rects(svg)
  assert len(boxes) == 2 * len(sim)
  titles = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")
            if t.get("font-weight") == "bold"]
  assert titles == ["simulated", "measured"]
  ys = sorted({float(b.get("y")) for b in boxes})
  assert len(ys) == 4  # 2 ranks x 2 panels, one above the other


# ---------------------------------------------------------------------------------------------
# Command line.


def test_cli_prints_grid_numbers_and_writes_svg(tmp_path, capsys):
  from hkpipe.schedules import __main__ as cli
  out_svg = tmp_path / "zbv.svg"
  assert cli.main(["--schedule", "zbv", "--ranks", "4", "--microbatches", "8",
                   "--svg", str(out_svg), "--text"]) == 0
  out = capsys.readouterr().out
  expected = S.simulate(build("zbv", 4, 8))
  assert sum(line.startswith("rank ") for line in out.splitlines()) == 4
  assert f"bubble ratio {expected.bubble_ratio:.4f}" in out
  assert f"peak live activations per rank: {list(expected.peak_activations)}" in out
  assert S.to_text(build("zbv", 4, 8)) in out
  ET.fromstring(out_svg.read_text())


def test_cli_loads_custom_schedule_and_reports_errors(tmp_path, capsys):
  from hkpipe.schedules import __main__ as cli
  path = tmp_path / "custom.txt"
  path.write_text("0F0 0F1 0B0 0B1\n1F0 1B0 1F1 1B1\n")
  assert cli.main(["--from-file", str(path)]) == 0
  assert "custom: 2 ranks" in capsys.readouterr().out
  path.write_text("0F0 0B0 0F1 0B1\n1F1 1B1 1F0 1B0\n")
  with pytest.raises(SystemExit) as info:
    cli.main(["--from-file", str(path)])
  assert info.value.code == 2
  assert "rank 0, position 1, action 0B0: deadlock" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["--schedule", "interleaved_1f1b", "--ranks", "2"])
  assert "needs virtual_stages >= 2" in capsys.readouterr().err


def test_cli_stages_is_the_deprecated_spelling_of_ranks(capsys):
  from hkpipe.schedules import __main__ as cli
  assert cli.main(["--schedule", "1f1b", "--ranks", "2", "--microbatches", "2"]) == 0
  new = capsys.readouterr().out
  with pytest.warns(FutureWarning, match=r"--stages is deprecated; use --ranks instead"):
    assert cli.main(["--schedule", "1f1b", "--stages", "2", "--microbatches", "2"]) == 0
  assert capsys.readouterr().out == new and new.startswith("1f1b: 2 ranks")
  with pytest.raises(SystemExit) as info:
    cli.main(["--schedule", "1f1b", "--stages", "2", "--ranks", "2"])
  assert info.value.code == 2
  assert "both --stages=2 (deprecated) and --ranks=2" in capsys.readouterr().err


def test_cli_as_module():
  proc = subprocess.run([sys.executable, "-m", "hkpipe.schedules", "--schedule", "1f1b",
                         "--ranks", "2", "--microbatches", "2", "--backward", "2"],
                        capture_output=True, text=True, check=True, timeout=120)
  assert "rank 0 | F0 F1  .  . B0 B0  . B1 B1" in proc.stdout
  assert "bubble ratio 0.3333" in proc.stdout
