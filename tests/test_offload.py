"""Offloaded loading (issue 13.1): CPU + disk through accelerate's hooks generates what the plain model generates.

accelerate moves an offloaded module's weights in only when that module is *called*; a weight read without
calling its module stays on the meta device. These tests force most layers to disk with a tiny `max_memory`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from transformers import AutoModelForCausalLM

from yuan_hf import YuanM32ForCausalLM
from yuan_hf.testing import tiny_model

from test_hub import REMOTE_ONLY, run_without_package

MAX_NEW_TOKENS = 8
# the tiny model is about 2 MB, a decoder layer about 1 MB: the embeddings (and the tied head) stay in memory,
# the decoder layers go to disk (with less, accelerate sends everything to disk and loses the tied head)
MAX_MEMORY = {"cpu": "1100KB"}


def _greedy(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, min_new_tokens=MAX_NEW_TOKENS)
    return out[:, ids.shape[1] :]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    folder = tmp_path_factory.mktemp("offload") / "model"
    model = tiny_model(seed=1)
    model.save_pretrained(folder)
    ids = torch.tensor([[7, 100, 23, 300, 41, 9]])
    return folder, ids, _greedy(model, ids)


def _assert_offloaded(model) -> None:
    devices = set(model.hf_device_map.values())
    assert "disk" in devices, f"nothing went to disk: {model.hf_device_map}"


def test_from_pretrained_with_disk_offload_generates_the_same_tokens(saved, tmp_path):
    folder, ids, expected = saved
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map="auto", max_memory=MAX_MEMORY, offload_folder=tmp_path / "offload", dtype=torch.float32
    ).eval()
    _assert_offloaded(model)
    assert torch.equal(_greedy(model, ids), expected)


def test_load_checkpoint_and_dispatch_with_disk_offload_generates_the_same_tokens(saved, tmp_path):
    folder, ids, expected = saved
    with init_empty_weights():
        model = YuanM32ForCausalLM(YuanM32ForCausalLM.config_class.from_pretrained(folder))
    model.tie_weights()
    model = load_checkpoint_and_dispatch(
        model, str(folder), device_map="auto", max_memory=MAX_MEMORY, offload_folder=str(tmp_path / "offload"),
        no_split_module_classes=model._no_split_modules, dtype=torch.float32,
    ).eval()  # fmt: skip
    _assert_offloaded(model)
    assert torch.equal(_greedy(model, ids), expected)


OFFLOADED_REMOTE = """
import sys, torch
sys.modules["yuan_hf"] = None  # importing yuan_hf is impossible here
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32,
    device_map="auto", max_memory={"cpu": "1100KB"}, offload_folder=sys.argv[3] + ".offload").eval()
assert "transformers_modules" in type(model).__module__ and "disk" in set(model.hf_device_map.values())
ids = torch.load(sys.argv[2])
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
torch.save(out[:, ids.shape[1]:], sys.argv[3])
"""


def test_remote_code_with_disk_offload_generates_the_same_tokens(saved, tmp_path):
    folder, ids, expected = saved
    assert torch.equal(run_without_package(OFFLOADED_REMOTE, folder, ids, tmp_path), expected)
