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

Streaming pipeline (image folders, :mod:`cft_jax.data.loader`), same JSON line:

- ``host_jpeg_224_img_per_s``: grain host pipeline (decode JPEG + RandomResizedCrop + flip to
  224 px) over ``--jpeg-images`` generated 400x300 JPEGs, ``data.workers`` = CPU cores, and
  with read threads only (``workers=0``); steady state: the second half of the batches;
- ``rss_growth_4x``: peak resident memory (the CLI process plus its grain workers, sampled every
  50 ms) of a CLI run (tiny_cnn, 1 epoch over every image) on an image folder of
  ``--rss-images`` N images vs 4N; target <= 1.15 (memory must not grow with the dataset).

    python benchmarks/input_pipeline.py [--batch 64] [--repeats 7] [--augment crop_flip]
    python benchmarks/input_pipeline.py --skip-step --jpeg-images 512 --rss-images 300
    python benchmarks/input_pipeline.py --smoke   # batch 2, 20 JPEGs, 1 CLI run, tiny models (CI)
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
from cft_jax.peft import PeftSpec  # noqa: E402


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
      built = build_model(model, 10, peft=PeftSpec.lora(4), pretrained=True, **kw)
    except (ImportError, ValueError, FileNotFoundError):
      built = build_model(model, 10, peft=PeftSpec.lora(4), pretrained=False, **kw)
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


def write_jpegs(root: str, n: int, classes: int = 4, size=(300, 400), split_test: bool = False):
  """``n`` JPEGs (smooth random content, ~``size``) as ``root/{train,test}/cls{k}/`` (or
  ``root/cls{k}`` when not ``split_test``); a few unique images, written under many names."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  uniq = []
  for _ in range(16):
    small = rng.integers(0, 256, (size[0] // 16, size[1] // 16, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((size[1], size[0]), Image.BILINEAR)
    uniq.append(im)
  for i in range(n):
    split = ("test" if i % 5 == 4 else "train") if split_test else ""
    d = os.path.join(root, split, f"cls{i % classes}")
    os.makedirs(d, exist_ok=True)
    uniq[i % len(uniq)].save(os.path.join(d, f"{i:06d}.jpg"), quality=90)
  return root


def host_jpeg_throughput(n: int, batch: int, workers: int) -> float:
  """Images/s of the grain host pipeline (decode + RRC + flip to 224 px) over the second half of
  the batches (steady state: worker start-up and the prefetch that fills during it excluded)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from cft_jax.data import HostTransform, TaskBatches  # pylint: disable=g-import-not-at-top
  from cft_jax.data.datasets import load_image_folder  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    write_jpegs(d, n, split_test=True)
    ds = load_image_folder(d, 224)
    it = TaskBatches(ds.train, np.arange(len(ds.train)), batch, 1, (0, 0),
                     HostTransform(224, train=True, augment="rrc_flip"), workers=workers,
                     read_threads=1 if workers else 8,  # prefetch: 2 batches per process
                     process_index=0, process_count=1)
    stamps = [time.perf_counter() for _ in it]
    half = len(stamps) // 2  # steady state: prefetched batches are a small part of the window
    return (len(stamps) - 1 - half) * batch / (stamps[-1] - stamps[half])


def peak_rss_of_cli(root: str, workdir: str, workers: int) -> float:
  """Peak RSS (MiB) of the CLI process tree (sum over the process and its children)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import psutil  # pylint: disable=g-import-not-at-top
  repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
  cmd = [sys.executable, "-m", "cft_jax.main", "--config",
         os.path.join(repo, "configs", "default.py"), "--workdir", workdir, "--overwrite",
         "--config.data.name=image_folder", f"--config.data.root={root}",
         "--config.data.image_size=64", "--config.model.name=tiny_cnn",
         "--config.model.pretrained=False", "--config.scenario.num_tasks=2",
         "--config.data.train_limit=0", "--config.data.test_limit=0", "--config.train.epochs=1",
         "--config.train.batch_size=32", "--config.eval.batch_size=32",
         f"--config.data.workers={workers}", "--config.train.progress=False",
         "--config.train.plots=False", "--config.train.tensorboard=False"]
  proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  ps, peak = psutil.Process(proc.pid), 0
  while proc.poll() is None:
    try:
      rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
      peak = max(peak, rss)
    except psutil.Error:
      pass
    time.sleep(0.05)
  out = proc.stdout.read().decode()
  if proc.returncode:
    raise RuntimeError(f"CLI run failed:\n{out[-3000:]}")
  return peak / 2**20


def streaming_figures(args) -> dict:
  import tempfile  # pylint: disable=g-import-not-at-top
  cores = os.cpu_count() or 1
  out = {"host_jpeg_workers": cores}
  b = min(32, args.batch)  # 32 (the smoke run's 2: enough batches for a steady-state half)
  out["host_jpeg_224_img_per_s"] = round(host_jpeg_throughput(args.jpeg_images, b, cores), 1)
  out["host_jpeg_224_img_per_s_threads"] = round(
      host_jpeg_throughput(args.jpeg_images, b, 0), 1)
  print(f"host pipeline, 224 px RRC+flip from 400x300 JPEG: {out['host_jpeg_224_img_per_s']} "
        f"img/s with {cores} worker processes, {out['host_jpeg_224_img_per_s_threads']} img/s "
        f"with read threads only", flush=True)
  n = args.rss_images
  with tempfile.TemporaryDirectory() as d:
    peaks = {}
    for k in (n,) if args.smoke else (n, 4 * n):  # smoke: the CLI run once (no 4N figure)
      root = write_jpegs(os.path.join(d, f"imgs{k}"), k, split_test=True)
      peaks[k] = peak_rss_of_cli(root, os.path.join(d, f"run{k}"), cores)
      print(f"CLI on an image folder of {k} images: peak RSS {peaks[k]:.0f} MiB", flush=True)
  out.update({"rss_images": n, "rss_peak_mib_n": round(peaks[n], 1),
              "rss_peak_mib_4n": round(peaks[4 * n], 1) if 4 * n in peaks else None,
              "rss_growth_4x": round(peaks[4 * n] / peaks[n], 3) if 4 * n in peaks else None})
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--augment", default="crop_flip", choices=("none", "crop_flip", "rrc_flip"))
  ap.add_argument("--host-batches", type=int, default=20, help="batches per host sample")
  ap.add_argument("--jpeg-images", type=int, default=2048, help="JPEGs for the host figure")
  ap.add_argument("--rss-images", type=int, default=300, help="N of the N vs 4N RSS runs")
  ap.add_argument("--skip-step", action="store_true", help="only the streaming figures")
  ap.add_argument("--skip-streaming", action="store_true", help="only the step figures")
  ap.add_argument("--smoke", action="store_true",
                  help="smallest run (batch 2, 20 JPEGs, one CLI run for the RSS, Lite0 at 32 "
                       "px, the 2-block vit_tiny at 16 px, one repeat): CI")
  args = ap.parse_args()
  models = (("effnet_lora_96", "efficientnet_lite0", 96), ("vit_ti4_full_32", "vit_ti4", 32))
  if args.smoke:
    args.batch, args.repeats, args.host_batches = 2, 1, 1
    args.jpeg_images, args.rss_images = 20, 20  # every class gets a test image (i % 5 == 4)
    models = (("effnet_lora_32", "efficientnet_lite0", 32), ("vit_tiny_full_16", "vit_tiny", 16))
  streaming = {} if args.skip_streaming else streaming_figures(args)
  if args.skip_step:
    print(json.dumps(streaming))
    return
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
  for name, model, size in models:
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
  summary.update(streaming)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
