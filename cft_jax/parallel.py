"""Devices and hosts: multi-host start-up and the two data-parallel layouts of the train step.

A run sees ``P`` processes (hosts) with ``n`` local devices each. The global batch ``[B, ...]``
(the same NumPy batch on every process: every host reads the same seeded batch order) is split
over the ``P * n`` devices; state and frozen weights are replicated.

- :class:`ShardedLayout` (``train.parallelism = "sharding"``, the default with more than one
  device): the one-device step under ``jax.jit`` over a 1-D ``Mesh(devices, ("data",))``; batch
  arrays ``NamedSharding(mesh, P("data"))``, everything else ``P()``. With several processes each
  one builds the global batch from its own rows with
  ``jax.make_array_from_process_local_data``.
- :class:`PmapLayout` (``train.parallelism = "pmap"``): the step ``jax.pmap``-ped over the local
  devices with ``axis_name="batch"`` (the axis spans every process's devices); batch arrays are
  this host's rows reshaped ``[n, B / (P n), ...]``, state has a leading device axis.
- :class:`SingleLayout`: one device, one process: plain ``jax.jit``.

All three give the metrics of a one-device run up to float rounding (:mod:`cft_jax.steps`).
:func:`init_distributed` must run before any other JAX call (``cft_jax.main`` calls it right
after parsing the config).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import jax
import ml_collections
import numpy as np

from cft_jax.schema import Key, fill_defaults

PyTree = Any
PARALLELISM = ("auto", "sharding", "pmap")
DATA_AXIS = "data"

# Environment variables that mark a cluster launch where ``jax.distributed.initialize()`` with no
# arguments finds the coordinator itself (SLURM, Open MPI, TPU pod slices).
_AUTO_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
             "MEGASCALE_COORDINATOR_ADDRESS")


def _auto_detect() -> bool:
  """Whether the environment is a multi-process cluster launch JAX can auto-configure."""
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    try:
      if int(os.environ.get(var, "1")) > 1:
        return True
    except ValueError:
      pass
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h.strip()]) > 1 or bool(
      os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


# The ``distributed`` section of the config (read by :func:`init_distributed`): keys, defaults and
# allowed values (:mod:`cft_jax.schema`; assembled by :mod:`cft_jax.registry`).
DISTRIBUTED_KEYS = (
    Key("coordinator_address", "", '"host:port" of process 0 ("" : single host)'),
    Key("num_processes", 0, "multi-host: number of processes (0: auto-detect)", non_negative=True),
    Key("process_id", -1, "multi-host: this process's id (-1: auto-detect)"),
)


def init_distributed(cfg: Optional[ml_collections.ConfigDict]) -> bool:
  """Starts JAX's multi-process runtime, if this run has several processes. Call it first.

  From ``config.distributed`` (``coordinator_address`` ``"host:port"`` of process 0,
  ``num_processes``, ``process_id``), or, when ``coordinator_address`` is empty and the
  environment is a SLURM job with ``SLURM_NTASKS > 1``, an Open MPI launch or a TPU pod slice,
  ``jax.distributed.initialize()`` with no arguments (JAX reads the cluster's variables). On the
  CPU the cross-process collectives use gloo (``jax_cpu_collectives_implementation``).
  Idempotent: a second call does nothing.

  Returns:
    True if the runtime was started (now or before), False for a single-process run.

  Raises:
    ValueError: ``coordinator_address`` without ``num_processes`` / ``process_id``, or a JAX
      backend already started (some JAX computation ran before this call).
  """
  from jax._src import distributed as _dist  # pylint: disable=g-import-not-at-top
  if getattr(_dist.global_state, "client", None) is not None:
    return True
  cfg = fill_defaults(DISTRIBUTED_KEYS, cfg)  # keys a partial section lacks: their defaults
  addr = cfg.coordinator_address or ""
  num = int(cfg.num_processes or 0)
  pid = cfg.process_id
  pid = -1 if pid is None else int(pid)
  if addr:
    if num < 1 or pid < 0:
      raise ValueError("distributed.coordinator_address is set: also set "
                       "distributed.num_processes (>= 1) and distributed.process_id (0-based) "
                       "on every process, or leave all three empty on SLURM / TPU pods")
    if pid >= num:
      raise ValueError(f"distributed.process_id={pid} must be < distributed.num_processes={num}")
    if num == 1:
      return False
    kwargs = dict(coordinator_address=addr, num_processes=num, process_id=pid)
  elif _auto_detect():
    kwargs = {}
  else:
    return False
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception:  # pylint: disable=broad-except  (an older jax without the option)
    pass
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:
    raise ValueError(f"jax.distributed.initialize failed ({e}); it must run before any other "
                     "JAX call (cft_jax.main does this)") from e
  return True


class SingleLayout:
  """One device, one process: arrays pass through; steps are plainly ``jax.jit``-ted.

  Attributes (shared by every layout):
    kind: ``"single"``, ``"sharding"`` or ``"pmap"``.
    n: local devices used; ``process_index``, ``process_count``: this host and the host count.
    num_devices: ``n * process_count``, the devices the global batch is split over.
    axis_name: the pmap axis (``"batch"``) or None.
    shardings: ``(replicated, batch)`` for a sharded jit, or None.
    is_main: whether this process writes logs, metrics, plots (process 0).
  """

  kind = "single"
  axis_name: Optional[str] = None
  shardings: Optional[Tuple[Any, Any]] = None

  def __init__(self, num_devices: int = 1, process_index: int = 0, process_count: int = 1):
    self.n = num_devices
    self.process_index, self.process_count = process_index, process_count
    self.num_devices = num_devices * process_count
    self.devices = jax.local_devices()[:num_devices]

  @property
  def is_main(self) -> bool:
    return self.process_index == 0

  def shard(self, arrays):
    """The global-batch arrays ``[B, ...]`` as the step takes them."""
    return tuple(arrays)

  def replicate(self, tree):
    """``tree`` placed as the step's replicated state / frozen weights."""
    return tree

  def unreplicate(self, tree):
    """One local copy of replicated ``tree`` (single-device arrays, usable eagerly)."""
    return tree

  def first(self, x):
    """The value of a replicated output (metric scalar) as a local array."""
    return x

  def wrap_eval(self, eval_step):
    """Eval step taking a global batch and returning global counts ``[2]`` (NumPy)."""
    return eval_step


class ShardedLayout(SingleLayout):
  """``jax.jit`` over a 1-D ``Mesh(devices, ("data",))``: batch ``P("data")``, the rest ``P()``.

  ``devices`` is every process's first ``n`` local devices, process-major, so process ``p`` owns
  the rows ``[p B / P, (p + 1) B / P)`` of the global batch.
  """

  kind = "sharding"

  def __init__(self, num_devices: int = 1, process_index: int = 0, process_count: int = 1):
    super().__init__(num_devices, process_index, process_count)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
    by_process = {}
    for d in jax.devices():
      by_process.setdefault(d.process_index, []).append(d)
    devs = [d for p in sorted(by_process) for d in sorted(by_process[p], key=lambda d: d.id)[
        :num_devices]]
    self.mesh = Mesh(np.array(devs), (DATA_AXIS,))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
    self.shardings = (self.replicated, self.batch)

  def _rows(self, global_rows: int) -> slice:
    """This process's rows of a global batch of ``global_rows``."""
    per = global_rows // self.process_count
    return slice(self.process_index * per, (self.process_index + 1) * per)

  def shard(self, arrays):
    out = []
    for x in arrays:
      x = np.asarray(x)
      if self.process_count == 1:
        out.append(jax.device_put(x, self.batch))
      else:
        out.append(jax.make_array_from_process_local_data(self.batch, x[self._rows(x.shape[0])],
                                                          x.shape))
    return tuple(out)

  def replicate(self, tree):
    def one(x):
      x = np.asarray(x)
      if self.process_count == 1:
        return jax.device_put(x, self.replicated)
      return jax.make_array_from_callback(x.shape, self.replicated, lambda idx: x[idx])

    return jax.tree_util.tree_map(one, jax.device_get(self.unreplicate(tree)))

  def unreplicate(self, tree):
    def one(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x.addressable_data(0)
      return x

    return jax.tree_util.tree_map(one, tree)

  def first(self, x):
    return self.unreplicate(x)

  def wrap_eval(self, eval_step):
    def wrapped(state, frozen, images, labels, mask, num_seen, task_lo):
      out = eval_step(state, frozen, *self.shard((images, labels, mask)), num_seen, task_lo)
      return np.asarray(self.unreplicate(out))

    return wrapped


class PmapLayout(SingleLayout):
  """``jax.pmap`` over ``axis_name="batch"``: this host's rows ``[B / P]`` reshaped
  ``[n, B / (P n), ...]``; state and frozen weights replicated once with a leading axis ``n``."""

  kind = "pmap"
  axis_name = "batch"

  def shard(self, arrays):
    def one(x):
      x = np.asarray(x)
      per_host = x.shape[0] // self.process_count
      x = x[self.process_index * per_host:(self.process_index + 1) * per_host]
      return x.reshape((self.n, per_host // self.n) + x.shape[1:])

    return tuple(one(x) for x in arrays)

  def replicate(self, tree):
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(self.devices), ("batch",)),
                                          jax.sharding.PartitionSpec("batch"))
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (self.n,) + np.shape(x)),
                                 sharding), jax.device_get(tree))

  def unreplicate(self, tree):
    return jax.tree_util.tree_map(lambda x: x[0], tree)

  def first(self, x):
    return x[0]

  def wrap_eval(self, eval_step):
    def wrapped(state, frozen, images, labels, mask, num_seen, task_lo):
      out = eval_step(state, frozen, *self.shard((images, labels, mask)), num_seen, task_lo)
      return np.asarray(out)[0]

    return wrapped


def make_layout(parallelism: str = "auto", num_devices: int = 1,
                process_index: Optional[int] = None, process_count: Optional[int] = None
                ) -> SingleLayout:
  """The layout for ``num_devices`` local devices on each of ``process_count`` processes.

  ``parallelism``: ``"auto"`` (``sharding`` when more than one device in total, else single),
  ``"sharding"`` or ``"pmap"``.

  Raises:
    ValueError: unknown ``parallelism``.
  """
  if parallelism not in PARALLELISM:
    raise ValueError(f"train.parallelism={parallelism!r}; choose one of {list(PARALLELISM)}")
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if num_devices * pc == 1 and parallelism != "pmap":
    return SingleLayout(num_devices, pi, pc)
  if parallelism == "pmap":
    return PmapLayout(num_devices, pi, pc)
  return ShardedLayout(num_devices, pi, pc)


def layout_from_config(config: ml_collections.ConfigDict) -> SingleLayout:
  """From the resolved config (:func:`cft_jax.config.validate_config`): reads ``train.num_devices`` (0: all local devices) and ``train.parallelism``, and checks
  that the batch sizes split evenly over every device of every process.

  Raises:
    ValueError: more devices requested than present, or batch sizes not divisible.
  """
  local = jax.local_device_count()
  n = int(config.train.num_devices or local)
  if n > local:
    raise ValueError(f"train.num_devices={n} but only {local} local devices exist")
  layout = make_layout(config.train.parallelism, n)
  for key, b in (("train.batch_size", config.train.batch_size),
                 ("eval.batch_size", config.eval.batch_size)):
    if b % layout.num_devices:
      raise ValueError(f"{key}={b} must be divisible by the {layout.num_devices} devices it is "
                       f"split over")
  return layout


def DeviceLayout(num_devices: int = 1, process_index: int = 0,  # pylint: disable=invalid-name
                 process_count: int = 1) -> SingleLayout:
  """The pmap layout under its earlier name (``train.DeviceLayout(n)``): :class:`PmapLayout` for
  more than one device in total, else :class:`SingleLayout`."""
  if num_devices * process_count > 1:
    return PmapLayout(num_devices, process_index, process_count)
  return SingleLayout(num_devices, process_index, process_count)
