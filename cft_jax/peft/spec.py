"""``PeftSpec``: the parameter-efficient fine-tuning settings of a run, built once from
``config.peft`` and passed whole to :func:`cft_jax.models.build_model` and the backbones.

References: LoRA (Hu et al. 2021, eq. 3: ``h = W0 x + (alpha / r) B A x``), adapters (Houlsby et
al. 2019; AdaptFormer, Chen et al. 2022), prefix tuning (Li & Liang 2021; LAE's compensated form,
Gao et al. 2023).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

from cft_jax.schema import Key, ReadBy

# Names whose modules live inside the backbone (the others only choose trainable leaves).
MODULE_PEFTS = ("lora", "adapter", "prefix")
# Every ``peft.name`` (``linear_probe``: the head only; ``full``: every parameter).
PEFT_METHODS = ("lora", "adapter", "prefix", "linear_probe", "full")

# The ``peft`` section of the config (read by :meth:`PeftSpec.from_config`): keys, defaults and
# allowed values (:mod:`cft_jax.schema`; assembled by :mod:`cft_jax.registry`).
CONFIG_KEYS = (
    Key("name", "lora", "lora | adapter | prefix (ViT) | linear_probe | full",
        choices=PEFT_METHODS),
    Key("rank", 4, "LoRA rank r (lora; 0: no LoRA)", non_negative=True),
    Key("alpha", 0.0, "LoRA scale alpha / rank; 0 -> alpha = rank"),
    Key("blocks", (0, 1, 2, 3, 4), "ViT: blocks that get the PEFT module (paper: 0-4)"),
    Key("lora_targets", ("k", "v"), "ViT LoRA targets among q, k, v, o"),
    Key("adapter_hidden", 5, "ViT adapter bottleneck"),
    Key("adapter_position", "attn", "ViT adapter parallel to attn | mlp", choices=("attn", "mlp")),
    Key("prefix_length", 10, "ViT prefix length L"),
)

# Who reads which ``peft`` key (:class:`cft_jax.schema.ReadBy`; the registry refuses a key that is
# set but not read): each ``peft.name`` its module's sizes (:class:`PeftSpec`'s properties and
# the backbones); ``linear_probe`` and ``full`` add no module and read none.
PEFT_READS = ReadBy("peft.name", {
    "lora": ("rank", "alpha", "blocks", "lora_targets"),
    "adapter": ("blocks", "adapter_hidden", "adapter_position"),
    "prefix": ("blocks", "prefix_length"),
    "linear_probe": (),
    "full": (),
})

@dataclasses.dataclass(frozen=True)
class PeftSpec:
  """Which PEFT modules a backbone carries and their sizes (hashable: a Flax module field).

  Attributes:
    name: ``none | lora | adapter | prefix | linear_probe | full`` (``config.peft.name``);
      ``linear_probe``/``full``/``none`` add no module.
    rank: LoRA rank ``r``.
    alpha: LoRA scale numerator: the adapter update is scaled by ``alpha / r`` (Hu et al. 2021,
      eq. 3); ``None`` or 0 means ``alpha = r`` (scale 1).
    blocks: ViT blocks that get the PEFT module (aEPG paper: 0-4; indices ``>= depth`` ignored).
    lora_targets: ViT LoRA targets among ``q, k, v, o``.
    adapter_hidden: adapter bottleneck ``h``.
    adapter_position: ViT adapter parallel to ``attn`` or ``mlp``.
    prefix_length: ViT prefix tokens ``L``.
    prefix_gate_init: initial prefix gate (0: identity at init; None: LAE without gate).
    prefix_compensatory: LAE's compensated prefix (True) or plain prefix tuning.
  """

  name: str = "none"
  rank: int = 4
  alpha: Optional[float] = None
  blocks: Tuple[int, ...] = (0, 1, 2, 3, 4)
  lora_targets: Tuple[str, ...] = ("k", "v")
  adapter_hidden: int = 5
  adapter_position: str = "attn"
  prefix_length: int = 10
  prefix_gate_init: Optional[float] = 0.0
  prefix_compensatory: bool = True

  def __post_init__(self):
    # Tuples, so the spec stays hashable when built from lists.
    object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

  @classmethod
  def from_config(cls, peft_config: Any) -> "PeftSpec":
    """The spec of a resolved ``config.peft`` section (``alpha = 0`` read as ``alpha = r``)."""
    p = peft_config
    return cls(name=p.name, rank=int(p.rank), alpha=float(p.alpha) if p.alpha else None,
               blocks=tuple(p.blocks), lora_targets=tuple(p.lora_targets),
               adapter_hidden=int(p.adapter_hidden), adapter_position=p.adapter_position,
               prefix_length=int(p.prefix_length))

  @classmethod
  def lora(cls, rank: int, alpha: Optional[float] = None, **kwargs) -> "PeftSpec":
    """``PeftSpec(name='lora', rank=rank, alpha=alpha, ...)``; ``rank = 0``: no PEFT module."""
    return cls(name="lora" if rank else "none", rank=int(rank), alpha=alpha, **kwargs)

  @property
  def module(self) -> str:
    """The module the backbone carries: ``lora | adapter | prefix`` or ``none``."""
    return self.name if self.name in MODULE_PEFTS else "none"

  @property
  def lora_rank(self) -> int:
    """LoRA rank of the backbone's LoRA layers (0 unless ``name == 'lora'``)."""
    return self.rank if self.name == "lora" else 0

  @property
  def lora_alpha(self) -> Optional[float]:
    """``alpha`` for :class:`cft_jax.peft.lora.LoRADense` (None: ``alpha = r``)."""
    return self.alpha or None

  @property
  def lora_scale(self) -> float:
    """``alpha / r`` (1 when ``alpha`` is unset; 0 without LoRA)."""
    if self.lora_rank <= 0:
      return 0.0
    return float(self.alpha) / self.rank if self.alpha else 1.0

  def on_block(self, index: int) -> "PeftSpec":
    """This spec for block ``index``: unchanged when ``index in blocks``, else ``name='none'``."""
    return self if index in self.blocks else dataclasses.replace(self, name="none")


NO_PEFT = PeftSpec()
