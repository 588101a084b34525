"""The ``yuan-hf`` command line: conversion, demo, fine-tuning and upload.

Every failure prints one clear ``error: ...`` line and exits non-zero; conversions write atomically.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .conversion.common import ConversionError


def _add_convert(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser("convert", help="convert IEIT checkpoints and tokenizers to the native format")
    kinds = convert.add_subparsers(dest="kind", required=True)

    ieit = kinds.add_parser("ieit-hf", help="IEIT's Hugging Face layout (config model_type 'yuan')")
    ieit.add_argument("src", help="IEIT HF checkpoint folder (config.json + .bin or .safetensors shards)")
    ieit.add_argument("dst", help="output folder (must be empty or absent unless --overwrite)")
    ieit.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ieit.add_argument("--rope-theta", type=float, default=None,
                      help="RoPE base (default 40890, what the released SFT model was fine-tuned with; "
                           "10000 for the pretrained base or parity with IEIT's remote code)")
    ieit.add_argument("--ieit-bf16-rope", action="store_true",
                      help="reproduce IEIT remote code's bf16 RoPE tables bit for bit (parity checks only)")
    ieit.add_argument("--max-shard-size", default="5GB")
    ieit.add_argument("--tokenizer", default=None,
                      help="folder or file with IEIT's tokenizer.model to convert into the output folder")
    ieit.add_argument("--overwrite", action="store_true")
    ieit.add_argument("--verify", action="store_true", help="reload the result and run a short forward")
    _add_tokenizer_parser(kinds)

    mega = kinds.add_parser("megatron", help="IEIT's Megatron-LM checkpoint (any TP x PP), one CPU command")
    mega.add_argument("src", help="checkpoint root (with latest_checkpointed_iteration.txt) or an iter_XXXXXXX folder")
    mega.add_argument("dst", help="output folder (must be empty or absent unless --overwrite)")
    mega.add_argument("--tokenizer", default=None, help="folder or file with IEIT's tokenizer.model")
    mega.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    mega.add_argument("--iteration", type=int, default=None, help="iteration to convert (default: the tracker's)")
    mega.add_argument("--rope-theta", type=float, default=None, help="override the RoPE base recorded in the args")
    mega.add_argument("--token-ids", default=None, type=_parse_token_ids,
                      help="without --tokenizer: special ids, e.g. 'eos=77185,sep=77187,pad=77188,bos=77185'")
    mega.add_argument("--max-shard-size", default="5GB")
    mega.add_argument("--overwrite", action="store_true")
    mega.add_argument("--verify", action="store_true", help="reload the result and run a short forward")


def _parse_token_ids(text: str) -> dict[str, int]:
    try:
        return {name.strip(): int(value) for name, value in (item.split("=") for item in text.split(","))}
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--token-ids wants name=id pairs like 'eos=2,sep=4', got {text!r}") from err


def _add_tokenizer_parser(kinds: argparse._SubParsersAction) -> None:
    tok = kinds.add_parser("tokenizer", help="IEIT's SentencePiece tokenizer.model -> a fast HF tokenizer folder")
    tok.add_argument("src", help="folder holding tokenizer.model, or the file itself")
    tok.add_argument("dst", help="output folder")
    tok.add_argument("--overwrite", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yuan-hf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    push = sub.add_parser("push", help="upload a native folder to the Hugging Face Hub")
    push.add_argument("dir", help="a native yuan_m32 folder (converted or saved with save_pretrained)")
    push.add_argument("repo_id", help="e.g. your-name/Yuan2-M32-hf-native")
    push.add_argument("--private", action="store_true")
    push.add_argument("--license", default=None, help="license field of the generated model card")
    tune = sub.add_parser("finetune", help="LoRA / QLoRA fine-tuning from a YAML recipe (see recipes/)")
    tune.add_argument("recipe", help="e.g. recipes/qlora_16k.yaml")
    tune.add_argument("overrides", nargs="*", help="recipe values to override, e.g. data.train_file=my.jsonl")
    demo = sub.add_parser("demo", help="the main job on built-in tiny random weights (no downloads)")
    demo.add_argument("--workdir", default=None, help="keep the produced folders here (default: a temp dir)")
    return parser


def _run_convert(args: argparse.Namespace) -> int:
    if args.kind == "ieit-hf":
        from .conversion.ieit_hf import convert_ieit_hf

        summary = convert_ieit_hf(
            args.src, args.dst, dtype=args.dtype, rope_theta=args.rope_theta, rope_in_bfloat16=args.ieit_bf16_rope,
            max_shard_size=args.max_shard_size, tokenizer=args.tokenizer, overwrite=args.overwrite,
        )  # fmt: skip
    elif args.kind == "megatron":
        from .conversion.megatron import convert_megatron

        summary = convert_megatron(
            args.src, args.dst, iteration=args.iteration, tokenizer=args.tokenizer, dtype=args.dtype,
            rope_theta=args.rope_theta, token_ids=args.token_ids, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )  # fmt: skip
    if args.kind in ("ieit-hf", "megatron"):
        if args.verify:
            from .conversion.ieit_hf import verify_folder

            summary.notes.append(verify_folder(args.dst))
        print(summary)
        return 0
    if args.kind == "tokenizer":
        from .conversion.tokenizer import convert_tokenizer

        print(f"wrote {convert_tokenizer(args.src, args.dst, overwrite=args.overwrite)}")
        return 0
    raise AssertionError(f"unhandled convert kind {args.kind}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            return _run_convert(args)
        if args.command == "push":
            from .hub import push_to_hub

            print(push_to_hub(args.dir, args.repo_id, private=args.private, license=args.license))
            return 0
        if args.command == "finetune":
            from .finetune import finetune_main

            return finetune_main(args.recipe, args.overrides)
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.workdir)
            return 0
    except (ConversionError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
