"""Run a recipe: load (quantized) model and tokenizer, extend the context, add LoRA, build data, train, report.

`yuan-hf finetune recipe.yaml [key=value ...]`, `python -m yuan_hf.finetune recipe.yaml`, and the same under
`torchrun --nproc_per_node N -m yuan_hf.finetune ...` or `accelerate launch -m yuan_hf.finetune ...` (data
parallel; the Trainer shards the rows). Writes the adapter (or full model), the tokenizer and
`finetune_metrics.json` (loss before/after on fixed probe rows, tokens/s, peak memory) to `train.output_dir`.

Before anything loads, `preflight` checks what the recipe points at (model folder, data files, an output folder
apart from the base model, bfloat16 support) and picks the checkpoint to resume from; the data is tokenized before
the model loads, so a bad data file fails in seconds, not after loading 40B parameters.
"""

from __future__ import annotations

import contextlib
import json
import logging as pylogging
import math
import os
import re
import resource
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.utils import is_torch_bf16_gpu_available, logging

from .checkpointing import checkpointing_fields, checkpointing_under_installed_names
from .checkpoints import TRAINER_STATE, checkpoint_problem, list_checkpoints, newest_complete_checkpoint
from .context import check_context_length, extend_context
from .data import IGNORE_INDEX, SFTDataCollator, SFTDataError, build_sft_dataset
from .lora import apply_lora, lora_config
from .moe import YuanTrainer, configure_router_aux_loss, set_router_trainable
from .quantization import load_for_qlora
from .recipe import Recipe, RecipeError, load_recipe

logger = logging.get_logger(__name__)

MOE_LEAF_MODULE = "YuanM32SparseMoeBlock"  # DeepSpeed ZeRO-3 must gather the whole MoE block at once
METRICS_FILE = "finetune_metrics.json"


# ------------------------------------------------------------------------------------------------------ preflight

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # `name` or `org/name`


def _local_folder(path: str) -> Path | None:
    """The local folder `path` names, or None for a Hub id (`name` / `org/name` that is not a local folder)."""
    if os.path.isdir(path) or not _HUB_ID.match(path):
        return Path(path).expanduser()
    return None


def _check_model_folders(recipe: Recipe) -> dict[str, Path]:
    """The local base model / tokenizer folders by recipe key; missing folders are errors."""
    folders = {}
    model = _local_folder(recipe.model.path)
    if model is not None:
        if not model.is_dir():
            raise RecipeError(
                f"model folder not found: {recipe.model.path} (recipe key model.path: a native yuan_m32 folder, "
                "e.g. written by `yuan-hf convert ieit-hf`, or a Hub id)"
            )
        if not (model / "config.json").is_file():
            raise RecipeError(
                f"model folder {recipe.model.path} has no config.json (recipe key model.path): expected a native "
                "yuan_m32 checkpoint folder"
            )
        folders["model.path"] = model
    tokenizer = _local_folder(recipe.model.tokenizer) if recipe.model.tokenizer else None
    if tokenizer is not None:
        if not tokenizer.is_dir():
            raise RecipeError(f"tokenizer folder not found: {recipe.model.tokenizer} (recipe key model.tokenizer)")
        folders["model.tokenizer"] = tokenizer
    return folders


def _check_data_files(recipe: Recipe) -> None:
    for key, path in (("data.train_file", recipe.data.train_file), ("data.eval_file", recipe.data.eval_file)):
        if path is None:
            continue
        if os.path.isdir(path):
            raise RecipeError(f"recipe key {key}: {path} is a folder; expected a JSONL file")
        if not os.path.isfile(path):
            raise RecipeError(f"data file not found: {path} (recipe key {key})")


def _check_output_dir(recipe: Recipe, folders: dict[str, Path]) -> None:
    """The run writes adapter, README, tokenizer, checkpoints and metrics to output_dir: never into a base folder."""
    output_dir = recipe.train["output_dir"]
    out = Path(output_dir).expanduser().resolve()
    for key, folder in folders.items():
        base = folder.resolve()
        relation = (
            "is" if out == base else "is inside" if base in out.parents else "contains" if out in base.parents else ""
        )
        if relation:
            raise RecipeError(
                f"train.output_dir {output_dir} {relation} the folder of {key} ({folder}): the run would write its "
                "adapter, README, tokenizer, checkpoints and metrics into the base model, which would then load as a "
                "different model; choose a train.output_dir outside it"
            )


def _gpu_without_bf16(use_cpu: bool) -> str | None:
    """What lacks bfloat16 where training would run, or None: CPUs (torch has bf16 kernels) and Ampere+ GPUs are fine.

    A CUDA GPU counts only with native bf16 (compute capability >= 8.0; torch's default check also accepts
    emulation, e.g. on a V100, which is far slower). Without any GPU and without `use_cpu`, TrainingArguments
    refuses bf16 itself.
    """
    if use_cpu:
        return None
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return None
        major, minor = torch.cuda.get_device_capability()
        return f"the GPU ({torch.cuda.get_device_name()}, compute capability {major}.{minor}) has no native bfloat16"
    if is_torch_bf16_gpu_available():  # other accelerators transformers accepts (XPU, MPS, NPU, ...)
        return None
    return "no GPU was found"


def _check_bf16(recipe: Recipe) -> None:
    problem = _gpu_without_bf16(bool(recipe.train.get("use_cpu")))
    if problem is None:
        return
    if problem == "no GPU was found":  # bf16 weights are fine on the CPU; only the Trainer's bf16 flag is refused
        if recipe.train.get("bf16"):
            raise RecipeError(
                "recipe key train.bf16 is true but no GPU was found: set train.use_cpu=true to train on the CPU "
                "(bf16 works there), or train.bf16=false"
            )
        return
    weights = ("quantization.compute_dtype", recipe.quantization.compute_dtype) if recipe.method == "qlora" else (
        "model.dtype", recipe.model.dtype
    )  # fmt: skip
    fixes = ["train.bf16=false"] if recipe.train.get("bf16") else []
    if weights[1] == "bfloat16":
        fixes.append(f"{weights[0]}=float32")
    if fixes:
        raise RecipeError(f"{problem}, but the recipe asks for bfloat16: set {' and '.join(fixes)}")


def _resume_checkpoint(recipe: Recipe) -> str | None:
    """The checkpoint `train.resume_from_checkpoint` names (true: the newest complete one in output_dir), or None."""
    output_dir = recipe.train["output_dir"]
    value = recipe.train.get("resume_from_checkpoint")
    if value is None or value is False:
        existing = [p.name for p in list_checkpoints(output_dir)]
        if existing:
            raise RecipeError(
                f"train.output_dir {output_dir} already holds checkpoints of an earlier run ({', '.join(existing)}); "
                "set train.resume_from_checkpoint=true to continue that run, or choose another train.output_dir "
                "(a new run would overwrite them)"
            )
        return None
    if value is True:
        found, skipped = newest_complete_checkpoint(output_dir)
        for folder, problem in skipped.items():
            logger.warning(f"not resuming from {folder}: {problem}")
        if found is None:
            why = "; ".join(f"{p.name}: {problem}" for p, problem in skipped.items()) or "no checkpoint-N folder"
            raise RecipeError(
                f"train.resume_from_checkpoint is true but {output_dir} holds no complete checkpoint ({why}); "
                "remove train.resume_from_checkpoint to start from step 0"
            )
        return str(found)
    folder = Path(value)
    if not folder.is_dir() and (Path(output_dir) / value).is_dir():  # `checkpoint-200` names one in output_dir
        folder = Path(output_dir) / value
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise RecipeError(f"recipe key train.resume_from_checkpoint: cannot resume from {value}: {problem}")
    return str(folder)


def preflight(recipe: Recipe) -> str | None:
    """Check what the recipe points at before anything loads; return the checkpoint to resume from (or None).

    Raises `RecipeError` (one line, naming the recipe key) for: a missing local model / tokenizer folder or data
    file, a `train.output_dir` that is, is inside or contains the base model folder, bfloat16 on hardware without it,
    checkpoints already in `output_dir` without `train.resume_from_checkpoint`, or nothing complete to resume from.
    """
    folders = _check_model_folders(recipe)
    _check_data_files(recipe)
    _check_output_dir(recipe, folders)
    _check_bf16(recipe)
    return _resume_checkpoint(recipe)


# ------------------------------------------------------------------------------------------------------- loading


def training_arguments(recipe: Recipe, *, resume_from_checkpoint: str | None = None) -> TrainingArguments:
    """`TrainingArguments` from `recipe.train`, with the defaults these recipes rely on (set only if absent):
    `remove_unused_columns=False` (rows carry `position_ids`), non-reentrant gradient checkpointing,
    `include_num_input_tokens_seen="all"` (tokens/s), `seed=recipe.seed`. `resume_from_checkpoint` (the folder
    `preflight` picked) replaces the recipe's true/false: the Trainer itself does not read this field."""
    values = checkpointing_under_installed_names(recipe.train, "recipe section train")
    flag, kwargs_field = checkpointing_fields()
    set_by_recipe = set(values)
    values["resume_from_checkpoint"] = resume_from_checkpoint
    values.setdefault("remove_unused_columns", False)
    values.setdefault("include_num_input_tokens_seen", "all")
    values.setdefault("seed", recipe.seed)
    # in training every expert runs (empty ones too), so DDP never meets an unused parameter
    values.setdefault("ddp_find_unused_parameters", False)
    if values.get(flag):
        values.setdefault(kwargs_field, {"use_reentrant": False})
    if values.get("deepspeed"):
        # accelerate marks these classes as ZeRO-3 leaf modules (deepspeed.utils.set_z3_leaf_modules)
        os.environ.setdefault("ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES", MOE_LEAF_MODULE)
    args = TrainingArguments(**values)
    plugin = getattr(args, "deepspeed_plugin", None)
    if (
        plugin is not None
        and plugin.zero_stage == 3
        and recipe.method != "full"
        and getattr(args, flag)
        and kwargs_field not in set_by_recipe
    ):
        # PEFT + ZeRO-3 needs reentrant checkpointing (deepspeedai/DeepSpeed#8072, huggingface/trl#2514); set under
        # the name the Trainer reads (on 5.25 the old alias is only mirrored at construction)
        logger.warning("DeepSpeed ZeRO-3 with LoRA: using reentrant gradient checkpointing")
        setattr(args, kwargs_field, {"use_reentrant": True})
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
            gradient_checkpointing=bool(getattr(args, checkpointing_fields()[0])),
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
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the parameters they hold, not the packed bytes."""
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT's count unpacks bitsandbytes' 4-bit storage
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


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


def _tokens_in_checkpoint(checkpoint: str | None) -> int:
    if checkpoint is None:
        return 0
    state = json.loads(Path(checkpoint, TRAINER_STATE).read_text(encoding="utf-8"))
    return int(state.get("num_input_tokens_seen") or 0)


def run_recipe(recipe: Recipe, *, callbacks: Sequence[TrainerCallback] = ()) -> dict[str, Any]:
    """Train as the recipe says; returns (and on rank 0 writes) the metrics.

    With `train.resume_from_checkpoint` the Trainer restores, from the checkpoint `preflight` picked: the adapter
    (or model) weights, optimizer and learning-rate scheduler state, the step counter and logs, the position in the
    data order (it skips the batches already trained in the interrupted epoch) and the Python / NumPy / torch RNG
    states (dropout), so the result equals an uninterrupted run. `callbacks` are extra `TrainerCallback`s.
    """
    resume = preflight(recipe)
    set_seed(recipe.seed)
    args = training_arguments(recipe, resume_from_checkpoint=resume)
    tokenizer = AutoTokenizer.from_pretrained(
        recipe.model.tokenizer or recipe.model.path, revision=recipe.model.revision
    )
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
    config = load_config(recipe)
    model = load_model(recipe, config, args)
    flag, kwargs_field = checkpointing_fields()
    if getattr(args, flag) and (getattr(args, kwargs_field) or {}).get("use_reentrant"):
        model.enable_input_require_grads()  # reentrant checkpointing only backpropagates into inputs that need grad
    trainable, total = count_parameters(model)
    adapter = f"LoRA {recipe.lora.preset}, r={recipe.lora.r}" if recipe.method != "full" else "full fine-tune"
    logger.info(
        f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.3%}; {recipe.method}: {adapter}, "
        f"router {recipe.moe.router})"
    )
    trainer = YuanTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        expert_lr_scale=recipe.moe.expert_lr_scale,
        callbacks=list(callbacks) or None,
    )
    probe = (eval_dataset or train_dataset).rows[: data.probe_rows]
    if is_deepspeed_zero3_enabled():
        # ZeRO-3 partitions the weights at load time and only the engine that train() builds gathers them for a
        # forward: before it there is no forward that fits (gathering all weights is the whole model per GPU)
        logger.warning("DeepSpeed ZeRO-3: no probe loss before training (the weights are partitioned until train())")
        loss_before = float("nan")
    else:
        loss_before = probe_loss(trainer.model, probe, collator)  # the base model (+ fresh adapter), also on resume
    if resume is not None:
        logger.info(f"resuming from {resume}: weights, optimizer, scheduler, data position and RNG states")
    result = trainer.train(resume_from_checkpoint=resume)
    loss_after = probe_loss(trainer.model, probe, collator)
    trainer.save_model(args.output_dir)
    peak, peak_kind = _peak_memory()
    runtime = result.metrics.get("train_runtime", float("nan"))
    tokens = trainer.state.num_input_tokens_seen - _tokens_in_checkpoint(resume)  # this run's share
    metrics = {
        "method": recipe.method,
        "model": recipe.model.path,
        "world_size": args.world_size,
        "steps": trainer.state.global_step,
        "resumed_from": resume,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_loss": result.training_loss,
        "probe_loss_before": loss_before,
        "probe_loss_after": loss_after,
        "probe_rows": len(probe),
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_this_run": tokens,
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


@contextlib.contextmanager
def _command_line_logging() -> Iterator[None]:
    """Show `yuan_hf.finetune` info lines (data summary, trainable parameters) on stderr, on the main process only.

    Python's default (no handler, WARNING) would hide them; library users keep their own logging configuration.
    """
    log = pylogging.getLogger("yuan_hf.finetune")
    handler = pylogging.StreamHandler(sys.stderr)
    handler.setFormatter(pylogging.Formatter("%(message)s"))
    main_process = os.environ.get("RANK", "0") == "0"
    previous = log.level
    log.setLevel(pylogging.INFO if main_process else pylogging.WARNING)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(previous)


def finetune_main(recipe_path: str, overrides: list[str] | None = None) -> int:
    """Entry point for `yuan-hf finetune RECIPE [key=value ...]`; returns a process exit code.

    Problems with the recipe or the data print one `yuan-hf finetune: error: ...` line and return 2.
    """
    with _command_line_logging():
        try:
            run_recipe(load_recipe(recipe_path, overrides))
        except (RecipeError, SFTDataError) as error:
            print(f"yuan-hf finetune: error: {error}", file=sys.stderr)
            return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m yuan_hf.finetune RECIPE [key=value ...]` (also under torchrun / accelerate launch)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m yuan_hf.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/qlora_16k.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=10")
    options = parser.parse_args(argv)
    return finetune_main(options.recipe, options.overrides)


__all__ = [
    "count_parameters",
    "finetune_main",
    "load_config",
    "load_model",
    "main",
    "preflight",
    "probe_loss",
    "run_recipe",
    "training_arguments",
]
