"""`yuan-hf convert megatron`: equal to the IEIT-HF conversion, reproduces the references, refuses bad input."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from yuan_hf.cli import main as cli
from yuan_hf.conversion.ieit_hf import convert_ieit_hf

from conftest import fixtures_dir

TOKEN_IDS = "bos=1001,eos=1001,pad=1001,sep=1003"  # the fixtures' ids (Megatron args record none)
LAYOUTS = {"tp1pp3": "yuan_m32_tiny/megatron", "tp2pp1": "yuan_m32_tiny_megatron_tp2pp1/megatron"}


@pytest.fixture(scope="module")
def ieit_reference(tmp_path_factory):
    dst = tmp_path_factory.mktemp("ieit") / "native"
    convert_ieit_hf(fixtures_dir() / "yuan_m32_tiny" / "ieit_hf", dst, dtype="float32", rope_theta=10000, progress=False)
    return dst


@pytest.mark.parametrize("layout", LAYOUTS)
def test_megatron_layouts_equal_the_ieit_conversion_and_the_references(layout, ieit_reference, tmp_path):
    dst = tmp_path / "native"
    assert cli(["convert", "megatron", str(fixtures_dir() / LAYOUTS[layout]), str(dst), "--dtype", "float32",
                "--token-ids", TOKEN_IDS, "--verify"]) == 0  # fmt: skip
    ours, theirs = load_file(str(dst / "model.safetensors")), load_file(str(ieit_reference / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key  # bitwise
    reference = load_file(str(fixtures_dir() / "yuan_m32_tiny" / "reference.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    assert model.config.rope_parameters["rope_theta"] == 10000  # from the checkpoint's args
    with torch.no_grad():  # Megatron computes RoPE in fp32: the fp32_rope references
        logits = model(reference["input_ids_short"]).logits
        torch.testing.assert_close(logits, reference["fp32_rope.logits_short"], atol=1e-3, rtol=0)
        prompt = reference["gen_prompt"]
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    assert torch.equal(generated, reference["fp32_rope.gen_cache_sequences"])


def test_provenance_and_sharding(tmp_path):
    dst = tmp_path / "native"
    assert cli(["convert", "megatron", str(fixtures_dir() / LAYOUTS["tp1pp3"]), str(dst), "--token-ids", TOKEN_IDS,
                "--max-shard-size", "400KB", "--rope-theta", "40890"]) == 0  # fmt: skip
    assert len(list(dst.glob("model-*.safetensors"))) > 1 and (dst / "model.safetensors.index.json").is_file()
    import json

    provenance = json.loads((dst / "conversion.json").read_text())
    assert provenance["source_format"] == "megatron" and provenance["iteration"] == 1477
    assert provenance["pipeline_parallel"] == 3 and provenance["rope_theta"] == 40890


def run_failure(src: Path, dst: Path, match: str, capsys, *extra: str) -> None:
    assert cli(["convert", "megatron", str(src), str(dst), "--token-ids", TOKEN_IDS, *extra]) != 0
    err = capsys.readouterr().err
    assert match in err, err
    assert not dst.exists(), "a failed conversion left a destination folder"


@pytest.fixture
def megatron_copy(tmp_path) -> Path:
    dst = tmp_path / "megatron"
    shutil.copytree(fixtures_dir() / LAYOUTS["tp1pp3"], dst)
    return dst


def test_planted_global_is_refused_and_nothing_written(megatron_copy, tmp_path, capsys):
    class Planted:
        def __reduce__(self):
            return (print, ("this must never run",))

    file = megatron_copy / "iter_0001477" / "mp_rank_00_002" / "model_optim_rng.pt"
    with open(file, "wb") as handle:  # a plain pickle naming builtins.print
        pickle.dump({"args": Planted()}, handle)
    run_failure(megatron_copy, tmp_path / "out", "mp_rank_00_002", capsys)


def test_missing_tracker_and_stage(megatron_copy, tmp_path, capsys):
    shutil.rmtree(megatron_copy / "iter_0001477" / "mp_rank_00_001")
    run_failure(megatron_copy, tmp_path / "out", "mp_rank_00_001", capsys)
    (megatron_copy / "latest_checkpointed_iteration.txt").unlink()
    run_failure(megatron_copy, tmp_path / "out", "latest_checkpointed_iteration.txt", capsys)


def test_truncated_stage(megatron_copy, tmp_path, capsys):
    file = megatron_copy / "iter_0001477" / "mp_rank_00_001" / "model_optim_rng.pt"
    file.write_bytes(file.read_bytes()[:20000])
    run_failure(megatron_copy, tmp_path / "out", "mp_rank_00_001", capsys)


def test_token_ids_are_required_when_the_release_ids_do_not_fit(tmp_path, capsys):
    assert cli(["convert", "megatron", str(fixtures_dir() / LAYOUTS["tp2pp1"]), str(tmp_path / "out")]) != 0
    assert "--tokenizer" in capsys.readouterr().err
