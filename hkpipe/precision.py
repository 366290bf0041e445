"""Mixed precision: ``jmp``-style policies applied per layer (see ``docs/accelerators.md``).

- :class:`Policy`: the dtypes of parameters, compute and the model's output.
- :func:`get_policy`: a policy from its string (``"float32"``, ``"bfloat16"``, or
  ``"params=float32,compute=bfloat16,output=float32"``); the model configs' ``dtype`` field.
- :func:`apply_to_layer`: a layer (or cached layer) under a policy.
"""

from hkpipe._src.precision import Policy
from hkpipe._src.precision import apply_to_layer
from hkpipe._src.precision import get_policy

__all__ = ("Policy", "apply_to_layer", "get_policy")
