"""Yuan's localized-filtering (LF) gate as a vLLM V1 state layer.

The gate is `RMSNorm(conv2(conv1(x)) + x)` with two causal 2-tap convolutions over time (H -> H/2 -> H), each a
dense channel mix with bias and zero left padding (DESIGN.md section 3):

    c1[t] = W1p x[t-1] + W1c x[t] + b1          x[-1] = 0
    c2[t] = W2p c1[t-1] + W2c c1[t] + b2        c1[-1] = 0 (zero, not b1)

so the state a request carries from one step to the next is `(x[t-1], c1[t-1])`: H + H/2 values per layer. Unlike
LFM2's ShortConv (a depthwise conv, one state tensor) it is two GEMMs and two states, so ShortConv cannot be reused;
its metadata path can: the layer declares `MambaAttentionBackendEnum.SHORT_CONV` and reads the same
`ShortConvAttentionMetadata` (state slot per request, prefill query offsets, has-initial-state flags).

The forward is vectorised over the flat token batch (decodes first, then prefill chunks, as V1 orders them): the
previous-step inputs are the batch shifted by one token, with each request's first token of this step patched
from its state slot (or zero for a fresh prompt) by one gather and one `index_copy_`; after the two GEMMs each
request's last token is written back to its slot. No per-request Python loop, no host sync, no boolean-mask
indexing; the layer runs as the custom op `vllm::yuan_lf_gate`, where piecewise CUDA graphs split the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.breakable_cudagraph import eager_break_during_capture
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateDtypeCalculator, get_temporal_copy_spec
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
from vllm.v1.attention.backends.short_conv_attn import ShortConvAttentionMetadata

from . import LF_GATE_OP_NAME


def lf_state_shapes(hidden_size: int) -> tuple[tuple[int], tuple[int]]:
    """Per-request state: the previous LF input (H) and the previous conv1 output (H/2)."""
    return (hidden_size,), (hidden_size // 2,)


def lf_state_dtypes(vllm_config: VllmConfig) -> tuple[torch.dtype, torch.dtype]:
    (dtype,) = MambaStateDtypeCalculator.short_conv_state_dtype(
        vllm_config.model_config.dtype, vllm_config.cache_config.mamba_cache_dtype
    )
    return dtype, dtype


# Prefix caching ("align" mode) copies a request's state from the block where a cached prefix ends into its
# running slot. Both states are whole-vector snapshots of one step, so the plain block copy (vLLM's "temporal"
# copy) is exact; the "conv" copy would slide a window we do not have.
LF_STATE_COPY_FUNCS = (get_temporal_copy_spec, get_temporal_copy_spec)


class LFConv(nn.Module):
    """One causal 2-tap dense convolution as a single GEMM: `[prev, cur] @ [Wp | Wc]^T + b`.

    The checkpoint holds the Conv1d weight [C_out, C_in, 2] (taps: t-1, t); it is stored here as [C_out, 2 C_in]
    = `[W[..., 0] | W[..., 1]]` so the GEMM reads a contiguous weight.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(out_features, 2 * in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        self.weight.weight_loader = self._load_conv_weight

    def _load_conv_weight(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        expected = (param.shape[0], self.in_features, 2)
        if tuple(loaded.shape) != expected:
            raise ValueError(
                f"LF-gate conv weight: expected a Conv1d weight of shape {list(expected)} [out, in, taps], got "
                f"{list(loaded.shape)}; is this folder a converted yuan_m32 model (`yuan-hf convert ...`)?"
            )
        param.data.copy_(torch.cat((loaded[..., 0], loaded[..., 1]), dim=1))

    def forward(self, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        # previous, current: [T, C_in] -> [T, C_out]
        return F.linear(torch.cat((previous, current), dim=-1), self.weight, self.bias)


def shift_one_token(x: torch.Tensor) -> torch.Tensor:
    """[T, C] -> [T, C] with row t = x[t-1] and row 0 = 0."""
    return F.pad(x[:-1], (0, 0, 1, 0))


class LFStepIndex:
    """Where each request's tokens of this step sit in the flat batch, and its state slot.

    starts / ends: [R] token index of each request's first / last token; slots: [R] state slot; has_state: [R]
    whether the slot holds the state of an earlier step (False for the first chunk of a prompt). Decode requests
    come first (one token each), then prefill requests (their chunks, `query_start_loc_p` apart).
    """

    def __init__(self, meta: ShortConvAttentionMetadata, device: torch.device):
        starts, ends, slots, has_state = [], [], [], []
        if meta.num_decodes > 0:
            # a decode-only batch under full CUDA graphs carries padded rows (slot NULL_BLOCK_ID): keep them all
            slots_d = meta.state_indices_tensor_d[:, 0]
            rows = torch.arange(slots_d.shape[0], device=device)
            starts.append(rows)
            ends.append(rows)
            slots.append(slots_d)
            has_state.append(torch.ones_like(rows, dtype=torch.bool))
        if meta.num_prefills > 0:
            offsets = meta.query_start_loc_p.to(torch.long) + meta.num_decode_tokens
            starts.append(offsets[:-1])
            ends.append(offsets[1:] - 1)
            slots.append(meta.state_indices_tensor_p[: meta.num_prefills])
            has_state.append(meta.has_initial_states_p[: meta.num_prefills])
        self.starts = torch.cat(starts)
        self.ends = torch.cat(ends)
        self.slots = torch.cat(slots).to(torch.long)
        self.has_state = torch.cat(has_state)[:, None]

    @classmethod
    def of(cls, meta: ShortConvAttentionMetadata, device: torch.device) -> LFStepIndex:
        """Built once per step: every LF layer of the step shares the same metadata object."""
        index = getattr(meta, "_yuan_lf_index", None)
        if index is None:
            index = cls(meta, device)
            meta._yuan_lf_index = index
        return index

    def previous(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """x: [T, C] this step's values; state: [slots, C] -> [T, C] the value one step earlier for every token."""
        carried = torch.where(self.has_state, state[self.slots], 0).to(x.dtype)  # never NaN from a fresh slot
        return shift_one_token(x).index_copy_(0, self.starts, carried)

    def save(self, x: torch.Tensor, state: torch.Tensor) -> None:
        state.index_copy_(0, self.slots, x[self.ends].to(state.dtype))


class YuanM32LFGate(MambaBase, nn.Module):
    """The LF gate with its decode state in vLLM's hybrid cache: `self.kv_cache = (prev_x [slots, H],
    prev_c1 [slots, H/2])`, bound by the model runner."""

    def __init__(
        self,
        *,
        hidden_size: int,
        rms_norm_eps: float,
        prefix: str = "",
    ):
        super().__init__()
        vllm_config = get_current_vllm_config()
        if vllm_config.num_speculative_tokens:
            raise NotImplementedError(
                "Yuan 2.0-M32 on vLLM: speculative decoding is not supported (the LF-gate state keeps one step per "
                "request, not one per draft token); run without --speculative-config"
            )
        self.hidden_size = hidden_size
        self.state_dtypes = lf_state_dtypes(vllm_config)
        self.conv1 = LFConv(hidden_size, hidden_size // 2)
        self.conv2 = LFConv(hidden_size // 2, hidden_size)
        self.output_layernorm = RMSNorm(hidden_size, eps=rms_norm_eps)
        self.prefix = prefix
        static = vllm_config.compilation_config.static_forward_context
        if prefix in static:
            raise ValueError(f"Duplicate layer name: {prefix}")
        static[prefix] = self
        self.kv_cache = (torch.tensor([]), torch.tensor([]))  # bound by the model runner (bind_kv_cache)

    # -- what vLLM reads to size and place the state ------------------------------------------------------------
    def get_state_shape(self) -> tuple[tuple[int], tuple[int]]:
        return lf_state_shapes(self.hidden_size)

    def get_state_dtype(self) -> tuple[torch.dtype, torch.dtype]:
        return self.state_dtypes

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.SHORT_CONV

    @property
    def is_kv_cache_tp_replicated(self) -> bool:
        return True  # the gate is replicated across tensor-parallel ranks, and so is its state

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        """hidden_states: [T, H] (input_layernorm output) -> writes the gate's output [T, H] into `output`."""
        torch.ops.vllm.yuan_lf_gate(hidden_states, output, self.prefix)

    def forward_impl(self, x: torch.Tensor, output: torch.Tensor) -> None:
        attn_metadata = get_forward_context().attn_metadata
        meta = attn_metadata.get(self.prefix) if isinstance(attn_metadata, dict) else None
        if meta is None:
            # profile / dummy run: no state slots; one sequence without history has the right shapes and cost
            c1 = self.conv1(shift_one_token(x), x)
            c2 = self.conv2(shift_one_token(c1), c1)
        else:
            index = LFStepIndex.of(meta, x.device)
            prev_x, prev_c1 = self.kv_cache
            c1 = self.conv1(index.previous(x, prev_x), x)  # [T, H/2]
            c2 = self.conv2(index.previous(c1, prev_c1), c1)  # [T, H]
            index.save(x, prev_x)
            index.save(c1, prev_c1)
        output.copy_(self.output_layernorm(c2 + x))


@eager_break_during_capture
def yuan_lf_gate(hidden_states: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    layer = get_forward_context().no_compile_layers[layer_name]
    layer.forward_impl(hidden_states, output)


def yuan_lf_gate_fake(hidden_states: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    return None


direct_register_custom_op(
    op_name=LF_GATE_OP_NAME, op_func=yuan_lf_gate, mutates_args=["output"], fake_impl=yuan_lf_gate_fake
)
