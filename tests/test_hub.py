"""Hub-ready folders: loading with and without the package, model card, upload plan, IEIT folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import yuan_hf
from yuan_hf import YuanM32ForCausalLM
from yuan_hf.cli import main as cli
from yuan_hf.conversion.ieit_hf import convert_ieit_hf
from yuan_hf.hub import check_hub_folder, push_to_hub, write_model_card
from yuan_hf.testing import tiny_config

from conftest import fixtures_dir

REMOTE_ONLY = textwrap.dedent(
    """
    import sys, torch
    sys.modules["yuan_hf"] = None  # importing yuan_hf is impossible here
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
    """
)


def run_without_package(script: str, folder: Path, ids: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """Run `script FOLDER IDS OUT` in a fresh interpreter that cannot import yuan_hf; return the tensor it saved."""
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # a fresh modules cache
    subprocess.run([sys.executable, "-c", script, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                   check=True, env=env, cwd=tmp_path)  # fmt: skip
    return torch.load(tmp_path / "out.pt")


def logits_without_package(folder: Path, ids: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    return run_without_package(REMOTE_ONLY, folder, ids, tmp_path)


@pytest.mark.compat
def test_saved_folder_loads_with_and_without_the_package(tmp_path):
    torch.manual_seed(0)
    model = YuanM32ForCausalLM(tiny_config()).eval()
    folder = tmp_path / "Yuan2.0-M32.tiny"  # dots in the folder name broke IEIT's remote code
    model.save_pretrained(folder)
    ids = torch.randint(6, 500, (2, 11))
    with torch.no_grad():
        with_package = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
    assert torch.equal(with_package, model(ids).logits.detach())
    torch.testing.assert_close(logits_without_package(folder, ids, tmp_path), with_package, atol=0, rtol=0)


def test_converted_folder_is_hub_ready_and_has_a_model_card(tmp_path):
    folder = tmp_path / "native"
    convert_ieit_hf(fixtures_dir() / "yuan_m32_tiny" / "ieit_hf", folder, dtype="float32", rope_theta=10000, progress=False)
    files = check_hub_folder(folder)
    assert {"config.json", "configuration_yuan_m32.py", "modeling_yuan_m32.py", "model.safetensors"} <= set(files)
    card = write_model_card(folder, license="apache-2.0").read_text()
    assert "license: apache-2.0" in card and "trust_remote_code=True" in card
    assert "ieit_hf" in card and "10000" in card  # provenance: source format and RoPE base
    ids = torch.randint(6, 1000, (1, 9))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(logits_without_package(folder, ids, tmp_path), expected, atol=0, rtol=0)


class StandInHubApi:
    """Records the calls push makes, in place of huggingface_hub.HfApi (no network here)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def create_commit(self, **kwargs):
        self.calls.append(("create_commit", kwargs))
        return type("CommitInfo", (), {"commit_url": f"https://hf.co/{kwargs['repo_id']}/commit/abc"})()


def test_push_plan(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "model"
    YuanM32ForCausalLM(tiny_config()).save_pretrained(folder)
    api = StandInHubApi()
    url = push_to_hub(folder, "someone/yuan-tiny", private=True, license="apache-2.0", api=api)
    assert url.endswith("/commit/abc")
    (name1, create), (name2, commit) = api.calls
    assert (name1, name2) == ("create_repo", "create_commit")
    assert create == {"repo_id": "someone/yuan-tiny", "repo_type": "model", "private": True, "exist_ok": True}
    assert commit["repo_id"] == "someone/yuan-tiny" and commit["repo_type"] == "model"
    card = next(op.path_or_fileobj for op in commit["operations"] if op.path_in_repo == "README.md")
    assert b"someone/yuan-tiny" in card and b"license: apache-2.0" in card
    assert not (folder / "README.md").exists()  # the card is sent from memory; the folder is not modified


def test_push_refuses_incomplete_folders(tmp_path, capsys):
    folder = tmp_path / "model"
    YuanM32ForCausalLM(tiny_config()).save_pretrained(folder)
    (folder / "modeling_yuan_m32.py").unlink()
    assert cli(["push", str(folder), "someone/x"]) != 0
    assert "trust_remote_code" in capsys.readouterr().err
    assert cli(["push", str(fixtures_dir() / "yuan_m32_tiny" / "ieit_hf"), "someone/x"]) != 0
    assert "yuan-hf convert ieit-hf" in capsys.readouterr().err


def test_ieit_folder_loads_directly_after_import(tmp_path, monkeypatch):
    monkeypatch.setenv("YUAN_HF_CACHE", str(tmp_path / "cache"))
    src = fixtures_dir() / "yuan_m32_tiny" / "ieit_hf"
    direct = YuanM32ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    convert_ieit_hf(src, tmp_path / "explicit", dtype=None, progress=False)
    explicit = YuanM32ForCausalLM.from_pretrained(tmp_path / "explicit", dtype=torch.float32).eval()
    ids = torch.randint(6, 1000, (1, 7))
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, explicit(ids).logits)
    entries = lambda: [p for p in (tmp_path / "cache" / "converted").iterdir() if p.is_dir()]  # noqa: E731
    assert len(entries()) == 1
    YuanM32ForCausalLM.from_pretrained(src)  # reuses the cached conversion
    assert len(entries()) == 1


def test_ieit_folder_without_adapter_points_to_the_converter(monkeypatch):
    monkeypatch.setattr(yuan_hf.YuanM32PreTrainedModel, "_source_adapters", [])
    with pytest.raises(ValueError, match="yuan-hf convert ieit-hf"):
        YuanM32ForCausalLM.from_pretrained(fixtures_dir() / "yuan_m32_tiny" / "ieit_hf")


def test_ieit_folder_loads_through_the_auto_classes_after_import(tmp_path, monkeypatch):
    """IEIT's layout (model_type 'yuan', IEIT's own auto_map) loads with AutoModelForCausalLM / AutoModel without
    trust_remote_code: the Auto classes route it through the on-the-fly converter, never to IEIT's code."""
    from transformers import AutoConfig, AutoModel

    from yuan_hf.conversion.writers import make_ieit_checkpoint

    monkeypatch.setenv("YUAN_HF_CACHE", str(tmp_path / "cache"))
    src = make_ieit_checkpoint(tmp_path / "ieit", config=tiny_config())
    assert "AutoModelForCausalLM" in json.loads((src / "config.json").read_text())["auto_map"]
    assert AutoConfig.from_pretrained(src).model_type == "yuan"
    auto = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    direct = YuanM32ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert type(auto) is YuanM32ForCausalLM
    ids = torch.randint(6, 500, (1, 7))
    with torch.no_grad():
        assert torch.equal(auto(ids).logits, direct(ids).logits)
    assert type(AutoModel.from_pretrained(src)).__name__ == "YuanM32Model"
