"""The GPT-2 124M experiment config and the GPU benchmark's CPU smoke run."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hkpipe
from hkpipe import models
from hkpipe import train as hk_train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_gpt2_124m_config():
  config = _load("experiments/gpt2_124m.py", "gpt2_124m").get_config("")
  mcfg = hk_train.model_config(config)
  assert (mcfg.seq_len, mcfg.vocab_size, mcfg.d_model, mcfg.n_layers) == (1024, 50304, 768, 12)
  assert dict(config.optim) == {"learning_rate": 6e-4, "warmup_steps": 2000, "min_lr_ratio": 0.1,
                                "weight_decay": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
                                "max_grad_norm": 1.0}
  policy = hkpipe.precision.get_policy(mcfg.dtype)
  assert policy.compute_dtype == jnp.bfloat16 and policy.param_dtype == jnp.float32
  model = models.build(mcfg.replace(attention_impl="xla"))   # cudnn needs a GPU to build
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1024), jnp.int32))
  total = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) - 50304 * 768  # tied head
  assert total == 124_373_760      # nanoGPT: 123.59M without the 786,432 position embeddings


def test_peak_flops_table():
  bench = _load("benchmarks/gpu_bench.py", "gpu_bench")
  assert bench.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert bench.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert bench.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert bench.peak_flops("TPU v4") == 275e12
  assert bench.peak_flops("cpu") is None


@pytest.mark.slow
def test_gpu_bench_cpu_smoke(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_bench.py"), "--variant", "runlocal",
                  "--steps", "2", "--warmup", "0", "--out", str(out)], check=True, env=env,
                 cwd=ROOT, timeout=600)
  result = json.loads(out.read_text())
  single, mpmd = result["rows"]["single"], result["rows"]["mpmd_2stage"]
  # Same model, batch and init: the pipeline's first loss is the single device's.
  np.testing.assert_allclose(mpmd["first_loss"], single["first_loss"], rtol=1e-5)
  for row in (single, mpmd):
    assert row["step_s_median"] > 0
    assert row["tokens_per_s"] == pytest.approx(8 * 16 / row["step_s_median"])
    assert "mfu" not in row                       # CPU: no known peak
  assert result["overhead"] == pytest.approx(mpmd["step_s_median"] / single["step_s_median"])
  assert "MFU omitted" in result["mfu_note"]
  assert result["flops_per_token"] == models.flops_per_token(
      models.GPTConfig(**{k: v for k, v in result["model"].items()}, bias=False))
