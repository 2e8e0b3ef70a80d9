"""Joint training: the upper bound of DLCFT's tables (docs/methods.md#joint).

Task ``t`` is trained on the union of the training data of tasks ``0..t``
(``cumulative_data=True``; :func:`cft_jax.train.run` builds the union), with no regulariser, so
the model after the last task has seen all data (with ``optim.reset_per_task`` the optimiser is
restarted each task, and earlier data are revisited in every later task). Data weight 1.
"""

from __future__ import annotations

import dataclasses

from cft_jax.methods.base import Method


@dataclasses.dataclass(frozen=True)
class Joint(Method):
  """Multi-task upper bound: cumulative data, plain loss."""

  name: str = "joint"
  cumulative_data: bool = True
