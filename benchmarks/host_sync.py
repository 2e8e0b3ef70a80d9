"""Step rate with a device-to-host sync after every step vs only at log steps, side by side.

The trainer used to pull the loss to the host after every step for its NaN check
(``float(loss)``), which makes the host wait for the device before it can dispatch the next
step; it now reads the metrics (and checks for NaN) only every ``train.log_every`` steps and
before each checkpoint. This benchmark runs the library's own jitted step
(:func:`cft_jax.steps.make_train_step`, Adam, crop+flip augmentation on the device) both ways:

- ``every_step``: ``float(m["loss"])`` after each step (the old loop);
- ``log_steps``: ``float(m["loss"])`` every ``--log-every`` steps (the new loop).

Cases: ``tiny_cnn`` at 16 px (a dispatch-bound step, where the sync cost shows most) and
EfficientNet-Lite0 + LoRA r=4 at 64 px, batch 32 (the README's main job). The two loops alternate
for ``--repeats`` rounds of ``--steps`` steps; medians are printed with the ratio. On a CPU the
host and the "device" share the cores, so the gain is small; on a GPU/TPU the sync also drains
the accelerator's queue every step.

    python benchmarks/host_sync.py [--steps 40] [--repeats 5] [--log-every 10]
    python benchmarks/host_sync.py --smoke   # tiny_cnn only, 2 steps, one repeat (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

from cft_jax import objectives, peft, steps  # pylint: disable=g-import-not-at-top,wrong-import-position
from cft_jax.data import Preprocess  # pylint: disable=g-import-not-at-top,wrong-import-position
from cft_jax.models import build_model  # pylint: disable=g-import-not-at-top,wrong-import-position
from cft_jax.peft import PeftSpec  # pylint: disable=g-import-not-at-top,wrong-import-position

CASES = {"tiny_cnn_16px": ("tiny_cnn", 16, 32), "effnet_lora_64px": ("efficientnet_lite0", 64, 32)}


def _setup(model: str, size: int, batch: int):
  built = build_model(model, 10, peft=PeftSpec.lora(4), image_size=size, pretrained=False,
                      rng=jax.random.PRNGKey(0))
  variables = dict(built.variables)
  params, frozen_params = peft.split_params(variables.pop("params"), "lora")
  frozen = {"params": frozen_params, "collections": variables}
  tx = optax.adam(1e-3)
  step = steps.make_train_step(built.module.apply,
                               Preprocess(size, mean=built.mean, std=built.std,
                                          augment="crop_flip"),
                               objectives.make_loss_fn("aepg"), tx, 2)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params))
  rng = np.random.default_rng(0)
  data = (rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8),
          rng.integers(0, 2, (batch,)).astype(np.int32), np.ones(batch, bool))
  return step, state, frozen, data


def _loop(step, state, frozen, data, n: int, sync_every: int, start: int):
  t0 = time.perf_counter()
  for i in range(n):
    state, m = step(state, frozen, *data, 0, start + i, 10 ** 6,
                    jax.random.fold_in(jax.random.PRNGKey(0), start + i))
    if (i + 1) % sync_every == 0:
      loss = float(m["loss"])
      if not np.isfinite(loss):
        raise FloatingPointError(loss)
  jax.block_until_ready(state)
  return state, n / (time.perf_counter() - t0)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--log-every", type=int, default=10)
  ap.add_argument("--cases", default=",".join(CASES))
  ap.add_argument("--smoke", action="store_true",
                  help="smallest run (tiny_cnn case, 2 steps, one repeat): CI")
  args = ap.parse_args()
  if args.smoke:
    args.steps, args.repeats, args.log_every, args.cases = 2, 1, 1, "tiny_cnn_16px"
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f}")
  out = {}
  print(f"{'case':<20}{'every_step (steps/s)':>22}{'log_steps (steps/s)':>22}{'ratio':>8}")
  for name in args.cases.split(","):
    step, state, frozen, data = _setup(*CASES[name])
    state, _ = _loop(step, state, frozen, data, 2, 1, 0)  # compile
    rates = {"every_step": [], "log_steps": []}
    k = 2
    for _ in range(args.repeats):
      for mode, every in (("every_step", 1), ("log_steps", args.log_every)):
        state, r = _loop(step, state, frozen, data, args.steps, every, k)
        k += args.steps
        rates[mode].append(r)
    a, b = statistics.median(rates["every_step"]), statistics.median(rates["log_steps"])
    out[name] = {"every_step": round(a, 2), "log_steps": round(b, 2), "ratio": round(b / a, 3)}
    print(f"{name:<20}{a:22.2f}{b:22.2f}{b / a:8.3f}")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
