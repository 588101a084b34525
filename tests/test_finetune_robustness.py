"""`yuan-hf finetune` when things go wrong: paths, output folder, bf16, broken files, kill and resume, log output."""

from __future__ import annotations

import codecs
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from yuan_hf.finetune import RecipeError, SFTDataError, build_sft_dataset, finetune_main, load_recipe
from yuan_hf.finetune import runner
from yuan_hf.finetune.checkpoints import checkpoint_problem, newest_complete_checkpoint
from yuan_hf.finetune.quantization import BNB_OPTIONAL_KERNEL_NOTICE
from yuan_hf.finetune.recipe import recipe_from_dict
from yuan_hf.finetune.toy import toy_tokenizer, write_toy_setup

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls run faster on one thread


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    # 32 records pack into 7 rows of <= 64 tokens: 4 steps per epoch at batch size 2
    return write_toy_setup(tmp_path_factory.mktemp("toy"), n_train=32, initializer_range=0.2)


def recipe_values(toy, output_dir, **train) -> dict:
    """A short CPU LoRA run of the toy model; `train` keys are added to / override the train section."""
    return {
        "method": "lora",
        "model": {"path": str(toy["model"]), "dtype": "float32"},
        "lora": {"r": 4, "dropout": 0.1},  # dropout > 0: resuming must restore the RNG to match
        "data": {"train_file": str(toy["train_file"]), "max_length": 64, "probe_rows": 2},
        "train": {
            "output_dir": str(output_dir),
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "learning_rate": 1e-2,
            "lr_scheduler_type": "constant",
            "save_strategy": "no",
            "use_cpu": True,
            "report_to": "none",
            "disable_tqdm": True,
            **train,
        },
    }


def write_recipe(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if the run gets as far as loading the model config (i.e. the model)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(runner, "load_config", refuse)


def one_line_error(capsys, code: int) -> str:
    """The CLI's stderr for a refused run: exit code 2, a single `yuan-hf finetune: error:` line, no traceback."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("yuan-hf finetune: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------------------ output folder


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("where", ["model", "inside", "parent"])
def test_output_dir_overlapping_the_base_model_is_refused_before_loading(toy, tmp_path, capsys, monkeypatch, where):
    output_dir = {"model": toy["model"], "inside": toy["model"] / "run", "parent": toy["model"].parent}[where]

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the error was found")

    monkeypatch.setattr(runner.AutoTokenizer, "from_pretrained", no_tokenizer)
    before = tree(toy["model"])
    recipe = write_recipe(tmp_path / "r.yaml", recipe_values(toy, output_dir))
    err = one_line_error(capsys, finetune_main(str(recipe)))
    relation = {"model": "is", "inside": "is inside", "parent": "contains"}[where]
    assert f"train.output_dir {output_dir} {relation} the folder of model.path" in err
    assert "choose a train.output_dir outside it" in err
    assert tree(toy["model"]) == before and not (toy["model"] / "run").exists()


# -------------------------------------------------------------------------------------------- paths and bf16


def test_missing_model_folder_and_data_file_are_named(toy, tmp_path, capsys, nothing_loads):
    values = recipe_values(toy, tmp_path / "out")
    values["model"]["path"] = str(tmp_path / "no-such-model")
    err = one_line_error(capsys, finetune_main(str(write_recipe(tmp_path / "a.yaml", values))))
    assert f"model folder not found: {tmp_path / 'no-such-model'}" in err and "model.path" in err

    (tmp_path / "empty").mkdir()
    values["model"]["path"] = str(tmp_path / "empty")
    err = one_line_error(capsys, finetune_main(str(write_recipe(tmp_path / "b.yaml", values))))
    assert "has no config.json" in err

    values = recipe_values(toy, tmp_path / "out")
    values["data"]["train_file"] = str(tmp_path / "missing.jsonl")
    err = one_line_error(capsys, finetune_main(str(write_recipe(tmp_path / "c.yaml", values))))
    assert f"data file not found: {tmp_path / 'missing.jsonl'} (recipe key data.train_file)" in err
    assert not (tmp_path / "out").exists()


def test_bf16_on_a_gpu_without_it_names_the_keys_to_change(toy, tmp_path, capsys, monkeypatch, nothing_loads):
    # a V100: CUDA, compute capability 7.0, bf16 only emulated
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    values = recipe_values(toy, tmp_path / "out", bf16=True, use_cpu=False)
    values["model"]["dtype"] = "bfloat16"
    err = one_line_error(capsys, finetune_main(str(write_recipe(tmp_path / "r.yaml", values))))
    assert "Tesla V100-SXM2-32GB, compute capability 7.0) has no native bfloat16" in err
    assert "set train.bf16=false and model.dtype=float32" in err


def test_bf16_without_any_gpu_points_at_use_cpu(toy, tmp_path, capsys, monkeypatch, nothing_loads):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runner, "is_torch_bf16_gpu_available", lambda: False)
    values = recipe_values(toy, tmp_path / "out", bf16=True)
    del values["train"]["use_cpu"]
    err = one_line_error(capsys, finetune_main(str(write_recipe(tmp_path / "r.yaml", values))))
    assert "train.bf16 is true but no GPU was found" in err and "train.use_cpu=true" in err


# ------------------------------------------------------------------------------------------- broken input files


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("method: lora\nseed: !!python/object/apply:os.system ['echo owned']\n", "line 2, column 7: YAML tag"),
        ("method: lora\nmodel: {path: m\ndata: {}\n", "line 3, column 5: not valid YAML"),
        ("model:\n  path: m\n   dtype: float32\n", "line 3, column 9: not valid YAML (mapping values are not allowed"),
    ],
)
def test_bad_yaml_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert message in one_line_error(capsys, finetune_main(str(path)))


def test_non_utf8_recipe_and_yaml_override_are_one_line(toy, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"method: lora\nseed: 4\xff2\n")
    assert "line 2: not UTF-8 text (byte 0xff)" in one_line_error(capsys, finetune_main(str(path)))
    write_recipe(path, recipe_values(toy, tmp_path / "out"))
    err = one_line_error(capsys, finetune_main(str(path), ["train.max_steps=!!python/name:os.system"]))
    assert "override 'train.max_steps=!!python/name:os.system'" in err and "YAML tag" in err


def test_recipe_with_a_byte_order_mark_loads(toy, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(codecs.BOM_UTF8 + yaml.safe_dump(recipe_values(toy, tmp_path / "out")).encode())
    assert load_recipe(path).model.path == str(toy["model"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": "w10", "response": "w110"}\n{"prompt": "w1\xe9", "response": "w111"}\n', "line 2: not UTF-8"),
        (b'{"prompt": "w10", "response": "w110"}\n\n{"prompt": "w11",\n', "line 3: invalid JSON"),
        (codecs.BOM_UTF16_LE + '{"prompt": "w10"}\n'.encode("utf-16-le"), "is UTF-16 text"),
    ],
)
def test_bad_jsonl_is_one_line_with_the_line_number(toy, tmp_path, capsys, nothing_loads, content, message):
    data = tmp_path / "train.jsonl"
    data.write_bytes(content)
    values = recipe_values(toy, tmp_path / "out")
    values["data"]["train_file"] = str(data)
    err = one_line_error(capsys, finetune_main(str(write_recipe(tmp_path / "r.yaml", values))))
    assert message in err


def test_non_utf8_lines_are_skippable_and_a_utf8_bom_is_ignored(tmp_path):
    tokenizer = toy_tokenizer()
    path = tmp_path / "train.jsonl"
    path.write_bytes(
        codecs.BOM_UTF8 + b'{"prompt": "w10", "response": "w110"}\n{"prompt": "\xff", "response": "w1"}\n'
        b'{"prompt": "w11", "response": "w111"}\n'
    )
    with pytest.raises(SFTDataError, match=r"line 2: not UTF-8 text \(byte 0xff at byte 13 of the line\)"):
        build_sft_dataset(path, tokenizer, max_length=32)
    dataset = build_sft_dataset(path, tokenizer, max_length=32, packing=False, on_malformed="skip")
    assert dataset.stats.malformed_lines == [2]
    assert [row["input_ids"] for row in dataset] == [[10, 4, 110, 3], [11, 4, 111, 3]]


# --------------------------------------------------------------------------------------------- kill and resume


class Killed(Exception):
    """Stands in for the process being killed right after a checkpoint was written."""


class KillAfterSave(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed after saving checkpoint-{self.step}")


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_kill_and_resume_equals_an_uninterrupted_run(toy, tmp_path):
    """6 steps with checkpoints every 3 (4 steps per epoch: the resume lands mid-epoch and then crosses an epoch).

    Compared exactly: same CPU, one thread, and the checkpoint holds the fp32 adapter, the optimizer state, the
    scheduler, the data position and the RNG states bit for bit, so nothing may differ. A tolerance would let a
    wrong dropout RNG or a shifted data order through (both move the weights only slightly at 3 steps)."""

    def recipe(output_dir, **train):
        values = recipe_values(toy, output_dir, max_steps=6, save_strategy="steps", save_steps=3, **train)
        return recipe_from_dict(values)

    full = runner.run_recipe(recipe(tmp_path / "full"))
    assert full["steps"] == 6

    run = tmp_path / "killed"
    with pytest.raises(Killed):
        runner.run_recipe(recipe(run), callbacks=[KillAfterSave(3)])
    assert [p.name for p in run.iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-3"]
    assert not (run / "adapter_model.safetensors").exists()
    # a second kill, this time while checkpoint-5 was being written: weights there, the rest not yet
    (run / "checkpoint-5").mkdir()
    shutil.copy(run / "checkpoint-3" / "adapter_model.safetensors", run / "checkpoint-5")

    with pytest.raises(RecipeError, match=r"holds checkpoints of an earlier run \(checkpoint-3, checkpoint-5\)"):
        runner.run_recipe(recipe(run))  # rerun without resume: refused, the checkpoints stay

    counter = CountSteps()
    resumed = runner.run_recipe(recipe(run, resume_from_checkpoint=True), callbacks=[counter])
    assert counter.steps == [4, 5, 6] and resumed["steps"] == 6  # trained on from step 3, not from 0
    assert resumed["resumed_from"] == str(run / "checkpoint-3") and full["resumed_from"] is None  # not checkpoint-5
    assert 0 < resumed["tokens_this_run"] < resumed["tokens_seen"] == full["tokens_seen"]

    want = load_file(tmp_path / "full" / "adapter_model.safetensors")
    got = load_file(run / "adapter_model.safetensors")
    assert want.keys() == got.keys() and len(want) == 112
    base = load_file(run / "checkpoint-3" / "adapter_model.safetensors")
    assert any(not torch.equal(base[k], want[k]) for k in want)  # steps 4..6 changed the adapter
    for key in want:
        assert torch.equal(got[key], want[key]), key


def complete_checkpoint(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (folder / name).write_bytes(b"x")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_only_complete_checkpoints_are_resumed_from(toy, tmp_path):
    out = tmp_path / "out"
    complete_checkpoint(out / "checkpoint-2", 2)
    torn = complete_checkpoint(out / "checkpoint-10", 10)  # numeric order, not text order (10 > 4)
    (torn / "trainer_state.json").write_text('{"global_step": 1')
    no_state = complete_checkpoint(out / "checkpoint-8", 8)
    (no_state / "trainer_state.json").unlink()
    no_optimizer = complete_checkpoint(out / "checkpoint-6", 6)
    (no_optimizer / "optimizer.pt").unlink()
    no_weights = complete_checkpoint(out / "checkpoint-4", 4)
    (no_weights / "adapter_model.safetensors").unlink()
    found, skipped = newest_complete_checkpoint(out)
    assert found == out / "checkpoint-2"
    assert [p.name for p in skipped] == ["checkpoint-10", "checkpoint-8", "checkpoint-6", "checkpoint-4"]
    assert "cut short" in skipped[torn] and "no trainer_state.json" in skipped[no_state]
    assert "no optimizer.pt" in skipped[no_optimizer] and "no model or adapter weights" in skipped[no_weights]
    assert checkpoint_problem(out / "checkpoint-2") is None

    values = recipe_values(toy, out, resume_from_checkpoint=True)
    assert runner.preflight(recipe_from_dict(values)) == str(out / "checkpoint-2")
    values["train"]["resume_from_checkpoint"] = "checkpoint-8"  # a name inside output_dir, or a path
    with pytest.raises(RecipeError, match="cannot resume from checkpoint-8: no trainer_state.json"):
        runner.preflight(recipe_from_dict(values))
    shutil.rmtree(out / "checkpoint-2")
    values["train"]["resume_from_checkpoint"] = True
    with pytest.raises(RecipeError, match="holds no complete checkpoint .*checkpoint-10: trainer_state.json is cut"):
        runner.preflight(recipe_from_dict(values))
    values["train"]["resume_from_checkpoint"] = 3
    with pytest.raises(RecipeError, match="recipe key train.resume_from_checkpoint: expected true"):
        recipe_from_dict(values)


# -------------------------------------------------------------------------------------------------- log output


def test_default_output_shows_data_and_trainable_parameters_and_no_kernel_notice(toy, tmp_path):
    """A fresh `python -m yuan_hf.finetune` at the default log level, on a JSONL file with a UTF-8 BOM."""
    data = tmp_path / "train.jsonl"
    data.write_bytes(codecs.BOM_UTF8 + toy["train_file"].read_bytes())
    values = recipe_values(toy, tmp_path / "out")
    values["data"]["train_file"] = str(data)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("TRANSFORMERS_VERBOSITY", None)
    result = subprocess.run(
        [sys.executable, "-m", "yuan_hf.finetune", str(write_recipe(tmp_path / "r.yaml", values))],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    assert f"SFT data {data}: 32 records -> 32 samples (0 truncated to 64 tokens" in err
    assert "-> 7 packed rows" in err
    assert "trainable parameters: 43,008 of 554,624" in err  # LoRA r=4 on attention + 16 experts, 2 layers
    assert BNB_OPTIONAL_KERNEL_NOTICE not in err and "gemm_4bit_forward" not in err


def test_only_the_optional_kernel_notice_of_bitsandbytes_is_silenced(caplog):
    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        bnb_logger.warning("%s: offline. Please `pip install kernels`", BNB_OPTIONAL_KERNEL_NOTICE)
        bnb_logger.warning("a real bitsandbytes problem")
    assert [record.getMessage() for record in caplog.records] == ["a real bitsandbytes problem"]
