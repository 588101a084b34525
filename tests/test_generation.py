"""Every generation path against the ground truth: greedy decoding by full uncached forwards.

Run for the package's classes and for the remote-code copy a saved folder carries (what users without the package
load), on the installed transformers. A cache that is silently dropped or rebuilt (as transformers 5.24's
`past_key_values` -> `cache` rename caused) changes these tokens, because the tiny model's greedy output varies
(`tiny_model` weights; asserted below so the comparison cannot pass vacuously).
"""

import pytest
import torch
from transformers import DynamicCache, StaticCache
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from yuan_hf.modeling.transformers_compat import CACHE_FIELD
from yuan_hf.testing import greedy_reference, tiny_config, tiny_model

# cached vs uncached logits differ only by fp32 reorderings of the same sums; a lost or stale state moves them by
# 1e-1 and more, and flips greedy tokens
ATOL = 1e-4
NEW_TOKENS = 12
pytestmark = pytest.mark.compat


@pytest.fixture(scope="module", params=["package", "remote-code"])
def model(request, tmp_path_factory):
    model = tiny_model()
    if request.param == "remote-code":
        folder = tmp_path_factory.mktemp("saved") / "tiny-yuan"
        model.save_pretrained(folder)
        # in this process yuan_hf's registered classes win over auto_map; load the folder's own copy of the code
        remote_class = get_class_from_dynamic_module(model.config.auto_map["AutoModelForCausalLM"], str(folder))
        model = remote_class.from_pretrained(folder, dtype=torch.float32).eval()
        assert "transformers_modules" in type(model).__module__, type(model).__module__
    return model


def prompt(batch: int = 1, length: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, 500, (batch, length), generator=g)


def check_against_reference(model, x, sequences, scores=None):
    expected, logits = greedy_reference(model, x, NEW_TOKENS)
    assert len(set(expected[0].tolist())) >= NEW_TOKENS // 2, "the reference collapsed: the test model is too weak"
    assert torch.equal(sequences[:, x.shape[1] :], expected)
    if scores is not None:
        torch.testing.assert_close(torch.stack(scores), logits, atol=ATOL, rtol=0)


def greedy(model, x, **kwargs):
    return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


@torch.no_grad()
def test_cached_greedy_equals_uncached_forwards(model):
    x = prompt(2)
    out = greedy(model, x, output_scores=True, return_dict_in_generate=True)
    check_against_reference(model, x, out.sequences, out.scores)


@torch.no_grad()
def test_passed_dynamic_cache_equals_uncached_forwards(model):
    x = prompt(2, seed=2)
    out = greedy(model, x, output_scores=True, return_dict_in_generate=True, **{CACHE_FIELD: DynamicCache(config=model.config)})
    check_against_reference(model, x, out.sequences, out.scores)


@torch.no_grad()
def test_static_cache_equals_uncached_forwards(model):
    x = prompt(2, seed=3)
    out = greedy(model, x, cache_implementation="static", output_scores=True, return_dict_in_generate=True)
    check_against_reference(model, x, out.sequences, out.scores)


@torch.no_grad()
def test_static_cache_object_in_forward_equals_full_forward(model):
    x = prompt(1, 9, seed=4)
    full = model(x, use_cache=False).logits
    cache = StaticCache(config=model.config, max_cache_len=32)
    steps = [model(x[:, :6], **{CACHE_FIELD: cache}, use_cache=True).logits]
    steps += [model(x[:, t : t + 1], **{CACHE_FIELD: cache}, use_cache=True).logits for t in range(6, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_generate_continues_from_returned_cache(model):
    x = prompt(1, seed=5)
    first = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False,
                           return_dict_in_generate=True)  # fmt: skip
    returned = getattr(first, CACHE_FIELD)
    assert returned is not None and returned.get_seq_length() == x.shape[1] + 3
    seq = first.sequences
    second = model.generate(seq, attention_mask=torch.ones_like(seq), max_new_tokens=NEW_TOKENS - 4,
                            do_sample=False, **{CACHE_FIELD: returned})  # fmt: skip
    check_against_reference(model, x, second)


@torch.no_grad()
def test_assisted_decoding_equals_uncached_forwards(model):
    x = prompt(1, seed=6)
    assistant = tiny_model(seed=1, num_hidden_layers=1)
    check_against_reference(model, x, greedy(model, x, assistant_model=assistant))


@torch.no_grad()
def test_beam_search_with_cache_equals_without(model):
    # beam search without a cache runs a full forward per step: the ground truth for beams
    x = prompt(2, seed=7)
    kwargs = dict(num_beams=3, output_scores=True, return_dict_in_generate=True)
    cached, uncached = greedy(model, x, use_cache=True, **kwargs), greedy(model, x, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=ATOL, rtol=0)
    assert len(set(uncached.sequences[0, x.shape[1] :].tolist())) > 2, "beam output collapsed: test model too weak"


@torch.no_grad()
def test_left_padded_batch_equals_rows_alone(model):
    rows = [prompt(1, n, seed=10 + n)[0] for n in (9, 4, 1)]
    width = max(len(r) for r in rows)
    batch = torch.full((len(rows), width), model.config.pad_token_id)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        batch[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    for kwargs in ({}, {"cache_implementation": "static"}):
        out = model.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
        for i, r in enumerate(rows):
            expected, _ = greedy_reference(model, r[None], NEW_TOKENS)
            assert torch.equal(out[i, width:], expected[0]), f"row {i} differs ({kwargs or 'dynamic cache'})"


@torch.no_grad()
def test_forward_takes_the_cache_under_both_names(model):
    x = prompt(1, 8, seed=8)
    full = model(x, use_cache=False).logits
    for name in ("cache", "past_key_values"):
        cache = DynamicCache(config=model.config)
        first = model(x[:, :5], use_cache=True, **{name: cache})
        assert getattr(first, CACHE_FIELD) is cache and first.past_key_values is cache
        rest = model(x[:, 5:], use_cache=True, **{name: cache}).logits
        torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="both `cache` and `past_key_values`"):
        model(x, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


@torch.no_grad()
def test_unknown_arguments_are_refused_not_dropped(model):
    x = prompt(1, 4)
    for name in ("past_key_value", "cache_params", "token_type_ids", "cache_positon"):
        with pytest.raises(TypeError, match=name):
            model(x, **{name: torch.zeros_like(x)})
        with pytest.raises(TypeError, match=name):
            model.model(x, **{name: torch.zeros_like(x)})


@torch.no_grad()
def test_caches_that_do_not_fit_are_refused_by_name(model):
    x = prompt(2, 4)
    with pytest.raises(ValueError, match="1 layers.*needs 2 hybrid layers"):
        model(x, cache=DynamicCache(config=tiny_config(num_hidden_layers=1)))
    with pytest.raises(ValueError, match="0 layers"):
        model(x, cache=DynamicCache())
    with pytest.raises(TypeError, match="legacy tuples"):
        model(x, cache=((torch.zeros(1),) * 3,) * 2)
    other = tiny_model(num_attention_heads=2, head_dim=64)
    filled = other(x, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="2 heads x 64 dims.*4 key/value heads x 32 dims"):
        model(x, cache=filled)
    with pytest.raises(ValueError, match="2 sequences but the input has 1 rows"):
        model(x[:1], cache=model(x, use_cache=True).past_key_values)
