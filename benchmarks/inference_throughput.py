#!/usr/bin/env python
"""CPU inference throughput of Yuan 2.0-M32 (yuan_hf) next to transformers' own MoE models at matched sizes.

Measures, for every model and dtype, side by side in ONE process with the same thread count (the models
alternate every repetition, and every token in manual decode, so background load hits them alike):

* prefill tokens/s: one forward of `--prefill-shapes` prompts (e.g. 1x512, 4x128) with a cache, as `generate`'s
  first step does (`use_cache=True, logits_to_keep=1`);
* decode tokens/s at `--contexts` tokens of context: a prompt is prefilled once, then every repetition decodes
  `--new-tokens` greedy tokens from a copy of that cache, one forward per token, each token timed on its own,
  so prefill is excluded (`--decode-method manual`, default) -- or the same through `model.generate` with
  `min_new_tokens=max_new_tokens` and a logits processor that timestamps every step (`--decode-method generate`);
* decode time per token against the number of generated tokens (first vs last `--window` tokens, and a
  least-squares slope) next to the cost of one more cached token, `(t(ctx_max) - t(ctx_min)) / (ctx_max - ctx_min)`;
* peak memory: growth of the process' peak RSS (VmHWM, reset through /proc/self/clear_refs) over the RSS before
  the workload, after `malloc_trim` -- activations, KV/conv cache and allocator slack, not the weights
  (reported apart as parameter bytes); tracemalloc would not see torch's allocations;
* parameter counts (total and active per token) and analytic FLOPs per token, cross-checked with
  `torch.utils.flop_counter.FlopCounterMode` on one decode step (which does not count CPU SDPA).

Random weights (seeded), no checkpoint, no network. Default config: hidden 1024, 8 layers, 32 experts top-2,
expert FFN 2048, 8 heads of head_dim 256 (attention width 2H, as Yuan), vocab 32000, tied embeddings. The
Qwen2-MoE baseline uses the same sizes with the shared expert disabled (`shared_expert_intermediate_size=0`:
its 1-wide shared-expert gate and empty Linears still run, a negligible cost), no QKV bias and normalised top-k;
Mixtral (optional) likewise. Fairness measures, each explained where it is implemented:

* the models share the tensors they have in common (embeddings, Q/K/V/O, expert FFNs) as views of one model's,
  so two fp32 models fit in RAM (`--no-share` to give each its own);
* `--routing balanced` (default): every router still runs, but all models then use the same evenly loaded
  expert schedule -- random routers are unbalanced, differently for each architecture (`--routing model`);
* all parameters require grad, as after `from_pretrained` (it changes some CPU kernels even in inference mode);
* `--wait-idle S` waits up to S seconds before each timed sample for other processes to go quiet, and the
  report gives the CPU share other processes used: with 2 threads on 2 shared cores, OpenMP regions stall
  whenever another process holds a core.

Models and their counts are in `inference_models.py`, machine/memory/contention helpers shared by every
benchmark in `bench_utils.py`; this file is the timing loop, the CLI and the report.

Run from the repository root:

    PYTHONPATH=src python benchmarks/inference_throughput.py                      # defaults, ~4.5 min on 2 idle cores
    PYTHONPATH=src python benchmarks/inference_throughput.py --reps 5 --wait-idle 5 --markdown out.md
    PYTHONPATH=src python benchmarks/inference_throughput.py --models yuan,qwen2moe,mixtral --dtypes bf16 \
        --decode-method generate
    PYTHONPATH=src python benchmarks/inference_throughput.py --hidden 256 --layers 2 --experts 8 --ffn 512 \
        --head-dim 64 --heads 8 --vocab 4096 --contexts 32,64 --new-tokens 16 --window 4 --prefill-shapes 1x64 \
        --reps 1   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from bench_utils import (
    WAITED,
    cpu_snapshot,
    loadavg,
    machine_description,
    malloc_trim,
    other_cpu_share,
    peak_rss_delta,
    proc_status_bytes,
    wait_idle,
)
from inference_models import (
    DTYPES,
    MODEL_LABELS,
    analytic_flops_per_token,
    build_model,
    cast_models,
    counted_decode_flops,
    param_counts,
)

# --------------------------------------------------------------------------------------------------------------
# timing


def prefill_once(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        _ = out.logits[:, -1].argmax(-1)
        return time.perf_counter() - t0


def prefill_cache(model, prompt: torch.Tensor):
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


def decode_manual(model, cache, first_token: torch.Tensor, new_tokens: int) -> tuple[list[float], list[int]]:
    """Greedy decode with the model's own cache, one forward per token; returns per-token seconds and tokens."""
    times, tokens = [], []
    tok = first_token
    with torch.inference_mode():
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            tokens.append(int(tok))
            times.append(time.perf_counter() - t0)
    return times, tokens


def decode_interleaved(models: dict, caches: dict, first_tokens: dict, new_tokens: int) -> dict:
    """`decode_manual` for several models at once, alternating the models token by token, so that a burst of
    background load lands on all of them alike. Returns {name: (per-token seconds, tokens)}."""
    out = {name: ([], []) for name in models}
    toks = dict(first_tokens)
    with torch.inference_mode():
        for _ in range(new_tokens):
            for name, model in models.items():
                t0 = time.perf_counter()
                logits = model(input_ids=toks[name], past_key_values=caches[name], use_cache=True).logits
                toks[name] = logits[:, -1:].argmax(-1)
                out[name][1].append(int(toks[name]))
                out[name][0].append(time.perf_counter() - t0)
    return out


def decode_generate(model, cache, prompt: torch.Tensor, new_tokens: int) -> tuple[list[float], list[int]]:
    """Greedy `generate` (forced length) from a cache holding all prompt tokens but the last one; per-step times
    from a timestamping logits processor. The first step (the prompt's last token + generate's set-up) is
    dropped, so the returned list has `new_tokens - 1` decode steps."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    with torch.inference_mode():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            past_key_values=cache,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([Stamp()]),
            pad_token_id=0,
        )
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    return times, out[0, prompt.shape[1] :].tolist()


def slope_per_token(times: list[float]) -> float:
    """Least-squares slope of per-token time against token index (seconds per generated token)."""
    n = len(times)
    if n < 2:
        return float("nan")
    xm, ym = (n - 1) / 2, statistics.fmean(times)
    num = sum((i - xm) * (t - ym) for i, t in enumerate(times))
    den = sum((i - xm) ** 2 for i in range(n))
    return num / den


@dataclass
class DecodeResult:
    runs: list[list[float]] = field(default_factory=list)  # per repetition: per-token seconds
    tokens: list[list[int]] = field(default_factory=list)

    def per_token(self) -> float:  # median over repetitions of the run's median
        return statistics.median(statistics.median(r) for r in self.runs)

    def window(self, first: bool, w: int) -> float:
        return statistics.median(statistics.median(r[:w] if first else r[-w:]) for r in self.runs)

    def slope(self) -> float:
        return statistics.median(slope_per_token(r) for r in self.runs)


# --------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="yuan,qwen2moe", help="comma list of yuan, qwen2moe, mixtral (first = reference for nothing; ratios are yuan / each other)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=0, help="0: = heads (Yuan has no GQA)")
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ffn", type=int, default=2048, help="expert SwiGLU width")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--qwen-shared-ffn", type=int, default=0, help="Qwen2-MoE shared expert width (0: none)")
    p.add_argument("--yuan-router", default="attention", choices=["attention", "linear"])
    p.add_argument("--routing", default="balanced", choices=["balanced", "model"],
                   help="balanced: same pseudo-random, evenly loaded expert schedule for every model (router still computed); model: the random routers' own choice")
    p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--experts-implementation", default=None, help="for the transformers models: grouped_mm (their default), batched_mm, eager")
    p.add_argument("--prefill-shapes", default="1x512,4x128", help="comma list of BATCHxSEQ")
    p.add_argument("--contexts", default="128,1024", help="comma list of decode context lengths")
    p.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per repetition")
    p.add_argument("--window", type=int, default=16, help="tokens in the first/last window of the per-token curve")
    p.add_argument("--decode-method", default="manual", choices=["manual", "generate"])
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (decode warm-up uses 8 tokens)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions; medians are reported")
    p.add_argument("--wait-idle", type=float, default=0.0, help="before each timed sample wait up to this many seconds for other processes to go quiet (0: off)")
    p.add_argument("--idle-threshold", type=float, default=0.15, help="share of the CPUs other processes may use for --wait-idle")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--no-share", action="store_true", help="give every model its own weights (needs ~7 GB more RAM in fp32)")
    p.add_argument("--skip-flop-count", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", default=None, help="also write the result tables (Markdown) to this file")
    p.add_argument("--json", default=None, help="also write raw results (per-token times included) as JSON")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.prefill_shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.prefill_shapes.split(",") if s]
    args.contexts = [int(c) for c in args.contexts.split(",") if c]
    for m in args.models:
        if m not in MODEL_LABELS:
            p.error(f"unknown model {m!r}; choose from {sorted(MODEL_LABELS)}")
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    if args.new_tokens < 2 * args.window:
        p.error("--new-tokens must be at least 2 * --window")
    return args


def log(*a):
    print(*a, flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    env = machine_description(args.threads)
    env["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env["loadavg_start"] = loadavg()
    command = "PYTHONPATH=src python benchmarks/inference_throughput.py" + "".join(
        f" {a}" if a.startswith("-") or " " not in a else f" '{a}'" for a in (sys.argv[1:] if argv is None else argv)
    )
    log(f"# {command}\n# {json.dumps(env)}")

    import yuan_hf  # noqa: F401  (registers yuan_m32)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    # the first transformers model owns the tensors the models share (see build_model)
    owner_name = next((n for n in args.models if n != "yuan"), None) if not args.no_share else None
    build_order = sorted(args.models, key=lambda n: n != owner_name)
    models: dict[str, torch.nn.Module] = {}
    info: dict[str, dict] = {}
    for name in build_order:
        t0 = time.perf_counter()
        models[name] = build_model(name, args, owner=models.get(owner_name) if name != owner_name else None)
        m = models[name]
        info[name] = {
            "params": param_counts(m, args),
            "attn": m.config._attn_implementation,
            "experts_impl": "sort + per-expert nn.Linear" if name == "yuan" else m.config._experts_implementation,
            "init_s": time.perf_counter() - t0,
        }
        ctx_mid = args.contexts[0]
        info[name]["flops_prefill_token"] = {
            f"{b}x{s}": analytic_flops_per_token(name, args, (s + 1) / 2, with_head=False, decode=False)
            + 2 * args.hidden * args.vocab / s  # logits of the last position only
            for b, s in args.prefill_shapes
        }
        info[name]["flops_decode_token"] = {c: analytic_flops_per_token(name, args, c + 1) for c in args.contexts}
        if not args.skip_flop_count:
            info[name]["flops_decode_counted"] = counted_decode_flops(m, ctx_mid, args)
        pc = info[name]["params"]
        log(
            f"[{name}] built in {info[name]['init_s']:.1f}s: {pc['total']/1e6:.1f}M params, {pc['active']/1e6:.1f}M active/token; "
            f"decode GFLOP/token @ctx {ctx_mid}: analytic {info[name]['flops_decode_token'][ctx_mid]/1e9:.4f}"
            + (f", FlopCounterMode {info[name]['flops_decode_counted']/1e9:.4f}" if "flops_decode_counted" in info[name] else "")
            + f"; attn={info[name]['attn']}, experts={info[name]['experts_impl']}"
        )

    models = {n: models[n] for n in args.models}
    info = {n: info[n] for n in args.models}
    shared = {n: len(getattr(m, "_bench_shared", [])) for n, m in models.items() if n != owner_name}
    if owner_name:
        log(f"shared tensors (views of {owner_name}'s): {shared}; process RSS {proc_status_bytes('VmRSS')/2**30:.1f} GiB")

    gen = torch.Generator().manual_seed(args.seed + 1)
    prefill_inputs = {shape: torch.randint(4, args.vocab, shape, generator=gen) for shape in args.prefill_shapes}
    prompts = {c: torch.randint(4, args.vocab, (1, c), generator=gen) for c in args.contexts}

    results: dict = {}
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        cast_models(models, owner_name, dtype)
        gc.collect()
        malloc_trim()
        res = results.setdefault(dname, {name: {"prefill": {}, "decode": {}, "memory": {}} for name in models})
        for name, m in models.items():
            res[name]["weights_bytes"] = sum(p.numel() * p.element_size() for p in m.parameters())

        cpu0 = cpu_snapshot()
        measure_memory = not args.skip_memory
        for m in models.values():
            m._bench_routing.__init__()  # routing statistics of this dtype's prefills

        # ---- prefill: warm-up (the first one also measures peak memory), then reps alternating the models
        for shape, ids in prefill_inputs.items():
            key = f"{shape[0]}x{shape[1]}"
            for name, m in models.items():
                for i in range(max(args.warmup, int(measure_memory))):
                    if i == 0 and measure_memory:
                        r: dict = {}
                        with peak_rss_delta(r):
                            prefill_once(m, ids)
                        res[name]["memory"][f"prefill {key}"] = r["bytes"]
                    else:
                        prefill_once(m, ids)
            samples = {name: [] for name in models}
            for _ in range(args.reps):
                for name, m in models.items():
                    wait_idle(args)
                    samples[name].append(prefill_once(m, ids))
            for name in models:
                t = statistics.median(samples[name])
                res[name]["prefill"][key] = {"s": t, "tok_s": shape[0] * shape[1] / t, "best_tok_s": shape[0] * shape[1] / min(samples[name]), "samples": samples[name]}
                log(f"[{dname}] prefill {key:>8} {name:>9}: {shape[0]*shape[1]/t:8.1f} tok/s  (median {t*1e3:.0f} ms; samples {[round(s*1e3) for s in samples[name]]})")

        # ---- decode: prefill each context once per model (with the warm-up decode, measured for peak memory),
        #      then every repetition decodes from a fresh copy of that cache
        warm_tokens = min(8, args.new_tokens)
        for ctx, prompt in prompts.items():
            caches = {}
            for name, m in models.items():
                r = {}
                with peak_rss_delta(r) if measure_memory else contextlib.nullcontext():
                    if args.decode_method == "manual":
                        caches[name] = prefill_cache(m, prompt)
                    else:
                        caches[name] = (prefill_cache(m, prompt[:, :-1])[0], None)
                    for _ in range(max(args.warmup, int(measure_memory))):
                        cache = copy.deepcopy(caches[name][0])
                        if args.decode_method == "manual":
                            decode_manual(m, cache, caches[name][1], warm_tokens)
                        else:
                            decode_generate(m, cache, prompt, warm_tokens)
                        del cache
                if measure_memory:
                    res[name]["memory"][f"prefill {ctx} + decode {warm_tokens}"] = r["bytes"]
            dec = {name: DecodeResult() for name in models}
            for _ in range(args.reps):
                if args.decode_method == "manual":  # models alternate token by token
                    wait_idle(args)
                    copies = {name: copy.deepcopy(c[0]) for name, c in caches.items()}
                    runs = decode_interleaved(models, copies, {name: c[1] for name, c in caches.items()}, args.new_tokens)
                    del copies
                else:  # models alternate run by run
                    runs = {}
                    for name, m in models.items():
                        wait_idle(args)
                        runs[name] = decode_generate(m, copy.deepcopy(caches[name][0]), prompt, args.new_tokens)
                for name, (times, toks) in runs.items():
                    dec[name].runs.append(times)
                    dec[name].tokens.append(toks)
            del caches
            for name, d in dec.items():
                if any(t != d.tokens[0] for t in d.tokens):
                    log(f"WARNING: {name} generated different tokens across repetitions (cache copy not independent?)")
                w = args.window
                per_tok = d.per_token()
                res[name]["decode"][ctx] = {
                    "s_per_token": per_tok,
                    "tok_s": 1 / per_tok,
                    "best_tok_s": 1 / min(statistics.median(r) for r in d.runs),
                    "first_window_s": d.window(True, w),
                    "last_window_s": d.window(False, w),
                    "slope_s_per_token": d.slope(),
                    "runs": d.runs,
                }
                log(
                    f"[{dname}] decode ctx {ctx:>5} {name:>9}: {1/per_tok:7.2f} tok/s ({per_tok*1e3:.1f} ms/token; "
                    f"tokens 1-{w}: {d.window(True, w)*1e3:.1f} ms, last {w}: {d.window(False, w)*1e3:.1f} ms, "
                    f"slope {d.slope()*1e6:+.1f} us/token; run medians {[round(statistics.median(r)*1e3, 1) for r in d.runs]} ms)"
                )
        if measure_memory:
            for name in models:
                log(f"[{dname}] peak RSS delta {name:>9}: " + ", ".join(f"{k}: {v/2**20:.0f} MiB" for k, v in res[name]["memory"].items()))
        for name, m in models.items():
            st = m._bench_routing
            if st.hit:
                res[name]["routing"] = {
                    "experts_hit": statistics.fmean(st.hit),
                    "max_over_mean_load": statistics.fmean(
                        mx / (t * args.top_k / args.experts) for mx, t in zip(st.max_load, st.tokens)
                    ),
                }
                log(f"[{dname}] routing {name:>9}: experts hit per layer {res[name]['routing']['experts_hit']:.1f} of {args.experts}, "
                    f"max/mean expert load {res[name]['routing']['max_over_mean_load']:.2f} ({args.routing})")
        res["_other_cpu_share"] = other_cpu_share(cpu0)
        log(f"[{dname}] done at {time.perf_counter() - t_start:.0f}s, loadavg {loadavg()}, CPU share used by other processes {res['_other_cpu_share']:.0%}")

    env["loadavg_end"] = loadavg()
    env["waited_for_idle_s"] = round(WAITED["s"], 1)
    env["total_s"] = round(time.perf_counter() - t_start, 1)
    report = render_markdown(command, env, args, info, results)
    log("\n" + report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "env": env, "info": info, "results": results}, f, default=str)
    return {"env": env, "info": info, "results": results}


def render_markdown(command: str, env: dict, args, info: dict, results: dict) -> str:
    names = list(info)
    ref = "yuan" if "yuan" in names else None
    others = [n for n in names if n != ref]
    blank_ratios = " |" * len(others) if ref else ""
    L = [f"Command: `{command}`\n"]
    L.append(
        f"Machine: {env['cpu']}, {env['logical_cpus']} logical CPUs, {env['ram_gib']} GiB RAM, torch CPU capability "
        f"{env['cpu_capability']}, `torch.set_num_threads({env['threads']})`; {env['os']}. Versions: Python {env['python']}, "
        f"torch {env['torch']}, transformers {env['transformers']}; yuan_hf at commit {env['commit']}. Date: {env['date']}. Load average at start / end: "
        f"{env['loadavg_start']} / {env['loadavg_end']}. Total runtime {env['total_s']} s"
        + (f", of which {env['waited_for_idle_s']} s waiting for other processes to go quiet (--wait-idle)" if env["waited_for_idle_s"] else "")
        + ".\n"
    )
    L.append(
        f"Config: hidden {args.hidden}, {args.layers} layers, {args.heads} heads x head_dim {args.head_dim} "
        f"(attention width {args.heads * args.head_dim}), kv heads {args.kv_heads or args.heads}, {args.experts} experts "
        f"top-{args.top_k}, expert FFN {args.ffn}, vocab {args.vocab}, tied embeddings, random weights (seed {args.seed}); "
        f"Qwen2-MoE shared expert width {args.qwen_shared_ffn}. Routing: `{args.routing}`. Decode: `{args.decode_method}`, {args.new_tokens} new "
        f"tokens per repetition; warm-up {args.warmup}, {args.reps} repetitions; the models alternate every "
        f"repetition (prefill, generate) or every token (manual decode). Medians, [best repetition].\n"
    )
    ctx_list = ", ".join(map(str, args.contexts))
    shapes = list(next(iter(info.values()))["flops_prefill_token"])
    L.append(
        f"| model | params total | active / token | analytic GFLOP/token: prefill {', '.join(shapes)} | decode @ctx "
        f"{ctx_list} | FlopCounterMode, decode @{args.contexts[0]} (no SDPA) | attention | experts |"
    )
    L.append("|---|---|---|---|---|---|---|---|")
    for n in names:
        i = info[n]
        fp = " / ".join(f"{v/1e9:.3f}" for v in i["flops_prefill_token"].values())
        fl = " / ".join(f"{i['flops_decode_token'][c]/1e9:.3f}" for c in args.contexts)
        cnt = f"{i['flops_decode_counted']/1e9:.3f}" if "flops_decode_counted" in i else "-"
        L.append(
            f"| {MODEL_LABELS[n]} | {i['params']['total']/1e6:.1f} M | {i['params']['active']/1e6:.1f} M | {fp} | {fl} "
            f"| {cnt} | {i['attn']} | {i['experts_impl']} |"
        )
    if ref and others:
        o = others[0]
        L.append(
            f"\nYuan / {MODEL_LABELS[o].split(' ')[0]} work per token: active parameters "
            f"{info[ref]['params']['active'] / info[o]['params']['active']:.3f}x, analytic FLOPs prefill "
            + " / ".join(f"{info[ref]['flops_prefill_token'][k] / info[o]['flops_prefill_token'][k]:.3f}x" for k in shapes)
            + ", decode "
            + " / ".join(f"{info[ref]['flops_decode_token'][c] / info[o]['flops_decode_token'][c]:.3f}x" for c in args.contexts)
            + f" -- a throughput ratio of about the inverse ({1 / (info[ref]['params']['active'] / info[o]['params']['active']):.2f}x) "
            "means equal efficiency."
        )
    L.append("")
    for dname, res in results.items():
        L.append(f"### {dname} (other processes used {res['_other_cpu_share']:.0%} of the CPUs meanwhile)\n")
        head = ["metric"] + [MODEL_LABELS[n] for n in names] + [f"Yuan / {MODEL_LABELS[o].split(' ')[0]}" for o in (others if ref else [])]
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "---|" * len(head))

        def row(label, vals, best=None, higher_better=True, fmt="{:.1f}"):
            cells = [fmt.format(vals[n]) + (f" [{fmt.format(best[n])}]" if best else "") for n in names]
            if ref:
                for o in others:
                    r = vals[ref] / vals[o] if higher_better else vals[o] / vals[ref]
                    rb = f" [{best[ref] / best[o]:.2f}x]" if best else ""
                    cells.append(f"{r:.2f}x{rb}")
            L.append(f"| {label} | " + " | ".join(cells) + " |")

        for key in res[names[0]]["prefill"]:
            row(f"prefill {key}, tok/s median [best]", {n: res[n]["prefill"][key]["tok_s"] for n in names},
                {n: res[n]["prefill"][key]["best_tok_s"] for n in names})  # fmt: skip
        for ctx in res[names[0]]["decode"]:
            row(f"decode @ctx {ctx}, tok/s median [best]", {n: res[n]["decode"][ctx]["tok_s"] for n in names},
                {n: res[n]["decode"][ctx]["best_tok_s"] for n in names}, fmt="{:.2f}")  # fmt: skip
        w = args.window
        for ctx in res[names[0]]["decode"]:
            d = {n: res[n]["decode"][ctx] for n in names}
            cells = [
                f"{d[n]['first_window_s']*1e3:.1f} / {d[n]['last_window_s']*1e3:.1f} / {d[n]['slope_s_per_token']*1e6:+.0f}"
                for n in names
            ]
            L.append(f"| @ctx {ctx}: ms/token, tokens 1-{w} / last {w} / slope (us per generated token) | " + " | ".join(cells) + " |" + blank_ratios)
        ctxs = list(res[names[0]]["decode"])
        if len(ctxs) >= 2:
            lo, hi = min(ctxs), max(ctxs)
            cells = [
                f"{(res[n]['decode'][hi]['s_per_token'] - res[n]['decode'][lo]['s_per_token']) / (hi - lo) * 1e6:+.1f}"
                for n in names
            ]
            L.append(f"| attention's context cost (t@{hi} - t@{lo}) / {hi - lo}, us per context token | " + " | ".join(cells) + " |" + blank_ratios)
        for key in res[names[0]]["memory"]:
            row(f"peak RSS delta, {key} (MiB)", {n: res[n]["memory"][key] / 2**20 for n in names}, higher_better=False, fmt="{:.0f}")
        row("weights (MiB)", {n: res[n]["weights_bytes"] / 2**20 for n in names}, higher_better=False, fmt="{:.0f}")
        if all("routing" in res[n] for n in names):
            cells = [f"{res[n]['routing']['experts_hit']:.1f} / {res[n]['routing']['max_over_mean_load']:.2f}" for n in names]
            L.append(f"| multi-token forwards: experts hit per layer (of {args.experts}) / max-to-mean expert load "
                     f"(routing: {args.routing}) | " + " | ".join(cells) + " |" + blank_ratios)
        L.append("")
    L.append(
        "Ratios: Yuan / baseline throughput (> 1: Yuan faster), the bracketed one from the best repetitions; memory rows "
        "baseline / Yuan (> 1: Yuan uses less). Per-token slope: least-squares fit of decode time against the index of "
        "the generated token (median over repetitions); compare with the context cost row (the cost of one more cached "
        "token measured between the two contexts). Peak RSS delta: process VmHWM (reset via /proc/self/clear_refs) "
        "minus RSS before the workload (after malloc_trim), measured on the first warm-up run: activations, KV/conv "
        "cache and allocator slack, not the weights."
    )
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
