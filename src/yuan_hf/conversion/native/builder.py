"""The first step of the native sink: IEIT-HF-named tensors -> native ``yuan_m32`` tensors, every shape checked.

Both readers deliver IEIT-HF names: the IEIT-HF reader because that is its format, the Megatron reader
because its merge reproduces IEIT's own ``convert_hf_moe.py`` + ``concat.py`` (proved bitwise against
IEIT's HF checkpoint of the fixtures). So this one table (:data:`IEIT_KEYS`) and the small transforms
below are the only place where the native layout is produced.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ...modeling import YuanM32Config, YuanM32ForCausalLM
from ..common import ConversionError, KeyTable, tensor_digest

__all__ = ["IEIT_KEYS", "NativeStateBuilder", "conv2d_to_conv1d", "split_fused_qk", "split_gate_up"]


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



def split_gate_up(w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IEIT expert ``w1`` [2F, H] = ``[gate; up]`` -> ``gate_proj`` [F, H], ``up_proj`` [F, H]."""
    gate, up = w1.chunk(2, dim=0)
    return gate, up


def conv2d_to_conv1d(weight: torch.Tensor) -> torch.Tensor:
    """IEIT LF conv (Conv2d, kernel (2, 1)) [out, in, 2, 1] -> Conv1d [out, in, 2] (tap 0 = step t-1)."""
    return weight.squeeze(-1) if weight.ndim == 4 else weight


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

