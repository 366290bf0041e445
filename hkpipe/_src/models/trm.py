"""The Tiny Recursive Model (TRM, "Less is More: Recursive Reasoning with Tiny Networks").

One small network (``n_layers`` post-norm blocks, attention or MLP-mixer) is applied recursively.
Per supervision step, starting from the carry ``(y, z)`` (answer and latent, each ``[B, L, D]``)::

  repeat h_cycles times:                    # the first h_cycles - 1 under lax.stop_gradient
    repeat l_cycles times: z = net(z + y + x)
    y = net(y + z)
  logits = lm_head(y); (q_halt, q_continue) = q_head(mean_L(y))

and the carry leaves the step detached. Deep supervision repeats the step up to
``n_supervision`` times; the ACT head decides (in training) when a sequence halts.

Layers (canonical layout)::

  embed  {"tok": {"embeddings": [V, D]}, "pos": {"embeddings": [L, D]}}        tokens -> x [B, L, D]
  recur  {"net/block_i/...", "lm_head": {"w", "b"}, "q_head": {"w", "b"}}      x -> outputs dict

``recur`` unrolls every supervision step (see :func:`deep_supervision`) and returns
``{"logits": [N, B, L, V], "q_halt": [N, B], "q_continue": [N, B], "active": [N, B]}``;
:func:`trm_loss` turns them into the scalar loss. Only ``embed | recur`` can be cut into pipeline
stages: the recursion reuses one set of weights many times, so it cannot be split.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import chex
import haiku as hk
import jax
import jax.numpy as jnp

from hkpipe._src import model as model_lib
from hkpipe._src.models import common

MIXERS = ("attention", "mlp")
RMS_EPS = 1e-5


@chex.dataclass(frozen=True, mappable_dataclass=False)
class TRMConfig:
  """Tiny Recursive Model configuration. Validated on construction; frozen and hashable.

  Attributes:
    vocab_size: token ids of inputs and labels (Sudoku: 10, 0 = blank, 1..9 digits).
    seq_len: positions per puzzle (Sudoku: 81).
    d_model: hidden width; divisible by ``n_heads``.
    n_layers: blocks in the recursive network (the paper uses 2).
    n_heads: attention heads (``mixer="attention"``).
    expansion: MLP hidden width is ``int(expansion * d_model)``.
    mixer: ``"attention"`` (non-causal self-attention) or ``"mlp"`` (MLP-mixer over positions).
    h_cycles: H cycles per supervision step (gradients only through the last one).
    l_cycles: latent updates per H cycle.
    n_supervision: maximum deep-supervision steps (N_sup).
    halt_exploration_prob: probability of a random minimum halting step in training.
    act_continue: also learn ``q_continue`` with the Q-learning bootstrap target (HRM); False
      halts when ``q_halt > 0`` (the TRM paper's default).
    q_loss_weight: weight of the halting losses next to the answer cross-entropy.
    dtype: ``"float32"`` or ``"bfloat16"`` compute (parameters stay float32).
  """

  vocab_size: int = 10
  seq_len: int = 81
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  expansion: float = 4.0
  mixer: str = "attention"
  h_cycles: int = 3
  l_cycles: int = 6
  n_supervision: int = 16
  halt_exploration_prob: float = 0.1
  act_continue: bool = False
  q_loss_weight: float = 0.5
  dtype: str = "float32"

  def __post_init__(self):
    name = "TRMConfig"
    for field in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "h_cycles",
                  "l_cycles", "n_supervision"):
      common.check_positive_int(name, field, getattr(self, field))
    common.check_divides(name, "n_heads", self.n_heads, "d_model", self.d_model)
    common.check_real(name, "expansion", self.expansion, 0.0, None, low_inclusive=False)
    if self.mixer not in MIXERS:
      raise ValueError(f"TRMConfig.mixer={self.mixer!r} is invalid: it must be one of "
                       f"{list(MIXERS)}. Use 'attention' or 'mlp' (MLP-mixer over positions).")
    common.check_real(name, "halt_exploration_prob", self.halt_exploration_prob, 0.0, 1.0)
    common.check_bool(name, "act_continue", self.act_continue)
    common.check_real(name, "q_loss_weight", self.q_loss_weight, 0.0, None)
    common.check_dtype(name, self.dtype)

  @property
  def ff_dim(self) -> int:
    """The MLP hidden width, ``int(expansion * d_model)``."""
    return max(1, int(self.expansion * self.d_model))


class Carry(NamedTuple):
  """State kept between supervision steps (per sequence).

  Attributes:
    y: ``[B, L, D]`` answer embedding.
    z: ``[B, L, D]`` latent reasoning state.
    steps: ``[B]`` int32 supervision steps taken since the last reset.
    halted: ``[B]`` bool; a halted sequence is reset to the initial carry at the next step.
  """

  y: jax.Array
  z: jax.Array
  steps: jax.Array
  halted: jax.Array


def _rms_norm(x: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + RMS_EPS)).astype(x.dtype)


class Block(hk.Module):
  """Post-norm block: ``h = norm(h + mix(h)); h = norm(h + swiglu(h))`` (as in TRM)."""

  def __init__(self, config: TRMConfig, name: str | None = None):
    super().__init__(name=name)
    self.config = config

  def _attention(self, h: jax.Array) -> jax.Array:
    c = self.config
    b, l, d = h.shape
    hd = d // c.n_heads
    qkv = hk.Linear(3 * d, with_bias=False, name="qkv")(h).reshape(b, l, 3, c.n_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]               # [B, L, H, hd]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(hd)
    probs = jax.nn.softmax(scores, axis=-1).astype(h.dtype)          # [B, H, L, L]
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, d)
    return hk.Linear(d, with_bias=False, name="o")(out)

  def _token_mlp(self, h: jax.Array) -> jax.Array:
    l = h.shape[1]
    t = jnp.swapaxes(h, 1, 2)                                        # [B, D, L]
    t = hk.Linear(l, name="mix_out")(jax.nn.gelu(hk.Linear(l * 2, name="mix_in")(t)))
    return jnp.swapaxes(t, 1, 2)                                     # [B, L, D]

  def __call__(self, h: jax.Array) -> jax.Array:
    c = self.config
    mixed = self._attention(h) if c.mixer == "attention" else self._token_mlp(h)
    h = _rms_norm(h + mixed)
    gate_up = hk.Linear(2 * c.ff_dim, with_bias=False, name="gate_up")(h)
    gate, up = jnp.split(gate_up, 2, axis=-1)
    h = _rms_norm(h + hk.Linear(c.d_model, with_bias=False, name="down")(jax.nn.silu(gate) * up))
    return h


class Net(hk.Module):
  """The one recursive network: ``n_layers`` blocks applied to ``h + injection``."""

  def __init__(self, config: TRMConfig, name: str | None = "net"):
    super().__init__(name=name)
    self.config = config

  def __call__(self, h: jax.Array, injection: jax.Array) -> jax.Array:
    h = h + injection
    for i in range(self.config.n_layers):
      h = Block(self.config, name=f"block_{i}")(h)
    return h


def init_carry(config: TRMConfig, batch: int, dtype: Any = jnp.float32,
               length: int | None = None) -> Carry:
  """The initial carry: fixed (not trained) ``y0, z0`` broadcast over the batch, all halted.

  ``y0`` and ``z0`` are constant truncated-normal vectors (as the paper's ``H_init``/``L_init``
  buffers); every sequence starts ``halted`` so the first step resets it.
  """
  ky, kz = jax.random.split(jax.random.key(20251006))
  shape = (config.d_model,)
  y0 = jax.random.truncated_normal(ky, -2.0, 2.0, shape).astype(dtype)
  z0 = jax.random.truncated_normal(kz, -2.0, 2.0, shape).astype(dtype)
  full = (batch, config.seq_len if length is None else length, config.d_model)
  return Carry(y=jnp.broadcast_to(y0, full), z=jnp.broadcast_to(z0, full),
               steps=jnp.zeros((batch,), jnp.int32), halted=jnp.ones((batch,), bool))


def recursion(net: Any, config: TRMConfig, x: jax.Array, y: jax.Array,
              z: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``h_cycles`` H cycles; gradients flow only through the last one (earlier ones detached)."""
  for h in range(config.h_cycles):
    if h == config.h_cycles - 1:
      y, z = jax.lax.stop_gradient(y), jax.lax.stop_gradient(z)
    for _ in range(config.l_cycles):
      z = net(z, y + x)                                              # [B, L, D]
    y = net(y, z)                                                    # [B, L, D]
  return y, z


class Modules(NamedTuple):
  """The recursive network and the two heads, created once per ``hk.transform`` call."""

  net: Any
  lm_head: Any
  q_head: Any


def make_modules(config: TRMConfig) -> Modules:
  """Creates the network, answer head and halting head (``q_head``: zero weights, bias -5)."""
  return Modules(net=Net(config), lm_head=hk.Linear(config.vocab_size, name="lm_head"),
                 q_head=hk.Linear(2, name="q_head", w_init=jnp.zeros,
                                  b_init=hk.initializers.Constant(-5.0)))


def supervision_step(config: TRMConfig, x: jax.Array, carry: Carry, *, is_training: bool,
                     rng: jax.Array | None = None,
                     modules: Modules | None = None) -> tuple[Carry, dict]:
  """One deep-supervision step (inside ``hk.transform``): reset halted rows, recurse, halt.

  Args:
    config: the model config.
    x: ``[B, L, D]`` embedded inputs.
    carry: the :class:`Carry` from the previous step (or :func:`init_carry`).
    is_training: halting by the Q head (and exploration) only in training; in evaluation every
      sequence runs ``n_supervision`` steps, as in the paper.
    rng: key for halting exploration (None: no exploration).
    modules: from :func:`make_modules` (None: created here).

  Returns:
    The new carry (``y, z`` detached) and ``{"logits": [B, L, V], "q_halt": [B],
    "q_continue": [B]}``.
  """
  net, lm_head, q_head = modules if modules is not None else make_modules(config)
  init = init_carry(config, x.shape[0], x.dtype, x.shape[1])
  reset = carry.halted[:, None, None]
  y = jnp.where(reset, init.y, carry.y)
  z = jnp.where(reset, init.z, carry.z)
  steps = jnp.where(carry.halted, 0, carry.steps)
  y, z = recursion(net, config, x, y, z)
  logits = lm_head(y).astype(jnp.float32)                                         # [B, L, V]
  q = q_head(jnp.mean(y, axis=1)).astype(jnp.float32)                               # [B, 2]
  q_halt, q_continue = q[:, 0], q[:, 1]                                             # [B]
  steps = steps + 1
  halted = steps >= config.n_supervision
  if is_training and config.n_supervision > 1:
    wants = q_halt > (q_continue if config.act_continue else 0.0)
    if rng is not None and config.halt_exploration_prob > 0:
      k1, k2 = jax.random.split(rng)
      explore = jax.random.uniform(k1, steps.shape) < config.halt_exploration_prob
      min_steps = explore * jax.random.randint(k2, steps.shape, 2, config.n_supervision + 1)
      wants = wants & (steps >= min_steps)
    halted = halted | jax.lax.stop_gradient(wants)
  new = Carry(y=jax.lax.stop_gradient(y), z=jax.lax.stop_gradient(z), steps=steps, halted=halted)
  return new, {"logits": logits, "q_halt": q_halt, "q_continue": q_continue}


def deep_supervision(config: TRMConfig, x: jax.Array, *, is_training: bool) -> dict:
  """All supervision steps of a batch in one pass (inside ``hk.transform``).

  Each row trains on its puzzle until it halts; later steps of a halted row are marked inactive
  (``active`` = 0) and excluded from the loss, so every active step contributes its own loss with
  the carry detached in between, as the paper's separate supervision steps do.

  Returns:
    ``{"logits": [N, B, L, V], "q_halt": [N, B], "q_continue": [N, B], "active": [N, B]}``.
  """
  b = x.shape[0]
  modules = make_modules(config)

  def body(state, _):
    carry, done = state
    rng = hk.maybe_next_rng_key() if is_training else None
    active = ~done
    carry, out = supervision_step(config, x, carry, is_training=is_training, rng=rng,
                                  modules=modules)
    done = done | carry.halted
    return (carry, done), {**out, "active": active.astype(jnp.float32)}

  start = (init_carry(config, b, x.dtype, x.shape[1]), jnp.zeros((b,), bool))
  _, outs = hk.scan(body, start, None, length=config.n_supervision)
  return outs


def embed_fn(tokens: jax.Array, *, config: TRMConfig) -> jax.Array:
  """``[B, L]`` int tokens -> ``[B, L, D]`` (scaled token embedding + learned positions)."""
  common.check_tokens(tokens, config.seq_len)
  init = hk.initializers.TruncatedNormal(1.0 / jnp.sqrt(config.d_model))
  tok = hk.Embed(config.vocab_size, config.d_model, w_init=init, name="tok")(tokens)
  pos = hk.Embed(config.seq_len, config.d_model, w_init=init, name="pos")(
      jnp.arange(tokens.shape[1]))[None]                             # [1, L, D]
  return (tok + pos) * jnp.sqrt(config.d_model).astype(tok.dtype)


def recur_fn(x: jax.Array, is_training: bool, *, config: TRMConfig) -> dict:
  """``[B, L, D]`` -> the stacked outputs of every supervision step (see module docstring)."""
  return deep_supervision(config, x, is_training=is_training)


def trm_terms(outputs: dict, labels: jax.Array) -> dict:
  """Per-step, per-row loss terms and correctness, ``[N, B]`` each (float32)."""
  logits = outputs["logits"]                                          # [N, B, L, V]
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[None, ..., None], axis=-1)[..., 0]
  ce = jnp.mean(lse - picked, axis=-1)                                # [N, B]
  cell_ok = jnp.argmax(logits, axis=-1) == labels[None]               # [N, B, L]
  exact = jnp.all(cell_ok, axis=-1).astype(jnp.float32)               # [N, B]
  return {"ce": ce, "exact": exact, "cell": jnp.mean(cell_ok.astype(jnp.float32), -1)}


def _bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def trm_loss(outputs: dict, labels: jax.Array, *, q_loss_weight: float = 0.5,
             act_continue: bool = False) -> jax.Array:
  """Deep-supervision loss: mean over active (step, row) pairs of
  ``CE(answer) + q_loss_weight * (BCE(q_halt, exact) [+ BCE(q_continue, Q target)])``.

  The ``q_halt`` target is whether the step's answer is exactly right (no gradient). With
  ``act_continue`` the ``q_continue`` target of step t is the bootstrap
  ``sigmoid(max(q_halt[t+1], q_continue[t+1]))`` (only ``q_halt[t+1]`` when t+1 is the last step),
  detached; the last step has none.

  Args:
    outputs: the ``recur`` layer's outputs.
    labels: ``[B, L]`` int targets.

  Returns:
    The scalar float32 loss.
  """
  terms = trm_terms(outputs, labels)
  active = outputs["active"]                                          # [N, B]
  q_halt = outputs["q_halt"]
  per = terms["ce"] + q_loss_weight * _bce(q_halt, jax.lax.stop_gradient(terms["exact"]))
  if act_continue:
    n = q_halt.shape[0]
    nxt_h, nxt_c = q_halt[1:], outputs["q_continue"][1:]
    last = (jnp.arange(1, n) == n - 1)[:, None]
    target = jax.nn.sigmoid(jnp.where(last, nxt_h, jnp.maximum(nxt_h, nxt_c)))
    qc = _bce(outputs["q_continue"][:-1], jax.lax.stop_gradient(target))
    per = per + q_loss_weight * jnp.concatenate([qc, jnp.zeros_like(qc[:1])], axis=0)
  return jnp.sum(per * active) / jnp.maximum(jnp.sum(active), 1.0)


def trm_metrics(outputs: dict, labels: jax.Array, inputs: jax.Array | None = None) -> dict:
  """Accuracy of the last supervision step: ``cell_accuracy`` (all cells), ``exact_accuracy``
  (whole puzzle right), and ``mean_steps`` (supervision steps each row trained before halting).

  With ``inputs`` (``[B, L]`` puzzle tokens, 0 = blank) it adds ``blank_accuracy``: the fraction
  of blank cells answered right, pooled over the batch (copying the givens scores 0 on it; a
  batch without blanks scores 1).
  """
  terms = trm_terms(outputs, labels)
  metrics = {"cell_accuracy": jnp.mean(terms["cell"][-1]),
             "exact_accuracy": jnp.mean(terms["exact"][-1]),
             "mean_steps": jnp.mean(jnp.sum(outputs["active"], axis=0))}
  if inputs is not None:
    blank = inputs == 0                                               # [B, L]
    right = jnp.argmax(outputs["logits"][-1], axis=-1) == labels      # [B, L]
    n_blank = jnp.sum(blank)
    metrics["blank_accuracy"] = jnp.where(
        n_blank > 0, jnp.sum(right & blank) / jnp.maximum(n_blank, 1), 1.0).astype(jnp.float32)
  return metrics


def make_layers(config: TRMConfig) -> list[model_lib.Layer]:
  """The layers ``embed`` and ``recur``."""
  return [model_lib.Layer.from_fn("embed", functools.partial(embed_fn, config=config)),
          model_lib.Layer.from_fn("recur", functools.partial(recur_fn, config=config))]


def loss_fn(config: TRMConfig):
  """The model's ``loss_fn(outputs, labels)``."""
  return functools.partial(trm_loss, q_loss_weight=config.q_loss_weight,
                           act_continue=config.act_continue)


def layer_param_counts(config: TRMConfig) -> dict[str, int]:
  """Closed-form parameter count of each layer."""
  d, f, l, v = config.d_model, config.ff_dim, config.seq_len, config.vocab_size
  mix = 4 * d * d if config.mixer == "attention" else (l * 2 * l + 2 * l) + (2 * l * l + l)
  block = mix + 2 * d * f + f * d
  return {"embed": v * d + l * d,
          "recur": config.n_layers * block + (d * v + v) + (d * 2 + 2)}


def flops_per_token(config: TRMConfig) -> int:
  """Training FLOPs per position: 6 x network params x network applications of the last H cycle
  (plus 2x for the detached cycles' forward), per supervision step, times ``n_supervision``."""
  counts = layer_param_counts(config)
  net = counts["recur"] - (config.d_model * config.vocab_size + config.vocab_size) - (
      config.d_model * 2 + 2)
  per_cycle = config.l_cycles + 1
  grad_apps, fwd_apps = per_cycle, per_cycle * (config.h_cycles - 1)
  return config.n_supervision * (6 * net * grad_apps + 2 * net * fwd_apps)
