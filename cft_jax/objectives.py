"""Classification objectives and annealing schedules (docs/methods.md#objectives).

Pure JAX. Every loss has the signature ``f(logits [B, C], labels [B] int, ...) -> [B]`` and
returns the per-example loss in float32 (inputs of any float dtype are cast to float32 first).
Reduction over the batch is left to the caller.

Notation (docs/methods.md#notation): ``z`` logits ``[B, C]``,
``p = softmax(z)``, ``y`` integer labels ``[B]``,
``p_y = p[b, y_b]``, ``e_y`` one-hot, ``H(p) = -sum_k p_k log p_k`` (nats), ``u`` uniform over
the ``C`` classes in play. The *local loss* of the aEPG paper (only the current task's
classes, ``z[:, seen_before:seen_now]`` and ``y - seen_before``) is applied by the caller: these
functions treat all ``C`` columns they are given as the classes in play.

Numerics: everything is computed from ``jax.nn.log_softmax`` (``p_y = exp(log p_y)``, entropies as
``sum p log p`` with finite ``log p``), so values and gradients stay finite for logits of magnitude
``1e4`` (no ``0 * inf``). Source of the RL view: aEPG paper, "Policy Gradient with Adaptive
Entropy Annealing for Continual Fine-Tuning", arXiv 2602.14078 (classification as a one-step MDP,
Expected Policy Gradient, adaptive entropy annealing); summarised in docs/methods.md#objectives.

The trainer uses :func:`make_loss_fn`, which maps a config section
(``name`` + hyper-parameters) to ``loss_fn(logits, labels, *, step, total_steps, rng)``.
"""

from __future__ import annotations

import inspect
import itertools
import math
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from cft_jax.schema import Key, ReadBy

Array = jax.Array

# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------


def _log_probs(logits) -> Array:
  """``log softmax(z)`` in float32, ``[B, C]``."""
  return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def _take_label(x: Array, labels) -> Array:
  """``x[b, y_b]`` for ``x`` ``[B, C]`` and integer labels ``[B]`` -> ``[B]``."""
  labels = jnp.asarray(labels).astype(jnp.int32)
  return jnp.take_along_axis(x, labels[:, None], axis=-1)[:, 0]


def _entropy_from_log_probs(logp: Array) -> Array:
  """``H = -sum_k p_k log p_k`` from finite ``log p`` (``[B, C]`` -> ``[B]``)."""
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# --------------------------------------------------------------------------------------------
# Losses.
# --------------------------------------------------------------------------------------------


def entropy(logits) -> Array:
  """Prediction entropy ``H(softmax(z)) = -sum_k p_k log p_k`` in nats.

  Args:
    logits: ``[B, C]``.

  Returns:
    ``[B]`` float32, in ``[0, log C]``.
  """
  return _entropy_from_log_probs(_log_probs(logits))


def ce(logits, labels) -> Array:
  """Cross-entropy ``L_CE = -log p_y`` (docs/methods.md#entropy-regularisers).

  Gradient at the logits: ``dL_CE/dz = p - e_y``.

  Args:
    logits: ``[B, C]``.
    labels: ``[B]`` integer class indices in ``[0, C)``.

  Returns:
    ``[B]`` float32 per-example loss.
  """
  return -_take_label(_log_probs(logits), labels)


def epg(logits, labels) -> Array:
  """Expected Policy Gradient loss ``L_EPG = -p_y`` (aEPG paper; docs/methods.md#epg).

  Classification is a one-step MDP with policy ``pi(a|x) = softmax(z)_a`` and reward
  ``R = 1[a = y]``; the expected reward is ``J = p_y`` and the expected 0-1 loss is ``1 - p_y``.
  EPG sums the policy gradient over all actions exactly, so ``grad L_EPG = -grad p_y`` (no
  sampling variance). Per example ``grad L_EPG = p_y * grad L_CE``; at the logits
  ``dL_EPG/dz = p_y (p - e_y)``: EPG up-weights confident samples (exploitation).

  Args:
    logits: ``[B, C]``.
    labels: ``[B]`` integer class indices.

  Returns:
    ``[B]`` float32 per-example loss in ``[-1, 0]``.
  """
  return -jnp.exp(_take_label(_log_probs(logits), labels))


def aepg(logits, labels, alpha) -> Array:
  """Adaptive-entropy-annealing mixture ``L = a L_CE + (1 - a) L_EPG`` (docs/methods.md#aepg).

  ``a = 1`` is CE (exploration), ``a = 0`` is EPG (exploitation). In training ``a = a_t`` comes
  from a schedule (default :func:`sigmoid_schedule`); see :func:`make_loss_fn`. Per example,
  ``dL/dz = (a + (1 - a) p_y) (p - e_y)``.

  Args:
    logits: ``[B, C]``.
    labels: ``[B]`` integer class indices.
    alpha: scalar mixing weight ``a`` in ``[0, 1]``; may be a traced array (no gradient is
      intended to flow into it).

  Returns:
    ``[B]`` float32 per-example loss.
  """
  logp_y = _take_label(_log_probs(logits), labels)
  alpha = jnp.asarray(alpha, jnp.float32)
  return alpha * (-logp_y) + (1.0 - alpha) * (-jnp.exp(logp_y))


def confidence_penalty(logits, labels, beta: float = 0.1) -> Array:
  """Confidence penalty ``L = L_CE - beta H(p)`` (Pereyra et al. 2017; raises entropy).

  Pereyra et al. 2017, as compared in the aEPG paper (grid ``beta`` in {0.1, 0.2}).

  Args:
    logits: ``[B, C]``.
    labels: ``[B]`` integer class indices.
    beta: entropy bonus weight (>= 0 raises entropy).

  Returns:
    ``[B]`` float32 per-example loss.
  """
  logp = _log_probs(logits)
  return -_take_label(logp, labels) - beta * _entropy_from_log_probs(logp)


def entropy_penalty(logits, labels, beta: float = 1.0) -> Array:
  """Entropy penalty (EP) ``L = L_CE + beta H(p)`` (aEPG paper; lowers entropy).

  The aEPG paper's entropy-minimising baseline (grid ``beta = 1``).

  Args:
    logits: ``[B, C]``.
    labels: ``[B]`` integer class indices.
    beta: entropy penalty weight (>= 0 lowers entropy).

  Returns:
    ``[B]`` float32 per-example loss.
  """
  logp = _log_probs(logits)
  return -_take_label(logp, labels) + beta * _entropy_from_log_probs(logp)


def label_smoothing(logits, labels, gamma: float = 0.1) -> Array:
  """Label smoothing ``L = (1 - g) L_CE + g KL(u || p)`` (Szegedy et al. 2016; raises entropy).

  ``KL(u || p) = sum_k u_k (log u_k - log p_k) = -log C - (1/C) sum_k log p_k`` with ``u`` uniform
  over the ``C`` columns given. This equals the cross-entropy to the smoothed target
  ``(1 - g) e_y + g u`` minus the constant ``g log C`` (same gradient). Paper grid ``g`` in
  {0.01, 0.05, 0.1}.

  Args:
    logits: ``[B, C]``.
    labels: ``[B]`` integer class indices.
    gamma: smoothing weight ``g`` in ``[0, 1]``.

  Returns:
    ``[B]`` float32 per-example loss.
  """
  logp = _log_probs(logits)
  num_classes = logp.shape[-1]
  kl_u_p = -math.log(num_classes) - jnp.mean(logp, axis=-1)
  return (1.0 - gamma) * (-_take_label(logp, labels)) + gamma * kl_u_p


def focal(logits, labels, gamma: float = 1.0) -> Array:
  """Focal loss ``L = (1 - p_y)^g L_CE`` (Lin et al. 2017; raises entropy).

  ``(1 - p_y)^g`` is computed as ``exp(g log sum_{k != y} p_k)`` with a log-sum-exp over the other
  classes' ``log p_k``, which stays finite (and has a finite gradient) even when ``p_y`` rounds to
  1 in float32. Paper grid ``g`` in {0.5, 1, 2}. Requires ``C >= 2``.

  Args:
    logits: ``[B, C]``.
    labels: ``[B]`` integer class indices.
    gamma: focusing parameter ``g >= 0`` (``g = 0`` is CE).

  Returns:
    ``[B]`` float32 per-example loss.
  """
  logp = _log_probs(logits)
  labels = jnp.asarray(labels).astype(jnp.int32)
  is_y = jax.nn.one_hot(labels, logp.shape[-1], dtype=bool)
  log_one_minus_py = jax.nn.logsumexp(jnp.where(is_y, -jnp.inf, logp), axis=-1)
  return jnp.exp(gamma * log_one_minus_py) * (-_take_label(logp, labels))


def mse(logits, labels, alpha: float = 15.0) -> Array:
  """Squared error to a scaled one-hot target ``L = 1/2 ||alpha e_y - z||^2`` (DLCFT eq. 5).

  DLCFT trains its linearized model with MSE (curvature does not vanish as the fit improves,
  unlike CE's Fisher); target scale ``alpha = 15``. The sum runs over the ``C`` columns given.

  Args:
    logits: ``[B, C]`` raw model outputs ``f(x)`` (no softmax).
    labels: ``[B]`` integer class indices.
    alpha: target scale.

  Returns:
    ``[B]`` float32 per-example loss.
  """
  z = jnp.asarray(logits, jnp.float32)
  target = alpha * jax.nn.one_hot(labels, z.shape[-1], dtype=jnp.float32)
  return 0.5 * jnp.sum(jnp.square(target - z), axis=-1)


REINFORCE_BASELINES = ("none", "loo", "expected")


def reinforce(logits, labels, rng, num_samples: int = 1,
              baseline: Optional[str] = None) -> Array:
  """Sampled REINFORCE surrogate of the EPG loss (aEPG paper; docs/methods.md#reinforce).

  Per example, draw ``S = num_samples`` actions ``a_s ~ pi(.|x) = softmax(z)`` (one independent
  draw per example and sample), reward ``R_s = 1[a_s = y]``, and return

      L = -(1/S) sum_s stop_gradient(R_s - b_s) log pi(a_s | x).

  Its gradient is an unbiased estimate of ``grad L_EPG = -grad p_y`` (score-function estimator);
  at the logits a single sample gives ``R (p - e_y)`` whose mean is ``p_y (p - e_y)``. The *value*
  of ``L`` is not ``L_EPG`` (only its gradient is meaningful). EPG computes the same expectation
  exactly, so its variance is 0.

  Baselines (all keep the estimator unbiased, as ``b_s`` does not depend on ``a_s``):
    * ``None`` / ``"none"``: ``b = 0`` (default; plain REINFORCE, Williams 1992).
    * ``"loo"``: leave-one-out mean reward of the other ``S - 1`` samples of the same example
      (needs ``num_samples >= 2``).
    * ``"expected"``: the exact expected reward ``stop_gradient(p_y)``.

  Args:
    logits: ``[B, C]``.
    labels: ``[B]`` integer class indices.
    rng: ``jax.random`` key.
    num_samples: actions sampled per example, ``S >= 1`` (static).
    baseline: one of ``REINFORCE_BASELINES`` or ``None``.

  Returns:
    ``[B]`` float32 per-example surrogate loss.

  Raises:
    ValueError: bad ``num_samples`` or ``baseline``.
  """
  baseline = "none" if baseline is None else baseline
  if baseline not in REINFORCE_BASELINES:
    raise ValueError(f"unknown REINFORCE baseline {baseline!r}; valid: {REINFORCE_BASELINES}")
  num_samples = int(num_samples)
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  if baseline == "loo" and num_samples < 2:
    raise ValueError("baseline 'loo' needs num_samples >= 2")
  logp = _log_probs(logits)
  labels = jnp.asarray(labels).astype(jnp.int32)
  batch = logp.shape[0]
  actions = jax.random.categorical(
      rng, jax.lax.stop_gradient(logp), axis=-1, shape=(num_samples, batch))  # [S, B]
  logp_a = jnp.take_along_axis(
      jnp.broadcast_to(logp, (num_samples,) + logp.shape), actions[..., None], axis=-1)[..., 0]
  reward = (actions == labels[None, :]).astype(jnp.float32)  # [S, B]
  if baseline == "none":
    advantage = reward
  elif baseline == "loo":
    advantage = reward - (jnp.sum(reward, axis=0, keepdims=True) - reward) / (num_samples - 1)
  else:  # "expected"
    advantage = reward - jnp.exp(_take_label(logp, labels))[None, :]
  advantage = jax.lax.stop_gradient(advantage)
  return -jnp.mean(advantage * logp_a, axis=0)


# --------------------------------------------------------------------------------------------
# Schedules for the aEPG mixing weight alpha_t.
# --------------------------------------------------------------------------------------------


def _progress(step, total_steps) -> Array:
  """``clip(t / T, 0, 1)`` in float32, with ``T = 0`` treated as ``T = 1``."""
  t = jnp.asarray(step, jnp.float32)
  total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
  return jnp.clip(t / total, 0.0, 1.0)


def sigmoid_schedule(step, total_steps, tau: float = 6.0) -> Array:
  """aEPG schedule ``a_t = sigmoid(tau (T - 2t) / T)`` (aEPG paper, tau = 6; methods.md#aepg).

  ``a_0 = sigmoid(tau) ~ 0.9975``, ``a_{T/2} = 0.5``, ``a_T = sigmoid(-tau) ~ 0.0025``: starts
  CE-like, ends EPG-like. ``t / T`` is clipped to ``[0, 1]``; ``T = 0`` is treated as 1.

  Args:
    step: current step ``t`` (int or traced int).
    total_steps: number of steps ``T`` (int or traced int).
    tau: steepness.

  Returns:
    float32 scalar in ``[0, 1]``.
  """
  r = _progress(step, total_steps)
  return jax.nn.sigmoid(jnp.asarray(tau, jnp.float32) * (1.0 - 2.0 * r))


def linear_schedule(step, total_steps) -> Array:
  """Linear schedule ``a_t = (T - t) / T`` (aEPG paper ablation; methods.md#aepg).

  Args:
    step: current step ``t``.
    total_steps: number of steps ``T`` (``T = 0`` treated as 1; ``t / T`` clipped to ``[0, 1]``).

  Returns:
    float32 scalar in ``[0, 1]``.
  """
  return 1.0 - _progress(step, total_steps)


def cosine_schedule(step, total_steps) -> Array:
  """Cosine schedule ``a_t = 1/2 + 1/2 cos(pi t / T)`` (aEPG paper ablation; methods.md#aepg).

  Args:
    step: current step ``t``.
    total_steps: number of steps ``T`` (``T = 0`` treated as 1; ``t / T`` clipped to ``[0, 1]``).

  Returns:
    float32 scalar in ``[0, 1]``.
  """
  return 0.5 + 0.5 * jnp.cos(jnp.pi * _progress(step, total_steps))


def constant_schedule(step, total_steps, alpha: float = 0.5) -> Array:
  """Fixed ``a_t = alpha`` (aEPG paper ablation, ``alpha`` in {0, .1, .2, .5, .7, 1}).

  Args:
    step: ignored.
    total_steps: ignored.
    alpha: the constant, in ``[0, 1]``.

  Returns:
    float32 scalar.
  """
  del step, total_steps
  return jnp.asarray(alpha, jnp.float32)


# --------------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------------

OBJECTIVES: Dict[str, Callable[..., Array]] = {
    "ce": ce,
    "epg": epg,
    "aepg": aepg,
    "confidence_penalty": confidence_penalty,
    "label_smoothing": label_smoothing,
    "focal": focal,
    "entropy_penalty": entropy_penalty,
    "mse": mse,
    "reinforce": reinforce,
}

SCHEDULES: Dict[str, Callable[..., Array]] = {
    "sigmoid": sigmoid_schedule,
    "linear": linear_schedule,
    "cosine": cosine_schedule,
    "constant": constant_schedule,
}

# Hyper-parameters each objective reads from a config section (all others are ignored by it).
OBJECTIVE_HPARAMS: Dict[str, Tuple[str, ...]] = {
    "ce": (),
    "epg": (),
    "aepg": ("schedule", "tau", "alpha"),
    "confidence_penalty": ("beta",),
    "label_smoothing": ("gamma",),
    "focal": ("gamma",),
    "entropy_penalty": ("beta",),
    "mse": ("alpha",),
    "reinforce": ("num_samples", "baseline"),
}

# Keys consumed by the trainer, not by the loss: ``schedule_scope`` in {'task', 'global'} says
# whether ``step / total_steps`` count within the current task (default; our choice)
# or over the whole run. Accepted and ignored here.
TRAINER_LOSS_KEYS: Tuple[str, ...] = ("schedule_scope",)

# Every key a loss config section may hold (besides ``name``).
LOSS_HPARAMS = frozenset(k for ks in OBJECTIVE_HPARAMS.values() for k in ks) | frozenset(
    TRAINER_LOSS_KEYS)

# The ``alpha`` reported in ``aux`` for objectives without a schedule: 1.0 for CE-like losses,
# 0.0 for the pure policy-gradient ones (position on the CE <-> EPG axis).
_FIXED_ALPHA = {
    "ce": 1.0,
    "confidence_penalty": 1.0,
    "label_smoothing": 1.0,
    "focal": 1.0,
    "entropy_penalty": 1.0,
    "mse": 1.0,
    "epg": 0.0,
    "reinforce": 0.0,
}

LossFn = Callable[..., Tuple[Array, Dict[str, Array]]]


def _check_float(name: str, key: str, value: Any, lo: float = -math.inf,
                 hi: float = math.inf) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"loss {name!r}: {key} must be a number, got {value!r}") from None
  if not lo <= value <= hi or math.isnan(value):
    raise ValueError(f"loss {name!r}: {key} must be in [{lo}, {hi}], got {value}")
  return value


def make_loss_fn(name: str, **hparams: Any) -> LossFn:
  """Builds the trainer's loss function from a config section.

  A whole config section can be splatted in: ``make_loss_fn(**config.loss)``. Each objective picks
  the keys it uses (``OBJECTIVE_HPARAMS[name]``); known keys of other objectives
  (``LOSS_HPARAMS``) are ignored, and a value of ``None`` means "use the function's default".
  Keys:
    * ``aepg``: ``schedule`` in ``SCHEDULES`` (default ``'sigmoid'``), ``tau`` (sigmoid
      steepness, default 6), ``alpha`` (the value for ``schedule='constant'``, default 0.5).
    * ``confidence_penalty`` / ``entropy_penalty``: ``beta`` (defaults 0.1 / 1.0).
    * ``label_smoothing`` / ``focal``: ``gamma`` (defaults 0.1 / 1.0).
    * ``mse``: ``alpha`` = target scale (default 15). Note that it shares the key ``alpha`` with
      aepg's constant schedule.
    * ``reinforce``: ``num_samples`` (default 1), ``baseline`` (default ``None``).
    * ``schedule_scope`` (any objective): read by the trainer, ignored here.

  Args:
    name: a key of ``OBJECTIVES``.
    **hparams: hyper-parameters as above.

  Returns:
    ``loss_fn(logits [B, C], labels [B], *, step=0, total_steps=1, rng=None)
    -> (per_example_loss [B] float32, aux)``, jit-compatible with traced ``step`` /
    ``total_steps``. ``aux`` holds float32 scalars:
      * ``alpha``: the CE weight ``a_t`` in use — the schedule value for ``aepg``, 1.0 for the
        CE-like losses (ce, confidence_penalty, label_smoothing, focal, entropy_penalty, mse),
        0.0 for ``epg`` and ``reinforce``.
      * ``entropy``: batch mean of the prediction entropy ``H(softmax(z))`` (nats), stop-gradient.
    ``rng`` is required for ``reinforce`` and ignored otherwise.

  Raises:
    ValueError: unknown ``name``, unknown hyper-parameter key (lists the valid ones), or an
      invalid value (unknown schedule or baseline, out-of-range number).
  """
  if name not in OBJECTIVES:
    raise ValueError(f"unknown loss name {name!r}; valid: {sorted(OBJECTIVES)}")
  unknown = sorted(set(hparams) - LOSS_HPARAMS)
  if unknown:
    raise ValueError(
        f"unknown loss hyper-parameter(s) {unknown} for loss {name!r}; valid keys: "
        f"{sorted(LOSS_HPARAMS)} (used by {name!r}: {list(OBJECTIVE_HPARAMS[name])})")
  used = {k: v for k, v in hparams.items() if k in OBJECTIVE_HPARAMS[name] and v is not None}

  if name == "aepg":
    schedule_name = used.pop("schedule", "sigmoid")
    if schedule_name not in SCHEDULES:
      raise ValueError(f"unknown aepg schedule {schedule_name!r}; valid: {sorted(SCHEDULES)}")
    if schedule_name == "sigmoid":
      tau = _check_float(name, "tau", used.pop("tau", 6.0))
      schedule = lambda t, n: sigmoid_schedule(t, n, tau=tau)
    elif schedule_name == "constant":
      const = _check_float(name, "alpha", used.pop("alpha", 0.5), 0.0, 1.0)
      schedule = lambda t, n: constant_schedule(t, n, alpha=const)
    else:
      schedule = SCHEDULES[schedule_name]
  elif name in ("confidence_penalty", "entropy_penalty"):
    if "beta" in used:
      used["beta"] = _check_float(name, "beta", used["beta"])
  elif name == "label_smoothing":
    if "gamma" in used:
      used["gamma"] = _check_float(name, "gamma", used["gamma"], 0.0, 1.0)
  elif name == "focal":
    if "gamma" in used:
      used["gamma"] = _check_float(name, "gamma", used["gamma"], 0.0)
  elif name == "mse":
    if "alpha" in used:
      used["alpha"] = _check_float(name, "alpha", used["alpha"])
  elif name == "reinforce":
    # Validate eagerly (reinforce re-checks at call time).
    num_samples = used.get("num_samples", 1)
    if int(num_samples) != num_samples or int(num_samples) < 1:
      raise ValueError(f"loss 'reinforce': num_samples must be an int >= 1, got {num_samples!r}")
    used["num_samples"] = int(num_samples)
    baseline = used.get("baseline", None)
    if baseline is not None and baseline not in REINFORCE_BASELINES:
      raise ValueError(
          f"loss 'reinforce': unknown baseline {baseline!r}; valid: {REINFORCE_BASELINES}")
    if baseline == "loo" and used["num_samples"] < 2:
      raise ValueError("loss 'reinforce': baseline 'loo' needs num_samples >= 2")

  objective = OBJECTIVES[name]

  def loss_fn(logits, labels, *, step=0, total_steps=1, rng=None):
    aux_entropy = jax.lax.stop_gradient(jnp.mean(entropy(logits)))
    if name == "aepg":
      alpha = jnp.asarray(schedule(step, total_steps), jnp.float32)
      loss = aepg(logits, labels, alpha)
    elif name == "reinforce":
      if rng is None:
        raise ValueError("loss 'reinforce' needs rng")
      alpha = jnp.float32(_FIXED_ALPHA[name])
      loss = reinforce(logits, labels, rng, **used)
    else:
      alpha = jnp.float32(_FIXED_ALPHA[name])
      loss = objective(logits, labels, **used)
    return loss, {"alpha": jax.lax.stop_gradient(alpha), "entropy": aux_entropy}

  loss_fn.__name__ = f"{name}_loss_fn"
  loss_fn.uses_rng = name == "reinforce"  # samples: a pmapped step evaluates it on the global batch
  return loss_fn


# --------------------------------------------------------------------------------------------
# The ``loss`` section of the config.
# --------------------------------------------------------------------------------------------

# Keys, defaults and allowed values of the ``loss`` section (:mod:`cft_jax.schema`; assembled by
# :mod:`cft_jax.registry`). The objectives' own hyper-parameters (:data:`OBJECTIVE_HPARAMS`,
# e.g. ``beta``) are accepted as well; their defaults are those of the functions above.
CONFIG_KEYS = (
    Key("name", "aepg", "training objective (see cft_jax.objectives)"),
    Key("schedule", "sigmoid", "aepg: sigmoid | linear | cosine | constant",
        choices=tuple(SCHEDULES)),
    Key("tau", 6.0, "aepg sigmoid temperature"),
    Key("schedule_scope", "task", "T counts steps of the current task, or of the whole run",
        choices=("task", "global")),
    Key("scope", "local", "local: current task's classes (aEPG paper) | all: every output",
        choices=("local", "all")),
)

# Keys of the ``loss`` section the trainer reads itself (the rest go to the objective).
LOSS_TRAINER_KEYS = ("name", "schedule_scope", "scope")

# Who reads which ``loss`` key (:class:`cft_jax.schema.ReadBy`; :mod:`cft_jax.registry` refuses a
# key that is set but not read): each objective its hyper-parameters (:data:`OBJECTIVE_HPARAMS`),
# aEPG also ``schedule_scope`` (the trainer's count of the schedule's steps; no other objective
# depends on the step); within aEPG, each schedule its own parameter. ``name`` and ``scope`` are
# read under every objective.
LOSS_READS = (
    ReadBy("loss.name", {name: keys + (("schedule_scope",) if name == "aepg" else ())
                         for name, keys in OBJECTIVE_HPARAMS.items()}),
    ReadBy("loss.schedule", {"sigmoid": ("tau",), "constant": ("alpha",), "linear": (),
                             "cosine": ()}, when=("loss.name", "aepg")),
)


def loss_hparams(loss) -> Dict[str, Any]:
  """The objective's hyper-parameters of a ``loss`` section (all but :data:`LOSS_TRAINER_KEYS`).

  Args:
    loss: the ``config.loss`` section (a ConfigDict or dict).

  Returns:
    ``{key: value}`` to pass to :func:`make_loss_fn` as keyword arguments.
  """
  return {k: v for k, v in loss.items() if k not in LOSS_TRAINER_KEYS}


def mse_alpha_default() -> float:
  """Default MSE target scale ``alpha`` (that of :func:`mse`, 15)."""
  return float(inspect.signature(mse).parameters["alpha"].default)


def mse_alpha(config) -> float:
  """The run's MSE target scale: ``loss.alpha`` when ``loss.name='mse'``, else the default
  (the curvature and replay terms of DLCFT use the same value as the loss).

  Args:
    config: a config with a ``loss`` section.
  """
  if config.loss.name == "mse" and "alpha" in config.loss:
    return float(config.loss.alpha)
  return mse_alpha_default()


# --------------------------------------------------------------------------------------------
# The task's logits: the columns a local loss (``loss.scope='local'``) sees.
# --------------------------------------------------------------------------------------------


def task_widths(classes_per_task) -> Tuple[int, Optional[Tuple[int, ...]]]:
  """``(k, bounds)`` of ``classes_per_task``: an int (every task has ``k`` classes; ``bounds``
  None) or the per-task class counts (``k`` = the widest task; ``bounds`` = the cumulative
  counts when the tasks differ, e.g. ``(50, 60, ..., 100)`` for B50-Inc10)."""
  if isinstance(classes_per_task, (tuple, list)):
    sizes = tuple(int(c) for c in classes_per_task)
    if len(set(sizes)) > 1:
      return max(sizes), tuple(itertools.accumulate(sizes))
    return sizes[0], None
  return int(classes_per_task), None


def task_slice(logits: jax.Array, task_lo, k: int, bounds: Optional[Tuple[int, ...]] = None
               ) -> jax.Array:
  """The task's logits ``logits[:, task_lo:task_lo + k]`` (``[B, k]``; ``task_lo`` traced).

  With unequal tasks (``bounds``, see :func:`task_widths`) the slice is ``k`` wide (the widest
  task) and the columns past the task's last class are set to ``-1e9`` (zero probability, no
  gradient), so one compiled step serves every task.
  """
  if bounds is None:
    return jax.lax.dynamic_slice_in_dim(logits, task_lo, k, axis=1)
  padded = jnp.pad(logits, ((0, 0), (0, k)), constant_values=-1e9)
  local = jax.lax.dynamic_slice_in_dim(padded, task_lo, k, axis=1)
  b = jnp.asarray(bounds)
  width = b[jnp.searchsorted(b, task_lo, side="right")] - task_lo
  return jnp.where(jnp.arange(k) < width, local, jnp.asarray(-1e9, local.dtype))


def task_hi(task_lo, k: int, bounds: Optional[Tuple[int, ...]] = None):
  """End ``hi`` of the task starting at ``task_lo`` (traced)."""
  if bounds is None:
    return task_lo + k
  b = jnp.asarray(bounds)
  return b[jnp.searchsorted(b, task_lo, side="right")]


__all__ = [
    "CONFIG_KEYS",
    "LOSS_HPARAMS",
    "LOSS_READS",
    "LOSS_TRAINER_KEYS",
    "OBJECTIVES",
    "OBJECTIVE_HPARAMS",
    "REINFORCE_BASELINES",
    "SCHEDULES",
    "TRAINER_LOSS_KEYS",
    "aepg",
    "ce",
    "confidence_penalty",
    "constant_schedule",
    "cosine_schedule",
    "entropy",
    "entropy_penalty",
    "epg",
    "focal",
    "label_smoothing",
    "linear_schedule",
    "loss_hparams",
    "make_loss_fn",
    "mse",
    "mse_alpha",
    "mse_alpha_default",
    "reinforce",
    "sigmoid_schedule",
    "task_hi",
    "task_slice",
    "task_widths",
]
