"""Checkpoint IO of the Vision Transformer (:mod:`cft_jax.models.vit`): ``.npz`` files of the
augreg (Steiner et al. 2022) and original ImageNet-21k (Dosovitskiy et al. 2021, with
``pre_logits``) layouts, big_vision names, position-embedding resampling, the local lookup of the
public files and :func:`save_npz` for fine-tuned variables.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cft_jax.errors import BadDataError, ConfigError, DatasetNotFoundError
from cft_jax.peft import is_head

__all__ = ["AUGREG_FILES", "I21K_FILES", "CHECKPOINT_FORMATS", "resample_posemb", "init_leaves",
           "load_pretrained", "save_npz", "pretrained_path", "detect_checkpoint_format"]

# Public augreg ImageNet-21k checkpoints (upstream models of the paper setup; no pre_logits).
AUGREG_URL = "https://storage.googleapis.com/vit_models/augreg/"
AUGREG_FILES: Dict[str, str] = {
    "ti16": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
    "s16": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "b16": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
}
# The original ImageNet-21k checkpoints (Dosovitskiy et al. 2021; the upstream of L2P / LAE),
# with a ``pre_logits`` Dense(768) + tanh between ``encoder_norm`` and the 21,843-way head.
I21K_URL = "https://storage.googleapis.com/vit_models/imagenet21k/"
I21K_FILES: Dict[str, str] = {"b16": "ViT-B_16.npz"}
CHECKPOINT_FORMATS = ("auto", "augreg", "i21k")
PEFT_KEYWORDS = ("lora", "adapter", "prefix")


def _is_peft_key(key: str) -> bool:
  return any(w in key for w in PEFT_KEYWORDS)




def resample_posemb(posemb: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
  """Position embeddings for another patch grid ("high-res fine-tuning", big_vision /
  vit_jax ``resample_posemb``): the ``cls`` token's embedding is kept, the ``g x g`` grid of
  patch embeddings is resized bilinearly to ``grid`` (``jax.image.resize``, half-pixel centres,
  antialiased when shrinking; the reference uses ``scipy.ndimage.zoom(order=1)``, which differs
  only in the placement of sample points).

  Args:
    posemb: ``[1, 1 + g*g, D]``.
    grid: new ``(gh, gw)``.

  Returns:
    ``[1, 1 + gh*gw, D]`` float32.

  Raises:
    ValueError: the old number of patch tokens is not a square.
  """
  posemb = np.asarray(posemb, np.float32)
  tok, old = posemb[:, :1], posemb[0, 1:]
  g = int(round(math.sqrt(old.shape[0])))
  if g * g != old.shape[0]:
    raise ValueError(f"pos_embedding has {old.shape[0]} patch tokens, not a square grid")
  gh, gw = grid
  if (g, g) == (gh, gw):
    return posemb
  new = jax.image.resize(jnp.asarray(old.reshape(g, g, -1)), (gh, gw, old.shape[-1]),
                         method="bilinear")
  return np.concatenate([tok, np.asarray(new, np.float32).reshape(1, gh * gw, -1)], axis=1)


_BV_RENAMES = (("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1"),
               ("LayerNorm_1", "LayerNorm_2"), ("MlpBlock_0", "MlpBlock_3"))


def _normalise_checkpoint(ckpt: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Strips ``opt/target/`` or ``params/`` prefixes; maps big_vision names (``pos_embedding``,
  ``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0``, scanned
  ``encoderblock/`` stacks) to the vit_jax names used here."""
  for pre in ("opt/target/", "params/"):
    if ckpt and all(k.startswith(pre) for k in ckpt):
      ckpt = {k[len(pre):]: v for k, v in ckpt.items()}
  if any("MlpBlock_0" in k for k in ckpt):  # big_vision naming
    out = {}
    for k, v in ckpt.items():
      if k == "pos_embedding":
        k = "Transformer/posembed_input/pos_embedding"
      for old, new in _BV_RENAMES:
        k = k.replace(f"/{old}/", f"/{new}/")
      out[k] = v
    ckpt = out
  scanned = [k for k in ckpt if k.startswith("Transformer/encoderblock/")]
  if scanned:  # big_vision scan_layers: leading axis = block
    out = {k: v for k, v in ckpt.items() if k not in scanned}
    for k in scanned:
      rest = k[len("Transformer/encoderblock/"):]
      for i, v in enumerate(ckpt[k]):
        out[f"Transformer/encoderblock_{i}/{rest}"] = v
    ckpt = out
  return ckpt


def _as_size(image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
  if isinstance(image_size, int):
    return image_size, image_size
  h, w = image_size
  return int(h), int(w)


def init_leaves(module: nn.Module, rng: jax.Array, image_size: Union[int, Sequence[int]],
                keep: Callable[[str], bool]) -> Dict[str, jax.Array]:
  """The initial values of the ``params`` leaves whose ``/``-joined path satisfies ``keep``.

  Runs ``module.init`` under ``jit`` returning only those leaves, so XLA drops the rest of the
  initialisation (no 86M random numbers to fill a head and a few PEFT leaves of ViT-B/16).
  """
  h, w = _as_size(image_size)

  def f(rng):
    flat = traverse_util.flatten_dict(module.init(rng, jnp.zeros((1, h, w, 3)))["params"],
                                      sep="/")
    return {k: v for k, v in flat.items() if keep(k)}
  return jax.jit(f)(rng)


def load_pretrained(module: nn.Module, path: Union[str, os.PathLike],
                    image_size: Union[int, Sequence[int]] = 224, rng: Optional[jax.Array] = None,
                    *, keep_head: bool = False, ignore_keys: Sequence[str] = ()
                    ) -> Dict[str, Any]:
  """Variables ``{'params': ...}`` of ``module`` from a ViT ``.npz`` checkpoint.

  Every checkpoint array goes to the leaf of the same ``/``-joined path (after
  :func:`_normalise_checkpoint`); ``pos_embedding`` is resampled to the grid of ``image_size``
  (:func:`resample_posemb`); the ``head`` is dropped and replaced by a fresh one
  (``N(0, head_init_std)``, zero bias) unless ``keep_head``; PEFT leaves (paths containing
  ``lora``/``adapter``/``prefix``) come from ``module.init(rng)`` unless the file has them
  (files written by :func:`save_npz`). Arrays are cast to float32.

  Args:
    module: the target :class:`cft_jax.models.vit.VisionTransformer` (its fields decide the
      tree).
    path: ``.npz`` with ``/``-separated keys (vit_jax / big_vision layout).
    image_size: input side (int or ``(h, w)``) the variables are made for.
    rng: PRNG key for the head and the PEFT leaves (default ``PRNGKey(0)``).
    keep_head: keep the checkpoint's ``head`` (shapes must match).
    ignore_keys: checkpoint key prefixes to drop silently (e.g. ``("pre_logits",)``).

  Returns:
    ``{'params': nested dict of jax arrays}``.

  Raises:
    FileNotFoundError: no such file (``DatasetNotFoundError``); a file that is not a readable
      ``.npz`` (``BadDataError``, naming it).
    ValueError: naming every missing key (model leaf not in the file), unexpected key (file
      array the model has no leaf for) and shape mismatch.
  """
  module.validate()
  rng = jax.random.PRNGKey(0) if rng is None else rng
  h, w = _as_size(image_size)
  p = module.spec.patch
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
  ckpt = _normalise_checkpoint(read_npz(path))
  shapes = traverse_util.flatten_dict(
      jax.eval_shape(module.init, rng, jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32))["params"],
      sep="/")
  fresh = lambda k: ((is_head(k) and not keep_head)
                     or (_is_peft_key(k) and k not in ckpt))
  leaves = dict(shapes)
  leaves.update(init_leaves(module, rng, (h, w), fresh))

  out, missing, mismatched, used = {}, [], [], set()
  for key, ref in leaves.items():
    if is_head(key) and not keep_head:
      out[key] = ref
      continue
    if key not in ckpt:
      if _is_peft_key(key):
        out[key] = ref
      else:
        missing.append(key)
      continue
    arr = ckpt[key]
    used.add(key)
    if key.endswith("posembed_input/pos_embedding") and arr.shape != ref.shape:
      arr = resample_posemb(arr, (h // p, w // p))
    if arr.shape != ref.shape:
      mismatched.append(f"{key}: file {tuple(arr.shape)} vs model {tuple(ref.shape)}")
      continue
    out[key] = jnp.asarray(arr, jnp.float32)
  dropped = lambda k: ((is_head(k) and not keep_head)
                       or any(k.startswith(pre) for pre in ignore_keys))
  unexpected = sorted(k for k in ckpt if k not in used and not dropped(k))
  if missing or unexpected or mismatched:
    lines = [f"{path}: checkpoint does not match ViT-{module.variant} (peft={module.peft.name!r}):"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20])
                     + (" ..." if len(items) > 20 else ""))
    if any(k.startswith("pre_logits/") for k in unexpected):
      lines.append("  the file has pre_logits: pass representation_size=<its width> to keep it, "
                   "or ignore_keys=('pre_logits',) to drop it")
    raise ValueError("\n".join(lines))
  return {"params": traverse_util.unflatten_dict(out, sep="/")}

def save_npz(variables: Dict[str, Any], path: Union[str, os.PathLike]) -> None:
  """Writes ``variables['params']`` (or a bare params dict) as an ``.npz`` with ``/``-joined
  keys (the checkpoint layout; PEFT leaves included), readable by :func:`load_pretrained`."""
  params = variables.get("params", variables)
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def _not_found(message: str) -> Exception:
  """A missing checkpoint: :class:`cft_jax.errors.DatasetNotFoundError` (a FileNotFoundError),
  which the CLI prints as one line."""
  return DatasetNotFoundError(message)


def _with_npz(path: Union[str, os.PathLike], read: Callable[[Any], Any]) -> Any:
  """``read(npz)`` of the opened ``.npz`` at ``path``; the errors of :func:`read_npz`."""
  if not os.path.isfile(path):
    raise _not_found(f"model.checkpoint: {path} does not exist (a ViT .npz file or the folder "
                     f"holding it)")
  try:
    with np.load(path, allow_pickle=False) as f:
      return read(f)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise BadDataError(f"model.checkpoint: {path} is not a readable .npz ({type(e).__name__}: "
                       f"{e}); the download may be truncated: download it again") from None


def read_npz(path: Union[str, os.PathLike], select: Optional[Callable[[str], bool]] = None
             ) -> Dict[str, np.ndarray]:
  """The arrays of a checkpoint ``.npz`` whose keys ``select`` accepts (None: every array).

  Raises:
    FileNotFoundError: no such file (``DatasetNotFoundError``).
    BadDataError: the file is not a readable ``.npz`` (a truncated download, another format);
      the message names it and says to download it again.
  """
  return _with_npz(path, lambda f: {k: np.asarray(f[k]) for k in f.files
                                    if select is None or select(k)})


def detect_checkpoint_format(path: Union[str, os.PathLike]) -> str:
  """``"i21k"`` for a file with ``pre_logits`` (the original ``ViT-B_16.npz``), else
  ``"augreg"`` (reads the key names only).

  Raises:
    FileNotFoundError: no such file (``DatasetNotFoundError``); a file that is not a readable
      ``.npz`` (``BadDataError``, naming it).
  """
  keys = _with_npz(path, lambda f: list(f.files))
  return "i21k" if any("pre_logits/" in k for k in keys) else "augreg"


def _candidates(variant: str, fmt: str) -> Dict[str, str]:
  files = {}
  if fmt in ("auto", "augreg") and variant in AUGREG_FILES:
    files[AUGREG_FILES[variant]] = AUGREG_URL + AUGREG_FILES[variant]
  if fmt in ("auto", "i21k") and variant in I21K_FILES:
    files[I21K_FILES[variant]] = I21K_URL + I21K_FILES[variant]
  return files


def pretrained_path(variant: str, directory: Optional[str] = None,
                    checkpoint_format: str = "auto") -> str:
  """Local path of the ImageNet-21k ``.npz`` of ``variant``.

  ``checkpoint_format`` (``model.checkpoint_format``): ``augreg`` (Steiner et al. 2022,
  ``B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz`` from
  ``gs://vit_models/augreg/``), ``i21k`` (Dosovitskiy et al. 2021, ``ViT-B_16.npz`` with
  ``pre_logits`` from ``gs://vit_models/imagenet21k/``) or ``auto`` (the first of those present).
  Looked up in ``directory``, else ``$CFT_JAX_VIT_DIR``, else ``~/.cache/cft_jax/vit``.

  Raises:
    ConfigError (a ValueError): no public checkpoint for ``variant`` (patch-4 and ``tiny``
      variants) or an unknown format.
    FileNotFoundError: the file is absent; the message gives the download command.
  """
  if checkpoint_format not in CHECKPOINT_FORMATS:
    raise ConfigError(f"model.checkpoint_format must be one of {CHECKPOINT_FORMATS}, got "
                      f"{checkpoint_format!r}")
  files = _candidates(variant, checkpoint_format)
  if not files:
    kind = "i21k" if checkpoint_format == "i21k" else "augreg"
    raise ConfigError(f"no public {kind} checkpoint for ViT variant {variant!r} "
                      f"(augreg: {sorted(AUGREG_FILES)}, i21k: {sorted(I21K_FILES)}); set "
                      f"model.pretrained=False, or model.checkpoint to your .npz file")
  directory = (directory or os.environ.get("CFT_JAX_VIT_DIR")
               or os.path.join(os.path.expanduser("~"), ".cache", "cft_jax", "vit"))
  for name in files:
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  cmds = "\n".join(f"  mkdir -p {directory} && wget -P {directory} {url}"
                   for url in files.values())
  raise _not_found(
      f"none of {list(files)} in {directory}. Download one with\n{cmds}\n(or set "
      f"CFT_JAX_VIT_DIR / model.checkpoint to the file or the folder holding it)")
