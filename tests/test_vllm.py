"""yuan_hf's vLLM plugin against yuan_hf's own `generate`: greedy tokens identical in fp32 under continuous
batching, chunked prefill and prefix caching; bf16 logprobs close; plugin registration and bad inputs.

Needs vLLM (the `vllm-cpu` build on this CPU machine, in its own venv: `scripts/test_vllm.sh`); without it the
engine tests skip with that reason (vLLM is optional) and only the version-gate tests run. One engine per
configuration for the whole module (an in-process engine starts in about 10 s here).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from yuan_hf.vllm import ALLOW_UNTESTED_ENV, SUPPORTED_VLLM_TEXT, check_vllm_version

# engine in this process, its KV cache small, nothing fetched from the Hub
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vLLM is not installed (optional; scripts/test_vllm.sh runs these tests in .venv-vllm)"
)

NEW_TOKENS = 12
BUDGET = 64  # max_num_batched_tokens: a longer prompt is prefilled in chunks of at most this many tokens
VOCAB = 512  # tiny_config's


def random_prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(6, VOCAB, (length,), generator=generator).tolist()  # ids 0..5 are special


# -- the version gate (runs without vLLM) ------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.5"])
def test_supported_vllm_versions_pass(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "not-a-version"])
def test_vllm_outside_the_pinned_range_is_refused_naming_the_range(version, monkeypatch):
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(RuntimeError, match=f"supports vllm {SUPPORTED_VLLM_TEXT}; found vllm {version}"):
        check_vllm_version(version)
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    check_vllm_version(version)  # the override only warns


# -- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from yuan_hf.testing import tiny_model

    path = tmp_path_factory.mktemp("yuan_vllm") / "tiny"
    tiny_model(seed=0).save_pretrained(path)  # std-0.2 weights: greedy outputs vary, lost state changes them
    return path


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from yuan_hf.modeling import YuanM32ForCausalLM

    return YuanM32ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_greedy(hf_model):
    """prompt -> yuan_hf's greedy continuation (one prompt at a time, with its attention mask), memoised."""
    done: dict[tuple[int, ...], list[int]] = {}

    def run(prompt: list[int]) -> list[int]:
        if tuple(prompt) not in done:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = hf_model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                )  # fmt: skip
            done[tuple(prompt)] = out[0, len(prompt) :].tolist()
        return done[tuple(prompt)]

    return run


def make_engine(model_dir: Path, **overrides):
    from vllm import LLM

    options = dict(
        model=str(model_dir), skip_tokenizer_init=True, enforce_eager=True, dtype="float32", max_model_len=512,
        max_num_seqs=8, max_num_batched_tokens=BUDGET, enable_prefix_caching=True, seed=0,
    )  # fmt: skip
    options.update(overrides)
    return LLM(**options)


@pytest.fixture(scope="module")
def engine(model_dir):
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed")
    llm = make_engine(model_dir)
    config = llm.llm_engine.vllm_config
    assert config.scheduler_config.enable_chunked_prefill and config.cache_config.enable_prefix_caching
    assert config.cache_config.mamba_cache_mode == "align"
    return llm


def vllm_greedy(llm, prompts: list[list[int]]) -> list:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


# -- fp32: identical greedy tokens ---------------------------------------------------------------------------------


@needs_vllm
def test_plugin_is_an_entry_point_and_registers_the_architecture():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    (plugin,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "yuan_m32"]
    assert plugin.value == "yuan_hf.vllm:register"
    load_general_plugins()
    assert "YuanM32ForCausalLM" in ModelRegistry.get_supported_archs()


@needs_vllm
def test_batch_of_different_lengths_equals_hf_generate(engine, hf_greedy):
    prompts = [random_prompt(n, seed=n) for n in (1, 3, 8, 21, 47)]
    assert tokens(vllm_greedy(engine, prompts)) == [hf_greedy(p) for p in prompts]


@needs_vllm
def test_chunked_prefill_carries_the_state_across_chunks(engine, hf_greedy):
    long = random_prompt(3 * BUDGET + 17, seed=100)  # prefilled in 4 steps
    assert tokens(vllm_greedy(engine, [long])) == [hf_greedy(long)]
    # continuous batching: short requests decode while the long one is still being prefilled (mixed steps)
    long2 = random_prompt(2 * BUDGET + 5, seed=101)
    prompts = [random_prompt(4, seed=102), long2, random_prompt(9, seed=103)]
    assert tokens(vllm_greedy(engine, prompts)) == [hf_greedy(p) for p in prompts]


@needs_vllm
def test_prefix_cache_hit_restores_the_state(engine, hf_greedy):
    block = engine.llm_engine.vllm_config.cache_config.block_size
    shared = random_prompt(block + 30, seed=200)  # one full cached block, then more shared tokens
    first, second = shared + random_prompt(5, seed=201), shared + random_prompt(7, seed=202)
    (out_first,) = vllm_greedy(engine, [first])
    (out_second,) = vllm_greedy(engine, [second])
    assert out_second.num_cached_tokens >= block, "the shared prefix was not served from the cache"
    assert tokens([out_first, out_second]) == [hf_greedy(first), hf_greedy(second)]
    (again,) = vllm_greedy(engine, [first])  # the whole prompt again: cache hit up to its last full block
    assert again.num_cached_tokens >= block
    assert tokens([again]) == [hf_greedy(first)]


@needs_vllm
def test_tokens_do_not_depend_on_the_batch(engine, hf_greedy):
    target = random_prompt(13, seed=300)
    others = [random_prompt(n, seed=301 + n) for n in (2, 30, 6, 90)]
    alone = tokens(vllm_greedy(engine, [target]))[0]
    first = tokens(vllm_greedy(engine, [target, *others]))[0]
    last = tokens(vllm_greedy(engine, [*others[::-1], target]))[-1]
    assert alone == first == last == hf_greedy(target)


@needs_vllm
def test_layer_adaptively_pruned_model_equals_hf_generate(tmp_path):
    """Per-layer expert counts with the router kept whole (what `yuan-hf experts prune` writes)."""
    from yuan_hf.modeling import YuanM32ForCausalLM
    from yuan_hf.testing import tiny_model

    path = tmp_path / "pruned"
    tiny_model(seed=0, num_experts=[8, 5], router_num_experts=8, router_experts=[list(range(8)), [0, 2, 3, 6, 7]]
               ).save_pretrained(path)  # fmt: skip
    hf = YuanM32ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [random_prompt(n, seed=500 + n) for n in (4, 70)]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)  # fmt: skip
        expected.append(out[0, len(prompt) :].tolist())
    assert tokens(vllm_greedy(make_engine(path), prompts)) == expected


@needs_vllm
def test_router_runs_in_fp32(engine):
    def router_dtypes(model):
        gate = model.model.layers[0].mlp.gate
        x = torch.randn(3, model.config.hidden_size)
        return gate.query.weight.dtype, gate(x).dtype

    assert engine.apply_model(router_dtypes) == [(torch.float32, torch.float32)]


# -- bf16 ----------------------------------------------------------------------------------------------------------


@needs_vllm
def test_bf16_logprobs_are_as_close_to_fp32_as_yuan_hf_in_bf16(tmp_path_factory):
    """vLLM in bf16 against yuan_hf in fp32, on vLLM's greedy tokens (teacher forcing, so a flip between near-tied
    tokens does not derail the comparison). Weights of std 0.05 here, not the std 0.2 of the other tests: those
    make the tiny model chaotic in bf16 (yuan_hf bf16 itself is then up to ~1 nat off fp32, and vLLM's different
    rounding up to ~2), which would test the model's conditioning, not the port. Measured at std 0.05: both
    about 0.006-0.024 nats. Tolerance: 0.1 nats, or twice yuan_hf bf16's own error on the same tokens."""
    from vllm import SamplingParams

    from yuan_hf.modeling import YuanM32ForCausalLM

    from yuan_hf.testing import tiny_model

    model_dir = tmp_path_factory.mktemp("yuan_vllm_bf16") / "tiny"
    tiny_model(seed=0, initializer_range=0.05).save_pretrained(model_dir)
    hf_model = YuanM32ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = make_engine(model_dir, dtype="bfloat16")

    def dtypes(model):
        return model.model.layers[0].mlp.gate.query.weight.dtype, model.model.layers[0].self_attn.q_proj.weight.dtype

    assert llm.apply_model(dtypes) == [(torch.float32, torch.bfloat16)]  # the router stays fp32 under bf16
    hf_bf16 = YuanM32ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()

    def scores(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1 : -1].float()
        return logits.log_softmax(-1).gather(-1, torch.tensor(generated)[:, None])[:, 0]

    prompts = [random_prompt(n, seed=400 + n) for n in (5, 40, 3 * BUDGET)]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    for prompt, out in zip(prompts, llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)):
        generated = list(out.outputs[0].token_ids)
        vllm_bf16 = torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, generated)])
        fp32 = scores(hf_model, prompt, generated)
        vllm_error = (vllm_bf16 - fp32).abs().max().item()
        hf_error = (scores(hf_bf16, prompt, generated) - fp32).abs().max().item()
        print(f"prompt {len(prompt)}: |vLLM bf16 - fp32| {vllm_error:.3f}, |yuan_hf bf16 - fp32| {hf_error:.3f}")
        assert vllm_error <= max(0.1, 2 * hf_error), (len(prompt), vllm_error, hf_error)


# -- bad inputs ------------------------------------------------------------------------------------------------


@needs_vllm
def test_unsupported_head_dim_on_cpu_is_refused_by_name(tmp_path):
    from yuan_hf.testing import tiny_model

    path = tmp_path / "head48"
    tiny_model(head_dim=48).save_pretrained(path)  # 48 is not a CPU attention head size
    with pytest.raises(Exception, match=r"head_dim 48 is not supported by CPU attention") as caught:
        make_engine(path)
    assert "256" in str(caught.value)


@needs_vllm
def test_folder_that_is_not_a_converted_yuan_m32_model_gets_vllms_error(tmp_path):
    import json

    # IEIT's original layout (model_type "yuan"): not ours to load; vLLM refuses it as it refuses any unknown model
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "yuan", "architectures": ["YuanForCausalLM"]}))
    with pytest.raises(Exception) as caught:
        make_engine(tmp_path)
    assert "yuan_hf" not in type(caught.value).__module__
