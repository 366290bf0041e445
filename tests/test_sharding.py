"""Unit tests of hkpipe.sharding: rule resolution, the default FSDP choice, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import hkpipe
from hkpipe import sharding


def _shapes(**paths):
  """{"layer/module/param": shape} -> a canonical tree of ShapeDtypeStructs."""
  tree: dict = {}
  for path, shape in paths.items():
    layer, module, param = path.split("__")
    tree.setdefault(layer, {}).setdefault(module, {})[param] = jax.ShapeDtypeStruct(
        shape, jnp.float32)
  return tree


TREE = _shapes(embed__wte__embeddings=(64, 16), block_0__attn__w_q=(16, 32),
               block_0__attn__b_q=(32,), block_0__ln__scale=(16,), block_0__mlp__w=(8, 32))


def test_first_matching_rule_wins_and_the_rest_get_the_default():
  rules = sharding.Rules(((r"attn/w_q$", P("fsdp", "tp")), (r"^block_0/attn/", P("tp")),
                          (r"^embed/", P("tp", "fsdp"))), fsdp_min_size=32)
  specs = sharding.resolve(TREE, rules, {"fsdp": 2, "tp": 2})
  assert specs["block_0"]["attn"]["w_q"] == P("fsdp", "tp")
  assert specs["block_0"]["attn"]["b_q"] == P("tp")           # the second rule
  assert specs["embed"]["wte"]["embeddings"] == P("tp", "fsdp")
  assert specs["block_0"]["mlp"]["w"] == P(None, "fsdp")      # default: 256 elements >= 32
  assert specs["block_0"]["ln"]["scale"] == P()               # default: 16 < fsdp_min_size


@pytest.mark.parametrize("shape,fsdp,min_size,expected", [
    ((16, 64), 2, 0, P(None, "fsdp")),      # the largest dimension
    ((64, 16), 4, 0, P("fsdp")),
    ((6, 8), 4, 0, P(None, "fsdp")),        # the largest *divisible* one
    ((8, 8), 2, 0, P("fsdp")),              # ties: the first
    ((6, 10), 4, 0, P()),                   # nothing divides
    ((64, 16), 1, 0, P()),                  # no fsdp
    ((64, 16), 2, 2048, P()),               # 1024 elements < min size
    ((), 2, 0, P()),                        # scalars
])
def test_default_fsdp_spec(shape, fsdp, min_size, expected):
  assert sharding.default_spec(shape, fsdp, min_size) == expected


def test_no_rules_without_fsdp_is_replicated():
  specs = sharding.resolve(TREE, None, {"tp": 2})
  assert all(s == P() for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))


def test_gpt_and_llama_tp_rules_cover_their_matrices():
  for config in (hkpipe.models.GPTConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=2,
                                         n_heads=2),
                 hkpipe.models.LlamaConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=2,
                                           n_heads=4, n_kv_heads=2)):
    model = hkpipe.models.build(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((2, 8), np.int32))
    specs = sharding.resolve(shapes, hkpipe.models.sharding_rules(config), {"fsdp": 2, "tp": 2})
    attn, mlp = specs["block_1"]["attn"], specs["block_1"]["mlp"]
    assert attn["w_q"] == attn["w_k"] == attn["w_v"] == P("fsdp", "tp")
    assert attn["w_o"] == P("tp", "fsdp")
    mlp_in = [mlp[k] for k in ("w_in", "w_gate", "w_up") if k in mlp]
    mlp_out = [mlp[k] for k in ("w_out", "w_down") if k in mlp]
    assert mlp_in and all(s == P("fsdp", "tp") for s in mlp_in)
    assert mlp_out and all(s == P("tp", "fsdp") for s in mlp_out)
    assert specs["embed"]["wte"]["embeddings"] == specs["head"]["lm_head"]["w"] == P("tp", "fsdp")
    # Without an fsdp axis the same rules use tp only.
    tp_only = sharding.resolve(shapes, hkpipe.models.sharding_rules(config, axes=("tp",)),
                               {"tp": 2})
    assert tp_only["block_0"]["attn"]["w_o"] == P("tp", None)


def test_optimizer_state_follows_its_parameter():
  mesh = jax.make_mesh((2, 2), ("fsdp", "tp"), devices=jax.devices()[:4])
  specs = sharding.resolve(TREE, sharding.Rules(((r"w_q", P("fsdp", "tp")),)),
                           {"fsdp": 2, "tp": 2})
  param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                          is_leaf=lambda x: isinstance(x, P))
  rep = NamedSharding(mesh, P())
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  out = sharding.opt_state_shardings(opt, TREE, param_sh, rep)
  adam = out[1][0]
  assert adam.mu["block_0"]["attn"]["w_q"].spec == P("fsdp", "tp")
  assert adam.nu["block_0"]["attn"]["w_q"].spec == P("fsdp", "tp")
  assert adam.count == rep


@pytest.mark.parametrize("rules,sizes,words", [
    (((r"attn/w_x", P("fsdp")),), {"fsdp": 2}, ["attn/w_x", "matches no parameter"]),
    (((r"w_q", P("fsdp")), (r"attn/w_q", P("tp"))), {"fsdp": 2, "tp": 2},
     ["attn/w_q", "earlier rule"]),
    (((r"w_q", P("fsdp", "tp")),), {"fsdp": 2}, ["block_0/attn/w_q", "'tp'", "add 'tp'"]),
    (((r"w_q", P(None, "tp")),), {"tp": 3}, ["block_0/attn/w_q", "dimension 1", "32", "tp = 3"]),
    (((r"w_q", P(("fsdp", "tp"))),), {"fsdp": 4, "tp": 8},
     ["block_0/attn/w_q", "fsdpxtp = 32", "16"]),
    (((r"b_q", P(None, "tp")),), {"tp": 2}, ["block_0/attn/b_q", "2 entries", "1 dimensions"]),
])
def test_bad_rules_name_the_leaf_axis_and_fix(rules, sizes, words):
  with pytest.raises(hkpipe.ConfigError) as e:
    sharding.resolve(TREE, sharding.Rules(rules), sizes)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("rules,words", [
    (((r"w_q", P("dp")),), ["'dp'", "'fsdp', 'tp'"]),
    (((r"w_q", P("fsdp", "fsdp")),), ["twice"]),
    (((r"w_[q", P("fsdp")),), ["not a valid regex"]),
    ((("w_q",),), ["(regex, PartitionSpec) pair"]),
    (((r"w_q", "fsdp"),), ["must be a PartitionSpec"]),
])
def test_malformed_rules(rules, words):
  with pytest.raises(hkpipe.ConfigError) as e:
    sharding.Rules(rules)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("names,words", [
    (("pp", "model"), ["'model'", "'fsdp'"]),
    (("fsdp", "pp"), ["first axis"]),
    (("pp", "tp", "fsdp"), ["out of order", "('pp', 'fsdp', 'tp')"]),
    (("fsdp",), ["'pp' as their first axis"]),
    (("pp", "tp", "tp"), ["twice"]),
])
def test_mesh_axis_names(names, words):
  with pytest.raises(hkpipe.ConfigError) as e:
    sharding.check_mesh_axes(names)
  for w in words:
    assert w in str(e.value), (w, str(e.value))
  sharding.check_mesh_axes(("pp", "dp", "fsdp", "tp"))
  sharding.check_mesh_axes(("pp", "tp"))
