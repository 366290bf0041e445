"""Static plan of the spmd backend: supported schedules, parameter/optimizer placement
(``_Plan``, ``_Tie``) and the per-batch-shape program structure (``_Program``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np

from hkpipe._src import layout as layout_lib
from hkpipe._src import stage as stage_lib
from hkpipe._src.backends.spmd import _pack as pack
from hkpipe._src.backends.spmd import _tables as tables_lib

# Schedule names this backend is tested with (tests/test_spmd.py runs every one of them).
SUPPORTED_SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv",
                                         "dualpipev")


def _check_schedule(schedule: Any) -> None:
  if isinstance(schedule, str) and schedule not in SUPPORTED_SCHEDULES:
    raise ValueError(f"The spmd backend does not support schedule {schedule!r}; it supports "
                     f"{list(SUPPORTED_SCHEDULES)} (or pass a hkpipe.schedules Schedule object). "
                     "Use backend='mpmd' for other schedules.")


@dataclasses.dataclass(frozen=True)
class _Tie:
  """Where both sides of a tie live: per rank, whether it holds each side and at which column
  of its devices' pieces; ``size`` is the columns each side spans (``_columns``)."""

  dtype: str
  size: int
  src_on: tuple[bool, ...]
  src_off: tuple[int, ...]
  tgt_on: tuple[bool, ...]
  tgt_off: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static placement of parameters and optimizer state (independent of the batch shape).

  Attributes:
    layout: schedule, stages and device grid.
    stage_layouts: per stage, where its ``{layer: params}`` live in its rank's buffers.
    stage_tp_specs: per stage, ``{layer: params}`` of ``PartitionSpec`` s: the rules' ``tp``
      entries (tensor-parallel compute when ``tp > 1``).
    param_sizes: per dtype, the padded length of every rank's parameter buffer.
    opt_layouts: per rank, where its optimizer state lives in its buffers.
    opt_sizes: per dtype, the padded length of the optimizer-state buffers.
    ties: the model's ties, located.
    tables: the schedule's tick tables (see ``_tables``).
  """

  layout: layout_lib.Layout
  stage_layouts: tuple[pack.FlatLayout, ...]
  stage_tp_specs: tuple[Any, ...]
  param_sizes: Mapping[str, int]
  opt_layouts: tuple[pack.FlatLayout, ...]
  opt_sizes: Mapping[str, int]
  ties: tuple[_Tie, ...]
  tables: tables_lib.TickTables

  @property
  def num_ranks(self) -> int:
    return self.layout.num_ranks

  @property
  def num_stages(self) -> int:
    return len(self.layout.stages)

  def rank_stages(self, rank: int) -> tuple[int, ...]:
    return self.layout.schedule.stages_of_rank(rank)

  def rank_of(self, stage: int) -> int:
    return self.layout.schedule.stage_to_rank[stage]

  def rank_names(self, rank: int) -> tuple[str, ...]:
    return tuple(n for s in self.rank_stages(rank) for n in self.layout.stages[s].layer_names)


@dataclasses.dataclass(frozen=True)
class _StageBackward:
  """How a stage's stash maps back to its ``vjp`` pullback (recorded by an abstract pre-pass)."""

  residuals: stage_lib.Residuals  # the pullback's structure; "in" leaves are parameter leaves
  layout: pack.FlatLayout         # where the stashed leaves go in a stash row


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class _Program:
  """Everything that depends on the batch shape: boundary codecs and stash structure."""

  act_codecs: tuple[pack.ByteCodec, ...]   # per boundary s (output of stage s), s < S-1
  cot_codecs: tuple[pack.ByteCodec, ...]
  payload_bytes: int
  backward: tuple[_StageBackward, ...]
  stash_strides: tuple[Mapping[str, int], ...]  # per rank, per dtype: its stash slots' stride
  stash_sizes: Mapping[str, int]           # per dtype, the length of the (1-D) stash buffer


def _shape_key(tree: Any) -> Any:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(np.shape(x)), str(x.dtype)) for x in leaves)
