"""Compiled temp memory of the loss + gradient at vocab 128k: plain vs chunked cross-entropy.

Usage::

  python benchmarks/loss_memory_bench.py            # prints a markdown table, writes JSON
  python benchmarks/loss_memory_bench.py --out /tmp/loss_memory.json

For each shape, ``jax.jit(jax.value_and_grad(loss, argnums=(hidden, w)))`` is lowered and compiled
(nothing runs) and ``compiled.memory_analysis().temp_size_in_bytes`` is read: ``plain`` computes
the ``[N, V]`` logits (``hidden @ w.T``) and ``hkpipe.models.cross_entropy``; ``chunked`` is
``hkpipe.models.chunked_cross_entropy`` with ``--chunk`` tokens per chunk. float32 throughout.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hkpipe import models  # noqa: E402

VOCAB = 131072


def _plain(h, w, y):
  return models.cross_entropy(jnp.einsum("nd,vd->nv", h, w).astype(jnp.float32), y)


def _chunked(h, w, y, chunk):
  return models.chunked_cross_entropy(models.HeadOutput(h, w), y, chunk_size=chunk)


def temp_bytes(fn, n: int, d: int, v: int) -> int:
  args = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((v, d), jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.int32))
  compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--chunk", type=int, default=256)
  p.add_argument("--out", default=str(ROOT / "benchmarks/results/loss_memory.json"))
  args = p.parse_args()
  rows = []
  for n, d in ((256, 64), (2048, 768), (8192, 768)):
    plain = temp_bytes(_plain, n, d, VOCAB)
    chunked = temp_bytes(functools.partial(_chunked, chunk=args.chunk), n, d, VOCAB)
    rows.append({"tokens": n, "d_model": d, "vocab": VOCAB, "chunk": args.chunk,
                 "logits_bytes": n * VOCAB * 4, "plain_temp_bytes": plain,
                 "chunked_temp_bytes": chunked})
  print(f"platform {jax.default_backend()}, jax {jax.__version__}")
  print("| tokens N | d_model | [N, V] f32 logits | plain temp | chunked temp | ratio |")
  print("|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['tokens']} | {r['d_model']} | {r['logits_bytes'] / 2**20:.0f} MiB | "
          f"{r['plain_temp_bytes'] / 2**20:.1f} MiB | {r['chunked_temp_bytes'] / 2**20:.1f} MiB | "
          f"{r['plain_temp_bytes'] / r['chunked_temp_bytes']:.1f}x |")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"platform": jax.default_backend(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
  main()
