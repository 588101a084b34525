"""Equivalence with IEIT's original remote code on the reference fixtures (fp32, CPU).

Tolerances are the fixtures README's suggestion: logits and scores atol 1e-3 (observed IEIT cache vs
no-cache noise is 3.3e-5); routing ids, argmax and greedy tokens exactly equal (the fixture inputs were
chosen with margins that make these stable at that level).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import yuan_hf  # noqa: F401  (registers yuan_m32)
from yuan_hf.conversion.ieit_hf import convert_ieit_hf

from conftest import fixtures_dir

pytestmark = pytest.mark.compat  # on every supported transformers release (scripts/test.sh)

VARIANTS = {"as_released": True, "fp32_rope": False}  # variant -> rope_in_bfloat16
ATOL = 1e-3


@pytest.fixture(scope="module")
def reference():
    return load_file(str(fixtures_dir() / "yuan_m32_tiny" / "reference.safetensors"))


@pytest.fixture(scope="module", params=[(v, s) for v in VARIANTS for s in ("ieit_hf", "ieit_hf_safetensors")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def converted(request, tmp_path_factory):
    variant, source = request.param
    dst = tmp_path_factory.mktemp("native") / f"{variant}-{source}"
    convert_ieit_hf(
        fixtures_dir() / "yuan_m32_tiny" / source, dst,
        dtype="float32", rope_theta=10000, rope_in_bfloat16=VARIANTS[variant], progress=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    return variant, model


def topk_routing(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    return ids, weights / weights.sum(-1, keepdim=True)


@torch.no_grad()
def test_short_forward_logits_hidden_and_routing(converted, reference):
    variant, model = converted
    out = model(reference["input_ids_short"], use_cache=False, output_hidden_states=True, output_router_logits=True)
    torch.testing.assert_close(out.logits, reference[f"{variant}.logits_short"], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(out.hidden_states), reference[f"{variant}.hidden_states_short"], atol=ATOL, rtol=0)
    router_logits = torch.stack(out.router_logits)  # [L, b*s, E], tokens batch-major as in the reference
    torch.testing.assert_close(router_logits, reference[f"{variant}.router_logits_short"], atol=ATOL, rtol=0)
    ids, weights = topk_routing(router_logits, model.config.num_experts_per_tok)
    assert torch.equal(ids, reference[f"{variant}.topk_ids_short"])
    torch.testing.assert_close(weights, reference[f"{variant}.topk_weights_short"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_long_forward_past_bf16_rounding_positions(converted, reference):
    variant, model = converted
    out = model.model(reference["input_ids_long"], use_cache=False)
    torch.testing.assert_close(out.last_hidden_state, reference[f"{variant}.final_hidden_long"], atol=ATOL, rtol=0)
    logits = model.lm_head(out.last_hidden_state)
    torch.testing.assert_close(logits[:, -48:], reference[f"{variant}.logits_long_tail"], atol=ATOL, rtol=0)
    assert torch.equal(logits.argmax(-1), reference[f"{variant}.logits_long_argmax"])
    torch.testing.assert_close(torch.logsumexp(logits, -1), reference[f"{variant}.logits_long_logsumexp"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "nocache"])
@torch.no_grad()
def test_greedy_generation(converted, reference, use_cache):
    variant, model = converted
    prompt = reference["gen_prompt"]
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
        use_cache=use_cache, output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    name = "cache" if use_cache else "nocache"
    assert torch.equal(out.sequences, reference[f"{variant}.gen_{name}_sequences"])
    torch.testing.assert_close(torch.cat(out.scores), reference[f"{variant}.gen_{name}_scores"], atol=ATOL, rtol=0)
