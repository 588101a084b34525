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


from .conversion.writers import make_megatron_checkpoint


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
out = model.generate(**batch, max_new_tokens=12, do_sample=False)
print(type(model).__module__)
print(out[0].tolist())
"""


def run_demo(workdir: str | Path | None = None, *, log: Callable[[str], None] = print) -> dict[str, object]:
    """Run the main job end to end in ``workdir`` (a temporary folder by default); return what it produced.

    Megatron checkpoint (TP1 x PP2, made here) + a tokenizer built here -> `convert megatron --tokenizer`
    -> generate a left-padded batch -> Hub-ready folder -> reload in a fresh process with only
    `trust_remote_code=True` (yuan_hf impossible to import there) and compare the generation.
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
        with _step("build a tiny Megatron-LM checkpoint (TP1 x PP2, random weights) and a tokenizer", timings):
            megatron_dir = make_megatron_checkpoint(root / "megatron")
            tokenizer_dir = build_demo_tokenizer(root / "tokenizer", overwrite=True)
            size = sum(f.stat().st_size for f in megatron_dir.rglob("*.pt"))
            log(f"    {megatron_dir} ({size / 1e6:.1f} MB), tokenizer {tokenizer_dir}")
        with _step("convert: yuan-hf convert megatron --tokenizer", timings):
            summary = convert_megatron(megatron_dir, root / "native", tokenizer=tokenizer_dir, dtype="float32",
                                       overwrite=True, progress=False)  # fmt: skip
            log("    " + str(summary).replace("\n", "\n    "))
        with _step("load with AutoModelForCausalLM + AutoTokenizer and generate a left-padded batch", timings):
            model = AutoModelForCausalLM.from_pretrained(root / "native").eval()
            tok = AutoTokenizer.from_pretrained(root / "native")
            prompts = ["The experts route each token", "你好"]
            batch = tok(prompts, return_tensors="pt", padding=True)
            out = model.generate(**batch, max_new_tokens=12, do_sample=False)
            texts = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for prompt, text in zip(prompts, texts):
                log(f"    {prompt!r} -> {text!r} (random weights: the text is noise)")
        with _step("save a Hub-ready folder (weights, tokenizer, modeling code, model card)", timings):
            hub_dir = root / "hub-ready"
            model.save_pretrained(hub_dir)
            tok.save_pretrained(hub_dir)
            write_model_card(hub_dir, provenance=json.loads((root / "native" / "conversion.json").read_text()),
                             license="apache-2.0")  # fmt: skip
            log(f"    {hub_dir}: {', '.join(check_hub_folder(hub_dir))}")
        with _step("reload it in a fresh process with trust_remote_code=True only", timings):
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            result = subprocess.run([sys.executable, "-c", REMOTE_CHECK, str(hub_dir), prompts[0]], env=env,
                                    capture_output=True, text=True, cwd=root)  # fmt: skip
            if result.returncode != 0:
                raise RuntimeError(f"the fresh-process reload failed:\n{result.stderr[-2000:]}")
            module, tokens = result.stdout.strip().splitlines()[-2:]
            alone = model.generate(**tok(prompts[:1], return_tensors="pt"), max_new_tokens=12, do_sample=False)
            same = json.loads(tokens) == alone[0].tolist()
            log(f"    loaded from {module}; same tokens as in this process: {same}")
            if not same:
                raise RuntimeError("the remote-code reload generated different tokens")
        log("timings: " + ", ".join(f"{name.split(':')[0].split(' (')[0]} {seconds:.2f}s" for name, seconds in timings))
        return {"timings": timings, "generated": texts, "summary": summary}
