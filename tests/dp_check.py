"""Run in a subprocess (see test_reliability.py); it forces 4 CPU devices with
``chex.set_n_cpu_devices(4)`` before any JAX operation: pmapped steps on 2 and 4 CPU devices against the single-device step."""

import json
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cft_jax import objectives, peft, train
from cft_jax.data import Preprocess
from cft_jax.models import build_model


def params_after_steps(num_devices: int, steps: int = 4):
  built = build_model("tiny_cnn", 4, peft=peft.PeftSpec.lora(2), image_size=16,
                      rng=jax.random.PRNGKey(1))
  variables = dict(built.variables)
  trainable, frozen_params = peft.split_params(variables.pop("params"), "full")
  frozen = {"params": frozen_params, "collections": variables}
  tx = optax.adam(1e-2)
  dev = train.DeviceLayout(num_devices)
  step = train.make_train_step(built.module.apply, Preprocess(16), objectives.make_loss_fn("aepg"),
                               tx, classes_per_task=2, axis_name=dev.axis_name)
  state = dev.replicate(train.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                                         opt_state=tx.init(trainable)))
  frozen = dev.replicate(frozen)
  rng = np.random.default_rng(0)
  for i in range(steps):
    images = rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(2, 4, (8,)).astype(np.int32)
    mask = np.arange(8) < (8 if i % 2 == 0 else 5)  # a padded batch too
    state, m = step(state, frozen, *dev.shard((images, labels, mask)), 2, i, steps,
                    jax.random.PRNGKey(i))
  return jax.device_get(dev.unreplicate(state).params), float(dev.first(m["loss"])), step.num_traces()


def main():
  chex.set_n_cpu_devices(4)  # before any JAX operation
  out = {"devices": jax.local_device_count()}
  p1, l1, _ = params_after_steps(1)
  for n in (2, 4):
    pn, ln, traces = params_after_steps(n)
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), p1, pn)
    out[f"max_abs_diff_{n}"] = max(jax.tree_util.tree_leaves(diffs))
    out[f"loss_diff_{n}"] = abs(l1 - ln)
    out[f"traces_{n}"] = traces
  if len(sys.argv) > 1:  # end-to-end: 1 vs 2 devices through train.run, compile count
    import importlib.util, os  # pylint: disable=g-import-not-at-top,multiple-imports
    spec = importlib.util.spec_from_file_location(
        "test_train", os.path.join(os.path.dirname(__file__), "test_train.py"))
    tt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tt)
    for n in (1, 2):
      c = tt.tiny_config(**{"scenario.num_tasks": 5, "train.num_devices": n,
                            "train.batch_size": 16, "eval.batch_size": 20})
      m = train.run(c, os.path.join(sys.argv[1], f"dev{n}"))
      out[f"run_{n}"] = {"R": m["accuracy_matrix"], "compiles": m["train_step_compilations"],
                         "devices": m["num_devices"]}
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  sys.exit(main())
