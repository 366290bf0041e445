"""The run's config: defaults, validation, and what it builds (model config, optimizer config,
pipeline options). The fields are documented in ``docs/training.md``; ``trainer.train`` runs it.
"""

from __future__ import annotations
import dataclasses
from typing import Any
import jax
import ml_collections
import numpy as np
from hkpipe import models
from hkpipe._src import config_checks
from hkpipe._src import ema as ema_lib
from hkpipe._src import errors
from hkpipe._src import layout as layout_lib
from hkpipe._src import optim
from hkpipe._src import options as options_lib
from hkpipe._src import remat as remat_lib
from hkpipe._src import puzzles
from hkpipe._src import sharding as sharding_lib
from hkpipe._src import step_guard
from hkpipe._src import tokenizer as tokenizer_lib
from hkpipe._src import watchdog as watchdog_lib

_MODEL_CONFIGS = {"gpt": "GPTConfig", "llama": "LlamaConfig", "moe": "MoEConfig",
                  "trm": "TRMConfig"}


def default_config() -> ml_collections.ConfigDict:
  """Every field ``train`` reads, with defaults; experiments override what they need.

  Fields (see docs/training.md): ``seed``; ``model`` (``name`` + the model config's fields);
  ``data`` (``dir``, ``source``, ``val_fraction``, ``tokenizer``: ``"bytes"`` or ``"bpe"``,
  ``vocab_size``: the BPE's, which the model's follows); ``batch_size``; ``num_steps``; ``optim``
  (AdamW + schedule + ``max_grad_norm``); ``backend``; ``pipeline`` (``ranks``, ``dp``,
  ``fsdp``, ``tp``, ``sharding_rules``, ``num_microbatches``, ``schedule``, ``virtual_stages``,
  ``boundaries``, ``partition_cost``, ``remat``, ``remat_policy``: a name from
  ``hkpipe._src.remat.POLICIES``, or per-stage names separated by commas, ``none`` for no remat);
  ``log_every``, ``eval_every``, ``eval_batches``, ``checkpoint_every``,
  ``keep_checkpoints``; ``sample_*``; ``peak_tflops`` (for MFU; None: not reported);
  ``watchdog`` (the hang watchdog, see ``hkpipe/_src/watchdog.py`` and docs/launch.md):
  ``timeout_s`` (seconds a train step may make no progress; None: automatic,
  ``max(floor_s, multiple x median step time)``, on in multi-process runs only; a number > 0: that
  deadline, also in a single process; 0: off), ``multiple`` (10.0) and ``floor_s`` (120.0).
  Negative values raise ``ConfigError``;
  ``max_consecutive_skips`` (the run stops after this many steps in a row were skipped for a
  non-finite loss or gradient norm; >= 1); ``tensorboard`` (True: the metrics and the sample also
  go to TensorBoard event files in ``workdir/tensorboard``).

  ``pipeline.stages`` is the deprecated spelling of ``pipeline.ranks`` (it warns).

  Unset ``pipeline`` fields take the backend's defaults: ``ranks`` = every device / ``dp`` and
  ``dp`` = ``fsdp`` = ``tp`` = 1 on ``spmd``/``mpmd``, ``dp`` = every device on ``pmap``,
  ``sharding_rules`` = the pipeline's default (see ``pipeline_options``), ``schedule`` = ``"1f1b"``,
  ``partition_cost`` = ``"params"``; a field the backend does not use is an error (see
  :func:`validate_config`).
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict({"name": "gpt"})
  c.data = ml_collections.ConfigDict({
      "dir": "", "source": "", "val_fraction": 0.1,
      # "bytes" or "bpe" (hkpipe/_src/tokenizer.py); vocab_size: the BPE's (the model's follows).
      "tokenizer": "bytes", "vocab_size": ml_collections.config_dict.placeholder(int),
      # Puzzles generated for model.name="trm" (hkpipe/_src/sudoku.py, SudokuSpec).
      "sudoku": {"seed": 0, "train_base": 200, "test_base": 50, "augmentations": 20,
                 "min_givens": 17}})
  c.batch_size = 32
  c.num_steps = 1000
  c.optim = ml_collections.ConfigDict({
      "learning_rate": 1e-3, "warmup_steps": 100, "min_lr_ratio": 0.1, "weight_decay": 0.1,
      "b1": 0.9, "b2": 0.95, "eps": 1e-8, "max_grad_norm": 1.0})
  c.backend = "single"
  c.pipeline = ml_collections.ConfigDict({
      "ranks": ml_collections.config_dict.placeholder(int),
      "stages": ml_collections.config_dict.placeholder(int),  # deprecated spelling of ranks
      "dp": ml_collections.config_dict.placeholder(int), "num_microbatches": 1,
      "fsdp": ml_collections.config_dict.placeholder(int),
      "tp": ml_collections.config_dict.placeholder(int),
      "sharding_rules": ml_collections.config_dict.placeholder(str),
      "schedule": ml_collections.config_dict.placeholder(str),
      "virtual_stages": ml_collections.config_dict.placeholder(int),
      "boundaries": ml_collections.config_dict.placeholder(tuple),
      "partition_cost": ml_collections.config_dict.placeholder(str), "remat": False,
      "record_timeline": False,

      "remat_policy": ml_collections.config_dict.placeholder(str)})
  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 4
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.sample_tokens = 200
  c.sample_prompt = "ROMEO:"
  c.sample_temperature = 0.8
  c.sample_top_k = ml_collections.config_dict.placeholder(int)
  c.peak_tflops = ml_collections.config_dict.placeholder(float)
  c.watchdog = ml_collections.ConfigDict({
      "timeout_s": ml_collections.config_dict.placeholder(float), "multiple": 10.0,
      "floor_s": 120.0})
  c.max_consecutive_skips = step_guard.DEFAULT_MAX_CONSECUTIVE_SKIPS
  c.tensorboard = True
  c.profile_steps = ml_collections.config_dict.placeholder(tuple)
  c.ema_decay = ml_collections.config_dict.placeholder(float)  # None: no EMA (hkpipe/_src/ema.py)
  return c


def validate_config(config: Any) -> None:
  """Rejects unknown fields and impossible values before anything is built or compiled.

  Raises:
    ConfigError: naming the field, its value and the fix.
  """
  from hkpipe import schedules  # pylint: disable=g-import-not-at-top
  config_checks.validate(config, default_config(), backends=options_lib.available_backends(),
                         schedule_names=schedules.names())
  watchdog_lib.WatchdogConfig.from_config(config.get("watchdog"))
  if config.get("ema_decay") is not None:
    ema_lib.check_decay(config.ema_decay, "config.ema_decay")
  if isinstance(model_config(config), models.TRMConfig):
    puzzles.spec(config)
  tokenizer_lib.spec(config)


def model_config(config: Any) -> Any:
  """The frozen model config (``GPTConfig`` or ``LlamaConfig``) described by ``config.model``.

  With ``config.data.tokenizer="bpe"`` the model's ``vocab_size`` is the tokenizer's,
  ``config.data.vocab_size`` (``config.model.vocab_size`` is not used).

  Raises:
    ConfigError: for an unknown model name, unknown or missing fields, or invalid values.
  """
  fields = dict(config.model)
  name = fields.pop("name", None)
  if name not in _MODEL_CONFIGS:
    raise errors.ConfigError(f"config.model.name={name!r} is unknown; use one of "
                             f"{list(_MODEL_CONFIGS)}.")
  cls = getattr(models, _MODEL_CONFIGS[name])
  tokenizer = tokenizer_lib.spec(config)
  if tokenizer.name != "bytes":
    fields["vocab_size"] = tokenizer.vocab_size
  known = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(fields) - set(known))
  if unknown:
    raise errors.ConfigError(f"config.model has fields {unknown} that {cls.__name__} does not "
                             f"know; its fields are {known}.")
  try:
    return cls(**fields)
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f"config.model ({name}): {e}") from e


def optimizer_config(config: Any) -> optim.OptimizerConfig:
  """The optimizer config from ``config.optim`` and ``config.num_steps``."""
  fields = {k: v for k, v in dict(config.optim).items() if k != "max_grad_norm"}
  return optim.OptimizerConfig(total_steps=config.num_steps, **fields)


def pipeline_options(config: Any, devices: list[Any] | None = None) -> dict:
  """``Pipeline`` keyword options for ``config.backend`` and ``config.pipeline``.

  ``pipeline.ranks`` is the number of pipeline ranks (devices along ``pp``), ``pipeline.dp`` the
  data-parallel width and ``pipeline.fsdp`` / ``pipeline.tp`` the FSDP and tensor-parallel widths
  inside each rank (unset: see :func:`default_config`); the pipelined backends get a
  ``(pp, dp)`` mesh of ``ranks * dp`` devices, with axes ``"fsdp"`` / ``"tp"`` added when those
  are above 1 (``ranks * dp * fsdp * tp`` devices); ``pmap`` gets ``dp`` devices, ``single`` one
  device. Without ``devices``, they are the first ones of the run, spread evenly over the
  processes (see ``layout.spread_devices``; each rank's devices are on one process).
  ``pipeline.sharding_rules`` names built-in rules (``config_checks.SHARDING_RULES``): ``"fsdp"``
  (the default FSDP rule for every leaf) or ``"model"`` (``hkpipe.models.sharding_rules`` of the
  model config over the mesh's inner axes); unset, the pipeline's default.

  Raises:
    ConfigError: for fields the backend does not use and sizes that do not fit (see
      ``config_checks.pipeline_sizes``).
  """
  pipe = config.pipeline
  backend = config.backend
  opts: dict = {"num_microbatches": int(pipe.num_microbatches),
                "max_grad_norm": config.optim.get("max_grad_norm"),
                "remat": remat_lib.from_config(pipe.remat, pipe.get("remat_policy"))}
  visible = len(devices) if devices is not None else jax.device_count()
  sizes = config_checks.pipeline_sizes(config, device_count=visible,
                                       process_count=jax.process_count())
  if backend == "single":
    first = devices[0] if devices is not None else jax.local_devices()[0]
    return {**opts, "devices": [first]}
  count = sizes.ranks * sizes.dp * sizes.fsdp * sizes.tp
  chosen = list(devices[:count]) if devices is not None else layout_lib.spread_devices(count)
  if backend == "pmap":
    return {**opts, "devices": chosen}
  axes = (("pp", sizes.ranks), ("dp", sizes.dp)) + tuple(
      (a, n) for a, n in (("fsdp", sizes.fsdp), ("tp", sizes.tp)) if n > 1)
  mesh = jax.sharding.Mesh(np.asarray(chosen).reshape([n for _, n in axes]),
                           tuple(a for a, _ in axes))
  opts.update(mesh=mesh, schedule=pipe.get("schedule"), virtual_stages=pipe.get("virtual_stages"),
              record_timeline=bool(pipe.get("record_timeline")))
  boundaries = pipe.get("boundaries")
  opts["partition"] = tuple(boundaries) if boundaries else pipe.get("partition_cost")
  rules = pipe.get("sharding_rules")
  if rules == "fsdp":
    opts["sharding_rules"] = sharding_lib.Rules()
  elif rules == "model":
    opts["sharding_rules"] = models.sharding_rules(
        model_config(config), axes=tuple(a for a, _ in axes if a in ("fsdp", "tp")))
  return opts

