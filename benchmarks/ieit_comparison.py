"""yuan-hf next to IEIT's original remote code, same weights, side by side: prefill and decode as `generate` runs them.

    # once: IEIT's code and an environment it runs in (its generate path works up to transformers 4.36)
    git clone https://github.com/IEIT-Yuan/Yuan2.0-M32 /tmp/Yuan2.0-M32            # tested at b403a2b
    python -m venv .venv-ieit && .venv-ieit/bin/pip install torch==2.13.0 transformers==4.36.2 einops
    # then, from this environment (yuan_hf installed):
    PYTHONPATH=src python benchmarks/ieit_comparison.py \
        --ieit-code /tmp/Yuan2.0-M32/3rd_party/AutoGPTQ/auto_gptq/modeling --ieit-python .venv-ieit/bin/python \
        --markdown benchmarks/results_ieit.md
    # on a GPU: add --device cuda --dtype bfloat16 (and --ieit-flash-attention if flash-attn is in IEIT's environment)

The driver builds one random model (default: hidden 1024, 8 layers, 8 heads x 256, 32 experts top-2, expert FFN 2048,
vocab 32000, fp32), saves it natively and in IEIT's HF layout (the converter's inverse, fp32, so both load bit-identical
weights), and starts two worker processes of this same file: one in this environment (yuan_hf, transformers 5.x) and
one in IEIT's (its `YuanForCausalLM`, transformers 4.36). Each timed repetition sends the same request to every variant
in turn (the order rotates), so a burst of load from other processes lands on all alike: read the ratios. Per request,
`generate` runs greedy with `min_new_tokens = max_new_tokens`; a logits processor stamps the time at every step, so
the first stamp is prefill (as generate runs it: IEIT computes logits for every prompt position, yuan-hf only for the
last) and the gaps between stamps are decode steps (median per request, median over repetitions).

Variants: IEIT (its own cache of tuples, eager attention as `use_flash_attention=false` gives on CPU); yuan-hf as a
user gets it by default (eager, DynamicCache, SDPA); yuan-hf with `experts_implementation="grouped_mm"`, a StaticCache
and `torch.compile(fullgraph=True, dynamic=False)` through generate's compile_config (compiled once per shape in the
warm-up, which runs each case's exact request once per variant).

Before timing, both implementations' logits on one prompt are compared (max abs difference) and their greedy
continuations checked for agreement, so the table compares the same computation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_utils import cpu_name, loadavg, timed_generate

IEIT_FILES = ("yuan_moe_hf_model.py", "configuration_yuan.py")

# --------------------------------------------------------------------------------------------------------------
# workers: each runs in its own environment and imports only torch + that environment's transformers


def _prompt(batch: int, context: int, vocab: int, avoid: set[int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (batch, context), generator=generator)
    for token in avoid:  # no EOD in the prompt: IEIT restarts positions after every EOD it finds
        ids[ids == token] = 10
    return ids


class _Worker:
    def __init__(self, args):
        torch.set_num_threads(args.threads)
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.kind = args.worker
        if self.kind == "ieit":
            self.model = self._load_ieit(args)
        else:
            from yuan_hf import YuanM32ForCausalLM

            self.model = YuanM32ForCausalLM.from_pretrained(args.folder, dtype=self.dtype).to(self.device).eval()
        self.config = self.model.config
        self.avoid = {t for t in (self.config.eos_token_id, self.config.bos_token_id, self.config.pad_token_id) if t is not None}

    def _load_ieit(self, args):
        package = Path(tempfile.mkdtemp(prefix="ieit_code_")) / "ieit_yuan"
        package.mkdir()
        (package / "__init__.py").write_text("")
        for name in IEIT_FILES:
            shutil.copy(Path(args.ieit_code) / name, package / name)
        sys.path.insert(0, str(package.parent))
        from ieit_yuan.yuan_moe_hf_model import YuanForCausalLM

        return YuanForCausalLM.from_pretrained(args.folder, torch_dtype=self.dtype).to(self.device).eval()

    def versions(self) -> dict:
        import transformers

        return {"kind": self.kind, "torch": torch.__version__, "transformers": transformers.__version__}

    def _generate_kwargs(self, variant: str, context: int, new_tokens: int) -> dict:
        if variant != "compiled":
            if self.kind == "yuan_hf":
                self.model.set_experts_implementation("eager")
            return {}
        from transformers import CompileConfig, StaticCache

        from yuan_hf.modeling.transformers_compat import CACHE_FIELD

        self.model.set_experts_implementation("grouped_mm")
        # a StaticCache sized for this request: with cache_implementation="static", generate keeps the cache it built
        # and reuses it for any later request it fits, so after the 1 x 1024 case the 8 x 128 steps would attend over
        # 1047 slots (193 ms per step instead of 154 on the CPU box)
        cache = StaticCache(config=self.config, max_cache_len=context + new_tokens)
        # dynamic=False: one graph specialised to each shape (one per case), as when serving a fixed shape
        compile_config = CompileConfig(
            fullgraph=True, dynamic=False, mode="reduce-overhead" if self.device.type == "cuda" else "default"
        )
        compile_config._compile_all_devices = self.device.type != "cuda"  # transformers compiles on CUDA only by default
        return {CACHE_FIELD: cache, "compile_config": compile_config}

    def generate(self, variant: str, batch: int, context: int, new_tokens: int, seed: int, logits: bool = False) -> dict:
        prompt = _prompt(batch, context, self.config.vocab_size, self.avoid, seed).to(self.device)
        first_scores: list[torch.Tensor] | None = [] if logits else None
        kwargs = self._generate_kwargs(variant, context, new_tokens)
        with torch.inference_mode():
            prefill, steps, out = timed_generate(
                self.model, prompt, new_tokens, first_scores=first_scores, pad_token_id=self.config.pad_token_id, **kwargs
            )
        reply = {
            "prefill_s": prefill,
            "step_s": statistics.median(steps) if steps else None,
            "tokens": out[:, context:].tolist(),
        }
        if logits:
            reply["logits"] = first_scores[0].tolist()
        return reply


def worker_main(args) -> None:
    worker = _Worker(args)
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not corrupt the protocol
    out.write(json.dumps(worker.versions()) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = worker.generate(**request)
        except Exception as exc:  # reported to the driver, which stops with it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# --------------------------------------------------------------------------------------------------------------
# driver


class Client:
    def __init__(self, name: str, command: list[str]):
        self.name = name
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.versions = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"ieit_comparison: the {self.name} worker exited (code {self.process.wait()}); see its stderr above")
        reply = json.loads(line)
        if "error" in reply:
            raise SystemExit(f"ieit_comparison: the {self.name} worker failed: {reply['error']}")
        return reply

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def build_checkpoints(args, root: Path) -> tuple[Path, Path]:
    """One random model, saved natively and in IEIT's layout (fp32: both sides load identical weights)."""
    from safetensors.torch import save_file

    from yuan_hf import YuanM32Config, YuanM32ForCausalLM
    from yuan_hf.conversion.writers import ieit_config_from_native, ieit_state_dict_from_native

    config = YuanM32Config(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        head_dim=args.head_dim, moe_intermediate_size=args.ffn, num_experts=args.experts, num_experts_per_tok=2,
        max_position_embeddings=max(4096, 2 * max(args.contexts + [args.prefill])),
        bos_token_id=1, eos_token_id=2, pad_token_id=0, sep_token_id=3,
        # IEIT's code hard-codes RoPE base 10000, rotates H / heads dims of each head, with bf16 frequencies/positions
        rope_in_bfloat16=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": args.hidden / (args.heads * args.head_dim)},
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = YuanM32ForCausalLM(config).float().eval()
    native = root / "native"
    model.save_pretrained(native)
    ieit = root / "ieit"
    ieit.mkdir()
    tensors = ieit_state_dict_from_native(model.state_dict(), config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(ieit / "model.safetensors"), metadata={"format": "pt"})
    ieit_config = ieit_config_from_native(config)
    ieit_config["torch_dtype"] = "float32"
    ieit_config["use_flash_attention"] = args.ieit_flash_attention
    (ieit / "config.json").write_text(json.dumps(ieit_config, indent=2) + "\n")
    return native, ieit


def check_same_model(ieit: Client, ours: Client, args) -> dict:
    request = dict(variant="eager", batch=1, context=64, new_tokens=16, seed=args.seed + 1, logits=True)
    a, b = ieit.ask(**request), ours.ask(**request)
    diff = max(abs(x - y) for x, y in zip(a["logits"], b["logits"]))
    agree = sum(x == y for x, y in zip(a["tokens"][0], b["tokens"][0])) / len(a["tokens"][0])
    if args.dtype == "float32" and diff > args.logits_atol:  # bf16: IEIT runs its router Linears in bf16, we in fp32
        raise SystemExit(f"ieit_comparison: the two implementations disagree (max |logit diff| {diff:.2e}); not timing them")
    return {"max_abs_logit_diff": diff, "greedy_agreement": agree}


def run(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="ieit_comparison_"))
    try:
        native, ieit_dir = build_checkpoints(args, root)
        common = ["--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype]
        here = str(Path(__file__).resolve())
        ieit = Client("ieit", [args.ieit_python, here, "--worker", "ieit", "--folder", str(ieit_dir),
                               "--ieit-code", str(args.ieit_code), *common])  # fmt: skip
        ours = Client("yuan_hf", [sys.executable, here, "--worker", "yuan_hf", "--folder", str(native), *common])
        try:
            same = check_same_model(ieit, ours, args)
            log(f"same model: max |logit diff| {same['max_abs_logit_diff']:.2e}, greedy agreement {same['greedy_agreement']:.0%}")
            variants = [("ieit", ieit, "eager"), ("yuan_hf eager", ours, "eager")]
            if not args.no_compile:
                variants.append(("yuan_hf compiled", ours, "compiled"))
            cases = [("prefill", 1, args.prefill, 1)]
            cases += [("decode", b, c, args.new_tokens) for b in args.batches for c in args.contexts]
            rows = []
            for kind, batch, context, new_tokens in cases:
                request = dict(batch=batch, context=context, new_tokens=new_tokens)
                for _, client, variant in variants:  # warm-up: the same shapes, so the compiled variant's graph for
                    client.ask(variant=variant, seed=args.seed, **request)  # this static-cache size exists before timing
                samples = {name: [] for name, _, _ in variants}
                for rep in range(args.reps):
                    order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
                    for name, client, variant in order:
                        reply = client.ask(variant=variant, seed=args.seed + 100 + rep, **request)
                        samples[name].append(reply["prefill_s"] if kind == "prefill" else reply["step_s"])
                seconds = {name: statistics.median(values) for name, values in samples.items()}
                rows.append({"kind": kind, "batch": batch, "context": context, "seconds": seconds})
                log(f"{kind} {batch}x{context}: " + ", ".join(f"{n} {s * 1e3:.1f} ms" for n, s in seconds.items()))
            return {"versions": [ieit.versions, ours.versions], "same_model": same, "rows": rows}
        finally:
            ieit.close()
            ours.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def render(args, env: dict, result: dict) -> str:
    names = list(result["rows"][0]["seconds"])
    ieit_v, ours_v = result["versions"]
    lines = [
        f"# yuan-hf vs IEIT's remote code ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {env['cpu']}, {env['threads']} threads, load average at the end {env['load']}. "
        f"IEIT: transformers {ieit_v['transformers']}, torch {ieit_v['torch']}; yuan-hf: transformers "
        f"{ours_v['transformers']}, torch {ours_v['torch']}. Shape: hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads} heads x {args.head_dim}, {args.experts} experts top-2, FFN {args.ffn}, vocab {args.vocab}, "
        f"{args.dtype}, {args.device}, random weights; {args.reps} repetitions, median.",
        "",
        f"Same model: max |logit difference| {result['same_model']['max_abs_logit_diff']:.2e}, greedy agreement "
        f"{result['same_model']['greedy_agreement']:.0%} over 16 tokens.",
        "",
        "| case | " + " | ".join(f"{n}, ms" for n in names) + " | " + " | ".join(f"{n} / ieit" for n in names[1:]) + " |",
        "|---" * (2 * len(names)) + "|",
    ]
    for row in result["rows"]:
        s = row["seconds"]
        what = f"{row['kind']} {row['batch']} x {row['context']}" + (" (ms per step)" if row["kind"] == "decode" else "")
        times = " | ".join(f"{s[n] * 1e3:.1f}" for n in names)
        ratios = " | ".join(f"**{s['ieit'] / s[n]:.2f}x**" for n in names[1:])
        lines.append(f"| {what} | {times} | {ratios} |")
    return "\n".join(lines) + "\n"


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ieit-code", type=Path, default=os.environ.get("YUAN_HF_IEIT_CODE"),
                   help=f"folder with IEIT's {' and '.join(IEIT_FILES)} (default: $YUAN_HF_IEIT_CODE)")
    p.add_argument("--ieit-python", default=os.environ.get("YUAN_HF_IEIT_PYTHON"),
                   help="python of an environment with transformers 4.36 and einops (default: $YUAN_HF_IEIT_PYTHON)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill case (batch 1)")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024], help="decode: prompt lengths")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode: batch sizes")
    p.add_argument("--new-tokens", type=int, default=24, help="decode: tokens per request (steps = this - 1)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logits-atol", type=float, default=1e-3, help="fp32: refuse to time if the implementations' logits differ more")
    p.add_argument("--ieit-flash-attention", action="store_true",
                   help="IEIT with use_flash_attention=true, as its released config (CUDA, flash-attn in its environment)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled static-cache variant")
    p.add_argument("--markdown", type=Path, help="write the results table here")
    p.add_argument("--worker", choices=["ieit", "yuan_hf"], help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker:
        missing = [f"--ieit-code {name}" for name in IEIT_FILES if not (args.ieit_code and (args.ieit_code / name).is_file())]
        if missing:
            p.error(f"IEIT's modeling code is needed: {missing[0]} not found. Get it with "
                    "`git clone https://github.com/IEIT-Yuan/Yuan2.0-M32` and pass "
                    "--ieit-code Yuan2.0-M32/3rd_party/AutoGPTQ/auto_gptq/modeling")  # fmt: skip
        if not args.ieit_python or not shutil.which(args.ieit_python):
            p.error("--ieit-python: the python of an environment with transformers==4.36.2 and einops is needed "
                    "(python -m venv .venv-ieit && .venv-ieit/bin/pip install torch transformers==4.36.2 einops)")  # fmt: skip
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    result = run(args)
    env = {"cpu": cpu_name(), "threads": args.threads, "load": loadavg()}
    table = render(args, env, result)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
