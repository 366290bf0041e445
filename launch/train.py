r"""Trains an hkpipe experiment: ``python launch/train.py --config=experiments/<x>.py[:arg]``.

Flags:
  --config          experiment file with get_config(arg); override any field with
                    --config.<field>=value (e.g. --config.backend=mpmd --config.num_steps=50).
  --workdir         where metrics.jsonl, checkpoints/ and samples.txt go; a workdir that holds a
                    checkpoint is resumed.
  --host_devices    simulate N CPU devices (for pipelines on a machine without accelerators);
                    must be set before JAX starts, which this launcher does for you.
  --compilation_cache
                    JAX's persistent compilation cache: "auto" (default;
                    $HKPIPE_COMPILATION_CACHE or ~/.cache/hkpipe/jax), "off", or a folder. A
                    second identical start loads its compiled programs instead of compiling.
  --coordinator_address, --num_processes, --process_id
                    join a multi-process run (see launch/local.py, docs/launch.md): give all
                    three or none; SLURM and Cloud TPU pods are auto-detected.

A bad config value or flag prints one line, ``hkpipe: error: ...``, and exits with status 2; a
run stopped after ``config.max_consecutive_skips`` non-finite steps in a row does the same with
status 3; other errors keep their traceback.

Example:
  python launch/train.py --config=experiments/shakespeare_gpt.py:cpu --workdir=workdirs/gpt_cpu
"""

import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (resumed if it has a checkpoint).")
_HOST_DEVICES = flags.DEFINE_integer("host_devices", 0,
                                     "Simulate this many CPU devices (0: leave JAX's default).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process: host:port of process 0 (with --num_processes, --process_id). Without it, "
    "HKPIPE_* environment variables, SLURM or Cloud TPU pods are auto-detected.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: total processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "auto", "JAX's persistent compilation cache: 'auto' "
    "($HKPIPE_COMPILATION_CACHE or ~/.cache/hkpipe/jax), 'off', or a folder.")
flags.mark_flags_as_required(["config", "workdir"])


def _setup_devices(host_devices: int) -> None:
  """Configures simulated CPU devices; must run before JAX initialises its backend."""
  if host_devices < 0:
    raise app.UsageError(f"--host_devices must be >= 0, got {host_devices}.")
  if host_devices:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", host_devices)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; --verbosity=0 shows it
  from hkpipe._src import errors  # pylint: disable=g-import-not-at-top
  from hkpipe._src import compile_cache  # pylint: disable=g-import-not-at-top
  cache_dir = compile_cache.resolve(_COMPILATION_CACHE.value)
  counter = None
  if cache_dir is not None:  # before anything compiles
    compile_cache.enable(cache_dir)
    counter = compile_cache.CacheCounter().start()
  try:
    _setup_devices(_HOST_DEVICES.value)
    from hkpipe._src import distributed  # pylint: disable=g-import-not-at-top
    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if any(v is not None for v in explicit):  # partial flags are an error, never ignored
      dist = distributed.DistributedConfig(coordinator_address=_COORDINATOR.value,
                                           num_processes=_NUM_PROCESSES.value,
                                           process_id=_PROCESS_ID.value)
    else:
      dist = distributed.from_env()
    distributed.initialize(dist)  # before any backend touches devices
  except errors.ConfigError as e:
    _exit_with_message(e, multi_process=False)
  from hkpipe import train as train_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  try:
    train_lib.train(_CONFIG.value, _WORKDIR.value)
    if counter is not None and jax.process_index() == 0:
      print(f"hkpipe: {counter.summary(cache_dir)}", flush=True)
  except errors.ConfigError as e:
    _exit_with_message(e, multi_process=jax.process_count() > 1)
  except train_lib.NonFiniteStepsError as e:  # an explained stop: its message is the report
    _exit_with_message(e, multi_process=jax.process_count() > 1, status=3)
  except BaseException as e:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    # A failing process of a multi-process run must not wait in jax.distributed's shutdown
    # barrier (up to its timeout) while its peers wait on transfers or collectives with it:
    # exiting at once makes theirs fail at once. (train() already tried a bounded crash save.)
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130 if isinstance(e, KeyboardInterrupt) else 1)


def _exit_with_message(error: Exception, *, multi_process: bool, status: int = 2) -> None:
  """A bad config or flag (status 2), or too many non-finite steps in a row (status 3): one line
  on stderr, no traceback."""
  print(f"hkpipe: error: {error}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  if multi_process:
    os._exit(status)  # do not wait for the other processes in jax.distributed's shutdown barrier
  sys.exit(status)

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
