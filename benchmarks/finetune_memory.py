"""Peak memory and time of one LoRA training step vs sequence length, chunked vs standard LM loss (CPU).

    python benchmarks/finetune_memory.py                       # writes benchmarks/results_finetune.md
    python benchmarks/finetune_memory.py --lengths 2048 4096   # a subset

Model: a small random Yuan 2.0-M32 (hidden 128, 2 layers, 2 heads of 128 = the release's head_dim = 2H/heads
shape, 8 experts top-2, expert width 512) with a 32000-token vocabulary so the logits matter, plus two rows with
the release's 135040 (its 16K fp32 logits alone are 8.2 GiB). LoRA r=16 on attention + experts, sdpa,
non-reentrant gradient checkpointing, one row of L tokens, all labelled. One step = forward + backward + AdamW.

Memory is measured by the kernel: each configuration runs in a fresh subprocess, which resets its peak RSS
(`/proc/self/clear_refs` = 5) right before the step and reads `VmHWM` after it. "Step peak" = VmHWM - RSS before
the step (what the step itself needs on top of the loaded model). Each subprocess also gets an address-space cap
(RLIMIT_AS) so a configuration that does not fit fails with an allocation error ("OOM" rows) instead of waking
the kernel's OOM killer on a shared machine. Times are wall-clock for the one step (after a short warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench_utils import cpu_name, mem_available_gib, proc_status_bytes

RESULTS = Path(__file__).resolve().parent / "results_finetune.md"
DEFAULT_LENGTHS = (2048, 4096, 8192, 16384)
# the release's vocabulary: the default chunk, the recipes' 1024-token chunk, and the full logits
DEFAULT_EXTRA = ("16384:chunked:135040", "16384:chunked1024:135040", "16384:standard:135040")
LOSS_SPEC = re.compile(r"^(standard|chunked(\d*))$")


def chunk_size(loss: str) -> int:
    """`standard` -> 0 (full logits), `chunked` -> 4096 (the model's default), `chunkedN` -> N."""
    match = LOSS_SPEC.match(loss)
    if match is None:
        raise ValueError(f"loss must be 'standard', 'chunked' or 'chunked<N>', got {loss!r}")
    return 0 if match.group(1) == "standard" else int(match.group(2) or 4096)


def loss_label(loss: str) -> str:
    size = chunk_size(loss)
    return f"chunked, {size}-token chunks" if size else "standard (full logits)"


def run_one(seq_len: int, loss: str, vocab: int, cap_gib: float, threads: int) -> dict:
    """One configuration, in this process (called in a fresh subprocess by `main`)."""
    import gc

    import torch
    from transformers import TrainingArguments  # noqa: F401  (import cost outside the measurement)

    from yuan_hf import YuanM32ForCausalLM
    from yuan_hf.finetune import apply_lora, lora_config
    from yuan_hf.testing import tiny_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=vocab,
        hidden_size=128,
        num_attention_heads=2,
        head_dim=128,
        moe_intermediate_size=512,
        max_position_embeddings=16384,
        loss_chunk_size=chunk_size(loss),
        use_cache=False,
    )
    model = apply_lora(YuanM32ForCausalLM(config), lora_config("all", r=16, dropout=0.0)).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(length: int) -> float:
        ids = torch.randint(6, vocab, (1, length))
        loss_value = model(input_ids=ids, labels=ids).loss
        loss_value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss_value)

    step(256)  # warm-up: kernels, optimizer state
    gc.collect()
    # cap the address space: allocations beyond it fail (MemoryError / RuntimeError) instead of OOM-killing
    limit = int(proc_status_bytes("VmSize") + cap_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rss_before = proc_status_bytes("VmRSS") / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
    start = time.perf_counter()
    result = {"seq_len": seq_len, "loss": loss, "vocab": vocab, "cap_gib": cap_gib, "threads": threads}
    try:
        result["loss_value"] = step(seq_len)
        result["status"] = "ok"
    except (MemoryError, RuntimeError) as error:  # allocation failure under the cap
        if "memory" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        result["status"] = "OOM"
        result["error"] = str(error).splitlines()[0][:160]
    result["seconds"] = time.perf_counter() - start
    result["rss_before_gib"] = rss_before / 1024
    result["step_peak_gib"] = (proc_status_bytes("VmHWM") / 2**20 - rss_before) / 1024
    result["logits_fp32_gib"] = seq_len * vocab * 4 / 2**30
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    parser.add_argument("--losses", nargs="+", default=["chunked", "standard"], help="standard | chunked | chunked<N>")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--extra",
        nargs="*",
        default=list(DEFAULT_EXTRA),
        metavar="SEQ:LOSS:VOCAB",
        help="more configurations (default: 16K tokens with the release's 135040 vocabulary)",
    )
    parser.add_argument(
        "--cap-gib",
        type=float,
        default=None,
        help="extra address space per step (default: 80%% of MemAvailable, <= 12)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared 2-core box)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--one", nargs=3, metavar=("SEQ", "LOSS", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:  # child process
        seq, loss, vocab = args.one
        print("RESULT " + json.dumps(run_one(int(seq), loss, int(vocab), args.cap_gib, args.threads)), flush=True)
        return 0

    cap = args.cap_gib if args.cap_gib is not None else round(min(12.0, 0.8 * mem_available_gib()), 1)
    configs = [(seq, loss, args.vocab) for seq in args.lengths for loss in args.losses]
    for extra in args.extra:
        seq, loss, vocab = extra.split(":")
        configs.append((int(seq), loss, int(vocab)))
    for _, loss, _ in configs:
        chunk_size(loss)  # validate before starting
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    rows = []
    from tqdm.auto import tqdm

    for seq, loss, vocab in tqdm(configs, desc="configurations"):
        command = [sys.executable, __file__, "--one", str(seq), loss, str(vocab)]
        command += ["--cap-gib", str(cap), "--threads", str(args.threads)]
        child = subprocess.run(command, env=env, capture_output=True, text=True)
        line = next((out for out in child.stdout.splitlines() if out.startswith("RESULT ")), None)
        if line is None:  # killed (e.g. by the OOM killer) or crashed
            error = (child.stderr.strip().splitlines() or ["?"])[-1][:160]
            status = f"failed rc={child.returncode}"
            rows.append(
                {"seq_len": seq, "loss": loss, "vocab": vocab, "cap_gib": cap, "status": status, "error": error}
            )
        else:
            rows.append(json.loads(line[len("RESULT ") :]))
        tqdm.write(json.dumps(rows[-1]))
    write_results(rows, args.output, cap=cap, threads=args.threads, total_s=time.perf_counter() - started)
    print(f"wrote {args.output}")
    return 0


def _status_text(row: dict) -> str:
    if row["status"] == "ok":
        return "ok"
    asked = re.search(r"allocate (\d+) bytes", row.get("error", ""))
    if row["status"] == "OOM" and asked:
        return f"**OOM**: a further {int(asked.group(1)) / 2**30:.2f} GiB allocation failed under the cap"
    return f"{row['status']} ({row.get('error', '')})"


def write_results(rows: list[dict], path: Path, *, cap: float, threads: int, total_s: float) -> None:
    import torch

    cpu = cpu_name()
    plural = "s" if threads != 1 else ""
    lines = [
        "# Fine-tuning memory: one LoRA training step vs sequence length (CPU)",
        "",
        "Made by `python benchmarks/finetune_memory.py` (see its docstring for the method). Small random Yuan",
        "2.0-M32 (hidden 128, 2 layers, 2 heads x 128, 8 experts top-2, expert width 512), LoRA r=16 on attention",
        "+ experts, sdpa, non-reentrant gradient checkpointing, one row of L tokens all labelled, AdamW.",
        "",
        f"Hardware: {cpu}, {os.cpu_count()} cores ({threads} torch thread{plural}), torch {torch.__version__}. "
        f"Per-step address-space cap: {cap} GiB (allocations beyond it fail: OOM rows).",
        "Step peak = kernel-measured peak RSS during the step (`VmHWM` after resetting it) minus RSS before the step.",
        "Chunked = `config.loss_chunk_size=N` (the model's default is 4096); standard = `loss_chunk_size=0` (full",
        "fp32 logits). The peak of the chunked loss is about 3 x chunk x vocab x 4 bytes (logits, log-softmax, their",
        "gradient for one chunk), independent of the sequence length.",
        "",
        "| tokens | vocab | LM loss | step peak (GiB) | fp32 logits alone (GiB) | step time (s) | tokens/s | status |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        ok = row["status"] == "ok"
        peak = f"{row['step_peak_gib']:.2f}" if "step_peak_gib" in row else "-"
        seconds = f"{row['seconds']:.1f}" if ok else "-"
        tps = f"{row['seq_len'] / row['seconds']:.0f}" if ok else "-"
        status = _status_text(row)
        logits = row.get("logits_fp32_gib", row["seq_len"] * row["vocab"] * 4 / 2**30)
        lines.append(
            f"| {row['seq_len']} | {row['vocab']} | {loss_label(row['loss'])} | {peak} | {logits:.2f} | {seconds} "
            f"| {tps} | {status} |"
        )
    lines += [
        "",
        f"Whole benchmark: {total_s / 60:.1f} min. Times come from a shared 2-core machine (other jobs were running):",
        "compare rows within one run only.",
        "GPU rows (the recipes on the real 40B model) are pending: this session had no GPU. See recipes/README.md.",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
