"""k-NN probe of learned representations (DLCFT paper §4.3, Fig. 6; methods.md#knn).

After each task the penultimate features of the (continually fine-tuned) model are extracted for
a labelled "memory" set and a test set; every test example is classified by a majority vote of
its ``k`` nearest memory examples under cosine similarity. The probe decouples the quality of the
representation from the linear classifier.

Functions:

- :func:`knn_accuracy`: the vote itself (pure NumPy/JAX on feature arrays).
- :func:`make_feature_fn`: ``feature_fn(params, frozen, x) -> [B, D]`` for the trainer's models
  (``module.apply(..., return_features=True)``; linearized like the trainer's forward when the
  run is linearized).
- :func:`extract_features`: batches uint8 images through ``preprocess`` and ``feature_fn``.
- :func:`knn_probe`: the two together, as called by :func:`cft_jax.train.run` when
  ``config.eval.knn_k > 0``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np

from cft_jax import peft
from cft_jax.data import batches
from cft_jax.linearize import linearized_apply
from cft_jax.peft import HEAD

PyTree = Any


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k: int = 20,
                 chunk: int = 1024) -> float:
  """Cosine-similarity k-NN classification accuracy (%) of ``test_feats``.

  Each test example takes the label with the most votes among its ``k`` most similar training
  examples (cosine similarity of the features); ties between labels are broken by the larger sum
  of similarities of their voters (a tie on both goes to the smaller label).

  Args:
    train_feats: ``[N, D]`` memory features.
    train_labels: ``[N]`` int labels.
    test_feats: ``[M, D]`` query features.
    test_labels: ``[M]`` int labels.
    k: neighbours per vote (clipped to ``N``).
    chunk: test rows per similarity block (memory ``chunk * N`` floats).

  Returns:
    Accuracy in percent (``nan`` for an empty test set).

  Raises:
    ValueError: empty memory, ``k < 1`` or mismatched shapes.
  """
  tr = np.asarray(train_feats, np.float32)
  te = np.asarray(test_feats, np.float32)
  ytr = np.asarray(train_labels).astype(np.int64)
  yte = np.asarray(test_labels).astype(np.int64)
  if tr.ndim != 2 or te.ndim != 2 or tr.shape[1] != te.shape[1]:
    raise ValueError(f"features must be [N, D] and [M, D], got {tr.shape} and {te.shape}")
  if len(tr) != len(ytr) or len(te) != len(yte):
    raise ValueError("features and labels must have the same length")
  if len(tr) == 0 or k < 1:
    raise ValueError(f"need a non-empty memory and k >= 1 (N={len(tr)}, k={k})")
  if len(te) == 0:
    return float("nan")
  k = min(k, len(tr))
  num_labels = int(max(ytr.max(), yte.max())) + 1
  tr = tr / np.maximum(np.linalg.norm(tr, axis=1, keepdims=True), 1e-12)
  te = te / np.maximum(np.linalg.norm(te, axis=1, keepdims=True), 1e-12)
  correct = 0
  for s in range(0, len(te), chunk):
    sims = te[s:s + chunk] @ tr.T  # [m, N]
    nn_idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # [m, k]
    nn_sims = np.take_along_axis(sims, nn_idx, axis=1)
    votes = np.zeros((len(nn_idx), num_labels))
    sim_sum = np.zeros((len(nn_idx), num_labels))
    rows = np.arange(len(nn_idx))[:, None]
    np.add.at(votes, (rows, ytr[nn_idx]), 1.0)
    np.add.at(sim_sum, (rows, ytr[nn_idx]), nn_sims)
    # (sum + k) / 2k lies in [0, 1]; halved it never outweighs one vote
    score = votes + 0.5 * (sim_sum + k) / (2.0 * k)
    correct += int(np.sum(np.argmax(score, axis=1) == yte[s:s + chunk]))
  return 100.0 * correct / len(te)


def make_feature_fn(apply_fn: Callable, linearized: Optional[str] = None) -> Callable:
  """``feature_fn(params, frozen, x) -> [B, D]``: the model's pooled features (eval mode).

  Args:
    apply_fn: Flax ``module.apply`` accepting ``train`` and ``return_features``.
    linearized: ``None`` (the network itself), ``"full"`` or ``"features"``: the linearized
      feature extractor ``g(x; psi_0) + J g(x; psi_0) (psi - psi_0)`` (both linearized modes of
      :func:`cft_jax.train.make_forward` share it; the head is not used). ``frozen`` then holds
      ``params0``.
  """

  def feature_fn(params, frozen, x):
    def g(p):
      variables = dict(frozen["collections"], params=peft.merge_params(p, frozen["params"]))
      return apply_fn(variables, x, train=False, return_features=True)

    if linearized:
      strip = lambda t: {key: v for key, v in t.items() if key != HEAD}
      return linearized_apply(g, strip(frozen["params0"]), strip(params))
    return g(params)

  return feature_fn


def extract_features(feature_fn: Callable, images: np.ndarray, indices: np.ndarray,
                     preprocess: Callable, batch_size: int = 256) -> np.ndarray:
  """Features ``[len(indices), D]`` of ``images[indices]`` (uint8, preprocessed in eval mode).

  ``feature_fn(x) -> [B, D]`` (close over params; jit it). Batches are padded to a fixed size so
  the function compiles once.
  """
  labels = np.zeros(len(images), np.int32)
  out = []
  for xb, _, mb in batches(images, labels, np.asarray(indices), batch_size):
    f = np.asarray(feature_fn(preprocess(jnp.asarray(xb), train=False)))
    out.append(f[mb])
  return np.concatenate(out, axis=0)


def knn_probe(feature_fn: Callable, params: PyTree, frozen: PyTree, images_train, labels_train,
              train_indices, images_test, labels_test, test_indices, preprocess: Callable,
              k: int = 20, batch_size: int = 256) -> float:
  """k-NN accuracy (%) of the model's features: memory ``train_indices``, queries ``test_indices``.

  ``feature_fn`` is a jitted :func:`make_feature_fn` result. ``params``: the evaluated
  parameters (the trainer passes its evaluation parameters: WiSE-FT's interpolation, and each of
  ``method.eval_params``); a tuple / list of several sets (LAE's online and offline modules)
  gives the concatenation of each set's L2-normalised features (so the cosine similarity is the
  mean of the sets' similarities; **(our choice)**, docs/methods.md#knn).
  """
  sets = tuple(params) if isinstance(params, (tuple, list)) else (params,)

  def fn(x):
    feats = [feature_fn(p, frozen, x) for p in sets]
    if len(feats) == 1:
      return feats[0]
    return jnp.concatenate([f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
                            for f in feats], -1)

  tr = extract_features(fn, images_train, train_indices, preprocess, batch_size)
  te = extract_features(fn, images_test, test_indices, preprocess, batch_size)
  return knn_accuracy(tr, np.asarray(labels_train)[train_indices], te,
                      np.asarray(labels_test)[test_indices], k=k)
