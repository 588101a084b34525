"""The end of every conversion: the native folder (config, weights, modeling code, tokenizer), its summary, ``--verify``.

:func:`write_converted` is the tail every converter calls with a stream of native tensors (from
:class:`~.builder.NativeStateBuilder`); it writes through :func:`~.output.atomic_output_dir` and
:class:`~.output.ShardedSafetensorsWriter` and returns a :class:`ConversionSummary`.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ...modeling import YuanM32Config, YuanM32ForCausalLM
from ...modeling.modeling_yuan_m32 import auto_map
from ...parameters import ParameterCount, count_config_parameters
from ..common import ConversionError
from .builder import ConversionWarning
from .output import PROVENANCE_FILE, ShardedSafetensorsWriter, atomic_output_dir

__all__ = ["ConversionSummary", "DTYPES", "add_tokenizer", "resolve_dtype", "verify_folder", "write_converted", "write_native_folder"]


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def add_tokenizer(folder: Path, source: str | os.PathLike, config: YuanM32Config, *, adopt_ids: bool = False) -> None:
    """Convert IEIT's tokenizer into ``folder`` and align the config's special ids with it.

    The padding id becomes the tokenizer's ``<pad>`` (IEIT pads with ``<eod>``, which breaks batched
    generation); eos and sep must agree with the checkpoint's config, unless ``adopt_ids`` (Megatron
    checkpoints record no token ids): then bos, eos and sep are taken from the tokenizer.
    """
    import shutil

    from transformers import AutoTokenizer

    from ..tokenizer import convert_tokenizer

    staging = folder / ".tokenizer"
    convert_tokenizer(source, staging)
    tok = AutoTokenizer.from_pretrained(staging)
    if adopt_ids:
        config.bos_token_id, config.eos_token_id, config.sep_token_id = tok.bos_token_id, tok.eos_token_id, tok.sep_token_id
    for name, config_id, tok_id in (("eos", config.eos_token_id, tok.eos_token_id), ("sep", config.sep_token_id, tok.sep_token_id)):
        if config_id is not None and tok_id is not None and config_id != tok_id:
            raise ConversionError(
                f"the tokenizer's {name} id ({tok_id}) differs from the checkpoint's ({config_id}); "
                "is this the tokenizer of this model?"
            )
    if len(tok) > config.vocab_size:
        raise ConversionError(f"the tokenizer has {len(tok)} tokens but the model's vocabulary is {config.vocab_size}")
    config.pad_token_id = tok.pad_token_id
    for file in staging.iterdir():
        shutil.move(str(file), folder / file.name)
    staging.rmdir()


def write_native_folder(
    tmp: Path,
    config: YuanM32Config,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    max_shard_size: str | int = "5GB",
    provenance: Mapping[str, object] | None = None,
    tokenizer: str | os.PathLike | None = None,
    adopt_token_ids: bool = False,
) -> ShardedSafetensorsWriter:
    """Write config, generation config, modeling code (for ``trust_remote_code``), the weights and,
    if ``tokenizer`` names IEIT's ``tokenizer.model`` (or its folder), the converted tokenizer into ``tmp``."""
    from transformers.dynamic_module_utils import custom_object_save

    if tokenizer is not None:  # first: a bad tokenizer fails before the long weight conversion
        add_tokenizer(tmp, tokenizer, config, adopt_ids=adopt_token_ids)
    writer = ShardedSafetensorsWriter(tmp, max_shard_size=max_shard_size)
    for name, tensor in tensors:
        writer.add(name, tensor)
    writer.finish()
    if writer.dtypes:
        config.dtype = max(writer.dtypes, key=lambda d: torch.finfo(d).bits if d.is_floating_point else 0)
    with torch.device("meta"):  # copies the modeling files and adds the model class to config.auto_map
        custom_object_save(YuanM32ForCausalLM(config), tmp, config=config)
    # every Auto class finds its Yuan head through remote code, as in folders written by save_pretrained
    config.auto_map = {**config.auto_map, **auto_map()}
    config.architectures = [YuanM32ForCausalLM.__name__]
    config.save_pretrained(tmp)  # also copies the configuration file and adds AutoConfig to auto_map
    release_generation_config(config).save_pretrained(tmp)
    if tokenizer is None and config.pad_token_id in _as_list(config.eos_token_id):
        warnings.warn(
            f"pad_token_id equals eos ({config.pad_token_id}, <eod> in the release): batched generation cannot tell "
            "padding from the end of a text, and fine-tuning on padded batches ignores <eod>. Convert with "
            "--tokenizer (its <pad> becomes pad_token_id) or set pad_token_id in config.json and "
            "generation_config.json.",
            ConversionWarning,
            stacklevel=3,
        )
    if provenance is not None:
        (tmp / PROVENANCE_FILE).write_text(json.dumps(dict(provenance), indent=2, default=str) + "\n")
    return writer


# What IEIT documents for the release: greedy decoding (`do_sample=False` in its HF examples, `top_k=1` in its
# vLLM ones) that stops at <eod>. Answers get up to 1024 new tokens (transformers' pipeline default is 256).
RELEASE_GENERATION_DEFAULTS = {"do_sample": False, "max_new_tokens": 1024}


def release_generation_config(config: YuanM32Config):
    """`generation_config.json` for a converted folder: the config's special ids plus IEIT's decoding defaults."""
    from transformers import GenerationConfig

    generation_config = GenerationConfig.from_model_config(config)
    generation_config.update(**RELEASE_GENERATION_DEFAULTS)
    return generation_config


def _as_list(ids: int | list[int] | None) -> list[int]:
    return ids if isinstance(ids, list) else [] if ids is None else [ids]


def write_converted(
    dst: str | os.PathLike,
    config: YuanM32Config,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    overwrite: bool,
    started: float,
    notes: list[str],
    sources: Iterable[str | os.PathLike] = (),
    verify: bool = False,
    **folder_options,
) -> ConversionSummary:
    """The tail every converter shares: write the native folder atomically, optionally verify it, summarise it.

    ``sources`` are the folders the conversion reads: ``dst`` may not be, contain or lie inside one.
    With ``verify`` the folder is reloaded and run *before* it is moved into place, so a failed check
    leaves nothing at ``dst``.
    """
    with atomic_output_dir(dst, overwrite=overwrite, sources=sources) as tmp:
        writer = write_native_folder(tmp, config, tensors, **folder_options)
        if verify:
            notes.append(verify_folder(tmp, name=Path(dst)))
    return ConversionSummary(
        destination=Path(dst),
        num_parameters=writer.num_parameters,
        parameters=count_config_parameters(config),
        dtype=str(config.dtype).replace("torch.", ""),
        shards=sorted(p.name for p in Path(dst).glob("*.safetensors")),
        rope_theta=config.rope_parameters["rope_theta"],
        seconds=time.perf_counter() - started,
        notes=notes,
    )


@dataclass
class ConversionSummary:
    destination: Path
    num_parameters: int
    parameters: ParameterCount
    dtype: str
    shards: list[str]
    rope_theta: float
    seconds: float
    notes: list[str]

    def __str__(self) -> str:
        lines = [
            f"wrote {self.destination}",
            f"  parameters: {self.num_parameters:,} ({self.dtype}), {len(self.shards)} shard(s)",
            f"  size: {self.parameters.describe()}",
            f"  RoPE base: {self.rope_theta:g}",
            f"  time: {self.seconds:.1f} s",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def verify_folder(folder: str | os.PathLike, *, tokens: int = 8, name: str | os.PathLike | None = None) -> str:
    """Reload a converted folder with the Auto classes and run a short forward; return a one-line report.

    ``name`` is how errors call the folder (the destination, while ``folder`` is still its temporary copy).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.arange(tokens)[None] % model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).logits.float()
    if not torch.isfinite(logits).all():
        raise ConversionError(
            f"verification failed: {name or folder} produced non-finite logits (the weights hold NaN/Inf or overflow the dtype; see the warnings above); nothing was written"
        )
    return f"verified: reloaded and ran a {tokens}-token forward (logits finite, std {logits.std():.3f})"


