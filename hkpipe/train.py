"""Training: the loop, its config, the optimizer and checkpoints.

- :func:`train` runs (or resumes) a run from a config into a workdir.
- :func:`default_config` lists every config field with its default.
- :class:`OptimizerConfig`, :func:`adamw`, :func:`lr_schedule`: AdamW + warmup-cosine.
- :class:`Checkpointer`: orbax checkpoints of the canonical (layout-independent) state;
  :class:`CorruptCheckpointError` when one is damaged.
"""

from hkpipe._src.checkpoint import Checkpointer
from hkpipe._src.checkpoint import CorruptCheckpointError
from hkpipe._src.optim import OptimizerConfig
from hkpipe._src.optim import adamw
from hkpipe._src.optim import lr_schedule
from hkpipe._src.trainer import default_config
from hkpipe._src.trainer import model_config
from hkpipe._src.trainer import pipeline_options
from hkpipe._src.trainer import train

__all__ = ("Checkpointer", "CorruptCheckpointError", "OptimizerConfig", "adamw", "default_config",
           "lr_schedule", "model_config", "pipeline_options", "train")
