r"""gpt-oss style mixture-of-experts model on the Shakespeare corpus, byte-level tokens.

Top-2 of 4 SwiGLU experts per block, load-balancing and router z-losses, sliding-window attention
on even blocks and learned attention sinks.

Variants (the part after ``:``):
  (none)    d=256, 6 layers, 8 experts (top 2), seq 256, batch 64, 3000 steps.
  cpu       small: d=64, 4 layers, 4 experts (top 2), seq 64, batch 16, 200 steps.
  runlocal  tiny smoke test: a few steps.

Commands (from the repo root):
  python launch/train.py --config=experiments/moe_tiny.py:runlocal --workdir=workdirs/moe_local
  python launch/train.py --config=experiments/moe_tiny.py:cpu --workdir=workdirs/moe_cpu
  # pipelined, MPMD on 2 simulated CPU devices
  python launch/train.py --config=experiments/moe_tiny.py:cpu --host_devices=2 \
      --config.backend=mpmd --config.pipeline.ranks=2 --config.pipeline.num_microbatches=4
"""

from hkpipe.train import default_config


def get_config(arg: str | None = None):
  """Returns the experiment config for variant ``arg`` ('', 'cpu' or 'runlocal')."""
  variant = arg or "full"
  if variant not in ("full", "cpu", "runlocal"):
    raise ValueError(f"Unknown variant {variant!r}; use '', 'cpu' or 'runlocal'.")
  c = default_config()
  c.model.update({"name": "moe", "vocab_size": 256, "seq_len": 256, "d_model": 256,
                  "n_layers": 6, "n_heads": 8, "n_kv_heads": 2, "d_ff": 512,
                  "n_experts": 8, "experts_per_token": 2, "router_softmax": "topk",
                  "load_balance_weight": 0.01, "router_z_weight": 1e-3,
                  "sliding_window": 128, "attention_sinks": True, "dtype": "float32"})
  c.batch_size = 64
  c.num_steps = 3000
  c.optim.update({"learning_rate": 1e-3, "warmup_steps": 100, "b2": 0.99})
  c.log_every, c.eval_every, c.checkpoint_every = 10, 250, 250
  if variant == "cpu":
    c.model.update({"seq_len": 64, "d_model": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
                    "d_ff": 128, "n_experts": 4, "sliding_window": 32})
    c.batch_size = 16
    c.num_steps = 200
    c.optim.update({"learning_rate": 3e-3, "warmup_steps": 20})
    c.log_every, c.eval_every, c.checkpoint_every = 10, 100, 100
  elif variant == "runlocal":
    c.model.update({"seq_len": 16, "d_model": 32, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
                    "d_ff": 32, "n_experts": 4, "sliding_window": 8})
    c.batch_size = 8
    c.num_steps = 6
    c.optim.update({"learning_rate": 3e-3, "warmup_steps": 2})
    c.log_every, c.eval_every, c.checkpoint_every = 1, 3, 3
    c.eval_batches = 1
    c.sample_tokens = 16
  return c
