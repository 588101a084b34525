"""Peak memory of reading a full-width Yuan 2.0-M32 Megatron checkpoint stage by stage.

    PYTHONPATH=src python benchmarks/megatron_conversion_memory.py                 # 2 layers, TP1 x PP2
    PYTHONPATH=src python benchmarks/megatron_conversion_memory.py --layers 2 --tp 2 --pp 2

Builds a synthetic IEIT Megatron checkpoint of the released model's width (hidden 2048, 16 heads of 256,
32 experts of FFN 8192, vocab 135040, bf16) with ``write_megatron_checkpoint`` (fed by a lazy mapping, so
the writer holds one stage at a time), then runs ``iter_ieit_stages`` over it in a fresh process and
reports that process's peak RSS (``ru_maxrss``) next to the checkpoint size. A real-width layer is about
3.3 GB (its 32 experts are 3.2 GB), so the default 2 layers keep the disk use near 7.7 GB.

``measure(fn, *args)`` runs any callable in a fresh process and returns its result, peak RSS and time:
reuse it for the end-to-end ``convert megatron`` once that exists.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from bench_utils import measure

import torch

RELEASED = {
    "vocab_size": 135040, "hidden_size": 2048, "num_attention_heads": 16, "head_dim": 256,
    "moe_intermediate_size": 8192, "num_experts": 32, "num_experts_per_tok": 2, "max_position_embeddings": 16384,
    "rope_parameters": {"rope_type": "default", "rope_theta": 40890.0, "partial_rotary_factor": 0.5},
}  # fmt: skip


def baseline() -> None:
    """Imports only: the RSS every measured process starts from."""
    import yuan_hf.conversion.megatron  # noqa: F401


class TiledRandomState(Mapping):
    """IEIT-HF key -> bf16 tensor, made on access from a tiled random pool (fast; contents do not matter here)."""

    POOL = 1 << 20

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self.shapes = dict(shapes)
        self.pool = torch.randn(self.POOL + 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def __getitem__(self, key: str) -> torch.Tensor:
        numel = math.prod(self.shapes[key])
        start = zlib.crc32(key.encode()) % 4096
        block = self.pool[start : start + self.POOL]
        out = torch.empty(numel, dtype=torch.bfloat16)
        full, rest = divmod(numel, self.POOL)
        out[: full * self.POOL].view(full, self.POOL).copy_(block.expand(full, -1))
        out[full * self.POOL :] = block[:rest]
        return out.view(self.shapes[key])

    def __contains__(self, key: object) -> bool:
        return key in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def build_args(*, layers: int, tp: int, pp: int, **overrides: int) -> argparse.Namespace:
    from yuan_hf.conversion.writers import megatron_args_for

    return megatron_args_for(RELEASED | overrides | {"num_hidden_layers": layers}, tp=tp, pp=pp)


def write_synthetic(dst: str, args: argparse.Namespace, tp: int, pp: int) -> int:
    """Write the checkpoint; returns its size in bytes."""
    from yuan_hf.conversion.megatron import ieit_key_shapes
    from yuan_hf.conversion.writers import write_megatron_checkpoint

    write_megatron_checkpoint(TiledRandomState(ieit_key_shapes(args)), dst, args=args, tp=tp, pp=pp)
    return sum(p.stat().st_size for p in Path(dst).rglob("*.pt"))


def read_stages(src: str) -> dict[str, int]:
    """What the Megatron path of the converter does before writing: every stage as IEIT-HF tensors."""
    from yuan_hf.conversion.megatron import MegatronCheckpoint, iter_ieit_stages

    largest, tensors = 0, 0
    for stage in iter_ieit_stages(MegatronCheckpoint.open(src)):
        largest = max(largest, sum(t.numel() * t.element_size() for t in stage.values()))
        tensors += len(stage)
        del stage  # else the loop variable keeps this stage alive while the next one is built
    return {"largest_stage_bytes": largest, "tensors": tensors}


def convert_end_to_end(src: str, dst: str, max_shard_size: str) -> dict[str, int]:
    """`yuan-hf convert megatron`: read, transform, write sharded safetensors."""
    from yuan_hf.conversion.megatron import convert_megatron

    summary = convert_megatron(src, dst, dtype="bfloat16", max_shard_size=max_shard_size, progress=False)
    return {"shards": len(summary.shards), "parameters": summary.num_parameters}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=RELEASED["hidden_size"])
    parser.add_argument("--heads", type=int, default=RELEASED["num_attention_heads"])
    parser.add_argument("--head-dim", type=int, default=RELEASED["head_dim"])
    parser.add_argument("--experts", type=int, default=RELEASED["num_experts"])
    parser.add_argument("--ffn", type=int, default=RELEASED["moe_intermediate_size"])
    parser.add_argument("--vocab", type=int, default=RELEASED["vocab_size"])
    parser.add_argument("--workdir", default=None, help="where to put the checkpoint (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint")
    parser.add_argument("--max-shard-size", default="2GB", help="output shard size of the end-to-end conversion")
    opts = parser.parse_args(argv)

    args = build_args(
        layers=opts.layers, tp=opts.tp, pp=opts.pp, hidden_size=opts.hidden, num_attention_heads=opts.heads,
        head_dim=opts.head_dim, num_experts=opts.experts, moe_intermediate_size=opts.ffn, vocab_size=opts.vocab,
    )  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="megatron-bench-", dir=opts.workdir))
    try:
        base = measure(baseline)
        written = measure(write_synthetic, str(workdir / "ckpt"), args, opts.tp, opts.pp)
        read = measure(read_stages, str(workdir / "ckpt"))
        converted = measure(convert_end_to_end, str(workdir / "ckpt"), str(workdir / "native"), opts.max_shard_size)
    finally:
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    model = f"H{opts.hidden} E{opts.experts} F{opts.ffn} V{opts.vocab}, {opts.layers} layers"
    print("| model | TP x PP | checkpoint | largest stage | read: peak RSS | read: time | convert: peak RSS | "
          "convert: time | output shards | write synthetic: peak RSS | baseline RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {model} | {opts.tp} x {opts.pp} | {_gb(written.result)} | {_gb(read.result['largest_stage_bytes'])} | "
        f"{_gb(read.peak_rss_bytes)} | {read.seconds:.0f} s | {_gb(converted.peak_rss_bytes)} | {converted.seconds:.0f} s | "
        f"{converted.result['shards']} x <= {opts.max_shard_size} | {_gb(written.peak_rss_bytes)} | {_gb(base.peak_rss_bytes)} |"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
