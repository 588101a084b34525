"""LoRA / DoRA on the LF gate's convolutions, and what `target_modules="all-linear"` covers (issue 13.2).

The LF gate's `conv1` / `conv2` are `nn.Conv1d` modules that the model *calls* (a stride-2 conv over
(previous, current) pairs), so PEFT's Conv1d adapters on them take part in the forward and train.
"""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

from yuan_hf.finetune.lora import ROUTER_TARGETS, apply_lora, lora_config
from yuan_hf.testing import tiny_model

CONV_TARGETS = ["conv1", "conv2"]


def _batch():
    ids = torch.randint(6, 500, (2, 12))
    return ids, ids.clone()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_conv_adapters_change_the_logits_train_and_merge(use_dora):
    model = tiny_model()
    ids, labels = _batch()
    with torch.no_grad():
        base_logits = model(ids).logits
    config = LoraConfig(r=4, lora_alpha=8, target_modules=CONV_TARGETS, use_dora=use_dora, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    adapted = [name for name, _ in peft_model.named_modules() if name.endswith("lf_gate.conv1.lora_A.default")]
    assert len(adapted) == model.config.num_hidden_layers
    with torch.no_grad():
        adapted_logits = peft_model(ids).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)  # the adapters take part in the forward

    peft_model.train()
    loss = peft_model(ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g is None]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.step()
        optimizer.zero_grad()
        loss_after = peft_model(ids, labels=labels).loss
        loss_after.backward()
    assert loss_after < loss

    peft_model.eval()
    with torch.no_grad():
        before_merge = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    torch.testing.assert_close(merged, before_merge, atol=1e-4, rtol=1e-4)


def test_our_lora_config_accepts_conv_targets():
    model = tiny_model()
    config = lora_config("attention", r=4, extra_target_modules=CONV_TARGETS, model=model)
    peft_model = apply_lora(model, config)
    assert any(n.endswith("lf_gate.conv2.lora_B.default") for n, _ in peft_model.named_modules())


def test_all_linear_covers_the_router_unless_excluded(caplog):
    """PEFT's "all-linear" excludes only the output head (it has no per-model exclusion list), so it adapts the
    fp32 attention router too; `exclude_modules=ROUTER_TARGETS` leaves it frozen, and `apply_lora` says so."""

    def router_adapted(model) -> bool:
        return any(".mlp.gate.query.lora_A" in n for n, _ in model.named_modules())

    assert router_adapted(get_peft_model(tiny_model(), LoraConfig(r=4, target_modules="all-linear")))
    excluded = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules="all-linear", exclude_modules=list(ROUTER_TARGETS)))
    assert not router_adapted(excluded)
    assert any(".experts.0.gate_proj.lora_A" in n for n, _ in excluded.named_modules())
    with caplog.at_level(logging.WARNING):
        apply_lora(tiny_model(), LoraConfig(r=4, target_modules="all-linear"))
    assert "exclude_modules" in caplog.text and "router" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        apply_lora(tiny_model(), LoraConfig(r=4, target_modules="all-linear", exclude_modules=list(ROUTER_TARGETS)))
    assert "router" not in caplog.text
