"""Total and active parameter counts of a Yuan 2.0-M32 model (what a token passes through: top-k of E experts)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ParameterCount", "count_parameters", "count_config_parameters"]

EXPERT_PARAMETER = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.experts\.(\d+)\.")
EMBEDDING_PARAMETERS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class ParameterCount:
    total: int
    active: int  # per token: every non-expert parameter plus top_k / num_experts of the experts
    embeddings: int  # input embeddings, plus the LM head when it is not tied to them

    @property
    def active_without_embeddings(self) -> int:
        return self.active - self.embeddings

    def describe(self) -> str:
        """e.g. ``39.94B parameters, 3.70B active per token (3.43B without embeddings)``."""
        return (
            f"{_billions(self.total)} parameters, {_billions(self.active)} active per token "
            f"({_billions(self.active_without_embeddings)} without embeddings)"
        )


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n:,}"


def count_parameters(named_numels: Iterable[tuple[str, int]], *, top_k: int) -> ParameterCount:
    """Counts from ``(native name, number of elements)`` pairs, each tensor once (a tied LM head is absent or
    named once: pass ``model.named_parameters()``, which removes duplicates, or the tensors of a saved folder).
    Each layer's experts are counted from the names, so pruned models (fewer experts in some layers) count right:
    a token uses ``top_k`` of the layer's experts."""
    total = embeddings = 0
    expert_numels: dict[int, int] = defaultdict(int)  # layer -> parameters of all its experts
    experts: dict[int, set[str]] = defaultdict(set)  # layer -> expert indices
    for name, numel in named_numels:
        total += numel
        if match := EXPERT_PARAMETER.search(name):
            expert_numels[int(match[1])] += numel
            experts[int(match[1])].add(match[2])
        elif name in EMBEDDING_PARAMETERS:
            embeddings += numel
    inactive = sum(n - n * min(top_k, len(experts[layer])) // len(experts[layer]) for layer, n in expert_numels.items())
    return ParameterCount(total=total, active=total - inactive, embeddings=embeddings)


def count_config_parameters(config) -> ParameterCount:
    """Counts for a `YuanM32Config`, from a model built on the meta device (no memory, exact shapes)."""
    import torch

    from .modeling import YuanM32ForCausalLM

    with torch.device("meta"):
        model = YuanM32ForCausalLM(config)
    return count_parameters(((name, p.numel()) for name, p in model.named_parameters()), top_k=config.num_experts_per_tok)
