"""Native weights -> IEIT's HF layout: the inverse of the IEIT-HF conversion, for test, demo and benchmark checkpoints.

Readers never import this package (``tests/test_conversion_layout.py`` checks it): writing IEIT checkpoints
is a tool for making inputs, not part of the conversion path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...modeling import YuanM32Config, YuanM32ForCausalLM
from ...testing import tiny_config
from ..common import ConversionError
from ..native.builder import IEIT_KEYS

__all__ = ["fuse_qk", "ieit_config_from_native", "ieit_state_dict_from_native", "make_ieit_checkpoint"]


def fuse_qk(q: torch.Tensor, k: torch.Tensor, *, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`split_fused_qk`: per-head Q, K [P, H] -> IEIT ``q_proj``, ``k_proj`` [P, H]."""
    head_dim = q.shape[0] // num_heads
    per_head = torch.stack([q.view(num_heads, head_dim, -1), k.view(num_heads, head_dim, -1)], dim=1)
    fused = per_head.reshape(2 * q.shape[0], q.shape[1])  # [q_0; k_0; q_1; k_1; ...]
    return fused.chunk(2, dim=0)


def ieit_config_from_native(config: YuanM32Config) -> dict:
    """The IEIT ``config.json`` (``model_type="yuan"``, remote-code keys) describing a native config's model.

    Every key IEIT's released ``config.json`` has that its remote code reads is written (``causal_mask``,
    ``model_max_length``, ...), so IEIT's own code loads the folder too (``benchmarks/ieit_comparison.py`` runs it).
    """
    eod = config.eos_token_id
    return {
        "architectures": ["YuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_yuan.YuanConfig", "AutoModelForCausalLM": "yuan_hf_model.YuanForCausalLM"},
        "model_type": "yuan",
        "attention_projection_size": config.num_attention_heads * config.head_dim, "causal_mask": True, "dropout": 0,
        "bos_token_id": config.bos_token_id, "eos_token_id": eod, "eod_token": eod, "eod_token_id": eod,
        "pad_token_id": config.pad_token_id, "mask_token_id": eod, "sep_token": config.sep_token_id, "sep_token_id": eod,
        "hidden_act": config.hidden_act, "hidden_size": config.hidden_size, "initializer_range": config.initializer_range,
        "intermediate_size": config.moe_intermediate_size, "max_position_embeddings": config.max_position_embeddings,
        "model_max_length": 2 * config.max_position_embeddings, "output_router_logits": True, "tokenizer_class": "YuanTokenizer",
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




def make_ieit_checkpoint(dst: str | Path, *, config: YuanM32Config | None = None, seed: int = 0) -> Path:
    """Write a randomly initialised model in IEIT's HF layout (config ``model_type="yuan"``, bf16 safetensors)."""
    config = config or tiny_config()
    torch.manual_seed(seed)
    model = YuanM32ForCausalLM(config)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = ieit_state_dict_from_native(model.state_dict(), config)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(ieit_config_from_native(config), indent=2) + "\n")
    return dst
