r"""Tiny Recursive Model (TRM) on Sudoku puzzles generated locally (unique solutions, augmented).

Variants (the part after ``:``):
  (none)    full size for a pod: the paper's Sudoku setup (d=512, 2 layers, MLP-mixer, H=3, L=6,
            16 supervision steps, EMA 0.999), 1000 base puzzles x 1000 augmentations, batch 768.
  cpu       small: d=64, MLP-mixer, H=2, L=2, 2 supervision steps, puzzles with 40 givens,
            batch 16, lr 1e-2 (warmup 10, cosine to 1e-3), 300 steps, EMA 0.9. Measured on the
            shared 2-core machine (load average 6.8 at the start, 6.2 at the end), 300 steps in
            94 s (`Done in`): evaluation (EMA weights, 4 x 16 test rows) blank-cell accuracy
            0.274 at step 50, 0.665 at 100, 0.857 at 200, 0.865 at 300 (an untrained model:
            0.117, chance 1/9; copying the givens: 0); cell accuracy 0.632 / 0.831 / 0.928 /
            0.929 (copying the givens: 40/81 = 0.494); exact-puzzle accuracy 0 up to step 100,
            0.17 at 200, 0.28 at 300.
  runlocal  tiny smoke test: a few steps, for tests and quick checks.

Commands (from the repo root):
  python launch/train.py --config=experiments/sudoku_trm.py:cpu --workdir=workdirs/trm_cpu
  # data parallel over 4 simulated devices
  python launch/train.py --config=experiments/sudoku_trm.py:cpu --host_devices=4 \
      --config.backend=pmap --workdir=workdirs/trm_pmap
  python launch/train.py --config=experiments/sudoku_trm.py:cpu --host_devices=4 \
      --config.backend=spmd --config.pipeline.ranks=1 --config.pipeline.dp=4 \
      --workdir=workdirs/trm_spmd
"""

from hkpipe.train import default_config


def get_config(arg: str | None = None):
  """Returns the experiment config for variant ``arg`` ('', 'cpu' or 'runlocal')."""
  variant = arg or "full"
  if variant not in ("full", "cpu", "runlocal"):
    raise ValueError(f"Unknown variant {variant!r}; use '', 'cpu' or 'runlocal'.")
  c = default_config()
  c.model.update({"name": "trm", "vocab_size": 10, "seq_len": 81, "d_model": 512, "n_layers": 2,
                  "n_heads": 8, "expansion": 4.0, "mixer": "mlp", "h_cycles": 3,
                  "l_cycles": 6, "n_supervision": 16, "halt_exploration_prob": 0.1,
                  "act_continue": False, "q_loss_weight": 0.5, "dtype": "bfloat16"})
  c.data.sudoku.update({"seed": 0, "train_base": 1000, "test_base": 1000,
                        "augmentations": 1000, "min_givens": 17})
  c.batch_size = 768
  c.num_steps = 50000
  c.optim.update({"learning_rate": 1e-4, "warmup_steps": 2000, "min_lr_ratio": 1.0,
                  "b1": 0.9, "b2": 0.95, "weight_decay": 1.0})
  c.ema_decay = 0.999
  c.sample_tokens = 0
  c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 5000
  if variant == "cpu":
    # MLP-mixer, as the paper uses for Sudoku: its token mixing is a learned linear map over
    # the 81 positions, so "which digits do my row/column/box peers hold" is one linear layer
    # away; attention has to discover that structure through learned positions and, in 300
    # steps, barely moves blank-cell accuracy off chance (1/9).
    c.model.update({"d_model": 64, "n_heads": 4, "mixer": "mlp", "h_cycles": 2,
                    "l_cycles": 2, "n_supervision": 2, "dtype": "float32"})
    c.data.sudoku.update({"train_base": 100, "test_base": 50, "augmentations": 30,
                          "min_givens": 40})
    c.batch_size = 16
    c.num_steps = 300
    c.optim.update({"learning_rate": 1e-2, "warmup_steps": 10, "min_lr_ratio": 0.1,
                    "weight_decay": 0.1})
    c.ema_decay = 0.9
    c.log_every, c.eval_every, c.checkpoint_every = 25, 50, 300
    c.eval_batches = 4
  elif variant == "runlocal":
    c.model.update({"d_model": 16, "n_heads": 2, "mixer": "attention", "h_cycles": 2,
                    "l_cycles": 1, "n_supervision": 2, "dtype": "float32"})
    c.data.sudoku.update({"train_base": 4, "test_base": 2, "augmentations": 2,
                          "min_givens": 45})
    c.batch_size = 8
    c.num_steps = 4
    c.optim.update({"learning_rate": 3e-3, "warmup_steps": 1})
    c.ema_decay = 0.9
    c.log_every, c.eval_every, c.checkpoint_every = 1, 2, 2
    c.eval_batches = 1
  return c
