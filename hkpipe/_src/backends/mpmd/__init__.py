"""The true MPMD backend: one compiled XLA program per stage, driven by a host interpreter.

Each pipeline stage is a contiguous range of layers (``hkpipe.partition``) placed on the devices
of one pipeline rank (one device, or ``dp`` devices of a ``("pp", "dp")`` mesh). Its forward,
backward (or input/weight-gradient halves for zero-bubble schedules), optimizer update and a few
helpers are compiled ahead of time as separate executables (``_build``, ``_mpmd_compile``);
identical stages share one XLA compile.

A driver call is a program of typed instructions (``_instr``) over numbered buffers, lowered from
the schedule engine's issue order (``_lower``), checked and measured before it runs (``_check``:
every buffer written before it is read and freed once; per-rank peak stash count and bytes), and
executed by a small interpreter over a buffer store (``_interp``) through JAX's asynchronous
dispatch:

- a forward returns its output and the ``jax.vjp`` residuals the backward needs (minus those that
  are just its inputs); they stay in the store until the backward;
- the last stage fuses forward, loss and backward in one program;
- activations and cotangents move to the next rank's devices right after they are produced, by
  the runtime's batched device-to-device copy (stages on the same rank read them directly);
- gradients accumulate on the owning devices; tied weights on different stages exchange their
  gradients; each stage measures its squared gradient norm; the global norm (and the clipping
  factor, NaN when a non-finite loss or norm skips the step) is computed on the last rank and sent
  back; each stage applies the optimizer on its own devices. Parameters and optimizer state never
  leave their stage.

Nothing blocks except reading metrics (or ``record_timeline=True``, which blocks after each
instruction to time it and to sample the live device memory).

Across processes (``jax.distributed``), each process runs the program of the ranks whose devices
it owns: sends to another process post the arrays, and that process's program starts by pulling
them (``_mpmd_transfer``, uuid-keyed transfers; see docs/mpmd.md, "Across processes"). Every
process must make the same driver calls in the same order.

``MpmdBackend.describe(batch)`` prints the program.
"""

from hkpipe._src.backends.mpmd._backend import MpmdBackend

__all__ = ["MpmdBackend"]
