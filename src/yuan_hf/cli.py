"""The ``yuan-hf`` command line: conversion, demo, fine-tuning, upload and expert tools.

Every failure prints one clear ``error: ...`` line and exits non-zero; conversions write atomically.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata

from . import __version__
from .conversion.common import ConversionError
from .experts.stats import ExpertsError

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


def _add_experts(sub: argparse._SubParsersAction) -> None:
    experts = sub.add_parser("experts", help="router statistics, layer-adaptive expert pruning, expert placement")
    tools = experts.add_subparsers(dest="tool", required=True)

    stats = tools.add_parser("stats", help="which experts your data uses: per-layer routing statistics",
                             description="Stream a dataset through the model and write OUT/stats.json (token share, "
                             "routing mass, entropy, co-selection, removal impact per layer and expert) and PNG "
                             "pictures (with matplotlib). Padding is not counted.")  # fmt: skip
    stats.add_argument("model", help="native yuan_m32 folder or Hub id (IEIT's layout is converted on the fly)")
    stats.add_argument("data", help="JSONL ({'text'}, {'prompt','response'} or {'messages'} per line) or a text "
                                    "file (one document per non-blank line)")  # fmt: skip
    stats.add_argument("--out", default="expert_stats", help="output folder for stats.json and the pictures")
    stats.add_argument("--max-tokens", type=_positive_int, default=None,
                       help="count at most this many tokens (default: the whole file)")
    stats.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per forward")
    stats.add_argument("--max-length", type=_positive_int, default=1024,
                       help="longest sequence per forward; longer documents are cut into pieces")
    stats.add_argument("--tokenizer", default=None, help="tokenizer folder or id (default: the model's)")
    stats.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                       help="dtype to load the weights in")
    stats.add_argument("--device-map", default=None, help="e.g. 'auto' to spread the model over the GPUs")
    stats.add_argument("--load-in-4bit", action="store_true", help="load the experts in nf4 (bitsandbytes)")
    stats.add_argument("--no-plots", action="store_true", help="write stats.json only")

    prune = tools.add_parser("prune", help="drop under-used experts per layer (LAEP) into a new native folder",
                             description="Per layer keep the fewest experts that carry the requested share of "
                             "routed mass (never fewer than top-k), or the N heaviest of every layer, or whatever "
                             "fits a parameter budget. The router is kept whole, so routing among the kept experts "
                             "is unchanged.")  # fmt: skip
    prune.add_argument("model", help="local native yuan_m32 folder (16/32-bit safetensors)")
    prune.add_argument("dst", help="output folder (must be empty or absent unless --overwrite)")
    prune.add_argument("--stats", required=True, help="stats.json of `yuan-hf experts stats` on this model")
    how = prune.add_mutually_exclusive_group(required=True)
    how.add_argument("--keep-mass", type=float, help="per layer, keep experts carrying this share of routed mass, "
                                                     "e.g. 0.95")  # fmt: skip
    how.add_argument("--num-experts", type=_positive_int, help="keep the N heaviest experts of every layer")
    how.add_argument("--max-params", help="total parameter budget, e.g. 24B or 350M")
    prune.add_argument("--max-shard-size", default="5GB", type=_shard_size, help="largest safetensors shard")
    prune.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder (a yuan-hf output)")
    prune.add_argument("--verify", action="store_true", help="reload the result and run a short forward")

    place = tools.add_parser("place", help="balance experts over N expert-parallel devices",
                             description="From stats.json, assign each layer's experts to N devices (equal counts, "
                             "load within mean + the largest expert's load) and report the contiguous split's "
                             "imbalance vs the balanced one; --reorder writes a copy of a model whose experts are "
                             "permuted so that the contiguous split is the balanced placement.")  # fmt: skip
    place.add_argument("stats", help="stats.json of `yuan-hf experts stats`")
    place.add_argument("--devices", type=_positive_int, required=True, help="number of expert-parallel devices")
    place.add_argument("--out", default="placement.json", help="where to write the plan (JSON)")
    place.add_argument("--reorder", nargs=2, metavar=("SRC", "DST"), default=None,
                       help="also write SRC (a native folder the stats came from) with its experts reordered to DST")
    place.add_argument("--overwrite", action="store_true", help="with --reorder: replace a non-empty DST")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _run_experts(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .experts import ExpertStats, plan_placement, prune_folder, reorder
    from .experts.placement import describe_plan, write_plan
    from .experts.stats import expert_stats_main, layer_report

    if args.tool == "stats":
        stats, notes = expert_stats_main(
            args.model, args.data, out=args.out, max_tokens=args.max_tokens, batch_size=args.batch_size,
            max_length=args.max_length, tokenizer=args.tokenizer, load_in_4bit=args.load_in_4bit,
            device_map=args.device_map, dtype=args.dtype, plots=not args.no_plots,
        )  # fmt: skip
        print(layer_report(stats))
        print("\n".join(notes))
        return 0
    if args.tool == "prune":
        print(prune_folder(
            args.model, args.dst, stats=args.stats, keep_mass=args.keep_mass, num_experts=args.num_experts,
            max_params=args.max_params, overwrite=args.overwrite, verify=args.verify,
            max_shard_size=args.max_shard_size,
        ))  # fmt: skip
        return 0
    if args.tool == "place":
        stats = ExpertStats.load(args.stats)
        if args.reorder:
            from .experts.prune import open_native_folder

            _, config, _ = open_native_folder(args.reorder[0])
            stats.check_matches(config, model_name=args.reorder[0], stats_name=Path(args.stats).name)
        plan = plan_placement(stats, args.devices)
        print(describe_plan(plan))
        print(f"wrote {write_plan(plan, args.out)}")
        if args.reorder:
            print(reorder(args.reorder[0], args.reorder[1], plan, overwrite=args.overwrite))
        return 0
    raise AssertionError(f"unhandled experts tool {args.tool}")


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
    _add_experts(sub)
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
        if args.command == "experts":
            return _run_experts(args)
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
    except (ConversionError, ExpertsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
