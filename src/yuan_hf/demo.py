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


from .conversion.writers import make_megatron_checkpoint
from .testing import greedy_reference, tiny_config

NEW_TOKENS = 12


@contextmanager
def _step(name: str, timings: list[tuple[str, float]]) -> Iterator[None]:
    start = time.perf_counter()
    print(f"==> {name}", flush=True)
    yield
    timings.append((name, time.perf_counter() - start))
    print(f"    done in {timings[-1][1]:.2f} s", flush=True)


REMOTE_CHECK = """
import sys, torch
sys.modules["yuan_hf"] = None  # prove the folder needs nothing but transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
batch = tok([sys.argv[2]], return_tensors="pt")
out = model.generate(**batch, max_new_tokens=int(sys.argv[3]), do_sample=False)
print(type(model).__module__)
print(out[0].tolist())
"""


def run_demo(workdir: str | Path | None = None, *, log: Callable[[str], None] = print) -> dict[str, object]:
    """Run the main job end to end in ``workdir`` (a temporary folder by default); return what it produced.

    Megatron checkpoint (TP1 x PP2, made here) + a tokenizer built here -> `convert megatron --tokenizer`
    -> generate a left-padded batch -> Hub-ready folder -> reload in a fresh process with only
    `trust_remote_code=True` (yuan_hf impossible to import there). Every generation is checked against greedy
    decoding by full uncached forwards of each prompt alone (the ground truth); the weights are random but large
    enough (std 0.2) that greedy output varies, so a lost cache or leaked padding changes the tokens.
    """
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .conversion.megatron import convert_megatron
    from .conversion.writers.tokenizer import build_demo_tokenizer
    from .hub import check_hub_folder, write_model_card

    timings: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="yuan-hf-demo-") as tmp:
        root = Path(workdir or tmp)
        log(f"working in {root}" if workdir else "working in a temporary folder (deleted at the end; --workdir DIR keeps it)")
        shown = (lambda path: str(path)) if workdir else (lambda path: Path(path).relative_to(root).as_posix())
        with _step("build a tiny Megatron-LM checkpoint (TP1 x PP2, random weights) and a tokenizer", timings):
            megatron_dir = make_megatron_checkpoint(root / "megatron", config=tiny_config(initializer_range=0.2))
            tokenizer_dir = build_demo_tokenizer(root / "tokenizer", overwrite=True)
            size = sum(f.stat().st_size for f in megatron_dir.rglob("*.pt"))
            log(f"    {shown(megatron_dir)} ({size / 1e6:.1f} MB), tokenizer {shown(tokenizer_dir)}")
        with _step("convert: yuan-hf convert megatron --tokenizer", timings):
            summary = convert_megatron(megatron_dir, root / "native", tokenizer=tokenizer_dir, dtype="float32",
                                       overwrite=True, progress=False)  # fmt: skip
            log("    " + str(summary).replace("\n", "\n    "))
        with _step("load with AutoModelForCausalLM + AutoTokenizer and generate a left-padded batch", timings):
            model = AutoModelForCausalLM.from_pretrained(root / "native").eval()
            tok = AutoTokenizer.from_pretrained(root / "native")
            prompts = ["The experts route each token", "你好"]
            batch = tok(prompts, return_tensors="pt", padding=True)
            out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
            new = out[:, batch["input_ids"].shape[1] :]
            texts = tok.batch_decode(new, skip_special_tokens=True)
            for prompt, text in zip(prompts, texts):
                log(f"    {prompt!r} -> {text!r} (random weights: the text is noise)")
            references = [greedy_reference(model, tok(p, return_tensors="pt")["input_ids"], NEW_TOKENS)[0][0]
                          for p in prompts]  # fmt: skip
            if any(len(set(ref.tolist())) < NEW_TOKENS // 3 for ref in references):
                raise RuntimeError("the demo model's greedy output collapsed: its checks would prove nothing")
            same = all(torch.equal(row, ref) for row, ref in zip(new, references))
            log(f"    cached, left-padded generation == uncached forwards of each prompt alone: {same}")
            if not same:
                raise RuntimeError("cached generation of the padded batch differs from uncached forwards")
        with _step("save a Hub-ready folder (weights, tokenizer, modeling code, model card)", timings):
            hub_dir = root / "hub-ready"
            model.save_pretrained(hub_dir)
            tok.save_pretrained(hub_dir)
            write_model_card(hub_dir, provenance=json.loads((root / "native" / "conversion.json").read_text()),
                             license="apache-2.0")  # fmt: skip
            log(f"    {shown(hub_dir)}: {', '.join(check_hub_folder(hub_dir))}")
        with _step("reload it in a fresh process with trust_remote_code=True only", timings):
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            result = subprocess.run([sys.executable, "-c", REMOTE_CHECK, str(hub_dir), prompts[0], str(NEW_TOKENS)],
                                    env=env, capture_output=True, text=True, cwd=root)  # fmt: skip
            if result.returncode != 0:
                raise RuntimeError(f"the fresh-process reload failed:\n{result.stderr[-2000:]}")
            module, tokens = result.stdout.strip().splitlines()[-2:]
            remote_new = json.loads(tokens)[-NEW_TOKENS:]
            same = remote_new == references[0].tolist()
            log(f"    loaded from {module}; same tokens as uncached forwards: {same}")
            if not same:
                raise RuntimeError("the remote-code reload generated other tokens than uncached forwards")
        log("timings: " + ", ".join(f"{name.split(':')[0].split(' (')[0]} {seconds:.2f}s" for name, seconds in timings))
        log("demo: all checks passed")
        return {"timings": timings, "generated": texts, "summary": summary}
