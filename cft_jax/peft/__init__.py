"""Parameter-efficient fine-tuning: which leaves train, and splitting params before ``grad``.

The trainer differentiates only the trainable subtree; frozen leaves are closed over as constants,
so they get no gradient and no optimiser state (the memory saving of PEFT). Selection is by path:

- ``lora``: leaves whose path contains ``lora`` (``lora_a``/``lora_b`` of :class:`LoRADense`)
  plus the classifier ``head``;
- ``adapter``: leaves whose path contains ``adapter`` (:class:`cft_jax.peft.adapter.Adapter`)
  plus the ``head``;
- ``prefix``: leaves whose path contains ``prefix`` (:class:`cft_jax.peft.prefix.Prefix`) plus the
  ``head``;
- ``linear_probe``: the ``head`` only (frozen backbone);
- ``full``: every parameter (full fine-tuning baseline).
"""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple, Union

from flax import traverse_util

# pylint: disable-next=unused-import
from cft_jax.peft.spec import CONFIG_KEYS, NO_PEFT, PEFT_METHODS, PEFT_READS, PeftSpec

PyTree = Any
# Name of the classifier (the top-level ``params`` entry every backbone calls its last Dense).
HEAD = "head"


def is_head(path: Union[str, Sequence[Any]]) -> bool:
  """Whether ``path`` is (inside) the classifier :data:`HEAD`.

  Args:
    path: a tuple of keys (``('head', 'kernel')``, as :func:`flax.traverse_util.flatten_dict`),
      a jax key path (``DictKey`` entries, as ``jax.tree_util.tree_map_with_path``), a
      ``/``-joined string (``'head/kernel'``) or a single top-level key (``'head'``).
  """
  if isinstance(path, str):
    return path.split("/", 1)[0] == HEAD
  if not path:
    return False
  first = path[0]
  return str(getattr(first, "key", first)) == HEAD


def copy_tree(tree: PyTree) -> PyTree:
  """A fresh copy of a pytree of arrays (same dtypes; no aliasing with buffers the train step
  donates). Usable inside ``jit``."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def is_trainable(path: Tuple[str, ...], peft_name: str) -> bool:
  """Whether the parameter at ``path`` (tuple of keys) trains under ``peft_name``.

  Raises:
    ValueError: for an unknown ``peft_name``.
  """
  if peft_name == "full":
    return True
  if peft_name == "linear_probe":
    return is_head(path)
  if peft_name == "lora":
    return is_head(path) or any("lora" in p for p in path)
  if peft_name in ("adapter", "prefix"):
    return is_head(path) or any(peft_name in p for p in path)
  raise ValueError(f"unknown peft.name '{peft_name}'; known: {list(PEFT_METHODS)}")


def split_params(params: Dict, peft_name: str) -> Tuple[Dict, Dict]:
  """Splits a nested param dict into ``(trainable, frozen)`` nested dicts by :func:`is_trainable`.

  Raises:
    ValueError: if nothing would train (e.g. ``lora`` on a model without LoRA leaves or head).
  """
  flat = traverse_util.flatten_dict(params)
  trainable = {k: v for k, v in flat.items() if is_trainable(k, peft_name)}
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  if not trainable:
    raise ValueError(f"peft.name='{peft_name}' selects no trainable parameter in this model")
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Dict, frozen: Dict) -> Dict:
  """Inverse of :func:`split_params`: one nested dict with the leaves of both."""
  flat = traverse_util.flatten_dict(frozen)
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)


def count_params(tree: PyTree) -> int:
  """Number of scalars in a pytree of arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
