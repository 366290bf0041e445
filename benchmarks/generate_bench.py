"""Decoding speed: recompute vs KV cache on one device, and pipelined (MPMD) decoding.

Usage::

  python benchmarks/generate_bench.py               # writes benchmarks/results/generate.json
  python benchmarks/generate_bench.py --recompute_tokens 200 --out /tmp/g.json

Model: GPT (vocab 256, d_model 256, 8 layers, 4 heads, context 256), random init, fp32; batch 8,
prompt 16 random tokens, 200 new tokens (greedy, no end token, so every row runs every step).

Rows, each timed after a warm-up call of the same shapes (so compiles are excluded; the warm-up
time is reported as ``first_call_s``):

- ``recompute``: ``generate(use_cache=False)``: the whole ``[8, 256]`` window per token; timed over
  ``--recompute_tokens`` tokens (the step's shape does not change with the token count);
- ``cache``: ``generate(use_cache=True)``: prefill + compiled ``while_loop``, 200 tokens;
- ``mpmd_g1`` / ``mpmd_g8``: ``Pipeline.generate`` on 4 MPMD stages (one simulated CPU device
  each) with 1 group of 8 sequences / 8 groups of 1, 200 tokens.

``tokens_per_s`` = batch x new tokens / seconds. Every row must produce the tokens of ``cache``
(``same_tokens``; recompute over its prefix). Simulated CPU devices share the same cores, so the
pipelined rows measure the overhead of walking the stages, not a speedup.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import optax  # noqa: E402

import hkpipe  # noqa: E402
from hkpipe import models  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "generate.json"
BATCH, PROMPT, NEW = 8, 16, 200


def _timed(fn) -> tuple[np.ndarray, float]:
  t0 = time.perf_counter()
  out = np.asarray(jax.block_until_ready(fn()))
  return out, time.perf_counter() - t0


def _row(name: str, fn, new_tokens: int) -> tuple[dict, np.ndarray]:
  _, first = _timed(fn)                                                 # compile + run
  out, seconds = _timed(fn)
  return {"name": name, "new_tokens": new_tokens, "seconds": round(seconds, 4),
          "tokens_per_s": round(BATCH * new_tokens / seconds, 2),
          "first_call_s": round(first, 2), "load_avg": os.getloadavg()[0]}, out


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--recompute_tokens", type=int, default=20)
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args(argv)
  config = models.GPTConfig(vocab_size=256, seq_len=256, d_model=256, n_layers=8, n_heads=4)
  model = models.build(config)
  rows_in = np.random.default_rng(0).integers(0, 256, (BATCH, config.seq_len)).astype(np.int32)
  prompt = rows_in[:, :PROMPT]
  key = jax.random.key(0)
  pipe = hkpipe.Pipeline(model, optax.sgd(0.0), backend="mpmd", num_ranks=4,
                         num_microbatches=4)
  state = pipe.init(key, (rows_in, rows_in))
  params = jax.device_put(jax.device_get(pipe.params(state)), jax.devices()[0])
  kw = dict(rng=key, temperature=0.0)
  rows = []
  cache_row, cache_out = _row("cache", lambda: models.generate(
      model, params, prompt, max_new_tokens=NEW, use_cache=True, **kw), NEW)
  rows.append(cache_row)
  n = args.recompute_tokens
  row, out = _row("recompute", lambda: models.generate(
      model, params, prompt, max_new_tokens=n, use_cache=False, **kw), n)
  row["same_tokens"] = bool(np.array_equal(out, cache_out[:, :PROMPT + n]))
  rows.append(row)
  for groups in (1, 8):
    row, out = _row(f"mpmd_g{groups}", lambda g=groups: pipe.generate(
        state, prompt, max_new_tokens=NEW, num_groups=g, **kw), NEW)
    row["same_tokens"] = bool(np.array_equal(out, cache_out))
    rows.append(row)
  by = {r["name"]: r for r in rows}
  result = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "environment": {"jax": jax.__version__, "python": platform.python_version(),
                      "cpus": os.cpu_count(), "devices": len(jax.devices())},
      "model": "GPT vocab 256, d 256, 8 layers, 4 heads, context 256, fp32",
      "batch": BATCH, "prompt": PROMPT, "rows": rows,
      "cache_speedup_vs_recompute": round(by["cache"]["tokens_per_s"]
                                          / by["recompute"]["tokens_per_s"], 2),
  }
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
  print("| row | new tokens | seconds | tokens/s | first call (s) | same tokens | load |")
  print("|---|---:|---:|---:|---:|---|---:|")
  for r in rows:
    print(f"| {r['name']} | {r['new_tokens']} | {r['seconds']} | {r['tokens_per_s']} | "
          f"{r['first_call_s']} | {r.get('same_tokens', '-')} | {r['load_avg']:.1f} |")
  print(f"cache / recompute tokens/s: {result['cache_speedup_vs_recompute']}x")
  return result


if __name__ == "__main__":
  main()
