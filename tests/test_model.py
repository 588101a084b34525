"""Self-consistency of the native model on tiny random weights (fp32, CPU)."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, GenerationConfig, StaticCache

import yuan_hf
from yuan_hf import YuanM32Config, YuanM32ForCausalLM
from yuan_hf.testing import tiny_config

from conftest import enable_activation_checkpointing

ATOL = 1e-5  # fp32 reorderings only: the same math in a different grouping
# different batch shapes / masks / kernels take different fp32 matmul paths (IEIT's own batch-2 vs batch-1 differs
# by 1.6e-4 on the fixtures); a leak of padding or of a neighbouring document shows up at 1e-1 and above
SHAPE_ATOL = 1e-4


def make_model(**overrides) -> YuanM32ForCausalLM:
    torch.manual_seed(0)
    model = YuanM32ForCausalLM(tiny_config(**overrides)).float().eval()
    with torch.no_grad():  # non-trivial norms and conv biases so that bugs in them show up
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, 500, (batch, length), generator=g)


@torch.no_grad()
@pytest.mark.parametrize("prompt_len", [1, 7])
def test_incremental_decoding_equals_full_forward(model, prompt_len):
    x = ids(2, 12)
    full = model(x, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    steps = [model(x[:, :prompt_len], past_key_values=cache, use_cache=True).logits]
    for t in range(prompt_len, x.shape[1]):
        steps.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_chunked_prefill_equals_full_forward(model):
    x = ids(2, 20)
    full = model(x, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    parts = [model(x[:, a:b], past_key_values=cache, use_cache=True).logits for a, b in [(0, 5), (5, 6), (6, 14), (14, 20)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padded_batch_generation_equals_rows_alone(model):
    rows = [ids(1, 9, seed=2)[0], ids(1, 4, seed=3)[0], ids(1, 1, seed=4)[0]]
    width = max(len(r) for r in rows)
    pad = model.config.pad_token_id
    batch = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        batch[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    kwargs = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    together = model.generate(batch, attention_mask=mask, **kwargs)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long), **kwargs)
        assert torch.equal(together.sequences[i, width:], alone.sequences[0, len(r) :]), f"row {i} differs"
        for step_batched, step_alone in zip(together.scores, alone.scores):
            torch.testing.assert_close(step_batched[i], step_alone[0], atol=SHAPE_ATOL, rtol=0)


@torch.no_grad()
def test_padded_forward_matches_unpadded_rows(model):
    short, long_ = ids(1, 5, seed=5), ids(1, 11, seed=6)
    batch = torch.cat([torch.cat([torch.full((1, 6), model.config.pad_token_id), short], 1), long_])
    mask = torch.ones_like(batch)
    mask[0, :6] = 0
    out = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(out[0, 6:], model(short).logits[0], atol=SHAPE_ATOL, rtol=0)
    torch.testing.assert_close(out[1], model(long_).logits[0], atol=SHAPE_ATOL, rtol=0)


@torch.no_grad()
def test_packed_sequences_equal_separate_forwards(model):
    docs = [ids(1, n, seed=10 + n)[0] for n in (5, 1, 9, 3)]
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    out = model(packed, position_ids=position_ids).logits[0]
    start = 0
    for d in docs:
        alone = model(d[None]).logits[0]
        torch.testing.assert_close(out[start : start + len(d)], alone, atol=SHAPE_ATOL, rtol=0)
        start += len(d)


@torch.no_grad()
def test_beam_search_with_and_without_cache(model):
    x = ids(2, 6, seed=20)
    kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(x, use_cache=True, **kwargs), model.generate(x, use_cache=False, **kwargs))


@torch.no_grad()
def test_static_cache_equals_dynamic(model):
    x = ids(2, 7, seed=21)
    kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, output_scores=True,
                  return_dict_in_generate=True)  # fmt: skip
    dynamic = model.generate(x, **kwargs)
    static = model.generate(x, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic.sequences, static.sequences)
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(dynamic.scores), atol=ATOL, rtol=0)


@torch.no_grad()
def test_static_cache_object_in_forward(model):
    x = ids(1, 9, seed=22)
    full = model(x).logits
    cache = StaticCache(config=model.config, max_cache_len=32)
    first = model(x[:, :6], past_key_values=cache, use_cache=True).logits
    rest = [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(6, 9)]
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_assisted_decoding_equals_greedy(model):
    x = ids(1, 6, seed=23)
    assistant = make_model(num_hidden_layers=1)
    kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False)
    greedy = model.generate(x, **kwargs)
    assisted = model.generate(x, assistant_model=assistant, **kwargs)
    assert torch.equal(assisted, greedy)


@torch.no_grad()
def test_generate_continues_from_returned_cache(model):
    x = ids(1, 6, seed=24)
    one_shot = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False)
    first = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False,
                           return_dict_in_generate=True)  # fmt: skip
    seq = first.sequences
    second = model.generate(seq, attention_mask=torch.ones_like(seq), past_key_values=first.past_key_values,
                            max_new_tokens=6, do_sample=False)  # fmt: skip
    assert torch.equal(second, one_shot)


def test_save_load_round_trip_is_exact(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = ids(2, 8)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied


@torch.no_grad()
def test_bfloat16_forward_keeps_router_in_fp32(tmp_path):
    make_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.gate.query.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.experts[0].gate_proj.weight.dtype == torch.bfloat16
    out = model(ids(2, 10), output_router_logits=True)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert out.router_logits[0].dtype == torch.float32
    model.generate(ids(1, 4), attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=3, do_sample=False)


def test_training_step_with_gradient_checkpointing():
    model = make_model().train()
    enable_activation_checkpointing(model)
    x = ids(2, 16)
    out = model(x, labels=x)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(torch.isfinite(g).all() for g in grads.values())
    # the same loss and gradients as without checkpointing
    reference = make_model().train()
    ref_out = reference(x, labels=x)
    ref_out.loss.backward()
    torch.testing.assert_close(out.loss, ref_out.loss, atol=ATOL, rtol=0)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_chunked_loss_equals_full_loss_and_grads():
    x = ids(2, 33)
    labels = x.clone()
    labels[0, :7] = -100
    results = []
    for chunk in (0, 8):
        model = make_model(loss_chunk_size=chunk).train()
        out = model(x, labels=labels)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full, full_grads), (chunked, chunked_grads) = results
    assert chunked.logits is None and full.logits is not None
    torch.testing.assert_close(chunked.loss, full.loss, atol=1e-5, rtol=0)
    for name in full_grads:
        torch.testing.assert_close(chunked_grads[name], full_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_aux_loss_only_when_asked():
    x = ids(2, 8)
    model = make_model()
    assert model(x, labels=x).aux_loss is None
    plain = model(x, labels=x, output_router_logits=True)
    assert plain.aux_loss is not None and plain.aux_loss > 0
    with_coef = make_model(router_aux_loss_coef=0.5)(x, labels=x, output_router_logits=True)
    torch.testing.assert_close(with_coef.loss, plain.loss + 0.5 * plain.aux_loss, atol=1e-6, rtol=0)


@torch.no_grad()
def test_backbone_returns_router_logits(model):
    out = model.model(ids(2, 5), output_router_logits=True)
    assert len(out.router_logits) == model.config.num_hidden_layers
    assert out.router_logits[0].shape == (10, model.config.num_experts)


@torch.no_grad()
def test_attention_implementations_agree():
    x = ids(2, 9)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    outputs = {}
    for impl in ("eager", "sdpa", "flex_attention"):
        model = make_model()
        model.set_attn_implementation(impl)
        outputs[impl] = model(x, attention_mask=mask).logits
    for impl in ("sdpa", "flex_attention"):  # padding positions' outputs are undefined: compare real tokens
        torch.testing.assert_close(outputs[impl][0], outputs["eager"][0], atol=SHAPE_ATOL, rtol=0)
        torch.testing.assert_close(outputs[impl][1, 3:], outputs["eager"][1, 3:], atol=SHAPE_ATOL, rtol=0)


@torch.no_grad()
def test_linear_router_variant_runs_and_caches():
    model = make_model(router_type="linear")
    x = ids(1, 6)
    full = model(x).logits
    cache = DynamicCache(config=model.config)
    steps = [model(x[:, :3], past_key_values=cache).logits] + [model(x[:, t : t + 1], past_key_values=cache).logits for t in range(3, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_longer_than_max_positions_runs_and_warns_once(caplog):
    model = make_model(max_position_embeddings=16)
    logger = logging.getLogger("yuan_hf.modeling.modeling_yuan_m32")
    with caplog.at_level(logging.WARNING):
        logger.propagate = True
        out = model(ids(1, 40))
        model(ids(1, 41))
    assert out.logits.shape == (1, 40, model.config.vocab_size)
    assert sum("exceeds max_position_embeddings" in r.getMessage() for r in caplog.records) == 1


def test_invalid_config_values_name_the_field():
    cases = {
        "num_experts_per_tok": dict(num_experts=4, num_experts_per_tok=5),
        "router_type": dict(router_type="sinkhorn"),
        "hidden_size": dict(hidden_size=-8),
        "layer_types": dict(num_hidden_layers=2, layer_types=["full_attention", "full_attention"]),
        "rope_theta": dict(rope_parameters={"rope_type": "default", "rope_theta": 0.0, "partial_rotary_factor": 0.5}),
        "loss_chunk_size": dict(loss_chunk_size=-1),
        "num_key_value_heads": dict(num_attention_heads=4, num_key_value_heads=3),
        "partial_rotary_factor": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.3}),
    }
    for field, kwargs in cases.items():
        with pytest.raises(ValueError, match=field):
            YuanM32Config(**kwargs)


def test_default_config_is_the_release():
    config = YuanM32Config()
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (135040, 2048, 24, 16)
    assert (config.head_dim, config.rotary_dim, config.num_experts, config.num_experts_per_tok) == (256, 128, 32, 2)
    assert config.moe_intermediate_size == 8192 and config.rope_parameters["rope_theta"] == 40890
    assert (config.bos_token_id, config.eos_token_id, config.sep_token_id) == (77185, 77185, 77187)
    assert config.layer_types == ["hybrid"] * 24 and config.tie_word_embeddings


def test_registration_is_idempotent_and_auto_classes_work():
    yuan_hf.register()
    importlib.reload(yuan_hf)
    values = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("yuan_m32", **values)
    assert isinstance(config, YuanM32Config)
    assert type(AutoModel.from_config(config)).__name__ == "YuanM32Model"
    assert type(AutoModelForCausalLM.from_config(config)).__name__ == "YuanM32ForCausalLM"


def test_full_size_parameter_count_on_meta():
    with torch.device("meta"):
        model = YuanM32ForCausalLM(YuanM32Config())
    total = sum(p.numel() for p in model.parameters())  # tied: embeddings counted once
    assert abs(total - 39.94e9) < 0.01e9, total
    per_expert = 3 * 2048 * 8192
    active = total - 24 * 30 * per_expert  # 2 of 32 experts run per token
    assert abs(active - 3.70e9) < 0.01e9, active  # the paper's 3.7B active (tied embeddings counted once)


def test_plain_4bit_loading_keeps_the_router_unquantized(tmp_path):
    from transformers import BitsAndBytesConfig

    make_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    layer = model.model.layers[0]
    assert type(layer.mlp.gate.query) is torch.nn.Linear and layer.mlp.gate.query.weight.dtype == torch.float32
    assert type(layer.mlp.experts[0].gate_proj).__name__ == "Linear4bit"


def test_from_pretrained_without_a_path_takes_config_and_state_dict():
    # no folder to adapt (IEIT layout) or check: transformers' own path, as for in-tree models
    model = make_model()
    loaded = YuanM32ForCausalLM.from_pretrained(None, config=model.config, state_dict=model.state_dict()).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    fresh = YuanM32ForCausalLM.from_pretrained(None, config=model.config, state_dict={})  # every weight initialised
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_config_is_constructible_for_any_vocabulary_and_generate_refuses_outside_ids():
    # the release's special ids (77185...) lie outside a small vocabulary: constructible (transformers warns) ...
    assert YuanM32Config(vocab_size=32000).eos_token_id == 77185
    assert isinstance(AutoConfig.for_model("yuan_m32", vocab_size=32000), YuanM32Config)
    # ... but generate refuses them, naming the field, wherever they come from
    model = YuanM32ForCausalLM(tiny_config(eos_token_id=900)).eval()
    x = ids(1, 4)
    with pytest.raises(ValueError, match="eos_token_id=900 outside the vocabulary"):
        model.generate(x, max_new_tokens=2)
    model.generate(x, max_new_tokens=2, eos_token_id=3)  # fixed by an argument
    with pytest.raises(ValueError, match="pad_token_id=512 outside"):
        make_model().generate(x, max_new_tokens=2, pad_token_id=512)
    bad = GenerationConfig(max_new_tokens=2, bos_token_id=-1)
    with pytest.raises(ValueError, match="bos_token_id=-1 outside"):
        make_model().generate(x, bad)


@torch.no_grad()
def test_from_config_in_bfloat16_keeps_router_in_fp32():
    for router_type in ("attention", "linear"):
        model = AutoModelForCausalLM.from_config(tiny_config(router_type=router_type), dtype=torch.bfloat16)
        gate = model.model.layers[0].mlp.gate
        assert {p.dtype for p in gate.parameters()} == {torch.float32}, router_type
        assert model.model.layers[0].mlp.experts[0].gate_proj.weight.dtype == torch.bfloat16
        out = model(ids(2, 5), output_router_logits=True)
        assert out.logits.dtype == torch.bfloat16 and out.router_logits[0].dtype == torch.float32


@torch.no_grad()
def test_old_cache_name_is_deprecated_only_where_transformers_renamed_it(model):
    import warnings

    from yuan_hf.modeling.transformers_compat import CACHE_FIELD

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(ids(1, 3), past_key_values=DynamicCache(config=model.config))
    deprecated = [w for w in caught if "`past_key_values` is deprecated" in str(w.message)]
    assert len(deprecated) == (1 if CACHE_FIELD == "cache" else 0)
