"""The training loop: data, model, optimizer, pipeline, metrics, evaluation, checkpoints, samples.

``train(config, workdir)`` drives one ``hkpipe.Pipeline`` whatever its backend. Everything that
defines the run comes from ``config`` (an ``ml_collections.ConfigDict`` built by an experiment's
``get_config``; the fields are documented in ``docs/training.md``). A workdir that already holds a
checkpoint is resumed: parameters, optimizer state, step and data position (batches are a pure
function of (seed, step)), so a resumed run reproduces an uninterrupted one.

Multi-process runs (``jax.distributed`` initialised, every process calling ``train`` with the same
config) feed each process its rows of the global batch or the full batch, as the backend's
``batch_is_process_local`` says; only process 0 writes ``config.json``, ``metrics.jsonl`` and
``samples.txt`` and prints; every process takes part in checkpoints and in the sample.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import threading
import time
from typing import Any, Callable, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from hkpipe import models
from hkpipe._src import checkpoint as ckpt_lib
from hkpipe._src import data as data_lib
from hkpipe._src import ema as ema_lib
from hkpipe._src import errors
from hkpipe._src.models import moe
from hkpipe._src import optim
from hkpipe._src import pipeline as pipeline_lib
from hkpipe._src import puzzles
from hkpipe._src import resume as resume_lib
from hkpipe._src import run_extras
from hkpipe._src import run_log
from hkpipe._src import staged_eval
from hkpipe._src import step_guard
from hkpipe._src import tokenizer as tokenizer_lib
from hkpipe._src import watchdog as watchdog_lib
from hkpipe._src.run_config import default_config  # re-exported: hkpipe.train
from hkpipe._src.run_config import model_config
from hkpipe._src.run_config import optimizer_config
from hkpipe._src.run_config import pipeline_options
from hkpipe._src.run_config import validate_config

# How long a multi-process run waits for the checkpoint it attempts after an exception.
CRASH_SAVE_TIMEOUT_S = 20.0

__all__ = ("decodes_in_place", "default_config", "eval_loop", "model_config", "optimizer_config",
           "pipeline_options", "sample_in_place", "sample_text", "train", "validate_config")


def _run_bounded(fn: Callable[[], None], timeout_s: float | None) -> BaseException | str | None:
  """Runs ``fn``; returns None on success, its exception, or a message if it ran out of time.

  With ``timeout_s`` it runs on a daemon thread that is abandoned after ``timeout_s`` seconds
  (a collective waiting for a dead peer never returns; the process can still exit).
  """
  if timeout_s is None:
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      return e
    return None
  box: dict = {}

  def run():
    try:
      fn()
    except BaseException as e:  # pylint: disable=broad-except
      box["error"] = e

  thread = threading.Thread(target=run, name="hkpipe-crash-save", daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    return (f"gave up after {timeout_s:.0f}s (another process probably died or is not saving; "
            "the last periodic checkpoint is kept)")
  return box.get("error")


def eval_loop(pipe: pipeline_lib.Pipeline, state: pipeline_lib.TrainState,
              batch_fn: Callable[[int], Any], num_batches: int) -> float:
  """Mean ``Pipeline.eval_step`` loss over ``num_batches`` fixed validation batches."""
  losses = [pipe.eval_step(state, batch_fn(i))["loss"] for i in range(num_batches)]
  return float(np.mean([float(l) for l in losses]))


def sample_text(model: Any, params: Any, prompt: str, *, num_tokens: int, seed: int,
                temperature: float, top_k: int | None,
                tokenizer: tokenizer_lib.Tokenizer = tokenizer_lib.ByteTokenizer()) -> str:
  """Generated continuation of ``prompt`` (``tokenizer``'s tokens) from canonical ``params``."""
  params = jax.device_put(jax.device_get(params), jax.local_devices()[0])
  prompt_tokens = jnp.asarray(tokenizer.encode(prompt), jnp.int32)[None]
  out = models.generate(model, params, prompt_tokens, max_new_tokens=num_tokens,
                        rng=jax.random.key(seed), temperature=temperature, top_k=top_k)
  return tokenizer.decode(np.asarray(out[0]))


def decodes_in_place(pipe: pipeline_lib.Pipeline, total_tokens: int, context: int) -> bool:
  """Whether ``pipe.generate`` can sample where the stages live (no gather): on ``single``,
  ``mpmd`` and ``spmd`` (``Pipeline.decodes_in_place``; across processes every process takes
  part), when prompt + new tokens fit the context (the KV cache). Otherwise the parameters are
  gathered first and decoded with a sliding window (``pmap`` holds a full replica anyway)."""
  return pipe.decodes_in_place and total_tokens <= context


def sample_in_place(pipe: pipeline_lib.Pipeline, state: pipeline_lib.TrainState, prompt: str, *,
                    num_tokens: int, seed: int, temperature: float, top_k: int | None,
                    tokenizer: tokenizer_lib.Tokenizer = tokenizer_lib.ByteTokenizer()) -> str:
  """Like :func:`sample_text`, decoding on the pipeline's own stages without gathering them."""
  prompt_tokens = jnp.asarray(tokenizer.encode(prompt), jnp.int32)[None]
  out = pipe.generate(state, prompt_tokens, max_new_tokens=num_tokens, rng=jax.random.key(seed),
                      temperature=temperature, top_k=top_k)
  return tokenizer.decode(np.asarray(out[0]))


def train(config: Any, workdir: str | os.PathLike, *, log: TextIO = sys.stdout) -> dict:
  """Trains (or resumes) the run described by ``config`` in ``workdir``.

  Writes ``config.json``, ``metrics.jsonl`` (train/eval records), ``checkpoints/`` and
  ``samples.txt`` under ``workdir``. A hang watchdog (``config.watchdog``) watches the run while
  it trains: a process that makes no progress for its deadline prints where it is and exits.

  Returns:
    A summary: first/last train loss, last val loss, steps run, resume step, sample text.
  """
  validate_config(config)  # before anything is prepared, built or compiled
  wd_config = watchdog_lib.WatchdogConfig.from_config(config.get("watchdog"))
  progress = watchdog_lib.Progress(jax.process_index(), jax.process_count())
  dog = (watchdog_lib.Watchdog(progress, wd_config).start()
         if wd_config.enabled(jax.process_count()) else None)
  try:
    return _train(config, workdir, log, progress, dog)
  finally:
    if dog is not None:
      dog.stop()


def _train(config: Any, workdir: str | os.PathLike, log: TextIO,
           progress: watchdog_lib.Progress, dog: watchdog_lib.Watchdog | None) -> dict:
  """The body of :func:`train`; reports its position to ``progress``."""
  t_start = time.time()
  pipe_options = pipeline_options(config)  # checks the sizes against the devices
  lead = jax.process_index() == 0  # writes metrics, config, samples and prints
  work = pathlib.Path(workdir)
  skips = step_guard.SkipCounter(config.max_consecutive_skips,  # validated by validate_config
                                 checkpoints=str(work / "checkpoints"))
  work.mkdir(parents=True, exist_ok=True)
  if lead:
    (work / "config.json").write_text(config.to_json_best_effort(indent=1))

  def say(msg: str) -> None:
    if lead:
      print(msg, file=log, flush=True)

  def say_everywhere(msg: str) -> None:  # for what only this process may know (crash saves)
    prefix = f"[process {jax.process_index()}] " if jax.process_count() > 1 else ""
    print(prefix + msg, file=log if lead else sys.stderr, flush=True)

  # Data.
  data_dir = config.data.dir or str(work / "data")
  mcfg = model_config(config)
  is_trm = isinstance(mcfg, models.TRMConfig)
  tokenizer: tokenizer_lib.Tokenizer | None
  folder: pathlib.Path | None
  data_meta: dict[str, Any]
  tokenizer, folder, data_meta = None, None, {}
  if is_trm:  # generated puzzles instead of text
    # no token arrays: TRM's batches come from puzzles.batch_fns, tokens.train/val are not read
    tokens = data_lib.TokenData(train=None, val=None, vocab_size=puzzles.VOCAB_SIZE)  # type: ignore[arg-type]
  else:  # bytes: data_dir itself; bpe: a subfolder keyed by vocab_size and corpus
    folder, data_meta = tokenizer_lib.prepare_tokens(
        data_dir, config.data.source or None, tokenizer_lib.spec(config),
        val_fraction=config.data.val_fraction)
    tokens = data_lib.load(folder)
    tokenizer = tokenizer_lib.load_tokenizer(folder)
  if mcfg.vocab_size < tokens.vocab_size:
    raise errors.ConfigError(f"config.model.vocab_size={mcfg.vocab_size} is smaller than the "
                             f"data's vocabulary ({tokens.vocab_size}); set it to at least "
                             f"{tokens.vocab_size}.")
  sample_tokens = int(config.sample_tokens)
  if sample_tokens and tokenizer is None:
    say(f"hkpipe: warning: sample_tokens={sample_tokens} is ignored: text samples need byte-level "
        f"data (vocabulary {data_lib.BYTE_VOCAB_SIZE}) or a BPE tokenizer (data.tokenizer='bpe') "
        f"and this data's vocabulary is {tokens.vocab_size}; set --config.sample_tokens=0 to "
        "silence this.")
    sample_tokens = 0
  seq_len, batch_size = mcfg.seq_len, int(config.batch_size)

  # Model, optimizer, pipeline.
  model = models.build(mcfg)
  ocfg = optimizer_config(config)
  lr_at = optim.lr_schedule(ocfg)
  optimizer = optim.adamw(ocfg)
  if config.get("ema_decay") is not None:  # evaluation then uses the EMA weights
    optimizer = ema_lib.with_ema(optimizer, config.ema_decay)
  pipe = pipeline_lib.Pipeline(model, optimizer, backend=config.backend, progress=progress,
                     **pipe_options)
  # Each process feeds its own rows of the global batch, or the whole batch (MPMD).
  feed = pipe.data_layout(batch_size)
  shard: dict[str, Any] = {"process_index": feed.process_index,
                           "process_count": feed.process_count}

  def train_batch(step: int):
    return data_lib.sample_batch(tokens.train, batch_size=batch_size, seq_len=seq_len,
                                 seed=config.seed, step=step, **shard)

  def val_batch(i: int):
    return data_lib.sample_batch(tokens.val, batch_size=batch_size, seq_len=seq_len,
                                 seed=config.seed, step=i, split="val", **shard)

  # Puzzles (model.name="trm"): generated Sudoku rows; eval adds cell/exact accuracy.
  train_batch, val_batch = (puzzles.batch_fns(config, data_dir, shard) if is_trm
                            else (train_batch, val_batch))
  accuracy = puzzles.accuracy_fn(model) if is_trm else None

  # A checkpoint of another model or vocabulary is an error here, before anything compiles.
  ckpt = ckpt_lib.Checkpointer(work / "checkpoints", max_to_keep=config.keep_checkpoints)
  meta = resume_lib.run_meta(json.loads(config.to_json_best_effort()), tokens.vocab_size)
  if tokenizer is not None and tokenizer.name != "bytes":  # sampling decodes with it
    assert folder is not None  # a tokenizer comes from a data folder
    meta["data"]["tokenizer_dir"] = str(pathlib.Path(folder).resolve())
  said: set[str] = set()

  def check_saved(step: int, saved: dict) -> None:
    where = f"checkpoint step {step} in {ckpt.directory}"
    for line in resume_lib.check_resume(saved, meta, where=where):
      if line not in said:
        said.add(line)
        say(line)

  newest = ckpt.newest_meta()
  if newest is not None:
    check_saved(*newest)

  first = train_batch(0)
  state = pipe.init(jax.random.key(config.seed), first)
  # From shapes alone (no gather): tied weights counted once.
  n_params = models.param_count(model, jax.eval_shape(
      model.init, jax.random.key(0), jax.tree.map(lambda a: a[:1], first[0])))
  say(f"hkpipe: model={config.model.name} params={n_params:,} backend={config.backend} "
      f"devices={len(jax.devices())} microbatches={config.pipeline.num_microbatches} "
      f"batch={batch_size}x{seq_len} steps={config.num_steps}")
  layout = pipe.layout
  if layout is not None:
    say(run_log.describe_layout(layout))

  # The newest good checkpoint; damaged ones are reported and moved aside to <step>.corrupt.
  had_checkpoints = ckpt.latest_step() is not None
  resumed = ckpt.restore_latest(pipe.to_canonical(state), check_meta=check_saved,
                                report=say_everywhere)
  resume_step = None if resumed is None else resumed.step
  if resumed is not None:
    state = pipe.from_canonical(resumed.state, resumed.step)
    say(f"Resumed from checkpoint at step {resume_step} in {ckpt.directory}")
  elif had_checkpoints:
    say(f"No usable checkpoint left in {ckpt.directory}; starting from step 0.")
  writer = (run_log.MetricsWriter(work / "metrics.jsonl", resume_step or 0,
                                  work / "tensorboard" if config.tensorboard else None)
            if lead else run_log.NoWriter())
  extras = run_extras.RunExtras(config, work, pipe, say)  # profiler, timeline, pictures
  flops_tok = models.flops_per_token(mcfg)
  peak = config.get("peak_tflops")
  tokens_per_step = batch_size * seq_len

  summary: dict = {"resumed_from": resume_step, "first_loss": None, "last_loss": None,
                   "last_val_loss": None}
  last_saved = resume_step
  t_window, steps_window = time.time(), 0
  first_done = (resume_step or 0) + 1  # this run's first step compiles: logged on its own
  stop: step_guard.NonFiniteStepsError | None = None
  try:
    while state.step < config.num_steps:
      step = state.step
      t0 = time.time()
      progress.begin_step(step + 1)
      extras.before_step(step)
      state, metrics = pipe.train_step(state, train_batch(step))
      done = state.step
      extras.after_step(done, metrics)
      steps_window += 1
      compiled = done == first_done
      skips.push(done, metrics["skipped"])
      # Skip flags are read for the steps already done (not this one, still in flight), and for
      # this one where the loop waits for it anyway (log, eval) or must (checkpoint, last step).
      waits = (compiled or done % config.log_every == 0 or done == config.num_steps
               or bool(config.eval_every and done % config.eval_every == 0)
               or bool(config.checkpoint_every and done % config.checkpoint_every == 0))
      stop = skips.settle(keep_newest=not waits)
      if stop is not None:  # raised below, after the loop: no checkpoint of this state
        break
      if compiled or done % config.log_every == 0 or done == config.num_steps:
        loss = float(metrics["loss"])  # blocks on this step
        now = time.time()
        step_time = now - t0 if compiled else (now - t_window) / steps_window
        record = run_log.train_record(
            step=done, loss=loss, grad_norm=float(metrics["grad_norm"]), lr=float(lr_at(step)),
            step_time=step_time, tokens_per_step=tokens_per_step, flops_per_token=flops_tok,
            peak_tflops=peak, skipped_steps=skips.total)
        progress.steps_finished(None if compiled else step_time)
        writer.write(record)
        summary["first_loss"] = summary["first_loss"] or loss
        summary["last_loss"] = loss
        say(run_log.train_line(record, config.num_steps, compiled))
        t_window, steps_window = time.time(), 0
      if config.eval_every and (done % config.eval_every == 0 or done == config.num_steps):
        progress.enter(watchdog_lib.EVAL)
        scored = (ema_lib.eval_state(pipe, state) if config.get("ema_decay") is not None
                  else state)  # evaluation uses the EMA weights when config.ema_decay is set
        val = eval_loop(pipe, scored, val_batch, config.eval_batches)
        # TRM accuracy and MoE expert load run on the stages where they live (no gather) where
        # the backend can; else on one gathered copy (see staged_eval).
        extra = (accuracy(staged_eval.stages(pipe, scored), val_batch, config.eval_batches)
                 if accuracy is not None else {})
        progress.end()
        bpb = tokenizer_lib.val_bits_per_byte(data_meta, val)
        extra = {**({} if bpb is None else {"val_bpb": bpb}), **extra}
        writer.write({"step": done, "val_loss": val, **extra})
        if isinstance(mcfg, models.MoEConfig):  # per-block expert load of a validation batch
          writer.write({"step": done, **moe.load_record(staged_eval.expert_load(
              mcfg, staged_eval.stages(pipe, state), val_batch(0)[0]))})
        summary["last_val_loss"] = val
        summary.update(extra)
        say(run_log.eval_line(done, config.num_steps, val) + "".join(
            f" {k}={v:.4f}" for k, v in extra.items()))
        t_window, steps_window = time.time(), 0
      if config.checkpoint_every and done % config.checkpoint_every == 0:
        progress.enter(watchdog_lib.CHECKPOINT)
        ckpt.save(done, pipe.to_canonical(state), {**meta, "step": done})
        progress.end()
        last_saved = done
        t_window, steps_window = time.time(), 0
  except BaseException:
    extras.abort()
    progress.enter(watchdog_lib.CHECKPOINT)  # the crash save below: a save's deadline
    if state.step != last_saved and state.step > 0:
      # Nothing lost on a crash: keep the last completed step. Across processes the save is
      # collective, so it only completes if every process got here too (a peer that died or is
      # still training cannot join): bounded, so that this process exits instead of hanging.
      crashed_at = state.step

      def save_last():
        ckpt.save(crashed_at, pipe.to_canonical(state), {**meta, "step": crashed_at})
        ckpt.wait()

      error = _run_bounded(save_last, None if jax.process_count() == 1 else CRASH_SAVE_TIMEOUT_S)
      if error is None:
        say_everywhere(f"Interrupted: saved step {crashed_at} to {ckpt.directory}")
      else:
        say_everywhere(f"Interrupted: could not save step {crashed_at}: {error}")
    writer.close()
    raise
  if stop is not None:
    say(str(stop))
    ckpt.close()
    writer.close()
    extras.abort()
    raise stop
  progress.enter(watchdog_lib.FINISH)
  if state.step != last_saved:
    ckpt.save(state.step, pipe.to_canonical(state), {**meta, "step": state.step})
  ckpt.close()
  summary["steps"] = state.step

  if sample_tokens:
    assert tokenizer is not None  # sample_tokens was set to 0 above without one
    sampling = dict(num_tokens=sample_tokens, seed=config.seed,
                    temperature=config.sample_temperature, top_k=config.get("sample_top_k"))
    sampling["tokenizer"] = tokenizer
    in_place = decodes_in_place(pipe, len(tokenizer.encode(config.sample_prompt)) + sample_tokens,
                                seq_len)
    # Every process takes part: in the in-place decoding (stages on several processes) or in
    # the gather; the gathered model is then decoded by the lead process alone.
    if in_place:
      progress.enter(watchdog_lib.SAMPLE)
      text = sample_in_place(pipe, state, config.sample_prompt, **sampling)
    else:
      params = pipe.params(state)
    if dog is not None:
      dog.stop()                 # the rest is local to this process
    if lead:
      if not in_place:
        text = sample_text(model, params, config.sample_prompt, **sampling)
      (work / "samples.txt").write_text(text)
      writer.text("sample", f"```\n{text}\n```", state.step)
      say("---- sample ----\n" + text + "\n----------------")
      summary["sample"] = text
  writer.close()
  extras.finish()
  say(f"Done in {time.time() - t_start:.1f}s; checkpoints in {ckpt.directory}")
  return summary
