"""Samples text from a training run's newest checkpoint (``launch/sample.py``).

The run's config comes from its newest checkpoint (the metadata the trainer writes), with the
command line's ``--config.*`` overrides on top; only the layout fields (``backend``,
``pipeline.*``) may differ from training: checkpoints hold the canonical, layout-independent
state, so a run trained under any backend and stage count decodes under any other. Decoding runs
with :meth:`hkpipe.Pipeline.generate`: ``mpmd`` decodes on the pipeline's stages, ``single`` on
one device; a run trained with ``spmd`` decodes with ``mpmd`` on the same stages and devices, and
one trained with ``pmap`` with ``single``, unless ``--config.backend`` says otherwise. Decoding
with ``single`` (or ``pmap``) starts from the default ``pipeline`` fields (the run's stage layout
does not apply to it).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from hkpipe import models
from hkpipe._src import checkpoint as ckpt_lib
from hkpipe._src import errors
from hkpipe._src import optim
from hkpipe._src import pipeline as pipeline_lib
from hkpipe._src import pipelined_decode
from hkpipe._src import run_log
from hkpipe._src import tokenizer as tokenizer_lib
from hkpipe._src import trainer
from hkpipe._src.models import generate as generate_lib
from hkpipe._src.models import sampling

DECODING_BACKEND = {"spmd": "mpmd", "pmap": "single"}  # trained with -> decodes with
LAYOUT_FIELDS = ("backend", "pipeline.")
PIPELINED = ("mpmd", "spmd")


@dataclasses.dataclass(frozen=True)
class Request:
  """What to sample (checked by :meth:`hkpipe.Pipeline.generate` before compiling).

  Attributes:
    prompt: text; encoded with the run's tokenizer (bytes or its BPE).
    max_new_tokens: tokens per sample; None: fill the model's context after the prompt.
    temperature, top_k, top_p: as :func:`hkpipe.models.generate` (``top_k=0``/``top_p=1``: off).
    num_samples: how many samples of the prompt (the batch).
    seed: PRNG seed.
    num_groups: sequence groups in flight (mpmd); None: one per rank when they divide the batch.
  """

  prompt: str = "ROMEO:"
  max_new_tokens: int | None = None
  temperature: float = 0.8
  top_k: int | None = None
  top_p: float | None = None
  num_samples: int = 1
  seed: int = 0
  num_groups: int | None = None


def _set(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  *parents, leaf = path.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def run_config(checkpoints: ckpt_lib.Checkpointer, overrides: Mapping[str, Any]
               ) -> tuple[ml_collections.ConfigDict, int, tokenizer_lib.Tokenizer]:
  """The newest checkpoint's run config with the layout overrides applied, its step, and the
  tokenizer the run trained with.

  Raises:
    ConfigError: no checkpoint, an override outside the layout fields, or a vocabulary of no
      known tokenizer (neither bytes nor the run's BPE).
  """
  newest = checkpoints.newest_meta()
  if newest is None:
    raise errors.ConfigError(f"No checkpoint in {checkpoints.directory}; train the run first "
                             "(launch/train.py --workdir=...) or point --workdir at a run.")
  step, meta = newest
  tokenizer = tokenizer_lib.of_run(meta.get("data", {}), str(checkpoints.directory))
  config = ml_collections.ConfigDict(meta["config"])
  other = sorted(k for k in overrides if not k.startswith(LAYOUT_FIELDS))
  if other:
    raise errors.ConfigError(f"--config.{other[0]} cannot change when sampling: the model and "
                             "training fields come from the checkpoint; only --config.backend "
                             "and --config.pipeline.* choose the decoding layout.")
  trained = config.backend
  config.backend = overrides.get("backend", DECODING_BACKEND.get(trained, trained))
  if config.backend != trained and config.backend not in PIPELINED:
    # The run's stage layout means nothing here: start from the default (one device / all dp).
    config.pipeline = trainer.default_config().pipeline
  for path, value in overrides.items():
    _set(config, path, value)
  trainer.validate_config(config)
  return config, step, tokenizer


def restore(config: ml_collections.ConfigDict, checkpoints: ckpt_lib.Checkpointer
            ) -> tuple[pipeline_lib.Pipeline, pipeline_lib.TrainState, int]:
  """A pipeline of ``config``'s layout holding the newest checkpoint's state, and its step."""
  mcfg = trainer.model_config(config)
  ocfg = trainer.optimizer_config(config)
  pipe = pipeline_lib.Pipeline(models.build(mcfg), optim.adamw(ocfg), backend=config.backend,
                               **trainer.pipeline_options(config))
  rows = np.zeros((int(config.batch_size), mcfg.seq_len), np.int32)  # shapes only
  state = pipe.init(jax.random.key(int(config.seed)), (rows, rows))
  restored = checkpoints.restore_latest(pipe.to_canonical(state))
  if restored is None:
    raise errors.ConfigError(f"No readable checkpoint left in {checkpoints.directory}.")
  return pipe, pipe.from_canonical(restored.state, restored.step), restored.step


def sample(workdir: str | pathlib.Path, request: Request,
           overrides: Mapping[str, Any] | None = None) -> tuple[list[str], dict]:
  """Samples ``request.num_samples`` continuations of the prompt from the run in ``workdir``.

  Returns:
    ``(texts, info)``: the decoded samples (prompt included) and ``{"step", "backend", "layout"}``.
  """
  checkpoints = ckpt_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints")
  config, _, tokenizer = run_config(checkpoints, dict(overrides or {}))
  seq_len = int(config.model.seq_len)
  prompt = tokenizer.encode(request.prompt)
  if prompt.size == 0:
    raise errors.ConfigError("--prompt is empty; give at least one character to continue.")
  n = request.max_new_tokens
  if n is None:
    n = max(seq_len - prompt.size, 0)
  if isinstance(request.num_samples, bool) or not isinstance(request.num_samples, int) or (
      request.num_samples < 1):
    raise errors.ConfigError(f"--num_samples={request.num_samples!r} must be an int >= 1.")
  # Every argument is checked before anything is built, restored or compiled.
  settings = sampling.Sampling(request.temperature, request.top_k or None, request.top_p)
  settings.check_vocab(int(config.model.vocab_size))
  generate_lib.check_fits(prompt.size, n, seq_len)
  if request.num_groups is not None:
    pipelined_decode.check_groups(request.num_groups, request.num_samples)
  tokens = np.tile(prompt.astype(np.int32)[None], (request.num_samples, 1))
  pipe, state, step = restore(config, checkpoints)
  out = np.asarray(pipe.generate(
      state, tokens, max_new_tokens=n, rng=jax.random.key(request.seed),
      temperature=request.temperature, top_k=settings.top_k, top_p=request.top_p,
      num_groups=request.num_groups))
  layout = pipe.layout
  info = {"step": step, "backend": config.backend,
          "layout": run_log.describe_layout(layout) if layout is not None else "one device"}
  return [tokenizer.decode(row) for row in out], info
