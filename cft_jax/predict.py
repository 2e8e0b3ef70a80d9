"""Predict with a finished run: :func:`load_run` and ``python -m cft_jax.predict``.

    import cft_jax
    predictor = cft_jax.load_run("runs/default")
    ids, probs = predictor.predict(images)        # uint8 [N, H, W, C] (or a list of images)
    [predictor.class_names[i] for i in ids]

    python -m cft_jax.predict --workdir runs/default [--top_k 3] IMAGE [IMAGE ...]

The predictor holds what the run's own evaluation used after its last finished task: the resolved
config, the *evaluation* parameters (WiSE-FT's ``(1 - a) theta_0 + a theta`` when
``eval.wise_ft_alpha != 1``; LAE's online and offline modules, combined by a class-wise max of
their softmaxes), the test preprocessing (streamed datasets: resize the shorter side and centre
crop on the host, as the grain pipeline does; then the model's normalisation) and the class-IL
prediction over every class seen so far (:func:`cft_jax.steps.class_scores`, the computation of
the evaluation step, in batches of ``eval.batch_size``). It reads only the workdir
(``checkpoints/``, ``metrics.json``) and the model's pretrained weights, not the dataset.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cft_jax import methods as methods_lib
from cft_jax import robust as robust_lib
from cft_jax import scenarios
from cft_jax import train
from cft_jax.checkpoint import TaskCheckpointer
from cft_jax.config import mse_alpha, validate_config
from cft_jax.data import STREAMED, HostTransform
from cft_jax.steps import make_predict_step


@dataclasses.dataclass
class Predictor:
  """A finished run's model, ready to predict (build it with :func:`load_run`).

  Attributes:
    config: the run's resolved config.
    class_names: names of the model's outputs ``0..C-1`` (output ``i`` is the ``i``-th class
      of the run's class order).
    class_order: the dataset's class id of every output.
    num_seen: classes a prediction ranges over (every class of the finished tasks).
    num_finished_tasks: tasks trained before the checkpoint the predictor holds.
    host_transform: the host-side test transform (streamed datasets), or None (in-memory
      datasets: the device preprocessing resizes).
  """

  config: ml_collections.ConfigDict
  class_names: Tuple[str, ...]
  class_order: Tuple[int, ...]
  num_seen: int
  num_finished_tasks: int
  host_transform: Optional[HostTransform]
  _step: Any
  _params: Any
  _method_state: Any
  _frozen: Any

  def _batch(self, images: Any) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` (one shape) from an array or a list of images; streamed runs
    apply the test transform (any size / mode in, ``[S, S, 3]`` out)."""
    if self.host_transform is not None:
      return np.stack([self.host_transform(im, None) for im in images]) if len(images) else (
          np.zeros((0, self.host_transform.image_size, self.host_transform.image_size, 3),
                   np.uint8))
    if isinstance(images, np.ndarray):
      x = images
    else:
      arrays = [np.asarray(im.convert("RGB") if hasattr(im, "convert") and im.mode not in
                           ("L", "RGB") else im, np.uint8) for im in images]
      if len({a.shape for a in arrays}) > 1:
        raise ValueError("images of different sizes: pass them one at a time or as one "
                         "uint8 [N, H, W, C] array")
      x = np.stack(arrays)
    if x.ndim == 3:
      x = x[..., None]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f"images must be uint8 [N, H, W, 1|3], got {x.dtype} {x.shape}")
    return x

  def predict(self, images: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Class-IL prediction among the seen classes.

    Args:
      images: uint8 ``[N, H, W, C]`` (``C`` 1 or 3), or a list of PIL images / arrays (streamed
        runs: any size and mode; in-memory runs: one size).

    Returns:
      ``(ids [N] int32, probs [N, num_seen] float32)``: output ids (names:
      :attr:`class_names`) and class scores summing to 1 (the softmax; LAE: the class-wise
      max of the modules' softmaxes, normalised).

    Raises:
      ValueError: images that are not uint8 ``[N, H, W, 1|3]``.
    """
    x = self._batch(images)
    bs = int(self.config.eval.batch_size)
    ids, probs = [], []
    for lo in range(0, len(x), bs):  # padded batches of eval.batch_size, as the evaluation
      xb = x[lo:lo + bs]
      pad = np.zeros((bs - len(xb),) + xb.shape[1:], np.uint8)
      i, p = self._step(self._params, self._method_state, self._frozen,
                        jnp.asarray(np.concatenate([xb, pad])), self.num_seen)
      ids.append(np.asarray(i)[:len(xb)])
      probs.append(np.asarray(p)[:len(xb), :self.num_seen])
    if not ids:
      return np.zeros(0, np.int32), np.zeros((0, self.num_seen), np.float32)
    return np.concatenate(ids), np.concatenate(probs)

  def top_k(self, images: Any, k: int = 5) -> List[List[Tuple[str, float]]]:
    """The ``k`` most likely class names and scores of every image (see :meth:`predict`)."""
    _, probs = self.predict(images)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(self.class_names[j], float(p[j])) for j in row] for row, p in zip(order, probs)]


def _last_finished(ckpt: TaskCheckpointer, workdir: str) -> Tuple[dict, dict]:
  """The state and meta of the newest end-of-task checkpoint (odd step numbers,
  :func:`cft_jax.train.checkpoint_id`).

  Raises:
    FileNotFoundError: no finished task in ``workdir``.
  """
  for step in reversed(ckpt.all_steps()):
    if step % 2 == 1:
      return ckpt.restore_untyped(step)
  raise FileNotFoundError(f"{workdir} holds no checkpoint of a finished task: train at least "
                          f"one task (python -m cft_jax.main --workdir {workdir} ...) first")


def _class_names(workdir: str, meta: dict, order: Sequence[int]) -> Tuple[str, ...]:
  names = meta.get("class_names")
  path = os.path.join(workdir, "metrics.json")
  if names is None and os.path.exists(path):
    with open(path) as f:
      names = json.load(f).get("class_names")
  return tuple(names) if names else tuple(f"class {c}" for c in order)


def load_run(workdir: str) -> Predictor:
  """Loads the model of a run's last finished task for prediction.

  Args:
    workdir: the run's ``--workdir`` (``checkpoints/``; ``metrics.json`` for the class names).

  Returns:
    A :class:`Predictor` whose predictions on the run's test images are those its evaluation
    scored (``metrics.json``'s accuracies).

  Raises:
    FileNotFoundError: no workdir, or no finished task in it.
  """
  ckdir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckdir):
    raise FileNotFoundError(f"{workdir} is not a cft_jax run folder (no checkpoints/): pass the "
                            f"--workdir of a run")
  ckpt = TaskCheckpointer(ckdir)
  try:
    state, meta = _last_finished(ckpt, workdir)
  finally:
    ckpt.close()
  config = validate_config(ml_collections.ConfigDict(meta["config"]))
  order = tuple(int(c) for c in meta["class_order"])
  t = int(meta["num_finished_tasks"]) - 1
  _, init_rng = jax.random.split(jax.random.PRNGKey(config.seed))  # as train.build_experiment
  built, _, frozen, linearized, preprocess = train._model_and_frozen(  # pylint: disable=protected-access
      config, len(order), init_rng)
  method = methods_lib.get_method(config.method, mse_alpha=mse_alpha(config))
  params = jax.tree_util.tree_map(jnp.asarray, state["params"])
  method_state = jax.tree_util.tree_map(jnp.asarray, state["method_state"])
  params = robust_lib.eval_params(robust_lib.from_config(config), params,
                                  frozen.get("anchor"))  # WiSE-FT (a no-op otherwise)
  streamed = config.data.name in STREAMED or config.data.name.startswith("tfds:")
  host = (HostTransform(config.data.image_size, train=False,  # the grain test transform
                        crop_fraction=config.data.test_crop_fraction,
                        resample=config.data.resample) if streamed else None)
  return Predictor(
      config=config, class_names=_class_names(workdir, meta, order), class_order=order,
      num_seen=_num_seen(config, len(order), t), num_finished_tasks=t + 1, host_transform=host,
      _step=make_predict_step(built.module.apply, preprocess, len(order), method,
                              linearized=linearized),
      _params=params, _method_state=method_state, _frozen=jax.device_put(frozen))


def _num_seen(config: ml_collections.ConfigDict, num_classes: int, t: int) -> int:
  """Classes seen after task ``t`` (:meth:`cft_jax.scenarios.Scenario.num_seen`)."""
  sc = config.scenario
  spec = scenarios.make_scenario(sc.type, num_classes, sc.num_tasks, seed=sc.seed,
                                 shuffle_classes=sc.shuffle_classes,
                                 class_order=tuple(sc.class_order),
                                 first_task_classes=int(sc.first_task_classes))
  return int(spec.num_seen(t))


def main(argv: Optional[Sequence[str]] = None) -> int:
  """``python -m cft_jax.predict --workdir W [--top_k K] IMAGE...``: prints each image's ``K``
  most likely classes (one line per image)."""
  import argparse  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  ap = argparse.ArgumentParser(prog="python -m cft_jax.predict",
                               description="Top-k classes of images, from a finished run.")
  ap.add_argument("--workdir", required=True, help="the run's --workdir")
  ap.add_argument("--top_k", type=int, default=3)
  ap.add_argument("images", nargs="+", metavar="IMAGE")
  args = ap.parse_args(argv)
  try:
    predictor = load_run(args.workdir)
    for path in args.images:
      with Image.open(path) as im:
        im.load()
        row = predictor.top_k([im], args.top_k)[0]
      print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in row))
  except (OSError, ValueError) as e:
    print(f"cft_jax.predict: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
