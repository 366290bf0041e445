r"""GPT-2 small (124M) as nanoGPT trains it: context 1024, vocab 50304, bf16 compute, AdamW.

Model: d_model 768, 12 layers, 12 heads, no biases, tied embeddings, no dropout; vocabulary
50304 (GPT-2's 50257 padded to a multiple of 64, as nanoGPT does). Precision policy
``params=float32,compute=bfloat16,output=float32`` (``hkpipe.precision``); attention through
``jax.nn.dot_product_attention`` (``attention_impl="cudnn"`` on a GPU, ``"xla"`` elsewhere).

Optimizer as nanoGPT's ``train_gpt2`` config: AdamW lr 6e-4, betas (0.9, 0.95), eps 1e-8,
weight decay 0.1, gradient clipping 1.0, linear warmup for 2000 steps then cosine decay to
``0.1 * lr`` (6e-5) at ``num_steps``. Batch: 32 sequences of 1024 tokens per step (32,768 tokens;
nanoGPT accumulates to about 0.5M tokens over 8 GPUs).

Data: a nanoGPT-style folder (``train.bin``/``val.bin`` of GPT-2 token ids, uint16, plus a
``meta.json`` with ``vocab_size`` and ``dtype``, see ``hkpipe.data``), e.g. OpenWebText tokenised
by nanoGPT's ``data/openwebtext/prepare.py``; pass it with ``--config.data.dir``.

Variants (the part after ``:``):
  (none)    full size, as above; for one GPU.
  cpu       the same recipe on a tiny shape (byte-level Shakespeare, vocab 256, d=64, 2 layers,
            context 64), float32 compute policy on CPU.
  runlocal  an even smaller smoke run: a few steps.

Commands (from the repo root):
  python launch/train.py --config=experiments/gpt2_124m.py --workdir=workdirs/gpt2 \
      --config.data.dir=/data/openwebtext
  python launch/train.py --config=experiments/gpt2_124m.py:runlocal --workdir=workdirs/gpt2_local
"""

import ml_collections

from hkpipe.train import default_config

MODEL = {"name": "gpt", "vocab_size": 50304, "seq_len": 1024, "d_model": 768, "n_layers": 12,
         "n_heads": 12, "dropout": 0.0, "bias": False, "tie_embeddings": True,
         "dtype": "params=float32,compute=bfloat16,output=float32", "attention_impl": "cudnn"}
OPTIM = {"learning_rate": 6e-4, "warmup_steps": 2000, "min_lr_ratio": 0.1, "weight_decay": 0.1,
         "b1": 0.9, "b2": 0.95, "eps": 1e-8, "max_grad_norm": 1.0}


def get_config(arg: str | None = None):
  """Returns the experiment config for variant ``arg`` ('', 'cpu' or 'runlocal')."""
  variant = arg or "full"
  if variant not in ("full", "cpu", "runlocal"):
    raise ValueError(f"Unknown variant {variant!r}; use '', 'cpu' or 'runlocal'.")
  c = default_config()
  c.model.update(MODEL)
  c.model.loss_chunk_size = ml_collections.config_dict.placeholder(int)  # e.g. 1024 at vocab 128k
  c.optim.update(OPTIM)
  c.batch_size = 32
  c.num_steps = 20000
  c.log_every, c.eval_every, c.checkpoint_every = 10, 500, 1000
  c.peak_tflops = None  # set to the device's bf16 dense peak to log MFU (e.g. 989.0 on H100 SXM)
  if variant in ("cpu", "runlocal"):
    c.model.update({"vocab_size": 256, "seq_len": 64, "d_model": 64, "n_layers": 2,
                    "n_heads": 4, "dtype": "float32", "attention_impl": "xla"})
    c.batch_size = 16
    c.num_steps = 200
    c.optim.update({"warmup_steps": 20, "learning_rate": 2e-3})
    c.log_every, c.eval_every, c.checkpoint_every = 10, 100, 100
  if variant == "runlocal":
    c.model.update({"seq_len": 16, "d_model": 32})
    c.batch_size = 8
    c.num_steps = 6
    c.optim.update({"warmup_steps": 2})
    c.log_every, c.eval_every, c.checkpoint_every = 1, 3, 3
    c.eval_batches = 1
    c.sample_tokens = 16
  return c
