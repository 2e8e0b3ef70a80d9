"""Issue 16: sharded jit and pmap layouts, device-count invariance, bfloat16 compute."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cft_jax import linearize, objectives, parallel, peft, steps
from cft_jax.data import Preprocess
from cft_jax.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra)
  return env


@pytest.mark.parametrize("n,case", [(2, "ce"), (4, "reinforce")])
def test_sharding_and_pmap_equal_one_device(n, case):
  """Augmentation (crop_flip / rrc_flip), dropout and a sampling loss: on n forced CPU devices
  both layouts give the one-device parameters after 3 Adam steps (one batch padded)."""
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "parallel_check.py"), case,
                        str(n)],  # the script forces n devices with chex.set_n_cpu_devices
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.split("RESULT ")[-1])
  assert res["devices"] == n and res[f"{case}_kind_1"] == "single"
  for kind in ("sharding", "pmap"):
    assert res[f"{case}_{kind}_kind"] == kind
    assert res[f"{case}_{kind}_param_diff"] < 1e-6, res
    assert res[f"{case}_{kind}_loss_diff"] < 1e-6, res
    assert res[f"{case}_{kind}_traces"] == 1, res
  assert res[f"{case}_other_keys_param_diff"] > 1e-3, res  # the random draws do matter


def test_make_layout_kinds_and_errors():
  assert parallel.make_layout("auto", 1).kind == "single"
  assert parallel.make_layout("sharding", 1, 0, 1).kind == "single"
  assert parallel.make_layout("pmap", 1).kind == "pmap"
  with pytest.raises(ValueError, match="train.parallelism"):
    parallel.make_layout("fsdp", 1)
  lay = parallel.make_layout("auto", 1)
  assert lay.is_main and lay.num_devices == 1 and lay.shardings is None


def test_init_distributed_needs_all_three_keys():
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict({"coordinator_address": "127.0.0.1:1", "num_processes": 0,
                                 "process_id": -1})
  with pytest.raises(ValueError, match="num_processes"):
    parallel.init_distributed(c)
  c.num_processes, c.process_id = 2, 2
  with pytest.raises(ValueError, match="process_id=2"):
    parallel.init_distributed(c)
  assert parallel.init_distributed(None) is False  # no cluster variables here: single process


def _tiny(dtype=None, linearize_mode=None):
  built = build_model("tiny_cnn", 4, peft=peft.PeftSpec.lora(2), image_size=16,
                      rng=jax.random.PRNGKey(1),
                      dtype=dtype)
  variables = dict(built.variables)
  trainable, frozen_params = peft.split_params(variables.pop("params"), "lora")
  trainable = jax.tree_util.tree_map_with_path(  # non-zero lora_b: every leaf gets a gradient
      lambda p, x: x + 0.1 if "lora_b" in str(p) else x, trainable)
  frozen = {"params": frozen_params, "collections": variables}
  if linearize_mode:
    frozen["params0"] = jax.tree_util.tree_map(jnp.array, trainable)
  return built, trainable, frozen


@pytest.mark.parametrize("mode", [None, "full"])
def test_bfloat16_compute_close_to_float32(mode):
  """bf16 activations, float32 params / optimiser state / loss: 5 SGD steps stay finite and within
  a bf16-sized tolerance of float32 (relative loss gap < 3%; parameter gap < 10% of how far the
  parameters moved); the linearized (jvp) forward runs in bf16 too."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (5, 16, 16, 16, 3), dtype=np.uint8)
  labels = rng.integers(0, 2, (5, 16)).astype(np.int32)
  mask = np.ones(16, bool)
  out = {}
  for dtype in (None, jnp.bfloat16):
    built, params, frozen = _tiny(dtype, mode)
    if mode:  # step away from the expansion point so the jvp term is non-zero
      params = jax.tree_util.tree_map(lambda x: x + 0.05, params)
    tx = optax.sgd(0.5, momentum=0.9)
    step = steps.make_train_step(built.module.apply, Preprocess(16, mean=127.5, std=127.5),
                                 objectives.make_loss_fn("ce"), tx, 2, linearized=mode)
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params))
    losses = []
    for i in range(5):
      state, m = step(state, frozen, images[i], labels[i], mask, 0, i, 5, jax.random.PRNGKey(i))
      losses.append(float(m["loss"]))
    leaves = jax.tree_util.tree_leaves(state.params) + jax.tree_util.tree_leaves(state.opt_state)
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in leaves)  # params, Adam moments f32
    forward = steps.make_forward(built.module.apply, mode)
    z = forward(state.params, frozen, jnp.zeros((2, 16, 16, 3)))
    assert z.dtype == jnp.float32  # logits reach the loss in float32
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                   state.params, _tiny(dtype, mode)[1])
    out[dtype] = (np.array(losses), state.params, max(jax.tree_util.tree_leaves(moved)))
  l32, lbf = out[None][0], out[jnp.bfloat16][0]
  assert np.all(np.isfinite(lbf))
  np.testing.assert_allclose(lbf, l32, rtol=3e-2)
  assert not np.array_equal(lbf, l32)  # bf16 really ran
  gap = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), out[None][1],
                               out[jnp.bfloat16][1])
  assert max(jax.tree_util.tree_leaves(gap)) < 0.1 * out[None][2], (gap, out[None][2])


def test_bfloat16_module_computes_in_bfloat16():
  built, params, frozen = _tiny(jnp.bfloat16)
  variables = dict(frozen["collections"], params=peft.merge_params(params, frozen["params"]))
  z = built.module.apply(variables, jnp.zeros((2, 16, 16, 3)))
  assert z.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(built.variables))
