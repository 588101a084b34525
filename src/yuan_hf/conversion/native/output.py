"""Writing files safely: a destination that becomes visible only when complete, and size-bounded safetensors shards."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..common import ConversionError

__all__ = ["PROVENANCE_FILE", "ShardedSafetensorsWriter", "atomic_output_dir", "check_destination", "is_previous_output", "parse_size"]

PROVENANCE_FILE = "conversion.json"  # written by every converter; marks a folder --overwrite may replace



def parse_size(size: str | int) -> int:
    """``"5GB"`` / ``"600KB"`` / ``"1.5GiB"`` / ``12345`` -> bytes (positive)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
        if not match:
            raise ConversionError(f"max shard size {size!r} is not a size; use e.g. '5GB', '500MB' or a byte count")
        number, unit = float(match.group(1)), (match.group(2) or "B").upper()
        powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
        powers |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
        value = int(number * powers[unit])
    if value <= 0:
        raise ConversionError(f"max shard size {size!r} must be positive; use e.g. '5GB'")
    return value


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


def is_previous_output(folder: Path) -> bool:
    """Whether ``folder`` is recognisably a native folder this package wrote (it holds our ``conversion.json``)."""
    try:
        provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(provenance, dict) and str(provenance.get("converter", "")).startswith("yuan-hf ")


def check_destination(
    dst: Path,
    *,
    sources: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    replaceable: Callable[[Path], bool] = is_previous_output,
) -> Path:
    """Refuse a destination that would destroy data; return it resolved (symlinks followed).

    Refused: ``dst`` equal to a source, inside one, or holding one (so replacing it would delete the
    source); a non-empty ``dst`` without ``overwrite``; with ``overwrite``, a non-empty ``dst`` that
    ``replaceable`` does not recognise as a previous output (e.g. a folder of the user's own files).
    """
    resolved = Path(dst).expanduser().resolve()
    for source in sources:
        src = Path(source).expanduser().resolve()
        if resolved == src or src.is_relative_to(resolved) or resolved.is_relative_to(src):
            relation = "is" if resolved == src else "contains" if src.is_relative_to(resolved) else "lies inside"
            raise ConversionError(
                f"destination {dst} {relation} the source {source} ({src}); writing there would destroy the source. "
                "Choose an output folder outside the source"
            )
    if resolved.exists() and not resolved.is_dir():
        raise ConversionError(f"destination {dst} exists and is not a directory")
    entries = sorted(p.name for p in resolved.iterdir()) if resolved.is_dir() else []
    if entries and not overwrite:
        raise ConversionError(f"destination {dst} is not empty; choose another folder or pass --overwrite")
    if entries and not replaceable(resolved):
        shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
        raise ConversionError(
            f"--overwrite only replaces a previous output of yuan-hf (a folder holding its {PROVENANCE_FILE}); "
            f"{dst} holds {shown}. Move those files away or choose another folder"
        )
    return resolved


def _apply_umask(root: Path) -> None:
    """Give ``root`` and everything in it the modes a plain ``mkdir`` / ``open`` would (``mkdtemp`` gives 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_output_dir(
    dst: str | os.PathLike,
    *,
    overwrite: bool = False,
    sources: Iterable[str | os.PathLike] = (),
    replaceable: Callable[[Path], bool] = is_previous_output,
) -> Iterator[Path]:
    """Yield a temporary directory next to ``dst`` that becomes ``dst`` only if the block succeeds.

    ``dst`` is checked first (:func:`check_destination`). On any error the temporary directory is removed
    and ``dst`` is left as it was, so a failed conversion never leaves a folder that looks complete. The
    result's modes follow the umask (directories ``0777 & ~umask``, files ``0666 & ~umask``).
    """
    dst = check_destination(Path(dst), sources=sources, overwrite=overwrite, replaceable=replaceable)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        _apply_umask(tmp)
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
