"""Ahead-of-time compilation of MPMD stage programs, with one XLA compile per distinct program.

Every stage program is a pure function of a *flat* list of arrays (no pytree structure, so two
stages whose layers have different names but the same types and shapes trace to the same
computation). :class:`ProgramCache` traces and lowers a program for the devices of one pipeline
rank, keys it by its lowered StableHLO text, and compiles each distinct text once. A program whose
text was already compiled for other devices is *cloned*: the compiled executable is serialized and
loaded again with its device assignment remapped to the new devices (no XLA compile). Measured on
the 2-core CPU test machine: a transformer-block program took 0.16-0.6 s to compile and 10-45 ms
to clone.

If a clone fails (a backend that cannot serialize executables, a program with hoisted constants),
the program is compiled for the new devices instead; correctness never depends on cloning.

With JAX's persistent compilation cache on (``jax_compilation_cache_dir``, as ``launch/train.py``
sets by default) programs are compiled, never cloned: every placement is then stored in the cache
and a second start loads them all; and an executable loaded from that cache cannot be cloned
(jax 0.10.2, CPU: its re-serialized copy fails when called, "Function ... not found").
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import os
import pickle
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import serialize_executable

from jax._src import compiler as jax_compiler  # pylint: disable=g-bad-import-order
from jax._src.lib import xla_client


def persistent_cache_on() -> bool:
  """Whether compiles go through JAX's persistent compilation cache."""
  # jax.config's stub does not declare its flags as attributes: ignores below
  return bool(jax.config.jax_compilation_cache_dir) and bool(  # type: ignore[attr-defined]
      jax.config.jax_enable_compilation_cache)  # type: ignore[attr-defined]


@dataclasses.dataclass
class CompileStats:
  """What building the programs cost (for tests and benchmarks).

  Attributes:
    compiled: number of XLA compilations.
    cloned: number of programs loaded from an executable compiled for other devices.
    traced: number of programs traced and lowered (stages identical to an earlier one are
      placed without tracing).
    traced_by_name: the same, per program name.
    trace_s: seconds spent tracing and lowering.
    compile_s: seconds spent in XLA compilation (summed over compile threads).
    clone_s: seconds spent cloning executables onto other devices (summed over threads).
    log: per program placed on devices, ``(name, how, seconds, key_hash)`` with ``how`` in
      {"compiled", "cloned", "reused"}, the seconds that took (tracing excluded) and the hash of
      the program's lowered text (equal hashes: one executable).
  """

  compiled: int = 0
  cloned: int = 0
  traced: int = 0
  trace_s: float = 0.0
  compile_s: float = 0.0
  clone_s: float = 0.0
  log: list = dataclasses.field(default_factory=list)
  traced_by_name: collections.Counter = dataclasses.field(default_factory=collections.Counter)


class _RemappingUnpickler(pickle.Unpickler):
  """Loads a serialized ``jax.stages.Compiled`` onto other devices of the same client."""

  def __init__(self, data: bytes, client: Any, id_map: dict[int, int],
               device_assignment: Sequence[Any]):
    super().__init__(io.BytesIO(data))
    self._client = client
    self._id_map = id_map
    self._by_id = {d.id: d for d in client.devices()}
    self._assignment = tuple(device_assignment)

  def persistent_load(self, pid):
    tag = pid[0]
    if tag == "exec":
      n = len(self._assignment)
      options = jax_compiler.get_compile_options(
          num_replicas=1, num_partitions=n,
          device_assignment=np.asarray(self._assignment, dtype=object).reshape(1, n),
          backend=self._client)
      return self._client.deserialize_executable(
          pid[1], executable_devices=xla_client.DeviceList(self._assignment),
          compile_options=options)
    if tag == "device":
      return self._by_id[self._id_map[pid[1]]]
    if tag == "client":
      return self._client
    raise pickle.UnpicklingError(f"Unknown persistent id {tag!r} in a serialized executable.")


def clone_compiled(compiled: jax.stages.Compiled, old_devices: Sequence[Any],
                   new_devices: Sequence[Any]) -> jax.stages.Compiled:
  """Returns ``compiled`` loaded onto ``new_devices`` (device ``old_devices[i]`` -> ``new[i]``).

  Raises:
    ValueError: if the executable cannot be serialized (e.g. it carries hoisted constants).
  """
  try:
    data, in_tree, out_tree = serialize_executable.serialize(compiled)
  except NotImplementedError as e:  # hoisted constant arguments
    raise ValueError(f"Executable cannot be serialized: {e}") from e
  id_map = {a.id: b.id for a, b in zip(old_devices, new_devices)}
  client = new_devices[0].client
  unloaded_base = getattr(compiled._executable, "_unloaded_executable")  # pylint: disable=protected-access
  old_assignment = unloaded_base.device_list
  by_id = {d.id: d for d in client.devices()}
  assignment = [by_id[id_map[d.id]] for d in old_assignment]
  unloaded, args_info_flat, no_kwargs = _RemappingUnpickler(data, client, id_map, assignment).load()
  return jax.stages.Compiled(unloaded.load(), [], in_tree.unflatten(args_info_flat), out_tree,
                             no_kwargs=no_kwargs)


class Program:
  """A stage program, compiled (or cloned) in the background.

  Attributes:
    key: the lowered text it was keyed by (programs with equal keys share one XLA compile).
    devices: the devices it runs on, in mesh order.
    name: the traced function's name (for logs).
  """

  def __init__(self, future: concurrent.futures.Future, key: str, devices: tuple[Any, ...],
               name: str, out_info: Any):
    self._future = future
    self.key = key
    self.devices = devices
    self.name = name
    self._out_info = out_info

  @property
  def fn(self) -> jax.stages.Compiled:
    """The ``jax.stages.Compiled`` (``fn(*flat_args)`` runs it asynchronously); waits for it."""
    return self._future.result()

  def out_specs(self) -> Any:
    """The output pytree as ``ShapeDtypeStruct`` s with their shardings.

    Known without waiting for the compile when every output sharding was given; otherwise read
    from the compiled executable.
    """
    info = self._out_info
    if info is None or any(o.sharding is None for o in jax.tree.leaves(info)):
      info = self.fn.out_info
    return jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=o.sharding),
                        info)


class ProgramCache:
  """Compiles flat stage programs, sharing one XLA compile among identical programs.

  Tracing and lowering run in the calling thread; XLA compiles (which release the GIL) and
  clones run on a small thread pool, so a pipeline's many programs compile concurrently while
  the next ones are traced. One cache per backend instance by default (no global state);
  pipelines over the same model in one process (e.g. a test suite) may share one by assigning
  ``backend.cache``.

  Args:
    compiler_options: XLA options passed to every compile (e.g.
      ``{"xla_backend_optimization_level": 0}`` trades run time for compile time).
    workers: compile threads (default: the machine's CPU count, at most 4).
  """

  def __init__(self, compiler_options: dict[str, Any] | None = None, workers: int | None = None):
    self.stats = CompileStats()
    self.compiler_options = dict(compiler_options or {})
    self._workers = workers or max(1, min(4, os.cpu_count() or 1))
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._lock = threading.Lock()
    # lowered text -> {devices: future of the compiled executable}; the first entry is the one
    # clones are made from.
    self._by_key: dict[str, dict[tuple[Any, ...], concurrent.futures.Future]] = {}
    self._clone_ok = not persistent_cache_on()
    # Stage-level memo filled by the MPMD setup: (stage signature, program name, ...) ->
    # (program, extra data); lets identical stages skip tracing.
    self.memo: dict[Any, tuple[Program, Any]] = {}

  def _submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(
          max_workers=self._workers, thread_name_prefix="hkpipe-compile")
    return self._pool.submit(fn)

  def _log(self, name: str, how: str, seconds: float, key: str) -> None:
    with self._lock:
      self.stats.log.append((name, how, seconds, hash(key)))
      if how == "compiled":
        self.stats.compiled += 1
        self.stats.compile_s += seconds
      elif how == "cloned":
        self.stats.cloned += 1
        self.stats.clone_s += seconds

  def build(self, fn: Callable[..., Any], args: Sequence[jax.ShapeDtypeStruct],
            devices: Sequence[Any], *, out_shardings: Any = None,
            donate_argnums: Sequence[int] = ()) -> Program:
    """Traces and lowers ``fn`` for ``args`` on ``devices``; compiles (or clones) it in the
    background.

    Args:
      fn: a pure function of flat arrays returning (groups of) lists of arrays. Its ``__name__``
        should be the same for identical programs of different stages.
      args: abstract arguments, each with the ``sharding`` it will be called with.
      devices: the devices of the mesh the shardings live on, in mesh order (used to map a
        shared executable onto another rank's devices).
      out_shardings: a pytree prefix of the outputs giving their shardings (``None``: chosen by
        the compiler).
      donate_argnums: arguments whose buffers the program may reuse.

    Returns:
      The program; ``program.fn`` waits for the executable.
    """
    t0 = time.perf_counter()
    jitted = jax.jit(fn, out_shardings=out_shardings, donate_argnums=tuple(donate_argnums),
                     keep_unused=True)
    traced = jitted.trace(*args)
    lowered = traced.lower()
    devices = tuple(devices)
    out_info = traced.out_info      # shapes, with the requested shardings (None: compiler's)
    with self._lock:
      self.stats.traced += 1
      self.stats.traced_by_name[fn.__name__] += 1
      self.stats.trace_s += time.perf_counter() - t0
    if lowered._lowering.const_args:  # pylint: disable=protected-access
      # Hoisted constants travel with the executable: never share it.
      return self._compile(lowered, f"{id(lowered)}", devices, fn.__name__, out_info, keep=False)
    key = f"{len(devices)}\n{lowered.as_text()}"
    placed = self._placed(key, devices, fn.__name__, out_info)
    if placed is not None:
      return placed
    return self._compile(lowered, key, devices, fn.__name__, out_info, keep=True)

  def place(self, program: Program, devices: Sequence[Any]) -> Program | None:
    """``program`` on other devices of the same shape, without tracing; None if impossible."""
    out_info = program._out_info  # pylint: disable=protected-access
    if out_info is not None and any(o.sharding is not None for o in jax.tree.leaves(out_info)):
      out_info = None  # shardings name the old devices; read them from the clone instead
    return self._placed(program.key, tuple(devices), program.name, out_info)

  def _placed(self, key: str, devices: tuple, name: str, out_info: Any) -> Program | None:
    variants = self._by_key.get(key)
    if not variants:
      return None
    if devices in variants:
      self._log(name, "reused", 0.0, key)
      return Program(variants[devices], key, devices, name, out_info)
    if not self._clone_ok:
      return None
    base_devices, base = next(iter(variants.items()))

    def clone():
      t0 = time.perf_counter()
      compiled = clone_compiled(base.result(), base_devices, devices)
      self._log(name, "cloned", time.perf_counter() - t0, key)
      return compiled

    try:
      # Probe synchronously once: a backend that cannot serialize executables makes every
      # later placement compile instead.
      if not getattr(self, "_clone_probed", False):
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(clone())
        self._clone_probed = True
        future = done
      else:
        future = self._submit(clone)
    except Exception:  # pylint: disable=broad-except
      self._clone_ok = False
      return None
    variants[devices] = future
    return Program(future, key, devices, name, out_info)

  def _compile(self, lowered: Any, key: str, devices: tuple, name: str, out_info: Any,
               keep: bool) -> Program:
    options = self.compiler_options or None

    def compile_():
      t0 = time.perf_counter()
      compiled = lowered.compile(options)
      self._log(name, "compiled", time.perf_counter() - t0, key)
      return compiled

    future = self._submit(compile_)
    if keep:
      self._by_key.setdefault(key, {})[devices] = future
    return Program(future, key, devices, name, out_info)
