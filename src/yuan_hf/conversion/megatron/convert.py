"""``yuan-hf convert megatron``: the driver. Reader (``checkpoint.py``, ``pickle_reader.py``) -> merge
(``merge.py``) -> native sink (``conversion/native``), one pipeline stage in memory at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from ...modeling import YuanM32Config
from ..common import ConversionError
from ..native.builder import NativeStateBuilder
from ..native.folder import ConversionSummary, resolve_dtype, write_converted
from .args import args_dict, native_config_from_args
from .checkpoint import MegatronCheckpoint
from .merge import iter_ieit_stages

__all__ = ["convert_megatron"]


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
) -> ConversionSummary:
    """Convert a Megatron-LM checkpoint (any TP x PP) into a native, Hub-ready ``yuan_m32`` folder.

    Streams one pipeline stage at a time through the same IEIT-layout transforms, shape checks and
    atomic sharded writer as ``convert ieit-hf``; token ids come from ``tokenizer`` (Megatron args do not
    record them; without a tokenizer pass ``token_ids`` like ``{"eos": 77185, "sep": 77187}``, else the
    release's ids are used). Returns a :class:`~yuan_hf.conversion.native.folder.ConversionSummary`.
    """
    start = time.perf_counter()
    torch_dtype = resolve_dtype(dtype)
    ckpt = MegatronCheckpoint.open(src, iteration=iteration)
    overrides = None
    if rope_theta is not None:
        args = args_dict(ckpt.args)
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

