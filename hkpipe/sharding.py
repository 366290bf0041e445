"""Mesh axes inside pipeline stages and parameter sharding rules (see ``docs/sharding.md``).

A pipeline mesh has the axes ``"pp"``, then any of ``"dp"``, ``"fsdp"``, ``"tp"`` in that order,
e.g. ``jax.make_mesh((2, 2, 2), ("pp", "fsdp", "tp"))``. Parameters, gradients and optimizer
state are sharded over ``"fsdp"``/``"tp"`` inside each stage by :class:`Rules` (pass them as
``Pipeline(..., sharding_rules=...)``); built-in tensor-parallel rules for GPT and Llama are
:func:`hkpipe.models.sharding_rules`.

Public names:

- :data:`AXES` (the four axis names), :func:`check_mesh_axes`;
- :class:`Rules`, :func:`resolve` (rules + shapes + mesh sizes -> a ``PartitionSpec`` per leaf),
  :func:`default_spec` (the default FSDP choice of one leaf), :data:`DEFAULT_FSDP_MIN_SIZE`;
- :func:`opt_state_shardings` (optimizer state follows its parameters), :func:`shard_bytes`
  (bytes per device of arrays' addressable shards).
"""

from hkpipe._src.sharding import AXES
from hkpipe._src.sharding import DEFAULT_FSDP_MIN_SIZE
from hkpipe._src.sharding import Rules
from hkpipe._src.sharding import check_mesh_axes
from hkpipe._src.sharding import default_spec
from hkpipe._src.sharding import opt_state_shardings
from hkpipe._src.sharding import resolve
from hkpipe._src.sharding import shard_bytes

__all__ = (
    "AXES",
    "DEFAULT_FSDP_MIN_SIZE",
    "Rules",
    "check_mesh_axes",
    "default_spec",
    "opt_state_shardings",
    "resolve",
    "shard_bytes",
)
