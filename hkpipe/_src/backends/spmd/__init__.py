"""The SPMD backend: the whole pipeline step is one jitted ``jax.shard_map`` program.

The mesh has axes ``("pp", "dp", "fsdp", "tp")`` (size 1 for those the user's mesh lacks). Rank
``r`` of ``pp`` holds only its own stages' parameters (and optimizer state), stored split over its
``("fsdp", "tp")`` devices, a stage's parameters gathered for each stage call and its gradients
reduce-scattered (ZeRO-3, see ``_columns``); ``dp``
replicates the pipeline; every microbatch is split evenly over ``("dp", "fsdp")``. The executor reads the schedule IR and runs it tick by tick: a ``lax.scan`` over ticks
in which every rank selects its action (``F``/``B``/``I``/``W`` of one stage, or idle) from a
static table with ``lax.switch``, then activations and cotangents move with ``lax.ppermute`` (see
``_tables``). Forwards use ``jax.vjp`` and stash the residuals the backward needs (only the
stage input with ``remat=True``); backwards pull the stashed residuals back through the same
``vjp``. So GPipe, 1F1B, interleaved 1F1B and the zero-bubble schedules each run with their own
memory profile: the stash has as many slots as the schedule's peak number of live forwards.

Heterogeneous stages (embedding first, head last, any boundary shapes and dtypes) share one
program through padding: each stage's parameters are flattened into per-dtype vectors, padded to
the largest rank and stacked along ``pp`` (see ``_pack.FlatLayout``); boundary activations and
cotangents are bit-cast into ``uint8`` buffers padded to the largest stage (see
``_pack.ByteCodec``). The stash is one buffer per dtype in which each rank keeps its own peak
number of slots, each the size of its own largest stage's stash (``_pack.slot_arena``), so it is
as large as the largest rank's need, not the largest peak times the largest stage. Every stage's
branch packs and unpacks its own structure. ``layout_report`` and
``benchmarks/spmd_padding.py`` give allocated vs needed bytes.

State on its owners (``_owners``): ``init`` runs one jitted program per rank, on that rank's
devices, that initialises its layers (layer ``i`` from ``fold_in(rng, i)``, as
``SequentialModel.init``; a tie's source layer too where the rank holds the target) and its
optimizer state and packs them into its rows; the rows are joined into the ``[pp, n]`` buffers
without copying. No device holds more than its rank's share (``init_memory_analysis`` compiles
these programs from shapes). ``to_canonical`` unpacks each rank's rows on its own devices: every
layer's params and optimizer state are arrays on its owning rank's devices (replicated over the
rank's ``dp`` devices), step counters and the rng replicated over the mesh; ``from_canonical``
packs each rank's leaves on its devices, leaving in place those already there.

Microbatches and ``dp``: the global batch is cut into ``num_microbatches`` microbatches as on the
single backend, and each microbatch is split evenly across the ``dp x fsdp`` devices, so the batch
size must be a multiple of ``num_microbatches * dp * fsdp``. Loss and gradients equal the single backend's (all
losses are means over equally sized examples). With ``dp x fsdp > 1`` each batch shard folds its
index into the microbatch dropout key (independent masks, not the reference's draws).

Multi-process: the mesh may span the devices of every process (each process runs the same
program). Each process passes its own rows of the global batch; they are placed on its own devices
as a global ``[B, ...]`` array (``pipeline.process_batch_spec``), and the jitted step itself
reshapes them into microbatches, so XLA moves rows between processes where a rank needs rows
another process fed. Each process runs the init/pack/unpack programs of the ranks it has devices
of (no collective); ``to_canonical`` gives other processes' leaves as arrays without a shard here.
``params``/``loss_and_grads`` are explicit gathers for small models: they all-gather the per-rank
buffers so every process gets the full canonical tree on its default device.
"""

from hkpipe._src.backends.spmd._backend import SpmdBackend
from hkpipe._src.backends.spmd._plan import SUPPORTED_SCHEDULES

__all__ = ["SUPPORTED_SCHEDULES", "SpmdBackend"]
