"""Linearized networks for DLCFT (DLCFT eqs. (6), (7), (22), App. B;
methods.md#linearization).

First-order Taylor expansion of a network in its parameters around the pretrained point
``theta_0`` (eq. 22)::

  f_lin(x; theta) = f(x; theta_0) + J_theta f(x; theta_0) . (theta - theta_0)

computed with ONE ``jax.jvp`` (forward mode: primal and tangent pass together, like the paper's
"augmented forward propagation", App. B Table 4). No Jacobian is stored; the cost is about two
to three forward passes, and ``jax.grad`` of a loss of ``f_lin`` is reverse-over-forward. The
output is exactly linear (affine) in ``theta``; its Jacobian is ``J f(x; theta_0)`` for every
``theta``.

Models with BatchNorm must be linearized in eval mode (BN is then a fixed per-channel affine
map: ``apply_fn = module_apply_fn(module, variables)`` passes ``train=False`` and closes over
``batch_stats``), or with BN folded into the convs (:func:`fold_batchnorm`,
:func:`fold_batchnorm_module`). DLCFT uses LeakyReLU backbones
(:class:`cft_jax.models.resnet.ResNet` ``activation="leaky_relu"``): a ReLU's tangent is zero on
the negative side, so units that are off at ``theta_0`` never learn in the linearized model.

Two shapes of model:

- :func:`linearize`: the whole network (head included) is linearized; exactly linear in all
  parameters.
- :func:`linearize_features`: DLCFT's eqs. (6)-(7): the feature extractor is linearized,
  ``g_lin(x; psi) = g(x; psi_0) + J_psi g(x; psi_0) . (psi - psi_0)``, and an ordinary linear head
  is applied, ``f = g_lin W + b`` (Flax layout ``W [D, C]``). ``f`` is linear in ``psi`` for a
  fixed head and linear in ``(W, b)`` for fixed ``psi`` (bilinear jointly through ``W . J psi``).

Note on the paper's eq. (6): it writes ``D g . psi`` with ``psi`` the *offset* from ``psi_0``;
here parameters keep their natural meaning (``params0`` at the start, so the linearized model
equals the pretrained one) and the offset ``params - params0`` is formed inside.

Under ``jax.jit`` prefer :func:`linearized_apply` with ``params0`` as an argument: closures over
``params0`` (what :func:`linearize` returns) bake the pretrained weights into the compiled
program as constants.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from cft_jax.models.bn_fold import fold_batchnorm, fold_batchnorm_module  # re-exported
from cft_jax.peft import HEAD, merge_params
from cft_jax.schema import Key

PyTree = Any
ApplyFn = Callable[..., Any]

__all__ = ["CONFIG_KEYS", "LINEARIZE_MODES", "linearize_mode", "linearize", "linearized_apply",
           "linearize_features", "linearized_features_apply", "make_forward", "module_apply_fn",
           "split_head", "fold_batchnorm", "fold_batchnorm_module"]


LINEARIZE_MODES = ("none", "full", "features")

# The key of the ``model`` section this module reads (:mod:`cft_jax.registry` appends it to the
# backbone family's keys, :data:`cft_jax.models.CONFIG_KEYS`).
CONFIG_KEYS = (
    Key("linearize", "none", "DLCFT: none | full (whole network) | features (eqs. 6-7)",
        choices=LINEARIZE_MODES),
)


def linearize_mode(value: Any) -> Optional[str]:
  """Normalises ``config.model.linearize`` to ``None``, ``"full"`` or ``"features"``.

  ``"none"`` / ``""`` / ``False`` / ``None``: the network itself; ``"full"`` / ``True``: the whole
  network (head included) linearized around ``theta_0`` (:func:`linearized_apply`);
  ``"features"``: DLCFT's eqs. 6-7, a linearized feature extractor under an ordinary linear head
  (:func:`linearized_features_apply`).

  Raises:
    ValueError: any other value (the message lists the accepted ones).
  """
  if value is None or value is False or value in ("", "none"):
    return None
  if value is True or value == "full":
    return "full"
  if value == "features":
    return "features"
  raise ValueError(f"model.linearize={value!r}; choose one of {list(LINEARIZE_MODES)}")


def _delta(params: PyTree, params0: PyTree) -> PyTree:
  """``params - params0`` leaf-wise, cast to the dtype of ``params0`` (the jvp tangent dtype)."""
  try:
    return jax.tree_util.tree_map(lambda p, p0: jnp.asarray(p - p0, jnp.asarray(p0).dtype),
                                  params, params0)
  except ValueError as e:  # structure mismatch
    raise ValueError("params and params0 must have the same tree structure "
                     f"(linearized models keep the pretrained parameter tree): {e}") from None


def linearized_apply(apply_fn: ApplyFn, params0: PyTree, params: PyTree, *args, **kwargs):
  """``f(params0, *args) + J f(params0, *args) . (params - params0)`` with one ``jax.jvp``.

  Args:
    apply_fn: ``apply_fn(params, *args, **kwargs) -> pytree of arrays`` (e.g. logits ``[B, C]``);
      must be differentiable in ``params`` and deterministic (eval mode).
    params0: expansion point ``theta_0`` (pytree).
    params: current parameters, same tree as ``params0``.
    *args, **kwargs: inputs of ``apply_fn`` (not differentiated).

  Returns:
    The linearized output, same structure/shapes as ``apply_fn``'s.
  """
  fn = lambda p: apply_fn(p, *args, **kwargs)
  y0, dy = jax.jvp(fn, (params0,), (_delta(params, params0),))
  return jax.tree_util.tree_map(jnp.add, y0, dy)


def linearize(apply_fn: ApplyFn, params0: PyTree) -> ApplyFn:
  """``apply_lin(params, *args, **kwargs)``: the linearization of ``apply_fn`` at ``params0``.

  ``apply_lin(params0, x) == apply_fn(params0, x)``; ``apply_lin(params0 + a d, x) ==
  apply_fn(params0, x) + a J d`` for every scalar ``a`` (exactly linear in ``params``). See
  :func:`linearized_apply`.

  Example::

    apply_fn = module_apply_fn(module, variables)     # BN in eval mode
    apply_lin = linearize(apply_fn, variables['params'])
    logits = apply_lin(params, images)                # [B, C]
  """

  def apply_lin(params, *args, **kwargs):
    return linearized_apply(apply_fn, params0, params, *args, **kwargs)

  return apply_lin


def module_apply_fn(module, variables: Dict[str, Any], **call_kwargs) -> ApplyFn:
  """``apply_fn(params, x, **kw)``: ``module.apply`` in eval mode with the non-param collections.

  Every collection other than ``'params'`` (e.g. ``batch_stats``) is closed over as a constant,
  and ``train=False`` is passed unless ``call_kwargs`` says otherwise, so BN is an affine op.
  """
  rest = {k: v for k, v in variables.items() if k != "params"}
  call_kwargs = {"train": False, **call_kwargs}

  def apply_fn(params, *args, **kwargs):
    return module.apply({"params": params, **rest}, *args, **{**call_kwargs, **kwargs})

  return apply_fn


def split_head(params: Dict[str, Any], head_key: str = HEAD) -> Tuple[Dict[str, Any], Any]:
  """``(backbone, head)``: the top-level ``head_key`` subtree and everything else.

  Raises:
    KeyError: no ``head_key`` at the top level.
  """
  if head_key not in params:
    raise KeyError(f"no top-level '{head_key}' in params (keys: {sorted(params)})")
  return {k: v for k, v in params.items() if k != head_key}, params[head_key]


def linearized_features_apply(feature_fn: ApplyFn, params0: Dict[str, Any],
                              params: Dict[str, Any], *args, head_key: str = HEAD, **kwargs):
  """DLCFT model (eqs. 6-7): ``g_lin(x; psi) W + b``.

  Args:
    feature_fn: ``feature_fn(backbone_params, *args, **kwargs) -> features [B, D]`` (e.g.
      ``module_apply_fn(module, variables, return_features=True)``; a Flax module ignores the
      missing head because it is never called).
    params0: pretrained parameters (their backbone part is the expansion point ``psi_0``; their
      head is unused).
    params: current parameters: backbone ``psi`` plus ``params[head_key] = {'kernel': W [D, C],
      'bias': b [C]}``.
    *args, **kwargs: inputs of ``feature_fn``.
    head_key: top-level key of the head.

  Returns:
    Logits ``[B, C]``.
  """
  psi0, _ = split_head(params0, head_key)
  psi, head = split_head(params, head_key)
  z = linearized_apply(feature_fn, psi0, psi, *args, **kwargs)
  out = z @ head["kernel"]
  if "bias" in head:
    out = out + head["bias"]
  return out


def linearize_features(feature_fn: ApplyFn, params0: Dict[str, Any],
                       head_key: str = HEAD) -> ApplyFn:
  """Returns ``apply(params, *args, **kwargs)`` of :func:`linearized_features_apply`.

  The parameter tree is the model's own (backbone leaves + top-level ``head``), so PEFT
  splitting, checkpoints and the curvature code address it as usual.
  """

  def apply(params, *args, **kwargs):
    return linearized_features_apply(feature_fn, params0, params, *args, head_key=head_key,
                                     **kwargs)

  return apply


def make_forward(apply_fn: Callable, linearized: Any = None) -> Callable:
  """``forward(params, frozen, x, train, rng) -> logits [B, C]`` of the (optionally linearized) model.

  ``frozen`` holds the frozen parameter subtree (``frozen['params']``), the other variable
  collections (``frozen['collections']``, e.g. BatchNorm statistics) and, for a linearized model,
  the expansion point of the trainable leaves (``frozen['params0']``). ``linearized`` (see
  :func:`cft_jax.linearize.linearize_mode`): ``None``/``False`` the network itself;
  ``"full"``/``True`` ``f(theta_0, x) + J f(theta_0, x) (theta - theta_0)`` with one ``jax.jvp``
  in eval mode; ``"features"`` DLCFT's eqs. 6-7, ``g_lin(x; psi) W + b``: the trainable backbone
  leaves enter through the jvp of the pooled features (``apply_fn(..., return_features=True)``)
  and the top-level ``head`` (``kernel [D, C]``, ``bias [C]``) is an ordinary linear layer
  (docs/methods.md#linearization). Re-exported by :mod:`cft_jax.steps`.

  Raises:
    ValueError: unknown ``linearized`` mode.
  """
  mode = linearize_mode(linearized)

  def forward(params, frozen, x, train=False, rng=None):
    def f(p, **kw):
      variables = dict(frozen["collections"], params=merge_params(p, frozen["params"]))
      if train and mode is None and rng is not None:
        out = apply_fn(variables, x, train=True, rngs={"dropout": rng}, **kw)
      else:
        out = apply_fn(variables, x, train=False, **kw)
      # Losses, softmax and curvature statistics in float32 whatever the compute dtype.
      return out.astype(jnp.float32) if jnp.issubdtype(out.dtype, jnp.floating) else out

    if mode == "full":
      return linearized_apply(f, frozen["params0"], params)
    if mode == "features":
      return linearized_features_apply(lambda p: f(p, return_features=True),
                                       frozen["params0"], params)
    return f(params)

  return forward
