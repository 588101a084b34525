"""The on-the-fly conversion cache: ``YuanM32ForCausalLM.from_pretrained(ieit_folder)`` converts once, then reuses.

Registered as a source adapter of the native model (``registration.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .common import SFT_ROPE_THETA
from .ieit_hf import convert_ieit_hf

__all__ = ["cache_root", "convert_on_the_fly"]


def cache_root() -> Path:
    return Path(os.environ.get("YUAN_HF_CACHE", Path.home() / ".cache" / "yuan_hf")) / "converted"


def convert_on_the_fly(path: str | os.PathLike, kwargs: dict) -> str | None:
    """`YuanM32ForCausalLM.from_pretrained` adapter: an IEIT HF folder is converted once into a cache folder.

    transformers' load-time weight conversion cannot express the per-head Q/K de-interleave nor the
    config translation, so the folder is converted with this module into
    ``$YUAN_HF_CACHE/converted/<name>-<fingerprint>`` (default ``~/.cache/yuan_hf``) and loaded from there;
    later loads reuse it. The fingerprint covers the source files' names, sizes and modification times.
    """
    import hashlib

    from transformers.utils import logging

    source = Path(path)
    config_file = source / "config.json"
    if not config_file.is_file():
        return None
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError:
        return None
    if model_type != "yuan":
        return None
    stamp = hashlib.sha1()
    for file in sorted(source.iterdir()):
        if file.is_file():
            info = file.stat()
            stamp.update(f"{file.name}:{info.st_size}:{info.st_mtime_ns};".encode())
    target = cache_root() / f"{source.absolute().name}-{stamp.hexdigest()[:12]}"
    if not (target / "config.json").is_file():
        logger = logging.get_logger("yuan_hf")
        logger.warning(
            f"{source} is IEIT's HF layout: converting it once to {target} (RoPE base {SFT_ROPE_THETA:g}; run "
            "`yuan-hf convert ieit-hf` yourself to choose the base, dtype and location)"
        )
        convert_ieit_hf(source, target, dtype=None, overwrite=True, progress=True)
    return str(target)

