"""A safe reader for Megatron's zip ``torch.save`` files: no code from the file runs, tensors are read lazily.

Each rank file is a zip holding ``data.pkl`` and one uncompressed record per storage
(``<prefix>/data/<key>``). :func:`load_megatron_file` parses the pickle with :class:`RestrictedUnpickler`
(an allow-list of globals, inert stand-ins for ``megatron.*``) and turns every tensor into a
:class:`LazyTensor` (where its bytes lie); bytes are read, CRC-checked, only for the tensors asked for.
Nothing here knows about Yuan: the checkpoint layout is ``checkpoint.py``, the names ``merge.py``.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import functools
import io
import pickle
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..common import ConversionError, is_legacy_torch_save

__all__ = ["DROPPED_ENTRIES", "LazyTensor", "MegatronStub", "RestrictedUnpickler", "flatten_model_state", "load_megatron_file"]

# Top-level entries of a rank file that a conversion never needs. They are unpickled as structure only:
# their tensors are never read from disk (see LazyTensor), then the entries are dropped.
DROPPED_ENTRIES = ("optimizer", "opt_param_scheduler", "lr_scheduler", "rng_state")

class MegatronStub:
    """Inert stand-in for an object of one of Megatron's own classes, e.g. ``args.model_type``
    (``megatron.core.enums.ModelType``). It records what the pickle asked for and runs nothing.
    """

    megatron_global: ClassVar[str] = "megatron"

    def __new__(cls, *args: Any, **kwargs: Any) -> MegatronStub:
        self = object.__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        return self

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<megatron stub {self.megatron_global} {self.args}>"


@functools.cache
def _stub_class(module: str, name: str) -> type[MegatronStub]:
    return type(name, (MegatronStub,), {"megatron_global": f"{module}.{name}", "__module__": __name__})


@dataclass(frozen=True)
class _StorageRecord:
    """Where one storage's bytes lie in a zip ``torch.save`` file (always stored uncompressed)."""

    path: Path
    name: str  # e.g. "model_optim_rng/data/3"
    header_offset: int
    nbytes: int
    crc: int
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class LazyTensor:
    """A tensor of a checkpoint file that has not been read: shape and dtype now, bytes on :meth:`load`.

    ``load`` reads exactly this tensor's storage from the file (checking the zip CRC), so a caller holds
    at most the tensors it is working on; optimizer state is never read at all.
    """

    storage: _StorageRecord
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.size)

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def load(self) -> torch.Tensor:
        """Read the bytes; the result owns a storage of exactly its own size (views are copied out)."""
        record = self.storage
        raw = torch.empty(record.nbytes, dtype=torch.uint8)
        buffer = raw.numpy()
        with open(record.path, "rb") as file:
            file.seek(record.header_offset)
            header = file.read(30)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise ConversionError(f"{record.path}: zip entry {record.name} has no valid header; the file is corrupt")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            file.seek(record.header_offset + 30 + name_len + extra_len)
            got = file.readinto(memoryview(buffer)) if record.nbytes else 0
        if got != record.nbytes:
            raise ConversionError(
                f"{record.path}: zip entry {record.name} ends after {got} of {record.nbytes} bytes; "
                "the file is truncated, copy it again"
            )
        if zlib.crc32(buffer) != record.crc:
            raise ConversionError(f"{record.path}: zip entry {record.name} fails its CRC check; the file is corrupt")
        storage = raw.view(record.dtype) if record.nbytes else torch.empty(0, dtype=record.dtype)
        tensor = storage.as_strided(self.size, self.stride, self.offset)
        if tensor.is_contiguous() and tensor.numel() == storage.numel():
            return tensor
        return tensor.clone(memory_format=torch.contiguous_format)


def _lazy_rebuild_tensor(storage: _StorageRecord, offset: int, size: tuple, stride: tuple, *_: Any) -> LazyTensor:
    """Stands in for ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, ...)``."""
    if not isinstance(storage, _StorageRecord):
        raise ConversionError(f"a tensor is rebuilt from {type(storage).__name__}, not from a storage record")
    size, stride, offset = tuple(int(n) for n in size), tuple(int(n) for n in stride), int(offset)
    inside = len(size) == len(stride) and offset >= 0
    if inside and all(size):  # the last element a non-empty tensor touches must lie in its storage
        inside = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True)) < storage.numel
    if not inside:
        raise ConversionError(
            f"{storage.path}: a tensor of shape {list(size)} (offset {offset}, stride {list(stride)}) "
            f"lies outside its storage {storage.name} of {storage.numel} elements; the file is corrupt"
        )
    return LazyTensor(storage, offset, size, stride)


def _lazy_rebuild_parameter(data: LazyTensor, *_: Any) -> LazyTensor:
    """Stands in for ``torch._utils._rebuild_parameter[_with_state]``: a parameter is read as its tensor."""
    return data


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Every global a Megatron rank file legitimately references, and what it resolves to here."""
    reconstruct = np.ndarray.__reduce__(np.empty(0))[0]  # numpy[._]core.multiarray._reconstruct
    scalar = np.float64(0).__reduce__()[0]  # numpy[._]core.multiarray.scalar
    allowed: dict[tuple[str, str], Any] = {
        ("argparse", "Namespace"): argparse.Namespace,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles (numpy RNG state)
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("torch", "Size"): torch.Size,
        ("torch._utils", "_rebuild_tensor_v2"): _lazy_rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _lazy_rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _lazy_rebuild_parameter,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = functools.partial(_bounded_reconstruct, reconstruct)
        allowed[(module, "scalar")] = scalar
    for name, value in vars(getattr(np, "dtypes", object)).items():  # numpy >= 1.25 pickles dtypes as classes
        if isinstance(value, type) and issubclass(value, np.dtype):
            allowed[("numpy.dtypes", name)] = value
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    return allowed


# numpy pickles an array as ``_reconstruct(ndarray, (0,), b"b")`` then ``__setstate__`` with the data; the
# first call allocates its shape, so a hostile file could ask for a terabyte there. The data of a real
# array comes with __setstate__, whose size numpy checks against the bytes actually present.
MAX_RECONSTRUCT_ELEMENTS = 1 << 20
# Megatron nests its state about 5 levels deep (model -> language_model -> encoder -> key); anything far
# deeper is not a checkpoint, and walking it recursively would exhaust the stack.
MAX_NESTING = 64


def _bounded_reconstruct(reconstruct: Any, subtype: Any, shape: Any, dtype: Any) -> Any:
    try:
        elements = int(np.prod(np.asarray(shape, dtype=np.int64))) if np.ndim(shape) else int(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConversionError(f"a numpy array is declared with the shape {shape!r}; the file is corrupt") from exc
    if elements > MAX_RECONSTRUCT_ELEMENTS or elements < 0:
        raise ConversionError(
            f"a numpy array is declared with {elements} elements before its data (numpy's own pickles declare 0); "
            "refusing to allocate it: the file is corrupt or hostile"
        )
    return reconstruct(subtype, shape, dtype)


def _check_nesting(value: Any, path: Path) -> None:
    """Raise if containers nest deeper than :data:`MAX_NESTING` (iteratively: no recursion on hostile input)."""
    stack = [(value, 0)]
    seen: set[int] = set()
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            raise ConversionError(
                f"{path}: containers nest more than {MAX_NESTING} levels deep (a Megatron checkpoint nests about 5); "
                "refusing to read it: the file is corrupt or not a checkpoint"
            )
        if id(node) in seen:
            continue
        if isinstance(node, Mapping):
            seen.add(id(node))
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            seen.add(id(node))
            stack.extend((child, depth + 1) for child in node)
        elif isinstance(node, argparse.Namespace):
            seen.add(id(node))
            stack.extend((child, depth + 1) for child in vars(node).values())


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a rank file's ``data.pkl`` without running anything from it.

    ``find_class`` resolves only the allow-list above; ``torch.*Storage`` classes resolve to their dtype (what
    ``persistent_load`` needs); ``megatron.*`` globals become inert :class:`MegatronStub` subclasses; anything
    else is refused with a :class:`ConversionError`. Tensors become :class:`LazyTensor` records: no tensor
    bytes are read while unpickling.
    """

    def __init__(self, data: bytes, *, source: Path, records: Mapping[str, zipfile.ZipInfo], prefix: str):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.source, self.records, self.prefix = source, records, prefix

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol-2 pickles use Python 2's name
        if module == "megatron" or module.startswith("megatron."):
            return _stub_class(module, name)
        if module == "torch" and name == "UntypedStorage":
            return torch.uint8
        if module == "torch" and name.endswith("Storage"):
            try:
                return torch.serialization.StorageType(name).dtype
            except KeyError:
                pass  # not a storage torch knows: refused below
        found = _allowed_globals().get((module, name))
        if found is None:
            raise ConversionError(
                f"{self.source}: refusing to unpickle the global {module}.{name}. A Megatron checkpoint only "
                "references argparse.Namespace, collections.OrderedDict, torch tensors/storages/dtypes, numpy "
                "arrays and megatron.* enums; anything else could run code, so nothing from this file was "
                "executed. If the file is a genuine checkpoint, report this global so it can be allow-listed."
            )
        return found

    def persistent_load(self, pid: Any) -> _StorageRecord:
        """``('storage', StorageType, key, location, numel)`` -> where the bytes are, unread."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise ConversionError(f"{self.source}: unexpected persistent id {pid!r}; not a torch.save zip file")
        _, storage_type, key, _location, numel = pid
        dtype = _storage_dtype(storage_type, self.source)
        name = f"{self.prefix}data/{key.decode() if isinstance(key, bytes) else key}"
        info = self.records.get(name)
        if info is None:
            raise ConversionError(f"{self.source}: storage {name} is referenced but missing; the file is corrupt")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ConversionError(f"{self.source}: storage {name} is compressed; torch.save never does that")
        if info.file_size != numel * _element_size(dtype):
            raise ConversionError(
                f"{self.source}: storage {name} holds {info.file_size} bytes, expected {numel} x {dtype}; "
                "the file is corrupt"
            )
        return _StorageRecord(self.source, name, info.header_offset, info.file_size, info.CRC, dtype, int(numel))


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _storage_dtype(storage_type: Any, source: Path) -> torch.dtype:
    """``torch.BFloat16Storage`` & co. (which ``find_class`` resolves to their dtype) -> dtype."""
    if isinstance(storage_type, torch.dtype):
        return storage_type
    raise ConversionError(f"{source}: a storage of unknown type {storage_type!r}; the file is corrupt")


def open_zip(path: Path) -> tuple[bytes, dict[str, zipfile.ZipInfo], str]:
    """The ``data.pkl`` bytes, the zip directory and the record prefix of a zip ``torch.save`` file.

    Refuses legacy (pre-zip) files, TorchScript archives (``torch.load`` would hand those to ``torch.jit.load``)
    and big-endian saves; reads the central directory and ``data.pkl`` only.
    """
    if not path.is_file():
        raise ConversionError(f"checkpoint file {path} does not exist")
    if not zipfile.is_zipfile(path):
        if is_legacy_torch_save(path):
            raise ConversionError(
                f"{path} is a legacy (pre-1.6, non-zip) torch.save file, which this reader does not parse. Re-save it "
                "with a recent torch in a trusted environment (torch.save(torch.load(path, weights_only=False), path); "
                "Megatron's own classes must be importable there), then convert again"
            )
        raise ConversionError(
            f"{path} is not a zip torch.save file: it is truncated or corrupt (or a legacy pre-1.6 torch "
            "file, which is not supported: load and re-save it with a recent torch in a trusted environment)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            records = {info.filename: info for info in archive.infolist()}
            pickles = [name for name in records if name == "data.pkl" or name.endswith("/data.pkl")]
            if any(name.endswith("constants.pkl") for name in records):
                raise ConversionError(f"{path} is a TorchScript archive, not a Megatron checkpoint; refusing to load it")
            if len(pickles) != 1:
                raise ConversionError(f"{path}: expected one data.pkl in the zip, found {len(pickles)}")
            prefix = pickles[0][: -len("data.pkl")]
            data = archive.read(pickles[0])  # zipfile checks the CRC
            if f"{prefix}byteorder" in records and archive.read(f"{prefix}byteorder").decode() != sys.byteorder:
                raise ConversionError(f"{path} was saved on a machine of the other byte order; that is not supported")
    except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}; the file is corrupt, copy it again") from exc
    return data, records, prefix


def load_megatron_file(
    path: str | Path, *, lazy: bool = False, drop: Collection[str] = DROPPED_ENTRIES
) -> dict[str, Any]:
    """Read one ``model_optim_rng.pt`` safely; no code from the file runs.

    The pickle is parsed by :class:`RestrictedUnpickler` (an allow-list of globals; ``megatron.*`` objects
    such as ``args.model_type`` become inert :class:`MegatronStub`; any other global raises
    :class:`ConversionError` naming it and the file). Tensor bytes are read by this module, not by
    ``torch.load``: top-level entries in ``drop`` (optimizer, scheduler, RNG state) are parsed as structure only
    and their tensors are never read from disk, which ``torch.load`` cannot do (it reads or maps every storage
    while unpickling).

    Args:
        path: A zip-format ``torch.save`` file (torch >= 1.6, which every Megatron of Yuan's era writes).
        lazy: Return tensors as :class:`LazyTensor` (shape/dtype only; ``.load()`` reads one) instead of reading
            all kept tensors now.
        drop: Top-level entries to discard.

    Returns:
        The file's top-level dict without ``drop``: typically ``args`` (``argparse.Namespace``),
        ``checkpoint_version`` (3.0), ``iteration`` and ``model`` (nested dicts of tensors).
    """
    path = Path(path)
    data, records, prefix = open_zip(path)
    try:
        loaded = RestrictedUnpickler(data, source=path, records=records, prefix=prefix).load()
    except ConversionError as exc:
        if str(path) in str(exc):
            raise
        raise ConversionError(f"{path}: {exc}") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            RecursionError, UnicodeDecodeError) as exc:  # fmt: skip
        raise ConversionError(
            f"cannot read checkpoint file {path}: {type(exc).__name__}: {exc}. The file is truncated or corrupt; "
            "copy it again from the source"
        ) from exc
    _check_nesting(loaded, path)
    if not isinstance(loaded, Mapping):
        raise ConversionError(f"{path} holds a {type(loaded).__name__}, expected the dict Megatron saves")
    kept = {key: value for key, value in loaded.items() if key not in drop}
    del loaded
    return kept if lazy else _materialize(kept)


def _materialize(value: Any) -> Any:
    """Replace every :class:`LazyTensor` in nested dicts / lists by the tensor it stands for."""
    if isinstance(value, LazyTensor):
        return value.load()
    if type(value) in (dict, OrderedDict):
        return type(value)((k, _materialize(v)) for k, v in value.items())
    if type(value) in (list, tuple):
        return type(value)(_materialize(v) for v in value)
    return value


def flatten_model_state(model: Mapping, *, source: str | Path = "<model>") -> dict[str, Any]:
    """Megatron's nested ``state_dict_for_save_checkpoint`` -> the flat names ``state_dict()`` gives.

    ``{"language_model": {"embedding": {"word_embeddings": {"weight": t}}, "encoder": {"layers.0.x.weight": u}}}``
    -> ``{"language_model.embedding.word_embeddings.weight": t, "language_model.encoder.layers.0.x.weight": u}``.
    Leaves must be tensors (or :class:`LazyTensor`).
    """
    flat: dict[str, Any] = {}

    def visit(prefix: str, node: Mapping) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                visit(name + ".", value)
            elif isinstance(value, (torch.Tensor, LazyTensor)):
                flat[name] = value
            else:
                raise ConversionError(
                    f"{source}: model entry {name!r} is a {type(value).__name__}, expected a tensor or a dict"
                )

    visit("", model)
    return flat

