"""What a resumed run may change: the config a checkpoint was written with against the current one.

A checkpoint's metadata records the run (:func:`run_meta`: the full config as JSON and the data's
vocabulary). On resume, :func:`check_resume` compares it with the current run before any array is
read:

- a changed model (any ``config.model.*`` field) or vocabulary is an error: the parameters would
  not fit, or would mean something else;
- a changed ``seed``, ``batch_size``, data source (``data.dir``, ``data.source``,
  ``data.val_fraction``), optimizer hyper-parameter (``optim.*``) or ``num_steps`` (the length of
  the learning-rate schedule) is allowed with a warning: the run continues, but not as the
  uninterrupted run would have;
- anything else (backend, pipeline layout, logging, evaluation, checkpoint and sample settings)
  may change freely: resuming under another layout is a feature.
"""

from __future__ import annotations

import os

import json
from typing import Any, Mapping

from hkpipe._src.errors import ConfigError

_ERROR_PREFIXES = ("model.",)
_WARN_FIELDS = ("seed", "batch_size", "num_steps", "data.dir", "data.source",
                "data.val_fraction")
_WARN_PREFIXES = ("optim.",)
_ABSENT = object()


def run_meta(config: Mapping[str, Any], vocab_size: int) -> dict:
  """The metadata a checkpoint records about its run.

  Args:
    config: the full config as JSON-compatible dicts (``json.loads(config.to_json_best_effort())``).
    vocab_size: the training data's vocabulary size.
  """
  return {"config": dict(config), "data": {"vocab_size": int(vocab_size)}}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _show(value: Any) -> str:
  return "(absent)" if value is _ABSENT else json.dumps(value)


def compare_configs(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                    saved_vocab: int | None = None,
                    current_vocab: int | None = None) -> tuple[list[str], list[str]]:
  """The differences that stop a resume, and those it only warns about.

  Args:
    saved: the config the checkpoint was written with (JSON-compatible nested dicts).
    current: the current config, in the same form.
    saved_vocab: the vocabulary recorded with the checkpoint (None: not recorded, not compared).
    current_vocab: the current data's vocabulary.

  Returns:
    ``(errors, warnings)``: one line per changed field, ``config.<field>: <old> in the checkpoint,
    <new> now`` (the vocabulary as ``data vocabulary``), in field order.
  """
  old, new = _flatten(saved), _flatten(current)
  errors, warns = [], []
  for name in list(old) + [k for k in new if k not in old]:
    a, b = old.get(name, _ABSENT), new.get(name, _ABSENT)
    if a == b:
      continue
    line = f"config.{name}: {_show(a)} in the checkpoint, {_show(b)} now"
    if name.startswith(_ERROR_PREFIXES):
      errors.append(line)
    elif name in _WARN_FIELDS or name.startswith(_WARN_PREFIXES):
      warns.append(line)
  if saved_vocab is not None and current_vocab is not None and saved_vocab != current_vocab:
    errors.append(f"data vocabulary: {saved_vocab} in the checkpoint, {current_vocab} now "
                  "(the data in config.data.dir changed)")
  return errors, warns


def tokenizer_id(meta: Mapping[str, Any]) -> str:
  """Which tokenizer a run's metadata names: ``"bytes"``, or its BPE cache folder's name
  (``bpe<vocab>-<key>``, the key hashing the corpus and ``val_fraction``)."""
  folder = meta.get("data", {}).get("tokenizer_dir")
  return os.path.basename(str(folder).rstrip("/")) if folder else "bytes"


def check_resume(saved_meta: Mapping[str, Any], current_meta: Mapping[str, Any], *,
                 where: str) -> list[str]:
  """Checks that the run in ``current_meta`` may resume from a checkpoint with ``saved_meta``.

  Both are :func:`run_meta` records; a checkpoint without a recorded config is not compared.

  Args:
    saved_meta: the checkpoint's metadata.
    current_meta: the current run's.
    where: names the checkpoint in messages (e.g. ``checkpoint step 8 in /w/checkpoints``).

  Returns:
    Warning lines to print (empty if nothing that matters changed).

  Raises:
    ConfigError: the model or the vocabulary changed; names each field, both values and the fix.
  """
  if "config" not in saved_meta:
    return [f"Warning: {where} records no config; resuming without checking that it matches."]
  errors, warns = compare_configs(
      saved_meta["config"], current_meta["config"],
      saved_vocab=saved_meta.get("data", {}).get("vocab_size"),
      current_vocab=current_meta.get("data", {}).get("vocab_size"))
  saved_tok, current_tok = (tokenizer_id(m) for m in (saved_meta, current_meta))
  if saved_tok != current_tok:
    errors.append(f"tokenizer: {saved_tok} in the checkpoint, {current_tok} now (the token ids "
                  "mean other text: the corpus, val_fraction or tokenizer changed)")
  if errors:
    raise ConfigError(
        f"Cannot resume from {where}: the model it holds differs from the configured one ("
        + "; ".join(errors) + "). Use the checkpoint's values (--config.model.<field>=<value in "
        "the checkpoint>; for the vocabulary, the data it was trained on), or a new --workdir to "
        "start a new run.")
  if not warns:
    return []
  return [f"Warning: resuming from {where} with changed settings (" + "; ".join(warns)
          + "). Allowed, but the run no longer reproduces the uninterrupted one; use the "
          "checkpoint's values for that."]
