"""Context extension: RoPE settings for training or serving beyond the length a checkpoint was trained at.

Yuan 2.0-M32 was pretrained at 4096 tokens with RoPE base 10000 and fine-tuned at 16384 tokens after raising
the base with the NTK-aware rule `b' = b * s^(d/(d-2))` (s = 4, d = 128 rotary dims): 40890 (paper section 4.2).
`extend_context` writes the matching transformers `rope_parameters` for that rule and for the scaling rope types
transformers ships (linear, dynamic, yarn), always keeping Yuan's `partial_rotary_factor`.
"""

from __future__ import annotations

from typing import Literal

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import logging

logger = logging.get_logger(__name__)

ContextMethod = Literal["ntk", "linear", "dynamic", "yarn"]
CONTEXT_METHODS: tuple[str, ...] = ("ntk", "linear", "dynamic", "yarn")


def ntk_rope_theta(base: float, scale: float, rotary_dim: int) -> float:
    """NTK-aware RoPE base for stretching the context by `scale`: `base * scale ** (d / (d - 2))`.

    Scaling the base this way keeps the highest frequency (dims 0/1) unchanged and slows the lowest one
    (dims d-2/d-1) by exactly `scale`, so the longest wavelength covers `scale` times more positions.

    Args:
        base: RoPE base the model was trained with (`rope_theta`), e.g. 10000.
        scale: Target length / trained length, e.g. 16384 / 4096 = 4.
        rotary_dim: Rotated dimensions per head `d` (Yuan: 128 of 256, `config.rotary_dim`).

    Returns:
        The new base. `ntk_rope_theta(10000, 4, 128)` = 40889.94, the 40890 IEIT used for its 16K fine-tuning.
    """
    if base <= 1:
        raise ValueError(f"ntk_rope_theta: base must be > 1, got {base!r}")
    if scale < 1:
        raise ValueError(f"ntk_rope_theta: scale must be >= 1 (this rule extends, it does not shrink), got {scale!r}")
    if rotary_dim <= 2 or rotary_dim % 2:
        raise ValueError(f"ntk_rope_theta: rotary_dim must be an even number > 2, got {rotary_dim!r}")
    return float(base * scale ** (rotary_dim / (rotary_dim - 2)))


def _rotary_dim(config: PretrainedConfig) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))


def supported_length(config: PretrainedConfig) -> int | None:
    """Longest sequence the config's RoPE settings were set up for; `None` for dynamic NTK (any length)."""
    if config.rope_parameters.get("rope_type", "default") == "dynamic":
        return None
    return int(config.max_position_embeddings)


def extend_context(
    config_or_model: PretrainedConfig | PreTrainedModel,
    target_length: int,
    *,
    method: ContextMethod = "ntk",
    original_length: int | None = None,
) -> PretrainedConfig | PreTrainedModel:
    """Set RoPE up for `target_length`-token sequences, in place; returns its argument.

    Methods (the scale is `s = target_length / original_length`):

    - `"ntk"` (IEIT's choice for 4K -> 16K): plain RoPE with base `ntk_rope_theta(base, s, rotary_dim)`.
      Needs fine-tuning at the new length; from base 10000 at 4096 to 16384 it gives 40890.
    - `"linear"`: position interpolation, `rope_type="linear"`, `factor=s` (all frequencies divided by s).
      Needs fine-tuning; blurs nearby positions more than NTK does.
    - `"dynamic"`: dynamic NTK, `rope_type="dynamic"`, `factor=1`: for inputs longer than `original_length`
      the base is raised at run time by the NTK rule for the input's own length, so at `target_length` it equals
      `"ntk"`; shorter inputs keep the trained base. No fine-tuning needed (inference-time extension).
      `max_position_embeddings` stays at `original_length`: transformers reads it as the length where
      scaling starts.
    - `"yarn"`: `rope_type="yarn"`, `factor=s`, `original_max_position_embeddings=original_length`: NTK-by-parts
      interpolation plus attention temperature; works zero-shot for moderate s and best with a short fine-tune.

    Args:
        config_or_model: A Yuan config, or a model (a `PeftModel` too): then its config is changed and every
            rotary embedding (`*.rotary_emb`) is rebuilt from it, on the device of the old one.
        target_length: Sequence length to support (tokens).
        method: One of `"ntk"`, `"linear"`, `"dynamic"`, `"yarn"`.
        original_length: Length the current RoPE settings were trained for; defaults to
            `config.max_position_embeddings`.

    Returns:
        `config_or_model`, changed in place. When `target_length <= original_length` nothing changes.
    """
    if method not in CONTEXT_METHODS:
        raise ValueError(f"extend_context: method must be one of {CONTEXT_METHODS}, got {method!r}")
    is_config = isinstance(config_or_model, PretrainedConfig)
    config = config_or_model if is_config else config_or_model.config
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"extend_context: the config already uses rope_type {rope.get('rope_type')!r} ({rope}); scaled RoPE "
            "settings cannot be stacked. Start from the checkpoint's own config (plain RoPE, rope_type 'default')."
        )
    original = int(config.max_position_embeddings if original_length is None else original_length)
    if not isinstance(target_length, int) or target_length <= 0 or original <= 0:
        raise ValueError(
            f"extend_context: target_length and original_length must be positive integers, got {target_length!r} "
            f"and {original!r}"
        )
    if target_length <= original:
        logger.info(
            f"extend_context: target length {target_length} <= trained length {original}; RoPE left unchanged ({rope})."
        )
        return config_or_model
    scale = target_length / original
    base = float(rope["rope_theta"])
    new_rope = {key: rope[key] for key in ("rope_theta", "partial_rotary_factor") if key in rope}
    max_positions = target_length
    if method == "ntk":
        new_rope.update(rope_type="default", rope_theta=ntk_rope_theta(base, scale, _rotary_dim(config)))
    elif method == "linear":
        new_rope.update(rope_type="linear", factor=scale)
    elif method == "dynamic":
        new_rope.update(rope_type="dynamic", factor=1.0)
        max_positions = original
    else:  # yarn
        new_rope.update(rope_type="yarn", factor=scale, original_max_position_embeddings=original)
    if getattr(config, "rope_in_bfloat16", False):
        raise ValueError(
            "extend_context: config.rope_in_bfloat16 reproduces IEIT's plain bf16 RoPE tables for parity checks "
            "only; set it to False before extending the context."
        )
    config.rope_parameters = new_rope
    config.max_position_embeddings = max_positions
    if hasattr(config, "validate_yuan"):
        config.validate_yuan()
    logger.info(
        f"extend_context: {original} -> {target_length} tokens with {method!r}: rope_parameters {new_rope}, "
        f"max_position_embeddings {max_positions}"
    )
    if not is_config:
        _rebuild_rotary_embeddings(config_or_model, config)
    return config_or_model


def _rebuild_rotary_embeddings(model: nn.Module, config: PretrainedConfig) -> None:
    """Replace every `rotary_emb` submodule by a fresh one built from `config` (its inv_freq depends on RoPE)."""
    rebuilt = 0
    for module in model.modules():
        rotary = getattr(module, "rotary_emb", None)
        if isinstance(rotary, nn.Module):
            device = rotary.inv_freq.device if hasattr(rotary, "inv_freq") else None
            module.rotary_emb = type(rotary)(config, device=device)
            rebuilt += 1
    if not rebuilt:
        raise ValueError(
            f"extend_context: {type(model).__name__} has no `rotary_emb` submodule to rebuild; pass the config "
            "before building the model instead"
        )


def check_context_length(config: PretrainedConfig, seq_len: int, *, where: str = "training") -> bool:
    """Warn when `seq_len`-token sequences go beyond what the RoPE settings were set up for.

    Returns True when the length is supported. The warning names the fix (`extend_context` / the recipe's
    `context.target_length`).
    """
    supported = supported_length(config)
    if supported is None or seq_len <= supported:
        return True
    rope = config.rope_parameters
    suggestion = ""
    if rope.get("rope_type", "default") == "default":
        theta = ntk_rope_theta(float(rope["rope_theta"]), seq_len / supported, _rotary_dim(config))
        suggestion = f" (NTK from base {rope['rope_theta']:g}: {theta:.0f})"
    logger.warning(
        f"{where}: sequences of {seq_len} tokens exceed max_position_embeddings {supported} of the RoPE settings "
        f"{rope}. Positions beyond {supported} were never trained. Fix: extend_context(model, {seq_len}, "
        f"method='ntk'){suggestion} before training, or set `context.target_length: {seq_len}` in the recipe."
    )
    return False


__all__ = ["CONTEXT_METHODS", "check_context_length", "extend_context", "ntk_rope_theta", "supported_length"]
