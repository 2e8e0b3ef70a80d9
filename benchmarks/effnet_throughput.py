"""EfficientNet-Lite CPU throughput: shifted multiply-add depthwise vs XLA grouped conv.

Prints forward images/s and train-step images/s (LoRA rank 4 on the 1x1 convs,
Adam, gradients taken w.r.t. the LoRA leaves + the ``head`` only) for each
``depthwise_impl``, side by side, as the median of a few timed repeats after a
warm-up (compile) call.

    python benchmarks/effnet_throughput.py [--batch 64] [--size 96] [--repeats 3]
    python benchmarks/effnet_throughput.py --smoke   # batch 2, 32 px, one repeat, shift only (CI)

Uses the pretrained weights when the weights package is installed, else a random init.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402

from cft_jax.models.efficientnet_lite import EfficientNetLite, load_pretrained  # noqa: E402
from cft_jax.peft import PeftSpec  # noqa: E402


def is_trainable(path: tuple) -> bool:
    return path[0] == "head" or any("lora" in str(p) for p in path)


def split_params(params):
    flat = flatten_dict(params)
    train = {k: v for k, v in flat.items() if is_trainable(k)}
    frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
    return train, frozen


def timeit(fn, repeats: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds per call, after a warm-up call."""
    jax.block_until_ready(fn())  # warm-up / compile
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def bench(impl: str, variables, args) -> tuple[tuple[float, float], tuple[float, float]]:
    model = EfficientNetLite(variant=args.variant, num_classes=args.num_classes,
                             peft=PeftSpec.lora(args.lora_rank), depthwise_impl=impl)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (args.batch, args.size, args.size, 3), jnp.float32)
    y = jax.random.randint(key, (args.batch,), 0, args.num_classes)
    batch_stats = variables["batch_stats"]

    fwd = jax.jit(lambda v, x: model.apply(v, x))
    t_fwd = timeit(lambda: fwd(variables, x), args.repeats)

    trainable, frozen = split_params(variables["params"])
    tx = optax.adam(1e-3)
    opt_state = tx.init(trainable)

    def loss_fn(tr, fr, x, y, rng):
        params = unflatten_dict({**fr, **tr})
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                             rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(tr, opt_state, fr, x, y, rng):
        loss, grads = jax.value_and_grad(loss_fn)(tr, fr, x, y, rng)
        updates, opt_state = tx.update(grads, opt_state, tr)
        return optax.apply_updates(tr, updates), opt_state, loss

    state = {"tr": trainable, "opt": opt_state}

    def run_step():
        state["tr"], state["opt"], loss = step(state["tr"], state["opt"], frozen, x, y, key)
        return loss

    t_train = timeit(run_step, args.repeats)
    return t_fwd, t_train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="lite0")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--impls", default="shift,xla")
    p.add_argument("--smoke", action="store_true",
                   help="smallest run (batch 2, 32 px, one repeat, the default impl): CI")
    args = p.parse_args()
    if args.smoke:
        args.batch, args.size, args.repeats, args.impls = 2, 32, 1, "shift"

    try:  # speed does not depend on the values; this is just the quickest way to get them
        variables = load_pretrained(args.variant, args.num_classes, PeftSpec.lora(args.lora_rank))
    except (ImportError, ValueError):  # weights package missing / no weights for the variant
        print("no pretrained weights: random init (jitted model.init, slow to compile)")
        model = EfficientNetLite(variant=args.variant, num_classes=args.num_classes,
                                 peft=PeftSpec.lora(args.lora_rank))
        variables = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))

    print(f"EfficientNet-{args.variant}, batch {args.batch}, {args.size}px, LoRA rank "
          f"{args.lora_rank}, {jax.device_count()} {jax.default_backend()} device(s), "
          f"median of {args.repeats}")
    print(f"load average before: {os.getloadavg()[0]:.1f} (wall-clock figures assume an idle machine; "
          "CPU-seconds per step are less sensitive to other processes)")
    print(f"{'depthwise_impl':>14} {'forward img/s':>14} {'train img/s':>12} "
          f"{'fwd cpu-s/step':>15} {'train cpu-s/step':>17}")
    for impl in args.impls.split(","):
        (fw, fc), (tw, tc) = bench(impl, variables, args)
        print(f"{impl:>14} {args.batch / fw:14.1f} {args.batch / tw:12.1f} {fc:15.2f} {tc:17.2f}",
              flush=True)


if __name__ == "__main__":
    main()
