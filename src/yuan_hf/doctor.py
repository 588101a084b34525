"""`yuan-hf doctor`: the installed stack's versions and a few-second self-check on a tiny model built here.

Each check compares against a ground truth, not against another fast path: cached generation against greedy
decoding by full uncached forwards, a padded batch against its rows alone, the remote-code copy a saved folder
carries (loaded in a fresh process where yuan_hf cannot be imported) against this process. A check that raises is
reported as failed with its one-line reason; the command prints no traceback and exits non-zero naming what broke.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "huggingface-hub", "safetensors")
NEW_TOKENS = 10


@dataclass
class Check:
    name: str
    status: str  # "ok", "FAILED" or "skipped"
    detail: str
    seconds: float


class Skip(Exception):
    """A check that does not apply here (e.g. bitsandbytes has no backend on this machine)."""


def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def attention_backends() -> dict[str, str]:
    """Which attention implementations this machine can run (names as `attn_implementation` takes them)."""
    import torch
    from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

    device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "eager": "yes",
        "sdpa": "yes",
        "flex_attention": "yes" if is_torch_flex_attn_available() else "no",
        "flash_attention_2": "yes" if is_flash_attn_2_available() else "no (flash-attn not installed or no CUDA)",
    }


def _tiny_model():
    from .testing import tiny_model

    return tiny_model()


def check_cached_generation() -> str:
    import torch

    from .testing import greedy_reference

    model = _tiny_model()
    prompt = torch.randint(6, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    expected, _ = greedy_reference(model, prompt, NEW_TOKENS)
    for cache in ("dynamic", "static"):
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                             do_sample=False, cache_implementation=cache)  # fmt: skip
        if not torch.equal(out[:, prompt.shape[1] :], expected):
            raise AssertionError(f"generate with a {cache} cache gives other tokens than uncached forwards")
    return "dynamic and static cache == uncached forwards"


def check_padded_batch() -> str:
    import torch

    from .testing import greedy_reference

    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(6, 500, (n,), generator=g) for n in (8, 3)]
    batch = torch.full((2, 8), model.config.pad_token_id)
    mask = torch.zeros_like(batch)
    for i, row in enumerate(rows):
        batch[i, 8 - len(row) :], mask[i, 8 - len(row) :] = row, 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    for i, row in enumerate(rows):
        expected, _ = greedy_reference(model, row[None], NEW_TOKENS)
        if not torch.equal(out[i, 8:], expected[0]):
            raise AssertionError(f"row {i} of a left-padded batch differs from the row alone")
    return "left-padded batch == rows alone"


def check_router_fp32(workdir: Path) -> str:
    import torch

    from .modeling import YuanM32ForCausalLM

    _tiny_model().save_pretrained(workdir / "bf16")
    model = YuanM32ForCausalLM.from_pretrained(workdir / "bf16", dtype=torch.bfloat16)
    gate = model.model.layers[0].mlp.gate
    dtypes = {p.dtype for p in gate.parameters()}
    if dtypes != {torch.float32}:
        raise AssertionError(f"the router's weights are {sorted(map(str, dtypes))} under bf16, expected float32")
    with torch.no_grad():
        logits = model(torch.tensor([[7, 8, 9]]), output_router_logits=True).router_logits[0]
    if logits.dtype != torch.float32:
        raise AssertionError(f"router logits are {logits.dtype} under bf16, expected float32")
    return "router weights and logits fp32 in a bf16 model"


REMOTE_SCRIPT = """
import json, sys, torch
sys.modules["yuan_hf"] = None  # the folder must need nothing but transformers
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
prompt = torch.tensor(json.loads(sys.argv[2]))
out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=int(sys.argv[3]), do_sample=False)
print(type(model).__module__)
print(json.dumps(out.tolist()))
"""


def check_remote_code(workdir: Path) -> str:
    import torch

    from .testing import greedy_reference

    model = _tiny_model()
    folder = workdir / "remote"
    model.save_pretrained(folder)
    prompt = [[11, 12, 13, 14, 15]]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(workdir / "hf_home")  # a fresh modules cache
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(folder), json.dumps(prompt), str(NEW_TOKENS)],
        capture_output=True, text=True, env=env, cwd=workdir, timeout=300,
    )  # fmt: skip
    if result.returncode:
        last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        raise AssertionError(f"loading a saved folder with trust_remote_code failed: {last}")
    module, tokens = result.stdout.strip().splitlines()[-2:]
    if "transformers_modules" not in module:
        raise AssertionError(f"the folder loaded {module}, not its own remote code")
    expected, _ = greedy_reference(model, torch.tensor(prompt), NEW_TOKENS)
    if json.loads(tokens)[0][len(prompt[0]) :] != expected[0].tolist():
        raise AssertionError("the remote-code copy generates other tokens than uncached forwards")
    return "saved folder loads without yuan_hf (trust_remote_code) and generates the same tokens"


def check_qlora(workdir: Path) -> str:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes is not installed")
    import torch
    from transformers import BitsAndBytesConfig

    from .modeling import YuanM32ForCausalLM

    try:
        from .finetune import quantization  # noqa: F401  (demotes bitsandbytes' optional-kernel notice first)
        import bitsandbytes as bnb
    except Exception as error:  # noqa: BLE001 - any import failure means: not usable here
        raise Skip(f"bitsandbytes does not import here ({type(error).__name__}: {error})") from None
    _tiny_model().save_pretrained(workdir / "qlora")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = YuanM32ForCausalLM.from_pretrained(workdir / "qlora", quantization_config=config)
    quantized = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    if not quantized:
        raise AssertionError("no Linear was quantized to 4 bits")
    if any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.layers[0].mlp.gate.modules()):
        raise AssertionError("the router was quantized; it must stay in full precision")
    ids = torch.tensor([[7, 8, 9, 10]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    if not torch.isfinite(loss):
        raise AssertionError(f"4-bit forward gave a non-finite loss ({loss.item()})")
    return f"4-bit (nf4) load and forward, {quantized} Linears quantized, router kept"


def run_checks(log: Callable[[str], None] = print) -> list[Check]:
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="yuan-hf-doctor-") as tmp:
        workdir = Path(tmp)
        steps = [
            ("cached generation", check_cached_generation),
            ("padded batch", check_padded_batch),
            ("router fp32 under bf16", lambda: check_router_fp32(workdir)),
            ("remote-code folder", lambda: check_remote_code(workdir)),
            ("QLoRA 4-bit forward", lambda: check_qlora(workdir)),
        ]
        for name, function in steps:
            start = time.perf_counter()
            try:
                status, detail = "ok", function()
            except Skip as reason:
                status, detail = "skipped", str(reason)
            except Exception as error:  # noqa: BLE001 - the doctor reports every failure as one line
                status, detail = "FAILED", f"{type(error).__name__}: {error}".splitlines()[0]
            checks.append(Check(name, status, detail, time.perf_counter() - start))
            log(f"  {status:>7}  {name:<24} {detail} ({checks[-1].seconds:.1f} s)")
    return checks


def doctor(log: Callable[[str], None] = print) -> int:
    """Print versions, backends and the self-check; return the exit code (0 only when everything works)."""
    from transformers.utils import logging as hf_logging

    from .support import TRANSFORMERS_FLOOR, TRANSFORMERS_NEWEST_TESTED, transformers_support

    start = time.perf_counter()
    hf_logging.disable_progress_bar()  # the checks load tiny folders: loading bars would bury the report
    hf_logging.set_verbosity_error()
    versions = library_versions()
    log("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f", python {sys.version.split()[0]}")
    log(f"tested transformers: {TRANSFORMERS_FLOOR} to {TRANSFORMERS_NEWEST_TESTED}")
    problems = []
    try:
        log("attention: " + ", ".join(f"{k} {v}" for k, v in attention_backends().items()))
        log("self-check on a tiny model built here:")
        checks = run_checks(log)
    except Exception as error:  # noqa: BLE001 - e.g. torch or transformers broken: say so, no traceback
        checks, problems = [], [f"the stack does not load ({type(error).__name__}: {error})"]
    problems += [f"{c.name}: {c.detail}" for c in checks if c.status == "FAILED"]
    support = transformers_support(versions["transformers"]) if versions["transformers"] != "not installed" else None
    if problems:
        hint = support or (
            f"reinstall a tested stack (transformers {TRANSFORMERS_FLOOR} to {TRANSFORMERS_NEWEST_TESTED}) and "
            "report the output of `yuan-hf doctor` with the issue"
        )
        log(f"yuan-hf doctor: FAILED: {'; '.join(problems)}. What to do: {hint}")
        return 1
    passed = sum(c.status == "ok" for c in checks)
    note = f"; note: {support}" if support else ""
    log(f"yuan-hf doctor: OK, {passed} of {len(checks)} checks passed in {time.perf_counter() - start:.1f} s{note}")
    return 0
