"""MoE training options: router aux loss, router freezing, expert-specific learning rates.

Expert learning-rate scaling follows Hunyuan-Large's observation: with top-k of E routed experts, each expert
sees on average only k/E of the tokens that shared parameters (attention, norms, router) see, i.e. a k/E times
smaller effective batch. Under Adam the best learning rate grows roughly like the square root of the batch size in
the small-batch regime (the batch-size relation Hunyuan-Large derives its expert rate from), which gives the
default `expert_lr = lr * sqrt(top_k / num_experts)`: 0.25 x for Yuan 2.0-M32 (top-2 of 32). It is a heuristic,
so the recipes keep IEIT's single learning rate (`expert_lr_scale: 1.0`) and "auto" is opt-in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn
from transformers import PretrainedConfig, Trainer
from transformers.utils import logging

logger = logging.get_logger(__name__)

EXPERT_PARAM_MARKER = ".mlp.experts."
ROUTER_PARAM_MARKER = ".mlp.gate."
ExpertLRScale = float | Literal["auto"]


def _config_of(model_or_config: nn.Module | PretrainedConfig) -> PretrainedConfig:
    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config
    return model_or_config.config


def configure_router_aux_loss(model_or_config: nn.Module | PretrainedConfig, coef: float) -> None:
    """Turn the load-balancing aux loss on (`coef > 0`) or off (`coef == 0`, IEIT's setting and the default).

    Sets `config.output_router_logits = coef > 0` and `config.router_aux_loss_coef = coef`; the model then adds
    `coef * aux_loss` to the LM loss (TRL's SFTTrainer reads the same two fields).
    """
    if not isinstance(coef, (int, float)) or isinstance(coef, bool) or coef < 0:
        raise ValueError(f"router aux loss coefficient must be a number >= 0, got {coef!r}")
    config = _config_of(model_or_config)
    config.output_router_logits = coef > 0
    config.router_aux_loss_coef = float(coef)


def set_router_trainable(model: nn.Module, trainable: bool) -> int:
    """Freeze (`False`) or unfreeze (`True`) every router parameter (`*.mlp.gate.*`) of a full fine-tune.

    With LoRA, use `lora_config(router=...)` instead: PEFT freezes all base weights. Returns the number of router
    parameter tensors changed; raises if the model has none.
    """
    changed = 0
    for name, param in model.named_parameters():
        if ROUTER_PARAM_MARKER in f".{name}" and "lora_" not in name:
            param.requires_grad_(trainable)
            changed += 1
    if not changed:
        raise ValueError(f"set_router_trainable: {type(model).__name__} has no parameter named '*.mlp.gate.*'")
    return changed


def expert_lr_scale_value(config: PretrainedConfig, scale: ExpertLRScale) -> float:
    """Resolve `"auto"` to `sqrt(num_experts_per_tok / num_experts)` (mean count over layers when they differ);
    check a number is positive."""
    if scale == "auto":
        counts = config.num_experts if isinstance(config.num_experts, list) else [config.num_experts]  # list: pruned
        return math.sqrt(config.num_experts_per_tok / (sum(counts) / len(counts)))
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
        raise ValueError(f"expert_lr_scale must be a positive number or 'auto', got {scale!r}")
    return float(scale)


def is_expert_parameter(name: str) -> bool:
    """True for parameters of routed experts (base weights and their LoRA adapters)."""
    return EXPERT_PARAM_MARKER in f".{name}"


def moe_param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    expert_lr_scale: ExpertLRScale = "auto",
    decay_parameter_names: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with expert parameters at `lr * expert_lr_scale`.

    Only trainable parameters are included. Groups (empty ones dropped), each with `name`, `lr`, `weight_decay`:
    `experts` / `experts_no_decay` / `shared` / `shared_no_decay`.

    Args:
        model: The (possibly PEFT-wrapped) model.
        lr: Base learning rate (shared parameters).
        weight_decay: Applied to `decay_parameter_names`.
        expert_lr_scale: Multiplier for expert parameters, or `"auto"` = `sqrt(top_k / num_experts)`.
        decay_parameter_names: Names that get weight decay; default: every parameter with 2+ dimensions
            (norm weights and biases get none). `Trainer.get_decay_parameter_names(model)` fits here.

    Example:
        `optimizer = torch.optim.AdamW(moe_param_groups(model, lr=1e-4))`, then
        `Trainer(..., optimizers=(optimizer, None))` (the Trainer builds the scheduler on top).
    """
    scale = expert_lr_scale_value(_config_of(model), expert_lr_scale)
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if not named:
        raise ValueError(f"moe_param_groups: {type(model).__name__} has no trainable parameter")
    if decay_parameter_names is None:
        decay = {name for name, param in named if param.ndim >= 2}
    else:
        decay = set(decay_parameter_names)
    buckets: dict[str, list[torch.nn.Parameter]] = {
        "experts": [], "experts_no_decay": [], "shared": [], "shared_no_decay": []
    }  # fmt: skip
    for name, param in named:
        key = ("experts" if is_expert_parameter(name) else "shared") + ("" if name in decay else "_no_decay")
        buckets[key].append(param)
    groups = []
    for key, params in buckets.items():
        if params:
            groups.append(
                {
                    "name": key,
                    "params": params,
                    "lr": lr * scale if key.startswith("experts") else lr,
                    "weight_decay": weight_decay if not key.endswith("no_decay") else 0.0,
                }
            )
    return groups


class ExpertLRMixin:
    """Trainer mixin: builds the optimizer from `moe_param_groups` (expert parameters at `lr * expert_lr_scale`).

    Works with `transformers.Trainer` and TRL's `SFTTrainer` (`class T(ExpertLRMixin, SFTTrainer)`): the
    optimizer class and its other options still come from `TrainingArguments` (`optim`, betas, eps, ...).
    """

    expert_lr_scale: ExpertLRScale = "auto"

    def __init__(self, *args: Any, expert_lr_scale: ExpertLRScale = "auto", **kwargs: Any):
        self.expert_lr_scale = expert_lr_scale
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        groups = moe_param_groups(
            opt_model,
            lr=self.args.learning_rate,
            weight_decay=self.args.weight_decay,
            expert_lr_scale=self.expert_lr_scale,
            decay_parameter_names=self.get_decay_parameter_names(opt_model),
        )
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
        unsupported = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
        if unsupported:
            raise ValueError(
                f"expert learning-rate scaling needs a plain torch-style optimizer, but optim={self.args.optim!r} "
                f"builds its own parameter groups ({sorted(unsupported)}); use e.g. optim='adamw_torch'"
            )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        logger.info(
            "expert learning rates: "
            + ", ".join(f"{g['name']}: {len(g['params'])} tensors at lr {g['lr']:.3g}" for g in groups)
        )
        return self.optimizer


class YuanTrainer(ExpertLRMixin, Trainer):
    """`transformers.Trainer` with expert-specific learning rates (`expert_lr_scale=1.0` = plain Trainer)."""


__all__ = [
    "ExpertLRMixin",
    "YuanTrainer",
    "configure_router_aux_loss",
    "expert_lr_scale_value",
    "is_expert_parameter",
    "moe_param_groups",
    "set_router_trainable",
]
