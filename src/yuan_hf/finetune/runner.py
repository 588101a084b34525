"""Run a recipe: load (quantized) model and tokenizer, extend the context, add LoRA, build data, train, report.

`yuan-hf finetune recipe.yaml [key=value ...]`, `python -m yuan_hf.finetune recipe.yaml`, and the same under
`torchrun --nproc_per_node N -m yuan_hf.finetune ...` or `accelerate launch -m yuan_hf.finetune ...` (data
parallel; the Trainer shards the rows). Writes the adapter (or full model), the tokenizer and
`finetune_metrics.json` (loss before/after on fixed probe rows, tokens/s, peak memory) to `train.output_dir`.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed
from transformers.utils import logging

from .context import check_context_length, extend_context
from .data import IGNORE_INDEX, SFTDataCollator, build_sft_dataset
from .lora import apply_lora, lora_config
from .moe import YuanTrainer, configure_router_aux_loss, set_router_trainable
from .quantization import load_for_qlora
from .recipe import Recipe, RecipeError, load_recipe

logger = logging.get_logger(__name__)

MOE_LEAF_MODULE = "YuanM32SparseMoeBlock"  # DeepSpeed ZeRO-3 must gather the whole MoE block at once
METRICS_FILE = "finetune_metrics.json"


def training_arguments(recipe: Recipe) -> TrainingArguments:
    """`TrainingArguments` from `recipe.train`, with the defaults these recipes rely on (set only if absent):
    `remove_unused_columns=False` (rows carry `position_ids`), non-reentrant gradient checkpointing,
    `include_num_input_tokens_seen="all"` (tokens/s), `seed=recipe.seed`."""
    values = dict(recipe.train)
    values.setdefault("remove_unused_columns", False)
    values.setdefault("include_num_input_tokens_seen", "all")
    values.setdefault("seed", recipe.seed)
    # in training every expert runs (empty ones too), so DDP never meets an unused parameter
    values.setdefault("ddp_find_unused_parameters", False)
    if values.get("gradient_checkpointing"):
        values.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    if values.get("deepspeed"):
        # accelerate marks these classes as ZeRO-3 leaf modules (deepspeed.utils.set_z3_leaf_modules)
        os.environ.setdefault("ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES", MOE_LEAF_MODULE)
    args = TrainingArguments(**values)
    plugin = getattr(args, "deepspeed_plugin", None)
    if (
        plugin is not None
        and plugin.zero_stage == 3
        and recipe.method != "full"
        and args.gradient_checkpointing
        and "gradient_checkpointing_kwargs" not in recipe.train
    ):
        # PEFT + ZeRO-3 needs reentrant checkpointing (deepspeedai/DeepSpeed#8072, huggingface/trl#2514)
        logger.warning("DeepSpeed ZeRO-3 with LoRA: using reentrant gradient checkpointing")
        args.gradient_checkpointing_kwargs = {"use_reentrant": True}
    return args


def load_config(recipe: Recipe) -> Any:
    """The checkpoint's config with the recipe's context, loss-chunk and router aux-loss settings applied."""
    config = AutoConfig.from_pretrained(recipe.model.path, revision=recipe.model.revision)
    if recipe.context.target_length:
        extend_context(
            config,
            recipe.context.target_length,
            method=recipe.context.method,
            original_length=recipe.context.original_length,
        )
    if recipe.model.loss_chunk_size is not None:
        config.loss_chunk_size = recipe.model.loss_chunk_size
    configure_router_aux_loss(config, recipe.moe.router_aux_loss_coef)
    config.use_cache = False
    check_context_length(config, recipe.data.max_length, where="recipe data.max_length")
    return config


def load_model(recipe: Recipe, config: Any, args: TrainingArguments) -> nn.Module:
    """Base model per `recipe.method`, with LoRA for lora / qlora and the router frozen or trained."""
    if recipe.method == "qlora":
        q = recipe.quantization
        model = load_for_qlora(
            recipe.model.path,
            bits=q.bits,
            quant_type=q.quant_type,
            double_quant=q.double_quant,
            compute_dtype=q.compute_dtype,
            quant_storage=q.quant_storage,
            gradient_checkpointing=bool(args.gradient_checkpointing),
            attn_implementation=recipe.model.attn_implementation,
            config=config,
            revision=recipe.model.revision,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            recipe.model.path,
            config=config,
            dtype=recipe.model.dtype,
            attn_implementation=recipe.model.attn_implementation,
            revision=recipe.model.revision,
        )
    if recipe.method == "full":
        set_router_trainable(model, recipe.moe.router == "full")
        return model
    lora = recipe.lora
    peft_config = lora_config(
        lora.preset,
        r=lora.r,
        alpha=lora.alpha,
        dropout=lora.dropout,
        router=recipe.moe.router,
        extra_target_modules=lora.extra_target_modules,
    )
    model = apply_lora(model, peft_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        f"LoRA ({lora.preset}, r={lora.r}, router {recipe.moe.router}): {trainable:,} of {total:,} parameters train"
    )
    return model


@torch.no_grad()
def probe_loss(model: nn.Module, rows: list[dict[str, list[int]]], collator: SFTDataCollator) -> float:
    """Token-weighted mean LM loss over `rows` (one row per forward), in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for row in rows:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator([row]).items()}
        targets = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
        if targets:
            total += float(model(**batch).loss) * targets
            count += targets
    model.train(was_training)
    return total / count if count else float("nan")


def _peak_memory() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "torch.cuda.max_memory_allocated"
    # Linux reports ru_maxrss in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS (ru_maxrss)"


def _rank_checksums(model: nn.Module) -> list[float]:
    """Sum of the trainable parameters on every rank (equal after data-parallel training)."""
    local = float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [local]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    return gathered


def run_recipe(recipe: Recipe) -> dict[str, Any]:
    """Train as the recipe says; returns (and on rank 0 writes) the metrics."""
    set_seed(recipe.seed)
    args = training_arguments(recipe)
    tokenizer = AutoTokenizer.from_pretrained(
        recipe.model.tokenizer or recipe.model.path, revision=recipe.model.revision
    )
    config = load_config(recipe)
    model = load_model(recipe, config, args)
    if args.gradient_checkpointing and (args.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
        model.enable_input_require_grads()  # reentrant checkpointing only backpropagates into inputs that need grad
    data = recipe.data
    build = dict(
        max_length=data.max_length,
        packing=data.packing,
        overlong=data.overlong,
        on_malformed=data.on_malformed,
        format=data.format,
    )
    with args.main_process_first(desc="tokenizing the SFT data"):
        train_dataset = build_sft_dataset(data.train_file, tokenizer, **build)
        eval_dataset = build_sft_dataset(data.eval_file, tokenizer, **build) if data.eval_file else None
    collator = SFTDataCollator.from_tokenizer(tokenizer, padding_free=True)
    trainer = YuanTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        expert_lr_scale=recipe.moe.expert_lr_scale,
    )
    probe = (eval_dataset or train_dataset).rows[: data.probe_rows]
    loss_before = probe_loss(trainer.model, probe, collator)
    result = trainer.train()
    loss_after = probe_loss(trainer.model, probe, collator)
    trainer.save_model(args.output_dir)
    peak, peak_kind = _peak_memory()
    runtime = result.metrics.get("train_runtime", float("nan"))
    tokens = trainer.state.num_input_tokens_seen
    metrics = {
        "method": recipe.method,
        "model": recipe.model.path,
        "world_size": args.world_size,
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "probe_loss_before": loss_before,
        "probe_loss_after": loss_after,
        "probe_rows": len(probe),
        "tokens_seen": tokens,
        "train_runtime_s": runtime,
        "tokens_per_s": tokens / runtime if runtime and not math.isnan(runtime) else None,
        "peak_memory_gib": peak,
        "peak_memory_kind": peak_kind,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "rank_param_checksums": _rank_checksums(trainer.model),
        "data": train_dataset.stats.summary(),
        "rope_parameters": dict(config.rope_parameters),
        "max_position_embeddings": config.max_position_embeddings,
    }
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
        Path(args.output_dir, METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        logger.warning(
            f"finetune done: probe loss {loss_before:.4f} -> {loss_after:.4f}, {metrics['tokens_per_s'] or 0:.0f} "
            f"tokens/s, peak memory {peak:.2f} GiB ({peak_kind}); saved to {args.output_dir}"
        )
    return metrics


def finetune_main(recipe_path: str, overrides: list[str] | None = None) -> int:
    """Entry point for `yuan-hf finetune RECIPE [key=value ...]`; returns a process exit code."""
    try:
        recipe = load_recipe(recipe_path, overrides)
    except RecipeError as error:
        print(f"yuan-hf finetune: {error}", file=sys.stderr)
        return 2
    run_recipe(recipe)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m yuan_hf.finetune RECIPE [key=value ...]` (also under torchrun / accelerate launch)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m yuan_hf.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/qlora_16k.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=10")
    options = parser.parse_args(argv)
    return finetune_main(options.recipe, options.overrides)


__all__ = ["finetune_main", "load_config", "load_model", "main", "probe_loss", "run_recipe", "training_arguments"]
