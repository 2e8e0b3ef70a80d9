"""K-FAC, TK-FAC, the Kronecker quadratic penalty and the class-IL head extension (methods.md#kfac).

Per layer ``l`` with pre-activations ``s = W a`` (math layout: ``W [out, in]``, ``a`` the input
with a trailing 1 when the layer has a bias, so ``[W | b]`` is ``[out, in + 1]``) the per-example
gradient is ``dW = g a^T`` with ``g = dl/ds``; with the column-major ``vec`` the Fisher block is
(paper eq. 1)::

  F_l = E[vec(dW) vec(dW)^T] = E[(a a^T) (x) (g g^T)]  ~  A (x) G,
  A = E[a a^T]  [in', in'],      G = E[g g^T]  [out, out]

(the paper writes ``g (x) a`` for the row-major ``vec``; same matrix up to the permutation).
``g`` is obtained by backpropagating the logit cotangents ``q`` of
:func:`cft_jax.curvature.fisher.output_cotangents` (``fisher_type="mc"`` samples labels from the
model: the true Fisher; ``"exact"``/``"empirical"`` as documented there).

Convolutions: the "KFC" approximation (Grosse & Martens 2016). A conv is a dense layer applied
to the patches ``a_t`` (``in' = C_in * kh * kw (+1)``, feature order ``(c_in, kh, kw)`` as given by
``lax.conv_general_dilated_patches``) at every output position ``t`` (``T`` positions), and
``dW = sum_t g_t a_t^T``. Assuming spatially uncorrelated derivatives and spatial homogeneity,
``F_l ~ Omega (x) Gamma`` with ``A = Omega = E[(1/T) sum_t a_t a_t^T]`` (spatial MEAN) and
``G = Gamma = E[sum_t g_t g_t^T]`` (spatial SUM). A ``Dense`` applied to ``[B, ..., in]`` is
treated the same way (positions = the middle axes).

TK-FAC (Gao et al. 2020, trace-restricted K-FAC): ``F_l ~ s A (x) G`` with
``s = tr(F_l) / (tr(A) tr(G))``, so that ``tr(s A (x) G) = tr(F_l)`` exactly; ``tr(F_l) =
E sum_k ||vec(dW_k)||^2`` is accumulated from the same per-example gradients (for a dense layer
``||g a^T||^2 = (a^T a)(g^T g)``), stored in :attr:`LayerFactors.fisher_trace`.

Penalty (eq. 10 with ``H`` block-diagonal): ``sum_l 1/2 s_l vec(V_l)^T (A_l (x) G_l) vec(V_l) =
sum_l 1/2 s_l tr(V_l^T G_l V_l A_l)`` with ``V_l = [W | b] - [W* | b*]`` in the math layout
``[out, in']``. Flax kernels are ``[in, out]`` (dense) / ``[kh, kw, in, out]`` (conv), so the code
builds ``M = V^T [in', out]`` (:func:`layer_matrix`: conv kernels transposed to
``[in, kh, kw, out]`` and flattened to match the patch order, bias appended as the last row) and
evaluates ``tr(M G M^T A) = sum((A M) * (M G))``. ``s_l = 1`` for K-FAC.

Gathering ``a`` and ``g`` from an unmodified Flax model: :func:`kfac_factors` wraps
``apply_fn`` in ``flax.linen.intercept_methods``; every ``nn.Dense`` / ``nn.Conv`` call (the
default :func:`default_layer_filter`; grouped/depthwise convs are skipped) records its input and
adds a zero "perturbation" to its output, so ``vjp`` w.r.t. the perturbations is ``dl/ds`` (the
mechanism of ``nn.Module.perturb``, without needing a ``perturbations`` collection, so any
``apply_fn(params, x)`` closure works). Layers are keyed by their module path (a tuple of names,
e.g. ``('layer1_0', 'conv1')`` or ``('head',)``), which is also where their ``kernel``/``bias``
live in ``params``. A layer called twice (weight sharing) raises.

Linearized models (:mod:`cft_jax.linearize`): the Jacobian of ``linearize(f, theta_0)`` is
``J f(theta_0)`` for every ``theta``: :func:`kfac_factors_linearized` taps ``f`` at ``theta_0``
and takes the output cotangents at the linearized logits ``f_lin(x; theta)``. For DLCFT's
``g_lin W + b`` (eqs. 6-7) use :func:`kfac_factors_linearized_features`.

Not used: ``kfac-jax`` (DeepMind). Version 0.0.8 (the newest on PyPI) imports ``distrax`` ->
``tensorflow_probability.substrates.jax`` (0.25.0), which fails to import under jax 0.10.2
(``jax.interpreters.xla.pytype_aval_mappings`` was removed). It is also built around its own
optimizer and jaxpr pattern-matching of registered losses (``register_*_loss``) rather than
factor extraction from an existing Flax apply function, so the class-IL head extension, per-task
factor averaging and the linearized-feature factors would have to be rebuilt on top anyway.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import linear as flax_linear

from cft_jax.curvature.fisher import (_check, _float, accumulate, cached_batch_fn,
                                      output_cotangents)
from cft_jax.linearize import linearized_apply, split_head
from cft_jax.peft import HEAD
from cft_jax.peft.lora import LoRADense

PyTree = Any
Array = jax.Array
Path = Tuple[str, ...]
_HI = jax.lax.Precision.HIGHEST


class LayerFactors(NamedTuple):
  """K-FAC factors of one layer (a pytree; averaged/stored like any params).

  Attributes:
    A: input factor ``E[a a^T]`` ``[in', in']`` (``in' = in + 1`` with a bias; conv: spatial mean
      over patches, ``in = C_in * kh * kw``).
    G: output-gradient factor ``E[g g^T]`` ``[out, out]`` (conv: spatial sum).
    fisher_trace: scalar ``tr(F_l)`` of the exact Fisher block (for TK-FAC).
  """

  A: Array
  G: Array
  fisher_trace: Array


class _LayerInfo(NamedTuple):
  kind: str  # "dense" | "conv"
  use_bias: bool
  kernel_size: Tuple[int, ...] = ()
  strides: Tuple[int, ...] = ()
  padding: Any = None
  input_dilation: Tuple[int, ...] = ()
  kernel_dilation: Tuple[int, ...] = ()


def default_layer_filter(module: nn.Module) -> bool:
  """``nn.Dense``, ungrouped ``nn.Conv`` and rank-0 :class:`~cft_jax.peft.lora.LoRADense`.

  A rank-0 ``LoRADense`` (EfficientNet-Lite's 1x1 convs when LoRA is off) is a dense layer on the
  last axis with ``kernel [in, out]``; with ``rank > 0`` its trainable leaves are the LoRA
  factors, which have no Kronecker form here (the diagonal fallback covers them). Depthwise and
  grouped convs have no K-FAC form here either.
  """
  if isinstance(module, nn.Dense):
    return True
  if isinstance(module, LoRADense):
    return module.rank <= 0
  if isinstance(module, nn.Conv) and not isinstance(module, nn.ConvTranspose):
    return module.feature_group_count == 1 and module.padding not in ("CIRCULAR", "CAUSAL")
  return False


def _tuple(v, n: int) -> Tuple[int, ...]:
  if v is None:
    return (1,) * n
  if isinstance(v, int):
    return (v,) * n
  return tuple(v)


def _layer_info(module: nn.Module, x: Array) -> _LayerInfo:
  if isinstance(module, (nn.Dense, LoRADense)):
    return _LayerInfo("dense", bool(module.use_bias))
  n = x.ndim - 2
  ks = _tuple(module.kernel_size, n)
  padding = flax_linear.canonicalize_padding(module.padding, n)
  if not isinstance(padding, str):
    padding = tuple(tuple(p) for p in padding)
  return _LayerInfo("conv", bool(module.use_bias), ks, _tuple(module.strides, n), padding,
                    _tuple(module.input_dilation, n), _tuple(module.kernel_dilation, n))


def _tap_forward(apply_fn, params, x, perturbations, layer_filter, infos: Dict[Path, Any]):
  """Runs ``apply_fn(params, x)`` recording layer inputs (and perturbing layer outputs).

  Returns:
    ``(output, {path: input}, {path: layer output})``; ``infos`` is filled with static layer info.
  """
  inputs: Dict[Path, Array] = {}
  outputs: Dict[Path, Array] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not layer_filter(module):
      return next_fun(*args, **kwargs)
    path = tuple(module.path)
    if path in inputs:
      raise ValueError(f"layer {path} is called more than once (weight sharing): K-FAC here "
                       "needs one call per layer; exclude it with layer_filter")
    x_in = args[0] if args else kwargs["inputs"]
    out = next_fun(*args, **kwargs)
    inputs[path] = x_in
    infos[path] = _layer_info(module, x_in)
    if perturbations is not None:
      out = out + perturbations[path].astype(out.dtype)
    outputs[path] = out
    return out

  with nn.intercept_methods(interceptor):
    y = apply_fn(params, x)
  return y, inputs, outputs


def _activations(x: Array, info: _LayerInfo) -> Array:
  """Layer inputs as ``a [B, T, in']`` (patches for convs; a trailing 1 for a bias)."""
  x = _float(x)
  if info.kind == "conv":
    n = len(info.kernel_size)
    sp = "DHW"[-n:] if n <= 3 else None
    if sp is None:
      raise NotImplementedError("convs with more than 3 spatial dims")
    x = jax.lax.conv_general_dilated_patches(
        x, info.kernel_size, info.strides, info.padding, lhs_dilation=info.input_dilation,
        rhs_dilation=info.kernel_dilation,
        dimension_numbers=("N" + sp + "C", sp + "IO", "N" + sp + "C"), precision=_HI)
  a = x.reshape(x.shape[0], -1, x.shape[-1])
  if info.use_bias:
    a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
  return a


def _layer_sums(a: Array, g: Array, w: Array) -> LayerFactors:
  """Weighted sums for one batch. ``a [B, T, in']``, ``g [K, B, T, out]``, ``w [B]``."""
  t = a.shape[1]
  g = _float(g)
  w = w.astype(a.dtype)
  A = jnp.einsum("b,bti,btj->ij", w, a, a, precision=_HI) / t
  G = jnp.einsum("b,kbti,kbtj->ij", w, g, g, precision=_HI)
  din, dout = a.shape[-1], g.shape[-1]
  if t == 1:  # ||g a^T||^2 = (a.a)(g.g)
    per = jnp.sum(a[:, 0] ** 2, -1)[None] * jnp.sum(g[:, :, 0] ** 2, -1)
  elif t * t <= din * dout:  # sum_{t,t'} (a_t.a_t')(g_t.g_t')
    per = jnp.einsum("bts,kbts->kb", jnp.einsum("bti,bsi->bts", a, a, precision=_HI),
                     jnp.einsum("kbto,kbso->kbts", g, g, precision=_HI), precision=_HI)
  else:  # explicit per-example gradients sum_t a_t g_t^T
    per = jnp.sum(jnp.einsum("bti,kbto->kbio", a, g, precision=_HI) ** 2, axis=(-2, -1))
  return LayerFactors(A, G, jnp.einsum("b,kb->", w, per))


def _tapped_layer_sums(fn, params, x: Array, w: Array, layer_filter, infos: Dict[Path, Any],
                       cotangents: Callable[[Array], Array]) -> Dict[Path, LayerFactors]:
  """Per-layer K-FAC sums of one batch: runs ``fn(params, x)`` with its K-FAC layers tapped,
  backpropagates ``cotangents(output) [K, B, ...]`` to every layer output (one vjp per ``K``) and
  returns ``{path: _layer_sums(a, g, w)}``."""
  _, _, outs = jax.eval_shape(
      lambda p, xx: _tap_forward(fn, p, xx, None, layer_filter, infos), params, x)
  pert0 = {k: jnp.zeros(v.shape, v.dtype) for k, v in outs.items()}

  def fwd(pert):
    y, ins, _ = _tap_forward(fn, params, x, pert, layer_filter, infos)
    return y, ins

  y, vjp_fn, ins = jax.vjp(fwd, pert0, has_aux=True)
  q = cotangents(y)
  gs = jax.vmap(lambda c: vjp_fn(c.astype(y.dtype))[0])(q)
  out = {}
  for path, x_in in ins.items():
    a = _activations(x_in, infos[path])
    g = gs[path].reshape(q.shape[0], a.shape[0], a.shape[1], -1)
    out[path] = _layer_sums(a, g, w)
  return out


def kfac_factors(apply_fn: Callable[[PyTree, Array], Array], params: PyTree, batches: Iterable,
                 *, loss: str, fisher_type: str = "mc", rng: Optional[Array] = None,
                 num_samples: int = 1, mse_alpha: float = 15.0,
                 layer_filter: Callable[[nn.Module], bool] = default_layer_filter,
                 jit_cache: Optional[dict] = None) -> Dict[Path, LayerFactors]:
  """K-FAC factors ``{layer_path: LayerFactors(A, G, fisher_trace)}`` of a Flax model.

  Args:
    apply_fn: ``apply_fn(params, x [B, ...]) -> logits [B, C]``, calling Flax modules
      (e.g. :func:`cft_jax.linearize.module_apply_fn`); deterministic, eval-mode BN (examples
      must not interact).
    params: parameters the model is evaluated at.
    batches: iterable of ``(x, y)`` / ``(x, y, mask)`` (see :mod:`cft_jax.curvature.fisher`).
    loss: ``"ce"`` or ``"mse"``.
    fisher_type: ``"mc"`` (sampled labels: the true Fisher), ``"exact"`` or ``"empirical"``.
    rng: PRNG key for ``"mc"``.
    num_samples: label samples per example for ``"mc"``.
    mse_alpha: MSE target scale (``"empirical"`` only).
    layer_filter: which intercepted modules are K-FAC layers.
    jit_cache: reuse the compiled per-batch function of an earlier call with the same
      ``apply_fn`` and ``layer_filter`` (:func:`cft_jax.curvature.fisher.cached_batch_fn`).

  Returns:
    Factors averaged over examples; keys are module paths (= param paths of ``kernel``/``bias``).

  Raises:
    ValueError: bad loss/fisher_type, ``"mc"`` without rng, no examples or no layers, a layer
      called twice.
  """
  _check(loss, fisher_type, rng)

  def build():
    infos: Dict[Path, _LayerInfo] = {}

    @jax.jit
    def batch_fn(params, x, y, w, key):
      return _tapped_layer_sums(
          apply_fn, params, x, w, layer_filter, infos,
          lambda logits: output_cotangents(logits, y, loss=loss, fisher_type=fisher_type,
                                           rng=key, num_samples=num_samples,
                                           mse_alpha=mse_alpha))
    return batch_fn

  batch_fn = cached_batch_fn(jit_cache, ("kfac", loss, fisher_type, num_samples, mse_alpha),
                            build)
  return accumulate(batch_fn, params, batches, rng, what="K-FAC layers")


def kfac_factors_linearized(
    apply_fn: Callable[[PyTree, Array], Array], params0: PyTree, params: PyTree,
    batches: Iterable, *, loss: str, fisher_type: str = "mc", rng: Optional[Array] = None,
    num_samples: int = 1, mse_alpha: float = 15.0,
    layer_filter: Callable[[nn.Module], bool] = default_layer_filter,
    jit_cache: Optional[dict] = None) -> Dict[Path, LayerFactors]:
  """K-FAC of the linearized network ``f_lin(x; theta) = f(x; theta_0) + J f(x; theta_0)
  (theta - theta_0)`` (DLCFT, Shon et al., ECCV 2022, eq. 22) at ``params``.

  The Jacobian of ``f_lin`` is ``J f(theta_0)`` for every ``theta``, so the layer inputs ``a``
  and the backpropagation of the logit cotangents are those of ``f`` at ``params0``; the
  cotangents ``q`` themselves (:func:`cft_jax.curvature.fisher.output_cotangents`) are taken at
  the linearized logits ``f_lin(x; params)``, where the loss is evaluated. (At ``f(theta_0)``
  they would be right only for MSE with the MC or exact Fisher, whose output curvature does not
  depend on the logits.)

  Args:
    apply_fn: ``apply_fn(params, x [B, ...]) -> logits [B, C]`` (the NON-linearized network,
      eval mode).
    params0: the expansion point ``theta_0``.
    params: the current parameters ``theta`` (same tree).
    Others: as :func:`kfac_factors`.

  Returns:
    ``{path: LayerFactors}`` averaged over examples.
  """
  _check(loss, fisher_type, rng)

  def build():
    infos: Dict[Path, _LayerInfo] = {}

    @jax.jit
    def batch_fn(params_and_params0, x, y, w, key):
      params, params0 = params_and_params0  # params0 as an argument: not baked in
      z = linearized_apply(apply_fn, params0, params, x)
      q = output_cotangents(z, y, loss=loss, fisher_type=fisher_type, rng=key,
                            num_samples=num_samples, mse_alpha=mse_alpha)
      return _tapped_layer_sums(apply_fn, params0, x, w, layer_filter, infos, lambda _: q)
    return batch_fn

  batch_fn = cached_batch_fn(jit_cache, ("kfac_linearized", loss, fisher_type, num_samples,
                                         mse_alpha), build)
  return accumulate(batch_fn, (params, params0), batches, rng, what="K-FAC layers")


def kfac_factors_linearized_features(
    feature_fn: Callable[[PyTree, Array], Array], params0: Dict[str, Any],
    params: Dict[str, Any], batches: Iterable, *, loss: str = "mse", fisher_type: str = "mc",
    rng: Optional[Array] = None, num_samples: int = 1, mse_alpha: float = 15.0,
    head_key: str = HEAD, layer_filter: Callable[[nn.Module], bool] = default_layer_filter,
    jit_cache: Optional[dict] = None) -> Dict[Path, LayerFactors]:
  """K-FAC of DLCFT's model ``f = g_lin(x; psi) W + b`` (eqs. 6-7) at ``params``.

  The per-example gradient of ``f`` w.r.t. a feature layer's weights is ``g a^T`` with ``a`` the
  layer input of the NONLINEAR extractor at ``psi_0`` and ``g`` the backpropagation of
  ``W^T q`` through ``g(.; psi_0)`` (the tangent network shares ``J g(psi_0)``); the head's is
  ``q [g_lin(x; psi), 1]^T``. So factors are gathered on ``feature_fn`` at ``psi_0`` with
  cotangents ``q W^T`` and, for ``head_key``, from ``a = [g_lin, 1]``, ``g = q``.

  Args:
    feature_fn: ``feature_fn(backbone_params, x) -> features [B, D]`` (Flax modules inside).
    params0: pretrained parameters (backbone = ``psi_0``).
    params: current ``{backbone psi, head_key: {'kernel' [D, C], 'bias' [C]}}``.
    Others: as :func:`kfac_factors`.

  Returns:
    ``{path: LayerFactors}`` for the backbone layers and ``(head_key,)``.
  """
  _check(loss, fisher_type, rng)
  psi0, _ = split_head(params0, head_key)

  def build():
    infos: Dict[Path, _LayerInfo] = {}

    @jax.jit
    def batch_fn(params_and_psi0, x, y, w, key):
      params, psi0 = params_and_psi0  # psi0 as an argument: not baked into the program
      psi, head = split_head(params, head_key)
      z = linearized_apply(feature_fn, psi0, psi, x)
      has_bias = "bias" in head
      logits = z @ head["kernel"] + (head["bias"] if has_bias else 0.0)
      q = output_cotangents(logits, y, loss=loss, fisher_type=fisher_type, rng=key,
                            num_samples=num_samples, mse_alpha=mse_alpha)
      # backbone layers: taps of g(.; psi_0), cotangents q W^T on its features
      out = _tapped_layer_sums(
          feature_fn, psi0, x, w, layer_filter, infos,
          lambda _: jnp.einsum("kbc,dc->kbd", q, _float(head["kernel"]), precision=_HI))
      a_head = _activations(z, _LayerInfo("dense", has_bias))
      out[(head_key,)] = _layer_sums(a_head, q[:, :, None, :], w)
      return out
    return batch_fn

  batch_fn = cached_batch_fn(jit_cache, ("kfac_features", loss, fisher_type, num_samples,
                                         mse_alpha, head_key), build)
  return accumulate(batch_fn, (params, psi0), batches, rng, what="K-FAC layers")


# ------------------------------------------------------------------------------------------
# Penalty, TK-FAC, averaging, class-IL extension.
# ------------------------------------------------------------------------------------------


def _get(tree: PyTree, path: Path) -> Any:
  node = tree
  for p in path:
    if p not in node:
      raise KeyError(f"no '{p}' while looking up layer {path} in params")
    node = node[p]
  return node


def layer_matrix(layer: Dict[str, Array], with_bias: Optional[bool] = None) -> Array:
  """``M = [W | b]^T`` ``[in', out]`` from a Flax dense/conv layer's ``{'kernel', 'bias'}``.

  Dense ``kernel [in, out]`` is used as is; conv ``kernel [kh, kw, C_in, out]`` becomes
  ``[C_in * kh * kw, out]`` in the ``(c_in, kh, kw)`` order of the patches; ``bias [out]`` is
  appended as the last row when present (``with_bias`` forces its use/omission).
  """
  k = _float(layer["kernel"])
  if k.ndim > 2:
    nsp = k.ndim - 2
    k = jnp.moveaxis(k, nsp, 0).reshape(-1, k.shape[-1])
  use_bias = ("bias" in layer) if with_bias is None else with_bias
  if use_bias:
    k = jnp.concatenate([k, _float(layer["bias"])[None]], axis=0)
  return k


def tkfac_scale(f: LayerFactors) -> Array:
  """TK-FAC scale ``s = tr(F) / (tr(A) tr(G))`` (Gao et al. 2020); 0 when ``tr(A) tr(G) = 0``."""
  denom = jnp.trace(f.A) * jnp.trace(f.G)
  return jnp.where(denom > 0, f.fisher_trace / jnp.where(denom > 0, denom, 1.0), 0.0)


def layer_penalty(layer: Dict[str, Array], anchor: Dict[str, Array], f: LayerFactors,
                  trace_correction: bool = False) -> Array:
  """``1/2 s tr(V^T G V A)`` for one layer, ``V = [W | b] - [W* | b*]`` (math layout).

  Raises:
    ValueError: factor sizes that do not match the layer.
  """
  with_bias = f.A.shape[0] == layer_matrix(layer, with_bias=False).shape[0] + 1
  m = layer_matrix(layer, with_bias) - layer_matrix(anchor, with_bias)
  if m.shape != (f.A.shape[0], f.G.shape[0]):
    raise ValueError(f"layer matrix {m.shape} does not match A {f.A.shape} / G {f.G.shape}")
  val = 0.5 * jnp.sum(jnp.matmul(f.A, m, precision=_HI) * jnp.matmul(m, f.G, precision=_HI))
  return val * tkfac_scale(f) if trace_correction else val


def kfac_penalty(params: PyTree, anchor: PyTree, factors: Dict[Path, LayerFactors], *,
                 trace_correction: bool = False) -> Array:
  """``sum_l 1/2 s_l tr(V_l^T G_l V_l A_l)`` over the layers of ``factors`` (eq. 10, K-FAC H).

  Args:
    params: current parameters (nested dict; layers looked up by path).
    anchor: ``theta_{t-1}``, same layout.
    factors: ``{path: LayerFactors}``; drop keys to leave layers unregularised (task-IL: the
      per-task heads).
    trace_correction: False: K-FAC (``s = 1``); True: TK-FAC (``s = tkfac_scale``).

  Returns:
    Scalar (no ``(t-1)/t`` weight; the method applies eq. 11).
  """
  total = jnp.zeros((), jnp.float32)
  for path, f in factors.items():
    total = total + layer_penalty(_get(params, path), _get(anchor, path), f, trace_correction)
  return total


def tkfac_penalty(params: PyTree, anchor: PyTree, factors: Dict[Path, LayerFactors]) -> Array:
  """:func:`kfac_penalty` with the TK-FAC trace correction."""
  return kfac_penalty(params, anchor, factors, trace_correction=True)


def kronecker_matrix(f: LayerFactors, trace_correction: bool = False) -> Array:
  """Explicit ``s A (x) G`` ``[in' out, in' out]`` (column-major ``vec`` of ``[out, in']``).

  For tests and tiny layers only (quadratic memory).
  """
  k = jnp.kron(f.A, f.G)
  return k * tkfac_scale(f) if trace_correction else k


def average_factors(old: Optional[PyTree], new: PyTree, t: int) -> PyTree:
  """Running mean over tasks: ``((t-1) old + new) / t`` leaf-wise (DLCFT eqs. 3, 11).

  After task ``t`` (1-based) the curvature represents ``(1/t) sum_{i<=t} L_i`` (eq. 3), so the
  stored factors are the mean of the per-task factors: old and new weighted ``(t-1)/t`` and
  ``1/t`` *(our choice, docs/methods.md#quadratic-penalty)*. ``A``, ``G`` and
  ``fisher_trace`` are averaged separately (TK-FAC's ``s`` is recomputed from the means). Works
  for any pytree (diagonal Fisher / MAS too). ``old=None`` or ``t=1`` returns ``new``.

  Raises:
    ValueError: ``t < 1``.
  """
  if t < 1:
    raise ValueError(f"t counts tasks from 1, got {t}")
  if old is None or t == 1:
    return new
  return jax.tree_util.tree_map(lambda o, n: ((t - 1) * o + n) / t, old, new)


def extend_head_factors(f: LayerFactors, num_old: int, num_total: int) -> LayerFactors:
  """Class-IL head: curvature for new output units without old data (paper §3.3, eq. 13).

  With MSE the Hessian of the old tasks' loss w.r.t. a new unit's ``[w | b]`` (zero-initialised,
  targets 0 on old data) is ``E[z z^T] (x) I``, and ``E[z z^T]`` (with the bias 1) is the head's
  existing input factor ``A``. So ``G`` becomes ``blockdiag(G[:num_old, :num_old], I)``
  ``[num_total, num_total]`` (old-new cross terms are 0 since ``H_z = I``) and the exact trace
  grows by ``(num_total - num_old) tr(A)``. With K-FAC the new block is exactly ``A (x) I``; with
  TK-FAC the layer's ``s`` is re-fit over old and new units. Anchor the new units at zero
  (:func:`extend_head_anchor`).

  Works for a head that grows (``G`` is ``[num_old, num_old]``) and for a fixed-width head whose
  unseen units had no gradient (``G [num_total, num_total]`` with zero rows beyond ``num_old``).
  Old units must be the first ``num_old`` (contiguous class order). MSE only: under CE new units
  have no finite optimum (paper §3.3).

  Raises:
    ValueError: ``num_old`` larger than ``G`` or ``num_total < num_old``.
  """
  if num_old > f.G.shape[0] or num_total < num_old:
    raise ValueError(f"need num_old <= {f.G.shape[0]} and num_total >= num_old; "
                     f"got {num_old}, {num_total}")
  g = jnp.eye(num_total, dtype=f.G.dtype)
  g = g.at[:num_old, :num_old].set(f.G[:num_old, :num_old])
  return LayerFactors(f.A, g, f.fisher_trace + (num_total - num_old) * jnp.trace(f.A))


def extend_head_anchor(head: Dict[str, Array], num_old: int, num_total: int) -> Dict[str, Array]:
  """Head anchor for class-IL: old units kept, units ``num_old..num_total-1`` at zero.

  ``head = {'kernel' [D, C], 'bias' [C]}`` with ``C`` either ``num_old`` (padded) or
  ``num_total`` (fixed-width head; new columns zeroed).
  """
  out = {}
  for name, v in head.items():
    v = jnp.asarray(v)
    z = jnp.zeros(v.shape[:-1] + (num_total,), v.dtype)
    out[name] = z.at[..., :num_old].set(v[..., :num_old])
  return out
