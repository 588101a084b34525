"""Fine-tuning Yuan 2.0-M32: LoRA / QLoRA presets, context extension, SFT data, MoE options, recipes.

Python API (works with `transformers.Trainer` and TRL's `SFTTrainer`)::

    from yuan_hf.finetune import lora_config, load_for_qlora, extend_context, SFTDataCollator

Command line: `yuan-hf finetune recipes/qlora_16k.yaml` (or `python -m yuan_hf.finetune ...`).
"""

from .checkpointing import activation_checkpointing_args
from .context import check_context_length, extend_context, ntk_rope_theta
from .data import (
    SFTDataCollator,
    SFTDataError,
    SFTDataset,
    SFTDataStats,
    build_sft_dataset,
    encode_chat,
    encode_ieit,
    pack_examples,
)
from .lora import apply_lora, lora_config, validate_lora_targets
from .moe import (
    ExpertLRMixin,
    YuanTrainer,
    configure_router_aux_loss,
    moe_param_groups,
    set_router_trainable,
)
from .quantization import QLORA_SKIP_MODULES, bnb_config, count_quantized_linears, load_for_qlora
from .recipe import Recipe, RecipeError, load_recipe
from .runner import finetune_main, run_recipe

__all__ = [
    "QLORA_SKIP_MODULES",
    "ExpertLRMixin",
    "Recipe",
    "RecipeError",
    "SFTDataCollator",
    "SFTDataError",
    "SFTDataStats",
    "SFTDataset",
    "YuanTrainer",
    "activation_checkpointing_args",
    "apply_lora",
    "bnb_config",
    "build_sft_dataset",
    "check_context_length",
    "configure_router_aux_loss",
    "count_quantized_linears",
    "encode_chat",
    "encode_ieit",
    "extend_context",
    "finetune_main",
    "load_for_qlora",
    "load_recipe",
    "lora_config",
    "moe_param_groups",
    "ntk_rope_theta",
    "pack_examples",
    "run_recipe",
    "set_router_trainable",
    "validate_lora_targets",
]
