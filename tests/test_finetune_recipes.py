"""Recipes, the recipe runner (one process and 2-process data parallel), TRL's SFTTrainer, example configs."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from yuan_hf.finetune import RecipeError, SFTDataCollator, build_sft_dataset, finetune_main, load_recipe
from yuan_hf.finetune.recipe import recipe_from_dict
from yuan_hf.finetune.runner import METRICS_FILE, run_recipe
from yuan_hf.finetune.toy import write_toy_setup
from yuan_hf.modeling import modeling_yuan_m32

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls run faster on one thread


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    # initializer_range 0.2: see tests/test_finetune.py (a 0.02 random tiny model cannot lower its loss much)
    return write_toy_setup(tmp_path_factory.mktemp("toy"), n_train=96, initializer_range=0.2)


def cpu_overrides(toy, output_dir, *extra: str) -> list[str]:
    """Point a shipped recipe at the toy model and make it a short CPU run."""
    return [
        f"model.path={toy['model']}",
        f"data.train_file={toy['train_file']}",
        "data.max_length=64",
        "model.dtype=float32",
        "quantization.compute_dtype=float32",
        f"train.output_dir={output_dir}",
        "train.optim=adamw_torch",
        "train.bf16=false",
        "train.use_cpu=true",
        "train.per_device_train_batch_size=2",
        "train.gradient_accumulation_steps=1",
        "train.learning_rate=1e-2",
        "train.lr_scheduler_type=constant",
        "train.warmup_steps=0",
        "train.save_strategy=no",
        "train.disable_tqdm=true",
        *extra,
    ]


# --------------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["lora_4k.yaml", "qlora_16k.yaml"])
def test_shipped_recipes_validate_and_start_with_their_command(name):
    header = (RECIPES / name).read_text().split("\nmethod:")[0].splitlines()
    commands = [line for line in header if line.startswith("#   ") and f"recipes/{name}" in line]
    assert commands and all(line.startswith("#") for line in header)  # the exact command(s) come first
    recipe = load_recipe(RECIPES / name)
    assert recipe.moe.router == "frozen" and recipe.moe.router_aux_loss_coef == 0.0
    assert recipe.train["gradient_checkpointing"] is True
    if name == "qlora_16k.yaml":
        assert recipe.method == "qlora" and recipe.quantization.bits == 4 and recipe.quantization.quant_type == "nf4"
        assert recipe.data.max_length == recipe.context.target_length == 16384 and recipe.context.method == "ntk"
        assert recipe.train["learning_rate"] == 1e-4 and recipe.train["lr_scheduler_type"] == "constant"
    else:
        assert recipe.method == "lora" and recipe.data.max_length == 4096


def minimal(**sections) -> dict:
    values = {"model": {"path": "m"}, "data": {"train_file": "t.jsonl"}, "train": {"output_dir": "o"}}
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return values


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (minimal(optimizer={"lr": 1}), r"unknown top-level key\(s\) \['optimizer'\]"),
        (minimal(lora={"rank": 8}), r"unknown key\(s\) \['lora.rank'\]"),
        (minimal(train={"learning_rat": 1e-4}), r"unknown key\(s\) \['learning_rat'\]"),
        (minimal(method="qlora4"), r"recipe key method: 'qlora4' is not one of"),
        (minimal(lora={"preset": "everything"}), r"recipe key lora.preset"),
        (minimal(data={"overlong": "wrap"}), r"recipe key data.overlong"),
        (minimal(context={"method": "ntk-by-parts"}), r"recipe key context.method"),
        (minimal(train={"learning_rate": "fast"}), r"recipe key train.learning_rate: expected a number"),
        (minimal(train={"bf16": "yes"}), r"recipe key train.bf16: expected true or false"),
        (minimal(moe={"expert_lr_scale": 0}), r"recipe key moe.expert_lr_scale"),
        (minimal(method="full", moe={"router": "lora"}), r"'lora' needs method lora or qlora"),
        ({"model": {"path": "m"}, "train": {"output_dir": "o"}}, r"data.train_file is required"),
    ],
)
def test_recipe_errors_name_the_key(values, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(values)


@pytest.mark.parametrize("name", ["gradient_checkpointing", "activation_checkpointing"])
def test_checkpointing_takes_either_name_and_uses_the_installed_one(name, tmp_path):
    """transformers 5.25 renamed gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs): a recipe
    with either name turns checkpointing on (non-reentrant) on every supported release, without the old name's
    FutureWarning."""
    import warnings

    from yuan_hf.finetune.runner import training_arguments

    recipe = recipe_from_dict(minimal(train={"output_dir": str(tmp_path / "o"), "use_cpu": True, name: True}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = training_arguments(recipe)
    trainer_reads = "activation_checkpointing" if hasattr(args, "activation_checkpointing") else "gradient_checkpointing"
    assert getattr(args, trainer_reads) is True
    assert getattr(args, f"{trainer_reads}_kwargs") == {"use_reentrant": False}


def test_checkpointing_under_both_names_is_refused():
    values = minimal(train={"gradient_checkpointing": True, "activation_checkpointing": False})
    with pytest.raises(RecipeError, match="give one of .*checkpointing"):
        recipe_from_dict(values)


def test_zero3_lora_switches_to_reentrant_checkpointing_where_the_trainer_reads_it(monkeypatch, tmp_path):
    """PEFT + ZeRO-3 needs reentrant checkpointing; the runner sets it after TrainingArguments is built, so it must
    use the field the installed Trainer reads (5.25 mirrors the old alias only at construction)."""
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from yuan_hf.finetune import runner

    class ZeRO3Arguments(TrainingArguments):  # what a DeepSpeed ZeRO-3 config gives, without DeepSpeed installed
        def __post_init__(self):
            super().__post_init__()
            self.deepspeed_plugin = SimpleNamespace(zero_stage=3)

    monkeypatch.setattr(runner, "TrainingArguments", ZeRO3Arguments)
    recipe = recipe_from_dict(minimal(train={"output_dir": str(tmp_path / "o"), "use_cpu": True, "gradient_checkpointing": True}))
    args = runner.training_arguments(recipe)
    trainer_reads = "activation_checkpointing_kwargs" if hasattr(args, "activation_checkpointing_kwargs") else "gradient_checkpointing_kwargs"
    assert getattr(args, trainer_reads) == {"use_reentrant": True}


def test_overrides_parse_yaml_1_2_scalars(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    recipe = load_recipe(
        path, ["train.learning_rate=1e-4", "train.save_strategy=no", "lora.r=4", "moe.expert_lr_scale=auto"]
    )
    assert recipe.train["learning_rate"] == 1e-4 and recipe.train["save_strategy"] == "no" and recipe.lora.r == 4
    assert recipe.moe.expert_lr_scale == "auto"
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(path, ["train.max_steps"])
    assert finetune_main(str(path), ["lora.rank=4"]) == 2  # reported, not raised, by the CLI entry point


# ------------------------------------------------------------------------------------------------------ runner


def test_qlora_recipe_runs_end_to_end_with_context_extension(toy, tmp_path):
    recipe = load_recipe(
        RECIPES / "qlora_16k.yaml",
        cpu_overrides(toy, tmp_path / "run", "context.target_length=1024", "train.max_steps=30", "data.probe_rows=4"),
    )
    metrics = run_recipe(recipe)
    assert metrics["method"] == "qlora" and metrics["steps"] == 30 and metrics["world_size"] == 1
    assert metrics["probe_loss_after"] < metrics["probe_loss_before"] - 2.0, metrics
    # toy checkpoint: 512 positions, base 10000, 16 rotary dims -> NTK for 1024 tokens
    assert metrics["max_position_embeddings"] == 1024
    assert metrics["rope_parameters"]["rope_theta"] == pytest.approx(10000 * 2 ** (16 / 14))
    assert metrics["tokens_seen"] > 0 and metrics["tokens_per_s"] > 0 and metrics["peak_memory_gib"] > 0
    saved = json.loads((tmp_path / "run" / METRICS_FILE).read_text())
    assert saved["probe_loss_after"] == metrics["probe_loss_after"]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "tokenizer_config.json").is_file()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_data_parallel_with_torchrun(toy, tmp_path):
    """The same recipe under `torchrun --nproc_per_node 2` (gloo on CPU): both ranks train, gradients are
    all-reduced (identical trainable weights on both ranks at the end), tokens are counted over both."""
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "yuan_hf.finetune", str(RECIPES / "lora_4k.yaml"),
        *cpu_overrides(toy, out, "train.max_steps=10", "data.probe_rows=4"),
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 10
    checksums = metrics["rank_param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert metrics["probe_loss_after"] < metrics["probe_loss_before"] - 0.5, metrics


# ---------------------------------------------------------------------------------------------------------- TRL


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_sft_trainer_with_padding_free_packing(tmp_path):
    """TRL 1.16 `SFTConfig(packing=True, padding_free=True)` on our tokenized data: it keeps our labels, packs,
    flattens with restarting position_ids (+ cu_seq_lens, seq_idx), and its fused-LM-head loss on a batch equals
    the model's own loss on the same batch."""
    example = _load_example("finetune_trl_sft")
    result = example.main(
        ["--demo", str(tmp_path / "demo"), "--output-dir", str(tmp_path / "out"), "--expert-lr-scale", "auto"]
    )
    losses, trainer = result["losses"], result["trainer"]
    assert len(losses) == 3 and losses[-1] < losses[0] - 1.5, losses
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups["experts"] == pytest.approx(groups["shared"] * 0.5)  # sqrt(2 / 8)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    assert {"cu_seq_lens_q", "seq_idx", "position_ids"} <= set(batch)
    assert (batch["labels"][batch["position_ids"] == 0] == -100).all()
    model = trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(batch))
        own = model(**{k: batch[k] for k in ("input_ids", "labels", "position_ids")}).loss
    torch.testing.assert_close(trl_loss, own, rtol=0, atol=1e-5)
    # and our own collator builds the same padding-free layout from TRL's packed rows
    row = {key: batch[key][0].tolist() for key in ("input_ids", "labels", "position_ids")}
    ours = SFTDataCollator(pad_token_id=5)([row])
    assert torch.equal(ours["labels"], batch["labels"]) and torch.equal(ours["cu_seq_lens_q"], batch["cu_seq_lens_q"])


def test_trainer_example_demo_runs(tmp_path):
    example = _load_example("finetune_trainer")
    result = example.main(["--demo", str(tmp_path / "demo"), "--qlora", "--output-dir", str(tmp_path / "out")])
    assert result["loss_after"] < result["loss_before"] - 2.0, result
    assert (tmp_path / "out" / "adapter_config.json").is_file()


# ------------------------------------------------------------------------------------------ distributed configs


def test_accelerate_and_deepspeed_configs_name_real_yuan_classes():
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(EXAMPLES / "accelerate_fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP"
    layer = fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
    assert layer == "YuanM32DecoderLayer" and hasattr(modeling_yuan_m32, layer)
    deepspeed = load_config_from_file(str(EXAMPLES / "accelerate_deepspeed.yaml"))
    assert deepspeed.distributed_type == "DEEPSPEED"
    leaf = deepspeed.deepspeed_config["deepspeed_moe_layer_cls_names"]
    assert leaf == "YuanM32SparseMoeBlock" and hasattr(modeling_yuan_m32, leaf)
    ds_file = ROOT / deepspeed.deepspeed_config["deepspeed_config_file"]
    assert json.loads(ds_file.read_text())["zero_optimization"]["stage"] == 3


def test_sft_dataset_feeds_datasets_for_trl(toy):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy["model"])
    dataset = build_sft_dataset(toy["train_file"], tokenizer, max_length=64, packing=False)
    hf = dataset.to_hf_dataset()
    assert hf.column_names == ["input_ids", "labels"] and len(hf) == 96
    assert hf[0] == {"input_ids": dataset.rows[0]["input_ids"], "labels": dataset.rows[0]["labels"]}
