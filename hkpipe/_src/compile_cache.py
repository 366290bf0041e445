"""JAX's persistent compilation cache for the launcher: a second identical start loads its
executables from disk instead of compiling them.

``launch/train.py`` calls :func:`enable` before anything compiles (``--compilation_cache``: ``auto``
= :func:`default_dir`, ``off``, or a folder). Every XLA compile of the run goes through the cache,
the MPMD backend's per-stage programs included (``ProgramCache`` compiles with
``Lowered.compile``); programs are cached whatever their compile time (JAX's default skips those
under a second, which are most stage programs on CPU). :class:`CacheCounter` counts hits and
misses from ``jax.monitoring`` events.

The cache key covers the program, the compile options, the devices and the JAX/XLA versions, so
a changed model, config or upgrade compiles (and adds entries) rather than reusing a wrong
executable. Entries are never evicted; delete the folder to reclaim the space.
"""

from __future__ import annotations

import os
import pathlib

import jax

ENV_DIR = "HKPIPE_COMPILATION_CACHE"
_HITS = "/jax/compilation_cache/cache_hits"
_MISSES = "/jax/compilation_cache/cache_misses"


def default_dir() -> pathlib.Path | None:
  """``$HKPIPE_COMPILATION_CACHE`` (``off``: None), else ``$XDG_CACHE_HOME/hkpipe/jax`` (default
  ``~/.cache/hkpipe/jax``): shared by every workdir of the user."""
  if os.environ.get(ENV_DIR):
    return None if os.environ[ENV_DIR] == "off" else pathlib.Path(os.environ[ENV_DIR])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "hkpipe" / "jax"


def resolve(flag: str) -> pathlib.Path | None:
  """The folder the ``--compilation_cache`` flag names: ``auto`` (:func:`default_dir`), ``off``
  (None) or a path. (The test suite sets ``HKPIPE_COMPILATION_CACHE=off``: a test that wants the
  cache names a folder.)"""
  if flag == "off":
    return None
  return default_dir() if flag in ("auto", "") else pathlib.Path(flag).expanduser()


def enable(folder: pathlib.Path) -> pathlib.Path:
  """Turns JAX's persistent compilation cache on in ``folder`` (created), for every program.

  Must run before the first compile of the process (JAX opens the cache once).
  """
  folder.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size limit either
  return folder


class CacheCounter:
  """Counts persistent-cache hits and misses (``jax.monitoring`` events) from :meth:`start`."""

  def __init__(self):
    self.hits = 0
    self.misses = 0

  def _on_event(self, event: str, **kwargs) -> None:
    del kwargs
    if event == _HITS:
      self.hits += 1
    elif event == _MISSES:
      self.misses += 1

  def start(self) -> "CacheCounter":
    jax.monitoring.register_event_listener(self._on_event)
    return self

  def stop(self) -> None:
    jax.monitoring.unregister_event_listener(self._on_event)

  def summary(self, folder: pathlib.Path) -> str:
    return (f"compilation cache {folder}: {self.hits} programs loaded, {self.misses} compiled "
            "and stored")
