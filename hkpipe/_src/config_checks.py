"""Checks of a training config before anything is built or compiled.

``validate(config, defaults)`` rejects unknown fields and every value that cannot work, each with a
:class:`~hkpipe._src.errors.ConfigError` naming the field, the value and the fix, so a bad flag
fails in a second instead of deep inside tracing. ``pipeline_sizes`` resolves how many pipeline
ranks and data-parallel replicas a backend gets and rejects the ``pipeline.*`` fields the backend
does not use. Both are pure functions of the config and the device/process counts.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from hkpipe._src import deprecation
from hkpipe._src import options as options_lib
from hkpipe._src.errors import ConfigError

# The PipelineOptions option each config.pipeline.* field sets (``pipeline.dp`` sizes the device
# set, which only backends taking a mesh use; ``pipeline.fsdp``/``tp`` add mesh axes inside the
# stages, which only backends that shard inside stages, i.e. take ``sharding_rules``, use), and the
# values that mean "not given". Which backend rejects which field follows from
# options.OPTION_BACKENDS, the one table of who uses what.
_FIELD_OPTION = {"ranks": "num_ranks", "stages": "num_ranks", "schedule": "schedule",
                 "virtual_stages": "virtual_stages", "boundaries": "partition",
                 "partition_cost": "partition", "dp": "mesh", "record_timeline": "record_timeline",
                 "fsdp": "sharding_rules", "tp": "sharding_rules",
                 "sharding_rules": "sharding_rules"}
_NOT_GIVEN = {"ranks": (None, 1), "stages": (None, 1), "dp": (None, 1), "fsdp": (None, 1),
              "tp": (None, 1), "record_timeline": (None, False)}

# Names ``config.pipeline.sharding_rules`` accepts (unset: the pipeline's default rules).
SHARDING_RULES = {
    "fsdp": "the default FSDP rule for every leaf (its largest dimension divisible by fsdp)",
    "model": "the model's tensor-parallel rules (hkpipe.models.sharding_rules), FSDP elsewhere",
}


class Sizes(NamedTuple):
  """Device counts of a run: pipeline ranks, and per rank ``dp`` x ``fsdp`` x ``tp`` devices."""

  ranks: int
  dp: int
  fsdp: int = 1
  tp: int = 1


def _flag(path: str, value: Any) -> str:
  return f"config.{path}={value!r}"


def _int(config: Any, path: str, *, minimum: int, fix: str, optional: bool = False) -> None:
  value = _get(config, path)
  if value is None and optional:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f"{_flag(path, value)} must be an int >= {minimum}; {fix}.")


def _number(config: Any, path: str, *, low: float, high: float = math.inf, low_open: bool = False,
            high_open: bool = False, fix: str, optional: bool = False) -> None:
  value = _get(config, path)
  if value is None and optional:
    return
  ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high))
  if not ok:
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    raise ConfigError(f"{_flag(path, value)} must be a finite number in {lo}{low}, {high}{hi}; "
                      f"{fix}.")


def _get(config: Any, path: str) -> Any:
  node = config
  for part in path.split("."):
    node = node[part]
  return node


def _unknown_fields(config: Any, defaults: Any, prefix: str = "") -> list[str]:
  """Dotted names of fields in ``config`` that ``defaults`` lacks (``model.*`` is checked by the
  model config class, which knows its own fields)."""
  out = []
  for key in config.keys():
    path = f"{prefix}{key}"
    if key not in defaults:
      out.append(path)
    elif path != "model" and hasattr(defaults[key], "keys") and hasattr(config[key], "keys"):
      out.extend(_unknown_fields(config[key], defaults[key], path + "."))
  return out


def validate(config: Any, defaults: Any, *, backends: tuple[str, ...],
             schedule_names: tuple[str, ...]) -> None:
  """Rejects unknown fields and impossible values of a training config.

  Args:
    config: the run's ``ml_collections.ConfigDict``.
    defaults: ``hkpipe.train.default_config()`` (the known fields).
    backends: accepted ``config.backend`` values.
    schedule_names: accepted ``config.pipeline.schedule`` names.

  Raises:
    ConfigError: naming the first bad field, its value and the fix.
  """
  unknown = _unknown_fields(config, defaults)
  if unknown:
    raise ConfigError(f"Unknown config fields {unknown}; check the spelling against "
                      "hkpipe.train.default_config() (docs/training.md lists every field).")
  if config.backend not in backends:
    raise ConfigError(f"{_flag('backend', config.backend)} is unknown; use one of "
                      f"{list(backends)}.")
  _int(config, "seed", minimum=0, fix="use a non-negative seed, e.g. --config.seed=0")
  _int(config, "batch_size", minimum=1, fix="use a positive global batch size, e.g. "
       "--config.batch_size=32")
  _int(config, "num_steps", minimum=1, fix="use a positive step count")
  _int(config, "log_every", minimum=1, fix="log every N >= 1 steps")
  _int(config, "eval_every", minimum=0, fix="use 0 to disable evaluation, else N >= 1")
  _int(config, "eval_batches", minimum=1, fix="evaluate on N >= 1 batches")
  _int(config, "checkpoint_every", minimum=0, fix="use 0 to checkpoint only at the end, else "
       "N >= 1")
  _int(config, "keep_checkpoints", minimum=1, fix="keep N >= 1 checkpoints")
  _int(config, "sample_tokens", minimum=0, fix="use 0 to skip the sample")
  _int(config, "max_consecutive_skips", minimum=1, fix="it is how many training steps in a row "
       "may have a non-finite loss or gradient norm, and be skipped, before the run stops; use "
       "e.g. 5")
  _number(config, "sample_temperature", low=0.0, fix="use e.g. 0.8, or 0 for greedy decoding")
  _int(config, "sample_top_k", minimum=1, optional=True, fix="leave it unset for no top-k, or "
       "use k >= 1")
  _number(config, "peak_tflops", low=0.0, low_open=True, optional=True,
          fix="give the device's peak TFLOP/s, or leave it unset")
  _number(config, "data.val_fraction", low=0.0, high=1.0, low_open=True, high_open=True,
          fix="use e.g. 0.1")
  _number(config, "optim.learning_rate", low=0.0, low_open=True, fix="use e.g. 1e-3")
  _int(config, "optim.warmup_steps", minimum=0, fix="use 0 for no warmup")
  _number(config, "optim.min_lr_ratio", low=0.0, high=1.0, fix="use e.g. 0.1")
  _number(config, "optim.weight_decay", low=0.0, fix="use 0 for none")
  _number(config, "optim.b1", low=0.0, high=1.0, high_open=True, fix="use e.g. 0.9")
  _number(config, "optim.b2", low=0.0, high=1.0, high_open=True, fix="use e.g. 0.95")
  _number(config, "optim.eps", low=0.0, low_open=True, fix="use e.g. 1e-8")
  _number(config, "optim.max_grad_norm", low=0.0, optional=True,
          fix="use 0 (or leave it unset) to disable clipping, else a positive norm")
  if config.optim.warmup_steps >= config.num_steps:
    raise ConfigError(f"{_flag('optim.warmup_steps', config.optim.warmup_steps)} must be below "
                      f"{_flag('num_steps', config.num_steps)}; lower the warmup or train longer.")
  _int(config, "pipeline.num_microbatches", minimum=1, fix="use e.g. "
       "--config.pipeline.num_microbatches=4")
  _int(config, "pipeline.ranks", minimum=1, optional=True,
       fix="give the number of pipeline ranks, e.g. --config.pipeline.ranks=4, or leave it unset")
  _int(config, "pipeline.stages", minimum=1, optional=True,
       fix="give the number of pipeline ranks, e.g. --config.pipeline.ranks=4 (pipeline.stages is "
       "its deprecated spelling), or leave it unset")
  deprecation.renamed("config.pipeline.stages", config.pipeline.stages, "config.pipeline.ranks",
                      config.pipeline.ranks, where="the training config",
                      why="pipeline.stages meant pipeline ranks; the model has ranks x "
                      "virtual_stages stages.", stacklevel=3)
  _int(config, "pipeline.dp", minimum=1, optional=True,
       fix="give the data-parallel width, e.g. --config.pipeline.dp=2, or leave it unset")
  _int(config, "pipeline.fsdp", minimum=1, optional=True,
       fix="give the FSDP width inside each stage, e.g. --config.pipeline.fsdp=2, or leave it "
       "unset")
  _int(config, "pipeline.tp", minimum=1, optional=True,
       fix="give the tensor-parallel width inside each stage, e.g. --config.pipeline.tp=2, or "
       "leave it unset")
  rules = config.pipeline.get("sharding_rules")
  if rules is not None and rules not in SHARDING_RULES:
    raise ConfigError(f"{_flag('pipeline.sharding_rules', rules)} is unknown; use one of "
                      f"{list(SHARDING_RULES)} ("
                      + "; ".join(f"{k!r}: {v}" for k, v in SHARDING_RULES.items())
                      + "), or leave it unset for the pipeline's default.")
  _int(config, "pipeline.virtual_stages", minimum=1, optional=True,
       fix="give the stages per rank, e.g. 2, or leave it unset (the schedule's default)")
  pipe = config.pipeline
  if pipe.schedule is not None and pipe.schedule not in schedule_names:
    raise ConfigError(f"{_flag('pipeline.schedule', pipe.schedule)} is unknown; use one of "
                      f"{list(schedule_names)}.")
  if pipe.partition_cost is not None and pipe.partition_cost not in ("params", "flops"):
    raise ConfigError(f"{_flag('pipeline.partition_cost', pipe.partition_cost)} is unknown; use "
                      "'params' or 'flops', or give pipeline.boundaries.")
  if pipe.boundaries is not None:
    bounds = list(pipe.boundaries)
    if any(isinstance(b, bool) or not isinstance(b, int) for b in bounds) or bounds != sorted(
        set(bounds)) or (bounds and bounds[0] < 1):
      raise ConfigError(f"{_flag('pipeline.boundaries', pipe.boundaries)} must be strictly "
                        "increasing layer indices >= 1 (where stages 1, 2, ... start), e.g. "
                        "(2, 4, 6).")
  profile_window(config)
  if config.batch_size % pipe.num_microbatches:
    raise ConfigError(f"{_flag('batch_size', config.batch_size)} is not divisible by "
                      f"{_flag('pipeline.num_microbatches', pipe.num_microbatches)}; use a batch "
                      f"size that is a multiple of {pipe.num_microbatches}.")


def profile_window(config: Any) -> tuple[int, int] | None:
  """``config.profile_steps`` as ``(first, last)`` train steps (1-based, inclusive; one number:
  that step alone), or None when unset.

  Raises:
    ConfigError: not one or two ints with ``1 <= first <= last <= num_steps``.
  """
  value = config.get("profile_steps")
  if value is None:
    return None
  steps = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if len(steps) == 1:
    steps = steps * 2
  if (len(steps) != 2 or any(isinstance(s, bool) or not isinstance(s, int) for s in steps)
      or not 1 <= steps[0] <= steps[1] <= config.num_steps):
    raise ConfigError(f"{_flag('profile_steps', value)} must be FIRST,LAST train steps with "
                      f"1 <= FIRST <= LAST <= num_steps={config.num_steps} (or one step), e.g. "
                      "--config.profile_steps=5,7.")
  return steps[0], steps[1]


def pipeline_sizes(config: Any, *, device_count: int, process_count: int) -> Sizes:
  """The device counts (:class:`Sizes`) that ``config.backend`` runs with.

  - ``single``: ``(1, 1, 1, 1)``; ``pipeline.ranks``/``dp``/``fsdp``/``tp`` other than 1 and the
    pipeline-only fields are rejected.
  - ``pmap``: ``(1, dp, 1, 1)``, ``dp`` defaulting to every device of the run; ``pipeline.ranks``
    other than 1 and the pipeline-only fields are rejected.
  - ``spmd``/``mpmd``: ``dp``, ``fsdp`` and ``tp`` default to 1 and ``ranks`` to every device
    divided by ``dp x fsdp x tp``. ``fsdp``/``tp`` (mesh axes inside each stage) and
    ``sharding_rules`` only on the backends that shard inside stages (``options.OPTION_BACKENDS``,
    row ``sharding_rules``). Across processes, MPMD needs ``ranks`` to be a multiple of the
    process count, so that every rank's ``dp x fsdp x tp`` devices are on one process.

  ``pipeline.stages`` is read as the deprecated spelling of ``pipeline.ranks`` (``validate``
  warns about it).

  Raises:
    ConfigError: for a field the backend does not use, sizes that do not fit the devices, or a
      batch the sizes cannot split (naming the fields and the fix).
  """
  backend, pipe = config.backend, config.pipeline
  ranks = pipe.get("stages") if pipe.get("stages") is not None else pipe.get("ranks")
  unused = options_lib.unused_options(backend)
  given = [f for f, option in _FIELD_OPTION.items()
           if option in unused and pipe.get(f) not in _NOT_GIVEN.get(f, (None,))]
  if given:
    shown = ", ".join(_flag(f"pipeline.{f}", pipe[f]) for f in given)
    users = options_lib.backends_using(sorted({_FIELD_OPTION[f] for f in given})) or ("mpmd",)
    use = "pipeline.dp for data parallelism or " if backend == "single" else ""
    alt = users[0] + (f" (or {', '.join(users[1:])})" if len(users) > 1 else "")
    if backend in options_lib.PIPELINED:   # what it lacks: sharding inside stages
      why, goal = f" (sharding inside stages: {' and '.join(users)} only, for now)", ""
    else:
      why, goal = "", " to pipeline the model"
    raise ConfigError(f"backend={backend!r} does not use {shown}{why}; drop "
                      f"{'it' if len(given) == 1 else 'them'}, or use {use}"
                      f"--config.backend={alt}{goal}.")
  if backend == "single":
    return Sizes(1, 1)
  fsdp = 1 if pipe.get("fsdp") is None else int(pipe.fsdp)
  tp = 1 if pipe.get("tp") is None else int(pipe.tp)
  if backend == "pmap":
    ranks, dp = 1, (device_count if pipe.dp is None else int(pipe.dp))
  else:
    dp = 1 if pipe.dp is None else int(pipe.dp)
    ranks = device_count // (dp * fsdp * tp) if ranks is None else int(ranks)
    if ranks < 1:
      raise ConfigError(f"pipeline.dp={dp} x pipeline.fsdp={fsdp} x pipeline.tp={tp} = "
                        f"{dp * fsdp * tp} devices per rank leave no device for the pipeline "
                        f"({device_count} visible); lower them or simulate more devices with "
                        f"--host_devices.")
  sizes = Sizes(ranks, dp, fsdp, tp)
  need = ranks * dp * fsdp * tp
  shown = f"pipeline.ranks={ranks}, pipeline.dp={dp}"
  shown += "".join(f", pipeline.{k}={v}" for k, v in (("fsdp", fsdp), ("tp", tp)) if v > 1)
  if need > device_count:
    raise ConfigError(f"backend={backend!r} with {shown} needs {need} devices but "
                      f"{device_count} are visible (ranks x dp x fsdp x tp); lower them, or on "
                      f"CPU simulate more with --host_devices={need} (launch/train.py).")
  if process_count > 1 and need % process_count:
    raise ConfigError(f"{shown} = {need} devices cannot be spread evenly over {process_count} "
                      f"processes; use a multiple of {process_count}.")
  if backend == "mpmd" and process_count > 1 and ranks % process_count:
    raise ConfigError(f"backend='mpmd' across {process_count} processes drives each pipeline "
                      f"rank from one process, but pipeline.ranks={ranks} is not a multiple of "
                      f"{process_count} (a rank's dp x fsdp x tp devices would span processes); "
                      f"use pipeline.ranks = a multiple of {process_count}.")
  m = int(pipe.num_microbatches)
  rows = config.batch_size // m
  width = dp * fsdp                   # FSDP splits the batch too; tp does not
  if rows % width:
    what = f"dp={dp}" if fsdp == 1 else f"dp x fsdp = {dp} x {fsdp} = {width}"
    raise ConfigError(f"Each of the {m} microbatches of batch_size={config.batch_size} has {rows} "
                      f"rows, not divisible by the data-parallel width {what}; use a batch size "
                      f"that is a multiple of {m * width} (num_microbatches x "
                      f"{'dp' if fsdp == 1 else 'dp x fsdp'}).")
  if backend != "mpmd" and process_count > 1 and config.batch_size % process_count:
    raise ConfigError(f"batch_size={config.batch_size} cannot be split into {process_count} equal "
                      f"process-local parts; use a multiple of {process_count}.")
  return sizes
