"""`yuan-hf serve` (transformers' OpenAI-compatible server) answers what local greedy decoding gives (issue 13.5).

A real server process on 127.0.0.1 and a real HTTP client (the standard library's), with bounded requests and a
bounded wait; the server's process group is ended at the end.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer
from transformers.utils.import_utils import is_serve_available

from yuan_hf.conversion.writers.tokenizer import build_demo_tokenizer
from yuan_hf.testing import tiny_model

from conftest import stop_process_group

needs_serve = pytest.mark.skipif(
    not is_serve_available(),
    reason="transformers serve needs fastapi, uvicorn, pydantic and openai (pip install 'yuan-hf[serve]')",
)

MAX_TOKENS = 12
STARTUP_SECONDS = 240  # loading transformers, the server and the model in two processes on a busy 2-core machine
PROMPTS = ["The quick brown fox", "你好，世界"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve") / "yuan-tiny"
    build_demo_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id)  # fmt: skip
    model = tiny_model(seed=3, **ids)
    # random weights pick byte-fallback pieces (<0x1A>) that form no UTF-8 text, which serve's stream decoder
    # rejects mid-stream; a real model emits whole characters: keep the tiny one to ordinary pieces
    byte_pieces = [i for piece, i in tokenizer.get_vocab().items() if piece.startswith("<0x") and piece.endswith(">")]
    model.generation_config.update(**ids, suppress_tokens=byte_pieces)
    model.save_pretrained(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120) -> urllib.request.addinfourl:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)


def test_generate_takes_a_tokenizer_for_stop_strings(model_dir):
    """generate() passes its `tokenizer` on with the model inputs (serve always sends one): the model ignores it."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = tiny_model(seed=3).__class__.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        with_tokenizer = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, tokenizer=tokenizer,
                                        stop_strings=["never appears in this text"])  # fmt: skip
    assert torch.equal(plain, with_tokenizer)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    command = [sys.executable, "-m", "yuan_hf.cli", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"yuan-hf serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"yuan-hf serve did not answer within {STARTUP_SECONDS} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield base
    finally:
        stop_process_group(process)


def _local_greedy(model_dir: Path, prompt: str) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = tiny_model(seed=3).__class__.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@needs_serve
@pytest.mark.parametrize("prompt", PROMPTS)
def test_served_completion_streams_the_local_greedy_text(server, model_dir, prompt):
    expected = _local_greedy(model_dir, prompt)
    body = {"model": str(model_dir), "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    pieces = []
    with _post(f"{server}/v1/completions", body) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            assert "choices" in chunk, chunk
            pieces.extend(choice.get("text") or "" for choice in chunk["choices"])
    assert "".join(pieces) == expected

    body["stream"] = False
    with _post(f"{server}/v1/completions", body) as response:
        assert json.load(response)["choices"][0]["text"] == expected
