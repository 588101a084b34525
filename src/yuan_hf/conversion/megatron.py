"""Megatron-LM checkpoints of Yuan 2.0-M32: a safe reader, the TP/PP merge into IEIT's HF layout, and a writer.

On disk (IEIT's Megatron fork; details in ``shared/fixtures/README.md``)::

    ROOT/latest_checkpointed_iteration.txt                          "1477" or "release" (newline optional)
    ROOT/iter_0001477/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt  when PP > 1
    ROOT/iter_0001477/mp_rank_{tp:02d}/model_optim_rng.pt           when PP == 1

Each file is a zip ``torch.save`` of ``{"args": Namespace, "checkpoint_version": 3.0, "iteration": int,
"model": nested dict, "rng_state": [...]}`` (training saves add ``optimizer`` / ``opt_param_scheduler``).

The pieces, in data-flow order:

* :func:`load_megatron_file` parses a file with a restricted unpickler (an allow-list of globals, inert
  stand-ins for ``megatron.*``) and reads tensor bytes itself, only for the tensors asked for.
* :class:`MegatronCheckpoint` finds and validates the rank files of one iteration.
* :func:`native_config_from_args` turns the saved training arguments into ``YuanM32Config`` kwargs.
* :func:`iter_ieit_stages` yields one pipeline stage at a time, TP-merged, named and laid out exactly like
  IEIT's HF checkpoint (global layer numbers); ``ieit_hf.py`` takes it from there to the native layout.
* :func:`write_megatron_checkpoint` is the inverse, for synthetic checkpoints (tests, demo, benchmark).
"""

from __future__ import annotations

import argparse
import codecs
import collections
import copy
import functools
import io
import pickle
import random
import re
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from .common import SFT_ROPE_THETA, ConversionError, KeyTable, atomic_output_dir, check_all_used, tensor_digest

__all__ = [
    "DROPPED_ENTRIES",
    "LazyTensor",
    "MEGATRON_TO_IEIT",
    "MegatronCheckpoint",
    "MegatronDims",
    "MegatronStub",
    "flatten_model_state",
    "ieit_key_shapes",
    "iter_ieit_stages",
    "load_megatron_file",
    "megatron_args_for",
    "convert_megatron",
    "native_config_from_args",
    "write_megatron_checkpoint",
]

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
RMS_NORM_EPS = 1e-6  # IEIT's Megatron hard-codes RMSNorm(eps=1e-6); args.layernorm_epsilon only feeds LayerNorm

# Top-level entries of a rank file that a conversion never needs. They are unpickled as structure only:
# their tensors are never read from disk (see LazyTensor), then the entries are dropped.
DROPPED_ENTRIES = ("optimizer", "opt_param_scheduler", "lr_scheduler", "rng_state")


# ----------------------------------------------------------------------------------------------------------------
# Safe reading
# ----------------------------------------------------------------------------------------------------------------


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
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    for name, value in vars(getattr(np, "dtypes", object)).items():  # numpy >= 1.25 pickles dtypes as classes
        if isinstance(value, type) and issubclass(value, np.dtype):
            allowed[("numpy.dtypes", name)] = value
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    return allowed


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


def _open_zip(path: Path) -> tuple[bytes, dict[str, zipfile.ZipInfo], str]:
    """The ``data.pkl`` bytes, the zip directory and the record prefix of a zip ``torch.save`` file.

    Refuses legacy (pre-zip) files, TorchScript archives (``torch.load`` would hand those to ``torch.jit.load``)
    and big-endian saves; reads the central directory and ``data.pkl`` only.
    """
    if not path.is_file():
        raise ConversionError(f"checkpoint file {path} does not exist")
    if not zipfile.is_zipfile(path):
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
    data, records, prefix = _open_zip(path)
    try:
        loaded = RestrictedUnpickler(data, source=path, records=records, prefix=prefix).load()
    except ConversionError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            RecursionError, UnicodeDecodeError) as exc:  # fmt: skip
        raise ConversionError(
            f"cannot read checkpoint file {path}: {type(exc).__name__}: {exc}. The file is truncated or corrupt; "
            "copy it again from the source"
        ) from exc
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


# ----------------------------------------------------------------------------------------------------------------
# Training arguments -> sizes and native config
# ----------------------------------------------------------------------------------------------------------------


def _args_dict(args: argparse.Namespace | Mapping) -> dict[str, Any]:
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)


def _need(args: Mapping[str, Any], name: str) -> Any:
    value = args.get(name)
    if value is None:
        raise ConversionError(f"the Megatron args lack {name!r}, which the conversion needs")
    return value


def _positive_int(args: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = args.get(name)
    if value is None:
        value = _need(args, name) if default is None else default
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConversionError(f"Megatron args.{name} must be a positive integer, found {value!r}")
    return value


@dataclass(frozen=True)
class MegatronDims:
    """Sizes of a Yuan 2.0-M32 Megatron checkpoint, in the fixtures README's notation.

    ``H`` hidden, ``P`` attention projection (heads x head_dim; 2H in the release), ``E`` experts, ``F`` expert
    FFN width, ``V`` padded vocabulary; ``stage_layers[s]`` layers on pipeline stage ``s``.
    """

    H: int
    P: int
    heads: int
    head_dim: int
    E: int
    F: int
    V: int
    layers: int
    tp: int
    pp: int
    stage_layers: tuple[int, ...]
    tied: bool
    attention_router: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace | Mapping) -> MegatronDims:
        a = _args_dict(args)
        hidden, heads, layers = (_positive_int(a, n) for n in ("hidden_size", "num_attention_heads", "num_layers"))
        head_dim = _positive_int(a, "kv_channels", hidden // heads)
        experts, ffn, vocab = (_positive_int(a, n) for n in ("num_experts", "ffn_hidden_size", "padded_vocab_size"))
        tp = _positive_int(a, "tensor_model_parallel_size", 1)
        pp = _positive_int(a, "pipeline_model_parallel_size", 1)
        for what, size in (("num_attention_heads", heads), ("padded_vocab_size", vocab), ("ffn_hidden_size", ffn),
                           ("3 x num_experts (the fused router)", 3 * experts)):  # fmt: skip
            if size % tp:
                raise ConversionError(f"{what} = {size} is not divisible by tensor_model_parallel_size {tp}")
        if hidden % 2:
            raise ConversionError(f"hidden_size {hidden} is odd; the LF gate halves it")
        return cls(
            H=hidden, P=heads * head_dim, heads=heads, head_dim=head_dim, E=experts, F=ffn, V=vocab,
            layers=layers, tp=tp, pp=pp, stage_layers=_stage_layers(a, layers, pp),
            tied=not a.get("untie_embeddings_and_output_weights", False),
            attention_router=bool(a.get("use_attention_router", True)),
        )  # fmt: skip

    def stage_offset(self, stage: int) -> int:
        """Global number of the first layer of ``stage`` (Megatron: ``sum(pipeline_blocks[:stage])``)."""
        return sum(self.stage_layers[:stage])


def _stage_layers(args: Mapping[str, Any], layers: int, pp: int) -> tuple[int, ...]:
    """Layers per stage: uniform ``L/PP``, or ``args.pipeline_blocks`` for IEIT's non-uniform ``block`` method.

    IEIT's ``ParallelTransformer`` builds ``L/PP`` layers per stage under the ``uniform`` method but always
    numbers them from ``sum(pipeline_blocks[:stage])``, so both must agree.
    """
    method = args.get("pipeline_model_parallel_method") or "uniform"
    blocks = args.get("pipeline_blocks")
    if method == "uniform":
        if layers % pp:
            raise ConversionError(f"num_layers {layers} is not divisible by pipeline_model_parallel_size {pp}")
        uniform = (layers // pp,) * pp
        if blocks is not None and tuple(blocks) != uniform:
            raise ConversionError(
                f"args.pipeline_blocks {list(blocks)} disagree with the uniform split {list(uniform)} that "
                "pipeline_model_parallel_method='uniform' builds; the args are inconsistent"
            )
        return uniform
    if blocks is None or len(blocks) != pp or sum(blocks) != layers or min(blocks) < 0:
        raise ConversionError(
            f"pipeline_model_parallel_method={method!r} needs args.pipeline_blocks with {pp} layer counts summing "
            f"to num_layers {layers}; found {blocks!r}"
        )
    return tuple(int(b) for b in blocks)


def _falsy(value: Any) -> bool:
    return not value


# args field -> (accepted?, why the native model or this reader cannot take anything else)
_UNSUPPORTED_ARGS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("num_experts", lambda v: v is not None, "a dense model (no experts) is not Yuan 2.0-M32"),
    ("use_lf_gate", lambda v: v is True, "layers without the LF gate use a fused query_key_value the native model lacks"),
    ("lf_conv2d_group", lambda v: v in (None, 1), "grouped LF-gate convolutions are not implemented natively"),
    ("lf_conv2d_num_pad", lambda v: v in (None, 0, 1), "IEIT's LF gate pads 1 step (training) or 0 (inference); other paddings change the filter"),
    ("swiglu", lambda v: v is True, "experts must be SwiGLU (gate | up)"),
    ("group_query_attention", _falsy, "grouped-query attention does not fit Yuan's fused per-head [q; k] weight"),
    ("moe_grouped_gemm", lambda v: v is True, "only GroupedMLP's weight1/weight2 layout is read; SequentialMLP (local_experts.*) checkpoints are not supported"),
    ("position_embedding_type", lambda v: v in (None, "rope"), "the native model uses rotary embeddings only"),
    ("add_bias_linear", _falsy, "linear-layer biases are not part of the native model"),
    ("norm_dtype", lambda v: v in (None, "RMSNorm"), "the native model uses RMSNorm"),
    ("apply_residual_connection_post_layernorm", _falsy, "the native model uses pre-norm residuals"),
    ("num_shared_experts", _falsy, "shared experts are not part of Yuan 2.0-M32"),
    ("isolate_shared_experts", _falsy, "shared experts are not part of Yuan 2.0-M32"),
    ("expert_model_parallel_size", lambda v: v in (None, 1), "expert-parallel checkpoints (mp_rank_TT_PPP_EEE) are not supported; merge them with Megatron first"),
    ("virtual_pipeline_model_parallel_size", lambda v: v in (None, 1), "interleaved (virtual) pipeline checkpoints (model0, model1, ...) are not supported"),
    ("standalone_embedding_stage", _falsy, "a standalone embedding stage is not supported"),
    ("transformer_impl", lambda v: v in (None, "local"), "Transformer Engine layers use other parameter names"),
    ("retro_add_retriever", _falsy, "RETRO models are not Yuan 2.0-M32"),
    ("moe_router_load_balancing_type", lambda v: v in (None, "none", "aux_loss", "sinkhorn"), "unknown routing"),
)  # fmt: skip


def _check_supported(a: Mapping[str, Any]) -> list[str]:
    """Raise for args the native model cannot express; return notes on what it expresses differently."""
    for name, accepted, why in _UNSUPPORTED_ARGS:
        if not accepted(a.get(name)):
            raise ConversionError(f"Megatron args.{name} = {a.get(name)!r} is not supported: {why}")
    notes = []
    if a.get("use_attention_router", True):
        seq, router_heads = a.get("seq_length"), a.get("num_attention_router_heads")
        if seq is not None and router_heads is not None and seq != router_heads:
            raise ConversionError(
                f"args.num_attention_router_heads = {router_heads} differs from seq_length {seq}: the attention "
                "router then mixes tokens; the native router (one token per head, as Yuan 2.0-M32) cannot express it"
            )
        if not a.get("use_fp32_router", True):
            notes.append("the checkpoint's attention router ran in bf16 (use_fp32_router=False); the native one runs in fp32")
    if a.get("moe_router_load_balancing_type") == "sinkhorn" and a.get("moe_router_topk", 2) == 1:
        raise ConversionError("sinkhorn routing with top-1 uses a sigmoid gate, which the native model lacks")
    return notes


def native_config_from_args(
    args: argparse.Namespace | Mapping, *, overrides: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """``YuanM32Config`` kwargs from a checkpoint's saved training arguments, plus notes for the user.

    Token ids (bos/eos/pad/sep) are not in Megatron args: the caller adds them from the tokenizer.
    ``overrides`` are applied last (e.g. ``{"rope_parameters": {...}}`` for ``--rope-theta``). The result is
    validated by constructing a ``YuanM32Config``; errors raise :class:`ConversionError`.
    """
    from ..modeling.configuration_yuan_m32 import YuanM32Config

    a = _args_dict(args)
    notes = _check_supported(a)
    dims = MegatronDims.from_args(a)
    rotary_percent = a.get("rotary_percent") or 1.0
    if "rotary_base" in a and a["rotary_base"] is not None:
        rope_theta = float(a["rotary_base"])
        if rope_theta == 10000.0:
            notes.append(
                "rotary base 10000 from args (IEIT's pretraining base); the released 16K fine-tuned model used "
                f"{SFT_ROPE_THETA:g}: pass --rope-theta {SFT_ROPE_THETA:g} if these weights are the 16K fine-tuned model"
            )
    else:
        rope_theta = SFT_ROPE_THETA
        notes.append(
            f"rotary base not in args: using {SFT_ROPE_THETA:g} (IEIT's 16K SFT); pass --rope-theta 10000 for a "
            "pretraining checkpoint"
        )
    seq_length = a.get("seq_length") or a.get("max_position_embeddings")
    if seq_length is None:
        raise ConversionError("the Megatron args have neither seq_length nor max_position_embeddings")
    if a.get("max_position_embeddings") not in (None, seq_length):
        notes.append(
            f"max_position_embeddings: using seq_length {seq_length} (the trained context); args."
            f"max_position_embeddings {a['max_position_embeddings']} only sizes learned position embeddings"
        )
    if a.get("layernorm_epsilon") not in (None, RMS_NORM_EPS):
        notes.append(
            f"rms_norm_eps {RMS_NORM_EPS:g}: IEIT's Megatron hard-codes it for RMSNorm (args.layernorm_epsilon "
            f"{a['layernorm_epsilon']:g} only applies to LayerNorm)"
        )
    routing = a.get("moe_router_load_balancing_type") or "none"
    if routing == "sinkhorn":
        notes.append("sinkhorn routing: at inference top-k of softmax without renormalising (norm_topk_prob=False)")
    kwargs: dict[str, Any] = {
        "vocab_size": dims.V,
        "hidden_size": dims.H,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.heads,
        "head_dim": dims.head_dim,
        "moe_intermediate_size": dims.F,
        "num_experts": dims.E,
        "num_experts_per_tok": _positive_int(a, "moe_router_topk", 2),
        "norm_topk_prob": routing != "sinkhorn",
        "router_type": "attention" if dims.attention_router else "linear",
        "max_position_embeddings": int(seq_length),
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": float(rotary_percent)},
        "rms_norm_eps": RMS_NORM_EPS,
        "hidden_act": "silu",
        "tie_word_embeddings": dims.tied,
        "router_aux_loss_coef": float(a.get("moe_aux_loss_coeff") or 0.0),
    }  # fmt: skip
    if overrides:
        kwargs.update(overrides)
        notes.append("overridden: " + ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
    try:  # token ids come from the tokenizer later; None keeps the check from judging the defaults
        YuanM32Config(**({f"{t}_token_id": None for t in ("bos", "eos", "pad", "sep")} | kwargs))
    except ValueError as exc:
        raise ConversionError(f"the Megatron args give an invalid native config: {exc}") from exc
    return kwargs, notes


def megatron_args_for(
    config: Mapping[str, Any] | Any,
    *,
    tp: int = 1,
    pp: int = 1,
    seq_length: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    pipeline_blocks: Sequence[int] | None = None,
) -> argparse.Namespace:
    """A plausible IEIT Megatron ``args`` namespace for a model given by native config fields.

    ``config`` is a ``YuanM32Config`` or a mapping of its field names. Only the fields this module reads (and
    a few for context) are set; ``seq_length`` defaults to ``max_position_embeddings``;
    ``pipeline_blocks`` (one layer count per stage) selects IEIT's non-uniform ``block`` split.
    """
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    heads = _need(c, "num_attention_heads")
    if c.get("num_key_value_heads", heads) != heads:
        raise ConversionError("grouped-query attention cannot be written as a Yuan Megatron checkpoint")
    rope = c.get("rope_parameters") or {"rope_type": "default", "rope_theta": SFT_ROPE_THETA, "partial_rotary_factor": 0.5}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"rope_type {rope.get('rope_type')!r} has no Megatron equivalent in Yuan's code")
    seq_length = seq_length or _need(c, "max_position_embeddings")
    layers = _need(c, "num_hidden_layers")
    blocks = list(pipeline_blocks) if pipeline_blocks is not None else ([layers // pp] * pp if layers % pp == 0 else None)
    if blocks is None:
        raise ConversionError(f"{layers} layers do not split evenly over {pp} stages; pass pipeline_blocks")
    return argparse.Namespace(
        num_layers=layers,
        encoder_num_layers=layers,
        hidden_size=_need(c, "hidden_size"),
        ffn_hidden_size=_need(c, "moe_intermediate_size"),
        num_attention_heads=heads,
        kv_channels=_need(c, "head_dim"),
        group_query_attention=False,
        num_query_groups=1,
        num_experts=_need(c, "num_experts"),
        moe_router_topk=_need(c, "num_experts_per_tok"),
        moe_router_load_balancing_type="none" if c.get("norm_topk_prob", True) else "sinkhorn",
        moe_aux_loss_coeff=float(c.get("router_aux_loss_coef", 0.0)),
        moe_grouped_gemm=True,
        moe_token_dropping=False,
        use_attention_router=c.get("router_type", "attention") == "attention",
        use_fp32_router=True,
        num_attention_router_heads=seq_length,
        use_lf_gate=True,
        lf_conv2d_group=1,
        lf_conv2d_num_pad=1,
        position_embedding_type="rope",
        rotary_percent=float(rope.get("partial_rotary_factor", 1.0)),
        rotary_base=rope.get("rope_theta", SFT_ROPE_THETA),
        seq_length=seq_length,
        encoder_seq_length=seq_length,
        max_position_embeddings=seq_length,
        padded_vocab_size=_need(c, "vocab_size"),
        make_vocab_size_divisible_by=128,
        swiglu=True,
        add_bias_linear=False,
        norm_dtype="RMSNorm",
        layernorm_epsilon=1e-5,
        untie_embeddings_and_output_weights=not c.get("tie_word_embeddings", True),
        transformer_impl="local",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        transformer_pipeline_model_parallel_size=pp,
        pipeline_model_parallel_method="uniform" if pipeline_blocks is None else "block",
        pipeline_blocks=blocks,
        virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1,
        data_parallel_size=1,
        world_size=tp * pp,
        rank=0,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        no_save_optim=True,
        iteration=0,
        tokenizer_type="YuanTokenizer",
    )


# ----------------------------------------------------------------------------------------------------------------
# Tensor-parallel layouts (README "Tensor-parallel split semantics" = IEIT's tools/split_tp_partitions.py)
# ----------------------------------------------------------------------------------------------------------------


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


class _Replicated:
    """Every rank holds the whole tensor (norms, LF-gate convolutions, the linear router)."""

    def local_shape(self, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
        return shape

    def split(self, full: torch.Tensor, dims: MegatronDims) -> list[torch.Tensor]:
        return [full] * dims.tp

    def merge(self, shards: Sequence[torch.Tensor], dims: MegatronDims, *, where: str) -> torch.Tensor:
        for rank, shard in enumerate(shards[1:], start=1):
            if not _bitwise_equal(shards[0], shard):
                raise ConversionError(
                    f"{where}: this tensor is replicated over tensor-parallel ranks but rank {rank} differs from "
                    "rank 0; the checkpoint is inconsistent (ranks from different runs or iterations?)"
                )
        return shards[0]


@dataclass(frozen=True)
class _Blocks:
    """Contiguous blocks along ``dim``: rank r holds ``full.chunk(tp, dim)[r]``.

    dim 0 (ColumnParallelLinear rows, VocabParallelEmbedding rows): ``get_value``; ``get_query_key``, whose rows
    are per head ``[q_0; k_0; q_1; k_1; ...]`` so rank r holds whole heads ``r*nh/tp ...``; the router's fused
    ``[q; k; v]`` (with E=8, tp=2 rank 0 holds q and half of k); vocab rows. dim 1 (RowParallelLinear): ``dense``.
    """

    dim: int

    def local_shape(self, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
        return tuple(n // tp if i == self.dim else n for i, n in enumerate(shape))

    def split(self, full: torch.Tensor, dims: MegatronDims) -> list[torch.Tensor]:
        return list(full.chunk(dims.tp, dim=self.dim))

    def merge(self, shards: Sequence[torch.Tensor], dims: MegatronDims, *, where: str) -> torch.Tensor:
        return shards[0] if len(shards) == 1 else torch.cat(list(shards), dim=self.dim)


class _ExpertsFc1:
    """GroupedMLP ``weight1`` [H, E*2F] -> rank r [H, E*2F/tp].

    The bytes are consumed as ``view(E, H, 2F)``: per expert ``[gate | up]`` (F columns each). Rank r keeps
    columns ``r*F/tp .. (r+1)*F/tp`` of both halves, ``[gate_r | up_r]`` per expert, viewed back as [H, -1]:
    merging concatenates the gates of all ranks, then the ups.
    """

    def local_shape(self, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
        return (shape[0], shape[1] // tp)

    def split(self, full: torch.Tensor, dims: MegatronDims) -> list[torch.Tensor]:
        if dims.tp == 1:
            return [full]
        gate, up = full.contiguous().view(dims.E, dims.H, 2 * dims.F).chunk(2, dim=-1)  # each [E, H, F]
        gates, ups = gate.chunk(dims.tp, dim=-1), up.chunk(dims.tp, dim=-1)  # tp x [E, H, F/tp]
        return [torch.cat([g, u], dim=-1).view(dims.H, -1) for g, u in zip(gates, ups, strict=True)]

    def merge(self, shards: Sequence[torch.Tensor], dims: MegatronDims, *, where: str) -> torch.Tensor:
        if len(shards) == 1:
            return shards[0]
        halves = [s.contiguous().view(dims.E, dims.H, -1).chunk(2, dim=-1) for s in shards]  # tp x ([E,H,F/tp] x 2)
        gate = [g for g, _ in halves]
        up = [u for _, u in halves]
        return torch.cat(gate + up, dim=-1).view(dims.H, -1)  # [E, H, 2F] -> [H, E*2F]


class _ExpertsFc2:
    """GroupedMLP ``weight2`` [E*F, H] -> rank r ``view(E, F, H)[:, r*F/tp:(r+1)*F/tp]`` viewed as [E*F/tp, H]."""

    def local_shape(self, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
        return (shape[0] // tp, shape[1])

    def split(self, full: torch.Tensor, dims: MegatronDims) -> list[torch.Tensor]:
        if dims.tp == 1:
            return [full]
        per_expert = full.contiguous().view(dims.E, dims.F, dims.H)
        return [block.reshape(-1, dims.H) for block in per_expert.chunk(dims.tp, dim=1)]

    def merge(self, shards: Sequence[torch.Tensor], dims: MegatronDims, *, where: str) -> torch.Tensor:
        if len(shards) == 1:
            return shards[0]
        return torch.cat([s.contiguous().view(dims.E, -1, dims.H) for s in shards], dim=1).view(-1, dims.H)


REPLICATED, ROWS, COLUMNS = _Replicated(), _Blocks(0), _Blocks(1)
EXPERTS_FC1, EXPERTS_FC2 = _ExpertsFc1(), _ExpertsFc2()


# ----------------------------------------------------------------------------------------------------------------
# Megatron tensors that IEIT-HF keeps as several tensors (the ``*`` of a target key)
# ----------------------------------------------------------------------------------------------------------------


def split_query_key(qk: torch.Tensor, dims: MegatronDims) -> list[torch.Tensor]:
    """``get_query_key`` [2P, H] -> IEIT ``q_proj``, ``k_proj`` (each [P, H]) = rows[:P], rows[P:].

    Rows are per head ``[q_0; k_0; q_1; k_1; ...]`` (head_dim rows each), so IEIT's "q_proj" holds q and k of
    heads 0..nh/2-1 and "k_proj" those of the other half (IEIT's convert_hf_moe.py does exactly this).
    """
    return [qk[: dims.P], qk[dims.P :]]


def split_router(qkv: torch.Tensor, dims: MegatronDims) -> list[torch.Tensor]:
    """Attention router ``query_key_value`` [3E, H] = ``[q; k; v]`` -> ``gate.query/key/value``, each [E, H]."""
    return list(qkv.split(dims.E, dim=0))


def join_rows(parts: Iterable[torch.Tensor], dims: MegatronDims) -> torch.Tensor:
    """Inverse of :func:`split_query_key` / :func:`split_router`: stack the parts' rows."""
    return torch.cat(list(parts), dim=0)


def unstack_experts_w1(weight1: torch.Tensor, dims: MegatronDims) -> list[torch.Tensor]:
    """GroupedMLP ``weight1`` [H, E*2F] -> E IEIT ``w1`` [2F, H] (rows ``[gate; up]``).

    The bytes are read as ``view(E, H, 2F)`` (a reinterpretation, not column blocks); expert e is ``[e].T``.
    """
    per_expert = weight1.contiguous().view(dims.E, dims.H, 2 * dims.F)
    return [per_expert[e].T for e in range(dims.E)]


def stack_experts_w1(parts: Iterable[torch.Tensor], dims: MegatronDims) -> torch.Tensor:
    """Inverse of :func:`unstack_experts_w1`: E x [2F, H] -> [H, E*2F], filled one expert at a time."""
    out: torch.Tensor | None = None
    for e, w1 in enumerate(parts):
        if out is None:
            out = torch.empty(dims.E, dims.H, 2 * dims.F, dtype=w1.dtype)
        out[e] = w1.T
    assert out is not None
    return out.view(dims.H, -1)


def unstack_experts_w2(weight2: torch.Tensor, dims: MegatronDims) -> list[torch.Tensor]:
    """GroupedMLP ``weight2`` [E*F, H] -> E IEIT ``w2`` [H, F]: ``view(E, F, H)[e].T``."""
    per_expert = weight2.contiguous().view(dims.E, dims.F, dims.H)
    return [per_expert[e].T for e in range(dims.E)]


def stack_experts_w2(parts: Iterable[torch.Tensor], dims: MegatronDims) -> torch.Tensor:
    """Inverse of :func:`unstack_experts_w2`: E x [H, F] -> [E*F, H], filled one expert at a time."""
    out: torch.Tensor | None = None
    for e, w2 in enumerate(parts):
        if out is None:
            out = torch.empty(dims.E, dims.F, dims.H, dtype=w2.dtype)
        out[e] = w2.T
    assert out is not None
    return out.view(-1, dims.H)


@dataclass(frozen=True)
class _Fused:
    """How one Megatron tensor maps to the IEIT tensors named by the ``*`` of its target key."""

    parts: Callable[[MegatronDims], tuple[str, ...]]
    part_shape: Callable[[MegatronDims], tuple[int, ...]]
    split: Callable[[torch.Tensor, MegatronDims], list[torch.Tensor]]
    join: Callable[[Iterable[torch.Tensor], MegatronDims], torch.Tensor]


QUERY_KEY = _Fused(lambda d: ("q", "k"), lambda d: (d.P, d.H), split_query_key, join_rows)
ROUTER_QKV = _Fused(lambda d: ("query", "key", "value"), lambda d: (d.E, d.H), split_router, join_rows)
EXPERTS_W1 = _Fused(lambda d: tuple(map(str, range(d.E))), lambda d: (2 * d.F, d.H), unstack_experts_w1, stack_experts_w1)
EXPERTS_W2 = _Fused(lambda d: tuple(map(str, range(d.E))), lambda d: (d.H, d.F), unstack_experts_w2, stack_experts_w2)


# ----------------------------------------------------------------------------------------------------------------
# The key table
# ----------------------------------------------------------------------------------------------------------------

_EMBEDDING = "language_model.embedding.word_embeddings.weight"
_FINAL_NORM = "language_model.encoder.final_layernorm.weight"
_OUTPUT_LAYER = "language_model.output_layer.weight"  # untied head (untie_embeddings_and_output_weights)
_HEAD = "word_embeddings_for_head.weight"  # tied head copy on the last stage when PP > 1
_ATTENTION_ROUTER = "language_model.encoder.layers.{}.mlp.router.attention_router.query_key_value.weight"
_LINEAR_ROUTER = "language_model.encoder.layers.{}.mlp.router.weight"
_L = "language_model.encoder.layers.{}."
_T = "model.layers.{}."


@dataclass(frozen=True)
class _Entry:
    source: str  # flattened Megatron key; {} = layer number within the stage
    target: str  # IEIT-HF key; {} = global layer number; * = a part of a fused tensor
    layout: _Replicated | _Blocks | _ExpertsFc1 | _ExpertsFc2  # how TP ranks share it
    shape: Callable[[MegatronDims], tuple[int, ...]]  # merged (all ranks) shape
    fused: _Fused | None = None


# In Megatron's own order (the writer emits this order, as Megatron's state_dict does).
_TABLE: tuple[_Entry, ...] = (
    _Entry(_EMBEDDING,                                     "model.embed_tokens.weight",              ROWS,        lambda d: (d.V, d.H)),
    _Entry(_L + "input_layernorm.weight",                  _T + "input_layernorm.weight",            REPLICATED,  lambda d: (d.H,)),
    _Entry(_L + "self_attention.get_value.weight",         _T + "self_attn.v_proj.weight",           ROWS,        lambda d: (d.P, d.H)),
    _Entry(_L + "self_attention.get_query_key.weight",     _T + "self_attn.*_proj.weight",           ROWS,        lambda d: (2 * d.P, d.H), QUERY_KEY),
    _Entry(_L + "self_attention.lf_gate.conv1.weight",     _T + "self_attn.lf_gate.conv1.weight",    REPLICATED,  lambda d: (d.H // 2, d.H, 2, 1)),
    _Entry(_L + "self_attention.lf_gate.conv1.bias",       _T + "self_attn.lf_gate.conv1.bias",      REPLICATED,  lambda d: (d.H // 2,)),
    _Entry(_L + "self_attention.lf_gate.conv2.weight",     _T + "self_attn.lf_gate.conv2.weight",    REPLICATED,  lambda d: (d.H, d.H // 2, 2, 1)),
    _Entry(_L + "self_attention.lf_gate.conv2.bias",       _T + "self_attn.lf_gate.conv2.bias",      REPLICATED,  lambda d: (d.H,)),
    _Entry(_L + "self_attention.lf_gate.output_layernorm.weight", _T + "self_attn.lf_gate.output_layernorm.weight", REPLICATED, lambda d: (d.H,)),
    _Entry(_L + "self_attention.dense.weight",             _T + "self_attn.o_proj.weight",           COLUMNS,     lambda d: (d.H, d.P)),
    _Entry(_L + "post_attention_layernorm.weight",         _T + "post_attention_layernorm.weight",   REPLICATED,  lambda d: (d.H,)),
    _Entry(_ATTENTION_ROUTER,                              _T + "mlp.gate.*.weight",                 ROWS,        lambda d: (3 * d.E, d.H), ROUTER_QKV),
    _Entry(_LINEAR_ROUTER,                                 _T + "mlp.gate.weight",                   REPLICATED,  lambda d: (d.E, d.H)),
    _Entry(_L + "mlp.experts.weight1",                     _T + "mlp.experts.*.w1.weight",           EXPERTS_FC1, lambda d: (d.H, d.E * 2 * d.F), EXPERTS_W1),
    _Entry(_L + "mlp.experts.weight2",                     _T + "mlp.experts.*.w2.weight",           EXPERTS_FC2, lambda d: (d.E * d.F, d.H), EXPERTS_W2),
    _Entry(_FINAL_NORM,                                    "model.norm.weight",                      REPLICATED,  lambda d: (d.H,)),
    _Entry(_OUTPUT_LAYER,                                  "lm_head.weight",                         ROWS,        lambda d: (d.V, d.H)),
    _Entry(_HEAD,                                          "lm_head.weight",                         ROWS,        lambda d: (d.V, d.H)),
)  # fmt: skip
_ENTRIES = {entry.source: entry for entry in _TABLE}

# Flattened Megatron key -> IEIT-HF key (layer numbers as in the source; None = dropped on purpose).
MEGATRON_TO_IEIT = KeyTable(
    {entry.source: entry.target for entry in _TABLE}
    | {"language_model.rotary_pos_emb.inv_freq": None}  # recomputed from the rotary base; IEIT's save omits it
)


def _stage_source_keys(dims: MegatronDims, stage: int) -> list[str]:
    """Every flattened Megatron key that pipeline stage ``stage`` must hold, in Megatron's order."""
    skip = _LINEAR_ROUTER if dims.attention_router else _ATTENTION_ROUTER
    layer_patterns = [e.source for e in _TABLE if e.source.startswith(_L) and e.source != skip]
    keys = [_EMBEDDING] if stage == 0 else []
    for local in range(dims.stage_layers[stage]):
        keys += [pattern.format(local) for pattern in layer_patterns]
    if stage == dims.pp - 1:
        keys.append(_FINAL_NORM)
        if not dims.tied:
            keys.append(_OUTPUT_LAYER)
        elif dims.pp > 1:
            keys.append(_HEAD)
    return keys


def _target(key: str, dims: MegatronDims, stage: int) -> tuple[_Entry, str]:
    """The table entry of a flattened Megatron key and its IEIT-HF target with the global layer number."""
    found = MEGATRON_TO_IEIT.match(key)
    if found is None:
        raise ConversionError(f"unexpected key {key!r}: it matches no entry of the Megatron key table")
    pattern, numbers = found
    entry = _ENTRIES[pattern]
    return entry, entry.target.format(*(n + dims.stage_offset(stage) for n in numbers))


def ieit_key_shapes(args: argparse.Namespace | Mapping) -> dict[str, tuple[int, ...]]:
    """IEIT-HF key -> shape of every tensor of the model ``args`` describe (what :func:`iter_ieit_stages` yields
    over all stages, except a tied ``lm_head``, which IEIT-HF stores as a copy of the embeddings)."""
    a = _args_dict(args)
    dims = MegatronDims.from_args(a)
    shapes: dict[str, tuple[int, ...]] = {}
    for stage in range(dims.pp):
        for key in _stage_source_keys(dims, stage):
            if key == _HEAD:
                continue
            entry, target = _target(key, dims, stage)
            if entry.fused is None:
                shapes[target] = entry.shape(dims)
            else:
                shapes |= {target.replace("*", part): entry.fused.part_shape(dims) for part in entry.fused.parts(dims)}
    return shapes


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint on disk
# ----------------------------------------------------------------------------------------------------------------

_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?")
_ITER_DIR = re.compile(r"iter_(\d{7,})")


def _rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def _iteration_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (_ITER_DIR.fullmatch(p.name) or p.name == "release"))


@dataclass(frozen=True)
class MegatronCheckpoint:
    """The rank files of one iteration of a Megatron checkpoint, validated against its saved args.

    ``files[(tp_rank, pp_rank)]`` is the ``model_optim_rng.pt`` of that rank; ``iteration`` is ``None`` for a
    ``release`` folder. Open with :meth:`open`.
    """

    path: Path
    iteration: int | None
    tp_size: int
    pp_size: int
    files: Mapping[tuple[int, int], Path]
    args: argparse.Namespace | dict
    checkpoint_version: float

    @property
    def num_stages(self) -> int:
        """Pipeline stages, i.e. how many dicts :func:`iter_ieit_stages` yields (a progress-bar total)."""
        return self.pp_size

    def stage_files(self, stage: int) -> list[Path]:
        """The TP rank files of pipeline stage ``stage``, rank 0 first."""
        return [self.files[(tp_rank, stage)] for tp_rank in range(self.tp_size)]

    @classmethod
    def open(cls, src: str | Path, *, iteration: int | None = None) -> MegatronCheckpoint:
        """Find the rank files of ``src``: a checkpoint root or one ``iter_XXXXXXX`` (or ``release``) folder.

        A root's iteration comes from ``iteration`` or else ``latest_checkpointed_iteration.txt`` (a number, or
        ``release``; a trailing newline is fine). Every ``mp_rank_*`` folder of the TP x PP grid must hold a
        ``model_optim_rng.pt``, and the grid must match ``args.tensor/pipeline_model_parallel_size``. Only the
        first file's pickle is parsed here (no tensor is read).
        """
        src = Path(src)
        if not src.is_dir():
            raise ConversionError(
                f"{src} is not a directory; pass a Megatron checkpoint root (holding {TRACKER_FILE}) or one of "
                "its iter_XXXXXXX folders"
            )
        folder, found_iteration = cls._iteration_folder(src, iteration)
        files, tp_size, pp_size = cls._rank_files(folder)
        first = load_megatron_file(files[(0, 0)], lazy=True)
        if "args" not in first:
            raise ConversionError(f"{files[(0, 0)]} holds no 'args'; the conversion needs the saved training arguments")
        args = first["args"]
        if not isinstance(args, (argparse.Namespace, Mapping)):
            raise ConversionError(f"{files[(0, 0)]}: 'args' is a {type(args).__name__}, expected argparse.Namespace")
        a = _args_dict(args)
        for name, on_disk in (("tensor_model_parallel_size", tp_size), ("pipeline_model_parallel_size", pp_size)):
            if a.get(name, 1) != on_disk:
                raise ConversionError(
                    f"{folder} holds {tp_size} TP x {pp_size} PP rank folders but args.{name} = {a.get(name)!r} "
                    f"(read from {files[(0, 0)]}); the checkpoint is incomplete or mixes runs"
                )
        version = first.get("checkpoint_version")
        if not isinstance(version, (int, float)) or version < CHECKPOINT_VERSION:
            raise ConversionError(
                f"{files[(0, 0)]} has checkpoint_version {version!r}; only {CHECKPOINT_VERSION} (Megatron since 2021, "
                "and IEIT's fork) is supported: older versions order the attention weights differently"
            )
        stored = first.get("iteration")
        if found_iteration is not None and stored not in (None, found_iteration):
            raise ConversionError(f"{files[(0, 0)]} says iteration {stored} but lies in {folder.name}")
        return cls(folder, found_iteration, tp_size, pp_size, files, args, float(version))

    @staticmethod
    def _iteration_folder(src: Path, iteration: int | None) -> tuple[Path, int | None]:
        if any(_RANK_DIR.fullmatch(p.name) for p in src.iterdir() if p.is_dir()):
            match = _ITER_DIR.fullmatch(src.name)
            named = int(match.group(1)) if match else None
            if iteration is not None and named is not None and iteration != named:
                raise ConversionError(f"{src} is iteration {named}, but iteration {iteration} was asked for")
            return src, named if named is not None else iteration
        available = _iteration_dirs(src)
        if iteration is not None:
            folder, origin = src / f"iter_{iteration:07d}", f"--iteration {iteration}"
        else:
            tracker = src / TRACKER_FILE
            if not tracker.is_file():
                example = src / (available[-1] if available else "iter_0001000")
                raise ConversionError(
                    f"{src} has no {TRACKER_FILE} and no mp_rank_* folders: pass the iteration folder itself "
                    f"(e.g. {example}) or choose one with --iteration N (found: {', '.join(available) or 'none'})"
                )
            text = tracker.read_text(encoding="utf-8").strip()
            if text == "release":
                folder, iteration = src / "release", None
            elif text.isdigit():
                iteration = int(text)
                folder = src / f"iter_{iteration:07d}"
            else:
                raise ConversionError(
                    f"{tracker} holds {text!r}; expected an iteration number or 'release'. Pass --iteration N"
                )
            origin = f"{tracker} says {text!r}"
        if not folder.is_dir():
            raise ConversionError(
                f"iteration folder {folder} does not exist ({origin}); available: {', '.join(available) or 'none'}"
            )
        return folder, iteration

    @staticmethod
    def _rank_files(folder: Path) -> tuple[dict[tuple[int, int], Path], int, int]:
        ranks: dict[tuple[int, int], Path] = {}
        with_pp: set[bool] = set()
        for child in sorted(folder.iterdir()):
            if not child.name.startswith("mp_rank_"):
                continue
            match = _RANK_DIR.fullmatch(child.name)
            if match is None or not child.is_dir():
                raise ConversionError(
                    f"unexpected {child}: expected folders mp_rank_TT (PP = 1) or mp_rank_TT_PPP; expert-parallel "
                    "checkpoints (mp_rank_TT_PPP_EEE) are not supported"
                )
            with_pp.add(match.group(2) is not None)
            ranks[(int(match.group(1)), int(match.group(2) or 0))] = child
        if not ranks:
            raise ConversionError(f"{folder} holds no mp_rank_* folders; is it a Megatron iteration folder?")
        if len(with_pp) > 1:
            raise ConversionError(f"{folder} mixes mp_rank_TT and mp_rank_TT_PPP folders")
        tp_size = max(t for t, _ in ranks) + 1
        pp_size = max(p for _, p in ranks) + 1
        pp_named = with_pp.pop()
        missing = [
            _rank_dir(t, p, pp_size if pp_named else 1) for p in range(pp_size) for t in range(tp_size) if (t, p) not in ranks
        ]
        if missing:
            raise ConversionError(
                f"{folder} lacks rank folder(s) {', '.join(missing)} of its {tp_size} TP x {pp_size} PP grid; "
                "copy the complete checkpoint"
            )
        files = {}
        for rank, directory in ranks.items():
            path = directory / RANK_FILE
            if not path.is_file():
                raise ConversionError(f"{path} is missing; every rank folder needs its {RANK_FILE}")
            _open_zip(path)  # cheap: central directory and data.pkl; catches truncated files early
            files[rank] = path
        return files, tp_size, pp_size


# ----------------------------------------------------------------------------------------------------------------
# Reader driver
# ----------------------------------------------------------------------------------------------------------------


def _owned(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` as a contiguous tensor owning exactly its storage, cast to ``dtype`` (one copy at most)."""
    dtype = dtype or tensor.dtype
    if (
        tensor.dtype == dtype
        and tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    ):
        return tensor
    return torch.empty(tensor.shape, dtype=dtype).copy_(tensor)




def _load_stage_shards(ckpt: MegatronCheckpoint, stage: int) -> list[dict[str, LazyTensor]]:
    shards = []
    for path in ckpt.stage_files(stage):
        loaded = load_megatron_file(path, lazy=True)
        if "model" not in loaded:
            virtual = sorted(k for k in loaded if re.fullmatch(r"model\d+", str(k)))
            raise ConversionError(
                f"{path} holds no 'model'"
                + (f" but {virtual}: interleaved (virtual) pipeline checkpoints are not supported" if virtual else "")
            )
        stored = loaded.get("iteration")
        if ckpt.iteration is not None and stored not in (None, ckpt.iteration):
            raise ConversionError(f"{path} says iteration {stored}; the checkpoint mixes iterations")
        if not isinstance(loaded["model"], Mapping):
            raise ConversionError(f"{path}: 'model' is a {type(loaded['model']).__name__}, expected a dict")
        shards.append(flatten_model_state(loaded["model"], source=path))
    return shards


def _convert_stage(
    ckpt: MegatronCheckpoint, stage: int, dims: MegatronDims, *, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """One pipeline stage: TP-merge every tensor and map it to IEIT-HF names (global layer numbers)."""
    files = ckpt.stage_files(stage)
    shards = _load_stage_shards(ckpt, stage)
    source_keys = list(shards[0])
    for path, flat in zip(files[1:], shards[1:], strict=True):
        if set(flat) != set(source_keys):
            diff = sorted(set(flat) ^ set(source_keys))
            raise ConversionError(f"{path} and {files[0]} hold different tensors: {', '.join(diff[:8])}")
    expected = _stage_source_keys(dims, stage)
    missing = [key for key in expected if key not in shards[0]]
    if missing:
        raise ConversionError(
            f"pipeline stage {stage} ({files[0]}) lacks {len(missing)} tensor(s) the args imply: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    expected_set, used = set(expected), set()
    out: dict[str, torch.Tensor] = {}
    for key in source_keys:
        found = MEGATRON_TO_IEIT.match(key)
        if found is None:
            raise ConversionError(
                f"{files[0]}: unexpected tensor {key!r}: it matches no entry of the Megatron key table "
                "(MEGATRON_TO_IEIT); this is not a Yuan 2.0-M32 checkpoint of the layout this converter knows"
            )
        if MEGATRON_TO_IEIT.table[found[0]] is None:
            used.add(key)  # dropped on purpose (see MEGATRON_TO_IEIT)
            continue
        if key not in expected_set:
            raise ConversionError(
                f"{files[0]}: unexpected tensor {key!r} on pipeline stage {stage}, which should hold layers "
                f"{dims.stage_offset(stage)}..{dims.stage_offset(stage) + dims.stage_layers[stage] - 1} of "
                f"{dims.layers} (tied head: {dims.tied}); the args do not describe this checkpoint"
            )
        out |= _convert_tensor(key, [flat.pop(key) for flat in shards], files, stage, dims, dtype=dtype)
        used.add(key)
    check_all_used(source_keys, used, where=f"pipeline stage {stage} ({files[0]})")
    return out


def _convert_tensor(
    key: str, shards: list[LazyTensor], files: list[Path], stage: int, dims: MegatronDims, *, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """One Megatron tensor (its TP shards, unread) -> its IEIT-HF tensor(s). The sources die on return."""
    entry, target = _target(key, dims, stage)
    full_shape = entry.shape(dims)
    local_shape = entry.layout.local_shape(full_shape, dims.tp)
    for path, lazy in zip(files, shards, strict=True):
        if tuple(lazy.shape) != local_shape or lazy.dtype != shards[0].dtype:
            raise ConversionError(
                f"{path}: {key} is {list(lazy.shape)} {lazy.dtype}, expected {list(local_shape)} "
                f"{shards[0].dtype} (full {list(full_shape)} over {dims.tp} TP ranks) from the args"
            )
    where = f"{key} in {', '.join(map(str, files))}"
    merged = entry.layout.merge([lazy.load() for lazy in shards], dims, where=where)
    if tuple(merged.shape) != full_shape:
        raise ConversionError(f"{where}: merged to {list(merged.shape)}, expected {list(full_shape)}")
    if entry.fused is None:
        return {target: _owned(merged, dtype)}
    parts = entry.fused.split(merged, dims)
    names = entry.fused.parts(dims)
    return {target.replace("*", name): _owned(part, dtype) for name, part in zip(names, parts, strict=True)}


def iter_ieit_stages(
    ckpt: MegatronCheckpoint,
    *,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    check_tied_head: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield each pipeline stage as IEIT-HF tensors, one stage in memory at a time.

    Per stage the TP rank files are parsed (no tensor read), every tensor is checked against the args-derived
    shape, then read, TP-merged (README "Tensor-parallel split semantics") and mapped through
    :data:`MEGATRON_TO_IEIT`, one tensor at a time. Yielded dicts use IEIT-HF names with GLOBAL layer numbers,
    e.g. ``model.layers.7.self_attn.q_proj.weight`` [P, H] (rows[:P] of ``get_query_key``),
    ``model.layers.7.mlp.experts.3.w1.weight`` [2F, H] (``[gate; up]``), ``model.layers.7.mlp.gate.query.weight``
    [E, H]; the first stage adds ``model.embed_tokens.weight`` [V, H], the last ``model.norm.weight`` [H] and
    ``lm_head.weight`` [V, H] when there is one (untied, or tied with PP > 1; with PP == 1 and tied embeddings
    there is none). Tensors are contiguous, own their storage, and are cast to ``dtype`` if given.

    Args:
        ckpt: From :meth:`MegatronCheckpoint.open`.
        dtype: Cast to this dtype (default: as stored, bf16 for Yuan).
        progress: Show a tqdm bar over the ``ckpt.num_stages`` stages.
        check_tied_head: With tied embeddings and PP > 1, require the last stage's head copy to equal the
            embeddings bitwise (a tied native model would silently use the embeddings otherwise).

    Raises:
        ConversionError: for unsupported args, unknown / missing / misshapen tensors (naming key and file),
            replicated tensors that differ between TP ranks, unreadable files.
    """
    a = _args_dict(ckpt.args)
    _check_supported(a)
    dims = MegatronDims.from_args(a)
    return _iter_stages(ckpt, dims, dtype=dtype, progress=progress, check_tied_head=check_tied_head)


def _iter_stages(
    ckpt: MegatronCheckpoint, dims: MegatronDims, *, dtype: torch.dtype | None, progress: bool, check_tied_head: bool
) -> Iterator[dict[str, torch.Tensor]]:
    embedding_digest = None
    for stage in tqdm(range(dims.pp), desc="Megatron stages", unit="stage", disable=not progress):
        tensors = _convert_stage(ckpt, stage, dims, dtype=dtype)
        if check_tied_head and dims.tied and dims.pp > 1:
            if stage == 0:
                embedding_digest = tensor_digest(tensors["model.embed_tokens.weight"])
            if stage == dims.pp - 1 and tensor_digest(tensors["lm_head.weight"]) != embedding_digest:
                raise ConversionError(
                    f"{ckpt.stage_files(stage)[0]}: word_embeddings_for_head differs from the first stage's "
                    "word_embeddings although the model is tied; convert with tie_word_embeddings=False "
                    "to keep both"
                )
        yield tensors
        del tensors  # before building the next stage (the caller should drop its reference too)


# ----------------------------------------------------------------------------------------------------------------
# Writer (synthetic checkpoints)
# ----------------------------------------------------------------------------------------------------------------

_PICKLABLE_SCALARS = (type(None), bool, int, float, str, torch.dtype)


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return isinstance(value, _PICKLABLE_SCALARS)


def _layout_args(args: argparse.Namespace | Mapping, *, tp: int, pp: int) -> dict[str, Any]:
    """A copy of ``args`` for a TP x PP layout, with only values the reader's allow-list can unpickle."""
    a = {k: v for k, v in _args_dict(args).items() if not isinstance(v, MegatronStub)}  # e.g. model_type
    for name, value in a.items():
        if not _plain(value):
            raise ConversionError(f"args.{name} = {value!r} cannot be written: only plain values and torch dtypes")
    a = copy.deepcopy(a)
    blocks = a.get("pipeline_blocks")
    if (a.get("pipeline_model_parallel_method") or "uniform") != "uniform" and (blocks is None or len(blocks) != pp):
        raise ConversionError(f"args.pipeline_blocks {blocks!r} do not describe {pp} stages")
    if (a.get("pipeline_model_parallel_method") or "uniform") == "uniform":
        layers = _positive_int(a, "num_layers")
        if layers % pp:
            raise ConversionError(f"{layers} layers do not split evenly over {pp} stages; pass pipeline_blocks")
        a["pipeline_blocks"] = [layers // pp] * pp
    data_parallel = a.get("data_parallel_size") or 1
    a |= {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "transformer_pipeline_model_parallel_size": pp,
        "world_size": tp * pp * data_parallel,
    }
    return a


def _nest(model: OrderedDict, key: str, tensor: torch.Tensor) -> None:
    """Insert a flattened key into Megatron's nested layout (the encoder's own keys stay flat)."""
    encoder = "language_model.encoder."
    path = ["language_model", "encoder", key[len(encoder) :]] if key.startswith(encoder) else key.split(".")
    node = model
    for part in path[:-1]:
        node = node.setdefault(part, OrderedDict())
    node[path[-1]] = tensor


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """torch.save writes a view's whole storage: give every saved tensor a storage of its own size."""
    return _owned(tensor, None)


def _rng_state(seed: int) -> list[dict[str, Any]]:
    """A small deterministic ``rng_state`` like Megatron's (CPU only: the CUDA state is a placeholder)."""
    torch_state = torch.Generator().manual_seed(seed).get_state()
    return [
        {
            "random_rng_state": random.Random(seed).getstate(),
            "np_rng_state": np.random.RandomState(seed).get_state(),
            "torch_rng_state": torch_state,
            "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
            "rng_tracker_states": {"model-parallel-rng": torch_state.clone()},
        }
    ]


def write_megatron_checkpoint(
    ieit_state_dict: Mapping[str, torch.Tensor],
    dst: str | Path,
    *,
    args: argparse.Namespace | Mapping,
    tp: int = 1,
    pp: int = 1,
    iteration: int = 1,
    tracker_newline: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write IEIT-HF tensors as an IEIT Megatron checkpoint (TP x PP), the inverse of :func:`iter_ieit_stages`.

    The layout matches the fixtures: ``dst/latest_checkpointed_iteration.txt`` (``str(iteration)``, no newline
    unless ``tracker_newline``), ``dst/iter_{iteration:07d}/mp_rank_TT[_PPP]/model_optim_rng.pt`` holding
    ``{"args", "checkpoint_version": 3.0, "iteration", "model" (nested), "rng_state"}``. Tensors are split with
    IEIT's rules (``tools/split_tp_partitions.py``). Only allow-listed globals are pickled (``args.model_type``,
    a Megatron enum, is left out).

    Args:
        ieit_state_dict: IEIT-HF names -> tensors (global layer numbers), as in IEIT's HF checkpoint. Read one
            key at a time and per stage, so a lazy mapping that makes tensors on access keeps memory to one
            stage. ``lm_head.weight`` is optional when tied (the embeddings are used).
        dst: Checkpoint root to create (must be empty or absent unless ``overwrite``); written atomically.
        args: Training arguments (e.g. from :func:`megatron_args_for`); TP/PP fields are set from ``tp``/``pp``.
        tp, pp: Tensor- and pipeline-parallel sizes.
        iteration: Iteration number of the folder and the tracker file.
        tracker_newline: End the tracker file with a newline (Megatron writes none).
        overwrite: Replace a non-empty ``dst``.

    Returns:
        ``dst``.
    """
    a = _layout_args(args, tp=tp, pp=pp)
    _check_supported(a)
    dims = MegatronDims.from_args(a)
    needed = ieit_key_shapes(a)
    present = set(ieit_state_dict.keys())
    optional = {"lm_head.weight"} if dims.tied else set()
    missing = [k for k in needed if k not in present]
    if missing:
        raise ConversionError(f"{len(missing)} IEIT tensor(s) missing for this model: {', '.join(missing[:8])}")
    unexpected = sorted(present - needed.keys() - optional)
    if unexpected:
        raise ConversionError(f"{len(unexpected)} IEIT tensor(s) the args do not describe: {', '.join(unexpected[:8])}")
    consumed: set[str] = set()

    def fetch(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = ieit_state_dict[name]
        if tuple(tensor.shape) != shape:
            raise ConversionError(f"IEIT tensor {name} is {list(tensor.shape)}, expected {list(shape)} from the args")
        consumed.add(name)
        return tensor

    if dims.tied and "lm_head.weight" in present:
        head = fetch("lm_head.weight", (dims.V, dims.H))
        if not _bitwise_equal(head, ieit_state_dict["model.embed_tokens.weight"]):
            raise ConversionError("lm_head.weight differs from model.embed_tokens.weight but the args say tied")

    def megatron_tensor(key: str, stage: int) -> torch.Tensor:
        entry, target = _target(key, dims, stage)
        if key == _HEAD:
            target = "lm_head.weight" if "lm_head.weight" in present else "model.embed_tokens.weight"
        if entry.fused is None:
            return fetch(target, entry.shape(dims))
        part_shape = entry.fused.part_shape(dims)
        parts = (fetch(target.replace("*", p), part_shape) for p in entry.fused.parts(dims))
        return entry.fused.join(parts, dims)

    def write_stage(folder: Path, stage: int) -> None:  # a function, so the stage's tensors die on return
        models = [OrderedDict() for _ in range(dims.tp)]
        for key in _stage_source_keys(dims, stage):
            entry = _ENTRIES[MEGATRON_TO_IEIT.match(key)[0]]
            for model, piece in zip(models, entry.layout.split(megatron_tensor(key, stage), dims), strict=True):
                _nest(model, key, _compact(piece))
        for tp_rank, model in enumerate(models):
            path = folder / _rank_dir(tp_rank, stage, dims.pp) / RANK_FILE
            path.parent.mkdir(parents=True)
            rank = stage * dims.tp + tp_rank
            payload = OrderedDict(
                args=argparse.Namespace(**(a | {"rank": rank})), checkpoint_version=CHECKPOINT_VERSION,
                iteration=iteration, model=model, rng_state=_rng_state(1234 + rank),
            )  # fmt: skip
            torch.save(payload, path)

    root = Path(dst)
    with atomic_output_dir(root, overwrite=overwrite) as tmp:
        for stage in range(dims.pp):
            write_stage(tmp / f"iter_{iteration:07d}", stage)
        check_all_used(present - optional, consumed, where="the IEIT state dict given to write_megatron_checkpoint")
        (tmp / TRACKER_FILE).write_text(f"{iteration}\n" if tracker_newline else str(iteration), encoding="utf-8")
    return root


# ----------------------------------------------------------------------------------------------- the driver


def convert_megatron(
    src: str | Path,
    dst: str | Path,
    *,
    iteration: int | None = None,
    tokenizer: str | Path | None = None,
    dtype: str | torch.dtype | None = "bfloat16",
    rope_theta: float | None = None,
    token_ids: Mapping[str, int] | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = True,
):
    """Convert a Megatron-LM checkpoint (any TP x PP) into a native, Hub-ready ``yuan_m32`` folder.

    Streams one pipeline stage at a time through the same IEIT-layout transforms, shape checks and
    atomic sharded writer as ``convert ieit-hf``; token ids come from ``tokenizer`` (Megatron args do not
    record them; without a tokenizer pass ``token_ids`` like ``{"eos": 77185, "sep": 77187}``, else the
    release's ids are used). Returns a :class:`~yuan_hf.conversion.ieit_hf.ConversionSummary`.
    """
    import time

    from ..modeling import YuanM32Config
    from .ieit_hf import NativeStateBuilder, resolve_dtype, write_converted

    start = time.perf_counter()
    torch_dtype = resolve_dtype(dtype)
    ckpt = MegatronCheckpoint.open(src, iteration=iteration)
    overrides = None
    if rope_theta is not None:
        args = _args_dict(ckpt.args)
        overrides = {"rope_parameters": {"rope_type": "default", "rope_theta": float(rope_theta),
                                         "partial_rotary_factor": float(args.get("rotary_percent") or 1.0)}}  # fmt: skip
    kwargs, notes = native_config_from_args(ckpt.args, overrides=overrides)
    if token_ids:
        unknown = set(token_ids) - {"bos", "eos", "pad", "sep"}
        if unknown:
            raise ConversionError(f"unknown token id name(s) {sorted(unknown)}; use bos, eos, pad, sep")
        kwargs |= {f"{name}_token_id": int(value) for name, value in token_ids.items()}
    elif tokenizer is not None:  # the tokenizer's ids are adopted once it is converted
        kwargs |= {f"{name}_token_id": None for name in ("bos", "eos", "pad", "sep")}
    else:
        release_ids = YuanM32Config().eos_token_id, YuanM32Config().sep_token_id
        if max(release_ids) >= kwargs["vocab_size"]:
            raise ConversionError(
                f"Megatron args record no token ids and the release's (<eod> {release_ids[0]}, <sep> {release_ids[1]}) "
                f"do not fit this model's vocabulary ({kwargs['vocab_size']}); pass --tokenizer"
            )
        notes.append(
            "token ids: Megatron args do not record them; using the release's (<eod> 77185, <sep> 77187). "
            "Pass --tokenizer to take them from the tokenizer (and get a complete folder)"
        )
    config = YuanM32Config(**kwargs)
    builder = NativeStateBuilder(config, dtype=torch_dtype)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        stages = iter_ieit_stages(ckpt)
        for stage in tqdm(stages, total=ckpt.num_stages, desc="converting stages", unit="stage", disable=not progress):
            for key in list(stage):
                yield from builder.add(key, stage.pop(key))  # drop each source tensor once converted
            del stage
        builder.finish()

    provenance = {
        "source_format": "megatron",
        "source": str(Path(src).absolute()),
        "iteration": ckpt.iteration,
        "tensor_parallel": ckpt.tp_size,
        "pipeline_parallel": ckpt.pp_size,
        "rope_theta": config.rope_parameters["rope_theta"],
        "dtype": str(torch_dtype or "as stored"),
        "converter": "yuan-hf convert megatron",
    }
    return write_converted(
        dst, config, tensors(), overwrite=overwrite, started=start, notes=notes, max_shard_size=max_shard_size,
        provenance=provenance, tokenizer=tokenizer, adopt_token_ids=True,
    )  # fmt: skip
