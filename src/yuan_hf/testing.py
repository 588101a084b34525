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


def tiny_model(*, seed: int = 0, **overrides):
    """A tiny fp32 model in eval mode whose greedy continuation does not collapse to one repeated token.

    With transformers' default init (std 0.02) a tied tiny model mostly echoes its last input token, so a
    broken cache (every step starting from an empty state) can produce the same text as a working one. Weights
    of std 0.2 make the attention, LF gate and experts dominate the residual path: greedy outputs vary, and any
    lost state changes them.
    """
    import torch

    from .modeling import YuanM32ForCausalLM

    torch.manual_seed(seed)
    return YuanM32ForCausalLM(tiny_config(**{"initializer_range": 0.2, **overrides})).float().eval()


def greedy_reference(model, input_ids, max_new_tokens: int):
    """Greedy decoding by full uncached forwards over the whole sequence at every step: the ground truth that
    cached generation must reproduce. input_ids: [b, s] (no padding) -> (new tokens [b, n], step logits [n, b, V])."""
    import torch

    sequence, steps = input_ids, []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(sequence, use_cache=False).logits[:, -1].float()
            steps.append(logits)
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    return sequence[:, input_ids.shape[1] :], torch.stack(steps)
