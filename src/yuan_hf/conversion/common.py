"""What every part of the conversion shares: the error type, the declarative key table, a few checks.

Readers (``ieit_hf.py``, ``megatron/``), the native sink (``native/``) and the writers of synthetic
IEIT checkpoints (``writers/``) all import from here; this module imports none of them.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

__all__ = ["ConversionError", "KeyTable", "check_all_used", "is_legacy_torch_save", "read_weight_index", "tensor_digest"]



# RoPE base the released SFT model was fine-tuned with (NTK rule from 10000 at 4096 -> 16384 tokens).
SFT_ROPE_THETA = 40890.0
PRETRAIN_ROPE_THETA = 10000.0


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file or key and what to do."""


class KeyTable:
    """A declarative source -> target key table with ``{}`` standing for a layer (or expert) number.

    ``table`` maps source patterns to a target pattern, or to ``None`` for keys dropped on purpose.
    Patterns may hold several ``{}``; numbers are substituted in order. An unknown key is an error.
    """

    def __init__(self, table: Mapping[str, str | None]):
        self.table = dict(table)
        self._compiled = [
            (re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), src, dst) for src, dst in table.items()
        ]

    def match(self, key: str) -> tuple[str, tuple[int, ...]] | None:
        """Return ``(source_pattern, numbers)`` for ``key``, or ``None`` if no pattern matches."""
        for regex, src, _ in self._compiled:
            m = regex.match(key)
            if m:
                return src, tuple(int(g) for g in m.groups())
        return None

    def target(self, key: str) -> str | None:
        """The target key for ``key`` (``None`` if dropped on purpose); raises for unknown keys."""
        found = self.match(key)
        if found is None:
            raise ConversionError(f"unexpected key {key!r}: it matches no entry of the conversion table")
        src, numbers = found
        dst = self.table[src]
        return None if dst is None else dst.format(*numbers)


# torch.save's legacy format starts with pickle protocol 2 and this magic number (a pickled int).
LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[2:-1]


def is_legacy_torch_save(path: Path) -> bool:
    """True for a pre-1.6 (non-zip) `torch.save` file, which neither weights_only loading nor our reader parse."""
    if not path.is_file() or zipfile.is_zipfile(path):
        return False
    with open(path, "rb") as handle:
        head = handle.read(32)
    return head[:2] == b"\x80\x02" and LEGACY_TORCH_MAGIC in head


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (``meta`` tensors: of dtype and shape only)."""
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    if tensor.device.type != "meta":
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def read_weight_index(index_file: Path) -> dict[str, str]:
    """A ``*.index.json``'s weight map (key -> file), after checking that every file it names exists."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConversionError(f"{index_file} is not a valid index (no weight_map): {err}") from err
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConversionError(f"{index_file}: weight_map must map tensor names to file names")
    for name in set(weight_map.values()):
        if Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
            raise ConversionError(
                f"{index_file.name} names {name!r}, which lies outside {index_file.parent}; an index may only name "
                "files inside its own folder. Refusing to read weights from elsewhere"
            )
        if not (index_file.parent / name).is_file():
            raise ConversionError(f"{index_file.name} names {name}, which is missing from {index_file.parent}")
    return weight_map


def check_all_used(source_keys: Iterable[str], used: set[str], *, where: str) -> None:
    """Raise if a source tensor was neither converted nor dropped on purpose."""
    unused = sorted(set(source_keys) - used)
    if unused:
        shown = ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else "")
        raise ConversionError(f"{len(unused)} tensor(s) in {where} were not accounted for: {shown}")
