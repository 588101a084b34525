"""Sequence / token classification and question answering heads (issue 13.4): a training step each, loading through
the Auto classes with the package and through remote code alone, and a TRL reward-model run."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from yuan_hf import (
    YuanM32ForCausalLM,
    YuanM32ForQuestionAnswering,
    YuanM32ForSequenceClassification,
    YuanM32ForTokenClassification,
)
from yuan_hf.testing import tiny_config

from test_hub import run_without_package

HEADS = {
    "sequence": (YuanM32ForSequenceClassification, AutoModelForSequenceClassification),
    "token": (YuanM32ForTokenClassification, AutoModelForTokenClassification),
    "qa": (YuanM32ForQuestionAnswering, AutoModelForQuestionAnswering),
}


def _batch(kind: str) -> dict:
    ids = torch.randint(6, 500, (2, 10))
    ids[1, -3:] = tiny_config().pad_token_id  # right padding: the sequence head reads the last real token
    mask = (ids != tiny_config().pad_token_id).long()
    if kind == "sequence":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2])}
    if kind == "token":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (2, 10))}
    return {"input_ids": ids, "attention_mask": mask, "start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 5])}


def _main_output(kind: str, out) -> torch.Tensor:
    return out.start_logits if kind == "qa" else out.logits


@pytest.mark.parametrize("kind", HEADS)
def test_head_trains_a_step_and_loads_through_auto_and_remote_code(kind, tmp_path):
    native, auto = HEADS[kind]
    torch.manual_seed(0)
    model = native(tiny_config(num_labels=3, initializer_range=0.2)).train()
    batch = _batch(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(**batch).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "score" in n or "qa_outputs" in n)
    optimizer.step()
    optimizer.zero_grad()
    assert model(**batch).loss < loss

    model.eval().save_pretrained(tmp_path / "head")
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["architectures"] == [native.__name__]
    assert config["auto_map"][auto.__name__] == f"modeling_yuan_m32.{native.__name__}"
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = _main_output(kind, model(**inputs))
        loaded = auto.from_pretrained(tmp_path / "head", dtype=torch.float32).eval()
        assert type(loaded) is native
        # the trained instance and its reload agree to the last bits (5e-7 seen for the QA head); the two loaders
        # (package and remote code) must agree exactly
        reloaded = _main_output(kind, loaded(**inputs))
        torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-5)
        expected = reloaded
    script = f"""
import sys, torch
sys.modules["yuan_hf"] = None  # importing yuan_hf is impossible here
import transformers
model = transformers.{auto.__name__}.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
assert "transformers_modules" in type(model).__module__ and type(model).__name__ == "{native.__name__}"
ids = torch.load(sys.argv[2])
with torch.no_grad():
    out = model(ids[0], attention_mask=ids[1])
torch.save(out.start_logits if "{kind}" == "qa" else out.logits, sys.argv[3])
"""
    ids_and_mask = torch.stack([inputs["input_ids"], inputs["attention_mask"]])
    torch.testing.assert_close(run_without_package(script, tmp_path / "head", ids_and_mask, tmp_path), expected, atol=0, rtol=0)


def test_a_saved_causal_lm_folder_maps_every_auto_class(tmp_path):
    torch.manual_seed(0)
    YuanM32ForCausalLM(tiny_config()).save_pretrained(tmp_path / "lm")
    auto_map = json.loads((tmp_path / "lm" / "config.json").read_text())["auto_map"]
    for auto in (AutoModel, AutoModelForCausalLM, *(a for _, a in HEADS.values())):
        assert auto.__name__ in auto_map, auto.__name__
    script = """
import sys, torch
sys.modules["yuan_hf"] = None
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True, num_labels=1).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""
    scores = run_without_package(script, tmp_path / "lm", torch.randint(6, 500, (2, 7)), tmp_path)
    assert scores.shape == (2, 1)


def test_trl_reward_trainer_trains_a_yuan_reward_model(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from yuan_hf.conversion.writers.tokenizer import build_demo_tokenizer

    tokenizer_dir = build_demo_tokenizer(tmp_path / "tokenizer")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = tiny_config(
        num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
    )  # fmt: skip
    model = YuanM32ForSequenceClassification(config)
    pairs = [("The answer is 42.", "The answer is 7."), ("Good morning.", "Good night."), ("你好，世界！", "世界")] * 4
    data = Dataset.from_dict({"chosen": [c for c, _ in pairs], "rejected": [r for _, r in pairs]})
    args = trl.RewardConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=6, learning_rate=5e-3,
        report_to=[], logging_steps=1, use_cpu=True, save_strategy="no", bf16=False,
    )  # fmt: skip
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]
    trainer.save_model(tmp_path / "reward")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward")
    assert type(reloaded) is YuanM32ForSequenceClassification and reloaded.config.num_labels == 1
