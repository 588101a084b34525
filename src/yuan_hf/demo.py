"""The main job on a built-in default: make a tiny checkpoint in IEIT's layout, convert it, load it, generate.

Nothing is downloaded: the weights are random and made here (``yuan-hf demo``).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from .conversion.ieit_hf import convert_ieit_hf, ieit_config_from_native, ieit_state_dict_from_native
from .modeling import YuanM32Config, YuanM32ForCausalLM
from .testing import tiny_config


def make_ieit_checkpoint(dst: str | Path, *, config: YuanM32Config | None = None, seed: int = 0) -> Path:
    """Write a randomly initialised model in IEIT's HF layout (config ``model_type="yuan"``, bf16 safetensors)."""
    config = config or tiny_config()
    torch.manual_seed(seed)
    model = YuanM32ForCausalLM(config)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = ieit_state_dict_from_native(model.state_dict(), config)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(ieit_config_from_native(config), indent=2) + "\n")
    return dst


@contextmanager
def _step(name: str, timings: list[tuple[str, float]]) -> Iterator[None]:
    start = time.perf_counter()
    print(f"==> {name}", flush=True)
    yield
    timings.append((name, time.perf_counter() - start))
    print(f"    done in {timings[-1][1]:.2f} s", flush=True)


def run_demo(workdir: str | Path | None = None, *, log: Callable[[str], None] = print) -> dict[str, object]:
    """Run the demo end to end in ``workdir`` (a temporary folder by default); return what it produced."""
    from transformers import AutoModelForCausalLM

    timings: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="yuan-hf-demo-") as tmp:
        root = Path(workdir or tmp)
        with _step("make a tiny random checkpoint in IEIT's HF layout", timings):
            ieit_dir = make_ieit_checkpoint(root / "ieit_hf")
            log(f"    {ieit_dir} ({sum(f.stat().st_size for f in ieit_dir.iterdir()) / 1e6:.1f} MB)")
        with _step("convert it: yuan-hf convert ieit-hf", timings):
            summary = convert_ieit_hf(ieit_dir, root / "native", dtype="float32", rope_theta=10000, overwrite=True,
                                      progress=False)  # fmt: skip
            log("    " + str(summary).replace("\n", "\n    "))
        with _step("load with AutoModelForCausalLM and generate (batched, left-padded)", timings):
            model = AutoModelForCausalLM.from_pretrained(root / "native").eval()
            config = model.config
            prompts = [torch.tensor([11, 42, 7, 99, 23, 8]), torch.tensor([17, 5 + 60])]
            width = max(len(p) for p in prompts)
            batch = torch.full((len(prompts), width), config.pad_token_id)
            mask = torch.zeros_like(batch)
            for i, p in enumerate(prompts):
                batch[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
            out = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False)
            for i, p in enumerate(prompts):
                log(f"    prompt {p.tolist()} -> {out[i, width:].tolist()}")
        log("timings: " + ", ".join(f"{name.split(':')[0]} {seconds:.2f}s" for name, seconds in timings))
        return {"timings": timings, "generated": out[:, width:].tolist(), "summary": summary}
