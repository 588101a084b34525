"""Fine-tuning: context extension, LoRA / QLoRA, memory features (checkpointing, chunked loss, packing), MoE options.

Tiny models from `tiny_config`. Training tests use `initializer_range=0.2`: with the default 0.02 the frozen,
tied embeddings of a random 64-wide model bound every logit to about +-1.3, so no adapter could lower the loss
much and "the loss drops clearly" would test nothing.
"""

from __future__ import annotations

import copy
import math

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import TrainingArguments
from transformers.testing_utils import CaptureLogger

from yuan_hf import YuanM32Config, YuanM32ForCausalLM
from yuan_hf.finetune import (
    QLORA_SKIP_MODULES,
    SFTDataCollator,
    YuanTrainer,
    activation_checkpointing_args,
    apply_lora,
    build_sft_dataset,
    check_context_length,
    configure_router_aux_loss,
    count_quantized_linears,
    extend_context,
    load_for_qlora,
    lora_config,
    moe_param_groups,
    ntk_rope_theta,
    set_router_trainable,
)
from yuan_hf.finetune import context as context_module
from yuan_hf.finetune.runner import probe_loss
from yuan_hf.finetune.toy import toy_sft_records, toy_tokenizer
from yuan_hf.testing import tiny_config

from conftest import enable_activation_checkpointing

TRAIN_INIT = 0.2  # see the module docstring
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls run faster on one thread


def tiny_model(seed: int = 0, **overrides) -> YuanM32ForCausalLM:
    torch.manual_seed(seed)
    return YuanM32ForCausalLM(tiny_config(**overrides)).eval()


def wrapped_names(model: nn.Module) -> set[str]:
    """Names of the modules PEFT replaced by LoRA layers (without the `base_model.model.` prefix)."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, LoraLayer)}


# ------------------------------------------------------------------------------------------------ context length


def test_ntk_rope_theta_gives_ieits_40890():
    assert round(ntk_rope_theta(10000.0, 16384 / 4096, 128)) == 40890
    assert ntk_rope_theta(10000.0, 1.0, 128) == 10000.0


def test_extend_context_full_size_config_matches_ieit():
    config = YuanM32Config(
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )
    assert config.rotary_dim == 128
    extend_context(config, 16384)
    assert round(config.rope_parameters["rope_theta"]) == 40890
    assert config.rope_parameters["rope_type"] == "default"
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    assert config.max_position_embeddings == 16384
    extend_context(config, 16384)  # already there: unchanged
    assert round(config.rope_parameters["rope_theta"]) == 40890


@pytest.mark.parametrize("method", ["ntk", "linear", "dynamic", "yarn"])
def test_extend_context_rope_parameters(method):
    config = tiny_config()  # 512 positions, base 10000, rotary 16 of 32 dims
    base_inv = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    extend_context(config, 2048, method=method)
    rope = config.rope_parameters
    assert rope["partial_rotary_factor"] == 0.5
    inv = YuanM32ForCausalLM(config).model.rotary_emb.inv_freq
    if method == "ntk":
        assert rope["rope_type"] == "default" and rope["rope_theta"] == pytest.approx(10000 * 4 ** (16 / 14))
        torch.testing.assert_close(inv, 1.0 / rope["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))
    elif method == "linear":
        assert rope["rope_type"] == "linear" and rope["factor"] == 4.0
        torch.testing.assert_close(inv, base_inv / 4)
    elif method == "yarn":
        assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0
        assert rope["original_max_position_embeddings"] == 512
        assert YuanM32ForCausalLM(config).model.rotary_emb.attention_scaling > 1.0  # YaRN's temperature
    else:  # dynamic: trained base for short inputs, scaling starts at the original length
        assert rope["rope_type"] == "dynamic" and rope["factor"] == 1.0
        torch.testing.assert_close(inv, base_inv)
    assert config.max_position_embeddings == (512 if method == "dynamic" else 2048)


def test_dynamic_equals_ntk_at_the_target_length():
    """Dynamic NTK (factor 1) raises the base for the input's own length: at the target length it is the NTK base."""
    dynamic, ntk = tiny_model(), tiny_model()
    extend_context(dynamic, 2048, method="dynamic")
    extend_context(ntk, 2048, method="ntk")
    positions = torch.arange(2048)[None]
    x = torch.zeros(1, 1)
    for got, want in zip(dynamic.model.rotary_emb(x, positions), ntk.model.rotary_emb(x, positions), strict=True):
        torch.testing.assert_close(got, want)


def test_extend_context_rebuilds_the_model_rotary_embedding_also_under_peft():
    model = apply_lora(tiny_model(), lora_config("attention", r=4))
    old = model.base_model.model.model.rotary_emb
    ids = torch.randint(6, 500, (1, 8))
    positions = torch.tensor([[0, 1, 2, 3, 300, 301, 302, 303]])
    before = model(input_ids=ids, position_ids=positions).logits
    extend_context(model, 2048)
    new = model.base_model.model.model.rotary_emb
    assert new is not old and model.config.max_position_embeddings == 2048
    assert not torch.equal(new.inv_freq, old.inv_freq)
    after = model(input_ids=ids, position_ids=positions).logits
    assert not torch.allclose(before, after)  # far positions are encoded with the new base


def test_extend_context_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        extend_context(tiny_config(), 1024, method="ntk-by-parts")
    stacked = extend_context(tiny_config(), 1024, method="linear")
    with pytest.raises(ValueError, match="cannot be stacked"):
        extend_context(stacked, 4096)
    with pytest.raises(ValueError, match="rope_in_bfloat16"):
        extend_context(tiny_config(rope_in_bfloat16=True), 1024)
    shorter = tiny_config()
    extend_context(shorter, 256)  # nothing to extend: unchanged
    assert shorter.max_position_embeddings == 512 and shorter.rope_parameters["rope_theta"] == 10000.0


def test_sequence_longer_than_rope_settings_warns_with_the_fix():
    config = tiny_config()
    with CaptureLogger(context_module.logger) as captured:
        assert check_context_length(config, 512)
    assert captured.out == ""
    with CaptureLogger(context_module.logger) as captured:
        assert not check_context_length(config, 2048)
    assert "2048" in captured.out and "extend_context(model, 2048" in captured.out
    assert "context.target_length: 2048" in captured.out
    extend_context(config, 1024, method="dynamic")
    assert check_context_length(config, 8192)  # dynamic NTK scales at run time


# ---------------------------------------------------------------------------------------------------------- LoRA


def test_lora_presets_wrap_exactly_the_named_modules():
    layers, experts = range(2), range(8)
    attention = {f"model.layers.{i}.self_attn.{p}" for i in layers for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    mlp = ("gate_proj", "up_proj", "down_proj")
    expert = {f"model.layers.{i}.mlp.experts.{e}.{p}" for i in layers for e in experts for p in mlp}
    router = {f"model.layers.{i}.mlp.gate.{p}" for i in layers for p in ("query", "key", "value")}
    assert wrapped_names(apply_lora(tiny_model(), lora_config("attention"))) == attention
    assert wrapped_names(apply_lora(tiny_model(), lora_config("experts"))) == expert
    assert wrapped_names(apply_lora(tiny_model(), lora_config("all"))) == attention | expert
    assert wrapped_names(apply_lora(tiny_model(), lora_config("all", router="lora"))) == attention | expert | router


def test_lora_router_full_trains_the_router_weights():
    model = apply_lora(tiny_model(), lora_config("attention", router="full"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    router = {n for n in trainable if ".mlp.gate.modules_to_save." in n}
    assert len(router) == 6  # query/key/value weights of 2 layers
    assert trainable - router == {n for n in trainable if "lora_" in n}
    frozen = apply_lora(tiny_model(), lora_config("attention"))
    assert not any(".mlp.gate." in n for n, p in frozen.named_parameters() if p.requires_grad)


def test_lora_targets_that_match_nothing_are_named():
    with pytest.raises(ValueError, match=r"\['q_porj'\]"):
        lora_config("all", extra_target_modules=["q_porj"], model=tiny_model())
    with pytest.raises(ValueError, match="mlp.gate.query"):  # the linear router has no Linear to adapt
        apply_lora(tiny_model(router_type="linear"), lora_config("all", router="lora"))
    with pytest.raises(ValueError, match="preset must be one of"):
        lora_config("everything")


def test_lora_save_load_exact_and_merge_round_trip(tmp_path):
    base = tiny_model(initializer_range=TRAIN_INIT)
    reference_base = copy.deepcopy(base)
    # random (non-zero) B so the adapter changes the outputs
    model = apply_lora(base, lora_config("all", r=4, router="full", init_lora_weights=False)).eval()
    ids = torch.randint(6, 500, (2, 12))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        assert not torch.allclose(adapted, reference_base(input_ids=ids).logits)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(reference_base), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, adapted)
        # Merging reorders the sum, (W + s*B@A) x instead of W x + s*B(A x): in fp32 that alone moves these logits
        # (|logit| <= 6) by ~1e-5, in fp64 by ~1e-15, so the merge is checked in fp64 where any real error stands out.
        reloaded = reloaded.double()
        adapted64 = reloaded(input_ids=ids).logits
        merged = reloaded.merge_and_unload()
        assert type(merged) is YuanM32ForCausalLM and not wrapped_names(merged)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted64)
    merged.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        again = YuanM32ForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64).eval()
        assert torch.equal(again(input_ids=ids).logits, merged(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------------- training


def toy_data(tokenizer, n: int = 96, max_length: int = 64):
    return build_sft_dataset(toy_sft_records(n, seed=0), tokenizer, max_length=max_length)


def train(model: nn.Module, dataset, collator, tmp_path, *, steps: int = 30, lr: float = 1e-2, **trainer_kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        **activation_checkpointing_args(),
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = YuanTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator, **trainer_kwargs)
    trainer.train()
    return trainer


def test_lora_training_lowers_the_loss_and_the_adapter_reloads(tmp_path):
    tokenizer = toy_tokenizer()
    dataset, collator = toy_data(tokenizer), SFTDataCollator.from_tokenizer(tokenizer)
    base = tiny_model(initializer_range=TRAIN_INIT)
    pristine = copy.deepcopy(base)
    model = apply_lora(base, lora_config("all", r=8, dropout=0.0))
    probe = dataset.rows[:8]
    before = probe_loss(model, probe, collator)
    trainer = train(model, dataset, collator, tmp_path, expert_lr_scale="auto")
    after = probe_loss(model, probe, collator)
    assert before > 7.0 and after < before - 2.0, (before, after)
    # expert-specific learning rates survived the scheduler: experts at lr * sqrt(top_k / num_experts) = lr / 2
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["experts"] == pytest.approx(lrs["shared"] * math.sqrt(2 / 8))
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(pristine, tmp_path / "adapter").eval()
    model.eval()
    batch = collator(probe[:2])
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).loss, model(**batch).loss)
        assert torch.equal(reloaded(input_ids=batch["input_ids"]).logits, model(input_ids=batch["input_ids"]).logits)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model(initializer_range=TRAIN_INIT).save_pretrained(path)
    return path


@pytest.mark.compat
def test_qlora_quantizes_the_experts_and_keeps_router_and_lf_gate(tiny_checkpoint):
    full = YuanM32ForCausalLM.from_pretrained(tiny_checkpoint)
    model = load_for_qlora(tiny_checkpoint, bits=4)
    counts = count_quantized_linears(model)
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    mlp = ("gate_proj", "up_proj", "down_proj")
    expected |= {f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(2) for e in range(8) for p in mlp}
    assert set(counts["quantized_names"]) == expected and counts["quantized"] == 56
    assert all(isinstance(model.get_submodule(n), bnb.nn.Linear4bit) for n in expected)
    for name in counts["unquantized_names"]:  # router (fp32) and lm_head only
        assert name == "lm_head" or ".mlp.gate." in name, name
        assert model.get_submodule(name).weight.dtype == torch.float32
    conv = model.model.layers[0].self_attn.lf_gate.conv1
    assert isinstance(conv, nn.Conv1d) and conv.weight.dtype == torch.float32  # not quantized
    # 4-bit storage: two weights per byte, plus block scales
    quantized_params = sum(full.get_submodule(n).weight.numel() for n in expected)
    for name in expected:
        assert model.get_submodule(name).weight.numel() * 2 == full.get_submodule(name).weight.numel()
    other_bytes = full.get_memory_footprint() - 4 * quantized_params
    footprint = model.get_memory_footprint()
    assert other_bytes + quantized_params / 2 <= footprint <= other_bytes + quantized_params / 2 * 1.1
    assert footprint < 0.25 * full.get_memory_footprint()
    assert all(not p.requires_grad for p in model.parameters())  # prepare_model_for_kbit_training froze the base


@pytest.mark.compat
def test_qlora_8bit_loads_and_backpropagates(tiny_checkpoint):
    model = load_for_qlora(tiny_checkpoint, bits=8)
    assert count_quantized_linears(model)["quantized"] == 56
    assert all(isinstance(m, bnb.nn.Linear8bitLt) for n, m in model.named_modules() if n.endswith("experts.0.up_proj"))
    model = apply_lora(model, lora_config("all", r=4, dropout=0.0))
    model.train()
    ids = torch.randint(6, 500, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert len(grads) == 56 and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.compat
def test_qlora_training_lowers_the_loss_and_the_adapter_reloads(tmp_path, tiny_checkpoint):
    tokenizer = toy_tokenizer()
    dataset, collator = toy_data(tokenizer), SFTDataCollator.from_tokenizer(tokenizer)
    model = apply_lora(load_for_qlora(tiny_checkpoint, bits=4), lora_config("all", r=8, dropout=0.0))
    probe = dataset.rows[:8]
    before = probe_loss(model, probe, collator)  # an eval-mode forward first: training must still work after it
    train(model, dataset, collator, tmp_path, expert_lr_scale=1.0)
    after = probe_loss(model, probe, collator)
    assert before > 7.0 and after < before - 2.0, (before, after)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_for_qlora(tiny_checkpoint, bits=4), tmp_path / "adapter").eval()
    model.eval()
    batch = collator(probe[:2])
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).loss, model(**batch).loss)


# ------------------------------------------------------------------------------------------- memory features


def loss_and_grads(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def labelled_batch(seed: int = 1) -> dict:
    torch.manual_seed(seed)
    ids = torch.randint(6, 500, (2, 24))
    labels = ids.clone()
    labels[:, :9] = -100  # prompts
    labels[1, 20:] = -100
    return {"input_ids": ids, "labels": labels}


def test_gradient_checkpointing_with_lora_gives_the_same_gradients():
    model = apply_lora(tiny_model(), lora_config("all", r=4, dropout=0.0, init_lora_weights=False)).train()
    batch = labelled_batch()
    loss, grads = loss_and_grads(model, batch)
    enable_activation_checkpointing(model)
    assert model.base_model.model.model.gradient_checkpointing
    loss_gc, grads_gc = loss_and_grads(model, batch)
    assert torch.equal(loss, loss_gc) and grads.keys() == grads_gc.keys() and len(grads) == 112
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name], msg=name)


def test_chunked_loss_equals_the_standard_loss_value_and_gradients():
    model = tiny_model().train()
    batch = labelled_batch()
    model.config.loss_chunk_size = 0
    full_out = model(**batch)
    assert full_out.logits is not None
    loss, grads = loss_and_grads(model, batch)
    model.config.loss_chunk_size = 7  # 48 tokens: 7 chunks, the last one partial
    chunked_out = model(**batch)
    assert chunked_out.logits is None  # never built
    chunked, chunked_grads = loss_and_grads(model, batch)
    torch.testing.assert_close(chunked, loss, rtol=0, atol=1e-5)
    assert grads.keys() == chunked_grads.keys()
    for name in grads:
        torch.testing.assert_close(chunked_grads[name], grads[name], rtol=0, atol=1e-5, msg=name)
    # the Trainer's cross-batch normaliser is honoured the same way
    model.config.loss_chunk_size = 0
    standard = model(**batch, num_items_in_batch=torch.tensor(50)).loss
    model.config.loss_chunk_size = 7
    torch.testing.assert_close(model(**batch, num_items_in_batch=torch.tensor(50)).loss, standard, rtol=0, atol=1e-5)


def test_packed_loss_is_the_token_weighted_mean_of_the_separate_losses():
    """One packed row (positions restart, no mask) = each sample alone: same logits, and the loss is the mean over
    all answer tokens, i.e. the separate losses weighted by their answer-token counts (not their plain mean)."""
    tokenizer = toy_tokenizer()
    records = [
        {"prompt": "w10 w11 w12 w13 w14", "response": "w110"},
        {"prompt": "w20", "response": "w120 w121 w122 w123 w124 w125"},
        {"prompt": "w30 w31", "response": "w130 w131 w132"},
    ]
    samples = build_sft_dataset(records, tokenizer, max_length=64, packing=False).rows
    packed_rows = build_sft_dataset(records, tokenizer, max_length=64, packing=True).rows
    assert len(packed_rows) == 1
    model = tiny_model(loss_chunk_size=0)
    collator = SFTDataCollator.from_tokenizer(tokenizer)
    with torch.no_grad():
        packed_batch = collator(packed_rows)
        packed = model(**packed_batch)
        losses, counts, offset = [], [], 0
        for sample in samples:
            alone = model(**collator([sample]))
            n = len(sample["input_ids"])
            # the packed row keeps BFD order; find this sample's span by its tokens
            start = next(
                s for s in range(packed_batch["input_ids"].shape[1] - n + 1)
                if packed_batch["input_ids"][0, s : s + n].tolist() == sample["input_ids"]
            )  # fmt: skip
            torch.testing.assert_close(packed.logits[0, start : start + n], alone.logits[0])
            losses.append(alone.loss)
            counts.append(sum(label != -100 for label in sample["labels"][1:]))
            offset += n
        padded = model(**SFTDataCollator.from_tokenizer(tokenizer, padding_free=False)(samples)).loss
    assert offset == packed_batch["input_ids"].shape[1]
    weighted = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts)
    torch.testing.assert_close(packed.loss, weighted)
    torch.testing.assert_close(padded, weighted)  # a right-padded batch with an attention mask agrees too
    assert counts == [2, 7, 4]  # answers + <eod>: unequal, so the plain mean is a different number
    assert abs(float(sum(losses) / 3 - weighted)) > 1e-3


# ------------------------------------------------------------------------------------------------- MoE options


def test_router_aux_loss_on_and_off():
    model = tiny_model()
    batch = labelled_batch()
    with torch.no_grad():
        off = model(**batch)
        assert off.aux_loss is None
        configure_router_aux_loss(model, 0.5)
        on = model(**batch)
    assert model.config.output_router_logits and on.aux_loss is not None and on.aux_loss > 0
    torch.testing.assert_close(on.loss, off.loss + 0.5 * on.aux_loss)
    configure_router_aux_loss(model, 0.0)
    assert not model.config.output_router_logits
    with pytest.raises(ValueError, match=">= 0"):
        configure_router_aux_loss(model, -1.0)


def test_freezing_the_router_in_a_full_fine_tune():
    model = tiny_model()
    assert set_router_trainable(model, False) == 6
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"model.layers.{i}.mlp.gate.{p}.weight" for i in range(2) for p in ("query", "key", "value")}
    model.train()
    loss_and_grads(model, labelled_batch())
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    set_router_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())


def test_moe_param_groups_scale_exactly_the_expert_parameters():
    model = tiny_model()
    groups = moe_param_groups(model, lr=1e-3, weight_decay=0.1, expert_lr_scale="auto")
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"experts", "shared", "shared_no_decay"}  # expert weights are all 2-D
    assert by_name["experts"]["lr"] == pytest.approx(1e-3 * math.sqrt(2 / 8))
    assert by_name["shared"]["lr"] == 1e-3 and by_name["shared_no_decay"]["weight_decay"] == 0.0
    ids = {id(p) for g in groups for p in g["params"]}
    assert len(ids) == sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    expert_ids = {id(p) for n, p in model.named_parameters() if ".mlp.experts." in n}
    assert {id(p) for p in by_name["experts"]["params"]} == expert_ids and len(expert_ids) == 48
    with pytest.raises(ValueError, match="positive number or 'auto'"):
        moe_param_groups(model, lr=1e-3, expert_lr_scale=0)


def test_qlora_skip_list_names_linear_modules():
    # transformers 5 matches skip patterns from the start of the name or as a suffix: parents would not protect
    model = tiny_model()
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv1d)]
    for pattern in QLORA_SKIP_MODULES:
        assert any(n.endswith(pattern) for n in linear_names), pattern
