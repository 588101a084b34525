"""Writing files safely: a destination that becomes visible only when complete, and size-bounded safetensors shards."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..common import ConversionError

__all__ = ["ShardedSafetensorsWriter", "atomic_output_dir", "parse_size"]



def parse_size(size: str | int) -> int:
    """``"5GB"`` / ``"600KB"`` / ``"1.5GiB"`` / ``12345`` -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max shard size {size!r} is not a size; use e.g. '5GB', '500MB' or a byte count")
    value, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    powers |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(value * powers[unit])



class ShardedSafetensorsWriter:
    """Writes tensors into size-bounded safetensors shards as they come, then an index.

    Shards are first written as ``model-part-NNNNN.safetensors`` and renamed to the standard
    ``model-0000i-of-0000n.safetensors`` by :meth:`finish`, once ``n`` is known. A single shard is
    named ``model.safetensors`` with no index, as ``save_pretrained`` does.
    """

    def __init__(self, directory: str | os.PathLike, *, max_shard_size: str | int = "5GB", metadata: dict | None = None):
        self.directory = Path(directory)
        self.max_shard_bytes = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.num_parameters = 0
        self.dtypes: set[torch.dtype] = set()
        self._seen: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ConversionError(f"target key {name!r} was produced twice; the conversion table is inconsistent")
        self._seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes
        self.num_parameters += tensor.numel()
        self.dtypes.add(tensor.dtype)

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.directory / f"model-part-{len(self._parts):05d}.safetensors"
        save_file(self._pending, str(path), metadata=self.metadata)
        self._parts.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flush the last shard, give the shards their final names, write the index; return file names."""
        self._flush()
        if len(self._parts) == 1:
            final = self.directory / "model.safetensors"
            self._parts[0][0].rename(final)
            return [final.name]
        n = len(self._parts)
        weight_map: dict[str, str] = {}
        names = []
        for i, (path, keys) in enumerate(self._parts, start=1):
            final = self.directory / f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            names.append(final.name)
            weight_map.update(dict.fromkeys(keys, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


@contextlib.contextmanager
def atomic_output_dir(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``dst`` that becomes ``dst`` only if the block succeeds.

    A non-empty ``dst`` is refused unless ``overwrite``. On any error the temporary directory is

    complete.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ConversionError(f"destination {dst} is not empty; choose another folder or pass --overwrite")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        backup = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(backup)
        tmp.rename(dst)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        tmp.rename(dst)
