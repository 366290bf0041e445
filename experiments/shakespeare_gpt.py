r"""GPT-2 (nanoGPT shakespeare-char style) on the Shakespeare corpus, byte-level tokens.

Variants (the part after ``:``):
  (none)    full size: d=384, 6 layers, 6 heads, seq 256, batch 64, dropout 0.2, 5000 steps.
  cpu       small: d=128, 4 layers, seq 64, batch 32, 300 steps; trains visibly in a few
            minutes on 2 CPU cores.
  runlocal  tiny smoke test: a few steps, for tests and quick checks.

Commands (from the repo root):
  python launch/train.py --config=experiments/shakespeare_gpt.py:cpu --workdir=workdirs/gpt_cpu
  python launch/train.py --config=experiments/shakespeare_gpt.py --workdir=workdirs/gpt
  # pipelined: MPMD, 4 stages on 4 simulated CPU devices, 1F1B over 8 microbatches
  python launch/train.py --config=experiments/shakespeare_gpt.py:cpu --host_devices=4 \
      --config.backend=mpmd --config.pipeline.ranks=4 --config.pipeline.num_microbatches=8
"""

from hkpipe.train import default_config


def get_config(arg: str | None = None):
  """Returns the experiment config for variant ``arg`` ('', 'cpu' or 'runlocal')."""
  variant = arg or "full"
  if variant not in ("full", "cpu", "runlocal"):
    raise ValueError(f"Unknown variant {variant!r}; use '', 'cpu' or 'runlocal'.")
  c = default_config()
  c.model.update({"name": "gpt", "vocab_size": 256, "seq_len": 256, "d_model": 384,
                  "n_layers": 6, "n_heads": 6, "dropout": 0.2, "bias": False,
                  "tie_embeddings": True, "dtype": "float32"})
  # Tokens: "bytes" (256 ids), or "bpe": a byte-level BPE of data.vocab_size ids trained on the
  # corpus and cached in data.dir; the model's vocab_size then follows data.vocab_size.
  c.data.tokenizer = "bytes"
  c.data.vocab_size = None  # bpe: e.g. 1024 (unset: 1024); bytes: unset
  c.batch_size = 64
  c.num_steps = 5000
  c.optim.update({"learning_rate": 1e-3, "warmup_steps": 100, "min_lr_ratio": 0.1,
                  "b2": 0.99, "weight_decay": 0.1})
  c.log_every, c.eval_every, c.checkpoint_every = 10, 250, 250
  if variant == "cpu":
    c.model.update({"seq_len": 64, "d_model": 128, "n_layers": 4, "n_heads": 4, "dropout": 0.0})
    c.batch_size = 32
    c.num_steps = 900            # 1.84M tokens: val loss 1.87 in about 100 s of training on 2 cores
    c.optim.update({"learning_rate": 2e-3, "warmup_steps": 50})
    c.log_every, c.eval_every, c.checkpoint_every = 10, 300, 300
  elif variant == "runlocal":
    c.model.update({"seq_len": 16, "d_model": 32, "n_layers": 4, "n_heads": 2, "dropout": 0.0})
    c.batch_size = 8
    c.num_steps = 6
    c.optim.update({"learning_rate": 3e-3, "warmup_steps": 2})
    c.log_every, c.eval_every, c.checkpoint_every = 1, 3, 3
    c.eval_batches = 1
    c.sample_tokens = 16
  return c
