"""Fast decode paths against the reference path: the fused sync-free experts (`experts_implementation="grouped_mm"`),
compiled static-cache generation, torch.export, and the quantized hybrid KV cache.

Reference = the default per-expert ("eager", sort-based) path, uncompiled. fp32 throughout unless stated: tokens must
be identical; logits within ATOL (the same sums in another order; a wrong route or lost state moves them by 1e-1+).
Compile tests use the "eager" dynamo backend: fullgraph capture, guards and recompiles are dynamo's, so they are
what is checked; inductor only makes it slower to test.
"""

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompileConfig, StaticCache

from yuan_hf import YuanM32ForCausalLM, YuanM32QuantizedCache
from yuan_hf.conversion.ieit_hf import convert_ieit_hf
from yuan_hf.modeling.transformers_compat import CACHE_FIELD
from yuan_hf.testing import greedy_reference, tiny_model

from conftest import fixtures_dir

ATOL = 1e-4
NEW_TOKENS = 10


def fused(model, implementation="grouped_mm"):
    model = copy.deepcopy(model)
    model.set_experts_implementation(implementation)
    return model


def prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, 500, (batch, length), generator=g)


def left_padded(model, lengths=(9, 4, 1)):
    rows = [prompts(1, n, seed=10 + n)[0] for n in lengths]
    width = max(lengths)
    batch = torch.full((len(rows), width), model.config.pad_token_id)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        batch[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return batch, mask


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@torch.no_grad()
def test_fused_implementations_equal_eager_logits_and_routing(model, implementation):
    fast = fused(model, implementation)
    x = prompts(3, 11)
    ref, out = model(x, output_router_logits=True), fast(x, output_router_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    for a, b in zip(out.router_logits, ref.router_logits):
        assert torch.equal(a.topk(2).indices, b.topk(2).indices)


@torch.no_grad()
def test_grouped_mm_generation_left_padded_and_static(model):
    fast = fused(model)
    batch, mask = left_padded(model)
    for kwargs in ({}, {"cache_implementation": "static"}):
        ref = model.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
        out = fast.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
        assert torch.equal(out, ref), kwargs
    # batch-1 decode (eager path: two direct expert calls) and fused path against uncached full forwards
    x = prompts(1, 6)
    expected, _ = greedy_reference(model, x, NEW_TOKENS)
    for m in (model, fast):
        out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(out[:, x.shape[1] :], expected)


@torch.no_grad()
def test_grouped_mm_packed_sequences(model):
    fast = fused(model)
    a, b = prompts(1, 5, seed=3), prompts(1, 7, seed=4)
    packed = torch.cat([a, b], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    ref = model(packed, position_ids=position_ids, use_cache=False).logits
    out = fast(packed, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[:, 5:], fast(b, use_cache=False).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_grouped_mm_bf16_with_fp32_router(model, tmp_path):
    model.save_pretrained(tmp_path)
    ref = YuanM32ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    fast = YuanM32ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, experts_implementation="grouped_mm")
    assert fast.model.layers[0].mlp.gate.query.weight.dtype == torch.float32  # the router stays fp32
    assert fast.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    x = prompts(2, 8)
    out_ref = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False)
    out = fast.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(out, out_ref)
    # .to() converts each expert weight on its own: the stale fused copy is dropped and rebuilt on the next call
    fast.float()
    assert fast.model.layers[0].mlp.experts.gate_up_proj is None
    fast(x)
    assert fast.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32


@torch.no_grad()
def test_grouped_mm_ieit_parity_fixture(tmp_path):
    reference = load_file(str(fixtures_dir() / "yuan_m32_tiny" / "reference.safetensors"))
    convert_ieit_hf(
        fixtures_dir() / "yuan_m32_tiny" / "ieit_hf", tmp_path / "native",
        dtype="float32", rope_theta=10000, rope_in_bfloat16=True, progress=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "native", experts_implementation="grouped_mm").eval()
    assert model.config._experts_implementation == "grouped_mm"
    out = model(reference["input_ids_short"], use_cache=False)
    torch.testing.assert_close(out.logits, reference["as_released.logits_short"], atol=1e-3, rtol=0)  # fixtures' tolerance
    prompt = reference["gen_prompt"]
    sequences = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    assert torch.equal(sequences, reference["as_released.gen_cache_sequences"])


def test_fused_weights_are_views_and_checkpoint_format_unchanged(model, tmp_path):
    fast = fused(model)
    experts = fast.model.layers[0].mlp.experts
    ffn = experts[0].gate_proj.weight.shape[0]
    assert experts[2].up_proj.weight.data_ptr() == experts.gate_up_proj[2, ffn:].data_ptr()  # no second copy
    assert not any("fused" in key for key in fast.state_dict())
    fast.save_pretrained(tmp_path)
    reloaded = YuanM32ForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config._experts_implementation == "eager"  # a runtime choice, not saved
    assert set(reloaded.state_dict()) == set(model.state_dict())


def test_grouped_mm_with_gradients_trains_the_per_expert_weights(model):
    fast = fused(model).train()
    fast(prompts(1, 5), labels=prompts(1, 5)).loss.backward()
    assert fast.model.layers[0].mlp.experts[0].gate_proj.weight.grad is not None


def test_experts_implementation_bad_input(model):
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ValueError, match='experts_implementation="fastest"` is not supported'):
        copy.deepcopy(model).set_experts_implementation("fastest")
    adapted = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["gate_proj", "up_proj", "down_proj"]))
    with pytest.raises(ValueError, match="PEFT adapter.*experts_implementation='eager'.*merge_and_unload"):
        adapted.base_model.model.set_experts_implementation("grouped_mm")


def test_grouped_mm_refuses_bitsandbytes_experts():
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from yuan_hf.testing import tiny_config

    config = tiny_config()
    quantization = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["mlp.gate", "lm_head"])
    model = YuanM32ForCausalLM(config)
    with torch.device("cpu"):
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            quantized = YuanM32ForCausalLM.from_pretrained(folder, quantization_config=quantization)
    with pytest.raises(ValueError, match="bitsandbytes-quantized.*experts_implementation='eager'"):
        quantized.set_experts_implementation("grouped_mm")


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
@torch.no_grad()
def test_compiled_static_cache_generate_equals_eager_without_recompiles(model, implementation):
    import torch._dynamo.utils as dynamo_utils

    m = fused(model) if implementation == "grouped_mm" else copy.deepcopy(model)
    x = prompts(2, 7)
    kwargs = dict(attention_mask=torch.ones_like(x), do_sample=False, cache_implementation="static")
    expected = model.generate(x, max_new_tokens=NEW_TOKENS, **kwargs)
    config = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    config._compile_all_devices = True  # transformers auto-compiles on accelerators only; CPU here
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    out = m.generate(x, max_new_tokens=NEW_TOKENS, compile_config=config, **kwargs)
    assert torch.equal(out, expected)
    # prefill runs eagerly; the NEW_TOKENS - 1 decode steps share one graph (a recompiling step would add one each)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1
    assert torch.equal(m.generate(x, max_new_tokens=NEW_TOKENS, compile_config=config, **kwargs), out)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
@torch.no_grad()
def test_torch_export_decode_step(model, implementation):
    m = fused(model) if implementation == "grouped_mm" else copy.deepcopy(model)
    x = prompts(1, 6)

    class Step(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids):
            return self.model(input_ids, position_ids=position_ids, use_cache=False).logits

    position_ids = torch.arange(x.shape[1])[None]
    program = torch.export.export(Step(m), (x, position_ids))
    torch.testing.assert_close(program.module()(x, position_ids), model(x).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_static_cache_beyond_trained_length_warns_from_host_values(model, monkeypatch):
    import yuan_hf.modeling.modeling_yuan_m32 as modeling

    warnings = []
    monkeypatch.setattr(modeling.logger, "warning", warnings.append)
    m = copy.deepcopy(model)
    cache = StaticCache(config=m.config, max_cache_len=m.config.max_position_embeddings + 8)
    m(prompts(1, 4), **{CACHE_FIELD: cache})
    assert len(warnings) == 1 and "cache holding up to 520 tokens" in warnings[0]


# --- quantized hybrid KV cache -----------------------------------------------------------------------------------


def test_quantized_cache_without_backend_names_the_package(model, monkeypatch):
    import yuan_hf.modeling.cache_yuan_m32 as cache_module

    layer, _, package, bits = cache_module.QUANTIZED_KV_BACKENDS["quanto"]
    monkeypatch.setitem(cache_module.QUANTIZED_KV_BACKENDS, "quanto", (layer, lambda: False, package, bits))
    with pytest.raises(ImportError, match="pip install optimum-quanto"):
        model.generate(
            prompts(1, 4), max_new_tokens=2, cache_implementation="quantized", cache_config={"backend": "quanto"}
        )
    with pytest.raises(ValueError, match="quantizes to"):
        YuanM32QuantizedCache(model.config, backend="hqq", nbits=5)


@pytest.mark.parametrize("backend", ["quanto", "hqq"])
@torch.no_grad()
def test_quantized_cache_generate(backend):
    pytest.importorskip({"quanto": "optimum.quanto", "hqq": "hqq"}[backend], reason=f"{backend} not installed")
    m = tiny_model(head_dim=64, num_attention_heads=2)  # one quantization group per head vector
    x = prompts(1, 12)
    # through generate's option: the cache it builds, with the LF-gate state in full precision (the prompt's K/V are
    # quantized at prefill whatever the residual window; greedy agreement is measured in benchmarks/kv_cache_quantized)
    out = m.generate(
        x, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
        cache_implementation="quantized", cache_config={"backend": backend, "nbits": 4, "residual_length": 64},
    )  # fmt: skip
    cache = getattr(out, CACHE_FIELD)
    assert isinstance(cache, YuanM32QuantizedCache)
    assert cache.layers[0].conv_states[0].dtype == torch.float32  # the LF state stays in full precision
    # quantized from the first token on (the prompt is quantized at prefill); runs, and its state has the right size
    out = m.generate(
        x, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
        **{CACHE_FIELD: YuanM32QuantizedCache(m.config, backend=backend, nbits=4, residual_length=4)},
    )  # fmt: skip
    assert getattr(out, CACHE_FIELD).get_seq_length() == x.shape[1] + NEW_TOKENS - 1
