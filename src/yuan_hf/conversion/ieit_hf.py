"""IEIT's Hugging Face layout (remote code, ``model_type="yuan"``): read the folder, translate ``config.json``.

The tensors keep IEIT's names here; the native sink's builder (``native/builder.py``, table
``IEIT_KEYS``) maps them to the native layout. The driver streams shard by shard, so one source file is in
memory at a time, and ends in the native sink like every converter.
"""

from __future__ import annotations

import json
import os
import pickle
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..modeling import YuanM32Config
from .common import (
    PRETRAIN_ROPE_THETA,
    SFT_ROPE_THETA,
    ConversionError,
    is_legacy_torch_save,
    read_weight_index,
    tensor_digest,
)
from .native.builder import IEIT_KEYS, NativeStateBuilder
from .native.folder import ConversionSummary, resolve_dtype, write_converted

__all__ = ["IEITCheckpoint", "check_model_type", "convert_ieit_hf", "iter_native_tensors", "native_config_from_ieit"]


def check_model_type(ieit: Mapping, where: str = "config.json") -> None:
    if ieit.get("model_type") != "yuan":
        raise ConversionError(
            f"{where} has model_type={ieit.get('model_type')!r}, expected 'yuan' (IEIT's HF layout); "
            "for Megatron checkpoints use `yuan-hf convert megatron`"
        )


def native_config_from_ieit(
    ieit: Mapping, *, rope_theta: float | None = None, rope_in_bfloat16: bool = False
) -> tuple[YuanM32Config, list[str]]:
    """Translate an IEIT ``config.json`` (``model_type="yuan"``) into a :class:`YuanM32Config`.

    Returns the config and notes on decisions a user should know about.
    """
    notes: list[str] = []
    check_model_type(ieit)
    moe = ieit.get("moe_config")
    if not isinstance(moe, Mapping):
        raise ConversionError("config.json has no 'moe_config' dict: this is not a Yuan 2.0-M32 (MoE) checkpoint")

    def need(mapping: Mapping, key: str, where: str = "config.json"):
        if key not in mapping:
            raise ConversionError(f"{where} is missing {key!r}, which the conversion needs")
        return mapping[key]

    hidden, heads = need(ieit, "hidden_size"), need(ieit, "num_attention_heads")
    proj = ieit.get("attention_projection_size", 2 * hidden)
    if proj % heads:
        raise ConversionError(f"attention_projection_size {proj} is not divisible by num_attention_heads {heads}")
    if not moe.get("gated_linear_unit", True):
        raise ConversionError("moe_config.gated_linear_unit is false; only SwiGLU experts are supported")
    if rope_theta is None:
        rope_theta = SFT_ROPE_THETA
        notes.append(
            f"RoPE base: IEIT's HF config does not record it; using {SFT_ROPE_THETA:g}, the base the released model "
            f"was fine-tuned with at 16K. Pass --rope-theta {PRETRAIN_ROPE_THETA:g} for the pretrained base model or "
            "to match IEIT's remote code, which hard-codes 10000."
        )
    sep = ieit.get("sep_token", ieit.get("sep_token_id"))
    eod = ieit.get("eod_token_id", ieit.get("eos_token_id"))
    config = YuanM32Config(
        vocab_size=need(ieit, "vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=need(ieit, "num_hidden_layers"),
        num_attention_heads=heads,
        head_dim=proj // heads,
        moe_intermediate_size=need(moe, "ffn_hidden_size", "config.json moe_config"),
        num_experts=need(moe, "moe_num_experts", "config.json moe_config"),
        num_experts_per_tok=need(moe, "moe_top_k", "config.json moe_config"),
        norm_topk_prob=bool(moe.get("norm_topk_prob", True)),
        router_type="attention",
        max_position_embeddings=need(ieit, "max_position_embeddings"),
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta), "partial_rotary_factor": hidden / proj},
        rope_in_bfloat16=rope_in_bfloat16,
        rms_norm_eps=ieit.get("rms_norm_eps", 1e-6),
        hidden_act=ieit.get("hidden_act", "silu"),
        initializer_range=ieit.get("initializer_range", 0.02),
        tie_word_embeddings=ieit.get("tie_word_embeddings", True),
        bos_token_id=ieit.get("bos_token_id", eod),
        eos_token_id=ieit.get("eos_token_id", eod),
        pad_token_id=ieit.get("pad_token_id", eod),
        sep_token_id=sep,
    )
    if ieit.get("sep_token_id") is not None and sep is not None and ieit.get("sep_token_id") != sep:
        notes.append(f"IEIT's sep_token_id ({ieit['sep_token_id']}) equals <eod>; using sep_token ({sep}) instead")
    return config, notes


@dataclass
class IEITCheckpoint:
    """An IEIT HF folder: its config and the weight files with the keys each holds."""

    path: Path
    config: dict
    files: dict[str, list[str]] = field(default_factory=dict)  # file name -> keys (None until loaded for lone .bin)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "IEITCheckpoint":
        path = Path(path)
        if not path.is_dir():
            raise ConversionError(f"{path} is not a directory; pass IEIT's HF checkpoint folder")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ConversionError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise ConversionError(f"{config_file} is not valid JSON: {err}") from err
        check_model_type(config, str(config_file))
        checkpoint = cls(path=path, config=config)
        checkpoint.files = checkpoint._discover_files()
        return checkpoint

    def _discover_files(self) -> dict[str, list[str] | None]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_file = self.path / index_name
            if index_file.is_file():
                files: dict[str, list[str]] = {}
                for key, name in read_weight_index(index_file).items():
                    files.setdefault(name, []).append(key)
                return files
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.path / single).is_file():
                return {single: None}
        raise ConversionError(
            f"{self.path} holds no weights (expected model.safetensors[.index.json] or pytorch_model.bin[.index.json])"
        )

    @property
    def declared_dtype(self) -> torch.dtype | None:
        """The weights' dtype ``config.json`` declares (``torch_dtype`` / ``dtype``), if it names a floating type."""
        name = self.config.get("torch_dtype", self.config.get("dtype"))
        dtype = getattr(torch, str(name).replace("torch.", ""), None) if name else None
        return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None

    def file_keys(self, name: str) -> list[str]:
        """The keys one weight file holds (safetensors: from the header; ``.bin``: memory-mapped, no data read)."""
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(self.path / name), framework="pt") as handle:
                    return list(handle.keys())
            except (SafetensorError, OSError) as err:
                raise ConversionError(f"cannot read {self.path / name}: it is truncated or not a weight file ({err})") from err
        return list(self._load_bin(self.path / name))

    def load_file(self, name: str) -> dict[str, torch.Tensor]:
        """Load one weight file on CPU (``.bin`` with ``weights_only=True``); errors name the file.

        Every tensor must be floating point, and of the dtype ``config.json`` declares unless its element size
        differs (e.g. fp32 norms in a bf16 checkpoint): a header that names another dtype of the same size
        (``F16`` for ``BF16`` data, ``I16``) would otherwise reinterpret the bytes silently.
        """
        file = self.path / name
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(file), framework="pt") as handle:
                    tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            except (SafetensorError, OSError) as err:
                raise ConversionError(f"cannot read {file}: it is truncated or not a weight file ({err})") from err
        else:
            tensors = self._load_bin(file)
        declared = self.declared_dtype
        for key, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise ConversionError(f"{file}: {key} is a {type(tensor).__name__}, not a tensor")
            wrong_kind = not tensor.is_floating_point()
            same_size_other = declared is not None and tensor.dtype != declared and tensor.element_size() == declared.itemsize
            if wrong_kind or same_size_other:
                raise ConversionError(
                    f"{file}: {key} is stored as {tensor.dtype}, but config.json declares torch_dtype {declared} "
                    f"(same {tensor.element_size()}-byte elements): the header's dtype is wrong or the file was "
                    "re-saved without updating config.json. Fix whichever is wrong; converting would reinterpret the bytes"
                    if same_size_other and not wrong_kind
                    else f"{file}: {key} is stored as {tensor.dtype}; model weights must be floating point "
                    "(the file's header is wrong or this is not a weight file)"
                )
        return tensors

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if is_legacy_torch_save(file):
            raise ConversionError(
                f"{file} is a legacy (pre-1.6, non-zip) torch.save file, which this converter does not read "
                "(weights_only loading needs the zip format). Re-save it with a recent torch in a trusted "
                "environment: torch.save(torch.load(path, weights_only=False), path), or convert it to "
                "safetensors, then run the conversion again"
            )
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            raise ConversionError(f"cannot read {file}: it is truncated or not a weight file ({err})") from err
        if not isinstance(loaded, Mapping):
            raise ConversionError(f"{file} holds a {type(loaded).__name__}, expected a state dict of tensors")
        return dict(loaded)


def iter_native_tensors(
    checkpoint: IEITCheckpoint, builder: NativeStateBuilder, *, progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream native tensors from an IEIT checkpoint, one source file in memory at a time.

    A key held by several files (a re-sharded or hand-merged checkpoint) is accepted when every copy is
    bitwise identical, and refused, naming both files, when they differ.
    """
    # pre-flight on the index alone: unknown keys fail before any tensor is read
    for keys in checkpoint.files.values():
        for key in keys or ():
            IEIT_KEYS.target(key)
    holders: dict[str, list[str]] = {}
    for name in checkpoint.files:
        for key in checkpoint.file_keys(name):
            holders.setdefault(key, []).append(name)
    first_copy: dict[str, tuple[str, str]] = {}  # duplicated key -> (file, digest) of the copy converted
    for name in tqdm(list(checkpoint.files), desc="converting shards", unit="file", disable=not progress):
        tensors = checkpoint.load_file(name)
        listed = checkpoint.files[name]
        if listed is not None and set(listed) - set(tensors):
            absent = sorted(set(listed) - set(tensors))[:5]
            raise ConversionError(f"{name} lacks keys its index promises: {absent}")
        for key, tensor in tensors.items():
            if len(holders.get(key, ())) > 1:
                digest = tensor_digest(tensor)
                if key in first_copy:
                    other, other_digest = first_copy[key]
                    if digest != other_digest:
                        raise ConversionError(
                            f"{key} is in both {checkpoint.path / other} and {checkpoint.path / name} with different "
                            "values; remove the stale copy (or the stale file) so that one remains"
                        )
                    continue  # an identical copy: converted once
                first_copy[key] = (name, digest)
            yield from builder.add(key, tensor)
        del tensors
    builder.finish()


def convert_ieit_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "bfloat16",
    rope_theta: float | None = None,
    rope_in_bfloat16: bool = False,
    max_shard_size: str | int = "5GB",
    tokenizer: str | os.PathLike | None = None,
    overwrite: bool = False,
    verify: bool = False,
    progress: bool = True,
) -> ConversionSummary:
    """Convert IEIT's HF-layout folder ``src`` into a native ``yuan_m32`` folder ``dst`` (atomically).

    ``overwrite`` replaces only a previous output of this package; ``verify`` reloads the result and runs a
    short forward before it is moved into place.

    ``rope_theta`` defaults to 40890 (the released SFT model); use 10000 (and ``rope_in_bfloat16=True``)
    to reproduce IEIT's remote code exactly.
    """
    start = time.perf_counter()
    torch_dtype = resolve_dtype(dtype)
    checkpoint = IEITCheckpoint.open(src)
    config, notes = native_config_from_ieit(checkpoint.config, rope_theta=rope_theta, rope_in_bfloat16=rope_in_bfloat16)
    builder = NativeStateBuilder(config, dtype=torch_dtype, notes=notes)
    provenance = {
        "source_format": "ieit_hf",
        "source": Path(src).resolve().name,  # the folder's name only: provenance ends up in model cards
        "rope_theta": config.rope_parameters["rope_theta"],
        "rope_in_bfloat16": rope_in_bfloat16,
        "dtype": str(torch_dtype or "as stored"),
        "converter": "yuan-hf convert ieit-hf",
    }
    return write_converted(
        dst, config, iter_native_tensors(checkpoint, builder, progress=progress), overwrite=overwrite,
        started=start, notes=notes, max_shard_size=max_shard_size, provenance=provenance, tokenizer=tokenizer,
        sources=[src], verify=verify,
    )  # fmt: skip


