"""Shared test helpers: the reference fixtures (IEIT's material, outside the repository) and tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


def fixtures_dir() -> Path:
    """`../shared/fixtures`; skipped when absent (a plain clone), a failure under CI (which has it)."""
    if not FIXTURES.is_dir():
        reason = f"reference fixtures not found at {FIXTURES} (IEIT's material, not in the repository)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must provide them")
        pytest.skip(reason)
    return FIXTURES


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# Markers that transformers' common tests (tests/test_transformers_common.py) put on their tests; registered so
# importing them does not warn. A later release may add one: it then only warns.
TRANSFORMERS_MARKERS = (
    "accelerate_tests", "all_flash_attn_test", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
    "generate", "is_pipeline_test", "is_training_test", "is_tensor_parallel_test", "is_expert_parallel_test",
    "is_fsdp_test", "torch_compile_test", "bitsandbytes",
)  # fmt: skip


def pytest_configure(config):
    for name in TRANSFORMERS_MARKERS:
        config.addinivalue_line("markers", f"{name}: a marker of transformers' common tests")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny matmuls on a shared 2-core CI machine run about 10x slower on two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def stop_process_group(process) -> None:
    """End a server started with `start_new_session=True`: its process group (server + model process), nothing else."""
    import os
    import signal
    import subprocess

    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing under the installed transformers' name (5.25 renamed
    `gradient_checkpointing_enable` to `activation_checkpointing_enable`; the old name warns there)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
