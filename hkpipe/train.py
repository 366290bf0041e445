"""Training: the loop, its config, the optimizer and checkpoints.

- :func:`train` runs (or resumes) a run from a config into a workdir.
- :func:`default_config` lists every config field with its default; :func:`validate_config`
  rejects unknown fields and impossible values (``hkpipe.ConfigError``) before anything runs.
- :class:`OptimizerConfig`, :func:`adamw`, :func:`lr_schedule`: AdamW + warmup-cosine.
- :class:`Checkpointer`: orbax checkpoints of the canonical (layout-independent) state;
  :class:`CorruptCheckpointError` when one is damaged.
- :class:`Progress`, :class:`Watchdog`, :class:`WatchdogConfig`: the hang watchdog (where a
  process is in the run; it exits with that position when it stops moving).
- :class:`NonFiniteStepsError`: ``train`` stopped after ``config.max_consecutive_skips`` steps in a
  row had a non-finite loss or gradient norm.
"""

from hkpipe._src.checkpoint import Checkpointer
from hkpipe._src.checkpoint import CorruptCheckpointError
from hkpipe._src.optim import OptimizerConfig
from hkpipe._src.optim import adamw
from hkpipe._src.optim import lr_schedule
from hkpipe._src.step_guard import NonFiniteStepsError
from hkpipe._src.trainer import default_config
from hkpipe._src.trainer import model_config
from hkpipe._src.trainer import pipeline_options
from hkpipe._src.trainer import train
from hkpipe._src.trainer import validate_config
from hkpipe._src.watchdog import Progress
from hkpipe._src.watchdog import Watchdog
from hkpipe._src.watchdog import WatchdogConfig

__all__ = ("Checkpointer", "CorruptCheckpointError", "NonFiniteStepsError", "OptimizerConfig",
           "Progress", "Watchdog", "WatchdogConfig", "adamw", "default_config", "lr_schedule",
           "model_config", "pipeline_options", "train", "validate_config")
