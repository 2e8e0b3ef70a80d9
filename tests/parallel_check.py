"""Run in a subprocess as ``parallel_check.py CASE N`` (see test_parallel.py); it forces N CPU
devices with ``chex.set_n_cpu_devices(N)`` before any JAX operation: the train step under the sharded-jit and pmap layouts on N CPU devices against
the one-device step, with augmentation, dropout and a sampling loss (reinforce) all on."""

import json
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cft_jax import objectives, parallel, steps
from cft_jax.data import Preprocess


class DropoutNet(nn.Module):
  """Pooled pixels -> dense -> dropout(0.5) -> head: every random draw of the step matters."""

  @nn.compact
  def __call__(self, x, train=False, return_features=False):
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(16, name="fc")(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(4, name="head")(x)


def run(kind: str, n: int, loss: str, augment: str, steps_: int = 3, key_offset: int = 0):
  net = DropoutNet()
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
  frozen = {"params": {}, "collections": {}}
  pre = Preprocess(image_size=8, augment=augment, mean=127.5, std=127.5)
  tx = optax.adam(1e-2)
  layout = parallel.make_layout(kind, n)
  step = steps.make_train_step(net.apply, pre, objectives.make_loss_fn(loss), tx, 2,
                               axis_name=layout.axis_name, shardings=layout.shardings)
  state = layout.replicate(steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                            opt_state=tx.init(params)))
  frozen = layout.replicate(frozen)
  rng = np.random.default_rng(0)
  losses = []
  for i in range(steps_):
    images = rng.integers(0, 255, (8, 10, 10, 3), dtype=np.uint8)
    labels = rng.integers(2, 4, (8,)).astype(np.int32)
    mask = np.arange(8) < (8 if i % 2 == 0 else 5)  # a padded batch too
    state, m = step(state, frozen, *layout.shard((images, labels, mask)), 2, i, steps_,
                    jax.random.PRNGKey(i + key_offset))
    losses.append(float(layout.first(m["loss"])))
  return (jax.device_get(layout.unreplicate(state).params), losses, step.num_traces(),
          layout.kind)


def main():
  if len(sys.argv) > 2:
    chex.set_n_cpu_devices(int(sys.argv[2]))  # before any JAX operation
  out = {"devices": jax.local_device_count()}
  n = jax.local_device_count()
  cases = {"ce": (("ce", "crop_flip"),), "reinforce": (("reinforce", "rrc_flip"),)}
  for loss, augment in cases[sys.argv[1]] if len(sys.argv) > 1 and sys.argv[1] != "all" else sum(cases.values(), ()):
    p1, l1, _, k1 = run("auto", 1, loss, augment)
    out[f"{loss}_kind_1"] = k1
    for kind in ("sharding", "pmap"):
      pn, ln, traces, kn = run(kind, n, loss, augment)
      diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), p1, pn)
      out[f"{loss}_{kind}_param_diff"] = max(jax.tree_util.tree_leaves(diffs))
      out[f"{loss}_{kind}_loss_diff"] = float(np.max(np.abs(np.subtract(l1, ln))))
      out[f"{loss}_{kind}_traces"] = traces
      out[f"{loss}_{kind}_kind"] = kn
    # the draws matter: other step keys move the parameters by far more than rounding
    p2 = run("auto", 1, loss, augment, key_offset=100)[0]
    out[f"{loss}_other_keys_param_diff"] = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(np.max(np.abs(a - b))), p1, p2)))
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  sys.exit(main())
