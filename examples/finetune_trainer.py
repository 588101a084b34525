"""Fine-tune Yuan 2.0-M32 with `transformers.Trainer` and the `yuan_hf.finetune` Python API.

IEIT's SFT setup: `prompt<sep>answer<eod>` with the loss on the answer only, 16384-token packed rows, RoPE base
raised by the NTK rule, QLoRA (4-bit experts) so the 40B model fits one GPU.

    python examples/finetune_trainer.py --model ./Yuan2-M32-hf-native --train-file data/train.jsonl --qlora
    python examples/finetune_trainer.py --demo /tmp/yuan-demo     # tiny random model + toy task, CPU, < 1 min

The same steps as `yuan-hf finetune recipes/qlora_16k.yaml`, written out.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainingArguments

import yuan_hf  # noqa: F401  (registers yuan_m32 with the Auto classes)
from yuan_hf.finetune import (
    SFTDataCollator,
    YuanTrainer,
    activation_checkpointing_args,
    apply_lora,
    build_sft_dataset,
    extend_context,
    load_for_qlora,
    lora_config,
)
from yuan_hf.finetune.runner import probe_loss
from yuan_hf.finetune.toy import write_toy_setup


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="native yuan_m32 folder or Hub id")
    parser.add_argument("--train-file", help="JSONL: {'prompt','response'} or {'messages'} per line")
    parser.add_argument("--demo", metavar="DIR", help="write a tiny random model + toy data to DIR and use them")
    parser.add_argument("--qlora", action="store_true", help="4-bit nf4 base weights (QLoRA)")
    parser.add_argument("--max-length", type=int, help="tokens per packed row (default 16384; demo 64)")
    parser.add_argument("--lora-preset", default="all", choices=["attention", "experts", "all"])
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, help="default 1e-4 (demo: 1e-2)")
    parser.add_argument("--expert-lr-scale", default="1.0", help="a number, or 'auto' = sqrt(top_k / num_experts)")
    parser.add_argument("--max-steps", type=int, help="default: one epoch (demo: 30 steps)")
    parser.add_argument("--batch-size", type=int, default=1, help="packed rows per step and device")
    parser.add_argument("--output-dir", default="runs/yuan-m32-trainer")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    if args.demo:  # a 64-wide, 2-layer Yuan with the release's proportions and a learnable toy task
        paths = write_toy_setup(args.demo, n_train=96, initializer_range=0.2)
        args.model, args.train_file = str(paths["model"]), str(paths["train_file"])
    defaults = (64, 1e-2, 30) if args.demo else (16384, 1e-4, -1)
    for name, default in zip(("max_length", "learning_rate", "max_steps"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if not (args.model and args.train_file):
        raise SystemExit("give --model and --train-file, or --demo DIR")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # RoPE for the training length before the weights load (a no-op for checkpoints already at that length;
    # from the 4096-token base model: base 10000 -> 40890, IEIT's)
    config = AutoConfig.from_pretrained(args.model)
    extend_context(config, args.max_length, method="ntk")
    config.use_cache = False
    if args.qlora:
        model = load_for_qlora(args.model, bits=4, config=config)  # prepare_model_for_kbit_training included
    else:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, config=config, dtype=torch.bfloat16 if gpu else torch.float32
        )
    model = apply_lora(model, lora_config(args.lora_preset, r=args.lora_r, model=model))
    model.print_trainable_parameters()

    dataset = build_sft_dataset(args.train_file, tokenizer, max_length=args.max_length, packing=True)
    collator = SFTDataCollator.from_tokenizer(tokenizer)  # padding-free: one row, positions restart per sample
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        max_steps=args.max_steps,
        num_train_epochs=1,
        bf16=gpu,
        use_cpu=not gpu,
        **activation_checkpointing_args(),  # non-reentrant, under this transformers' names (5.25 renamed them)
        remove_unused_columns=False,  # the rows carry position_ids
        logging_steps=10,
        save_strategy="no",
        report_to="none",
    )
    expert_lr_scale = args.expert_lr_scale if args.expert_lr_scale == "auto" else float(args.expert_lr_scale)
    trainer = YuanTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        expert_lr_scale=expert_lr_scale,
    )
    probe = dataset.rows[:8]
    before = probe_loss(model, probe, collator)
    trainer.train()
    after = probe_loss(model, probe, collator)
    model.save_pretrained(args.output_dir)  # the adapter only
    tokenizer.save_pretrained(args.output_dir)
    print(f"loss on {len(probe)} rows: {before:.4f} -> {after:.4f}; adapter saved to {args.output_dir}")
    return {"loss_before": before, "loss_after": after, "output_dir": args.output_dir}


if __name__ == "__main__":
    main()
