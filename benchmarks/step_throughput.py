"""Training-step throughput and memory: cft_jax (JAX/XLA) vs the same models in PyTorch.

Cases (same weights, shapes, batch, float32, thread count in both frameworks):

- ``effnet_lora``: EfficientNet-Lite0 (ImageNet weights when the weights package is installed)
  + LoRA rank 4 on every 1x1 conv, 96 px; LoRA leaves + head train.
- ``vit_full``: ViT-Ti/4 at 32 px, full fine-tuning.
- ``vit_lora``: ViT-Ti/4 at 32 px, LoRA r=4 on k,v of blocks 0-4 (paper setup) + head.
- ``vit_full_linearized``: the linearized ViT-Ti/4 (DLCFT; ``f(theta_0) + J (theta - theta_0)``
  with one forward-mode pass, then reverse mode through it): JAX ``jax.jvp`` in the library's
  step, PyTorch ``torch.func.jvp`` (PyTorch's fused CPU attention has no forward-mode rule, so
  its linearized model uses the explicit-softmax attention; ``torch_vit_full_math`` times that
  attention in the plain step too).
- ``effnet_full`` / ``effnet_full_linearized``: Lite0 at 96 px, full fine-tuning (BN frozen),
  plain and whole-network linearized (``jax.jvp`` / ``torch.func.jvp``); ``effnet_full_features``
  (JAX only): DLCFT's eqs. 6-7, the linearized feature extractor under a linear head
  (``model.linearize=features``), what ``configs/dlcft_*.py`` train.
- ``vit_lora_remat`` (JAX only): ``vit_lora`` with ``VisionTransformer(remat=True)`` (every
  block recomputed in the backward pass): the memory/speed trade-off for PEFT.

PyTorch runs EfficientNet-Lite0 in ``channels_last`` (its faster CPU layout here) and the ViT
with ``F.scaled_dot_product_attention``; the forward features of both frameworks are compared
at start-up (max relative difference printed).

The JAX side is the library's own jitted step (:func:`cft_jax.steps.make_train_step`: uint8
batch in, device preprocessing, local cross-entropy on the task's 10 of 100 classes, Adam,
metrics, donated state); the PyTorch side (``benchmarks/torch_reference.py``) does the same work
eagerly (uint8 -> float normalisation, the same loss on the same slice, ``torch.optim.Adam``).

Timing: every candidate is compiled / warmed up, then the candidates run in turn, ``--repeats``
rounds of ``--steps`` steps each (alternating, so a change of machine load hits all of them
alike); medians and ratios are computed from the same rounds. The load average is printed.

Memory (``--memory``, default on): each (case, framework) runs alone in a child process that
sends large allocations straight to ``mmap`` (``MALLOC_MMAP_THRESHOLD_``, so freed memory
leaves the RSS), sets up the model (JAX: compiled ahead of time), resets the process's peak RSS
(``/proc/self/clear_refs``) and runs two steps. ``peak MiB`` = the weights (+ JAX's Adam state,
created before the first step) + the peak RSS growth during the steps (activations, gradients,
workspace; PyTorch's Adam state, created in the first step). For JAX the compiled step's own
accounting (``memory_analysis()``: arguments + outputs + temporaries - donated) is printed as
well (``XLA peak MiB``).

    python benchmarks/step_throughput.py [--repeats 7] [--steps 2] [--batch 64] [--no-memory]
    python benchmarks/step_throughput.py --smoke   # every case once, tiny (CI: no timing)

The PyTorch side needs the ``torch-compare`` extra (``pip install torch``); without torch only
the JAX side runs (and no ratio is printed). ``--smoke`` runs every case at its smallest size
(batch 2, Lite0 at 32 px, the 2-block ``vit_tiny`` at 16 px for ViT-Ti/4, one step, no memory
children, no XLA memory analysis; the Lite0 full fine-tuning cases traced and lowered only): what
``tests/test_benchmarks.py`` runs so that a change of the library's API cannot break the script
unseen. Ends with one JSON line
(``jax_over_torch_*`` are throughput ratios, > 1: JAX faster; ``*_linearized_over_plain`` are
step-time ratios of the linearized to the plain full fine-tuning step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from cft_jax import objectives, peft  # noqa: E402
from cft_jax.data import Preprocess  # noqa: E402
from cft_jax.models import build_model  # noqa: E402
from cft_jax.steps import TrainState, make_train_step  # noqa: E402
from cft_jax.peft import PeftSpec  # noqa: E402

CASES = ("effnet_lora", "vit_full", "vit_lora", "vit_full_linearized", "vit_lora_remat",
         "effnet_full", "effnet_full_linearized", "effnet_full_features")
JAX_ONLY = ("vit_lora_remat", "effnet_full_features")
NUM_CLASSES, K = 100, 10  # a 10-task split of 100 classes: the loss sees the task's 10


_EFF, _VIT = dict(model="efficientnet_lite0", size=96), dict(model="vit_ti4", size=32)
CASE_SPECS = {
    "effnet_lora": dict(_EFF, peft="lora", linearized=False),
    "effnet_full": dict(_EFF, peft="full", linearized=False),
    "effnet_full_linearized": dict(_EFF, peft="full", linearized="full"),
    "effnet_full_features": dict(_EFF, peft="full", linearized="features"),
    "vit_full": dict(_VIT, peft="full", linearized=False),
    "vit_lora": dict(_VIT, peft="lora", linearized=False),
    "vit_full_linearized": dict(_VIT, peft="full", linearized="full"),
    "vit_lora_remat": dict(_VIT, peft="lora", linearized=False, remat=True),
}


def case_spec(case: str) -> dict:
  """Model, image size, PEFT and linearization of a benchmark case.

  Raises:
    ValueError: unknown case (the message lists the known ones).
  """
  if case not in CASE_SPECS:
    raise ValueError(f"unknown case {case!r}; choose from {sorted(CASE_SPECS)}")
  return dict(CASE_SPECS[case])


def build_variables(spec: dict):
  """``BuiltModel`` of a case (Lite0: pretrained if available; ViT-Ti/4: random init)."""
  kw = dict(image_size=spec["size"], rng=jax.random.PRNGKey(0))
  if spec["model"].startswith("efficientnet"):
    rank = 4 if spec["peft"] == "lora" else 0
    try:
      return build_model(spec["model"], NUM_CLASSES, peft=PeftSpec.lora(rank), pretrained=True,
                         **kw), True
    except (ImportError, ValueError, FileNotFoundError):
      return build_model(spec["model"], NUM_CLASSES, peft=PeftSpec.lora(rank), pretrained=False,
                         **kw), False
  kw.update(peft=PeftSpec.lora(4) if spec["peft"] == "lora" else PeftSpec(), head_init_std=0.02)
  if spec.get("remat"):
    kw["remat"] = True
  return build_model(spec["model"], NUM_CLASSES, pretrained=False, **kw), False


def batch(spec: dict, b: int):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (b, spec["size"], spec["size"], 3), dtype=np.uint8)
  labels = (np.arange(b) % K).astype(np.int32)
  return images, labels


class JaxCase:
  """The library's train step on a fixed batch."""

  def __init__(self, spec: dict, b: int):
    built, self.pretrained = build_variables(spec)
    variables = dict(built.variables)
    params0, frozen_params = peft.split_params(variables.pop("params"), spec["peft"])
    self.frozen = {"params": frozen_params, "collections": variables}
    if spec["linearized"]:  # "full" | "features"
      self.frozen["params0"] = jax.tree_util.tree_map(jnp.array, params0)
    self.tx = optax.adam(1e-3)
    self.step = make_train_step(built.module.apply, Preprocess(spec["size"], built.mean,
                                                               built.std),
                                objectives.make_loss_fn("ce"), self.tx, K,
                                linearized=spec["linearized"])
    self.state = TrainState(step=jnp.zeros((), jnp.int32), params=params0,
                            opt_state=self.tx.init(params0))
    images, labels = batch(spec, b)
    self.args = (jnp.asarray(images), jnp.asarray(labels), jnp.ones(b, bool))
    self.rng = jax.random.PRNGKey(0)
    self.built = built

  def __call__(self):
    self.state, m = self.step(self.state, self.frozen, *self.args, 0, 0, 100, self.rng)
    jax.block_until_ready(m["loss"])

  def xla_peak_mib(self) -> float:
    c = self.step.lower(self.state, self.frozen, *self.args, 0, 0, 100, self.rng, False,
                        None).compile()
    mem = c.memory_analysis()
    if mem is None:
      return float("nan")
    return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes) / 2**20


def _tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


class TorchCase:
  """The PyTorch twin (``torch_reference``) on the same batch and weights."""

  def __init__(self, spec: dict, b: int, jcase: JaxCase, attention: str = "sdpa"):
    import torch  # pylint: disable=g-import-not-at-top
    import torch_reference as tr  # pylint: disable=g-import-not-at-top
    self.torch = torch
    variables = jcase.built.variables
    if spec["model"].startswith("efficientnet"):
      from cft_jax.models import efficientnet_lite  # pylint: disable=g-import-not-at-top
      # channels_last: PyTorch's faster CPU layout for this network (~1.4x over NCHW here)
      p = {k: (v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v)
           for k, v in tr.effnet_params_from_flax(variables).items()}
      blocks = efficientnet_lite.block_config("lite0")
      fwd = lambda params, x, **kw: tr.effnet_forward(params, x, blocks, **kw)
      self.memory_format = torch.channels_last
    else:
      p = tr.vit_params_from_flax(variables)
      spec_v = jcase.built.module.spec
      attention = "math" if spec["linearized"] else attention
      fwd = lambda params, x, **kw: tr.vit_forward(params, x, depth=spec_v.depth,
                                                   heads=spec_v.heads, patch=spec_v.patch,
                                                   attention=attention, **kw)
      self.memory_format = torch.contiguous_format
    self.forward, self.params = fwd, p
    names = tr.trainable_names(p, spec["peft"])
    self.step = tr.TorchStep(fwd, p, names, linearized=bool(spec["linearized"]),
                             mean=jcase.built.mean, std=jcase.built.std, k=K)
    images, labels = batch(spec, b)
    self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(
        memory_format=self.memory_format)  # NCHW (strides: channels_last for Lite0) uint8
    self.labels = torch.from_numpy(labels).long()

  def __call__(self):
    self.step(self.images, self.labels)

  def max_feature_diff(self, jcase: JaxCase) -> float:
    """Max |features_torch - features_jax| / max |features_jax| (backbone output, eval mode)."""
    images = np.asarray(jcase.args[0])
    x = (images.astype(np.float32) - jcase.built.mean) / jcase.built.std
    zj = np.asarray(jax.jit(lambda v, x: jcase.built.module.apply(v, x, return_features=True))(
        jcase.built.variables, x))
    with self.torch.no_grad():
      xt = self.torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(
          memory_format=self.memory_format)
      zt = self.forward(self.params, xt, return_features=True)
    return float(np.abs(zt.numpy() - zj).max() / np.abs(zj).max())


# ------------------------------------------------------------------------------- memory child


def _rss_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(field)


def memory_child(case: str, framework: str, b: int) -> None:
  """Prints one JSON line: ``persistent_mib`` (all weights; for JAX also the Adam state, which
  exists before the first step) and ``step_mib`` (peak RSS during two steps above the RSS after
  set-up; JAX's step is compiled ahead of time so the compiler's memory is not counted;
  PyTorch's Adam creates its state in the first step, so it is counted here)."""
  spec = case_spec(case)
  jcase = JaxCase(spec, b)
  weights = _tree_bytes(jcase.built.variables)
  if framework == "jax":
    compiled = jcase.step.lower(jcase.state, jcase.frozen, *jcase.args, 0, 0, 100, jcase.rng,
                                False, None).compile()
    persistent = weights + _tree_bytes(jcase.state.opt_state)

    def run():
      jcase.state, m = compiled(jcase.state, jcase.frozen, *jcase.args, 0, 0, 100, jcase.rng,
                                False, None)
      jax.block_until_ready(m["loss"])
  else:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count() or 1)
    run = TorchCase(spec, b, jcase)
    persistent = weights
  jax.block_until_ready(jcase.args)
  steady = _rss_kib("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
  for _ in range(2):
    run()
  step = (_rss_kib("VmHWM") - steady) / 1024
  print(json.dumps({"persistent_mib": persistent / 2**20, "step_mib": step}))


def measure_memory(case: str, framework: str, b: int) -> dict:
  env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", case,
                        framework, "--batch", str(b)], env=env, capture_output=True, text=True,
                       check=False)
  for line in reversed(out.stdout.strip().splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  sys.stderr.write(out.stderr[-2000:])
  return {"persistent_mib": float("nan"), "step_mib": float("nan")}


# ------------------------------------------------------------------------------------- main


# --smoke: the smallest inputs, and the 2-block ViT of the tests for ViT-Ti/4 (same code path);
# the Lite0 full fine-tuning cases are only traced and lowered (each XLA:CPU compile of Lite0
# takes 10-30 s here; tracing catches what a change of the library's API breaks).
SMOKE_MODELS = {"efficientnet_lite0": ("efficientnet_lite0", 32), "vit_ti4": ("vit_tiny", 16)}
SMOKE_LOWER_ONLY = ("effnet_full", "effnet_full_linearized", "effnet_full_features")


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--steps", type=int, default=2, help="steps per timed sample")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--cases", default=",".join(CASES))
  ap.add_argument("--no-memory", dest="memory", action="store_false")
  ap.add_argument("--smoke", action="store_true",
                  help="every case once at its smallest size (batch 2, 1 step, no memory)")
  ap.add_argument("--memory-child", nargs=2, metavar=("CASE", "FRAMEWORK"),
                  help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.smoke:
    args.batch, args.repeats, args.steps, args.warmup, args.memory = 2, 1, 1, 1, False
  return args


def _import_torch():
  """``torch`` with one thread per core, or None when it is not installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  return torch


def build_candidates(cases, args, with_torch: bool):
  """Builds, compiles and warms up every (framework, case) step: ``(candidates, info)``."""
  cands, info = {}, {}
  for case in cases:
    spec = case_spec(case)
    if args.smoke:
      spec["model"], spec["size"] = SMOKE_MODELS[spec["model"]]
    t = time.perf_counter()
    jc = JaxCase(spec, args.batch)
    if args.smoke and case in SMOKE_LOWER_ONLY:
      jc.step.lower(jc.state, jc.frozen, *jc.args, 0, 0, 100, jc.rng, False, None)
      print(f"  {case}: built + lowered (smoke) in {time.perf_counter() - t:.0f} s", flush=True)
      continue
    cands[f"jax_{case}"] = jc
    info[case] = dict(diff=float("nan"), pretrained=jc.pretrained,  # smoke: no second compile
                      xla_peak=float("nan") if args.smoke else jc.xla_peak_mib())
    if with_torch and case not in JAX_ONLY:
      tc = TorchCase(spec, args.batch, jc)
      cands[f"torch_{case}"] = tc
      info[case]["diff"] = tc.max_feature_diff(jc)
      if case == "vit_full":
        cands["torch_vit_full_math"] = TorchCase(spec, args.batch, jc, attention="math")
    for name in [n for n in cands if n.endswith(case) or n == f"torch_{case}_math"]:
      for _ in range(args.warmup):
        cands[name]()
    check = ("JAX only" if case in JAX_ONLY or not with_torch else
             f"features: max |torch - jax| / max |jax| = {info[case]['diff']:.1e}")
    print(f"  {case}: built + compiled + warmed up in {time.perf_counter() - t:.0f} s; {check}"
          + (" (Lite0: ImageNet weights)" if jc.pretrained else ""), flush=True)
  return cands, info


def time_candidates(cands, args):
  """Median seconds per step of every candidate over ``args.repeats`` alternating rounds."""
  times = {n: [] for n in cands}
  for _ in range(args.repeats):
    for name, fn in cands.items():
      t = time.perf_counter()
      for _ in range(args.steps):
        fn()
      times[name].append((time.perf_counter() - t) / args.steps)
  return {n: statistics.median(v) for n, v in times.items()}


def print_table(cases, args, med, ips, mem, info) -> None:
  nan = float("nan")
  hdr = (f"{'case':22} {'JAX img/s':>9} {'torch img/s':>11} {'JAX/torch':>9} "
         f"{'JAX ms':>8} {'torch ms':>8}")
  if args.memory:
    hdr += f" {'JAX peak MiB':>12} {'torch peak MiB':>14} {'XLA peak MiB':>12}"
  print(hdr)
  print("-" * len(hdr))
  for case in cases:
    j, tname = f"jax_{case}", f"torch_{case}"
    ti, tm = ips.get(tname, nan), med.get(tname, nan)
    line = (f"{case:22} {ips[j]:9.1f} {ti:11.1f} {ips[j] / ti:8.2f}x "
            f"{1e3 * med[j]:8.0f} {1e3 * tm:8.0f}")
    if args.memory:
      mj = mem[(case, "jax")]
      mt = mem.get((case, "torch"), {"persistent_mib": nan, "step_mib": nan})
      line += (f" {mj['persistent_mib'] + mj['step_mib']:12.0f}"
               f" {mt['persistent_mib'] + mt['step_mib']:14.0f}"
               f" {info[case]['xla_peak']:12.0f}")
    print(line)
  if "torch_vit_full_math" in ips:
    print(f"{'(torch vit_full, math attention)':34} {ips['torch_vit_full_math']:11.1f}")


def _ratio(num: dict, den: dict, a: str, b: str):
  """``num[a] / den[b]`` rounded, or None when either is missing (no torch, case not run)."""
  return round(num[a] / den[b], 3) if a in num and b in den else None


def summarize(cases, args, med, ips, mem, info, threads, loads) -> dict:
  """The JSON summary (``jax_over_torch_*``: throughput ratios; ``*_over_plain``: step-time
  ratios; None where a side did not run)."""
  summary = {"batch": args.batch, "threads": threads, "repeats": args.repeats,
             "load_before_after": [round(loads[0][0], 2), round(loads[1][0], 2)],
             "img_per_s": {n: round(v, 1) for n, v in ips.items()}}
  for key, case in (("jax_over_torch_effnet", "effnet_lora"), ("jax_over_torch_vit", "vit_full"),
                    ("jax_over_torch_vit_lora", "vit_lora"),
                    ("jax_over_torch_vit_linearized", "vit_full_linearized"),
                    ("jax_over_torch_effnet_full", "effnet_full")):
    summary[key] = _ratio(ips, ips, f"jax_{case}", f"torch_{case}")
  for pre in ("jax", "torch"):
    summary[f"{pre}_linearized_over_plain"] = _ratio(med, med, f"{pre}_vit_full_linearized",
                                                     f"{pre}_vit_full")
    summary[f"{pre}_linearized_over_plain_effnet"] = _ratio(
        med, med, f"{pre}_effnet_full_linearized", f"{pre}_effnet_full")
  summary["jax_features_linearized_over_plain_effnet"] = _ratio(
      med, med, "jax_effnet_full_features", "jax_effnet_full")
  summary["jax_remat_slowdown_vit_lora"] = _ratio(med, med, "jax_vit_lora_remat", "jax_vit_lora")
  if args.memory:
    summary["peak_mib"] = {f"{fw}_{case}": round(m["persistent_mib"] + m["step_mib"], 1)
                           for (case, fw), m in mem.items()}
    for peft_case in ("vit_lora", "vit_lora_remat"):
      summary[f"jax_{peft_case}_over_full_peak"] = _ratio(
          summary["peak_mib"], summary["peak_mib"], f"jax_{peft_case}", "jax_vit_full")
  summary["xla_peak_mib"] = {c: round(i["xla_peak"], 1) for c, i in info.items()}
  xla = {c: i["xla_peak"] for c, i in info.items()}
  for peft_case in ("vit_lora", "vit_lora_remat"):
    summary[f"xla_{peft_case}_over_full_peak"] = _ratio(xla, xla, peft_case, "vit_full")
  return summary


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.memory_child:
    memory_child(*args.memory_child, args.batch)
    return
  torch = _import_torch()
  threads = os.cpu_count() or 1
  cases = args.cases.split(",")
  load_before = os.getloadavg()
  print(f"machine: {platform.processor() or platform.machine()}, {threads} cores, "
        f"python {platform.python_version()}, jax {jax.__version__} "
        f"({jax.default_backend()}), "
        + (f"torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else
           "torch not installed: JAX side only (pip install torch for the comparison)")
        + f"; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"batch {args.batch}, float32, {args.repeats} alternating rounds of {args.steps} steps "
        f"after {args.warmup} warm-up steps; load average before: "
        f"{' '.join(f'{x:.2f}' for x in load_before)}", flush=True)
  cands, info = build_candidates(cases, args, with_torch=torch is not None)
  cases = [c for c in cases if f"jax_{c}" in cands]  # (smoke: the lowered-only cases left out)
  med = time_candidates(cands, args)
  load_after = os.getloadavg()
  ips = {n: args.batch / v for n, v in med.items()}
  mem = {}
  if args.memory:
    print("memory: one child process per (case, framework) ...", flush=True)
    for case in cases:
      for fw in ("jax",) if case in JAX_ONLY or torch is None else ("jax", "torch"):
        mem[(case, fw)] = measure_memory(case, fw, args.batch)
  print(f"\nload average after: {' '.join(f'{x:.2f}' for x in load_after)}")
  print_table(cases, args, med, ips, mem, info)
  print(json.dumps(summarize(cases, args, med, ips, mem, info, threads,
                             (load_before, load_after))))


if __name__ == "__main__":
  main()
