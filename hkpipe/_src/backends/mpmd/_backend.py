"""The MPMD backend's public class: per-stage programs on per-rank devices, driven by a host
interpreter.

Each driver call (train step, gradients, evaluation) is an instruction program (``_lower``),
checked (``_check``) and bound to compiled programs and store slots (``_interp.bind``) once per
microbatch signature; a call fills the store with its inputs and executes the bound steps. See
``hkpipe/_src/backends/mpmd/__init__.py`` for the design.
"""

from __future__ import annotations

import gc
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hkpipe import schedules
from hkpipe._src import layout as layout_lib
from hkpipe._src import canonical as canonical_lib
from hkpipe._src import placement
from hkpipe._src import sharding as sharding_lib
from hkpipe._src import pipeline as pipeline_lib
from hkpipe._src import stage_link
from hkpipe._src.backends import _mpmd_compile
from hkpipe._src.backends import _mpmd_transfer as xfer_lib
from hkpipe._src.backends.mpmd import _check
from hkpipe._src.backends.mpmd import _interp
from hkpipe._src.backends.mpmd import _lower
from hkpipe._src.backends.mpmd import _memory
from hkpipe._src.backends.mpmd import _runnable as _run
from hkpipe._src.backends.mpmd import _shard
from hkpipe._src.backends.mpmd import _text
from hkpipe._src.backends.mpmd._setup import _Family
from hkpipe._src.backends.mpmd._setup import _microbatch_shapes
from hkpipe._src.backends.mpmd._setup import _Setup
from hkpipe._src.backends.mpmd._setup import _spec


class MpmdBackend(pipeline_lib.Backend):
  """True MPMD pipeline: per-stage compiled programs on per-rank devices, driven asynchronously.

  ``TrainState.params`` and ``TrainState.opt_state`` are tuples indexed by stage: stage ``s``
  holds ``{layer_name: params}`` for its layers and the optimizer state of that dict, all on the
  devices of rank ``schedule.stage_to_rank[s]``.

  Attributes:
    cache: the program cache; ``cache.stats`` counts XLA compiles, clones and their times.
    last_timeline: with ``record_timeline=True``, the executed actions of the last step as
      ``hkpipe.schedules.Record`` (rank, kind, stage, mb, start, end) in seconds (drawable with
      ``hkpipe.schedules.ascii_grid`` / ``svg_timeline``).
    last_stash_peaks: with ``record_timeline=True``, per rank, the most (stage, microbatch)
      stashes the last step's program holds at once (its liveness pass, computed before it
      runs).
    last_predicted_bytes: with ``record_timeline=True``, per instruction of the last step, per
      rank, the bytes its program's liveness pass predicts the step holds (see ``_check``).
    last_measured_bytes: the same, measured while the step ran: the bytes of live device arrays
      on the rank's devices (``jax.live_arrays()``) minus those before the step.
    last_stash_peak_bytes: per rank, the peak of ``last_measured_bytes``.
    batch_is_process_local: False: in a multi-process run every process passes the full global
      batch (the first rank's process reads its inputs, the last rank's process its targets).
  """

  batch_is_process_local = False

  def __init__(self, model, optimizer, options):
    super().__init__(model, optimizer, options)
    if options.mesh is not None:     # bad axis names fail here, before any compile
      sharding_lib.check_mesh_axes(tuple(options.mesh.axis_names))
    self.cache = _mpmd_compile.ProgramCache()
    self.last_timeline: tuple[schedules.Record, ...] = ()
    self.last_stash_peaks: tuple[int, ...] = ()
    self.last_stash_peak_bytes: tuple[int, ...] = ()
    self.last_predicted_bytes: tuple[tuple[int, ...], ...] = ()
    self.last_measured_bytes: tuple[tuple[int, ...], ...] = ()
    self._layout: layout_lib.Layout | None = None
    self._setups: dict[Any, _Setup] = {}
    self._rng_copies: tuple[Any, list] | None = None
    self._acc_pool: dict[int, list] = {}      # id(setup) -> zeroed accumulators for next step
    # Across processes (jax.distributed with several processes): transfers between ranks of
    # different processes go through this process's transfer server; every driver call has a
    # number, equal on every process, that (with the message) makes each transfer's id.
    self.transport: xfer_lib.Transport | None = None
    self.namespace = 0
    if jax.process_count() > 1:
      self.transport = xfer_lib.transport()
      self.namespace = self.transport.new_namespace()
    self._calls = 0

  @property
  def compile_stats(self) -> _mpmd_compile.CompileStats:
    """``cache.stats``: the program cache's compile statistics."""
    return self.cache.stats

  # -- layout ----------------------------------------------------------------------------------

  @property
  def multi_process(self) -> bool:
    """Whether the pipeline's ranks live on devices of several processes (known after
    ``init``, or at once with explicit stage boundaries)."""
    if jax.process_count() == 1:
      return False
    return len({int(d.process_index) for d in self.layout.device_grid.flat}) > 1

  @property
  def layout(self) -> layout_lib.Layout:
    """The resolved schedule, stages and device grid (after ``init`` or a first step)."""
    if self._layout is None:
      self._layout = self._resolve(None)
    return self._layout

  def _resolve(self, mb_inputs: Any) -> layout_lib.Layout:
    part = self.options.partition
    explicit = isinstance(part, Sequence) and not isinstance(part, str)
    if mb_inputs is None and not explicit:
      raise ValueError("The MPMD stage partition is not known yet: call init(rng, batch) first "
                       "(it balances layer costs on one microbatch), or pass explicit stage "
                       "boundaries as partition=[...].")
    layout = layout_lib.resolve(self.model, self.options, mb_inputs, inner=True)
    schedules.validate(layout.schedule)
    layout_lib.check_ranks_within_processes(layout)
    procs = {int(d.process_index) for d in layout.device_grid.flat}
    if len(procs) == 1 and jax.process_index() not in procs:
      raise ValueError(f"Every device of this pipeline belongs to process {procs.pop()}, so "
                       f"process {jax.process_index()} cannot run it: build a pipeline on one "
                       "process's devices only in that process, or spread the ranks over the "
                       "processes (e.g. num_ranks=a multiple of jax.process_count()).")
    return layout

  def _setup(self, batch: pipeline_lib.Batch) -> _Setup:
    mb_inputs, mb_targets = _microbatch_shapes(batch, self.options.num_microbatches)  # type: ignore[arg-type]
    key = (jax.tree.structure((mb_inputs, mb_targets)),
           tuple(jax.tree.leaves((mb_inputs, mb_targets))))
    if key not in self._setups:
      if self._layout is None:
        self._layout = self._resolve(mb_inputs)
      self._setups[key] = _Setup(self, self._layout, mb_inputs, mb_targets)
    return self._setups[key]

  def _rep(self, stage: int) -> NamedSharding:
    layout = self.layout
    devices = np.asarray(layout.stage_devices(stage), dtype=object)
    mesh = Mesh(devices, ("dp",), axis_types=(jax.sharding.AxisType.Auto,))
    return NamedSharding(mesh, P())

  # -- per-call context ------------------------------------------------------------------------

  def _rng_on_ranks(self, setup: _Setup, rng: jax.Array) -> list:
    if self._rng_copies is None or self._rng_copies[0] is not rng:
      owned = sorted(setup.owned)
      copies = jax.device_put([rng] * len(owned), [setup.rep[r] for r in owned])
      by_rank = dict(zip(owned, copies))
      self._rng_copies = (rng, [by_rank.get(r) for r in range(setup.num_ranks)])
    return self._rng_copies[1]

  def _next_call(self) -> int:
    """Numbers a driver call (multi-process: raises a transfer failure seen meanwhile)."""
    if self.transport is not None:
      self.transport.check()
    self._calls += 1
    return self._calls

  def _store(self, setup: _Setup, run: _run.Runnable, state: pipeline_lib.TrainState, batch: pipeline_lib.Batch,
             training: bool) -> list:
    """The buffer store of one call: constant inputs, then this call's inputs."""
    store = list(run.template)
    inp = run.bound.program.inputs
    for s in range(setup.num_stages):
      if setup.owns_stage(s):
        store[inp[("p", s)]] = setup.stage_leaves(s, state.params[s])
    inputs, targets = (jax.tree.leaves(part) for part in batch)
    if setup.first_rank in setup.owned:
      for mb, leaves in enumerate(setup.split(setup.first_rank, inputs)):
        store[inp[("x", mb)]] = leaves
    if setup.last_rank in setup.owned:
      for mb, leaves in enumerate(setup.split(setup.last_rank, targets)):
        store[inp[("t", mb)]] = leaves
    if training:
      rng = self._rng_on_ranks(setup, state.rng)
      step = setup.scalars_on_ranks(np.int32(state.step))
      for r in setup.owned:
        store[inp[("rng", r)]] = [rng[r]]
        store[inp[("step", r)]] = [step[r]]
      acc = self._accumulators(setup)
      for s in range(setup.num_stages):
        if setup.owns_stage(s):
          store[inp[("acc", s)]] = acc[s]
          if ("opt", s) in inp:
            store[inp[("opt", s)]] = jax.tree.leaves(state.opt_state[s])
    return store

  def _accumulators(self, setup: _Setup) -> list:
    """Zeroed gradient accumulators: the ones the previous train step's updates handed
    back (zeroed in place), or fresh zeros sent from the host."""
    recycled = self._acc_pool.pop(id(setup), None)
    if recycled is not None:
      return recycled
    # Created in place, in their shardings (no whole host buffer).
    return [[jnp.zeros(a.shape, a.dtype, device=sh) for a, sh in zip(f.p_leaves, setup.psh[s])]
            if setup.owns_stage(s) else None for s, f in enumerate(setup.fns)]

  def _execute(self, setup: _Setup, run: _run.Runnable, store: list) -> None:
    net = _run.Net(setup, self._next_call())
    if not self.options.record_timeline:
      # The loop creates thousands of short-lived objects (array handles, lists) that reference
      # counting frees; Python's cycle collector would only rescan them, so it pauses meanwhile.
      paused = gc.isenabled()
      gc.disable()
      try:
        _interp.execute(run.bound, store, net, self.progress)
      finally:
        if paused:
          gc.enable()
      return
    jax.block_until_ready([x for x in store if x is not None])
    device_rank = {d: r for r in setup.owned for d in setup.rank_device_lists[r]}
    trace = _interp.execute_timed(run.bound, store, net, self.progress, device_rank)
    self.last_timeline = trace.records
    self.last_timeline_origin = trace.origin
    self.last_stash_peaks = run.liveness.peak_stash
    self.last_predicted_bytes = run.liveness.bytes_after or ()
    self.last_measured_bytes = trace.bytes_after
    self.last_stash_peak_bytes = tuple(  # 0 for the ranks of other processes
        max([0] + [after[r] for after in trace.bytes_after if r < len(after)])
        for r in range(setup.num_ranks))

  def _train_family(self, setup: _Setup, state: pipeline_lib.TrainState, with_update: bool) -> _Family:
    opt = None
    if with_update:
      opt = [(jax.tree.structure(o), jax.tree.leaves(o)) for o in state.opt_state]
    core = setup.family("core", lambda: setup.build_core(state.rng))

    def build() -> _Family:
      program = _lower.lower_train(setup.facts(), with_update)
      _check.check(program)       # before compiling anything for it
      programs = setup.build_steps(core, opt)
      return _Family(programs, _run.runnable(setup, program, programs, opt))
    return setup.family("train" if with_update else "grads", build)

  def _eval_family(self, setup: _Setup, state: pipeline_lib.TrainState) -> _Family:
    def build() -> _Family:
      program = _lower.lower_eval(setup.facts())
      _check.check(program)
      programs = setup.build_eval(state.rng)
      return _Family(programs, _run.runnable(setup, program, programs, None))
    return setup.family("eval", build)

  def _metrics(self, run: _run.Runnable, store: list) -> tuple:
    """(loss, grad_norm, skipped) of a call: computed here or received from the metrics rank's
    process."""
    out = run.bound.program.outputs
    if ("metrics",) in out:
      return tuple(store[out[("metrics",)]])
    return tuple(store[out[(n,)]][0] for n in ("loss", "norm", "skipped"))

  def describe(self, batch: pipeline_lib.Batch, call: str = "train") -> str:
    """The instruction program this process issues for one driver call, as text.

    Args:
      batch: a batch of the shape the calls will get (the program is per microbatch shape).
      call: ``"train"`` (a train step), ``"grads"`` (``loss_and_grads``) or ``"eval"``.

    Returns:
      One line per instruction (buffers named, reads -> writes), then per rank the predicted
      peak stash count; nothing is compiled or run.
    """
    if call not in ("train", "grads", "eval"):
      raise ValueError(f"call must be 'train', 'grads' or 'eval', got {call!r}.")
    setup = self._setup(batch)
    facts = setup.facts()
    program = (_lower.lower_eval(facts) if call == "eval"
               else _lower.lower_train(facts, call == "train"))
    _check.check(program)
    return _text.describe(program, _check.liveness(program, setup.num_ranks))

  def memory_analysis(self, state: Any, batch: pipeline_lib.Batch) -> dict:
    """Per-rank, per-device bytes of the train step from the compiled programs (see
    ``_memory.report``); ``state`` is unused (may be None) and ``batch`` may be abstract."""
    del state
    return _memory.report(self, batch)

  def init(self, rng, batch):
    setup = self._setup(batch)
    call = self._next_call()
    params_rng, state_rng = jax.random.split(rng)
    init_programs = setup.family("init", lambda: setup.build_init(params_rng))
    owned = sorted(setup.owned)
    keys = dict(zip(owned, jax.device_put([params_rng] * len(owned),
                                          [setup.rep[r] for r in owned])))
    leaves: list = []
    for s, programs in enumerate(init_programs):
      if programs is None:                  # another process's stage
        leaves.append(None)
        continue
      inits = programs[0]
      r, start = setup.rank_of[s], setup.stages[s].start
      index = jax.device_put([np.int32(start + j) for j in range(len(inits))],
                             [setup.rep[r]] * len(inits))
      leaves.append([leaf for j, init in enumerate(inits) for leaf in init.fn(keys[r], index[j])])
    for k, link in enumerate(setup.ties):
      a, b = link.stage_a, link.stage_b
      sharding_b = setup.psh[b][link.leaf_b]
      if setup.owns_stage(a) and setup.owns_stage(b):
        leaves[b][link.leaf_b] = jax.device_put(leaves[a][link.leaf_a], sharding_b,
                                                may_alias=False)
      elif setup.owns_stage(a):  # a copy (the update may donate the original), in b's layout
        wire = setup.tie_wire(a, k)
        setup.post(call, ("tie_init", b, link.leaf_b),
                   [jax.device_put(leaves[a][link.leaf_a], wire, may_alias=False)])
      elif setup.owns_stage(b):
        spec = _spec(setup.fns[b].p_leaves[link.leaf_b], sharding_b)
        leaves[b][link.leaf_b] = setup.pull(call, ("tie_init", b, link.leaf_b),
                                            setup.rank_process[setup.rank_of[a]], [spec])[0]
    params, opt_state = [], []
    for s, programs in enumerate(init_programs):
      shapes = jax.eval_shape(self.optimizer.init, setup.stage_dict(s, setup.fns[s].p_leaves))
      if programs is None:
        params.append(setup.stage_dict(s, setup.remote_leaves(s, setup.fns[s].p_leaves,
                                                              setup.psh[s])))
        opt_state.append(jax.tree.structure(shapes).unflatten(
            setup.remote_leaves(s, jax.tree.leaves(shapes), setup.opt_shardings(s))))
        continue
      params.append(setup.stage_dict(s, leaves[s]))
      opt_state.append(jax.tree.structure(shapes).unflatten(programs[1].fn(*leaves[s])))
    return pipeline_lib.TrainState(step=0, params=tuple(params), opt_state=tuple(opt_state),
                         rng=state_rng)

  def _run_train_program(self, state, batch, with_update: bool):
    """Runs the train (``with_update``) or gradient program; returns what its caller reads."""
    setup = self._setup(batch)
    run = self._train_family(setup, state, with_update=with_update).bound
    store = self._store(setup, run, state, batch, training=True)
    self._execute(setup, run, store)
    return setup, run, store, run.bound.program.outputs

  def train_step(self, state, batch):
    setup, run, store, out = self._run_train_program(state, batch, with_update=True)
    owned = [setup.owns_stage(s) for s in range(setup.num_stages)]
    self._acc_pool[id(setup)] = [store[out[("acc", s)]] if owned[s] else None
                                 for s in range(setup.num_stages)]
    # Another process's stages keep their stand-ins (same structure on every process).
    params = tuple(setup.stage_dict(s, store[out[("p", s)]]) if owned[s] else state.params[s]
                   for s in range(setup.num_stages))
    opt_state = tuple(jax.tree.structure(o).unflatten(store[out[("opt", s)]]) if owned[s] else o
                      for s, o in enumerate(state.opt_state))
    loss, norm, skipped = self._metrics(run, store)
    return (pipeline_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng),
            {"loss": loss, "grad_norm": norm, "skipped": skipped})

  def loss_and_grads(self, state, batch):
    setup, run, store, out = self._run_train_program(state, batch, with_update=False)
    grads = [store[out[("grads", s)]] if setup.owns_stage(s) else None
             for s in range(setup.num_stages)]
    loss = self._metrics(run, store)[0]
    if setup.multi:
      return loss, setup.canonical(setup.gather(self._next_call(), "grads", grads))
    return loss, setup.canonical(grads)

  def eval_step(self, state, batch):
    setup = self._setup(batch)
    run = self._eval_family(setup, state).bound
    store = self._store(setup, run, state, batch, training=False)
    _interp.execute(run.bound, store, _run.Net(setup, self._next_call()), self.progress)
    return {"loss": store[run.bound.program.outputs[("loss",)]][0]}

  def params(self, state):
    """Canonical ``{layer_name: params}`` of ``state``.

    Across processes, a collective: every process must call it (in the same order as its other
    driver calls); each gets the full parameters on its first local device.
    """
    if not self.multi_process:
      return super().params(state)
    setup = next(iter(self._setups.values()), None)
    if setup is None:
      raise ValueError("params(state) across processes needs the pipeline's stage shapes: call "
                       "init(rng, batch) first.")
    call = self._next_call()
    per_stage = [setup.stage_leaves(s, state.params[s]) if setup.owns_stage(s) else None
                 for s in range(setup.num_stages)]
    return setup.canonical(setup.gather(call, "params", per_stage))

  @property
  def decodes_in_place(self) -> bool:
    """Each stage decodes on its rank's devices (across processes too: a rank never spans
    processes)."""
    return True

  def stage_params(self, state):
    """``state.params`` as they are (stage ``s`` on its rank's devices); across processes, the
    stages of other processes as their shapes and dtypes."""
    me = jax.process_index()
    return self.layout, [p if self.layout.stage_devices(s)[0].process_index == me
                         else stage_link.abstract(p) for s, p in enumerate(state.params)]

  def stage_channel(self):
    """Across processes: this backend's namespace and the next call number."""
    if self.transport is None:
      return None
    return stage_link.Channel(self.transport, self.namespace, self._next_call())

  def to_canonical(self, state):
    names = [spec.layer_names for spec in self.layout.stages]
    params: dict = {}
    for stage_params in state.params:
      params.update(stage_params)
    params = {layer.name: params[layer.name] for layer in self.model.layers}
    opt_state = canonical_lib.merge(list(state.opt_state), names)
    if self.multi_process:
      opt_state = self._shared_leaves_everywhere(state.opt_state, names, opt_state)
    return {"params": params, "opt_state": opt_state, "rng": state.rng}

  def _shared_leaves_everywhere(self, parts: Sequence[Any], names: Sequence[Sequence[str]],
                                merged: Any) -> Any:
    """Makes the optimizer-state leaves every stage holds a copy of (step counters...) global.

    ``canonical_lib.merge`` takes those leaves from stage 0, whose process may not be this one. Every stage
    updates its copy in lockstep, so the copies are equal: each process contributes the copy of
    a stage it owns to an array replicated over one device per process, which checkpoints save
    once and restore on every process (see :meth:`from_canonical`).
    """
    # Which merged leaves are shared: merging stage markers forwards and backwards gives the
    # same stage for a layer's leaf, but the first part's for a shared leaf.
    marks = [jax.tree.map(lambda _, s=s: s, part) for s, part in enumerate(parts)]
    first = jax.tree.leaves(canonical_lib.merge(marks, names))
    last = jax.tree.leaves(canonical_lib.merge(marks[::-1], names[::-1]))
    me = jax.process_index()
    mine = next(s for s, spec in enumerate(self.layout.stages)
                if self._rep(spec.index).mesh.devices.flat[0].process_index == me)
    order = [mine] + [s for s in range(len(parts)) if s != mine]
    local = jax.tree.leaves(canonical_lib.merge([parts[s] for s in order], [names[s] for s in order]))
    everywhere = NamedSharding(placement.process_mesh(), P())
    here = jax.local_devices()[0]

    def widen(x):
      copy = jax.device_put(x.addressable_shards[0].data, here)
      return jax.make_array_from_single_device_arrays(x.shape, everywhere, [copy])
    leaves, treedef = jax.tree.flatten(merged)
    leaves = [widen(local[i]) if first[i] != last[i] else x for i, x in enumerate(leaves)]
    return jax.tree.unflatten(treedef, leaves)

  def from_canonical(self, canonical: Mapping[str, Any], step: int):
    all_names = self.model.layer_names
    params, opt_state = [], []
    me = jax.process_index()
    layout = self.layout
    pspecs = _shard.stage_param_specs(
        self.model, self.options, layout,
        [tuple(canonical["params"][n] for n in spec.layer_names) for spec in layout.stages])
    for spec in layout.stages:
      r = layout.schedule.stage_to_rank[spec.index]
      mesh = layout.rank_mesh(r)
      rep = NamedSharding(mesh, P())
      stage_params = {n: canonical["params"][n] for n in spec.layer_names}
      stage_opt = canonical_lib.restrict(canonical["opt_state"], spec.layer_names, all_names)
      # Each leaf in its target sharding (parameters by the rules, optimizer state following).
      p_tree = jax.tree.structure(tuple(stage_params[n] for n in spec.layer_names))
      p_sh = jax.tree.unflatten(p_tree, _shard.named(mesh, pspecs[spec.index]))
      p_sh = dict(zip(spec.layer_names, p_sh))
      o_sh = jax.tree.unflatten(jax.tree.structure(stage_opt),
                                _shard.opt_shardings(self.optimizer, stage_params, p_sh, rep))
      if self.multi_process and mesh.devices.flat[0].process_index != me:
        # Another process's stage: stand-ins with its shapes and the owner's shardings.
        def remote(x, sh):
          return xfer_lib.remote_array(jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sh))
        params.append(jax.tree.map(remote, stage_params, p_sh))
        opt_state.append(jax.tree.map(remote, stage_opt, o_sh))
        continue
      # Shared optimizer leaves (counters) may be replicated over every process: the copy here.
      params.append(jax.device_put(stage_params, p_sh))
      opt_state.append(jax.device_put(jax.tree.map(placement.local_value, stage_opt), o_sh))
    return pipeline_lib.TrainState(step=int(step), params=tuple(params), opt_state=tuple(opt_state),
                         rng=canonical["rng"])
