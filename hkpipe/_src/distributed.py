"""Multi-process start-up: ``jax.distributed`` from flags, environment or cluster auto-detection.

Must run before anything touches JAX devices. Three ways in:

- explicit: coordinator address, number of processes and process id (flags of
  ``launch/train.py``, or the ``HKPIPE_COORDINATOR_ADDRESS``, ``HKPIPE_NUM_PROCESSES`` and
  ``HKPIPE_PROCESS_ID`` environment variables);
- auto-detected: under SLURM (more than one task) or on a Cloud TPU pod, ``jax.distributed``
  reads everything from the environment;
- none of those: a single process, nothing to do.

Timeouts are short by default so a dead peer makes every other process fail within a minute instead
of hanging: the coordinator's heartbeat notices a missing process after
``heartbeat_timeout_seconds``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax

from hkpipe._src.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How to join a multi-process run.

  Either all of ``coordinator_address``, ``num_processes`` and ``process_id`` are given, or none
  (auto-detect); anything else raises ``ConfigError``.

  Attributes:
    coordinator_address: ``host:port`` of process 0's coordinator; None to auto-detect.
    num_processes: total processes.
    process_id: this process's index in ``[0, num_processes)``.
    initialization_timeout: seconds to wait for every process to join.
    heartbeat_timeout_seconds: seconds without a heartbeat after which a process counts as dead
      (measured here: a SIGKILLed peer made the survivor exit after 8.8 s with 10).
    shutdown_timeout_seconds: how long processes wait for each other at exit.
  """

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  initialization_timeout: int = 60
  heartbeat_timeout_seconds: int = 10
  shutdown_timeout_seconds: int = 60

  def __post_init__(self):
    explicit = (self.coordinator_address, self.num_processes, self.process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
      names = ("coordinator_address", "num_processes", "process_id")
      given = {n: v for n, v in zip(names, explicit) if v is not None}
      missing = [n for n, v in zip(names, explicit) if v is None]
      raise ConfigError(f"Multi-process runs need all of coordinator_address, num_processes and "
                        f"process_id (or none of them, to auto-detect SLURM / TPU pods); got "
                        f"{given} without {missing}: add --{' --'.join(missing)} (launch/local.sh "
                        "sets all three).")
    if self.num_processes is not None and self.num_processes < 1:
      raise ConfigError(f"num_processes must be >= 1, got {self.num_processes}.")
    if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or 0):
      raise ConfigError(f"process_id={self.process_id} must be in [0, {self.num_processes}); "
                        "number the processes 0 .. num_processes - 1.")
    if self.coordinator_address is not None and ":" not in self.coordinator_address:
      raise ConfigError(f"coordinator_address={self.coordinator_address!r} needs the form "
                       "host:port, e.g. 127.0.0.1:12345.")


def from_env(env: Mapping[str, str] | None = None) -> DistributedConfig:
  """Reads ``HKPIPE_COORDINATOR_ADDRESS`` / ``HKPIPE_NUM_PROCESSES`` / ``HKPIPE_PROCESS_ID``."""
  env = os.environ if env is None else env

  def num(name: str) -> int | None:
    return int(env[name]) if env.get(name) else None

  return DistributedConfig(coordinator_address=env.get("HKPIPE_COORDINATOR_ADDRESS") or None,
                           num_processes=num("HKPIPE_NUM_PROCESSES"),
                           process_id=num("HKPIPE_PROCESS_ID"))


def cluster_detected(env: Mapping[str, str] | None = None) -> bool:
  """True under SLURM with several tasks, or on a multi-worker Cloud TPU pod."""
  env = os.environ if env is None else env
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize(config: DistributedConfig | None = None) -> bool:
  """Joins the multi-process run described by ``config`` (or the environment).

  Returns:
    True when ``jax.distributed`` was initialised, False for a single process.
  """
  config = config if config is not None else from_env()
  timeouts: dict[str, Any] = {"initialization_timeout": config.initialization_timeout,
              "heartbeat_timeout_seconds": config.heartbeat_timeout_seconds,
              "shutdown_timeout_seconds": config.shutdown_timeout_seconds}
  if config.coordinator_address is not None:
    if config.num_processes == 1:
      return False
    jax.distributed.initialize(coordinator_address=config.coordinator_address,
                               num_processes=config.num_processes,
                               process_id=config.process_id, **timeouts)
    return True
  if cluster_detected():
    jax.distributed.initialize(**timeouts)
    return True
  return False
