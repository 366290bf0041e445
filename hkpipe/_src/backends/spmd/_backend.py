"""``SpmdBackend``: planning, programs per batch shape, jitted entry points, placement and
canonical conversion (the executor bodies are in ``_executor``)."""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hkpipe._src import model as model_lib
from hkpipe._src import layout as layout_lib
from hkpipe._src import canonical as canonical_lib
from hkpipe._src import options as options_lib
from hkpipe._src import partition as partition_lib
from hkpipe._src import placement
from hkpipe._src import pipeline as pipeline_lib
from hkpipe._src.backends.spmd import _columns as columns
from hkpipe._src.backends.spmd import _owners as owners
from hkpipe._src.backends.spmd import _pack as pack
from hkpipe._src.backends.spmd import _tables as tables_lib
from hkpipe._src.backends.spmd import _planning as planning
from hkpipe._src.backends.spmd import _zero as zero
from hkpipe._src.backends.spmd import _memory as memory
from hkpipe._src.backends.spmd._executor import _Executor
from hkpipe._src.backends.spmd._plan import _check_schedule, _Plan, _Program, _shape_key
from hkpipe._src.backends.spmd._plan import _StageBackward


class SpmdBackend(_Executor):
  """Pipeline parallelism inside one ``shard_map`` program over a ``("pp", "dp", "fsdp", "tp")``
  mesh (state stored split over ``("fsdp", "tp")``: see ``_zero``)."""

  def __init__(self, model: model_lib.SequentialModel, optimizer: optax.GradientTransformation,
               options: options_lib.PipelineOptions):
    super().__init__(model, optimizer, options)
    _check_schedule(options.schedule)
    self._grid = layout_lib.device_grid(options, inner=True)
    self._inner = layout_lib.inner_axes(options)[1] if options.mesh is not None else (
        int(self._grid.shape[1]), 1, 1)  # (dp, fsdp, tp)
    self.mesh = zero.make_mesh(self._grid, self._inner)
    # Where process-local batch rows land (P() in one process); raises early on meshes that
    # leave a process out or do not follow process order.
    self._feed = NamedSharding(self.mesh, placement.process_batch_spec(self.mesh))
    self._plan: _Plan | None = None
    self._programs: dict[Any, tuple[_Program, dict]] = {}
    self._inits: dict[Any, list] = {}  # per layer input shapes: every rank's init program
    self._link: Any = None  # stage_channel's namespace and last call number (across processes)

  @property
  def num_ranks(self) -> int:
    return int(self._grid.shape[0])

  @property
  def dp(self) -> int:
    return int(self._inner[0])

  @property
  def batch_shards(self) -> int:
    """How many pieces each microbatch is split into: ``dp x fsdp``."""
    return int(self._inner[0] * self._inner[1])

  @property
  def state_shards(self) -> int:
    """How many pieces each rank's state is split into: ``fsdp x tp``."""
    return int(self._inner[1] * self._inner[2])

  @property
  def step_axes(self) -> zero.StepAxes:
    """How the step's ``shard_map`` treats ``fsdp``/``tp`` (after ``init``: tensor-parallel
    compute needs the parameter dtypes, ``zero.tensor_parallel_compute``)."""
    tp = int(self._inner[2])
    return zero.StepAxes(fsdp=int(self._inner[1]), tp=tp,
                         tp_compute=zero.tensor_parallel_compute(tp, list(self.plan.param_sizes)))

  @property
  def plan(self) -> _Plan:
    """The resolved placement; available after ``init`` (or ``from_canonical``)."""
    if self._plan is None:
      raise ValueError("The spmd pipeline has no layout yet: call init(rng, batch) first.")
    return self._plan

  @property
  def layout(self) -> layout_lib.Layout:
    """The resolved layout (``plan.layout``); available after ``init`` (or ``from_canonical``)."""
    return self.plan.layout

  # -- static planning -------------------------------------------------------------------------

  def _check_batch(self, batch: pipeline_lib.Batch) -> int:
    size = self.global_batch_size(batch)
    m, dp = self.options.num_microbatches, self.batch_shards
    assert m is not None  # Options.__post_init__ sets it (1 when unset)
    if size % (m * dp):
      raise ValueError(f"The spmd backend splits each of the num_microbatches={m} microbatches "
                       f"across dp x fsdp={dp} devices, so the batch size must be a multiple of "
                       f"{m} * {dp} = {m * dp}; got {size}. Change the batch size, "
                       "num_microbatches or the mesh's dp/fsdp axes.")
    return size

  def _ensure_plan(self, params: Mapping[str, Any], example_microbatch: Any) -> _Plan:
    if self._plan is None:
      avals = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), dict(params))
      self._plan = planning.make_plan(self.model, self.optimizer, self.options, avals,
                                      example_microbatch, self.state_shards)
    return self._plan

  # -- programs (per batch shape) --------------------------------------------------------------

  def _local_microbatch(self, tree: Any) -> Any:
    div = cast(int, self.options.num_microbatches) * self.batch_shards  # set by Options
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] // div,) + tuple(x.shape[1:]),
                                                       x.dtype), tree)

  def _global_avals(self, batch: pipeline_lib.Batch) -> Any:
    """Shapes of the global batch assembled from this process's ``batch``."""
    count = self.batch_process_count()
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        (np.shape(x)[0] * count,) + tuple(np.shape(x)[1:]), x.dtype), tuple(batch))

  def _program(self, batch: pipeline_lib.Batch, rng: jax.Array) -> tuple[_Program, dict]:
    """The program for this (global) batch shape (built and cached on first use) and its device
    tables."""
    key = (_shape_key(batch), _shape_key(rng))
    if key not in self._programs:
      prog = self._build_program(batch, rng)
      self._programs[key] = (prog, self._put_tables(self.plan.tables))
    return self._programs[key]

  def _put_tables(self, tables: tables_lib.TickTables) -> dict:
    return placement.put_global(dict(tables.arrays()), NamedSharding(self.mesh, P("pp")))

  def _build_program(self, batch: pipeline_lib.Batch, rng: jax.Array) -> _Program:
    plan = self.plan
    inputs, targets = (self._local_microbatch(t) for t in batch)
    num_stages = plan.num_stages
    stage_params = [lay.treedef.unflatten(lay.avals) for lay in plan.stage_layouts]
    key_aval = jax.eval_shape(lambda r: model_lib.microbatch_rng(r, 0, 0), rng)
    # Boundary activations (output of stage s for s < S-1), by abstract evaluation.
    boundaries, x = [], inputs
    for s in range(num_stages - 1):
      x = jax.eval_shape(lambda p, v, s=s: self._stage_apply(s, p, v, None, None, False),
                         stage_params[s], x)
      boundaries.append(x)
    act_codecs = tuple(pack.ByteCodec.of(b) for b in boundaries)
    cot_codecs = tuple(pack.ByteCodec.of(jax.tree.map(pack.cotangent_aval, b))
                       for b in boundaries)
    payload = max([c.nbytes for c in act_codecs + cot_codecs] + [1])
    backward = []
    for s in range(num_stages):
      box: dict[str, Any] = {}

      def record(p, v, k, t, s=s, box=box):
        _, box["residuals"], stash = self._stage_vjp(s, p, v, k, t)
        return stash

      x_aval = inputs if s == 0 else boundaries[s - 1]
      stash = jax.eval_shape(record, stage_params[s], x_aval, key_aval, targets)
      backward.append(_StageBackward(box["residuals"], pack.FlatLayout.of(stash)))
    strides, sizes = pack.slot_arena(
        [[backward[s].layout for s in plan.rank_stages(r)] for r in range(plan.num_ranks)],
        plan.tables.stash_peak)
    return _Program(act_codecs=act_codecs, cot_codecs=cot_codecs, payload_bytes=payload,
                    backward=tuple(backward), stash_strides=strides, stash_sizes=sizes)

  # -- jitted entry points ---------------------------------------------------------------------

  def _shard_map(self, body, in_specs, out_specs):
    return jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                         axis_names=set(self.step_axes.manual), check_vma=False)

  def _microbatches(self, tree: Any) -> Any:
    """Inside the jitted step: global ``[B, ...]`` -> ``[m, k, B/(m k), ...]`` sharded over
    ``("dp", "fsdp")`` (``k = dp x fsdp``; microbatch ``i`` = the reference's rows ``i*B/m ..``,
    split evenly over the ``k`` devices).

    Doing it in the program lets XLA move rows between processes when a process's own rows are
    not the ones its devices need (e.g. ``pp`` across processes: every rank needs every row)."""
    m, dp = self.options.num_microbatches, self.batch_shards
    sharding = NamedSharding(self.mesh, zero.DATA_SPEC)

    def split(x):
      x = x.reshape((m, dp, x.shape[0] // (m * dp)) + tuple(x.shape[1:]))
      return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(split, tree)

  @functools.cached_property
  def _jitted(self) -> dict:
    """The three jitted programs; ``prog`` is static (hashable by identity). Batches come in as
    global ``[B, ...]`` arrays (see ``_put_batch``)."""
    pp, data, st = P("pp"), zero.DATA_SPEC, self.step_axes.state_spec
    # The state stays split over ("fsdp", "tp") between steps, whatever the compiler chose for
    # the auto tp axis inside.
    stored = lambda tree: jax.lax.with_sharding_constraint(
        tree, NamedSharding(self.mesh, zero.STATE_SPEC))

    def train(prog, params, opt, rng, step, inputs, targets, tabs):
      fn = self._shard_map(functools.partial(self._train_body, prog),
                           (st, st, P(), P(), data, data, pp), (st, st, P()))
      params, opt, metrics = fn(params, opt, rng, step,
                                *self._microbatches((inputs, targets)), tabs)
      return stored(params), stored(opt), metrics

    def grads(prog, params, rng, step, inputs, targets, tabs):
      fn = self._shard_map(functools.partial(self._loss_grads_body, prog),
                           (st, P(), P(), data, data, pp), (P(), st))
      loss, g = fn(params, rng, step, *self._microbatches((inputs, targets)), tabs)
      return loss, stored(g)

    def evaluate(prog, params, inputs, targets, tabs):
      fn = self._shard_map(functools.partial(self._eval_body, prog),
                           (st, data, data, pp), P())
      return fn(params, *self._microbatches((inputs, targets)), tabs)

    donate = (1, 2) if self.options.donate else ()
    return {"train": jax.jit(train, static_argnums=0, donate_argnums=donate),
            "grads": jax.jit(grads, static_argnums=0),
            "eval": jax.jit(evaluate, static_argnums=0)}

  @functools.cached_property
  def _all_gather(self) -> Any:
    """Replicates (possibly process-spanning) buffers on every device of the mesh."""
    return jax.jit(lambda tree: tree, out_shardings=NamedSharding(self.mesh, P()))

  # -- placement -------------------------------------------------------------------------------

  def _put_batch(self, batch: pipeline_lib.Batch) -> tuple[Any, Any]:
    """This process's batch (its rows, or the whole batch in one process) as global ``[B, ...]``
    arrays: each process places its own rows on its own devices, no data crosses processes here
    (the program reshuffles; see ``_microbatches``). Inputs may start anywhere."""
    self._check_batch(batch)
    inputs, targets = batch
    return (placement.put_process_batch(inputs, self._feed), placement.put_process_batch(targets, self._feed))

  def _put_replicated(self, x: Any) -> Any:
    return placement.put_global(x, NamedSharding(self.mesh, P()))

  def _get_rows(self, bufs: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
    """Every rank's row of the buffers, on the host (an all-gather across processes: every
    process must call it)."""
    bufs = dict(bufs)
    if not all(v.is_fully_addressable for v in bufs.values()):
      bufs = {k: v.addressable_data(0) for k, v in self._all_gather(bufs).items()}
    return {k: np.asarray(jax.device_get(v)) for k, v in bufs.items()}

  # -- canonical conversion ----------------------------------------------------------------------

  def _params_to_canonical(self, bufs: Mapping[str, jax.Array]) -> dict:
    """Every rank's parameters (or gradients) gathered into one canonical tree on this process's
    default device: an all-gather (a collective across processes), for small models only."""
    plan, rows = self.plan, self._get_rows(bufs)
    out = {}
    for s, lay in enumerate(plan.stage_layouts):
      r = plan.rank_of(s)
      out.update(_unpack_row(lay, rows, r))
    return jax.tree.map(jnp.asarray, {n: out[n] for n in self.model.layer_names})

  def _rank_trees(self, canonical: Mapping[str, Any]) -> list[tuple[dict, Any]]:
    """Per rank, its ``({layer: params}, optimizer state)`` cut from a canonical state; checks
    the optimizer state splits per layer (before anything is placed or compiled)."""
    plan, names = self.plan, self.model.layer_names
    params = canonical["params"]
    missing = set(names) - set(params)
    if missing:
      raise ValueError(f"Canonical params lack layers {sorted(missing)}.")
    out = []
    for r in range(plan.num_ranks):
      tree = canonical_lib.restrict(canonical["opt_state"], plan.rank_names(r), names)
      expected = plan.opt_layouts[r].treedef
      if jax.tree.structure(tree) != expected:
        raise ValueError("The optimizer state does not split per layer (its structure after "
                         f"restricting to rank {r}'s layers is {jax.tree.structure(tree)}, but "
                         f"optimizer.init on those layers gives {expected}). The spmd backend "
                         "needs optax transformations whose state mirrors the parameters.")
      out.append(({n: params[n] for n in plan.rank_names(r)}, tree))
    return out

  @functools.cached_property
  def _rank_programs(self) -> dict:
    """Per rank, the jitted programs that pack/unpack its rows on its own devices."""
    plan = self.plan
    ranks = range(plan.num_ranks)
    return {"pack": [owners.pack_program(plan, self.mesh, r) for r in ranks],
            "unpack": [owners.unpack_program(plan, self.mesh, r) for r in ranks],
            "params": [owners.unpack_params_program(plan, self.mesh, r) for r in ranks]}

  def _state(self, rows: Sequence[tuple[dict, dict] | None], rng: Any, step: int
             ) -> pipeline_lib.TrainState:
    """A state from every rank's ``(param rows, optimizer rows)`` (None: another process's)."""
    plan = self.plan
    return pipeline_lib.TrainState(
        step=int(step),
        params=owners.join_rows([r and r[0] for r in rows], self.mesh, plan.param_sizes),
        opt_state=owners.join_rows([r and r[1] for r in rows], self.mesh, plan.opt_sizes),
        rng=self._put_replicated(rng))

  # -- introspection ---------------------------------------------------------------------------

  def layout_report(self, batch: pipeline_lib.Batch, rng: jax.Array | None = None) -> dict:
    """Bytes of the padded SPMD layout for this batch shape: what padding costs.

    Every ``pp`` rank allocates the same shapes, so each buffer is as large as the largest rank
    (parameters, gradients, optimizer state, stash) or the largest stage (boundary payloads). The
    stash is one buffer in which rank ``r`` keeps its own peak number of slots, each the size of
    its own largest stage's stash, so it is ``max_r peak_r * slot_r`` (per dtype).

    Args:
      batch: an example batch (only its shapes are used).
      rng: the state's key (its shape/type); default ``jax.random.key(0)``.

    Returns:
      A dict with, per rank, ``param_bytes`` (its own parameters) and ``opt_bytes``; per stage,
      ``stash_bytes`` (one microbatch's backward stash); and the padded sizes every rank allocates:
      ``param_buffer_bytes`` (also the gradient accumulator), ``opt_buffer_bytes``,
      ``stash_buffer_bytes``, ``payload_bytes`` x (``act_slots`` + ``cot_slots``); per rank,
      ``per_rank_peak_stash`` (the schedule's own peak) and ``stash_slot_bytes``; and
      ``stash_row_bytes`` (the largest stage's stash) and ``stash_slots`` (the largest peak).
    """
    return memory.layout_report(self, batch, rng)

  def memory_analysis(self, state: pipeline_lib.TrainState | None, batch: pipeline_lib.Batch
                      ) -> Any:
    """XLA's memory analysis (per device) of the compiled ``train_step`` program for this batch
    shape (compiles it if ``train_step`` has not yet; otherwise reuses the cached executable).

    ``temp_size_in_bytes`` includes the stash (``stash_buffer_bytes``), so it shows each
    schedule's memory profile.

    With ``state=None`` nothing is allocated: ``batch`` may hold ``jax.ShapeDtypeStruct`` s, the
    step is compiled for the abstract state and the result is the per-rank report dict of the
    ``mpmd`` backend (see ``_memory.report``).
    """
    if state is None:
      return memory.report(self, batch)
    inputs, targets = self._put_batch(batch)
    prog, tabs = self._program((inputs, targets), state.rng)
    lowered = self._jitted["train"].lower(prog, state.params, state.opt_state, state.rng,
                                          np.int32(state.step), inputs, targets, tabs)
    return lowered.compile().memory_analysis()

  # -- Backend API -----------------------------------------------------------------------------

  def _init_inputs(self, rng, batch) -> tuple[Any, Any, list]:
    """``(params rng, state rng, per-layer input shapes)``; resolves (and validates) the layout
    from shapes alone, so errors come before any compile."""
    size = self._check_batch(batch)
    one = placement.example_microbatch(batch[0], size,
                                       cast(int, self.options.num_microbatches))  # set by Options
    params_rng, state_rng = jax.random.split(rng)
    self._ensure_plan(jax.eval_shape(self.model.init, params_rng, one), one)
    in_avals = [x for _, x in partition_lib.layer_io_shapes(self.model, one)]
    return (params_rng, one), state_rng, in_avals

  def _check_real_state(self) -> None:
    """Refuses layouts a real state cannot use (``zero.check_index_range``)."""
    z = self.state_shards
    zero.check_index_range("parameter", self.plan.param_sizes, z)
    zero.check_index_range("optimizer-state", self.plan.opt_sizes, z)

  def _init_programs(self, in_avals: Sequence[Any]) -> list:
    """Every rank's init program for these layer input shapes (built once per shapes)."""
    key = _shape_key(in_avals)
    if key not in self._inits:
      self._inits[key] = [owners.init_program(self.model, self.optimizer, self.plan, self.mesh,
                                              r, in_avals) for r in range(self.num_ranks)]
    return self._inits[key]

  def init(self, rng, batch):
    """Parameters and optimizer state, each rank's built on its own devices straight into its
    packed rows (one jitted program per rank; nothing whole on any device or host). Values
    equal ``model.init`` / ``optimizer.init`` on the whole model."""
    (params_rng, one), state_rng, in_avals = self._init_inputs(rng, batch)
    self._check_real_state()
    rows = []
    for r, program in enumerate(self._init_programs(in_avals)):
      if not owners.is_here(self.mesh, r):
        rows.append(None)
        continue
      here = owners.leaf_sharding(self.mesh, r)
      rows.append(program(placement.put_global(params_rng, here), placement.put_global(one, here)))
    return self._state(rows, state_rng, 0)

  def init_memory_analysis(self, rng, batch) -> list:
    """XLA's memory analysis of every rank's init program (per device of that rank), compiled
    from shapes only: what ``init`` will allocate, before allocating it."""
    (params_rng, one), _, in_avals = self._init_inputs(rng, batch)
    aval = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    return [program.lower(aval(params_rng), jax.tree.map(aval, one)).compile().memory_analysis()
            for program in self._init_programs(in_avals)]

  def loss_and_grads(self, state, batch):
    inputs, targets = self._put_batch(batch)
    prog, arrays = self._program((inputs, targets), state.rng)
    loss, grads = self._jitted["grads"](prog, state.params, state.rng, np.int32(state.step),
                                        inputs, targets, arrays)
    return loss, self._params_to_canonical(grads)

  def train_step(self, state, batch):
    inputs, targets = self._put_batch(batch)
    prog, arrays = self._program((inputs, targets), state.rng)
    params, opt, metrics = self._jitted["train"](prog, state.params, state.opt_state, state.rng,
                                                 np.int32(state.step), inputs, targets,
                                                 arrays)
    return pipeline_lib.TrainState(step=state.step + 1, params=params, opt_state=opt,
                         rng=state.rng), metrics

  def eval_step(self, state, batch):
    inputs, targets = self._put_batch(batch)
    prog, arrays = self._program((inputs, targets), state.rng)
    return {"loss": self._jitted["eval"](prog, state.params, inputs, targets, arrays)}

  def params(self, state):
    """Canonical params gathered whole on this process's default device: an explicit gather
    (an all-gather across processes) for small models, e.g. sampling or tests. Checkpoints use
    ``to_canonical``, which gathers nothing."""
    return self._params_to_canonical(state.params)

  @property
  def decodes_in_place(self) -> bool:
    """Each stage decodes on its rank's devices, when every rank lies within one process."""
    return owners.ranks_within_processes(self.mesh, self.num_ranks)

  def stage_params(self, state):
    """Each stage's parameters unpacked on its rank's devices (replicated there; no optimizer
    state); across processes, other processes' stages as their shapes. None where a rank spans
    processes."""
    if not self.decodes_in_place:
      return None
    params: dict = {}
    for r, program in enumerate(self._rank_programs["params"]):
      params.update(owners.rank_decode_params(program, state.params, self.mesh, r))
    stages = self.layout.stages
    return self.layout, [{name: params[name] for name in spec.layer_names} for spec in stages]

  def stage_channel(self):
    """Across processes: a namespace of this backend's own and the next call number."""
    self._link = owners.next_channel(self._link)
    return self._link

  def to_canonical(self, state):
    """Canonical state where it lives: each layer's parameters and optimizer state as arrays on
    its owning rank's devices (replicated over that rank's ``dp`` devices; in a multi-process run,
    arrays without a shard on processes that do not own the rank). Leaves every rank holds a copy
    of (optimizer step counters) and the rng are replicated over the whole mesh. No device holds
    more than its rank's share; values equal the single backend's."""
    plan, programs = self.plan, self._rank_programs["unpack"]
    params, parts = {}, []
    for r in range(plan.num_ranks):
      if owners.is_here(self.mesh, r):
        p, o = programs[r](owners.split_rows(state.params, self.mesh, r),
                           owners.split_rows(state.opt_state, self.mesh, r))
      else:  # another process's rank: shard-less stand-ins of its shapes
        p, o = owners.remote_rank(plan, self.mesh, r)
      params.update(p)
      parts.append(o)
    opt = canonical_lib.merge(parts, [plan.rank_names(r) for r in range(plan.num_ranks)])
    shared, program = self._shared
    if shared:
      leaves, treedef = jax.tree.flatten(opt)
      for (j, _), v in zip(shared, program(dict(state.opt_state))):
        leaves[j] = v
      opt = jax.tree.unflatten(treedef, leaves)
    return {"params": {n: params[n] for n in self.model.layer_names}, "opt_state": opt,
            "rng": state.rng}

  @functools.cached_property
  def _shared(self) -> tuple[list, Any]:
    """The optimizer leaves every rank holds (see ``owners.shared_opt_leaves``) and the program
    that replicates rank 0's copies over the mesh."""
    shared = owners.shared_opt_leaves(self.plan)
    return shared, owners.shared_program(self.plan, self.mesh, [i for _, i in shared])

  def from_canonical(self, canonical: Mapping[str, Any], step: int):
    """Places a canonical state rank by rank: each rank's leaves are moved to its devices (kept
    where they already are, e.g. restored with ``like=to_canonical(...)``) and packed there."""
    if self._plan is None:
      # Only explicit stage boundaries can be resolved without an example batch.
      part = self.options.partition
      if isinstance(part, str) or callable(part):
        raise ValueError("from_canonical on a fresh spmd pipeline needs its stage layout: call "
                         "init(rng, batch) first, or pass explicit partition=[boundaries].")
      self._ensure_plan(canonical["params"], None)
    self._check_real_state()
    trees, programs = self._rank_trees(canonical), self._rank_programs["pack"]
    rows: list[Any] = []
    for r, tree in enumerate(trees):
      if not owners.is_here(self.mesh, r):
        rows.append(None)
        continue
      where = owners.leaf_sharding(self.mesh, r)
      rows.append(programs[r](*jax.tree.map(lambda x: owners.place_leaf(x, where), tree)))
    return self._state(rows, canonical["rng"], step)


def _unpack_row(lay: pack.FlatLayout, rows: Mapping[str, np.ndarray], r: int) -> Any:
  return columns.unpack(lay, {k: v[r] for k, v in rows.items()})


__all__: Sequence[str] = ("SpmdBackend",)
