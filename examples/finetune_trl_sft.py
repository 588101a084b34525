"""Fine-tune Yuan 2.0-M32 with TRL's `SFTTrainer`, padding-free packing, on `yuan_hf.finetune`'s tokenized data.

`build_sft_dataset(..., packing=False)` tokenizes and masks (IEIT's `<sep>` format or chat messages); TRL packs
the samples itself (best-fit decreasing) and passes `position_ids` + `cu_seq_lens_*` to the model, which restarts
attention and its LF convolution at every sample. The labels we built are kept as they are.

    python examples/finetune_trl_sft.py --model ./Yuan2-M32-hf-native --train-file data/train.jsonl --qlora
    python examples/finetune_trl_sft.py --demo /tmp/yuan-trl-demo      # tiny random model + toy task, CPU
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import yuan_hf  # noqa: F401  (registers yuan_m32 with the Auto classes)
from yuan_hf.finetune import (
    ExpertLRMixin,
    activation_checkpointing_args,
    apply_lora,
    build_sft_dataset,
    extend_context,
    load_for_qlora,
    lora_config,
)
from yuan_hf.finetune.toy import write_toy_setup


class YuanSFTTrainer(ExpertLRMixin, SFTTrainer):
    """TRL's SFTTrainer with expert-specific learning rates (`expert_lr_scale=1.0`: plain SFTTrainer)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="native yuan_m32 folder or Hub id")
    parser.add_argument("--train-file", help="JSONL: {'prompt','response'} or {'messages'} per line")
    parser.add_argument("--demo", metavar="DIR", help="write a tiny random model + toy data to DIR and use them")
    parser.add_argument("--qlora", action="store_true", help="4-bit nf4 base weights (QLoRA)")
    parser.add_argument("--max-length", type=int, help="tokens per packed row (default 16384; demo 64)")
    parser.add_argument("--learning-rate", type=float, help="default 1e-4 (demo: 1e-2)")
    parser.add_argument("--max-steps", type=int, help="default: one epoch (demo: 30 steps)")
    parser.add_argument("--expert-lr-scale", default="1.0", help="a number, or 'auto' = sqrt(top_k / num_experts)")
    parser.add_argument("--output-dir", default="runs/yuan-m32-trl")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    if args.demo:
        paths = write_toy_setup(args.demo, n_train=96, initializer_range=0.2)
        args.model, args.train_file = str(paths["model"]), str(paths["train_file"])
    defaults = (64, 1e-2, 30) if args.demo else (16384, 1e-4, -1)
    for name, default in zip(("max_length", "learning_rate", "max_steps"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if not (args.model and args.train_file):
        raise SystemExit("give --model and --train-file, or --demo DIR")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = AutoConfig.from_pretrained(args.model)
    extend_context(config, args.max_length, method="ntk")
    config.use_cache = False
    if args.qlora:
        model = load_for_qlora(args.model, bits=4, config=config)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            args.model, config=config, dtype=torch.bfloat16 if gpu else torch.float32
        )
    model = apply_lora(model, lora_config("all", r=16, model=model))

    dataset = build_sft_dataset(args.train_file, tokenizer, max_length=args.max_length, packing=False).to_hf_dataset()
    sft_args = SFTConfig(
        output_dir=args.output_dir,
        packing=True,  # best-fit decreasing into rows of max_length ...
        padding_free=True,  # ... flattened, positions restart per sample, no attention mask
        max_length=args.max_length,
        per_device_train_batch_size=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        max_steps=args.max_steps,
        bf16=gpu,
        use_cpu=not gpu,
        **activation_checkpointing_args(),  # non-reentrant, under this transformers' names (5.25 renamed them)
        logging_steps=10,
        save_strategy="no",
        report_to="none",
    )
    expert_lr_scale = args.expert_lr_scale if args.expert_lr_scale == "auto" else float(args.expert_lr_scale)
    trainer = YuanSFTTrainer(
        model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer, expert_lr_scale=expert_lr_scale
    )
    result = trainer.train()
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    print(f"SFTTrainer: logged losses {losses}; adapter saved to {args.output_dir}")
    return {"losses": losses, "train_loss": result.training_loss, "trainer": trainer}


if __name__ == "__main__":
    main()
