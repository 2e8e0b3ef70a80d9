"""Input pipeline vs the train step it feeds (images/s), measured side by side.

Stages, for the batches ``cft_jax.train.run`` builds:

- ``host``: :func:`cft_jax.data.batches` (seeded shuffle, gather, padding + mask) and the copy
  to the device (``jax.device_put``);
- ``preprocess``: :class:`cft_jax.data.Preprocess` alone, jitted (uint8 -> grey-to-RGB ->
  resize -> augmentation -> normalisation; in training it runs inside the jitted step);
- ``step``: the library's train step (:func:`cft_jax.steps.make_train_step`, which includes
  the preprocessing) of EfficientNet-Lite0 + LoRA at 96 px and ViT-Ti/4 (full fine-tuning) at
  32 px.

``pipeline/step`` is how many times faster the pipeline (host + preprocess, one after the other,
i.e. without overlap) produces batches than the step consumes them (target: >= 5). The data are
Fashion-MNIST (28x28 grey, as the runs use) when installed, else random images of that shape.
Stages run in turn for ``--repeats`` rounds (alternating); medians.

    python benchmarks/input_pipeline.py [--batch 64] [--repeats 7] [--augment crop_flip]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from cft_jax import objectives, peft  # noqa: E402
from cft_jax.data import Preprocess, batches, load_dataset  # noqa: E402
from cft_jax.models import build_model  # noqa: E402
from cft_jax.steps import TrainState, make_train_step  # noqa: E402


def load_images(n: int):
  try:
    ds = load_dataset("fashion_mnist")
    return ds.train_images[:n], ds.train_labels[:n].astype(np.int32), "fashion_mnist"
  except Exception:  # pylint: disable=broad-except
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int32), "random 28x28x1")


def make_step(model: str, size: int, augment: str, b: int, images, labels):
  kw = dict(image_size=size, rng=jax.random.PRNGKey(0))
  if model.startswith("efficientnet"):
    try:
      built = build_model(model, 10, lora_rank=4, pretrained=True, **kw)
    except (ImportError, ValueError, FileNotFoundError):
      built = build_model(model, 10, lora_rank=4, pretrained=False, **kw)
    split = "lora"
  else:
    built = build_model(model, 10, pretrained=False, **kw)
    split = "full"
  variables = dict(built.variables)
  params, frozen_params = peft.split_params(variables.pop("params"), split)
  frozen = {"params": frozen_params, "collections": variables}
  pre = Preprocess(size, built.mean, built.std, augment=augment)
  tx = optax.adam(1e-3)
  # 2 tasks x 5 classes: the calls alternate between the tasks (task_lo 0 / 5) and advance the
  # step counter, so any recompilation across tasks or steps would show in step.num_traces().
  step = make_train_step(built.module.apply, pre, objectives.make_loss_fn("ce"), tx, 5)
  state = {"s": TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params))}
  xb = jnp.asarray(images[:b])
  ys = [jnp.asarray(labels[:b] % 5 + lo) for lo in (0, 5)]
  mb = jnp.ones(b, bool)
  rng = jax.random.PRNGKey(0)
  calls = [0]

  def run():
    t = calls[0] % 2
    state["s"], m = step(state["s"], frozen, xb, ys[t], mb, 5 * t, calls[0], 100,
                         jax.random.fold_in(rng, calls[0]))
    calls[0] += 1
    jax.block_until_ready(m["loss"])

  pre_fn = jax.jit(lambda x, r: pre(x, r, train=True))

  def run_pre():
    jax.block_until_ready(pre_fn(xb, rng))

  return run, run_pre, step


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--augment", default="crop_flip", choices=("none", "crop_flip", "rrc_flip"))
  ap.add_argument("--host-batches", type=int, default=20, help="batches per host sample")
  args = ap.parse_args()
  b = args.batch
  images, labels, source = load_images(max(4096, b * args.host_batches))
  idx = np.arange(len(images))
  print(f"data: {source} {images.shape}; batch {b}; augment {args.augment}; "
        f"{os.cpu_count()} cores; jax {jax.__version__} ({jax.default_backend()}); load average "
        f"before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

  epoch = [0]

  def run_host():
    epoch[0] += 1
    n = 0
    for xb, yb, mb in batches(images, labels, idx, b, shuffle_seed=(0, 0, epoch[0])):
      jax.block_until_ready(jax.device_put((xb, yb, mb)))
      n += 1
      if n == args.host_batches:
        break
    return n

  cands = {"host": (run_host, args.host_batches)}
  steps = {}
  for name, model, size in (("effnet_lora_96", "efficientnet_lite0", 96),
                            ("vit_ti4_full_32", "vit_ti4", 32)):
    run, run_pre, step = make_step(model, size, args.augment, b, images, labels)
    cands[f"preprocess_{size}"] = (run_pre, 1)
    cands[f"step_{name}"] = (run, 1)
    steps[name] = (size, step)
  for fn, _ in cands.values():
    fn()
    fn()
  times = {k: [] for k in cands}
  for _ in range(args.repeats):
    for k, (fn, nb) in cands.items():
      t = time.perf_counter()
      fn()
      times[k].append((time.perf_counter() - t) / nb)  # seconds per batch
  med = {k: statistics.median(v) for k, v in times.items()}
  ips = {k: b / v for k, v in med.items()}
  print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print(f"{'stage':24} {'ms/batch':>9} {'img/s':>9}")
  for k in cands:
    print(f"{k:24} {1e3 * med[k]:9.2f} {ips[k]:9.0f}")
  summary = {"batch": b, "augment": args.augment, "img_per_s": {k: round(v, 1)
                                                                 for k, v in ips.items()}}
  for name, (size, step) in steps.items():
    pipe = med["host"] + med[f"preprocess_{size}"]
    ratio = med[f"step_{name}"] / pipe
    summary[f"pipeline_over_step_{name}"] = round(ratio, 1)
    summary[f"compilations_{name}"] = step.num_traces()  # over 2 alternating tasks
    print(f"pipeline (host + preprocess {size}px) vs step {name}: {b / pipe:.0f} vs "
          f"{ips[f'step_{name}']:.0f} img/s = {ratio:.1f}x (target >= 5); step compiled "
          f"{step.num_traces()}x")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
