"""PeftSpec from the config, the one ``HEAD`` / ``is_head`` and the one ``copy_tree``."""

import chex
import jax
import jax.numpy as jnp
import pytest

from cft_jax import config as config_lib
from cft_jax import peft


def test_peft_spec_from_config():
  c = config_lib.base_config()
  spec = peft.PeftSpec.from_config(c.peft)
  assert spec == peft.PeftSpec("lora", rank=4, alpha=None, blocks=(0, 1, 2, 3, 4),
                               lora_targets=("k", "v"), adapter_hidden=5,
                               adapter_position="attn", prefix_length=10)
  assert (spec.module, spec.lora_rank, spec.lora_scale) == ("lora", 4, 1.0)
  hash(spec)  # a Flax module field: hashable
  c.peft.alpha, c.peft.name = 8.0, "lora"
  assert peft.PeftSpec.from_config(c.peft).lora_scale == 2.0
  c.peft.name = "linear_probe"
  probe = peft.PeftSpec.from_config(c.peft)
  assert (probe.module, probe.lora_rank, probe.lora_scale) == ("none", 0, 0.0)
  assert spec.on_block(4) is spec and spec.on_block(5).module == "none"
  assert peft.PeftSpec.lora(0).name == "none"


def test_is_head_every_path_form():
  assert peft.HEAD == "head"
  for path in (("head", "kernel"), "head/bias", "head", ["head"]):
    assert peft.is_head(path), path
  for path in (("Transformer", "head"), "headless/kernel", (), "lora_head"):
    assert not peft.is_head(path), path
  seen = {}
  jax.tree_util.tree_map_with_path(lambda p, x: seen.setdefault(x, peft.is_head(p)),
                                   {"head": {"kernel": 1}, "body": {"head": 2}})
  assert seen == {1: True, 2: False}


@pytest.mark.parametrize("jit", [False, True])
def test_copy_tree_is_a_fresh_equal_copy(jit):
  tree = {"a": jnp.arange(3.0), "b": {"c": jnp.ones((2,), jnp.bfloat16)}}
  fn = jax.jit(peft.copy_tree) if jit else peft.copy_tree
  out = fn(tree)
  chex.assert_trees_all_equal(out, tree)
  chex.assert_trees_all_equal_dtypes(out, tree)
  if not jit:
    assert out["a"] is not tree["a"]
    assert out["a"].unsafe_buffer_pointer() != tree["a"].unsafe_buffer_pointer()
