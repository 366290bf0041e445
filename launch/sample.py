r"""Samples text from a run's newest checkpoint: ``python launch/sample.py --workdir=<run>``.

Flags:
  --workdir         the training run's folder (its checkpoints/ are read).
  --prompt          text to continue (byte-level tokens).
  --max_new_tokens  tokens per sample (default: fill the model's context after the prompt).
  --temperature     0 is greedy; --top_k (0: off), --top_p (1: off) filter the distribution.
  --num_samples     how many samples (decoded together as one batch); --seed their PRNG seed.
  --num_groups      mpmd: groups of samples in flight across the ranks (default: one per rank).
  --config.backend, --config.pipeline.*
                    the layout to decode with (default: the run's; spmd runs decode with mpmd,
                    pmap runs with single); any layout works whatever the run trained under.
  --host_devices    simulate N CPU devices (e.g. for an mpmd layout on a CPU-only machine).

A bad flag prints one line, ``hkpipe: error: ...``, and exits with status 2.

Example:
  python launch/sample.py --workdir=workdirs/gpt_cpu --prompt="ROMEO:" --max_new_tokens=100 \
      --temperature=0.8 --top_k=40 --num_samples=2 --host_devices=2 --config.backend=mpmd \
      --config.pipeline.ranks=2
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's folder.")
_PROMPT = flags.DEFINE_string("prompt", "ROMEO:", "Text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None,
                                "Tokens per sample (default: the rest of the context).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1: all).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "How many samples.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_NUM_GROUPS = flags.DEFINE_integer("num_groups", None,
                                   "mpmd: sample groups in flight (default: one per rank).")
_HOST_DEVICES = flags.DEFINE_integer("host_devices", 0,
                                     "Simulate this many CPU devices (0: leave JAX's default).")
flags.mark_flags_as_required(["workdir"])


def _config_flag():
  """``--config.*`` overrides of the run's layout, over the trainer's default config."""
  from hkpipe._src import trainer  # pylint: disable=g-import-not-at-top
  return config_flags.DEFINE_config_dict("config", trainer.default_config(),
                                         "Decoding layout overrides (--config.backend, "
                                         "--config.pipeline.*).", lock_config=False)


_CONFIG = _config_flag()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from hkpipe._src import errors  # pylint: disable=g-import-not-at-top
  try:
    if _HOST_DEVICES.value < 0:
      raise errors.ConfigError(f"--host_devices must be >= 0, got {_HOST_DEVICES.value}.")
    if _HOST_DEVICES.value:
      import jax  # pylint: disable=g-import-not-at-top
      jax.config.update("jax_platforms", "cpu")
      jax.config.update("jax_num_cpu_devices", _HOST_DEVICES.value)
    from hkpipe._src import sample_run  # pylint: disable=g-import-not-at-top
    request = sample_run.Request(
        prompt=_PROMPT.value, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value or None, top_p=None if _TOP_P.value == 1.0 else _TOP_P.value,
        num_samples=_NUM_SAMPLES.value, seed=_SEED.value, num_groups=_NUM_GROUPS.value)
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    texts, info = sample_run.sample(_WORKDIR.value, request, overrides)
  except errors.ConfigError as e:
    print(f"hkpipe: error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  print(f"hkpipe: checkpoint step {info['step']}, decoding with backend={info['backend']} "
        f"({info['layout']})", flush=True)
  for i, text in enumerate(texts):
    print(f"--- sample {i} ---\n{text}", flush=True)


if __name__ == "__main__":
  app.run(main)
