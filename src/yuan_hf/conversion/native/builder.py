"""The first step of the native sink: IEIT-HF-named tensors -> native ``yuan_m32`` tensors, every shape checked.

Both readers deliver IEIT-HF names: the IEIT-HF reader because that is its format, the Megatron reader
because its merge reproduces IEIT's own ``convert_hf_moe.py`` + ``concat.py`` (proved bitwise against
IEIT's HF checkpoint of the fixtures). So this one table (:data:`IEIT_KEYS`) and the small transforms
below are the only place where the native layout is produced.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping

import torch

from ...modeling import YuanM32Config, YuanM32ForCausalLM
from ..common import ConversionError, KeyTable, tensor_digest

__all__ = ["IEIT_CONFIG_FIELDS", "IEIT_KEYS", "ConversionWarning", "NativeStateBuilder", "SHAPE_FIELDS", "conv2d_to_conv1d", "split_fused_qk", "split_gate_up"]


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


# Which config field sets each dimension of a native tensor (matched on the key's ending), so that a
# config contradicting the tensors is reported by the field's name. "projection" = heads x head_dim.
SHAPE_FIELDS: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    ("embed_tokens.weight", ("vocab_size", "hidden_size")),
    ("lm_head.weight", ("vocab_size", "hidden_size")),
    ("layernorm.weight", ("hidden_size",)),
    ("norm.weight", ("hidden_size",)),
    ("self_attn.q_proj.weight", ("projection", "hidden_size")),
    ("self_attn.k_proj.weight", ("projection", "hidden_size")),
    ("self_attn.v_proj.weight", ("projection", "hidden_size")),
    ("self_attn.o_proj.weight", ("hidden_size", "projection")),
    ("lf_gate.conv1.weight", ("hidden_size", "hidden_size", None)),
    ("lf_gate.conv1.bias", ("hidden_size",)),
    ("lf_gate.conv2.weight", ("hidden_size", "hidden_size", None)),
    ("lf_gate.conv2.bias", ("hidden_size",)),
    ("mlp.gate.query.weight", ("num_experts", "hidden_size")),
    ("mlp.gate.key.weight", ("num_experts", "hidden_size")),
    ("mlp.gate.value.weight", ("num_experts", "hidden_size")),
    ("mlp.gate.weight", ("num_experts", "hidden_size")),
    ("gate_proj.weight", ("moe_intermediate_size", "hidden_size")),
    ("up_proj.weight", ("moe_intermediate_size", "hidden_size")),
    ("down_proj.weight", ("hidden_size", "moe_intermediate_size")),
)

# The native fields above under their names in IEIT's config.json (the default source of a config).
IEIT_CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "projection": "attention_projection_size",
    "num_experts": "moe_config.moe_num_experts",
    "moe_intermediate_size": "moe_config.ffn_hidden_size",
    "num_hidden_layers": "num_hidden_layers",
}


class ConversionWarning(UserWarning):
    """Converted weights that load but are probably wrong (NaN/Inf, values beyond the output dtype)."""


class NativeStateBuilder:
    """Turns IEIT tensors (in any order, shard by shard) into native tensors, checking every shape and value.

    Tensors that need a partner (q/k halves) wait in ``pending`` until it arrives. ``config_fields`` maps the
    native size names of :data:`SHAPE_FIELDS` to the names the source uses (``config_source`` says where they
    are), so a contradiction between config and tensors names the field to fix. Non-finite values, and finite
    values that overflow a float16 output, are collected and reported once by :meth:`finish` as a
    :class:`ConversionWarning` (and in ``notes``, when given).
    """

    def __init__(
        self,
        config: YuanM32Config,
        *,
        dtype: torch.dtype | None,
        config_fields: Mapping[str, str] = IEIT_CONFIG_FIELDS,
        config_source: str = "config.json",
        notes: list[str] | None = None,
    ):
        self.config = config
        self.dtype = dtype
        self.config_fields = dict(config_fields)
        self.config_source = config_source
        self.notes = notes
        with torch.device("meta"):
            reference = YuanM32ForCausalLM(config)
        self.expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
        if config.tie_word_embeddings:
            self.expected.pop("lm_head.weight", None)
        self.produced: set[str] = set()
        self.pending: dict[str, torch.Tensor] = {}
        self.non_finite: list[str] = []
        self.overflow: list[str] = []
        # digests, not tensors: keeping the [V, H] embedding alive would cost a shard's worth of memory
        self.embedding_digest: str | None = None
        self.lm_head_digest: str | None = None

    def _size(self, field: str) -> int:
        if field == "projection":
            return self.config.num_attention_heads * self.config.head_dim
        return getattr(self.config, field)

    def _field(self, field: str) -> str:
        return f"{self.config_fields.get(field, field)}={self._size(field)} in {self.config_source}"

    def _unknown_target(self, name: str, source: str) -> ConversionError:
        numbers = [int(n) for n in re.findall(r"\.(\d+)\.", name)]
        if numbers and numbers[0] >= self.config.num_hidden_layers:
            return ConversionError(f"{self._field('num_hidden_layers')}, but the checkpoint has {source} (layer {numbers[0]})")
        if len(numbers) > 1 and ".experts." in name and numbers[1] >= self.config.num_experts:
            return ConversionError(f"{self._field('num_experts')}, but the checkpoint has {source} (expert {numbers[1]})")
        return ConversionError(f"{source} maps to {name}, which the model described by {self.config_source} does not have")

    def _shape_error(self, name: str, shape: tuple[int, ...], source: str) -> ConversionError:
        expected = self.expected[name]
        fields = next((f for suffix, f in SHAPE_FIELDS if name.endswith(suffix)), ())
        for dim, (got, want) in enumerate(zip(shape, expected)):
            field = fields[dim] if dim < len(fields) else None
            if got != want and field is not None:
                what = "rows" if dim == 0 else "columns" if dim == 1 else f"entries along dim {dim}"
                return ConversionError(
                    f"{self._field(field)}, but {source} has {got} {what} (expected {want}; "
                    f"shape {list(shape)} vs {list(expected)} for {name}): fix {self.config_fields.get(field, field)}"
                )
        return ConversionError(f"{source} has shape {list(shape)} but {self.config_source} implies {list(expected)} for {name}")

    def _check_values(self, name: str, source: torch.Tensor, out: torch.Tensor) -> None:
        if not out.is_floating_point() or out.numel() == 0 or out.device.type == "meta":
            return
        if bool(torch.isfinite(out).all()):
            return
        if bool(torch.isfinite(source).all()):
            self.overflow.append(name)  # finite before the cast: the values exceed the output dtype's range
        else:
            self.non_finite.append(name)

    def _emit(self, name: str, tensor: torch.Tensor, source: str) -> tuple[str, torch.Tensor]:
        if name not in self.expected:
            raise self._unknown_target(name, source)
        if tuple(tensor.shape) != self.expected[name]:
            raise self._shape_error(name, tuple(tensor.shape), source)
        self.produced.add(name)
        out = tensor.to(self.dtype) if self.dtype is not None else tensor
        self._check_values(name, tensor, out)
        return name, out

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
        self._report_values()
        if self.lm_head_digest is not None and self.embedding_digest is not None:
            if self.lm_head_digest != self.embedding_digest:
                raise ConversionError(
                    "lm_head.weight differs from model.embed_tokens.weight although the config ties them "
                    "(tie_word_embeddings true); set tie_word_embeddings to false in config.json if the checkpoint is untied"
                )

    def _report_values(self) -> None:
        problems = []
        if self.non_finite:
            problems.append(f"{len(self.non_finite)} tensor(s) hold NaN or Inf: {_names(self.non_finite)}")
        if self.overflow:
            problems.append(
                f"{len(self.overflow)} tensor(s) hold values beyond {self.dtype} and became Inf: {_names(self.overflow)} "
                "(convert with --dtype bfloat16 or float32)"
            )
        for problem in problems:
            warnings.warn(problem, ConversionWarning, stacklevel=2)
            if self.notes is not None:
                self.notes.append("WARNING: " + problem)


def _names(names: list[str]) -> str:
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
