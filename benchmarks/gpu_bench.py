"""GPT-2 124M training throughput and MFU on one device: single-device step vs a 2-stage MPMD
pipeline whose two stages share that device (the pipeline's overhead ratio).

Usage::

  python benchmarks/gpu_bench.py                          # GPU/TPU: the full GPT-2 124M recipe
  python benchmarks/gpu_bench.py --variant runlocal       # CPU smoke test (tiny shape)
  python benchmarks/gpu_bench.py --out /tmp/gpu.json --steps 20 --batch 16

The model and optimizer come from ``experiments/gpt2_124m.py`` (variant ``full``: context 1024,
vocab 50304, bf16 compute policy, cuDNN attention, AdamW as nanoGPT; ``cpu``/``runlocal``: tiny
shapes). Batches are random token ids (throughput does not depend on the data). Both rows run the
same global batch split into ``--microbatches`` microbatches: ``single`` accumulates them on one
device (``backend="single"``), ``mpmd_2stage`` pipelines them over two stages placed on the same
device with 1F1B (``backend="mpmd"``, ``devices=[d, d]``).

Per row: the first step (trace + compile + run), the median and minimum of ``--steps`` timed
steps (each waits for its loss), tokens/s from the median, and MFU =
``hkpipe.models.flops_per_token(config) * tokens/s / peak`` with the peak dense bf16 FLOP/s of the
device kind from :data:`PEAK_FLOPS`; for an unknown kind (e.g. CPU) MFU is omitted with a note.
The JSON also records the first step's loss of each row (they must be equal: same model, same
batch) and ``overhead = mpmd median / single median``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hkpipe  # noqa: E402
from hkpipe import models  # noqa: E402
from hkpipe import train as hk_train  # noqa: E402
from hkpipe._src import optim  # noqa: E402

# Peak dense bf16 FLOP/s per device, from the vendors' data sheets (no sparsity), matched by a
# lower-case substring of ``device.device_kind``; first match wins (more specific kinds first).
PEAK_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),        # H100 SXM5 (device_kind "NVIDIA H100 80GB HBM3")
    ("h200", 989e12),
    ("gh200", 989e12),
    ("a100", 312e12),
    ("tpu v6", 918e12),      # v6e (Trillium)
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of ``device_kind`` from :data:`PEAK_FLOPS`, or None if unknown."""
  kind = device_kind.lower()
  for key, value in PEAK_FLOPS:
    if key in kind:
      return value
  return None


def _experiment(variant: str):
  spec = importlib.util.spec_from_file_location("gpt2_124m", ROOT / "experiments/gpt2_124m.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # type: ignore[union-attr]
  return module.get_config("" if variant == "full" else variant)


def _time_row(pipe: hkpipe.Pipeline, batch: Any, steps: int, warmup: int) -> dict:
  t0 = time.perf_counter()
  state = pipe.init(jax.random.key(0), batch)
  state, metrics = pipe.train_step(state, batch)
  first_loss = float(metrics["loss"])
  first = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = pipe.train_step(state, batch)
  jax.block_until_ready(metrics["loss"])
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = pipe.train_step(state, batch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t)
  return {"first_step_s": first, "step_s_median": statistics.median(times),
          "step_s_min": min(times), "steps_timed": steps, "first_loss": first_loss}


def run(variant: str, steps: int, warmup: int, batch_size: int | None,
        microbatches: int) -> dict:
  """Measures both rows; returns the JSON-able result."""
  config = _experiment(variant)
  mcfg = hk_train.model_config(config)
  model = models.build(mcfg)
  batch_size = batch_size or config.batch_size
  opt_cfg = optim.OptimizerConfig(total_steps=config.num_steps, **{
      k: v for k, v in dict(config.optim).items() if k != "max_grad_norm"})
  opt = optim.adamw(opt_cfg)
  x = jax.random.randint(jax.random.key(1), (batch_size, mcfg.seq_len), 0, mcfg.vocab_size)
  batch = (x, jnp.roll(x, -1, axis=1))
  device = jax.devices()[0]
  common = dict(num_microbatches=microbatches, max_grad_norm=config.optim.max_grad_norm)
  rows = {
      "single": hkpipe.Pipeline(model, opt, backend="single", devices=[device], **common),
      "mpmd_2stage": hkpipe.Pipeline(model, opt, backend="mpmd", devices=[device, device],
                                     schedule="1f1b", **common),
  }
  tokens = batch_size * mcfg.seq_len
  fpt = models.flops_per_token(mcfg)
  peak = peak_flops(device.device_kind)
  result: dict[str, Any] = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device_kind": device.device_kind, "platform": device.platform, "jax": jax.__version__,
      "variant": variant, "model": {k: getattr(mcfg, k) for k in (
          "vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "dtype", "attention_impl",
          "loss_chunk_size")},
      "batch_size": batch_size, "num_microbatches": microbatches, "tokens_per_step": tokens,
      "flops_per_token": fpt, "peak_flops": peak, "load_avg_before": os.getloadavg()[0],
      "rows": {}}
  if peak is None:
    result["mfu_note"] = (f"MFU omitted: no peak FLOP/s known for device kind "
                          f"{device.device_kind!r} (see PEAK_FLOPS in benchmarks/gpu_bench.py).")
  for name, pipe in rows.items():
    row = _time_row(pipe, batch, steps, warmup)
    row["tokens_per_s"] = tokens / row["step_s_median"]
    if peak is not None:
      row["mfu"] = fpt * row["tokens_per_s"] / peak
    result["rows"][name] = row
  result["overhead"] = (result["rows"]["mpmd_2stage"]["step_s_median"]
                        / result["rows"]["single"]["step_s_median"])
  result["load_avg_after"] = os.getloadavg()[0]
  return result


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  default_variant = "full" if jax.default_backend() in ("gpu", "tpu") else "runlocal"
  p.add_argument("--variant", default=default_variant, choices=("full", "cpu", "runlocal"))
  p.add_argument("--steps", type=int, default=10, help="timed steps per row")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
  p.add_argument("--batch", type=int, default=None, help="global batch (default: experiment's)")
  p.add_argument("--microbatches", type=int, default=4)
  p.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu_bench.json"))
  args = p.parse_args(argv)
  result = run(args.variant, args.steps, args.warmup, args.batch, args.microbatches)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"device {result['device_kind']} ({result['platform']}), variant {args.variant}, "
        f"{result['tokens_per_step']} tokens/step")
  print("| row | step (s, median) | tokens/s | MFU | first step (s) |\n|---|---:|---:|---:|---:|")
  for name, row in result["rows"].items():
    mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "n/a"
    print(f"| {name} | {row['step_s_median']:.4f} | {row['tokens_per_s']:.0f} | {mfu} | "
          f"{row['first_step_s']:.1f} |")
  print(f"overhead (mpmd_2stage / single): {result['overhead']:.3f}")
  if "mfu_note" in result:
    print(result["mfu_note"])
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
