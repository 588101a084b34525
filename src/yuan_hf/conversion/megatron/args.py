"""Megatron training arguments -> the model's sizes (:class:`MegatronDims`) and ``YuanM32Config`` kwargs.

Megatron records no config file: the saved ``args`` namespace is the only description of the model. This
module validates it (:data:`UNSUPPORTED_ARGS`, a table of fields the native model cannot express and why)
and derives every size the merge rules and the native config need. Token ids are not in the args.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..common import SFT_ROPE_THETA, ConversionError

__all__ = ["MegatronDims", "RMS_NORM_EPS", "args_dict", "check_supported", "native_config_from_args"]

RMS_NORM_EPS = 1e-6  # IEIT's Megatron hard-codes RMSNorm(eps=1e-6); args.layernorm_epsilon only feeds LayerNorm


def args_dict(args: argparse.Namespace | Mapping) -> dict[str, Any]:
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)


def need_arg(args: Mapping[str, Any], name: str) -> Any:
    value = args.get(name)
    if value is None:
        raise ConversionError(f"the Megatron args lack {name!r}, which the conversion needs")
    return value


def positive_int(args: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = args.get(name)
    if value is None:
        value = need_arg(args, name) if default is None else default
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConversionError(f"Megatron args.{name} must be a positive integer, found {value!r}")
    return value


@dataclass(frozen=True)
class MegatronDims:
    """Sizes of a Yuan 2.0-M32 Megatron checkpoint, in the fixtures README's notation.

    ``H`` hidden, ``P`` attention projection (heads x head_dim; 2H in the release), ``E`` experts, ``F`` expert
    FFN width, ``V`` padded vocabulary; ``stage_layers[s]`` layers on pipeline stage ``s``.
    """

    H: int
    P: int
    heads: int
    head_dim: int
    E: int
    F: int
    V: int
    layers: int
    tp: int
    pp: int
    stage_layers: tuple[int, ...]
    tied: bool
    attention_router: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace | Mapping) -> MegatronDims:
        a = args_dict(args)
        hidden, heads, layers = (positive_int(a, n) for n in ("hidden_size", "num_attention_heads", "num_layers"))
        head_dim = positive_int(a, "kv_channels", hidden // heads)
        experts, ffn, vocab = (positive_int(a, n) for n in ("num_experts", "ffn_hidden_size", "padded_vocab_size"))
        tp = positive_int(a, "tensor_model_parallel_size", 1)
        pp = positive_int(a, "pipeline_model_parallel_size", 1)
        for what, size in (("num_attention_heads", heads), ("padded_vocab_size", vocab), ("ffn_hidden_size", ffn),
                           ("3 x num_experts (the fused router)", 3 * experts)):  # fmt: skip
            if size % tp:
                raise ConversionError(f"{what} = {size} is not divisible by tensor_model_parallel_size {tp}")
        if hidden % 2:
            raise ConversionError(f"hidden_size {hidden} is odd; the LF gate halves it")
        return cls(
            H=hidden, P=heads * head_dim, heads=heads, head_dim=head_dim, E=experts, F=ffn, V=vocab,
            layers=layers, tp=tp, pp=pp, stage_layers=_stage_layers(a, layers, pp),
            tied=not a.get("untie_embeddings_and_output_weights", False),
            attention_router=bool(a.get("use_attention_router", True)),
        )  # fmt: skip

    def stage_offset(self, stage: int) -> int:
        """Global number of the first layer of ``stage`` (Megatron: ``sum(pipeline_blocks[:stage])``)."""
        return sum(self.stage_layers[:stage])


def _stage_layers(args: Mapping[str, Any], layers: int, pp: int) -> tuple[int, ...]:
    """Layers per stage: uniform ``L/PP``, or ``args.pipeline_blocks`` for IEIT's non-uniform ``block`` method.

    IEIT's ``ParallelTransformer`` builds ``L/PP`` layers per stage under the ``uniform`` method but always
    numbers them from ``sum(pipeline_blocks[:stage])``, so both must agree.
    """
    method = args.get("pipeline_model_parallel_method") or "uniform"
    blocks = args.get("pipeline_blocks")
    if method == "uniform":
        if layers % pp:
            raise ConversionError(f"num_layers {layers} is not divisible by pipeline_model_parallel_size {pp}")
        uniform = (layers // pp,) * pp
        if blocks is not None and tuple(blocks) != uniform:
            raise ConversionError(
                f"args.pipeline_blocks {list(blocks)} disagree with the uniform split {list(uniform)} that "
                "pipeline_model_parallel_method='uniform' builds; the args are inconsistent"
            )
        return uniform
    if blocks is None or len(blocks) != pp or sum(blocks) != layers or min(blocks) < 0:
        raise ConversionError(
            f"pipeline_model_parallel_method={method!r} needs args.pipeline_blocks with {pp} layer counts summing "
            f"to num_layers {layers}; found {blocks!r}"
        )
    return tuple(int(b) for b in blocks)


def _falsy(value: Any) -> bool:
    return not value


# args field -> (accepted?, why the native model or this reader cannot take anything else)
UNSUPPORTED_ARGS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("num_experts", lambda v: v is not None, "a dense model (no experts) is not Yuan 2.0-M32"),
    ("use_lf_gate", lambda v: v is True, "layers without the LF gate use a fused query_key_value the native model lacks"),
    ("lf_conv2d_group", lambda v: v in (None, 1), "grouped LF-gate convolutions are not implemented natively"),
    ("lf_conv2d_num_pad", lambda v: v in (None, 0, 1), "IEIT's LF gate pads 1 step (training) or 0 (inference); other paddings change the filter"),
    ("swiglu", lambda v: v is True, "experts must be SwiGLU (gate | up)"),
    ("group_query_attention", _falsy, "grouped-query attention does not fit Yuan's fused per-head [q; k] weight"),
    ("moe_grouped_gemm", lambda v: v is True, "only GroupedMLP's weight1/weight2 layout is read; SequentialMLP (local_experts.*) checkpoints are not supported"),
    ("position_embedding_type", lambda v: v in (None, "rope"), "the native model uses rotary embeddings only"),
    ("add_bias_linear", _falsy, "linear-layer biases are not part of the native model"),
    ("norm_dtype", lambda v: v in (None, "RMSNorm"), "the native model uses RMSNorm"),
    ("apply_residual_connection_post_layernorm", _falsy, "the native model uses pre-norm residuals"),
    ("num_shared_experts", _falsy, "shared experts are not part of Yuan 2.0-M32"),
    ("isolate_shared_experts", _falsy, "shared experts are not part of Yuan 2.0-M32"),
    ("expert_model_parallel_size", lambda v: v in (None, 1), "expert-parallel checkpoints (mp_rank_TT_PPP_EEE) are not supported; merge them with Megatron first"),
    ("virtual_pipeline_model_parallel_size", lambda v: v in (None, 1), "interleaved (virtual) pipeline checkpoints (model0, model1, ...) are not supported"),
    ("standalone_embedding_stage", _falsy, "a standalone embedding stage is not supported"),
    ("transformer_impl", lambda v: v in (None, "local"), "Transformer Engine layers use other parameter names"),
    ("retro_add_retriever", _falsy, "RETRO models are not Yuan 2.0-M32"),
    ("moe_router_load_balancing_type", lambda v: v in (None, "none", "aux_loss", "sinkhorn"), "unknown routing"),
)  # fmt: skip


def check_supported(a: Mapping[str, Any]) -> list[str]:
    """Raise for args the native model cannot express; return notes on what it expresses differently."""
    for name, accepted, why in UNSUPPORTED_ARGS:
        if not accepted(a.get(name)):
            raise ConversionError(f"Megatron args.{name} = {a.get(name)!r} is not supported: {why}")
    notes = []
    if a.get("use_attention_router", True):
        seq, router_heads = a.get("seq_length"), a.get("num_attention_router_heads")
        if seq is not None and router_heads is not None and seq != router_heads:
            raise ConversionError(
                f"args.num_attention_router_heads = {router_heads} differs from seq_length {seq}: the attention "
                "router then mixes tokens; the native router (one token per head, as Yuan 2.0-M32) cannot express it"
            )
        if not a.get("use_fp32_router", True):
            notes.append("the checkpoint's attention router ran in bf16 (use_fp32_router=False); the native one runs in fp32")
    if a.get("moe_router_load_balancing_type") == "sinkhorn" and a.get("moe_router_topk", 2) == 1:
        raise ConversionError("sinkhorn routing with top-1 uses a sigmoid gate, which the native model lacks")
    return notes


def native_config_from_args(
    args: argparse.Namespace | Mapping, *, overrides: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """``YuanM32Config`` kwargs from a checkpoint's saved training arguments, plus notes for the user.

    Token ids (bos/eos/pad/sep) are not in Megatron args: the caller adds them from the tokenizer.
    ``overrides`` are applied last (e.g. ``{"rope_parameters": {...}}`` for ``--rope-theta``). The result is
    validated by constructing a ``YuanM32Config``; errors raise :class:`ConversionError`.
    """
    from ...modeling.configuration_yuan_m32 import YuanM32Config

    a = args_dict(args)
    notes = check_supported(a)
    dims = MegatronDims.from_args(a)
    rotary_percent = a.get("rotary_percent") or 1.0
    if "rotary_base" in a and a["rotary_base"] is not None:
        rope_theta = float(a["rotary_base"])
        if rope_theta == 10000.0:
            notes.append(
                "rotary base 10000 from args (IEIT's pretraining base); the released 16K fine-tuned model used "
                f"{SFT_ROPE_THETA:g}: pass --rope-theta {SFT_ROPE_THETA:g} if these weights are the 16K fine-tuned model"
            )
    else:
        rope_theta = SFT_ROPE_THETA
        notes.append(
            f"rotary base not in args: using {SFT_ROPE_THETA:g} (IEIT's 16K SFT); pass --rope-theta 10000 for a "
            "pretraining checkpoint"
        )
    seq_length = a.get("seq_length") or a.get("max_position_embeddings")
    if seq_length is None:
        raise ConversionError("the Megatron args have neither seq_length nor max_position_embeddings")
    if a.get("max_position_embeddings") not in (None, seq_length):
        notes.append(
            f"max_position_embeddings: using seq_length {seq_length} (the trained context); args."
            f"max_position_embeddings {a['max_position_embeddings']} only sizes learned position embeddings"
        )
    if a.get("layernorm_epsilon") not in (None, RMS_NORM_EPS):
        notes.append(
            f"rms_norm_eps {RMS_NORM_EPS:g}: IEIT's Megatron hard-codes it for RMSNorm (args.layernorm_epsilon "
            f"{a['layernorm_epsilon']:g} only applies to LayerNorm)"
        )
    routing = a.get("moe_router_load_balancing_type") or "none"
    if routing == "sinkhorn":
        notes.append("sinkhorn routing: at inference top-k of softmax without renormalising (norm_topk_prob=False)")
    kwargs: dict[str, Any] = {
        "vocab_size": dims.V,
        "hidden_size": dims.H,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.heads,
        "head_dim": dims.head_dim,
        "moe_intermediate_size": dims.F,
        "num_experts": dims.E,
        "num_experts_per_tok": positive_int(a, "moe_router_topk", 2),
        "norm_topk_prob": routing != "sinkhorn",
        "router_type": "attention" if dims.attention_router else "linear",
        "max_position_embeddings": int(seq_length),
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": float(rotary_percent)},
        "rms_norm_eps": RMS_NORM_EPS,
        "hidden_act": "silu",
        "tie_word_embeddings": dims.tied,
        "router_aux_loss_coef": float(a.get("moe_aux_loss_coeff") or 0.0),
    }  # fmt: skip
    if overrides:
        kwargs.update(overrides)
        notes.append("overridden: " + ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
    try:  # token ids come from the tokenizer later; None keeps the check from judging the defaults
        YuanM32Config(**({f"{t}_token_id": None for t in ("bos", "eos", "pad", "sep")} | kwargs))
    except ValueError as exc:
        raise ConversionError(f"the Megatron args give an invalid native config: {exc}") from exc
    return kwargs, notes


