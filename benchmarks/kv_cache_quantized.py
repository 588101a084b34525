"""Quantized hybrid KV cache (`YuanM32QuantizedCache`): memory at 2K/8K/16K tokens vs bf16, and logit drift / greedy
agreement vs the unquantized cache on a trained toy model.

    pip install optimum-quanto hqq   # the backends
    PYTHONPATH=src python benchmarks/kv_cache_quantized.py --markdown benchmarks/results_kv_cache.md

Memory: one decoder layer of the released shape (16 heads x 256 dims, bf16 K/V, hidden 2048 for the LF state) filled
through the cache's own `update` / `update_conv_state` (prefill of N - 8 tokens, then 8 decode steps, so the
full-precision residual window is in its usual state), bytes counted from the tensors the layer holds (quantized
data, scales, zero points, residual, conv state); 24 layers scale it to the whole model.

Quality: a toy Yuan (hidden 128, 2 layers, 2 heads x 64, 8 experts top-2) trained on a long-range copy task (a random
64-token segment repeated: predicting a repeat needs attention 64+ tokens back), then held-out sequences decoded with
the unquantized DynamicCache and with each quantized cache (residual window 32, so nearly all K/V is quantized):
teacher-forced per-step logits (max |diff| of log-probs, mean KL, argmax agreement) and free greedy agreement.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bench_utils import loadavg

from yuan_hf import YuanM32Config, YuanM32ForCausalLM, YuanM32QuantizedCache
from yuan_hf.modeling.transformers_compat import CACHE_FIELD

SETTINGS = [("quanto", 4), ("quanto", 2), ("hqq", 8), ("hqq", 4)]


def tensor_bytes(obj) -> int:
    """Bytes of every tensor reachable from obj (quanto tensor subclasses via __tensor_flatten__, HQQ's meta dict)."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def layer_bytes(layer) -> int:
    held = [layer.keys, layer.values, layer.conv_states]
    held += [getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)]
    return sum(tensor_bytes(t) for t in held if t is not None)


def fill_layer(cache, tokens: int, heads: int, head_dim: int, hidden: int, decode_steps: int = 8) -> None:
    g = torch.Generator().manual_seed(tokens)
    prefill = tokens - decode_steps
    for n in [prefill] + [1] * decode_steps:
        cache.update_conv_state(torch.randn(1, hidden, n, generator=g).bfloat16(), 0, conv_kernel_size=2)
        k = torch.randn(1, heads, n, head_dim, generator=g).bfloat16()
        cache.update(k, torch.randn_like(k), 0)


def memory_rows(args) -> list[dict]:
    config = YuanM32Config(num_hidden_layers=1)  # the released layer shape
    heads, head_dim, hidden = config.num_key_value_heads, config.head_dim, config.hidden_size
    rows = []
    for tokens in args.contexts:
        bf16 = 2 * heads * tokens * head_dim * 2 + 2 * hidden * 2  # K and V in bf16 + the LF state
        rows.append({"tokens": tokens, "cache": "bf16 (DynamicCache)", "bytes": bf16, "ratio": 1.0, "fill_s": 0.0})
        for backend, nbits in SETTINGS:
            cache = YuanM32QuantizedCache(config, backend=backend, nbits=nbits, residual_length=args.residual)
            t0 = time.perf_counter()
            fill_layer(cache, tokens, heads, head_dim, hidden)
            rows.append({"tokens": tokens, "cache": f"{backend} {nbits}-bit", "bytes": layer_bytes(cache.layers[0]),
                         "ratio": layer_bytes(cache.layers[0]) / bf16, "fill_s": time.perf_counter() - t0})  # fmt: skip
            del cache
    return rows


# --------------------------------------------------------------------------------------------------------------
# quality on a trained toy model


def toy_config() -> YuanM32Config:
    return YuanM32Config(
        vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, head_dim=64,
        moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        bos_token_id=1, eos_token_id=2, pad_token_id=0, sep_token_id=3,
    )  # fmt: skip


def copy_batch(batch: int, length: int, period: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, length]: a random segment of `period` tokens (ids 10..255) repeated."""
    segment = torch.randint(10, 256, (batch, period), generator=generator)
    return segment.repeat(1, length // period + 1)[:, :length]


def train_toy(args) -> YuanM32ForCausalLM:
    torch.manual_seed(args.seed)
    model = YuanM32ForCausalLM(toy_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.train_steps):
        ids = copy_batch(args.train_batch, args.train_length, args.period, g)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.train_steps - 1:
            print(f"  train step {step}: loss {loss.item():.3f}", flush=True)
    return model.eval()


@torch.no_grad()
def quality_rows(model, args) -> tuple[list[dict], float]:
    g = torch.Generator().manual_seed(args.seed + 1)
    sequences = copy_batch(args.eval_sequences, args.eval_prompt + args.eval_new, args.period, g)
    prompt, target = sequences[:, : args.eval_prompt], sequences[:, args.eval_prompt :]

    def teacher_forced(cache) -> torch.Tensor:  # [steps, b, V] log-probs
        out = model(prompt, use_cache=True, **{CACHE_FIELD: cache})
        steps = [out.logits[:, -1].float().log_softmax(-1)]
        for t in range(args.eval_new - 1):
            out = model(target[:, t : t + 1], use_cache=True, **{CACHE_FIELD: cache})
            steps.append(out.logits[:, -1].float().log_softmax(-1))
        return torch.stack(steps)

    def greedy(cache) -> torch.Tensor:
        kwargs = {CACHE_FIELD: cache} if cache is not None else {}
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.eval_new,
                             min_new_tokens=args.eval_new, do_sample=False, **kwargs)  # fmt: skip
        return out[:, args.eval_prompt :]

    from transformers import DynamicCache

    reference = teacher_forced(DynamicCache(config=model.config))
    reference_greedy = greedy(None)
    accuracy = (reference.argmax(-1).T == target).float().mean().item()
    rows = []
    for backend, nbits in SETTINGS:
        make = lambda: YuanM32QuantizedCache(model.config, backend=backend, nbits=nbits, residual_length=args.eval_residual)  # noqa: E731
        logp = teacher_forced(make())
        kl = (reference.exp() * (reference - logp)).sum(-1).mean().item()
        rows.append({
            "cache": f"{backend} {nbits}-bit", "max_logp_diff": (logp - reference).abs().max().item(), "mean_kl": kl,
            "argmax_agree": (logp.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            "greedy_agree": (greedy(make()) == reference_greedy).float().mean().item(),
        })  # fmt: skip
    return rows, accuracy


def render(args, memory, quality, accuracy, load) -> str:
    lines = [f"Command: `PYTHONPATH=src python benchmarks/kv_cache_quantized.py {' '.join(args.argv)}`".rstrip() + "  ",
             f"torch {torch.__version__}; load average {load[0]} before, {load[1]} after. residual window "
             f"{args.residual} tokens (memory), group size 64.", ""]  # fmt: skip
    if memory:
        lines += ["### KV cache memory, released shape (one layer; x24 for the model)", "",
                  "| tokens | cache | MiB per layer | GB for 24 layers | vs bf16 | fill time (s) |", "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['tokens']} | {r['cache']} | {r['bytes'] / 2**20:.1f} | {24 * r['bytes'] / 1e9:.2f} | "
                  f"{r['ratio']:.3f}x | {r['fill_s']:.1f} |" for r in memory]  # fmt: skip
        lines.append("")
    if quality:
        lines += [f"### Drift vs the unquantized cache, trained toy model (copy accuracy {accuracy:.1%} unquantized; "
                  f"{args.eval_sequences} sequences, prompt {args.eval_prompt}, {args.eval_new} new tokens, residual "
                  f"window {args.eval_residual})", "",
                  "| cache | max abs log-prob diff | mean KL (nats) | argmax agreement (teacher-forced) | greedy agreement |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['cache']} | {r['max_logp_diff']:.3f} | {r['mean_kl']:.2e} | {r['argmax_agree']:.1%} | "
                  f"{r['greedy_agree']:.1%} |" for r in quality]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None):
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contexts", default="2048,8192,16384")
    p.add_argument("--residual", type=int, default=128, help="full-precision window for the memory rows")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-length", type=int, default=192)
    p.add_argument("--period", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-sequences", type=int, default=4)
    p.add_argument("--eval-prompt", type=int, default=160)
    p.add_argument("--eval-new", type=int, default=32)
    p.add_argument("--eval-residual", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="")
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.contexts = [int(c) for c in args.contexts.split(",")]
    torch.set_num_threads(args.threads)
    load_before = loadavg()
    memory = memory_rows(args) if "memory" not in args.skip else []
    for r in memory:
        print(f"{r['tokens']:6d} {r['cache']:22s} {r['bytes'] / 2**20:8.1f} MiB {r['ratio']:.3f}x", flush=True)
    quality, accuracy = ([], 0.0)
    if "quality" not in args.skip:
        quality, accuracy = quality_rows(train_toy(args), args)
    text = render(args, memory, quality, accuracy, (load_before, loadavg()))
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
