"""The ``yuan-hf`` command line: conversion, demo, fine-tuning and upload.

Every failure prints one clear ``error: ...`` line and exits non-zero; conversions write atomically.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata

from . import __version__
from .conversion.common import ConversionError

VERSION_LIBRARIES = ("transformers", "torch", "huggingface-hub", "safetensors", "peft", "accelerate", "bitsandbytes")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to option help, except where there is nothing to show (flags, None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose sub-commands (made with ``type(self)``) all show defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


class _VersionAction(argparse.Action):
    """``--version``: prints :func:`version_text` unwrapped (argparse's own action re-wraps it) and exits."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_text())
        parser.exit()


def version_text() -> str:
    """``yuan-hf X`` plus the versions of the libraries it builds on (what a bug report needs)."""
    found = []
    for name in VERSION_LIBRARIES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return f"yuan-hf {__version__}\n{', '.join(found)}, python {sys.version.split()[0]}"


def _add_convert(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser("convert", help="convert IEIT checkpoints and tokenizers to the native format")
    kinds = convert.add_subparsers(dest="kind", required=True)

    ieit = kinds.add_parser("ieit-hf", help="IEIT's Hugging Face layout (config model_type 'yuan')")
    ieit.add_argument("src", help="IEIT HF checkpoint folder (config.json + .bin or .safetensors shards)")
    ieit.add_argument("dst", help="output folder (must be empty or absent unless --overwrite)")
    ieit.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                      help="dtype of the written weights")
    ieit.add_argument("--rope-theta", type=float, default=None,
                      help="RoPE base (default 40890, what the released SFT model was fine-tuned with; "
                           "10000 for the pretrained base or parity with IEIT's remote code)")
    ieit.add_argument("--ieit-bf16-rope", action="store_true",
                      help="reproduce IEIT remote code's bf16 RoPE tables bit for bit (parity checks only)")
    ieit.add_argument("--max-shard-size", default="5GB", type=_shard_size, help="largest safetensors shard, e.g. 5GB, 500MB")
    ieit.add_argument("--tokenizer", default=None,
                      help="folder or file with IEIT's tokenizer.model to convert into the output folder")
    ieit.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    ieit.add_argument("--verify", action="store_true", help="reload the result and run a short forward")
    _add_tokenizer_parser(kinds)

    mega = kinds.add_parser("megatron", help="IEIT's Megatron-LM checkpoint (any TP x PP), one CPU command")
    mega.add_argument("src", help="checkpoint root (with latest_checkpointed_iteration.txt) or an iter_XXXXXXX folder")
    mega.add_argument("dst", help="output folder (must be empty or absent unless --overwrite)")
    mega.add_argument("--tokenizer", default=None, help="folder or file with IEIT's tokenizer.model")
    mega.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                      help="dtype of the written weights")
    mega.add_argument("--iteration", type=int, default=None, help="iteration to convert (default: the tracker's)")
    mega.add_argument("--rope-theta", type=float, default=None, help="override the RoPE base recorded in the args")
    mega.add_argument("--token-ids", default=None, type=_parse_token_ids,
                      help="without --tokenizer: special ids, e.g. 'eos=77185,sep=77187,pad=77188,bos=77185'")
    mega.add_argument("--max-shard-size", default="5GB", type=_shard_size, help="largest safetensors shard, e.g. 5GB, 500MB")
    mega.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    mega.add_argument("--verify", action="store_true", help="reload the result and run a short forward")


def _shard_size(text: str) -> str:
    """Validate --max-shard-size while parsing, so a typo is a usage error, not a failure mid-conversion."""
    from .conversion.native.output import parse_size

    try:
        parse_size(text)
    except ConversionError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _parse_token_ids(text: str) -> dict[str, int]:
    try:
        return {name.strip(): int(value) for name, value in (item.split("=") for item in text.split(","))}
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--token-ids wants name=id pairs like 'eos=2,sep=4', got {text!r}") from err


def _add_tokenizer_parser(kinds: argparse._SubParsersAction) -> None:
    tok = kinds.add_parser("tokenizer", help="IEIT's SentencePiece tokenizer.model -> a fast HF tokenizer folder")
    tok.add_argument("src", help="folder holding tokenizer.model, or the file itself")
    tok.add_argument("dst", help="output folder")
    tok.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="yuan-hf", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of yuan-hf and the libraries it uses, then exit")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    push = sub.add_parser(
        "push", help="upload a native model or adapter folder to the Hugging Face Hub",
        description="Upload only what loading needs (weights named by the index, config, tokenizer, remote code, "
        "model card, conversion.json; or adapter_config.json + adapter_model.safetensors), after checking that the "
        "weights match config.json. The file list is printed first; the folder is never modified.",
    )  # fmt: skip
    push.add_argument("dir", help="a native yuan_m32 folder (converted or saved with save_pretrained) or a PEFT adapter")
    push.add_argument("repo_id", help="e.g. your-name/Yuan2-M32-hf-native")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--license", default=None,
                      help="license of the card: sets the license field of README.md's front matter (the rest of "
                           "your card is kept) or of the generated card (default there: other)")
    push.add_argument("--dry-run", action="store_true", help="check the folder and list what would be uploaded, "
                                                             "without uploading")
    tune = sub.add_parser("finetune", help="LoRA / QLoRA fine-tuning from a YAML recipe (see recipes/)")
    tune.add_argument("recipe", help="e.g. recipes/qlora_16k.yaml")
    tune.add_argument("overrides", nargs="*", help="recipe values to override, e.g. data.train_file=my.jsonl")
    demo = sub.add_parser("demo", help="the main job on built-in tiny random weights (no downloads)")
    demo.add_argument("--workdir", default=None, help="keep the produced folders here (default: a temp dir)")
    serve = sub.add_parser(
        "serve", add_help=False,
        help="transformers' OpenAI-compatible server (`transformers serve`) with Yuan registered; every argument is "
        "passed on, e.g. `yuan-hf serve DIR --host 127.0.0.1 --port 8000` (`yuan-hf serve --help` lists them)",
    )  # fmt: skip
    serve.add_argument("serve_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    sub.add_parser(
        "doctor",
        help="print the installed versions and attention backends and run a few-second self-check on a tiny model; "
        "exit 0 when everything works",
    )
    return parser


def _run_convert(args: argparse.Namespace) -> int:
    if args.kind == "ieit-hf":
        from .conversion.ieit_hf import convert_ieit_hf

        summary = convert_ieit_hf(
            args.src, args.dst, dtype=args.dtype, rope_theta=args.rope_theta, rope_in_bfloat16=args.ieit_bf16_rope,
            max_shard_size=args.max_shard_size, tokenizer=args.tokenizer, overwrite=args.overwrite, verify=args.verify,
        )  # fmt: skip
    elif args.kind == "megatron":
        from .conversion.megatron import convert_megatron

        summary = convert_megatron(
            args.src, args.dst, iteration=args.iteration, tokenizer=args.tokenizer, dtype=args.dtype,
            rope_theta=args.rope_theta, token_ids=args.token_ids, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite, verify=args.verify,
        )  # fmt: skip
    if args.kind in ("ieit-hf", "megatron"):
        print(summary)
        return 0
    if args.kind == "tokenizer":
        from .conversion.tokenizer import convert_tokenizer

        print(f"wrote {convert_tokenizer(args.src, args.dst, overwrite=args.overwrite)}")
        return 0
    raise AssertionError(f"unhandled convert kind {args.kind}")


def _run_push(args: argparse.Namespace) -> int:
    from .hub import HubError, plan_push, upload

    try:
        plan = plan_push(args.dir, repo_id=args.repo_id, license=args.license)
        print(plan.describe(), flush=True)
        if args.dry_run:
            print(f"dry run: nothing was uploaded to {args.repo_id}")
            return 0
        print(f"uploading to {args.repo_id} ...", flush=True)
        print(upload(plan, args.repo_id, private=args.private))
    except HubError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # everything after it, --help included, belongs to `transformers serve`
        from .serve import serve

        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            return _run_convert(args)
        if args.command == "push":
            return _run_push(args)
        if args.command == "finetune":
            from .finetune import finetune_main

            return finetune_main(args.recipe, args.overrides)
        if args.command == "doctor":
            from .doctor import doctor

            return doctor()
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
