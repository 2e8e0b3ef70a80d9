"""Linear probe with cached frozen-backbone features vs through the full forward pass.

EfficientNet-Lite0 (ImageNet weights when installed) at 96 px on Fashion-MNIST (when installed;
else random images), ``peft.name = linear_probe`` (only the head trains), no augmentation:

- ``uncached``: one epoch of the library's train step (:func:`cft_jax.steps.make_train_step`,
  the whole network runs forward and the head's gradient backpropagates through nothing else);
- ``cached``: one epoch of :func:`cft_jax.feature_cache.train_linear_probe_on_features` on
  features computed once (:func:`cft_jax.feature_cache.extract_features`, timed separately);
- ``ncm``: nearest-class-mean fit + prediction on the cached features.

Epochs of the two linear probes alternate for ``--repeats`` rounds (medians). The speed-up of a
run of ``E`` epochs is ``E * uncached / (extract + E * cached)``. Test accuracies of both heads
(they see the same batches, so they agree to float rounding) and of NCM are printed.

    python benchmarks/feature_cache.py [--train 2048] [--test 1000] [--epochs 5] [--repeats 3]
    python benchmarks/feature_cache.py --smoke   # 8 / 8 images, 32 px, one repeat (CI)
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

from cft_jax import feature_cache as fc  # noqa: E402
from cft_jax import objectives, peft  # noqa: E402
from cft_jax.data import Preprocess, batches, load_dataset  # noqa: E402
from cft_jax.models import build_model  # noqa: E402
from cft_jax.steps import TrainState, make_train_step  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--train", type=int, default=2048)
  ap.add_argument("--test", type=int, default=1000)
  ap.add_argument("--size", type=int, default=96)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--epochs", type=int, default=5, help="E of the reported end-to-end speed-up")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--smoke", action="store_true", help="smallest run (8 / 8 images, 32 px): CI")
  args = ap.parse_args()
  if args.smoke:
    args.train, args.test, args.size, args.batch, args.epochs, args.repeats = 8, 8, 32, 4, 1, 1
  try:
    ds = load_dataset("fashion_mnist")
    xtr, ytr = ds.train_images[:args.train], ds.train_labels[:args.train].astype(np.int32)
    xte, yte = ds.test_images[:args.test], ds.test_labels[:args.test].astype(np.int32)
    source = "fashion_mnist"
  except Exception:  # pylint: disable=broad-except
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (args.train, 28, 28, 1), dtype=np.uint8)
    xte = rng.integers(0, 256, (args.test, 28, 28, 1), dtype=np.uint8)
    ytr, yte = (rng.integers(0, 10, n).astype(np.int32) for n in (args.train, args.test))
    source = "random"
  try:
    built = build_model("efficientnet_lite0", 10, pretrained=True, image_size=args.size)
    weights = "ImageNet"
  except (ImportError, ValueError, FileNotFoundError):
    built = build_model("efficientnet_lite0", 10, pretrained=False, image_size=args.size)
    weights = "random"
  print(f"EfficientNet-Lite0 ({weights} weights) linear probe, {source} {len(xtr)} train / "
        f"{len(xte)} test, {args.size} px, batch {args.batch}, no augmentation; "
        f"{os.cpu_count()} cores; load average before: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

  variables = dict(built.variables)
  params0, frozen_params = peft.split_params(variables.pop("params"), "linear_probe")
  # A small random head (the pretrained Lite0 head is zero): both probes start from it.
  params0 = {"head": {"kernel": 0.01 * jax.random.normal(jax.random.PRNGKey(1),
                                                        params0["head"]["kernel"].shape),
                      "bias": params0["head"]["bias"]}}
  frozen = {"params": frozen_params, "collections": variables}
  pre = Preprocess(args.size, built.mean, built.std, augment="none")
  loss_fn = objectives.make_loss_fn("ce")
  tx = optax.adam(1e-3)
  idx = np.arange(len(xtr))
  nb = -(-len(idx) // args.batch)
  rng = jax.random.PRNGKey(0)

  step = make_train_step(built.module.apply, pre, loss_fn, tx, 10)
  uncached = {"state": TrainState(step=jnp.zeros((), jnp.int32),
                                  params=jax.tree_util.tree_map(jnp.array, params0),
                                  opt_state=tx.init(params0)), "epoch": 0}

  def uncached_epoch():
    e = uncached["epoch"]
    m = None
    for s, (xb, yb, mb) in enumerate(batches(xtr, ytr, idx, args.batch, shuffle_seed=(0, 0, e))):
      uncached["state"], m = step(uncached["state"], frozen, xb, yb, mb, 0, e * nb + s,
                                  args.epochs * nb, jax.random.fold_in(rng, e * nb + s))
    jax.block_until_ready(m["loss"])
    uncached["epoch"] += 1

  feature_fn = fc.make_feature_fn(built.module.apply, pre)
  fc.extract_features(built.module.apply, built.variables, xtr[:args.batch], pre,
                      batch_size=args.batch, feature_fn=feature_fn)  # compile
  t = time.perf_counter()
  ftr = fc.extract_features(built.module.apply, built.variables, xtr, pre,
                            batch_size=args.batch, feature_fn=feature_fn)
  t_extract = time.perf_counter() - t
  fte = fc.extract_features(built.module.apply, built.variables, xte, pre,
                            batch_size=args.batch, feature_fn=feature_fn)
  head_step = fc.make_head_step(loss_fn, tx, 10)
  cached = {"params": jax.tree_util.tree_map(jnp.array, params0), "opt": tx.init(params0),
            "epoch": 0}

  def cached_epoch():
    e = cached["epoch"]
    cached["params"], cached["opt"], _ = fc.train_linear_probe_on_features(
        ftr, ytr, cached["params"], tx, classes_per_task=10, batch_size=args.batch, epochs=1,
        seed=(0, 0), loss_fn=loss_fn, opt_state=cached["opt"], rng=rng, first_epoch=e,
        total_steps=args.epochs * nb, head_step=head_step)
    cached["epoch"] += 1

  def ncm():
    means, counts = fc.class_means(ftr, ytr, 10)
    return fc.ncm_predict(fte, means, counts)

  # warm-up (compilation) outside the timings
  uncached_epoch()
  cached_epoch()
  ncm()
  times = {"uncached": [], "cached": [], "ncm": []}
  for _ in range(args.repeats):
    for name, fn in (("uncached", uncached_epoch), ("cached", cached_epoch), ("ncm", ncm)):
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  med = {k: statistics.median(v) for k, v in times.items()}

  def acc(head):
    z = fc.head_logits(head["head"], jnp.asarray(fte))
    return 100.0 * float(np.mean(np.asarray(jnp.argmax(z, -1)) == yte))

  acc_unc = acc(jax.device_get(uncached["state"].params))
  acc_cac = acc(cached["params"])
  acc_ncm = 100.0 * float(np.mean(ncm() == yte))
  e = args.epochs
  speedup_epoch = med["uncached"] / med["cached"]
  speedup_run = e * med["uncached"] / (t_extract + e * med["cached"])
  print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  print(f"feature extraction (once, {len(xtr)} images): {t_extract:.2f} s "
        f"({len(xtr) / t_extract:.0f} img/s)")
  print(f"one epoch, full forward (uncached): {med['uncached']:.2f} s "
        f"({len(xtr) / med['uncached']:.0f} img/s)")
  print(f"one epoch, cached features:         {med['cached']:.3f} s "
        f"({len(xtr) / med['cached']:.0f} img/s) -> {speedup_epoch:.0f}x per epoch")
  print(f"{e} epochs end to end: {e * med['uncached']:.1f} s vs {t_extract + e * med['cached']:.1f}"
        f" s (extraction included) -> {speedup_run:.1f}x")
  print(f"NCM fit + predict ({len(xte)} test): {1e3 * med['ncm']:.1f} ms")
  print(f"test accuracy after {1 + args.repeats} epochs: uncached head {acc_unc:.2f}%, cached "
        f"head {acc_cac:.2f}% (same batches: equal up to rounding), NCM {acc_ncm:.2f}%")
  print(json.dumps({"extract_s": round(t_extract, 3), "uncached_epoch_s": round(med["uncached"], 3),
                    "cached_epoch_s": round(med["cached"], 4), "speedup_per_epoch":
                    round(speedup_epoch, 1), f"speedup_{e}_epochs": round(speedup_run, 2),
                    "ncm_s": round(med["ncm"], 4), "acc_uncached": round(acc_unc, 2),
                    "acc_cached": round(acc_cac, 2), "acc_ncm": round(acc_ncm, 2)}))


if __name__ == "__main__":
  main()
