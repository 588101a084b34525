"""LoRA presets for Yuan 2.0-M32, by module name.

The model's Linear layers (DESIGN.md section 5): attention `self_attn.{q,k,v,o}_proj`, per-expert SwiGLU
`mlp.experts.{e}.{gate,up,down}_proj`, the attention router `mlp.gate.{query,key,value}` (fp32, H -> E) and
`lm_head` (tied to the embeddings). The LF gate is two `nn.Conv1d` (`self_attn.lf_gate.conv1` / `conv2`): PEFT's
LoRA and DoRA for Conv1d adapt them when named (`extra_target_modules=("conv1", "conv2")`). Presets never touch
the router or `lm_head` unless asked: the router is small, fp32 and decides which experts see which tokens
(changing it through a low-rank update is rarely what one wants), and an adapter on a tied `lm_head` would untie
it (TRL's fused LM head also rejects it). PEFT's `target_modules="all-linear"` has no per-model exclusion list:
it adapts the router too unless `exclude_modules=ROUTER_TARGETS` is passed (`validate_lora_targets` warns).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

LoraPreset = Literal["attention", "experts", "all"]
RouterMode = Literal["frozen", "lora", "full"]

ATTENTION_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_TARGETS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
ROUTER_TARGETS: tuple[str, ...] = ("mlp.gate.query", "mlp.gate.key", "mlp.gate.value")
ROUTER_MODULE = "mlp.gate"  # trained in full through `modules_to_save` with router="full"
LORA_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION_TARGETS,
    "experts": EXPERT_TARGETS,
    "all": ATTENTION_TARGETS + EXPERT_TARGETS,
}
ROUTER_MODES: tuple[str, ...] = ("frozen", "lora", "full")


def lora_config(
    preset: LoraPreset = "all",
    *,
    r: int = 16,
    alpha: float | None = None,
    dropout: float = 0.05,
    router: RouterMode = "frozen",
    extra_target_modules: Sequence[str] = (),
    model: nn.Module | None = None,
    **lora_kwargs,
) -> LoraConfig:
    """A `peft.LoraConfig` for Yuan 2.0-M32.

    Args:
        preset: `"attention"` (q/k/v/o_proj), `"experts"` (gate/up/down_proj of every expert) or `"all"` (both).
        r: LoRA rank.
        alpha: LoRA alpha; defaults to `2 * r`.
        dropout: Dropout on the LoRA input.
        router: `"frozen"` (default: the router is not trained), `"lora"` (LoRA on `mlp.gate.{query,key,value}`,
            attention router only) or `"full"` (the router's full weights are trained and saved with the adapter,
            through PEFT's `modules_to_save`; about 3 x H x E parameters per layer).
        extra_target_modules: More module names (PEFT suffix matching), e.g. `("lm_head",)`.
        model: If given, every target is checked against the model's modules (see `validate_lora_targets`).
        **lora_kwargs: Passed to `LoraConfig` (e.g. `use_rslora=True`, `layers_to_transform=[...]`).

    Returns:
        A `LoraConfig` with `task_type="CAUSAL_LM"`.
    """
    if preset not in LORA_PRESETS:
        raise ValueError(f"lora_config: preset must be one of {tuple(LORA_PRESETS)}, got {preset!r}")
    if router not in ROUTER_MODES:
        raise ValueError(f"lora_config: router must be one of {ROUTER_MODES}, got {router!r}")
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"lora_config: r must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_config: dropout must be in [0, 1), got {dropout!r}")
    targets = list(LORA_PRESETS[preset]) + list(extra_target_modules)
    modules_to_save = list(lora_kwargs.pop("modules_to_save", None) or [])
    if router == "lora":
        targets += ROUTER_TARGETS
    elif router == "full":
        modules_to_save.append(ROUTER_MODULE)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=list(dict.fromkeys(targets)),
        modules_to_save=modules_to_save or None,
        bias="none",
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    if model is not None:
        validate_lora_targets(model, config)
    return config


def validate_lora_targets(model: nn.Module, config: LoraConfig) -> None:
    """Raise if any `target_modules` / `modules_to_save` entry matches no module of `model`.

    PEFT itself only fails when *no* target matches, so a misspelt entry next to a valid one would silently train
    less than asked. Matching uses PEFT's own rule (suffix after a dot, or a regex string).
    """
    names = [name for name, _ in model.named_modules() if name]
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":  # PEFT's shorthand: every Linear but the head
        _warn_if_all_linear_adapts_the_router(names, config)
        missing = []
    elif isinstance(targets, str):  # a regex string: it must match something as a whole
        missing = [] if any(check_target_module_exists(config, name) for name in names) else [targets]
    else:
        missing = []
        for target in sorted(targets or ()):
            probe = LoraConfig(target_modules=[target])
            if not any(check_target_module_exists(probe, name) for name in names):
                missing.append(target)
    for module in config.modules_to_save or ():
        if not any(name == module or name.endswith("." + module) for name in names):
            missing.append(f"{module} (modules_to_save)")
    if missing:
        linear_leaves = sorted(
            {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
        )
        raise ValueError(
            f"LoRA targets {missing} match no module of {type(model).__name__}. Linear module names there: "
            f"{linear_leaves}. Fix the names (presets: {tuple(LORA_PRESETS)}; the attention router is "
            f"{ROUTER_TARGETS}, a linear router has no Linear to adapt: use router='full')."
        )


def _warn_if_all_linear_adapts_the_router(names: list[str], config: LoraConfig) -> None:
    # PEFT's own matcher on a copy that targets the router: its exclude_modules / modules_to_save rules apply as is
    probe = copy.copy(config)
    probe.target_modules = set(ROUTER_TARGETS)
    kept = [name for name in names if check_target_module_exists(probe, name)]
    if kept:
        logger.warning(
            f"target_modules='all-linear' puts LoRA on the fp32 attention router too ({len(kept)} Linears such as "
            f"{kept[0]}); the yuan-hf presets keep it frozen. Pass exclude_modules={list(ROUTER_TARGETS)} to leave it "
            "out, or use lora_config('all') (router='lora' to adapt it on purpose)."
        )


def apply_lora(model: nn.Module, config: LoraConfig) -> PeftModel:
    """Check the targets against `model`, then wrap it with `peft.get_peft_model`.

    For QLoRA, call this after `load_for_qlora` (which already ran `prepare_model_for_kbit_training`).
    """
    validate_lora_targets(model, config)
    return get_peft_model(model, config)


__all__ = [
    "ATTENTION_TARGETS",
    "EXPERT_TARGETS",
    "LORA_PRESETS",
    "ROUTER_MODES",
    "ROUTER_TARGETS",
    "apply_lora",
    "lora_config",
    "validate_lora_targets",
]
