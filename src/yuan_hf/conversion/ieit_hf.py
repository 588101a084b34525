"""IEIT's Hugging Face layout (remote code, ``model_type="yuan"``) -> the native ``yuan_m32`` layout.

The table below names every IEIT key; tensor surgery lives in small pure functions whose docstrings show
the layout. The driver streams shard by shard, proves completeness and shapes against the native model
built on the ``meta`` device, and writes atomically (see ``common.py``).
"""

from __future__ import annotations

import json
import os
import re
import pickle
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..modeling import YuanM32Config, YuanM32ForCausalLM
from .common import (
    PRETRAIN_ROPE_THETA,
    SFT_ROPE_THETA,
    ConversionError,
    KeyTable,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    read_weight_index,
    tensor_digest,
)


# IEIT key -> native key. `{}` = layer number (then expert number). Every IEIT key must match.
IEIT_KEYS = KeyTable(
    {
        "model.embed_tokens.weight": "model.embed_tokens.weight",
        "model.norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
        "model.layers.{}.input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
        "model.layers.{}.post_attention_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
        # IEIT's q_proj / k_proj are the two halves of Megatron's per-head [q_h; k_h] weight: see split_fused_qk
        "model.layers.{}.self_attn.q_proj.weight": "model.layers.{}.self_attn.qk_first_half",
        "model.layers.{}.self_attn.k_proj.weight": "model.layers.{}.self_attn.qk_second_half",
        "model.layers.{}.self_attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
        "model.layers.{}.self_attn.o_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
        "model.layers.{}.self_attn.lf_gate.conv1.weight": "model.layers.{}.self_attn.lf_gate.conv1.weight",
        "model.layers.{}.self_attn.lf_gate.conv1.bias": "model.layers.{}.self_attn.lf_gate.conv1.bias",
        "model.layers.{}.self_attn.lf_gate.conv2.weight": "model.layers.{}.self_attn.lf_gate.conv2.weight",
        "model.layers.{}.self_attn.lf_gate.conv2.bias": "model.layers.{}.self_attn.lf_gate.conv2.bias",
        "model.layers.{}.self_attn.lf_gate.output_layernorm.weight": "model.layers.{}.self_attn.lf_gate.output_layernorm.weight",
        "model.layers.{}.mlp.gate.query.weight": "model.layers.{}.mlp.gate.query.weight",
        "model.layers.{}.mlp.gate.key.weight": "model.layers.{}.mlp.gate.key.weight",
        "model.layers.{}.mlp.gate.value.weight": "model.layers.{}.mlp.gate.value.weight",
        "model.layers.{}.mlp.gate.weight": "model.layers.{}.mlp.gate.weight",  # linear router (non-IEIT checkpoints)
        "model.layers.{}.mlp.experts.{}.w1.weight": "model.layers.{}.mlp.experts.{}.gate_up",
        "model.layers.{}.mlp.experts.{}.w2.weight": "model.layers.{}.mlp.experts.{}.down_proj.weight",
        # non-persistent buffers some IEIT saves carry
        "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
    }
)


def split_fused_qk(first_half: torch.Tensor, second_half: torch.Tensor, *, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """IEIT ``q_proj`` / ``k_proj`` -> true per-head Q and K.

    IEIT's two [P, H] tensors are the halves of Megatron's fused ``get_query_key`` [2P, H], laid out per head:
    ``cat(q_proj, k_proj) = [q_0; k_0; q_1; k_1; ...]`` (each block head_dim rows). Returns
    ``Q = [q_0; q_1; ...]`` and ``K = [k_0; k_1; ...]``, each [P, H].
    """
    fused = torch.cat([first_half, second_half], dim=0)  # [2P, H] = [q_0; k_0; q_1; k_1; ...]
    head_dim = fused.shape[0] // (2 * num_heads)
    per_head = fused.view(num_heads, 2, head_dim, fused.shape[1])  # [heads, (q, k), d, H]
    return per_head[:, 0].reshape(-1, fused.shape[1]), per_head[:, 1].reshape(-1, fused.shape[1])


def fuse_qk(q: torch.Tensor, k: torch.Tensor, *, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`split_fused_qk`: per-head Q, K [P, H] -> IEIT ``q_proj``, ``k_proj`` [P, H]."""
    head_dim = q.shape[0] // num_heads
    per_head = torch.stack([q.view(num_heads, head_dim, -1), k.view(num_heads, head_dim, -1)], dim=1)
    fused = per_head.reshape(2 * q.shape[0], q.shape[1])  # [q_0; k_0; q_1; k_1; ...]
    return fused.chunk(2, dim=0)


def split_gate_up(w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IEIT expert ``w1`` [2F, H] = ``[gate; up]`` -> ``gate_proj`` [F, H], ``up_proj`` [F, H]."""
    gate, up = w1.chunk(2, dim=0)
    return gate, up


def conv2d_to_conv1d(weight: torch.Tensor) -> torch.Tensor:
    """IEIT LF conv (Conv2d, kernel (2, 1)) [out, in, 2, 1] -> Conv1d [out, in, 2] (tap 0 = step t-1)."""
    return weight.squeeze(-1) if weight.ndim == 4 else weight


def check_model_type(ieit: Mapping, where: str = "config.json") -> None:
    if ieit.get("model_type") != "yuan":
        raise ConversionError(
            f"{where} has model_type={ieit.get('model_type')!r}, expected 'yuan' (IEIT's HF layout); "
            "for Megatron checkpoints use `yuan-hf convert megatron`"
        )


def ieit_config_from_native(config: YuanM32Config) -> dict:
    """The IEIT ``config.json`` (``model_type="yuan"``, remote-code keys) describing a native config's model."""
    eod = config.eos_token_id
    return {
        "architectures": ["YuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_yuan.YuanConfig", "AutoModelForCausalLM": "yuan_hf_model.YuanForCausalLM"},
        "model_type": "yuan",
        "attention_projection_size": config.num_attention_heads * config.head_dim,
        "bos_token_id": config.bos_token_id, "eos_token_id": eod, "eod_token": eod, "eod_token_id": eod,
        "pad_token_id": config.pad_token_id, "mask_token_id": eod, "sep_token": config.sep_token_id, "sep_token_id": eod,
        "hidden_act": config.hidden_act, "hidden_size": config.hidden_size, "initializer_range": config.initializer_range,
        "intermediate_size": config.moe_intermediate_size, "max_position_embeddings": config.max_position_embeddings,
        "moe_config": {
            "ffn_hidden_size": config.moe_intermediate_size, "gated_linear_unit": True,
            "moe_num_experts": config.num_experts, "moe_top_k": config.num_experts_per_tok,
            "norm_topk_prob": config.norm_topk_prob,
        },
        "num_attention_heads": config.num_attention_heads, "num_hidden_layers": config.num_hidden_layers,
        "reset_attention_mask": False, "reset_position_ids": True, "rms_norm_eps": config.rms_norm_eps,
        "torch_dtype": "bfloat16", "use_cache": True, "use_flash_attention": False, "use_loss_mask": False,
        "use_moe": True, "vocab_size": config.vocab_size,
    }  # fmt: skip


def ieit_state_dict_from_native(state_dict: Mapping[str, torch.Tensor], config: YuanM32Config) -> dict[str, torch.Tensor]:
    """Native weights -> IEIT's HF layout (the inverse of the conversion; used to build test and demo checkpoints)."""
    inverse = {dst: src for src, dst in IEIT_KEYS.table.items() if dst is not None}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        layer_expert = re.findall(r"\.(\d+)\.", name)
        pattern = re.sub(r"\.\d+\.", ".{}.", name)
        if pattern.endswith(".self_attn.q_proj.weight"):
            k = state_dict[name.replace("q_proj", "k_proj")]
            first, second = fuse_qk(tensor, k, num_heads=config.num_attention_heads)
            out[name] = first.contiguous()
            out[name.replace("q_proj", "k_proj")] = second.contiguous()
        elif pattern.endswith(".self_attn.k_proj.weight") or pattern.endswith(".up_proj.weight"):
            continue  # written with its partner
        elif pattern.endswith(".gate_proj.weight"):
            up = state_dict[name.replace("gate_proj", "up_proj")]
            out[name.replace("gate_proj.weight", "w1.weight")] = torch.cat([tensor, up], 0)
        elif pattern.endswith(".down_proj.weight"):
            out[name.replace("down_proj.weight", "w2.weight")] = tensor
        elif ".lf_gate.conv" in pattern and pattern.endswith(".weight"):
            out[name] = tensor.unsqueeze(-1)
        elif pattern in inverse:
            out[inverse[pattern].format(*layer_expert)] = tensor
        else:
            raise ConversionError(f"native key {name} has no IEIT counterpart")
    return out


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


# ----------------------------------------------------------------------------------------------- reading


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

    def load_file(self, name: str) -> dict[str, torch.Tensor]:
        """Load one weight file on CPU (``.bin`` with ``weights_only=True``); errors name the file."""
        file = self.path / name
        try:
            if name.endswith(".safetensors"):
                with safe_open(str(file), framework="pt") as handle:
                    return {key: handle.get_tensor(key) for key in handle.keys()}
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except (SafetensorError, RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            raise ConversionError(f"cannot read {file}: it is truncated or not a weight file ({err})") from err


# ----------------------------------------------------------------------------------------------- converting


class NativeStateBuilder:
    """Turns IEIT tensors (in any order, shard by shard) into native tensors, checking every shape.

    Tensors that need a partner (q/k halves) wait in ``pending`` until it arrives.
    """

    def __init__(self, config: YuanM32Config, *, dtype: torch.dtype | None):
        self.config = config
        self.dtype = dtype
        with torch.device("meta"):
            reference = YuanM32ForCausalLM(config)
        self.expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
        if config.tie_word_embeddings:
            self.expected.pop("lm_head.weight", None)
        self.produced: set[str] = set()
        self.pending: dict[str, torch.Tensor] = {}
        # digests, not tensors: keeping the [V, H] embedding alive would cost a shard's worth of memory
        self.embedding_digest: str | None = None
        self.lm_head_digest: str | None = None

    def _emit(self, name: str, tensor: torch.Tensor, source: str) -> tuple[str, torch.Tensor]:
        if name not in self.expected:
            raise ConversionError(
                f"{source} maps to {name}, which the model described by config.json does not have "
                "(the config contradicts the tensors: check num_hidden_layers / moe_num_experts)"
            )
        if tuple(tensor.shape) != self.expected[name]:
            raise ConversionError(
                f"{source} has shape {tuple(tensor.shape)} but config.json implies {self.expected[name]} for {name}"
            )
        self.produced.add(name)
        if self.dtype is not None:
            tensor = tensor.to(self.dtype)
        return name, tensor

    def add(self, key: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the native tensors that ``key`` completes."""
        target = IEIT_KEYS.target(key)
        if target is None:
            return
        if target == "lm_head.weight":
            if not self.config.tie_word_embeddings:
                yield self._emit(target, tensor, key)
            else:
                self.lm_head_digest = tensor_digest(tensor)
            return
        if target == "model.embed_tokens.weight" and self.config.tie_word_embeddings:
            self.embedding_digest = tensor_digest(tensor)
        if target.endswith(("qk_first_half", "qk_second_half")):
            prefix = target.rsplit(".", 1)[0]
            self.pending[target] = tensor
            first, second = self.pending.get(f"{prefix}.qk_first_half"), self.pending.get(f"{prefix}.qk_second_half")
            if first is None or second is None:
                return
            del self.pending[f"{prefix}.qk_first_half"], self.pending[f"{prefix}.qk_second_half"]
            if first.shape != second.shape:
                raise ConversionError(f"{key}: q_proj {tuple(first.shape)} and k_proj {tuple(second.shape)} differ in shape")
            q, k = split_fused_qk(first, second, num_heads=self.config.num_attention_heads)
            yield self._emit(f"{prefix}.q_proj.weight", q, key)
            yield self._emit(f"{prefix}.k_proj.weight", k, key)
        elif target.endswith(".gate_up"):
            prefix = target[: -len(".gate_up")]
            if tensor.shape[0] % 2:
                raise ConversionError(f"{key} has an odd number of rows {tensor.shape[0]}; expected [gate; up] = 2F rows")
            gate, up = split_gate_up(tensor)
            yield self._emit(f"{prefix}.gate_proj.weight", gate, key)
            yield self._emit(f"{prefix}.up_proj.weight", up, key)
        elif ".lf_gate.conv" in target and target.endswith(".weight"):
            yield self._emit(target, conv2d_to_conv1d(tensor), key)
        else:
            yield self._emit(target, tensor, key)

    def finish(self) -> None:
        """Raise unless every native tensor was produced and tying is consistent."""
        if self.pending:
            raise ConversionError(f"q_proj/k_proj pairs incomplete for: {sorted(self.pending)}")
        missing = sorted(set(self.expected) - self.produced)
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise ConversionError(f"{len(missing)} weight(s) missing from the checkpoint: {shown}")
        if self.lm_head_digest is not None and self.embedding_digest is not None:
            if self.lm_head_digest != self.embedding_digest:
                raise ConversionError(
                    "lm_head.weight differs from model.embed_tokens.weight although the config ties them "
                    "(tie_word_embeddings true); set tie_word_embeddings to false in config.json if the checkpoint is untied"
                )


def iter_native_tensors(
    checkpoint: IEITCheckpoint, builder: NativeStateBuilder, *, progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream native tensors from an IEIT checkpoint, one source file in memory at a time."""
    # pre-flight on the index alone: unknown keys fail before any tensor is read
    for keys in checkpoint.files.values():
        for key in keys or ():
            IEIT_KEYS.target(key)
    for name in tqdm(list(checkpoint.files), desc="converting shards", unit="file", disable=not progress):
        tensors = checkpoint.load_file(name)
        listed = checkpoint.files[name]
        if listed is not None and set(listed) - set(tensors):
            absent = sorted(set(listed) - set(tensors))[:5]
            raise ConversionError(f"{name} lacks keys its index promises: {absent}")
        for key, tensor in tensors.items():
            yield from builder.add(key, tensor)
        del tensors
    builder.finish()


def verify_folder(folder: str | os.PathLike, *, tokens: int = 8) -> str:
    """Reload a converted folder with the Auto classes and run a short forward; return a one-line report."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.arange(tokens)[None] % model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).logits.float()
    if not torch.isfinite(logits).all():
        raise ConversionError(f"verification failed: {folder} produced non-finite logits")
    return f"verified: reloaded and ran a {tokens}-token forward (logits finite, std {logits.std():.3f})"


@dataclass
class ConversionSummary:
    destination: Path
    num_parameters: int
    dtype: str
    shards: list[str]
    rope_theta: float
    seconds: float
    notes: list[str]

    def __str__(self) -> str:
        lines = [
            f"wrote {self.destination}",
            f"  parameters: {self.num_parameters:,} ({self.dtype}), {len(self.shards)} shard(s)",
            f"  RoPE base: {self.rope_theta:g}",
            f"  time: {self.seconds:.1f} s",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


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

    from .tokenizer import convert_tokenizer

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
    from transformers import GenerationConfig
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
    config.save_pretrained(tmp)  # also copies the configuration file and adds AutoConfig to auto_map
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    if provenance is not None:
        (tmp / "conversion.json").write_text(json.dumps(dict(provenance), indent=2, default=str) + "\n")
    return writer


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
    progress: bool = True,
) -> ConversionSummary:
    """Convert IEIT's HF-layout folder ``src`` into a native ``yuan_m32`` folder ``dst`` (atomically).

    ``rope_theta`` defaults to 40890 (the released SFT model); use 10000 (and ``rope_in_bfloat16=True``)
    to reproduce IEIT's remote code exactly.
    """
    start = time.perf_counter()
    torch_dtype = resolve_dtype(dtype)
    checkpoint = IEITCheckpoint.open(src)
    config, notes = native_config_from_ieit(checkpoint.config, rope_theta=rope_theta, rope_in_bfloat16=rope_in_bfloat16)
    builder = NativeStateBuilder(config, dtype=torch_dtype)
    provenance = {
        "source_format": "ieit_hf",
        "source": str(Path(src).absolute()),
        "rope_theta": config.rope_parameters["rope_theta"],
        "rope_in_bfloat16": rope_in_bfloat16,
        "dtype": str(torch_dtype or "as stored"),
        "converter": "yuan-hf convert ieit-hf",
    }
    return write_converted(
        dst, config, iter_native_tensors(checkpoint, builder, progress=progress), overwrite=overwrite,
        started=start, notes=notes, max_shard_size=max_shard_size, provenance=provenance, tokenizer=tokenizer,
    )  # fmt: skip


def write_converted(
    dst: str | os.PathLike,
    config: YuanM32Config,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    overwrite: bool,
    started: float,
    notes: list[str],
    **folder_options,
) -> ConversionSummary:
    """The tail every converter shares: write the native folder atomically and summarise it."""
    with atomic_output_dir(dst, overwrite=overwrite) as tmp:
        writer = write_native_folder(tmp, config, tensors, **folder_options)
    return ConversionSummary(
        destination=Path(dst),
        num_parameters=writer.num_parameters,
        dtype=str(config.dtype).replace("torch.", ""),
        shards=sorted(p.name for p in Path(dst).glob("*.safetensors")),
        rope_theta=config.rope_parameters["rope_theta"],
        seconds=time.perf_counter() - started,
        notes=notes,
    )


def _cache_root() -> Path:
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
    target = _cache_root() / f"{source.absolute().name}-{stamp.hexdigest()[:12]}"
    if not (target / "config.json").is_file():
        logger = logging.get_logger("yuan_hf")
        logger.warning(
            f"{source} is IEIT's HF layout: converting it once to {target} (RoPE base {SFT_ROPE_THETA:g}; run "
            "`yuan-hf convert ieit-hf` yourself to choose the base, dtype and location)"
        )
        convert_ieit_hf(source, target, dtype=None, overwrite=True, progress=True)
    return str(target)
