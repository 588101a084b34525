"""Small configurations for tests, demos and benchmarks (the package makes its own tiny weights)."""

from __future__ import annotations

from .modeling import YuanM32Config


def tiny_config(**overrides) -> YuanM32Config:
    """A few-hundred-thousand-parameter Yuan 2.0-M32 with the release's proportions (head_dim = 2H/heads,
    rotary half of each head, attention router, top-2). Every Linear has in_features % 64 == 0 and
    out_features % 32 == 0 (bitsandbytes' CPU kernels need that), except the router, which is never quantized.
    """
    values = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=32,
        moe_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        bos_token_id=3,
        eos_token_id=3,
        pad_token_id=5,
        sep_token_id=4,
    )
    values.update(overrides)
    return YuanM32Config(**values)
