"""Bad inputs fail early and clearly: every option is used or rejected, sizes are validated before
anything compiles, and each message names the value and the fix (issue "Nothing lost, nothing
silent")."""

import os
import pathlib
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkpipe
from hkpipe import train as train_lib
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import shakespeare_gpt  # pylint: disable=wrong-import-position


def _config(**pipeline):
  c = shakespeare_gpt.get_config("runlocal")
  c.pipeline.update(pipeline)
  return c


# -- trainer config --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["pmap", "single"])
def test_ranks_on_a_backend_without_stages_is_an_error(backend):
  config = _config(ranks=4)
  config.backend = backend
  with pytest.raises(hkpipe.ConfigError, match=r"config\.pipeline\.ranks=4.*mpmd"):
    train_lib.pipeline_options(config)


@pytest.mark.parametrize("field,value", [("schedule", "gpipe"), ("virtual_stages", 2),
                                         ("boundaries", (2, 4)), ("partition_cost", "flops")])
def test_pipeline_only_fields_on_pmap_are_errors(field, value):
  config = _config(**{field: value})
  config.backend = "pmap"
  with pytest.raises(hkpipe.ConfigError, match=rf"config\.pipeline\.{field}=.*drop it"):
    train_lib.pipeline_options(config)


@pytest.mark.parametrize("backend", ["single", "pmap", "spmd", "mpmd"])
@pytest.mark.parametrize("field,option,value", [
    ("ranks", "num_ranks", 2), ("schedule", "schedule", "gpipe"),
    ("virtual_stages", "virtual_stages", 2), ("boundaries", "partition", (2,)),
    ("partition_cost", "partition", "flops")])
def test_config_fields_and_options_are_rejected_by_the_same_backends(backend, field, option,
                                                                     value):
  """The trainer's ``config.pipeline.*`` checks and ``PipelineOptions`` agree on which backend
  uses what (documented: the pipelined backends only)."""
  def rejected(fn):
    try:
      fn()
    except hkpipe.ConfigError as e:
      assert "does not use" in str(e), e
      return True
    return False

  config = _config(**{field: value})
  config.backend = backend
  by_config = rejected(lambda: train_lib.pipeline_options(config))
  by_options = rejected(lambda: hkpipe.PipelineOptions(backend=backend, **{option: value}))
  assert by_config == by_options == (backend in ("single", "pmap"))


def test_dp_on_single_is_an_error():
  with pytest.raises(hkpipe.ConfigError, match=r"config\.pipeline\.dp=2.*pipeline\.dp for data"):
    train_lib.pipeline_options(_config(dp=2))


@pytest.mark.parametrize("field,value,fix", [
    ("pipeline.ranks", -1, "number of pipeline ranks"),
    ("pipeline.ranks", 0, "number of pipeline ranks"),
    ("pipeline.dp", 0, "data-parallel width"),
    ("batch_size", 0, "positive global batch size"),
    ("pipeline.num_microbatches", 0, "num_microbatches=4"),
    ("pipeline.virtual_stages", 0, "stages per rank"),
    ("num_steps", 0, "positive step count"),
    ("keep_checkpoints", 0, "keep N >= 1"),
    ("eval_batches", 0, "N >= 1 batches"),
    ("log_every", 0, "log every"),
    ("sample_temperature", -0.5, "0.8"),
    ("data.val_fraction", 1.0, "0.1"),
    ("optim.learning_rate", -1.0, "1e-3"),
    ("optim.max_grad_norm", -1.0, "0 (or leave it unset) to disable"),
])
def test_bad_sizes_are_rejected_before_anything_runs(tmp_path, field, value, fix):
  config = _config()
  config.backend, config.pipeline.ranks = "mpmd", 2
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(hkpipe.ConfigError, match=rf"config\.{field}={value!r}") as e:
    train_lib.train(config, tmp_path / "w")
  assert fix in str(e.value)
  assert not (tmp_path / "w").exists()  # nothing prepared, written or compiled


def test_pipeline_stages_is_the_deprecated_spelling_of_ranks():
  """``pipeline.stages`` meant ranks: it still sizes the mesh, with a warning naming
  ``pipeline.ranks``; both at once is an error, and on ``pmap`` the message names the field given."""
  config = _config(stages=2, dp=2)
  config.backend = "spmd"
  with pytest.warns(FutureWarning, match=r"config\.pipeline\.stages is deprecated; use "
                    r"config\.pipeline\.ranks instead \(config\.pipeline\.ranks=2\)"):
    train_lib.validate_config(config)
  assert train_lib.pipeline_options(config)["mesh"].devices.shape == (2, 2)
  config.pipeline.ranks = 2
  with pytest.raises(hkpipe.ConfigError, match=r"both config\.pipeline\.stages=2 \(deprecated\) "
                     r"and config\.pipeline\.ranks=2; pass only config\.pipeline\.ranks"):
    train_lib.validate_config(config)
  config = _config(stages=4)
  config.backend = "pmap"
  with pytest.raises(hkpipe.ConfigError, match=r"does not use config\.pipeline\.stages=4"):
    train_lib.pipeline_options(config)


def test_sizes_that_do_not_divide_name_the_multiple():
  config = _config(num_microbatches=3)
  with pytest.raises(hkpipe.ConfigError, match=r"batch_size=8.*multiple of 3"):
    train_lib.validate_config(config)
  config = _config(ranks=2, dp=4, num_microbatches=4)  # 8 rows / 4 microbatches = 2 rows; dp 4
  config.backend = "spmd"
  with pytest.raises(hkpipe.ConfigError, match=r"dp=4.*multiple of 16"):
    train_lib.pipeline_options(config)
  config = _config(ranks=3, dp=3)
  config.backend = "mpmd"
  with pytest.raises(hkpipe.ConfigError, match=r"needs 9 devices but 8.*--host_devices=9"):
    train_lib.pipeline_options(config)


def test_unknown_fields_and_bad_names_are_rejected():
  config = _config()
  with config.unlocked():
    config.pipeline.stage = 2  # a typo of stages
  with pytest.raises(hkpipe.ConfigError, match=r"Unknown config fields \['pipeline.stage'\]"):
    train_lib.validate_config(config)
  config = _config(schedule="1f1f")
  config.backend = "mpmd"
  with pytest.raises(hkpipe.ConfigError, match=r"pipeline\.schedule='1f1f'.*'gpipe'"):
    train_lib.validate_config(config)
  config = _config()
  config.model.d_modle = 8
  with pytest.raises(hkpipe.ConfigError, match=r"\['d_modle'\].*'d_model'"):
    train_lib.validate_config(config)


def test_pmap_uses_every_device_unless_told():
  config = _config()
  config.backend = "pmap"
  assert train_lib.pipeline_options(config)["devices"] == jax.devices()
  config.pipeline.dp = 2
  assert train_lib.pipeline_options(config)["devices"] == jax.devices()[:2]


def test_pipelined_backends_default_to_every_device():
  config = _config(dp=2)
  config.backend = "spmd"
  options = train_lib.pipeline_options(config)
  assert options["mesh"].devices.shape == (4, 2)
  assert options["schedule"] is None and options["partition"] is None  # the backend's defaults
  pipe_options = hkpipe.PipelineOptions(backend="spmd", **options)
  assert (pipe_options.schedule, pipe_options.partition) == ("1f1b", "params")


def test_zero_max_grad_norm_disables_clipping():
  """max_grad_norm=0 is documented as 'no clipping': the step equals plain SGD on the gradient
  computed from the layers alone (a clip at 0 would leave the parameters unchanged)."""
  model = helpers.hetero_model()
  batch = helpers.token_batch()
  pipe = hkpipe.Pipeline(model, optax.sgd(0.5), max_grad_norm=0, donate=False)
  assert pipe.options.max_grad_norm is None
  state = pipe.init(jax.random.key(0), batch)
  new, metrics = pipe.train_step(state, batch)
  grads = jax.grad(lambda p: model.loss(p, *batch))(state.params)
  want = jax.tree.map(lambda p, g: p - 0.5 * g, state.params, grads)
  helpers.assert_trees_close(new.params, want)
  assert float(metrics["grad_norm"]) > 0.1


# -- Pipeline options ------------------------------------------------------------------------


@pytest.mark.parametrize("backend,option,value", [
    ("single", "schedule", "gpipe"), ("single", "num_ranks", 2), ("single", "partition", "flops"),
    ("single", "record_timeline", True), ("single", "virtual_stages", 2),
    ("pmap", "schedule", "1f1b"), ("pmap", "num_ranks", 2), ("pmap", "partition", (2,)),
    ("pmap", "record_timeline", True), ("spmd", "record_timeline", True)])
def test_options_a_backend_does_not_use_are_errors(backend, option, value):
  with pytest.raises(hkpipe.ConfigError, match=rf"backend='{backend}' does not use {option}=.*drop"):
    hkpipe.Pipeline(helpers.hetero_model(), optax.sgd(0.1), backend=backend, **{option: value})


def test_single_with_several_devices_is_an_error():
  with pytest.raises(hkpipe.ConfigError, match="lists 2; pass one device"):
    hkpipe.Pipeline(helpers.hetero_model(), optax.sgd(0.1), devices=jax.devices()[:2])


@pytest.mark.parametrize("option,value", [("num_microbatches", 0), ("num_ranks", -1),
                                          ("virtual_stages", 0), ("max_grad_norm", -1.0),
                                          ("max_grad_norm", float("nan"))])
def test_bad_option_values_name_the_value(option, value):
  with pytest.raises(hkpipe.ConfigError, match=rf"{option} must be .*got {value!r}"):
    hkpipe.Pipeline(helpers.hetero_model(), optax.sgd(0.1), backend="mpmd", **{option: value})


def test_num_stages_option_is_the_deprecated_spelling_of_num_ranks():
  """``Pipeline(num_stages=)`` meant ranks: it still picks the first 2 devices as 2 ranks, with a
  warning naming ``num_ranks``; both at once is an error."""
  model = helpers.hetero_model()
  with pytest.warns(FutureWarning, match=r"PipelineOptions: num_stages is deprecated; use "
                    r"num_ranks instead \(num_ranks=2\)"):
    pipe = hkpipe.Pipeline(model, optax.sgd(0.1), backend="mpmd", num_stages=2,
                           partition=[3])
  assert (pipe.options.num_ranks, pipe.options.num_stages) == (2, None)
  assert pipe.layout.num_ranks == 2
  assert list(pipe.layout.device_grid[:, 0]) == jax.devices()[:2]
  with pytest.raises(hkpipe.ConfigError, match=r"both num_stages=2 \(deprecated\) and "
                     r"num_ranks=2; pass only num_ranks"):
    hkpipe.Pipeline(model, optax.sgd(0.1), backend="mpmd", num_stages=2, num_ranks=2)
  with pytest.raises(hkpipe.ConfigError, match=r"backend='single' does not use num_ranks=2"):
    with pytest.warns(FutureWarning):
      hkpipe.Pipeline(model, optax.sgd(0.1), num_stages=2)


def test_zero_row_batch_is_rejected():
  pipe = hkpipe.Pipeline(helpers.hetero_model(), optax.sgd(0.1))
  x, y = helpers.token_batch()
  with pytest.raises(hkpipe.ConfigError, match="0 rows; pass at least num_microbatches=1"):
    pipe.init(jax.random.key(0), (x[:0], y[:0]))


def test_mpmd_takes_ranks_and_microbatches_from_a_schedule_object():
  """On an 8-device machine a 2-rank schedule object gives a 2-rank pipeline whose loss and
  gradients equal the single-device reference."""
  model = helpers.hetero_model()
  batch = helpers.token_batch()
  schedule = hkpipe.schedules.get("1f1b", num_ranks=2, num_microbatches=4)
  pipe = hkpipe.Pipeline(model, optax.sgd(0.1), backend="mpmd", schedule=schedule)
  assert pipe.options.num_microbatches == 4 and pipe.options.num_ranks == 2
  ref = hkpipe.Pipeline(model, optax.sgd(0.1), num_microbatches=4)
  state, ref_state = pipe.init(jax.random.key(0), batch), ref.init(jax.random.key(0), batch)
  loss, grads = pipe.loss_and_grads(state, batch)
  ref_loss, ref_grads = ref.loss_and_grads(ref_state, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=helpers.RTOL)
  helpers.assert_trees_close(grads, ref_grads)
  with pytest.raises(hkpipe.ConfigError, match="num_microbatches=2 but the schedule object"):
    hkpipe.Pipeline(model, optax.sgd(0.1), backend="mpmd", schedule=schedule, num_microbatches=2)


# -- layers ----------------------------------------------------------------------------------


def test_a_plain_haiku_function_of_x_is_a_layer():
  """``Layer(name, hk.transform(fn))`` with ``fn(x)`` trains like the same math written by hand."""
  model = hkpipe.SequentialModel(
      [hkpipe.Layer("dense", hk.transform(lambda x: jnp.tanh(hk.Linear(4)(x)))),  # [B, 4]
       hkpipe.Layer.from_fn("head", lambda x, is_training: hk.Linear(1)(x))],     # [B, 1]
      lambda out, y: jnp.mean((out[:, 0] - y) ** 2))
  x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(8, 3)
  y = np.arange(8, dtype=np.float32)
  pipe = hkpipe.Pipeline(model, optax.sgd(0.1), num_microbatches=2, donate=False)
  state = pipe.init(jax.random.key(0), (x, y))
  loss, _ = pipe.loss_and_grads(state, (x, y))
  p = state.params
  hidden = jnp.tanh(x @ p["dense"]["linear"]["w"] + p["dense"]["linear"]["b"])
  out = hidden @ p["head"]["linear"]["w"] + p["head"]["linear"]["b"]
  np.testing.assert_allclose(loss, jnp.mean((out[:, 0] - y) ** 2), rtol=1e-5)


@pytest.mark.parametrize("fn", [lambda x, y: x, lambda x, is_training, scale: x,
                                lambda: 0, lambda *, is_training: 0])
def test_a_function_with_a_wrong_signature_is_rejected_at_construction(fn):
  with pytest.raises(TypeError, match=r"Layer 'bad': the function must be .*fn\(x\) or "
                                      r"fn\(x, is_training\)"):
    hkpipe.Layer("bad", hk.transform(fn))


def test_transform_with_state_is_rejected():
  with pytest.raises(TypeError, match="use hk.transform, not hk.transform_with_state"):
    hkpipe.Layer("s", hk.transform_with_state(lambda x: x))


# -- launcher --------------------------------------------------------------------------------


def _launch(*flags, timeout=120):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "launch/train.py", *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_launcher_config_error_is_one_line_with_status_2(tmp_path):
  out = _launch("--config=experiments/shakespeare_gpt.py:runlocal", f"--workdir={tmp_path}",
                "--config.backend=mpmd", "--config.pipeline.ranks=-1")
  assert out.returncode == 2, out
  assert out.stderr.strip().splitlines()[-1].startswith(
      "hkpipe: error: config.pipeline.ranks=-1 must be an int >= 1"), out.stderr
  assert "Traceback" not in out.stderr + out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("flags,missing", [
    (["--num_processes=2", "--process_id=0"], "coordinator_address"),
    (["--coordinator_address=127.0.0.1:1234"], "num_processes"),
])
def test_launcher_partial_multi_process_flags_are_an_error(tmp_path, flags, missing):
  out = _launch("--config=experiments/shakespeare_gpt.py:runlocal", f"--workdir={tmp_path}",
                *flags)
  assert out.returncode == 2, out
  line = out.stderr.strip().splitlines()[-1]
  assert line.startswith("hkpipe: error: Multi-process runs need all of") and missing in line, line
  assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_launcher_non_finite_stop_is_one_line_with_status_3(tmp_path):
  """A learning rate of 1e38 drives the parameters to NaN after a few steps; with
  max_consecutive_skips=1 the run stops at the first skipped step with one explained line."""
  out = _launch("--config=experiments/shakespeare_gpt.py:runlocal", f"--workdir={tmp_path}",
                "--config.optim.learning_rate=1e38", "--config.max_consecutive_skips=1",
                "--config.checkpoint_every=0", "--config.eval_every=0",
                "--config.sample_tokens=0", timeout=300)
  assert out.returncode == 3, out
  line = out.stderr.strip().splitlines()[-1]
  assert line.startswith("hkpipe: error: Training stopped at step") and "learning rate" in line, line
  assert "Traceback" not in out.stderr


# -- sharding inside stages: pipeline.fsdp / pipeline.tp / pipeline.sharding_rules -------------


def test_fsdp_and_tp_build_the_mesh_and_the_rules():
  """ranks x dp x fsdp x tp devices, rank-major: each rank's sub-mesh is one contiguous block of
  devices; "model" names the model's tensor-parallel rules over the mesh's inner axes."""
  config = _config(ranks=2, fsdp=2, tp=2, sharding_rules="model")
  config.backend = "mpmd"
  options = train_lib.pipeline_options(config)
  mesh = options["mesh"]
  assert mesh.axis_names == ("pp", "dp", "fsdp", "tp") and mesh.devices.shape == (2, 1, 2, 2)
  assert list(mesh.devices.flat) == jax.devices()[:8]
  expected = hkpipe.models.sharding_rules(train_lib.model_config(config), axes=("fsdp", "tp"))
  assert options["sharding_rules"] == expected
  config = _config(fsdp=2, sharding_rules="fsdp")      # ranks default: 8 devices / fsdp 2
  config.backend = "mpmd"
  options = train_lib.pipeline_options(config)
  assert options["mesh"].axis_names == ("pp", "dp", "fsdp")
  assert options["mesh"].devices.shape == (4, 1, 2)
  assert options["sharding_rules"] == hkpipe.sharding.Rules()
  pipe = hkpipe.Pipeline(hkpipe.models.build(train_lib.model_config(config)), optax.sgd(0.1),
                         backend="mpmd", **options)
  assert (pipe.options.mesh.shape["fsdp"], pipe.options.sharding_rules) == (2, hkpipe.sharding.Rules())


@pytest.mark.parametrize("backend", ["single", "pmap"])
@pytest.mark.parametrize("field,value", [("fsdp", 2), ("tp", 2), ("sharding_rules", "model")])
def test_sharding_inside_stages_is_rejected_where_unsupported(backend, field, value):
  """The backends that do not shard inside stages (options.OPTION_BACKENDS, row sharding_rules)
  reject the fields, naming the field and the backend that takes it."""
  config = _config(**{field: value})
  config.backend = backend
  with pytest.raises(hkpipe.ConfigError) as e:
    train_lib.pipeline_options(config)
  msg = str(e.value)
  assert f"does not use config.pipeline.{field}={value!r}" in msg, msg
  assert "--config.backend=mpmd" in msg and "drop it" in msg, msg
  users = hkpipe._src.options.backends_using(["sharding_rules"])  # pylint: disable=protected-access
  assert (backend in users) is False


def test_spmd_takes_fsdp_and_tp_like_mpmd():
  """spmd shards inside stages too (ZeRO-3 style storage): the same fields build the same mesh."""
  config = _config(ranks=2, fsdp=2, tp=2, sharding_rules="model")
  config.backend = "spmd"
  mesh = train_lib.pipeline_options(config)["mesh"]
  assert mesh.axis_names == ("pp", "dp", "fsdp", "tp") and mesh.devices.shape == (2, 1, 2, 2)


@pytest.mark.parametrize("pipeline,words", [
    (dict(ranks=2, fsdp=2, tp=4), ["pipeline.fsdp=2, pipeline.tp=4", "needs 16 devices",
                                   "ranks x dp x fsdp x tp", "--host_devices=16"]),
    (dict(fsdp=16), ["dp=1 x pipeline.fsdp=16", "leave no device", "--host_devices"]),
    (dict(ranks=2, fsdp=4, num_microbatches=4), ["has 2 rows", "dp x fsdp = 1 x 4 = 4",
                                                 "multiple of 16"]),
])
def test_fsdp_and_tp_sizes_that_do_not_fit_name_the_fix(pipeline, words):
  config = _config(**pipeline)
  config.backend = "mpmd"
  with pytest.raises(hkpipe.ConfigError) as e:
    train_lib.pipeline_options(config)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("field,value,fix", [
    ("pipeline.fsdp", 0, "FSDP width"), ("pipeline.tp", -2, "tensor-parallel width"),
    ("pipeline.sharding_rules", "megatron", "'fsdp', 'model'")])
def test_bad_fsdp_tp_and_rules_values(field, value, fix):
  config = _config()
  config.backend = "mpmd"
  config.pipeline[field.split(".")[1]] = value
  with pytest.raises(hkpipe.ConfigError, match=rf"config\.{field}={value!r}") as e:
    train_lib.validate_config(config)
  assert fix in str(e.value)


def test_mpmd_ranks_must_divide_over_processes():
  """Across processes every MPMD rank's sub-mesh must sit on one process: pipeline_sizes (a pure
  function of the config and the counts) refuses ranks that are not a multiple of the processes
  (a 2-process run with fsdp: tests/test_launch.py)."""
  from hkpipe._src import config_checks  # pylint: disable=g-import-not-at-top
  config = _config(ranks=1, fsdp=2)
  config.backend = "mpmd"
  with pytest.raises(hkpipe.ConfigError, match=r"pipeline.ranks=1 is not a multiple of 2"):
    config_checks.pipeline_sizes(config, device_count=8, process_count=2)
  config.pipeline.ranks = 2
  assert config_checks.pipeline_sizes(config, device_count=8, process_count=2) == (2, 1, 2, 1)
