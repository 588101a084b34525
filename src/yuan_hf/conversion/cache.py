"""The on-the-fly conversion cache: ``YuanM32ForCausalLM.from_pretrained(ieit_folder)`` converts once, then reuses.

Registered as a source adapter of the native model (``registration.py``). transformers' load-time weight
conversion cannot express the per-head Q/K de-interleave nor the config translation, so an IEIT folder is
converted into ``$YUAN_HF_CACHE/converted/<name>-<fingerprint>`` (default ``~/.cache/yuan_hf``).

Guarantees:

* **One conversion per entry.** A file lock (``<entry>.lock``) serialises processes: the first converts,
  the others wait and then load its result. Conversions write to a temporary folder renamed at the end.
* **Sound fingerprint.** The entry name hashes every source file's name, size and full-content sha256.
  Hashing is memoised in ``hashes.json`` under ``(path, size, mtime, ctime, inode)``: ``ctime`` changes on
  every write, even when the mtime is set back, so changed weights are re-hashed; an untouched folder costs
  a ``stat`` per file. (Head/tail-chunk hashing would be cheaper on first use but misses edits in the
  middle of a shard; a full hash costs one read of the source, which the conversion itself needs anyway.)
* **Verified before use.** An entry is used only if its manifest (``cache.json``: fingerprint, file sizes)
  matches and every safetensors header parses with the file's exact size; otherwise it is converted again.
* **No leftovers.** Temporary folders of conversions that were killed are removed once their lock is free.
* **Read-only caches.** If the cache folder cannot be written, a valid entry there is still used; otherwise
  the conversion goes to a per-user folder in the system temp dir, with a warning naming ``YUAN_HF_CACHE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from filelock import FileLock, Timeout

from .common import SFT_ROPE_THETA, ConversionError
from .ieit_hf import convert_ieit_hf

__all__ = ["cache_root", "convert_on_the_fly", "source_fingerprint"]

MANIFEST = "cache.json"
HASH_MEMO = "hashes.json"


def cache_root() -> Path:
    """``$YUAN_HF_CACHE/converted`` (default ``~/.cache/yuan_hf/converted``)."""
    return Path(os.environ.get("YUAN_HF_CACHE", Path.home() / ".cache" / "yuan_hf")).expanduser() / "converted"


def _logger():
    from transformers.utils import logging

    return logging.get_logger("yuan_hf")


def _is_ieit_folder(source: Path) -> bool:
    config_file = source / "config.json"
    if not config_file.is_file():
        return False
    try:
        return json.loads(config_file.read_text()).get("model_type") == "yuan"
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


# ------------------------------------------------------------------------------------------------ fingerprint


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def source_fingerprint(source: Path, memo_file: Path | None = None) -> str:
    """sha256 over every file of ``source``: name, size and content hash (content hashes memoised, see above)."""
    memo: dict[str, list] = {}
    if memo_file is not None:
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
    changed = False
    digest = hashlib.sha256()
    for file in sorted(p for p in source.iterdir() if p.is_file()):
        info = file.stat()
        stamp = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
        key = str(file.resolve())
        known = memo.get(key)
        if isinstance(known, list) and known[:4] == stamp:
            content = known[4]
        else:
            content = _file_sha256(file)
            memo[key] = [*stamp, content]
            changed = True
        digest.update(f"{file.name}\0{info.st_size}\0{content}\n".encode())
    if changed and memo_file is not None:
        _write_json_atomically(memo_file, memo)
    return digest.hexdigest()


def _write_json_atomically(path: Path, data: dict) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)
    except OSError:
        pass  # only a memo: the next load hashes again


# ------------------------------------------------------------------------------------------------ entries


def _safetensors_intact(path: Path) -> bool:
    """Header parses and the file is exactly as long as the header says (catches truncation and damage)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                return False
            header = json.loads(handle.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return size == 8 + length + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def entry_is_valid(entry: Path, fingerprint: str) -> bool:
    """Whether a cache entry is complete and belongs to ``fingerprint`` (see the module docstring)."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != fingerprint:
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, size in files.items():
        path = entry / name
        if not path.is_file() or path.stat().st_size != size:
            return False
        if name.endswith(".safetensors") and not _safetensors_intact(path):
            return False
    return True


def _write_manifest(entry: Path, fingerprint: str) -> None:
    files = {p.name: p.stat().st_size for p in sorted(entry.iterdir()) if p.is_file() and p.name != MANIFEST}
    (entry / MANIFEST).write_text(json.dumps({"fingerprint": fingerprint, "files": files}, indent=2) + "\n")


def _remove_stale_temps(root: Path, held: str) -> None:
    """Remove temporary folders of conversions that died: ``held``'s (whose lock this process holds) and
    those of other entries whose lock is free."""
    for tmp in root.glob(".*.tmp-*"):
        name = tmp.name[1:].split(".tmp-", 1)[0]
        if name == held:
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        try:
            with FileLock(str(root / f"{name}.lock")).acquire(timeout=0):
                shutil.rmtree(tmp, ignore_errors=True)
        except Timeout:
            continue  # that conversion is running right now


def _writable_root(root: Path) -> bool:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".probe-")
        probe.close()
        return True
    except OSError:
        return False


def _fallback_root() -> Path:
    return Path(tempfile.gettempdir()) / f"yuan_hf-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / "converted"


def convert_on_the_fly(path: str | os.PathLike, kwargs: dict) -> str | None:
    """`YuanM32ForCausalLM.from_pretrained` adapter: an IEIT HF folder becomes a converted cache folder.

    Returns the folder to load instead of ``path``, or ``None`` if ``path`` is not an IEIT folder.
    """
    source = Path(path)
    if not source.is_dir() or not _is_ieit_folder(source):
        return None
    root = cache_root()
    writable = _writable_root(root)
    fingerprint = source_fingerprint(source, root / HASH_MEMO if writable else None)
    name = f"{source.resolve().name}-{fingerprint[:16]}"
    if not writable:
        if entry_is_valid(root / name, fingerprint):
            return str(root / name)  # a read-only cache that already holds this conversion
        fallback = _fallback_root()
        if not _writable_root(fallback):
            raise ConversionError(
                f"cannot convert {source} on the fly: neither the cache {root} nor {fallback} is writable. Set "
                "YUAN_HF_CACHE to a writable folder, or convert once with `yuan-hf convert ieit-hf SRC DST` and "
                "load DST"
            )
        _logger().warning(f"the conversion cache {root} is not writable; using {fallback} (set YUAN_HF_CACHE to choose)")
        root = fallback
    entry = root / name
    with FileLock(str(root / f"{name}.lock")):
        if entry_is_valid(entry, fingerprint):
            return str(entry)
        _remove_stale_temps(root, held=name)
        if entry.exists():
            _logger().warning(f"the cached conversion {entry} is incomplete or damaged; converting again")
            shutil.rmtree(entry)
        _logger().warning(
            f"{source} is IEIT's HF layout: converting it once to {entry} (RoPE base {SFT_ROPE_THETA:g}; run "
            "`yuan-hf convert ieit-hf` yourself to choose the base, dtype and location)"
        )
        convert_ieit_hf(source, entry, dtype=None, progress=True)
        _write_manifest(entry, fingerprint)
    return str(entry)
