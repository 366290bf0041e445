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
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import serialize_executable

from jax._src import compiler as jax_compiler  # pylint: disable=g-bad-import-order
from jax._src.lib import xla_client


@dataclasses.dataclass
class CompileStats:
  """What building the programs cost (for tests and benchmarks).

  Attributes:
    compiled: number of XLA compilations.
    cloned: number of programs loaded from an executable compiled for other devices.
    traced: number of programs traced and lowered (one per stage and program kind).
    trace_s: seconds spent tracing and lowering.
    compile_s: seconds spent in XLA compilation.
    clone_s: seconds spent cloning executables onto other devices.
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
  old_assignment = compiled._executable._unloaded_executable.device_list  # pylint: disable=protected-access
  by_id = {d.id: d for d in client.devices()}
  assignment = [by_id[id_map[d.id]] for d in old_assignment]
  unloaded, args_info_flat, no_kwargs = _RemappingUnpickler(data, client, id_map, assignment).load()
  return jax.stages.Compiled(unloaded.load(), [], in_tree.unflatten(args_info_flat), out_tree,
                             no_kwargs=no_kwargs)


@dataclasses.dataclass(frozen=True)
class Program:
  """A compiled stage program.

  Attributes:
    fn: the ``jax.stages.Compiled`` (``fn(*flat_args)`` runs it asynchronously).
    key: the lowered text it was keyed by (programs with equal keys share one XLA compile).
    devices: the devices it runs on, in mesh order.
    name: the traced function's name (for logs).
  """

  fn: jax.stages.Compiled
  key: str
  devices: tuple[Any, ...]
  name: str

  def out_specs(self) -> Any:
    """The output pytree as ``ShapeDtypeStruct`` s carrying their shardings."""
    return jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=o.sharding),
                        self.fn.out_info)


class ProgramCache:
  """Compiles flat stage programs, sharing one XLA compile among identical programs.

  One cache per backend instance by default (no global state); pipelines over the same model
  in one process (e.g. a test suite) may share one by assigning ``backend.cache``. Not
  thread-safe.

  Args:
    compiler_options: XLA options passed to every compile (e.g.
      ``{"xla_backend_optimization_level": 0}`` trades run time for compile time).
  """

  def __init__(self, compiler_options: dict[str, Any] | None = None):
    self.stats = CompileStats()
    self.compiler_options = dict(compiler_options or {})
    # lowered text -> {devices: compiled}; the first entry is the one clones are made from.
    self._by_key: dict[str, dict[tuple[Any, ...], jax.stages.Compiled]] = {}
    self._clone_ok = True

  def _log(self, name: str, how: str, seconds: float, key: str) -> None:
    self.stats.log.append((name, how, seconds, hash(key)))

  def build(self, fn: Callable[..., Any], args: Sequence[jax.ShapeDtypeStruct],
            devices: Sequence[Any], *, out_shardings: Any = None,
            donate_argnums: Sequence[int] = ()) -> Program:
    """Traces, lowers and compiles (or clones) ``fn`` for ``args`` on ``devices``.

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
      The program; ``program.fn(*arrays)`` runs it asynchronously.
    """
    t0 = time.perf_counter()
    jitted = jax.jit(fn, out_shardings=out_shardings, donate_argnums=tuple(donate_argnums),
                     keep_unused=True)
    lowered = jitted.trace(*args).lower()
    devices = tuple(devices)
    self.stats.traced += 1
    self.stats.trace_s += time.perf_counter() - t0
    if lowered._lowering.const_args:  # pylint: disable=protected-access
      # Hoisted constants travel with the executable: never share it.
      return self._compile(lowered, f"{id(lowered)}", devices, fn.__name__, keep=False)
    key = f"{len(devices)}\n{lowered.as_text()}"
    placed = self._placed(key, devices, fn.__name__)
    if placed is not None:
      return placed
    return self._compile(lowered, key, devices, fn.__name__, keep=True)

  def place(self, program: Program, devices: Sequence[Any]) -> Program | None:
    """``program`` on other devices of the same shape, without tracing; None if impossible."""
    return self._placed(program.key, tuple(devices), program.name)

  def _placed(self, key: str, devices: tuple, name: str) -> Program | None:
    variants = self._by_key.get(key)
    if not variants:
      return None
    if devices in variants:
      self._log(name, "reused", 0.0, key)
      return Program(variants[devices], key, devices, name)
    if not self._clone_ok:
      return None
    base_devices, base = next(iter(variants.items()))
    t0 = time.perf_counter()
    try:
      compiled = clone_compiled(base, base_devices, devices)
    except Exception:  # pylint: disable=broad-except
      # Serializing executables is a backend feature; compiling instead is always correct.
      self._clone_ok = False
      return None
    dt = time.perf_counter() - t0
    self.stats.cloned += 1
    self.stats.clone_s += dt
    self._log(name, "cloned", dt, key)
    variants[devices] = compiled
    return Program(compiled, key, devices, name)

  def _compile(self, lowered: Any, key: str, devices: tuple, name: str, keep: bool) -> Program:
    t0 = time.perf_counter()
    compiled = lowered.compile(self.compiler_options or None)
    dt = time.perf_counter() - t0
    self.stats.compiled += 1
    self.stats.compile_s += dt
    self._log(name, "compiled", dt, key)
    if keep:
      self._by_key.setdefault(key, {})[devices] = compiled
    return Program(compiled, key, devices, name)
