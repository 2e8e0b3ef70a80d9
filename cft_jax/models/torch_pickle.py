"""Torch-free reader for PyTorch checkpoint files (``torch.save`` output).

Two on-disk formats are supported:

* **Legacy** (PyTorch < 1.6, ``_use_new_zipfile_serialization=False``): a
  sequence of pickles in one file -- magic number, protocol version, sys info,
  the pickled object (tensors reference their storages through
  ``persistent_load``), a pickled list of storage keys, then for every key in
  that order an 8-byte little-endian element count followed by the raw
  little-endian storage bytes.
* **Zip** (PyTorch >= 1.6): a zip archive holding ``<prefix>/data.pkl`` and one
  raw little-endian file per storage at ``<prefix>/data/<key>``.

The very old tar format and anything else raise ``ValueError``.

Security: the unpickler's ``find_class`` resolves only an allow-list of names
(``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``,
``torch._utils._rebuild_parameter`` and the ``torch.*Storage`` classes), each
mapped to a light local stand-in; any other global raises
``pickle.UnpicklingError``. No torch (or other third-party) code is imported
or executed.

Only state-dict-like checkpoints are meaningful here: the result is a flat
``dict[str, np.ndarray]`` (nested dicts are flattened with ``.`` separators).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

__all__ = ["load_torch_state_dict"]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch storage class name -> numpy little-endian dtype
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    # bfloat16 has no numpy dtype: read as uint16 and widen to float32 below.
    "BFloat16Storage": np.dtype("<u2"),
}


class _StorageType:
    """Stand-in for a ``torch.<X>Storage`` class referenced in the pickle."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"_StorageType({self.name})"


class _StorageRef:
    """A storage referenced by a tensor; ``data`` is filled in later."""

    def __init__(self, storage_type: _StorageType, key: str, numel: int | None):
        self.storage_type = storage_type
        self.key = key
        self.numel = numel
        self.data: np.ndarray | None = None  # 1-D array of storage_type.dtype


class _StorageView:
    """Legacy-format view into another storage (``view_metadata``)."""

    def __init__(self, base: _StorageRef, offset: int, size: int):
        self.base = base
        self.offset = offset
        self.size = size
        self.storage_type = base.storage_type


class _LazyTensor:
    """Result of ``_rebuild_tensor_v2``: materialised after storages are read."""

    def __init__(self, storage, storage_offset, size, stride):
        self.storage = storage
        self.storage_offset = int(storage_offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)

    def materialize(self) -> np.ndarray:
        st = self.storage
        offset = self.storage_offset
        if isinstance(st, _StorageView):
            offset += st.offset
            st = st.base
        if st.data is None:
            raise ValueError(f"storage {st.key!r} was never read from the file")
        flat = st.data
        if len(self.size) == 0:
            out = flat[offset : offset + 1].reshape(())
        else:
            n_needed = 1 + sum((s - 1) * d for s, d in zip(self.size, self.stride) if s > 0)
            if any(s == 0 for s in self.size):
                out = np.zeros(self.size, dtype=flat.dtype)
            else:
                if offset + n_needed > flat.size:
                    raise ValueError("tensor view exceeds its storage: corrupt checkpoint")
                itemsize = flat.dtype.itemsize
                out = np.lib.stride_tricks.as_strided(
                    flat[offset:],
                    shape=self.size,
                    strides=tuple(d * itemsize for d in self.stride),
                    writeable=False,
                )
        out = np.array(out, copy=True)  # contiguous, owns its memory
        if st.storage_type.name == "BFloat16Storage":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}
for _name in _STORAGE_DTYPES:
    _ALLOWED_GLOBALS[("torch", _name)] = _StorageType(_name)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves allow-listed globals to local stand-ins."""

    def __init__(self, file: BinaryIO, storages: dict[str, _StorageRef], zip_format: bool):
        super().__init__(file, encoding="utf-8")
        self._storages = storages
        self._zip_format = zip_format

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only tensors and "
                "OrderedDicts of tensors (state dicts) are supported"
            ) from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        if self._zip_format:
            # ('storage', storage_type, key, location, numel)
            _, storage_type, key, _location, numel = pid[:5]
            view_metadata = None
        else:
            # ('storage', storage_type, key, location, numel, view_metadata)
            _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        key = str(key)
        ref = self._storages.get(key)
        if ref is None:
            ref = _StorageRef(storage_type, key, numel)
            self._storages[key] = ref
        if view_metadata is not None:
            _view_key, offset, view_size = view_metadata
            return _StorageView(ref, int(offset), int(view_size))
        return ref


def _flatten(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(obj, _LazyTensor):
        out[prefix] = obj.materialize()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        pass  # metadata such as "epoch" entries; not tensors
    else:
        raise ValueError(f"unsupported object of type {type(obj).__name__} at {prefix!r}")


def _load_legacy(f: BinaryIO) -> Any:
    def restricted_load(fh):
        # The header pickles only hold ints and dicts of ints/strings.
        return _RestrictedUnpickler(fh, {}, zip_format=False).load()

    magic = restricted_load(f)
    if magic != LEGACY_MAGIC_NUMBER:
        raise ValueError("not a PyTorch legacy checkpoint (bad magic number)")
    version = restricted_load(f)
    if version != LEGACY_PROTOCOL_VERSION:
        raise ValueError(f"unsupported legacy protocol version {version}")
    sys_info = restricted_load(f)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise ValueError("big-endian PyTorch checkpoints are not supported")

    storages: dict[str, _StorageRef] = {}
    result = _RestrictedUnpickler(f, storages, zip_format=False).load()
    keys = restricted_load(f)
    for key in keys:
        key = str(key)
        ref = storages.get(key)
        if ref is None:
            raise ValueError(f"storage {key!r} listed but not referenced by the pickle")
        header = f.read(8)
        if len(header) != 8:
            raise ValueError("truncated checkpoint (storage header)")
        (numel,) = struct.unpack("<q", header)
        dtype = ref.storage_type.dtype
        nbytes = numel * dtype.itemsize
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise ValueError(f"truncated checkpoint (storage {key!r})")
        ref.data = np.frombuffer(buf, dtype=dtype)
    return result


def _load_zip(path: str | os.PathLike) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise ValueError("zip file without data.pkl: not a PyTorch checkpoint")
        pkl_name = min(pkl, key=len)
        prefix = pkl_name[: -len("data.pkl")]
        storages: dict[str, _StorageRef] = {}
        with zf.open(pkl_name) as fh:
            result = _RestrictedUnpickler(io.BytesIO(fh.read()), storages, zip_format=True).load()
        for key, ref in storages.items():
            name = f"{prefix}data/{key}"
            try:
                raw = zf.read(name)
            except KeyError:
                raise ValueError(f"missing storage record {name!r}") from None
            data = np.frombuffer(raw, dtype=ref.storage_type.dtype)
            if ref.numel is not None and data.size < int(ref.numel):
                raise ValueError(f"storage {key!r} is truncated")
            ref.data = data
    return result


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch checkpoint without torch.

    Args:
      path: a file written by ``torch.save`` holding a state dict (an
        ``OrderedDict`` of tensors, possibly nested in plain dicts).

    Returns:
      ``{name: np.ndarray}`` in file order, arrays contiguous and owning their
      memory, dtypes as stored (bfloat16 is widened to float32).

    Raises:
      ValueError: for formats other than legacy (pre-1.6) and zip (>= 1.6)
        serialization, or for a truncated/corrupt file.
      pickle.UnpicklingError: if the pickle references a global outside the
        allow-list (e.g. a pickled ``nn.Module``).
    """
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        obj = _load_zip(path)
    else:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if len(head) < 2 or head[0] != 0x80:  # pickle PROTO opcode
                raise ValueError(
                    f"{path}: unsupported checkpoint format (neither a zip archive nor a "
                    "legacy pickle stream; the pre-1.0 tar format is not supported)"
                )
            try:
                obj = _load_legacy(f)
            except (EOFError, struct.error) as e:
                raise ValueError(f"{path}: truncated or unsupported checkpoint: {e}") from e
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    return out
