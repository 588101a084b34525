"""PyTorch Yuan 2.0-M32: a native transformers 5 port of IEIT's mixture-of-experts LLM.

Self-contained (imports only torch, transformers and its sibling config by relative import) because this
file ships to the Hub as remote code. Read top to bottom in data-flow order: norm, rotary, localized
filtering, attention, router, experts, MoE block, decoder layer, pretrained base, model, causal LM.

Unlike Llama-style models, each layer first runs a *localized filtering* (LF) gate: two causal 2-tap
convolutions over time whose output feeds Q and K (V comes from the unfiltered input). Unlike Mixtral,
the router is an *attention router*: an E x E attention over the expert axis, in fp32.
"""

import json
import os
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .cache_yuan_m32 import YuanM32QuantizedCache
from .configuration_yuan_m32 import YuanM32Config
from .distributed_yuan_m32 import distribute_yuan_model
from .transformers_compat import (
    CACHE_FIELD,
    cache_capacity,
    cache_kwargs,
    check_cache,
    check_kwargs,
    resolve_cache,
    warn_old_cache_name,
)

logger = logging.get_logger(__name__)

# Length of the LF gate's receptive field minus one: the conv state keeps the last two LF inputs.
LF_CONV_STATE = 2


class YuanM32RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as Llama's)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class YuanM32RotaryEmbedding(nn.Module):
    """cos/sin for the first `rotary_dim` dims of each head, computed per position (no table, no length cap).

    With `config.rope_in_bfloat16` it reproduces IEIT remote code's bf16 tables bit for bit:
    `inv = bf16(1/base^(2j/rot))`, `t = bf16(position)`, `cos = bf16(cos(bf16(t * inv)))`, returned in fp32.
    """

    inv_freq: torch.Tensor

    def __init__(self, config: YuanM32Config, device: torch.device | None = None):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: YuanM32Config, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.rotary_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [b, s] -> cos, sin: [b, s, rotary_dim]
        if self.config.rope_in_bfloat16:
            inv = self.inv_freq.to(x.device, torch.bfloat16)
            freqs = position_ids[..., None].to(torch.bfloat16) * inv  # bf16 product, as IEIT's einsum
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().float().to(x.dtype), emb.sin().float().to(x.dtype)
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device, torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first `cos.shape[-1]` dims of each head (NeoX rotate-half); the rest pass through.

    q, k: [b, heads, s, head_dim]; cos, sin: [b, s, rotary_dim].
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    q_rot = q_rot * cos + rotate_half(q_rot) * sin
    k_rot = k_rot * cos + rotate_half(k_rot) * sin
    return torch.cat((q_rot, q_pass), dim=-1), torch.cat((k_rot, k_pass), dim=-1)


class YuanM32WindowConv1d(nn.Conv1d):
    """An `nn.Conv1d` over non-overlapping windows (stride == kernel size, no padding), computed as one GEMM.

    x: [b, C_in, n * k] (window j is x[..., j*k : (j+1)*k]) -> [b, C_out, n], exactly `nn.Conv1d` with stride k,
    but as `F.linear` against the weight viewed as [C_out, C_in * k] (a free view), which CPU runs several times
    faster than the convolution kernel in bf16. Because the module itself is *called*, accelerate's offload hooks
    move its weights in, and PEFT's LoRA / DoRA for `nn.Conv1d` wrap it (PEFT builds lora_A / lora_B with
    `type(base_layer)`, so those run through this forward too). Other geometries fall back to `nn.Conv1d`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size[0]
        windowed = self.stride[0] == k and self.padding in ((0,), "valid") and self.dilation[0] == 1
        if not windowed or self.groups != 1 or x.ndim != 3 or x.shape[-1] % k:
            return super().forward(x)
        windows = x.unflatten(-1, (-1, k)).transpose(1, 2).flatten(2)  # [b, n, C_in * k] (channel-major, tap-minor)
        return F.linear(windows, self.weight.flatten(1), self.bias).transpose(1, 2)  # [b, C_out, n]


class YuanM32LocalizedFiltering(nn.Module):
    """Yuan's LF gate: `RMSNorm(conv2(conv1(x)) + x)` with two causal 2-tap convolutions (H -> H/2 -> H).

    `o1[t] = W1[..., 0] x[t-1] + W1[..., 1] x[t] + b1` and `o2[t] = W2[..., 0] o1[t-1] + W2[..., 1] o1[t] + b2`,
    with zero (not bias) before a sequence's first token. Output t depends on inputs t-2..t, so decoding
    keeps the last two LF inputs in the cache's conv state. The "previous" taps are switched off where a
    sequence starts (`position_ids == 0`: the start of a prompt, of each packed document, or the first real
    token after left padding), so padding and neighbouring documents never leak in.
    """

    def __init__(self, config: YuanM32Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        hidden = config.hidden_size
        # weight [C_out, C_in, 2]: taps (t-1, t); they run on (previous, current) pairs, hence stride 2
        self.conv1 = YuanM32WindowConv1d(hidden, hidden // 2, kernel_size=2, stride=2)
        self.conv2 = YuanM32WindowConv1d(hidden // 2, hidden, kernel_size=2, stride=2)
        self.output_layernorm = YuanM32RMSNorm(hidden, eps=config.rms_norm_eps)

    @staticmethod
    def _causal_conv(window: torch.Tensor, conv: nn.Conv1d, has_prev: torch.Tensor) -> torch.Tensor:
        """window: [b, C_in, n+1] (one step of left context) -> [b, C_out, n], channels first.

        Output j = W[..., 0] window[j] (the previous step, gated by has_prev[:, j]) + W[..., 1] window[j+1] + b:
        the (previous, current) pairs interleave along time, so the stride-2 conv sees one pair per output.
        """
        previous = window[..., :-1] * has_prev[:, None].to(window.dtype)
        pairs = torch.stack((previous, window[..., 1:]), dim=-1).flatten(-2)  # [b, C_in, 2n]
        return conv(pairs)

    def forward(
        self,
        hidden_states: torch.Tensor,
        has_prev: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        # hidden_states: [b, s, H]; has_prev: [b, s] bool; padding_mask: [b, s] (1 = real token) or None
        seq_len = hidden_states.shape[1]
        if padding_mask is not None:
            hidden_states = hidden_states * padding_mask[..., None].to(hidden_states.dtype)
        has_prev_state = cache is not None and cache.has_previous_state(self.layer_idx)
        window = hidden_states.transpose(1, 2)  # [b, H, s], channels first as the convolutions and the cache
        if cache is not None:
            # the cache stores LF inputs [b, H, time]; it returns the state followed by the new steps
            window = cache.update_conv_state(window, self.layer_idx, conv_kernel_size=LF_CONV_STATE)
        # exactly two steps of left context (zeros when there is no state): [b, H, s + 2]
        window = window[..., -(seq_len + LF_CONV_STATE) :]
        window = F.pad(window, (seq_len + LF_CONV_STATE - window.shape[-1], 0))
        if not has_prev_state:
            # o1 of the step before the first one is zero, not conv1's bias
            has_prev = has_prev.clone()
            has_prev[:, 0] = False
        # has_prev of the step before the chunk: its own left context is already zero where it must be
        prev_gate = torch.cat([has_prev.new_ones(has_prev.shape[0], 1), has_prev], dim=1)
        o1 = self._causal_conv(window, self.conv1, prev_gate)  # [b, H/2, s + 1]: steps -1 .. s-1
        if padding_mask is not None:  # o1 of a padding step is zero too (it would carry conv1's bias)
            o1 = o1 * F.pad(padding_mask, (1, 0), value=1)[:, None].to(o1.dtype)
        o2 = self._causal_conv(o1, self.conv2, has_prev)  # [b, H, s]
        return self.output_layernorm(o2.transpose(1, 2) + hidden_states)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, kv_heads, s, d] -> [b, kv_heads * n_rep, s, d]."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


class YuanM32Attention(nn.Module):
    """Causal attention whose Q and K come from the LF gate's output and V from the unfiltered input.

    head_dim is 256 for the release (attention width 2H); RoPE rotates the first half of each head and the
    softmax scale is 1/sqrt(head_dim).
    """

    def __init__(self, config: YuanM32Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.lf_gate = YuanM32LocalizedFiltering(config, layer_idx)
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        lf_has_prev: torch.Tensor,
        lf_padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [b, kv, s, d]
        filtered = self.lf_gate(hidden_states, lf_has_prev, lf_padding_mask, cache)
        query_states = self.q_proj(filtered).view(hidden_shape).transpose(1, 2)  # [b, heads, s, d]
        key_states = self.k_proj(filtered).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_partial_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class YuanM32Router(nn.Module):
    """Shared top-k routing: `softmax(logits) -> top-k -> renormalise` (= Megatron's top-k then softmax).

    A pruned layer keeps its router whole (`router_width` outputs) and routes among the remaining experts' logits
    (`expert_ids`, from `config.router_experts`): the top-k among them, renormalised, is what the unpruned model
    computes whenever its top-k holds no removed expert.
    """

    def __init__(self, config: YuanM32Config, layer_idx: int):
        super().__init__()
        self.num_experts = config.experts_per_layer[layer_idx]
        self.router_width = config.router_num_experts or self.num_experts
        self.expert_ids = None if config.router_experts is None else config.router_experts[layer_idx]
        self._expert_index: torch.Tensor | None = None  # expert_ids on the logits' device, made once
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states: [T, H] -> router_logits [T, E] fp32, weights [T, k] (hidden dtype), expert ids [T, k]."""
        router_logits = self.compute_logits(hidden_states)  # [T, router_width]
        if self.expert_ids is not None:  # [T, router_width] -> [T, E]: the logits of this layer's experts
            router_logits = router_logits.index_select(-1, self._expert_index_on(router_logits.device))
        _, top_k_weights, top_k_index = top_k_routing(router_logits, self.top_k, self.norm_topk_prob)
        return router_logits, top_k_weights.to(hidden_states.dtype), top_k_index

    def _expert_index_on(self, device: torch.device) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a constant of the graph
            return torch.tensor(self.expert_ids, device=device)
        if self._expert_index is None or self._expert_index.device != device:  # not per step: a host-to-device copy
            self._expert_index = torch.tensor(self.expert_ids, device=device)
        return self._expert_index


def top_k_routing(
    router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`softmax(logits) -> top-k -> renormalise` in fp32: (probs [T, E], weights [T, k], expert ids [T, k])."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    top_k_weights, top_k_index = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
    return probs, top_k_weights, top_k_index


def router_dtype() -> torch.dtype:
    """The router's parameter dtype at construction: fp32 under a 16-bit default dtype (from_config / __init__ under
    dtype=bf16 too, as in-tree models with `_keep_in_fp32_modules_strict` do), the default otherwise (an fp64 model
    keeps an fp64 router, as from_pretrained(dtype=float64) loads it)."""
    default = torch.get_default_dtype()
    return torch.float32 if torch.finfo(default).bits < 32 else default


class YuanM32AttentionRouter(YuanM32Router):
    """Yuan's attention router, in fp32: three H -> E projections, then per token an E x E attention
    `A = softmax_j(q_i * k_j)` (no scaling) and `logits_i = sum_j A_ij v_j`."""

    def __init__(self, config: YuanM32Config, layer_idx: int):
        super().__init__(config, layer_idx)
        dtype = router_dtype()  # from_pretrained also keeps it fp32 through `_keep_in_fp32_modules_strict`
        self.query = nn.Linear(config.hidden_size, self.router_width, bias=False, dtype=dtype)
        self.key = nn.Linear(config.hidden_size, self.router_width, bias=False, dtype=dtype)
        self.value = nn.Linear(config.hidden_size, self.router_width, bias=False, dtype=dtype)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.to(self.query.weight.dtype)  # fp32 unless the whole model was cast
        q = self.query(hidden_states).float()  # [T, E]
        k = self.key(hidden_states).float()
        v = self.value(hidden_states).float()
        attn = F.softmax(q[:, :, None] * k[:, None, :], dim=-1)  # [T, E, E]
        return torch.matmul(attn, v[:, :, None]).squeeze(-1)  # [T, E]


class YuanM32LinearRouter(YuanM32Router):
    """The classic softmax gate (`router_type="linear"`), for ablations and other checkpoints."""

    def __init__(self, config: YuanM32Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.weight = nn.Parameter(torch.empty(self.router_width, config.hidden_size, dtype=router_dtype()))

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states.to(self.weight.dtype), self.weight).float()


ROUTER_CLASSES = {"attention": YuanM32AttentionRouter, "linear": YuanM32LinearRouter}


class YuanM32MLP(nn.Module):
    """One SwiGLU expert: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, config: YuanM32Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.moe_intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.moe_intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.moe_intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class YuanM32Experts(nn.ModuleList):
    """Per-expert `nn.Linear`s (so bitsandbytes quantizes them and PEFT targets them by name), dispatched by
    `config._experts_implementation` (transformers' `experts_implementation` option):

    - `"eager"` (default): sort-based. One sort of the token-expert pairs, one host sync per layer for the group
      sizes, contiguous slices per expert, one weighted scatter-add back; a single token (batch-1 decode) calls
      its k experts directly. Under `torch.compile` / `torch.export`, which cannot follow a host sync, every
      expert runs on every token with zero weight where not routed (exact, E/k times the expert FLOPs).
    - `"grouped_mm"`, `"batched_mm"` (and any other kernel in transformers' `ALL_EXPERTS_FUNCTIONS`): inference
      through transformers' own sync-free experts functions, on the expert weights fused once into `gate_up_proj`
      [E, 2F, H] (gate rows, then up rows) and `down_proj` [E, H, F], the layout those functions read. The
      per-expert weights become views into the fused tensors (no extra memory; the checkpoint keeps per-expert
      tensors). Compiles with `fullgraph=True`, exports with `torch.export`, captures in CUDA graphs. With
      gradients on it defers to the eager path (the views get no gradient through the fused tensors).
    """

    # what transformers' experts functions read besides the fused weights (as `@use_experts_implementation` sets)
    has_gate, has_bias, is_transposed, is_concatenated = True, False, False, True
    has_post_expert_norm = _is_expert_parallel = False

    def __init__(self, config: YuanM32Config, num_experts: int):
        super().__init__([YuanM32MLP(config) for _ in range(num_experts)])
        self.config = config
        self.num_experts = num_experts
        # fused weights for the non-eager implementations (not saved: the checkpoint keeps per-expert tensors)
        self.register_buffer("gate_up_proj", None, persistent=False)  # [E, 2F, H]
        self.register_buffer("down_proj", None, persistent=False)  # [E, H, F]

    @property
    def act_fn(self) -> nn.Module:
        return self[0].act_fn  # a property, not a child module: the list holds experts only

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)  # [S, 2F] -> [S, F] each
        return self.act_fn(gate) * up

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states: [T, H]; top_k_index, top_k_weights: [T, k] -> [T, H]."""
        implementation = self.config._experts_implementation
        compiling = torch.compiler.is_compiling()
        if implementation != "eager" and not self._needs_gradients():
            if not compiling:  # host-side checks; a compiled graph guards on the modules it traced
                self.fuse()
            elif self.gate_up_proj is None:
                raise RuntimeError(
                    f"experts_implementation={implementation!r} fuses the expert weights before its first compiled "
                    f"call: run one eager forward, or call model.set_experts_implementation({implementation!r}), "
                    "before compiling"
                )
            experts_forward = ALL_EXPERTS_FUNCTIONS.get_interface(implementation, YuanM32Experts._sorted_forward)
            return experts_forward(self, hidden_states, top_k_index, top_k_weights)
        if compiling:
            return self._dense_forward(hidden_states, top_k_index, top_k_weights)
        return self._sorted_forward(hidden_states, top_k_index, top_k_weights)

    def _needs_gradients(self) -> bool:
        return torch.is_grad_enabled() and self[0].down_proj.weight.requires_grad

    def _sorted_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        top_k = top_k_index.shape[-1]
        # with gradients on, every expert runs (empty slices included) so DDP/FSDP see all parameters used
        run_all = torch.is_grad_enabled()
        if hidden_states.shape[0] == 1 and not run_all:
            # one token: call its k experts directly (no sort, gather or scatter); the same one host sync
            weights = top_k_weights.to(hidden_states.dtype)
            experts = top_k_index[0].tolist()
            out = self[experts[0]](hidden_states) * weights[:, :1]
            for j in range(1, top_k):
                out = out + self[experts[j]](hidden_states) * weights[:, j : j + 1]
            return out
        flat_experts = top_k_index.reshape(-1)  # [T*k]
        order = torch.argsort(flat_experts, stable=True)  # token-expert pairs grouped by expert
        token_idx = order // top_k
        group_sizes = torch.bincount(flat_experts, minlength=len(self)).tolist()  # the one host sync
        routed = hidden_states[token_idx].split(group_sizes)  # E slices of [n_e, H]
        outputs = [expert(x) for expert, x, n in zip(self, routed, group_sizes) if n or run_all]
        expert_out = torch.cat(outputs) if outputs else hidden_states.new_zeros(0, hidden_states.shape[-1])
        expert_out = expert_out * top_k_weights.reshape(-1)[order, None].to(expert_out.dtype)
        return torch.zeros_like(hidden_states).index_add_(0, token_idx, expert_out.to(hidden_states.dtype))

    def _dense_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # [T, E] routing weights, zero where a token is not routed: no data-dependent shapes
        dense_weights = torch.zeros(
            hidden_states.shape[0], len(self), dtype=hidden_states.dtype, device=hidden_states.device
        ).scatter(1, top_k_index, top_k_weights.to(hidden_states.dtype))
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            out = out + expert(hidden_states) * dense_weights[:, e, None]
        return out

    @torch.no_grad()
    def fuse(self) -> None:
        """Stack the expert weights into `gate_up_proj` [E, 2F, H] and `down_proj` [E, H, F] and make each
        expert's weights views into them (no memory beyond one layer's experts during the copy). Idempotent;
        refuses experts that are not plain float `nn.Linear`s (bitsandbytes-quantized, PEFT-wrapped)."""
        for e, expert in enumerate(self):
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear = getattr(expert, name)
                if type(linear) is not nn.Linear or type(linear.weight) is not nn.Parameter:
                    raise ValueError(
                        f"experts_implementation={self.config._experts_implementation!r} runs on fused plain expert "
                        f"weights, but expert {e}'s {name} is a {type(linear).__module__}.{type(linear).__name__} "
                        f"with a {type(linear.weight).__name__} weight (bitsandbytes-quantized, or wrapped by a PEFT "
                        "adapter). Use experts_implementation='eager' (the default) with quantized or adapted models, "
                        "or merge the adapters first (model = model.merge_and_unload())."
                    )
        first = self[0].gate_proj.weight
        if self.gate_up_proj is not None and self.gate_up_proj.data_ptr() == first.data_ptr():
            return  # already fused, and the weights were not replaced since (loading, .to(), assignment)
        if first.device.type == "meta":
            raise RuntimeError("Cannot fuse expert weights on the meta device: load the weights first")
        self.gate_up_proj = self.down_proj = None  # release a stale fused copy before building the new one
        ffn = first.shape[0]
        gate_up = first.new_empty(len(self), 2 * ffn, first.shape[1])
        down = first.new_empty(len(self), *self[0].down_proj.weight.shape)
        for e, expert in enumerate(self):
            targets = (
                (expert.gate_proj, gate_up[e, :ffn]), (expert.up_proj, gate_up[e, ffn:]), (expert.down_proj, down[e])
            )  # fmt: skip
            for linear, target in targets:
                target.copy_(linear.weight)
                linear.weight = nn.Parameter(target, requires_grad=linear.weight.requires_grad)
        self.gate_up_proj, self.down_proj = gate_up, down

    def _apply(self, fn, recurse: bool = True):
        # .to() / .half() / .cuda() convert each weight on its own: the fused buffers are left out of the
        # conversion (no second copy) and dropped if the weights moved; the next fused forward fuses again
        fused = (self.gate_up_proj, self.down_proj)
        self.gate_up_proj = self.down_proj = None
        result = super()._apply(fn, recurse)
        if fused[0] is not None and self[0].gate_proj.weight.data_ptr() == fused[0].data_ptr():
            self.gate_up_proj, self.down_proj = fused  # a conversion that changed nothing (same device, dtype)
        return result


class YuanM32SparseMoeBlock(nn.Module):
    """Router + experts, top-2 of 32, no shared expert, no capacity limit. A pruned model has fewer experts in
    some layers (`config.num_experts` per layer): router and experts take this layer's count."""

    def __init__(self, config: YuanM32Config, layer_idx: int):
        super().__init__()
        self.gate = ROUTER_CLASSES[config.router_type](config, layer_idx)
        self.experts = YuanM32Experts(config, config.experts_per_layer[layer_idx])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        flat = hidden_states.view(-1, hidden_dim)  # [T, H]
        _, top_k_weights, top_k_index = self.gate(flat)
        return self.experts(flat, top_k_index, top_k_weights).view(batch_size, seq_len, hidden_dim)


class YuanM32DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: YuanM32Config, layer_idx: int):
        super().__init__()
        self.self_attn = YuanM32Attention(config, layer_idx)
        self.mlp = YuanM32SparseMoeBlock(config, layer_idx)
        self.input_layernorm = YuanM32RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = YuanM32RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        lf_has_prev: torch.Tensor,
        lf_padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            lf_has_prev=lf_has_prev,
            lf_padding_mask=lf_padding_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class YuanM32PreTrainedModel(PreTrainedModel):
    config_class = YuanM32Config
    config: YuanM32Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["YuanM32DecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    # the router runs in fp32 (as IEIT trained it), also under bf16; the non-strict list is what quantizers
    # read to leave modules unquantized, and it matches module names, hence the three Linears by name
    _keep_in_fp32_modules_strict = ["mlp.gate"]
    _keep_in_fp32_modules = ["mlp.gate.query", "mlp.gate.key", "mlp.gate.value"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # compiles and exports with fullgraph=True (experts without host syncs under compile: see YuanM32Experts)
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(YuanM32Router, index=0),
        "hidden_states": YuanM32DecoderLayer,
        "attentions": YuanM32Attention,
    }

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers', but a folder that gets the modeling files (the class was registered for an Auto class)
        maps *every* Auto class to its Yuan head, not only the saved class's, so it loads with remote code as
        `AutoModel`, `AutoModelForCausalLM` or any head."""
        if self._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **auto_map(type(self).__module__)}
        return super().save_pretrained(save_directory, *args, **kwargs)

    # Callables `(path, kwargs) -> native_path | None` that turn another layout into a native folder before
    # loading. The yuan_hf package registers one for IEIT's HF layout; the Hub copy of this file has none.
    _source_adapters: list[Callable] = []

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        path = pretrained_model_name_or_path
        if not (isinstance(path, (str, os.PathLike)) and os.path.isdir(path)):
            # a Hub id, or None with `config` + `state_dict`: no local layout to adapt or check
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        for adapter in cls._source_adapters:
            converted = adapter(pretrained_model_name_or_path, kwargs)
            if converted is not None:
                pretrained_model_name_or_path = converted
                break
        else:
            config_file = os.path.join(str(pretrained_model_name_or_path), "config.json")
            if os.path.isfile(config_file):
                with open(config_file) as handle:
                    model_type = json.load(handle).get("model_type")
                if model_type == "yuan":
                    raise ValueError(
                        f"{pretrained_model_name_or_path} is IEIT's original HF layout (model_type 'yuan'). Convert it "
                        "once with yuan-hf (install it from its repository: `pip install -e PATH/TO/yuan-hf`, not "
                        "published on PyPI) and `yuan-hf convert ieit-hf SRC DST`, or `import yuan_hf` first, which "
                        "converts it on the fly."
                    )
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded)._fuse_experts_if_requested()  # (model, info) on request
        return loaded

    # Experts implementations (transformers' `experts_implementation` option, see YuanM32Experts): transformers
    # would default a model that can set it to "grouped_mm"; Yuan defaults to "eager", which bitsandbytes, PEFT and
    # training need. The others are transformers' own, validated by transformers.
    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        return "eager" if requested_experts is None else super().get_correct_experts_implementation(requested_experts)

    def set_experts_implementation(self, experts_implementation: str | dict):
        """transformers' switch; a fused implementation fuses the expert weights now (so the next call can be
        compiled), and refuses bitsandbytes-quantized or PEFT-adapted experts there, naming the path to use."""
        super().set_experts_implementation(experts_implementation)
        self._fuse_experts_if_requested()

    def _fuse_experts_if_requested(self) -> None:
        if self.config._experts_implementation != "eager":
            for module in self.modules():
                if isinstance(module, YuanM32Experts):
                    module.fuse()

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, mesh_manager=None, *args, **kwargs):
        """transformers' hook between building the model (on meta) and reading the weights, reached by every
        `from_pretrained(..., distributed_config=...)` (and the older `tp_plan=` / `tp_size=`): the place to refuse
        sizes that do not divide the heads or experts before any weight loads, and to keep this rank's experts."""
        if distributed_config is not None:
            distribute_yuan_model(model, distributed_config, mesh_manager)
        return super().maybe_distribute_model(model, distributed_config, mesh_manager, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, YuanM32LinearRouter):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, nn.Conv1d):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()


def check_input_shapes(
    attention_mask: torch.Tensor | dict | None, position_ids: torch.Tensor, batch_size: int, seq_len: int
) -> None:
    """Shape checks on the host (no device sync) so a wrong mask or positions fail here, by name, not deep inside."""
    if position_ids.ndim != 2 or position_ids.shape[0] not in (1, batch_size) or position_ids.shape[1] != seq_len:
        raise ValueError(
            f"position_ids must have shape [{batch_size} or 1, {seq_len}] (batch, new tokens), got "
            f"{list(position_ids.shape)}"
        )
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        if attention_mask.shape[0] != batch_size or attention_mask.shape[1] < seq_len:
            raise ValueError(
                f"attention_mask must have shape [{batch_size}, past + {seq_len}] (1 = real token, 0 = padding; it "
                f"covers the cached tokens too), got {list(attention_mask.shape)}"
            )


class YuanM32Model(YuanM32PreTrainedModel):
    def __init__(self, config: YuanM32Config):
        super().__init__(config)
        self.vocab_size = config.vocab_size
        # no padding_idx: the release pads with <eod>, whose embedding must keep training
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [YuanM32DecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = YuanM32RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = YuanM32RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        r"""cache: the decode state (K/V and the LF-gate conv state per layer); `past_key_values` is the same
        argument under its name before transformers 5.24. The returned output carries it under the installed
        release's name (`outputs.cache`, or `outputs.past_key_values`, which 5.24+ keep as an alias)."""
        warn_old_cache_name(past_key_values, type(self).__name__ + ".forward")
        cache = resolve_cache(cache, past_key_values)
        check_kwargs(kwargs, type(self).__name__ + ".forward")
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]
        if seq_len == 0:
            raise ValueError("The input is empty (sequence length 0): pass at least one token")
        if cache is not None:
            check_cache(cache, self.config, batch_size)
        fresh_cache = use_cache and cache is None
        if fresh_cache:
            cache = DynamicCache(config=self.config)
        past_seen_tokens = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)
        check_input_shapes(attention_mask, position_ids, batch_size, seq_len)
        self._warn_if_beyond_trained_length(past_seen_tokens, seq_len, cache)

        if isinstance(attention_mask, dict):  # prepared by generate (static cache): one mask per kind of layer
            causal_mask = attention_mask["full_attention"]
            lf_padding_mask = attention_mask.get("linear_attention")
        else:
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                "position_ids": position_ids,
                # a cache we just created is empty: masks are the same without it, and packed sequences
                # (position_ids restarting, no attention mask) are only detected without a cache
                **cache_kwargs(None if fresh_cache else cache),
            }
            causal_mask = create_causal_mask(**mask_kwargs)
            lf_padding_mask = create_recurrent_attention_mask(**mask_kwargs)
        # a token has an LF predecessor unless it starts a sequence (prompt, packed document, after padding)
        lf_has_prev = (position_ids != 0).expand(batch_size, -1)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                lf_has_prev=lf_has_prev,
                lf_padding_mask=lf_padding_mask,
                cache=cache,
                position_ids=position_ids,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, **cache_kwargs(cache))

    def _warn_if_beyond_trained_length(
        self, past_seen_tokens: int | torch.Tensor, seq_len: int, cache: Cache | None
    ) -> None:
        """One warning when a sequence can pass max_position_embeddings, from host-side lengths only.

        A static cache counts its tokens in a device tensor (reading it would sync every decode step and break
        compiled graphs), so there its capacity (`max_cache_len`, a host int) is compared instead, already at
        prefill. RoPE is computed per position, so longer inputs run; dynamic NTK scaling is meant to run past it.
        """
        if getattr(self, "_warned_long", False) or self.rotary_emb.rope_type == "dynamic":
            return
        capacity = cache_capacity(cache)  # -1: grows without bound (dynamic)
        if capacity > 0 or isinstance(past_seen_tokens, torch.Tensor):
            length, what = capacity, "cache holding up to"
        else:
            length, what = past_seen_tokens + seq_len, "sequence of"
        limit = self.config.max_position_embeddings
        if length > limit:
            logger.warning(
                f"Yuan 2.0-M32: a {what} {length} tokens exceeds max_position_embeddings ({limit}); RoPE is "
                "computed for it, but quality beyond the trained length is not guaranteed "
                "(see yuan_hf.finetune.extend_context)."
            )
            self._warned_long = True


def _chunk_loss_sum(hidden_chunk: torch.Tensor, labels_chunk: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """Sum of token cross-entropies for one chunk; its fp32 logits live only inside this call."""
    logits = lm_head(hidden_chunk).float()  # [n, V]
    return F.cross_entropy(logits, labels_chunk, ignore_index=-100, reduction="sum")


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    *,
    chunk_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal-LM loss equal to transformers' `ForCausalLMLoss`, computed `chunk_size` tokens at a time.

    hidden_states: [b, s, H]; labels: [b, s] (-100 = ignored; shifted here unless `shift_labels` is given).
    Each chunk's logits are recomputed in the backward pass (activation checkpointing), so at most one
    [chunk_size, V] fp32 logits tensor exists at any time instead of [b * s, V].
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # [b*s, H]
    targets = shift_labels.reshape(-1).to(hidden.device)  # [b*s]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + torch.utils.checkpoint.checkpoint(_chunk_loss_sum, h, t, lm_head, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, t, lm_head)
    if num_items_in_batch is None:
        num_items_in_batch = (targets != -100).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def load_balancing_aux_loss(
    router_logits: tuple[torch.Tensor, ...], config: YuanM32Config, padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """Mixtral's load-balancing loss (router_logits: one [T, E_l] per layer). Mixtral pools all layers, which needs
    one expert count; a pruned model's layers are pooled per count and the groups averaged, weighted by layers.
    With one count everywhere this is exactly Mixtral's loss."""
    groups: dict[int, list[torch.Tensor]] = {}
    for logits, count in zip(router_logits, config.experts_per_layer):
        groups.setdefault(count, []).append(logits)
    return sum(
        len(layers) / len(router_logits)
        * load_balancing_loss_func(tuple(layers), count, config.num_experts_per_tok, padding_mask)
        for count, layers in groups.items()
    )


class YuanM32ForCausalLM(YuanM32PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: YuanM32Config):
        super().__init__(config)
        self.model = YuanM32Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, after refusing bos/eos/pad ids outside the vocabulary, and where
        `cache_implementation="quantized"` works for Yuan's hybrid layers.

        A config may carry such ids (the release's defaults with a smaller `vocab_size` only warn); generating
        with them would never stop on eos or index past the embedding with pad. The ids are read from the public
        arguments (`generation_config`, positional or keyword, else `self.generation_config`; `*_token_id`
        keywords override it), not from a private hook of `generate`, whose signatures move between releases.

        transformers' `QuantizedCache` refuses hybrid layers; here the same option (with the same `cache_config`
        keys: `backend` "quanto" or "hqq", `nbits`, `q_group_size`, `residual_length`, `axis_key`, `axis_value`)
        builds a `YuanM32QuantizedCache`: K/V quantized, the LF-gate conv state in full precision.
        """
        generation_config = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
        generation_config = generation_config if generation_config is not None else self.generation_config
        names = ("bos_token_id", "eos_token_id", "pad_token_id")
        ids = {name: kwargs.get(name, getattr(generation_config, name, None)) for name in names}
        outside = self.config.special_tokens_outside_vocab(SimpleNamespace(**ids))
        if outside:
            found = ", ".join(f"{name}={token_id}" for name, token_id in outside.items())
            raise ValueError(
                f"generate: {found} outside the vocabulary (vocab_size {self.config.vocab_size}); set the ids of "
                "your tokenizer in model.generation_config (or pass them to generate)"
            )
        implementation = kwargs.get("cache_implementation", getattr(generation_config, "cache_implementation", None))
        if implementation == "quantized" and kwargs.get(CACHE_FIELD) is None:
            cache_config = kwargs.pop("cache_config", None)
            if cache_config is None:
                cache_config = getattr(generation_config, "cache_config", None)
            kwargs[CACHE_FIELD] = YuanM32QuantizedCache(self.config, **dict(cache_config or {}))
            kwargs["cache_implementation"] = None  # the cache is given; generate must not build another
        return super().generate(*args, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        r"""Causal LM forward. `labels` ([b, s], -100 = ignored) are shifted inside, as in every transformers LM.

        With labels and `config.loss_chunk_size > 0` (the default, 1024 tokens) the loss is computed in chunks.
        With gradients enabled (training) the full logits are never built: `logits` is then `None` unless
        `logits_to_keep` asks for some positions. Without gradients (evaluation, e.g. `Trainer.evaluate` with
        `compute_metrics`) the full logits are returned in the model's dtype, [b, s, V] (about 1.1 GB per 4096-token
        row in bf16 at the release's 135040 vocabulary: reduce them with `preprocess_logits_for_metrics`), and the
        loss is read from them chunk by chunk in fp32. Set `config.loss_chunk_size = 0` for the standard path (full
        logits and transformers' own loss, also in training). `shift_labels` (keyword): labels already shifted.

        With `output_router_logits` (or `config.output_router_logits`) the load-balancing aux loss is
        returned and, when `router_aux_loss_coef > 0`, added to the loss. `cache` / `past_key_values`: see
        `YuanM32Model.forward`.
        """
        # `shift_labels` (pre-shifted labels, as transformers' context parallelism passes them) comes through kwargs,
        # not the signature: Trainer takes every forward parameter named "*label*" as a required label column
        shift_labels = kwargs.pop("shift_labels", None)
        # generate() hands its own `tokenizer` (stop strings; `transformers serve` always passes it) on to the model
        # inputs, where in-tree models swallow it: drop it here, as it means nothing to the model
        kwargs.pop("tokenizer", None)
        kwargs.pop("assistant_tokenizer", None)
        warn_old_cache_name(past_key_values, type(self).__name__ + ".forward")
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        for name, targets in (("labels", labels), ("shift_labels", shift_labels)):
            if targets is not None and tuple(targets.shape) != tuple(hidden_states.shape[:2]):
                raise ValueError(
                    f"{name} must have the shape of input_ids {list(hidden_states.shape[:2])}, got {list(targets.shape)}"
                )
        chunk = self.config.loss_chunk_size
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        all_logits = isinstance(logits_to_keep, int) and logits_to_keep == 0
        logits = loss = None
        if labels is not None and chunk and (torch.is_grad_enabled() or not all_logits):
            # memory-lean path (training): no [b*s, V] fp32 logits; `logits` is returned only for positions asked for
            loss = chunked_causal_lm_loss(
                hidden_states, labels, self.lm_head, chunk_size=chunk,
                num_items_in_batch=kwargs.get("num_items_in_batch"), shift_labels=shift_labels,
            )  # fmt: skip
            if not all_logits:
                logits = self.lm_head(hidden_states[:, slice_indices, :].contiguous())  # strided slices hit slow CPU kernels
        else:
            logits = self.lm_head(hidden_states[:, slice_indices, :].contiguous())  # strided slices hit slow CPU kernels
            if labels is not None and chunk:
                # without gradients (evaluation: Trainer's compute_metrics needs them) the logits are returned in the
                # model's dtype; the loss reads them in fp32 chunks, never as one fp32 copy
                loss = chunked_causal_lm_loss(
                    logits, labels, nn.Identity(), chunk_size=chunk,
                    num_items_in_batch=kwargs.get("num_items_in_batch"), shift_labels=shift_labels,
                )  # fmt: skip
            elif labels is not None:
                loss = self.loss_function(logits, labels, self.vocab_size, shift_labels=shift_labels, **kwargs)

        aux_loss = None
        if output_router_logits:
            padding_mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 else None
            aux_loss = load_balancing_aux_loss(outputs.router_logits, self.config, padding_mask)
            if labels is not None and self.config.router_aux_loss_coef > 0:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            **cache_kwargs(getattr(outputs, CACHE_FIELD)),
        )


# The heads take their forward from transformers' generic heads (as Qwen3-MoE's). Their __init__ builds the
# backbone directly: the generic one asks `AutoModel.from_config`, which knows no Yuan model in remote code.


class YuanM32ForSequenceClassification(GenericForSequenceClassification, YuanM32PreTrainedModel):
    """Score of the last non-padding token (reward and value models, e.g. TRL's RewardTrainer); needs a
    `pad_token_id` distinct from the text's tokens (the converted release tokenizer's `<pad>`)."""

    def __init__(self, config: YuanM32Config):
        YuanM32PreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = YuanM32Model(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()


class YuanM32ForTokenClassification(GenericForTokenClassification, YuanM32PreTrainedModel):
    def __init__(self, config: YuanM32Config):
        YuanM32PreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = YuanM32Model(config)
        self.dropout = nn.Dropout(getattr(config, "classifier_dropout", None) or 0.0)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class YuanM32ForQuestionAnswering(GenericForQuestionAnswering, YuanM32PreTrainedModel):
    def __init__(self, config: YuanM32Config):
        YuanM32PreTrainedModel.__init__(self, config)
        self.model = YuanM32Model(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)  # start and end logits
        self.post_init()


# Auto class -> class name, for `auto_map` in saved and converted folders (all classes live in this file).
AUTO_CLASSES = {
    "AutoModel": "YuanM32Model",
    "AutoModelForCausalLM": "YuanM32ForCausalLM",
    "AutoModelForSequenceClassification": "YuanM32ForSequenceClassification",
    "AutoModelForTokenClassification": "YuanM32ForTokenClassification",
    "AutoModelForQuestionAnswering": "YuanM32ForQuestionAnswering",
}


def auto_map(module: str = __name__) -> dict[str, str]:
    """`auto_map` entries for every model class, as `{"AutoModel": "modeling_yuan_m32.YuanM32Model", ...}`
    (`module`: this file's module name; only its last part counts, as in transformers' own `auto_map`)."""
    file = module.rsplit(".", 1)[-1]
    return {auto_class: f"{file}.{name}" for auto_class, name in AUTO_CLASSES.items()}


__all__ = [
    "YuanM32PreTrainedModel",
    "YuanM32Model",
    "YuanM32ForCausalLM",
    "YuanM32ForSequenceClassification",
    "YuanM32ForTokenClassification",
    "YuanM32ForQuestionAnswering",
]
