"""Fast decode, in one process as ratios: the experts dispatch options, eager vs compiled static-cache decode, prefill,
and transformers' Qwen2-MoE at the same shape (CPU).

    PYTHONPATH=src python benchmarks/decode_fast.py --markdown benchmarks/results_decode.md

Models: Yuan (yuan_hf) and Qwen2-MoE (transformers) built at one shape (default: hidden 1024, 4 layers, 8 heads x
256, 32 experts top-2, expert FFN 2048, vocab 32000, fp32, random weights, each model's own routing). They share
embeddings, Q/K/V/O and expert weights (Yuan's per-expert Linears are views of Qwen's fused `[E, 2F, H]` tensors,
which also serve as Yuan's fused grouped_mm weights), so two models cost one set of weights. Every timed sample
alternates over the variants (token by token for decode), so a burst of load from other processes lands on all
alike: read the ratios. Compiled variants: `torch.compile(forward, fullgraph=True)` (inductor) with a StaticCache,
compiled once per (batch, context) before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from bench_utils import loadavg, machine_description
from inference_models import attach_shared, build_config, model_class

# --------------------------------------------------------------------------------------------------------------
# models


def build_models(args) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(yuan, qwen) sharing weights; Yuan's experts fused onto Qwen's tensors (no copy)."""
    torch.manual_seed(args.seed)
    qwen = model_class("qwen2moe")._from_config(build_config("qwen2moe", args), dtype=torch.float32, attn_implementation="sdpa")
    with torch.device("meta"):
        yuan = model_class("yuan")._from_config(build_config("yuan", args), dtype=torch.float32, attn_implementation="sdpa")
    attach_shared(yuan, qwen, init_rest=True)
    yuan.model.rotary_emb = type(yuan.model.rotary_emb)(yuan.config)
    for y_layer, q_layer in zip(yuan.model.layers, qwen.model.layers):
        experts = y_layer.mlp.experts
        experts.gate_up_proj, experts.down_proj = q_layer.mlp.experts.gate_up_proj.data, q_layer.mlp.experts.down_proj.data
    for model in (yuan, qwen):
        model.eval().requires_grad_(False)
    yuan.set_experts_implementation("grouped_mm")  # fuse() sees the views already in place: no copy
    assert yuan.model.layers[0].mlp.experts[1].down_proj.weight.data_ptr() == qwen.model.layers[0].mlp.experts.down_proj[1].data_ptr()
    return yuan, qwen


def use(model, implementation: str):
    if model.config._experts_implementation != implementation:
        model.set_experts_implementation(implementation)
    return model


# --------------------------------------------------------------------------------------------------------------
# 1. experts dispatch alone (one layer, inputs [T, H])


def experts_variants(yuan, qwen):
    from transformers.integrations import moe

    ye, qe = yuan.model.layers[0].mlp.experts, qwen.model.layers[0].mlp.experts
    return {
        "sort-based (eager, before)": lambda x, i, w: _sorted_without_direct(ye, x, i, w),
        "eager (sort; 1 token: direct calls)": ye._sorted_forward,
        "grouped_mm (yuan: transformers' function on the fused views)": lambda x, i, w: moe.grouped_mm_experts_forward(ye, x, i, w),
        "dense (eager under compile)": ye._dense_forward,
        "transformers batched_mm (gather weights)": lambda x, i, w: moe.batched_mm_experts_forward(qe, x, i, w),
        "transformers grouped_mm (Qwen2-MoE)": lambda x, i, w: moe.grouped_mm_experts_forward(qe, x, i, w),
    }


def _sorted_without_direct(experts, hidden_states, top_k_index, top_k_weights):
    """The sort-based dispatch as it was before the one-token shortcut (for the 1-token comparison)."""
    top_k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_idx = order // top_k
    sizes = torch.bincount(flat, minlength=len(experts)).tolist()
    routed = hidden_states[token_idx].split(sizes)
    outs = torch.cat([e(x) for e, x, n in zip(experts, routed, sizes) if n])
    outs = outs * top_k_weights.reshape(-1)[order, None]
    return torch.zeros_like(hidden_states).index_add_(0, token_idx, outs)


def bench_experts(yuan, qwen, args) -> list[dict]:
    rows = []
    variants = experts_variants(yuan, qwen)
    for T in args.expert_tokens:
        g = torch.Generator().manual_seed(T)
        x = torch.randn(T, args.hidden, generator=g)
        probs = torch.randn(T, args.experts, generator=g).softmax(-1)
        w, idx = probs.topk(args.top_k)
        w = w / w.sum(-1, keepdim=True)
        names = [n for n in variants if not (T > 64 and ("dense" in n or "batched" in n))]  # E/k x the work
        times = {n: [] for n in names}
        with torch.inference_mode():
            ref = variants[names[0]](x, idx, w)
            err = {n: (variants[n](x, idx, w) - ref).abs().max().item() for n in names}
            for _ in range(args.reps * (4 if T == 1 else 2)):
                for n in names:
                    t0 = time.perf_counter()
                    variants[n](x, idx, w)
                    times[n].append(time.perf_counter() - t0)
        base = statistics.median(times[names[0]])
        for n in names:
            t = statistics.median(times[n])
            rows.append({"tokens": T, "variant": n, "ms": t * 1e3, "speedup": base / t, "max_err": err[n]})
    return rows


# --------------------------------------------------------------------------------------------------------------
# 2. decode: eager vs compiled static cache, and Qwen2-MoE


def make_cache(model, kind: str, batch: int, max_len: int):
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    return DynamicCache(config=model.config)


def decode_variants(yuan, qwen):
    # name -> (model, experts implementation or None, cache kind, compiled)
    return {
        "yuan eager, dynamic cache (sort-based experts)": (yuan, "eager", "dynamic", False),
        "yuan eager, dynamic cache, grouped_mm": (yuan, "grouped_mm", "dynamic", False),
        "yuan eager, static cache, grouped_mm": (yuan, "grouped_mm", "static", False),
        "yuan compiled, static cache, grouped_mm": (yuan, "grouped_mm", "static", True),
        "qwen2moe eager, dynamic cache": (qwen, None, "dynamic", False),
        "qwen2moe compiled, static cache": (qwen, None, "static", True),
    }


def bench_decode(yuan, qwen, args) -> list[dict]:
    from yuan_hf.modeling.transformers_compat import CACHE_FIELD

    rows = []
    compiled = {id(yuan): torch.compile(yuan.forward, fullgraph=True), id(qwen): torch.compile(qwen.forward, fullgraph=True)}
    for batch in args.batches:
        for ctx in args.contexts:
            g = torch.Generator().manual_seed(ctx + batch)
            prompt = torch.randint(10, args.vocab, (batch, ctx), generator=g)
            state, times = {}, {}
            with torch.inference_mode():
                for name, (model, impl, kind, is_compiled) in decode_variants(yuan, qwen).items():
                    if impl:
                        use(model, impl)
                    cache = make_cache(model, kind, batch, ctx + args.new_tokens + args.warmup + 2)
                    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache})
                    tok = out.logits[:, -1:].argmax(-1)
                    fn = compiled[id(model)] if is_compiled else model.forward
                    t0 = time.perf_counter()
                    for step in range(args.warmup):  # compiles here for compiled variants
                        pos = torch.full((batch, 1), ctx + step)
                        tok = fn(input_ids=tok, position_ids=pos, use_cache=True, **{CACHE_FIELD: cache}).logits.argmax(-1)
                    log(f"  {batch}x{ctx} {name}: warm-up {time.perf_counter() - t0:.1f} s")
                    state[name] = [model, impl, fn, cache, tok, ctx + args.warmup]
                    times[name] = []
                for _ in range(args.new_tokens):
                    for name, s in state.items():
                        model, impl, fn, cache, tok, pos = s
                        if impl:
                            use(model, impl)
                        position_ids = torch.full((batch, 1), pos)
                        t0 = time.perf_counter()
                        tok = fn(input_ids=tok, position_ids=position_ids, use_cache=True, **{CACHE_FIELD: cache}).logits.argmax(-1)
                        times[name].append(time.perf_counter() - t0)
                        s[4], s[5] = tok, pos + 1
            base = statistics.median(times[next(iter(times))])
            for name, ts in times.items():
                t = statistics.median(ts)
                rows.append({"batch": batch, "context": ctx, "variant": name, "ms_per_step": t * 1e3,
                             "tok_per_s": batch / t, "speedup": base / t})  # fmt: skip
    return rows


def bench_prefill(yuan, qwen, args) -> list[dict]:
    rows = []
    batch, seq = args.prefill
    ids = torch.randint(10, args.vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    variants = {"yuan eager (sort-based)": (yuan, "eager"), "yuan grouped_mm": (yuan, "grouped_mm"), "qwen2moe": (qwen, None)}
    times = {n: [] for n in variants}
    with torch.inference_mode():
        for rep in range(args.reps + 1):
            for name, (model, impl) in variants.items():
                if impl:
                    use(model, impl)
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
                if rep:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["yuan eager (sort-based)"])
    for name, ts in times.items():
        t = statistics.median(ts)
        rows.append({"shape": f"{batch}x{seq}", "variant": name, "ms": t * 1e3, "tok_per_s": batch * seq / t, "speedup": base / t})
    return rows


# --------------------------------------------------------------------------------------------------------------


def log(*a):
    print(*a, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--contexts", default="128,1024")
    p.add_argument("--expert-tokens", default="1,8,512")
    p.add_argument("--prefill", default="1x512")
    p.add_argument("--new-tokens", type=int, default=12, help="timed decode steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps (compilation happens here)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma list of sections to skip: experts, decode, prefill")
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.expert_tokens = [int(t) for t in args.expert_tokens.split(",")]
    args.prefill = tuple(int(v) for v in args.prefill.lower().split("x"))
    args.skip = set(filter(None, args.skip.split(",")))
    # fields inference_models.build_config reads
    args.kv_heads, args.new_tokens_max = 0, args.new_tokens
    args.yuan_router, args.qwen_shared_ffn = "attention", 0
    return args


def render(args, env, experts, decode, prefill) -> str:
    lines = [f"Command: `PYTHONPATH=src python benchmarks/decode_fast.py {' '.join(args.argv)}`".rstrip() + "  ",
             f"Machine: {env['cpu']}, {args.threads} threads, torch {torch.__version__}; load average {env['load_before']} "
             f"before, {env['load_after']} after.  ",
             f"Shape: hidden {args.hidden}, {args.layers} layers, {args.heads} x {args.head_dim} heads, {args.experts} "
             f"experts top-{args.top_k}, FFN {args.ffn}, vocab {args.vocab}, fp32, random weights.", ""]  # fmt: skip
    if experts:
        lines += ["### Experts dispatch (one layer, [T, H] in)", "", "| T | variant | ms | vs sort-based | max abs diff |", "|---|---|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['variant']} | {r['ms']:.2f} | {r['speedup']:.2f}x | {r['max_err']:.1e} |" for r in experts]
        lines.append("")
    if decode:
        lines += ["### Decode (per step, median)", "", "| batch x context | variant | ms/step | tok/s | vs yuan eager dynamic |", "|---|---|---|---|---|"]
        lines += [f"| {r['batch']} x {r['context']} | {r['variant']} | {r['ms_per_step']:.1f} | {r['tok_per_s']:.1f} | {r['speedup']:.2f}x |" for r in decode]
        lines.append("")
    if prefill:
        lines += ["### Prefill", "", "| shape | variant | ms | tok/s | vs yuan eager |", "|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['variant']} | {r['ms']:.0f} | {r['tok_per_s']:.0f} | {r['speedup']:.2f}x |" for r in prefill]
    return "\n".join(lines) + "\n"


def main(argv=None):
    import sys

    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64  # one graph per (model, batch, context, experts implementation)
    env = {"cpu": machine_description(args.threads).get("cpu", "?"), "load_before": loadavg()}
    yuan, qwen = build_models(args)
    experts = bench_experts(yuan, qwen, args) if "experts" not in args.skip else []
    for r in experts:
        log(f"experts T={r['tokens']:4d} {r['variant']:45s} {r['ms']:8.2f} ms  {r['speedup']:.2f}x  err {r['max_err']:.1e}")
    prefill = bench_prefill(yuan, qwen, args) if "prefill" not in args.skip else []
    for r in prefill:
        log(f"prefill {r['shape']} {r['variant']:30s} {r['ms']:8.0f} ms {r['speedup']:.2f}x")
    decode = bench_decode(yuan, qwen, args) if "decode" not in args.skip else []
    for r in decode:
        log(f"decode {r['batch']}x{r['context']} {r['variant']:48s} {r['ms_per_step']:7.1f} ms {r['speedup']:.2f}x")
    env["load_after"] = loadavg()
    text = render(args, env, experts, decode, prefill)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
