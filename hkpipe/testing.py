"""Assertions for your own test suite: does my pipeline train like the plain model?

Check a :class:`hkpipe.Pipeline` of your model (any backend, schedule, layout or mesh) against its
unpipelined reference, built automatically from the same layers (the ``"single"`` backend with
the same model, optimizer and step options)::

  pipe = hkpipe.Pipeline(model, optax.adam(1e-3), backend="mpmd", num_microbatches=4,
                         schedule="zb_h1", devices=jax.devices()[:2])
  hkpipe.testing.assert_pipeline_matches_reference(pipe, batch, steps=2)

It compares the initial parameters, the loss and every gradient leaf, and after each optimizer step
the step's ``loss``/``grad_norm`` and every parameter leaf. Tolerances default by dtype
(:data:`DEFAULT_TOLERANCES`: float32 ``rtol=1e-5, atol=1e-6``; bfloat16 ``2e-2, 2e-3``; float16
``5e-3, 5e-4``); a failure names the check and its worst leaf (path, shape, dtype, max abs and
rel difference, the worst element), not the arrays. See ``docs/testing.md``.

Public names:

- :func:`assert_pipeline_matches_reference`, :func:`reference_run` (the reference as host arrays,
  to reuse for several pipelines), :class:`ReferenceRun`, :func:`reference_pipeline`;
- :func:`assert_trees_close` (any two trees, the same report), :func:`default_tolerance`,
  :class:`Tolerance`, :data:`DEFAULT_TOLERANCES`;
- :func:`assert_schedule_valid` (validator + optional bubble/stash bounds of the simulation),
  :func:`assert_schedule_invalid`.
"""

from hkpipe._src.testing_compare import DEFAULT_TOLERANCES
from hkpipe._src.testing_compare import Tolerance
from hkpipe._src.testing_compare import assert_trees_close
from hkpipe._src.testing_compare import default_tolerance
from hkpipe._src.testing_reference import ReferenceRun
from hkpipe._src.testing_reference import assert_pipeline_matches_reference
from hkpipe._src.testing_reference import reference_pipeline
from hkpipe._src.testing_reference import reference_run
from hkpipe._src.testing_schedules import assert_schedule_invalid
from hkpipe._src.testing_schedules import assert_schedule_valid

__all__ = (
    "DEFAULT_TOLERANCES",
    "ReferenceRun",
    "Tolerance",
    "assert_pipeline_matches_reference",
    "assert_schedule_invalid",
    "assert_schedule_valid",
    "assert_trees_close",
    "default_tolerance",
    "reference_pipeline",
    "reference_run",
)
