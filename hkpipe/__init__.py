"""hkpipe: pipeline-parallel training of Haiku models in JAX.

Public API (everything else is private):

- Model layer: :class:`Layer`, :class:`SequentialModel`, :class:`Tie`, :func:`count_params`,
  :func:`with_compute_dtype`; models in :mod:`hkpipe.models`; mixed-precision policies in
  :mod:`hkpipe.precision`.
- Partitioning: :func:`partition`, :class:`StageSpec`.
- Errors: :class:`ConfigError` (bad config values, options and inputs).
- Training: :class:`Pipeline`, :class:`PipelineOptions`, :class:`TrainState`,
  :class:`DataLayout` (which batch rows a process feeds), :func:`available_backends`.
- Submodules: :mod:`hkpipe.models` (GPT, Llama), :mod:`hkpipe.data` (text data),
  :mod:`hkpipe.schedules` (schedule IR, validator, simulator, pictures), :mod:`hkpipe.sharding`
  (mesh axes and parameter sharding rules) and :mod:`hkpipe.train`
  (training loop, optimizer, checkpoints; imported on demand since it loads orbax);
  :mod:`hkpipe.report` (a run's loss picture, timeline picture and trace; imported on demand,
  ``python -m hkpipe.report WORKDIR``); :mod:`hkpipe.testing` (assertions for users' test
  suites: a pipeline against its unpipelined reference, schedule validity).
"""

from hkpipe._src.errors import ConfigError
from hkpipe._src.model import Layer
from hkpipe._src.model import SequentialModel
from hkpipe._src.model import Tie
from hkpipe._src.model import count_params
from hkpipe._src.model import with_compute_dtype
from hkpipe._src.partition import StageSpec
from hkpipe._src.partition import partition
from hkpipe._src.pipeline import DataLayout
from hkpipe._src.pipeline import Pipeline
from hkpipe._src.options import PipelineOptions
from hkpipe._src.pipeline import TrainState
from hkpipe._src.options import available_backends

from hkpipe import data
from hkpipe import models
from hkpipe import precision
from hkpipe import schedules
from hkpipe import sharding
from hkpipe import testing

__version__ = "0.1.0"

__all__ = (
    "ConfigError",
    "DataLayout",
    "Layer",
    "Pipeline",
    "PipelineOptions",
    "SequentialModel",
    "StageSpec",
    "Tie",
    "TrainState",
    "available_backends",
    "count_params",
    "partition",
    "with_compute_dtype",
)
