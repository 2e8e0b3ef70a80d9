"""Prefix tuning for multi-head attention (Li & Liang 2021), in the LAE form, with a zero-init gate.

Prefix tuning prepends ``L`` learnable keys ``P_k`` and values ``P_v`` ([L, H, Dh] each) to the
keys and values of an attention layer. Per query (per head), with token logits
``s_j = q.k_j / sqrt(Dh)`` and prefix logits ``t_l = q.P_k,l / sqrt(Dh)``::

    Z_x = sum_j exp(s_j),   Z_p = sum_l exp(t_l),   lambda = Z_p / (Z_x + Z_p)
    A = sum_j softmax(s)_j v_j          (the frozen layer's attention output)
    F = sum_l softmax(t)_l P_v,l        (attention over the prefix alone)

    plain prefix tuning (joint softmax over [P_k; K]):   out = (1 - lambda) A + lambda F
    LAE "compensatory" prefix (gqk/LAE ``Prefix.compensate``, renormalises the prefix part of
    the joint softmax to sum to one):                     out = (1 - lambda) A + F

LAE's defaults, which this module follows: length 10 on ViT blocks 0-4, prefixes initialised
``U(0, 0.01)``, each multiplied by a learnable scalar (``prefix_key_scale``,
``prefix_value_scale``, init 1; LAE's ``Scaler(None)``), compensation on.

**Zero-init gate (our addition; the choice made for "zero-initialised PEFT leaves the output
unchanged").** Zero prefixes do NOT leave attention unchanged: a zero key has logit 0 and still
takes ``lambda = L / (Z_x + L) > 0`` of the mass, and LAE's uniform init changes the output too.
We therefore add a learnable scalar gate ``g`` (``prefix_gate``) that interpolates linearly
between the frozen attention and the prefix attention above::

    out = A + g * (prefix_out - A)
        = (1 - g lambda) A + g F            (compensatory, default)
        = (1 - g lambda) A + g lambda F     (plain)

``g = 1`` is exactly LAE's (resp. plain) prefix tuning; ``g = 0`` is exactly the frozen layer, for
any prefix values (``1 - 0 = 1`` and ``0 * F = 0`` in floating point, so the equality is bitwise
up to XLA's fusion choices). The default ``gate_init = 0.0`` makes the model start exactly at the
pretrained one, in the spirit of LLaMA-Adapter's zero-init attention gating and of LoRA's ``B = 0``;
``gate_init = None`` removes the gate (``g = 1`` fixed: LAE verbatim). Consequence of ``g = 0``: at
the very first step only ``g`` receives a gradient (``dL/dg = <dL/dout, F - lambda A>``), exactly
like LoRA's ``A`` or an adapter's down-projection; from the second step on every prefix leaf
trains. The gate is linear (no sigmoid/tanh), so the gradient at 0 is not damped and no
division by ``1 - lambda`` ever happens (numerically safe when the prefix dominates).

Trainable leaves per attention layer (every name contains ``prefix``)::

    prefix_key [L, H, Dh]  prefix_value [L, H, Dh]  prefix_key_scale []  prefix_value_scale []
    prefix_gate []

i.e. ``2 L D + 2 + 1`` with ``D = H * Dh`` (:func:`prefix_param_count`).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["Prefix", "prefix_attention", "dot_product_attention", "prefix_param_count"]


def prefix_param_count(length: int, num_heads: int, head_dim: int, *, learnable_scale: bool = True,
                       gate: bool = True) -> int:
  """Closed-form number of trainable scalars of one :class:`Prefix`."""
  return (2 * length * num_heads * head_dim + (2 if learnable_scale else 0) + (1 if gate else 0))


def _logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """``q [B,Q,H,Dh], k [B,K,H,Dh] -> [B,H,Q,K]`` float32 logits scaled by ``Dh^-1/2``."""
  scale = q.shape[-1] ** -0.5
  return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          ) -> Tuple[jax.Array, jax.Array]:
  """Softmax attention (softmax in float32).

  Args:
    q: ``[B, Q, H, Dh]`` queries; k, v: ``[B, K, H, Dh]``.

  Returns:
    ``(out [B, Q, H, Dh] in v's dtype, weights [B, H, Q, K] float32)``; the weights are dead code
    under ``jit`` unless used.
  """
  w = jax.nn.softmax(_logits(q, k), axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", w.astype(v.dtype), v)
  return out, w


def prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, prefix_key: jax.Array,
                     prefix_value: jax.Array, gate: jax.Array | float = 1.0, *,
                     compensatory: bool = True) -> Tuple[jax.Array, jax.Array]:
  """Gated prefix attention (module docstring): ``out = (1 - g lambda) A + g F`` (compensatory)
  or ``(1 - g lambda) A + g lambda F`` (plain; ``g = 1`` is the joint softmax over ``[P_k; K]``).

  Args:
    q: ``[B, Q, H, Dh]``; k, v: ``[B, K, H, Dh]``.
    prefix_key, prefix_value: ``[L, H, Dh]`` (shared by the batch).
    gate: scalar ``g``.
    compensatory: LAE's renormalised prefix (True) or plain prefix tuning (False).

  Returns:
    ``out [B, Q, H, Dh]`` and the effective attention weights ``[B, H, Q, L + K]`` (prefix keys
    first): ``w_p softmax(t)`` then ``(1 - g lambda) softmax(s)``, with ``w_p = g`` (compensatory)
    or ``g lambda`` (plain). Plain with ``g = 1``: rows sum to one.
  """
  s = _logits(q, k)                                               # [B,H,Q,K]
  t = jnp.einsum("bqhd,lhd->bhql", q, prefix_key.astype(q.dtype),
                 preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5  # [B,H,Q,L]
  a_s = jax.nn.softmax(s, axis=-1)
  a_t = jax.nn.softmax(t, axis=-1)
  lam = jax.nn.sigmoid(jax.nn.logsumexp(t, -1, keepdims=True)
                       - jax.nn.logsumexp(s, -1, keepdims=True))  # Z_p / (Z_x + Z_p), [B,H,Q,1]
  g = jnp.asarray(gate, jnp.float32)
  w_x = 1.0 - g * lam
  w_p = g if compensatory else g * lam
  A = jnp.einsum("bhqk,bkhd->bqhd", a_s.astype(v.dtype), v)
  F = jnp.einsum("bhql,lhd->bqhd", a_t.astype(v.dtype), prefix_value.astype(v.dtype))
  to_bqh = lambda w: jnp.moveaxis(jnp.broadcast_to(w, lam.shape), 1, 2)  # [B,Q,H,1]
  out = to_bqh(w_x).astype(v.dtype) * A + to_bqh(w_p).astype(v.dtype) * F
  weights = jnp.concatenate([w_p * a_t, w_x * a_s], axis=-1)
  return out, weights


class Prefix(nn.Module):
  """The prefix parameters of one attention layer; ``__call__() -> (P_k, P_v, g)``.

  Attributes:
    num_heads, head_dim: ``H`` and ``Dh`` of the attention layer.
    length: number of prefix tokens ``L`` (paper: 10).
    init_max: prefixes start ``U(0, init_max)`` (LAE: 0.01).
    learnable_scale: multiply ``P_k``/``P_v`` by learnable scalars (init 1; LAE).
    gate_init: initial gate ``g`` (0.0: exact identity at init); ``None``: no gate (``g = 1``).
    compensatory: LAE's compensated prefix (read by the attention layer, not here).
  """

  num_heads: int
  head_dim: int
  length: int = 10
  init_max: float = 0.01
  learnable_scale: bool = True
  gate_init: Optional[float] = 0.0
  compensatory: bool = True

  @nn.compact
  def __call__(self) -> Tuple[jax.Array, jax.Array, Any]:
    shape = (self.length, self.num_heads, self.head_dim)
    init = nn.initializers.uniform(scale=self.init_max)  # U(0, init_max)
    pk = self.param("prefix_key", init, shape, jnp.float32)
    pv = self.param("prefix_value", init, shape, jnp.float32)
    if self.learnable_scale:
      pk = pk * self.param("prefix_key_scale", nn.initializers.ones, (), jnp.float32)
      pv = pv * self.param("prefix_value_scale", nn.initializers.ones, (), jnp.float32)
    if self.gate_init is None:
      gate = 1.0
    else:
      gate = self.param("prefix_gate", nn.initializers.constant(self.gate_init), (), jnp.float32)
    return pk, pv, gate
