r"""Llama-style model (RMSNorm, RoPE, SwiGLU, GQA) on the Shakespeare corpus, byte-level tokens.

Variants (the part after ``:``):
  (none)    full size: d=384, 6 layers, 6 heads / 2 KV heads, seq 256, batch 64, 5000 steps.
  cpu       small: d=128, 4 layers, 4 heads / 2 KV heads, seq 64, batch 32, 300 steps.
  runlocal  tiny smoke test: a few steps.

Commands (from the repo root):
  python launch/train.py --config=experiments/shakespeare_llama.py:cpu --workdir=workdirs/llama_cpu
  python launch/train.py --config=experiments/shakespeare_llama.py --workdir=workdirs/llama
  # pipelined, MPMD on 2 simulated CPU devices with the zero-bubble H1 schedule
  python launch/train.py --config=experiments/shakespeare_llama.py:cpu --host_devices=2 \
      --config.backend=mpmd --config.pipeline.ranks=2 --config.pipeline.schedule=zb_h1 \
      --config.pipeline.num_microbatches=4
"""

from hkpipe.train import default_config


def get_config(arg: str | None = None):
  """Returns the experiment config for variant ``arg`` ('', 'cpu' or 'runlocal')."""
  variant = arg or "full"
  if variant not in ("full", "cpu", "runlocal"):
    raise ValueError(f"Unknown variant {variant!r}; use '', 'cpu' or 'runlocal'.")
  c = default_config()
  c.model.update({"name": "llama", "vocab_size": 256, "seq_len": 256, "d_model": 384,
                  "n_layers": 6, "n_heads": 6, "n_kv_heads": 2, "d_ff": 1024,
                  "rope_theta": 10000.0, "dtype": "float32"})
  # Tokens: "bytes" (256 ids), or "bpe": a byte-level BPE of data.vocab_size ids trained on the
  # corpus and cached in data.dir; the model's vocab_size then follows data.vocab_size.
  c.data.tokenizer = "bytes"
  c.data.vocab_size = None  # bpe: e.g. 1024 (unset: 1024); bytes: unset
  c.batch_size = 64
  c.num_steps = 5000
  c.optim.update({"learning_rate": 1e-3, "warmup_steps": 100, "b2": 0.99})
  c.log_every, c.eval_every, c.checkpoint_every = 10, 250, 250
  if variant == "cpu":
    c.model.update({"seq_len": 64, "d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
                    "d_ff": 352})
    c.batch_size = 32
    c.num_steps = 300
    c.optim.update({"learning_rate": 2e-3, "warmup_steps": 30})
    c.log_every, c.eval_every, c.checkpoint_every = 10, 100, 100
  elif variant == "runlocal":
    c.model.update({"seq_len": 16, "d_model": 32, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
                    "d_ff": 64})
    c.batch_size = 8
    c.num_steps = 6
    c.optim.update({"learning_rate": 3e-3, "warmup_steps": 2})
    c.log_every, c.eval_every, c.checkpoint_every = 1, 3, 3
    c.eval_batches = 1
    c.sample_tokens = 16
  return c
