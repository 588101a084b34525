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
    verify: bool = False,
    progress: bool = True,
) -> ConversionSummary:
    """Convert a Megatron-LM checkpoint (any TP x PP) into a native, Hub-ready ``yuan_m32`` folder.

    Streams one pipeline stage at a time through the same IEIT-layout transforms, shape checks and
    atomic sharded writer as ``convert ieit-hf``; token ids come from ``tokenizer`` (Megatron args do not
    record them; without a tokenizer pass all four ``token_ids``, e.g. ``{"bos": 77185, "eos": 77185, "pad": 77188,
    "sep": 77187}``, else the release's ids are used). ``overwrite`` replaces only a previous output of this
    package; ``verify`` checks the folder before it is moved into place. Returns a :class:`~yuan_hf.conversion.native.folder.ConversionSummary`.
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
        kwargs |= _token_id_kwargs(token_ids, vocab_size=kwargs["vocab_size"])
    elif tokenizer is not None:  # the tokenizer's ids are adopted once it is converted
        kwargs |= {f"{name}_token_id": None for name in TOKEN_ID_NAMES}
    else:
        release_ids = YuanM32Config().eos_token_id, YuanM32Config().sep_token_id
        if max(release_ids) >= kwargs["vocab_size"]:
            raise ConversionError(
                f"Megatron args record no token ids and the release's (<eod> {release_ids[0]}, <sep> {release_ids[1]}) "
                f"do not fit this model's vocabulary ({kwargs['vocab_size']}); pass --tokenizer (IEIT's "
                "tokenizer.model), or all four ids with --token-ids bos=..,eos=..,pad=..,sep=.."
            )
        notes.append(
            "token ids: Megatron args do not record them; using the release's (<eod> 77185, <sep> 77187). "
            "Pass --tokenizer to take them from the tokenizer (and get a complete folder)"
        )
    try:
        config = YuanM32Config(**kwargs)
    except ValueError as exc:
        raise ConversionError(f"the Megatron args and token ids give an invalid config: {exc}") from exc
    builder = NativeStateBuilder(
        config, dtype=torch_dtype, config_fields=MEGATRON_CONFIG_FIELDS, config_source="the Megatron args", notes=notes
    )

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        stages = iter_ieit_stages(ckpt)
        for stage in tqdm(stages, total=ckpt.num_stages, desc="converting stages", unit="stage", disable=not progress):
            for key in list(stage):
                yield from builder.add(key, stage.pop(key))  # drop each source tensor once converted
            del stage
        builder.finish()

    provenance = {
        "source_format": "megatron",
        "source": Path(src).resolve().name,  # the folder's name only: provenance ends up in model cards
        "iteration": ckpt.iteration,
        "tensor_parallel": ckpt.tp_size,
        "pipeline_parallel": ckpt.pp_size,
        "rope_theta": config.rope_parameters["rope_theta"],
        "dtype": str(torch_dtype or "as stored"),
        "converter": "yuan-hf convert megatron",
    }
    return write_converted(
        dst, config, tensors(), overwrite=overwrite, started=start, notes=notes, max_shard_size=max_shard_size,
        provenance=provenance, tokenizer=tokenizer, adopt_token_ids=True, sources=[src], verify=verify,
    )  # fmt: skip


TOKEN_ID_NAMES = ("bos", "eos", "pad", "sep")

# Native sizes under their names in Megatron's args (errors about a config contradicting tensors name these).
MEGATRON_CONFIG_FIELDS = {
    "vocab_size": "args.padded_vocab_size",
    "hidden_size": "args.hidden_size",
    "projection": "args.num_attention_heads x args.kv_channels",
    "num_experts": "args.num_experts",
    "moe_intermediate_size": "args.ffn_hidden_size",
    "num_hidden_layers": "args.num_layers",
}


def _token_id_kwargs(token_ids: Mapping[str, int], *, vocab_size: int) -> dict[str, int]:
    """``--token-ids`` -> config kwargs. All four are needed: Megatron args record none, and silently taking
    the release's ids for the missing ones would mix two vocabularies."""
    unknown = sorted(set(token_ids) - set(TOKEN_ID_NAMES))
    if unknown:
        raise ConversionError(f"unknown token id name(s) {unknown} in --token-ids; use bos, eos, pad, sep")
    missing = [name for name in TOKEN_ID_NAMES if name not in token_ids]
    if missing:
        raise ConversionError(
            f"--token-ids lacks {', '.join(missing)}: Megatron args record no token ids, so all four are needed "
            "(e.g. --token-ids bos=77185,eos=77185,pad=77188,sep=77187 for the release's tokenizer), or pass "
            "--tokenizer to take them from IEIT's tokenizer.model"
        )
    out = {}
    for name in TOKEN_ID_NAMES:
        value = int(token_ids[name])
        if not 0 <= value < vocab_size:
            raise ConversionError(f"--token-ids {name}={value} is outside the model's vocabulary (0..{vocab_size - 1})")
        out[f"{name}_token_id"] = value
    return out

