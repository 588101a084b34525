"""The models the inference benchmark compares, built at matched sizes, and their parameter and FLOP counts."""

from __future__ import annotations

import argparse
import re

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODEL_LABELS = {"yuan": "Yuan2.0-M32 (yuan_hf)", "qwen2moe": "Qwen2-MoE (transformers)", "mixtral": "Mixtral (transformers)"}


# --------------------------------------------------------------------------------------------------------------
# models


def build_config(name: str, args: argparse.Namespace):
    common = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        head_dim=args.head_dim,
        max_position_embeddings=max(4096, max(args.contexts) + args.new_tokens + 16),
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if name == "yuan":
        from yuan_hf.modeling import YuanM32Config

        return YuanM32Config(
            **common,
            moe_intermediate_size=args.ffn,
            num_experts=args.experts,
            num_experts_per_tok=args.top_k,
            sep_token_id=3,
            router_type=args.yuan_router,
        )
    if name == "qwen2moe":
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(
            **common,
            moe_intermediate_size=args.ffn,
            intermediate_size=args.ffn,  # unused: every layer is sparse
            num_experts=args.experts,
            num_experts_per_tok=args.top_k,
            shared_expert_intermediate_size=args.qwen_shared_ffn,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,  # as Yuan
            qkv_bias=False,  # as Yuan
        )
    if name == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(
            **common, intermediate_size=args.ffn, num_local_experts=args.experts, num_experts_per_tok=args.top_k
        )
    raise ValueError(f"unknown model {name!r}")


def model_class(name: str):
    if name == "yuan":
        from yuan_hf.modeling import YuanM32ForCausalLM

        return YuanM32ForCausalLM
    if name == "qwen2moe":
        from transformers import Qwen2MoeForCausalLM

        return Qwen2MoeForCausalLM
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM


def build_model(name: str, args: argparse.Namespace, owner: torch.nn.Module | None = None) -> torch.nn.Module:
    """Random-weight fp32 model. With `owner`, the model is built on the meta device and the tensors both have
    (embeddings, Q/K/V/O projections, expert FFNs) become views of the owner's: two fp32 copies of this config
    (2 x 6.9 GB) do not fit next to other work in 24 GB, and the shared slices change nothing in the maths."""
    config = build_config(name, args)
    kwargs = {"attn_implementation": args.attn_implementation}
    if name != "yuan" and args.experts_implementation:
        kwargs["experts_implementation"] = args.experts_implementation
    torch.manual_seed(args.seed)
    if owner is None:
        model = model_class(name)._from_config(config, dtype=torch.float32, **kwargs)
    else:
        with torch.device("meta"):
            model = model_class(name)._from_config(config, dtype=torch.float32, **kwargs)
        attach_shared(model, owner, init_rest=True)
        rotary = model.model.rotary_emb  # non-persistent buffers: rebuild on the CPU
        model.model.rotary_emb = type(rotary)(model.config)
        assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()]), "unmaterialised tensor"
    wrap_routers(model, args)
    return model.eval()


class RoutingStats:
    """Experts hit and largest expert load per router call with more than one token (prefill)."""

    def __init__(self):
        self.hit: list[int] = []
        self.max_load: list[int] = []
        self.tokens: list[int] = []


def wrap_routers(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """Every layer's router (`mlp.gate`, returning (logits, top-k weights, top-k ids) in all three models) keeps
    its computation; with `--routing balanced` (default) its expert ids are replaced by a fixed pseudo-random
    schedule that gives every expert the same number of token slots (identical for all models), so the models
    run the same expert work. Random routers are not balanced, and differently so: at seed 0, prefill 4x128,
    Qwen2-MoE's linear gate sends tokens to only 22-31 of 32 experts per layer, Yuan's attention router to all
    32 -- that alone made Yuan's experts ~25% slower in prefill. `--routing model` keeps the models' choice."""
    stats = RoutingStats()
    model._bench_routing = stats
    E = args.experts
    gen = torch.Generator().manual_seed(args.seed + 7)
    for layer in model.model.layers:
        gate = layer.mlp.gate
        perm = torch.randperm(E, generator=gen)
        step = [0]

        def forward(hidden_states, _orig=gate.forward, _perm=perm, _step=step):
            logits, weights, ids = _orig(hidden_states)
            if args.routing == "balanced":
                T, k = ids.shape
                slots = torch.arange(T * k) + _step[0] * k
                _step[0] += T
                ids = _perm[slots % E].view(T, k).to(ids.device, ids.dtype)  # k consecutive slots: k distinct experts
            if ids.shape[0] > 1:
                counts = torch.bincount(ids.reshape(-1), minlength=E)
                stats.hit.append(int((counts > 0).sum()))
                stats.max_load.append(int(counts.max()))
                stats.tokens.append(ids.shape[0])
            return logits, weights, ids

        gate.forward = forward


def _shared_source(name: str, owner_params: dict, ffn: int) -> torch.Tensor | None:
    if name == "model.embed_tokens.weight" or name.endswith(
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
         "mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    ):  # fmt: skip
        return owner_params.get(name)
    m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", name)  # Yuan's nn.Linear experts
    if m:
        layer, expert, kind = int(m[1]), int(m[2]), m[3]
        if kind == "down":
            src = owner_params.get(f"model.layers.{layer}.mlp.experts.down_proj")
            return None if src is None else src[expert]
        src = owner_params.get(f"model.layers.{layer}.mlp.experts.gate_up_proj")  # [E, 2F, H], gate rows first
        return None if src is None else src[expert, :ffn] if kind == "gate" else src[expert, ffn:]
    return None


def attach_shared(model: torch.nn.Module, owner: torch.nn.Module, init_rest: bool = False) -> None:
    """Point `model`'s shareable parameters at views of `owner`'s; with `init_rest`, materialise the others
    (still on meta) with the models' own init: normal(0, initializer_range), norms 1, biases 0."""
    owner_params = dict(owner.named_parameters())
    std = model.config.initializer_range
    shared = []
    for name, p in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        ffn = getattr(model.config, "moe_intermediate_size", None) or model.config.intermediate_size
        src = _shared_source(name, owner_params, ffn)
        # requires_grad=True as in the owner and in from_pretrained: it changes kernels even under inference_mode
        # (bf16 F.linear on a strided 3-D input, e.g. logits_to_keep=1 with batch > 1, takes a ~80x slower
        # bmm path when the weight does not require grad)
        if src is not None and tuple(src.shape) == tuple(p.shape):
            module._parameters[attr] = torch.nn.Parameter(src.detach(), requires_grad=True)
            shared.append(name)
        elif init_rest and p.is_meta:
            t = torch.empty(p.shape, dtype=torch.float32)
            if attr == "bias":
                t.zero_()
            elif "norm" in name.rsplit(".", 2)[-2]:  # RMSNorm weights
                t.fill_(1.0)
            else:
                t.normal_(0.0, std)
            module._parameters[attr] = torch.nn.Parameter(t, requires_grad=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model._bench_shared = shared


def detach_shared(model: torch.nn.Module) -> None:
    """Drop the references to the owner's tensors (meta placeholders) so that casting the owner frees them."""
    for name in getattr(model, "_bench_shared", []):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[attr] = torch.nn.Parameter(torch.empty(module._parameters[attr].shape, device="meta"))


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """In-place cast that keeps `_keep_in_fp32_modules` (Yuan's attention router) in fp32, as
    `from_pretrained(dtype=...)` does."""
    model.to(dtype)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    if dtype != torch.float32 and keep:
        for module_name, module in model.named_modules():
            if any(k in module_name for k in keep):
                module.float()


def cast_models(models: dict, owner_name: str | None, dtype: torch.dtype) -> None:
    if owner_name is None:
        for m in models.values():
            cast_model(m, dtype)
        return
    for name, m in models.items():
        if name != owner_name:
            detach_shared(m)
    cast_model(models[owner_name], dtype)
    for name, m in models.items():
        if name != owner_name:
            attach_shared(m, models[owner_name])
            cast_model(m, dtype)


# --------------------------------------------------------------------------------------------------------------
# counting: parameters and FLOPs


def param_counts(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    total = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    expert = 0
    for module_name, p in model.named_parameters():
        if ".experts." in module_name or module_name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            expert += p.numel()
    active = total - expert + expert * args.top_k // args.experts
    lm_head = args.vocab * args.hidden  # tied: the embedding lookup costs nothing, the head is a matmul
    return {"total": total, "expert": expert, "active": active, "lm_head": lm_head}


def analytic_flops_per_token(
    name: str, args: argparse.Namespace, attended: float, with_head: bool = True, decode: bool = True
) -> float:
    """Multiply-adds x 2 per token, for a token attending to `attended` positions. In decode, Yuan's LF gate
    evaluates conv1 on two steps (the cache keeps LF inputs, so o1 of the previous step is recomputed)."""
    H, F, E, k = args.hidden, args.ffn, args.experts, args.top_k
    q_width = args.heads * args.head_dim
    kv_width = (args.kv_heads or args.heads) * args.head_dim
    per_layer = 2 * (H * q_width + 2 * H * kv_width + q_width * H)  # q, k, v, o projections
    per_layer += 2 * 2 * q_width * attended  # QK^T and AV
    per_layer += 2 * k * 3 * H * F  # top-k SwiGLU experts
    if name == "yuan":
        per_layer += 2 * (H * (H // 2) * 2 * (2 if decode else 1) + (H // 2) * H * 2)  # LF: 2-tap convs H -> H/2 -> H
        if args.yuan_router == "attention":
            per_layer += 2 * 3 * H * E + 3 * E * E  # q/k/v router projections, E x E outer product + matvec
        else:
            per_layer += 2 * H * E
    elif name == "qwen2moe":
        per_layer += 2 * H * E + 2 * H  # router + shared-expert gate (H -> 1)
        per_layer += 2 * 3 * H * args.qwen_shared_ffn
    else:
        per_layer += 2 * H * E
    return args.layers * per_layer + (2 * H * args.vocab if with_head else 0)


def counted_decode_flops(model: torch.nn.Module, ctx: int, args: argparse.Namespace) -> float:
    """FLOPs of one decode step at `ctx` tokens of context, as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    from yuan_hf.modeling import YuanM32Config

    ids = torch.randint(4, args.vocab, (1, ctx))
    # FlopCounterMode does not see grouped_mm: count the transformers models with their eager experts loop
    saved = model.get_experts_implementation() if hasattr(model, "set_experts_implementation") else None
    if saved is not None and model.config._experts_implementation != "eager" and not isinstance(model.config, YuanM32Config):
        model.set_experts_implementation("eager")
    else:
        saved = None
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        with FlopCounterMode(display=False) as counter:
            model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    if saved is not None:
        model.set_experts_implementation(saved)
    return float(counter.get_total_flops())
