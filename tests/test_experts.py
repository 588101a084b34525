"""Expert tools (issue 11): per-layer expert counts, router statistics, LAEP pruning, expert placement."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from yuan_hf import YuanM32ForCausalLM
from yuan_hf.cli import main as cli
from yuan_hf.experts import (
    ExpertsError,
    ExpertStats,
    LayerCounter,
    balanced_placement,
    collect_expert_stats,
    contiguous_placement,
    imbalance,
    plan_placement,
    plan_pruning,
    prune_folder,
)
from yuan_hf.experts.plots import MISSING_MATPLOTLIB, write_plots
from yuan_hf.finetune.toy import toy_tokenizer, write_jsonl
from yuan_hf.hub import check_hub_folder
from yuan_hf.parameters import count_config_parameters
from yuan_hf.testing import tiny_config, tiny_model

from test_hub import logits_without_package

# ------------------------------------------------------------------------------------------------- config / model


def test_config_takes_one_expert_count_per_layer_and_names_the_bad_layer():
    config = tiny_config(num_hidden_layers=3, num_experts=[8, 4, 2])
    assert config.experts_per_layer == [8, 4, 2]
    assert tiny_config(num_experts=6).experts_per_layer == [6, 6]
    with pytest.raises(ValueError, match=r"num_experts has 2 per-layer counts but num_hidden_layers is 3"):
        tiny_config(num_hidden_layers=3, num_experts=[8, 4])
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(2\) cannot exceed num_experts\[1\] \(layer 1\) \(1\)"):
        tiny_config(num_experts=[8, 1])
    with pytest.raises(ValueError, match=r"num_experts\[0\] \(layer 0\) must be a positive integer, got 0"):
        tiny_config(num_experts=[0, 8])
    with pytest.raises(ValueError, match=r"router_experts\[1\] \(layer 1\) must list 2 distinct"):
        tiny_config(num_experts=[3, 2], router_num_experts=8, router_experts=[[0, 1, 2], [5, 5]])
    with pytest.raises(ValueError, match="go together"):
        tiny_config(num_experts=[3, 2], router_num_experts=8)


def test_model_builds_per_layer_sizes_and_round_trips(tmp_path):
    model = tiny_model(num_experts=[8, 3], router_num_experts=8, router_experts=[list(range(8)), [6, 0, 3]])
    assert [len(layer.mlp.experts) for layer in model.model.layers] == [8, 3]
    assert model.model.layers[1].mlp.gate.query.weight.shape == (8, 64)  # the router stays whole
    ids = torch.randint(6, 500, (2, 9))
    out = model(ids, output_router_logits=True)
    assert [tuple(r.shape) for r in out.router_logits] == [(18, 8), (18, 3)]
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert reloaded.config.num_experts == [8, 3]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, out.logits)


def test_aux_loss_is_mixtrals_with_one_count_and_per_count_groups_otherwise():
    ids, mask = torch.randint(6, 500, (2, 7)), torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    uniform = tiny_model(num_hidden_layers=3)
    out = uniform(ids, attention_mask=mask, output_router_logits=True)
    assert torch.equal(out.aux_loss, load_balancing_loss_func(out.router_logits, 8, 2, mask))
    mixed = tiny_model(num_hidden_layers=3, num_experts=[8, 4, 8])
    out = mixed(ids, attention_mask=mask, output_router_logits=True)
    r = out.router_logits
    expected = 2 / 3 * load_balancing_loss_func((r[0], r[2]), 8, 2, mask)
    expected = expected + 1 / 3 * load_balancing_loss_func((r[1],), 4, 2, mask)
    torch.testing.assert_close(out.aux_loss, expected)


# ------------------------------------------------------------------------------------------------- statistics


def test_layer_counter_on_a_hand_checked_case():
    counter = LayerCounter(num_experts=4, top_k=2)
    logits = torch.log(torch.tensor([
        [0.5, 0.3, 0.1, 0.1],  # top-2 {0, 1}, weights .625 / .375
        [0.1, 0.6, 0.2, 0.1],  # {1, 2}, .75 / .25
        [0.4, 0.1, 0.1, 0.4],  # {0, 3}, .5 / .5 (tie broken by topk; both chosen anyway)
        [0.9, 0.05, 0.03, 0.02],  # padding: not counted
    ]))  # fmt: skip
    counter.update(logits, torch.tensor([True, True, True, False]))
    s = counter.summary(layer=0)
    assert s["tokens"] == 3 and s["selections"] == [2, 2, 1, 1]
    assert s["token_share"] == pytest.approx([2 / 6, 2 / 6, 1 / 6, 1 / 6])
    assert s["routing_mass"] == pytest.approx([(0.625 + 0.5) / 3, (0.375 + 0.75) / 3, 0.25 / 3, 0.5 / 3])
    # removing expert e changes the top-k of exactly the tokens routed to it
    assert s["removal_impact"] == pytest.approx([2 / 3, 2 / 3, 1 / 3, 1 / 3])
    co = torch.tensor(s["co_selection"]) * 3
    assert co.tolist() == [[2, 1, 0, 1], [1, 2, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]]
    assert s["load_entropy_bits"] == pytest.approx(-2 * (1 / 3) * math.log2(1 / 3) - 2 * (1 / 6) * math.log2(1 / 6))


def toy_setup(tmp_path, *, documents: int = 12, seed: int = 0, **overrides):
    folder = tmp_path / "model"
    model = tiny_model(**overrides)
    model.save_pretrained(folder)
    toy_tokenizer().save_pretrained(folder)
    rng = random.Random(seed)
    texts = [" ".join(f"w{rng.randint(6, 300)}" for _ in range(rng.randint(2, 20))) for _ in range(documents)]
    data = write_jsonl([{"text": t} for t in texts], tmp_path / "data.jsonl")
    return model, folder, data, sum(len(t.split()) for t in texts)


def test_stats_count_real_tokens_only_and_shares_sum_to_one(tmp_path):
    model, _, data, tokens = toy_setup(tmp_path)
    tok = toy_tokenizer()
    padded = collect_expert_stats(model, tok, data, batch_size=4, progress=False)
    alone = collect_expert_stats(model, tok, data, batch_size=1, progress=False)  # no padding at all
    assert padded.data["tokens"] == tokens and padded.data["documents"] == 12
    for a, b in zip(padded.layers, alone.layers):
        assert a["tokens"] == tokens and a["selections"] == b["selections"]  # padding changed nothing
        assert sum(a["token_share"]) == pytest.approx(1) and sum(a["routing_mass"]) == pytest.approx(1)
        assert sum(a["selections"]) == 2 * tokens
        torch.testing.assert_close(torch.tensor(a["routing_mass"]), torch.tensor(b["routing_mass"]))
    capped = collect_expert_stats(model, tok, data, batch_size=4, max_tokens=25, progress=False)
    assert capped.data["tokens"] == 25 and all(layer["tokens"] == 25 for layer in capped.layers)


def test_stats_cli_writes_json_and_says_why_there_are_no_pictures(tmp_path, capsys):
    _, folder, data, tokens = toy_setup(tmp_path)
    assert cli(["experts", "stats", str(folder), str(data), "--out", str(tmp_path / "st"), "--batch-size", "3"]) == 0
    stats = ExpertStats.load(tmp_path / "st" / "stats.json")
    assert stats.data["tokens"] == tokens and stats.num_experts == [8, 8]
    out = capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert MISSING_MATPLOTLIB in out
    else:
        assert (tmp_path / "st" / "load_heatmap.png").stat().st_size > 0
        assert (tmp_path / "st" / "co_selection.png").stat().st_size > 0


def test_plots_are_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional [experts] extra")
    model, _, data, _ = toy_setup(tmp_path, num_experts=[8, 4], router_num_experts=8,
                                  router_experts=[list(range(8)), [0, 1, 2, 3]])  # fmt: skip
    stats = collect_expert_stats(model, toy_tokenizer(), data, progress=False)
    write_plots(stats, tmp_path / "pics")
    assert {p.name for p in (tmp_path / "pics").iterdir()} == {"load_heatmap.png", "co_selection.png"}


def test_stats_bad_data(tmp_path):
    model, tok = tiny_model(), toy_tokenizer()
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ExpertsError, match="empty"):
        collect_expert_stats(model, tok, tmp_path / "empty.jsonl", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "w7 w8"}\n{"txt": 3}\n')
    with pytest.raises(ExpertsError, match=r"bad.jsonl, line 2: .*missing key"):
        collect_expert_stats(model, tok, tmp_path / "bad.jsonl", progress=False)
    with pytest.raises(ExpertsError, match="not found"):
        collect_expert_stats(model, tok, tmp_path / "missing.jsonl", progress=False)
    (tmp_path / "latin1.txt").write_bytes("w7 caf\xe9\n".encode("latin-1"))
    with pytest.raises(ExpertsError, match="latin1.txt is not UTF-8 text"):
        collect_expert_stats(model, tok, tmp_path / "latin1.txt", progress=False)
    (tmp_path / "plain.txt").write_text("w7 w8 w9\n\nw10\n")
    assert collect_expert_stats(model, tok, tmp_path / "plain.txt", progress=False).data["tokens"] == 4


def test_stats_file_with_missing_fields_is_refused(tmp_path):
    model, tok = tiny_model(), toy_tokenizer()
    (tmp_path / "plain.txt").write_text("w7 w8 w9\n")
    collect_expert_stats(model, tok, tmp_path / "plain.txt", progress=False).save(tmp_path / "stats.json")
    raw = json.loads((tmp_path / "stats.json").read_text())
    for broken, message in (({k: v for k, v in raw.items() if k != "layers"}, r"lacks \['layers'\]"),
                            ({**raw, "layers": [{"layer": 0}]}, "entry of layer 0 is inconsistent")):  # fmt: skip
        (tmp_path / "broken.json").write_text(json.dumps(broken))
        with pytest.raises(ExpertsError, match=message):
            ExpertStats.load(tmp_path / "broken.json")


# ------------------------------------------------------------------------------------------------- pruning


def test_pruning_never_chosen_experts_keeps_the_outputs(tmp_path):
    """16 experts and 6 tokens: at most 12 are chosen per layer, so keep_mass 1.0 removes the never-chosen ones.

    Equality that holds: the pruned router still computes every original logit (the attention router mixes all
    experts' values, so it is kept whole) and routes top-k among the kept ones; for tokens whose top-k held no
    removed expert that is the same experts with the same renormalised weights. Not bit for bit: the weights come
    from a softmax over fewer logits before the renormalisation (rounding, ~1e-7)."""
    model, folder, _, _ = toy_setup(tmp_path, num_experts=16)
    text = "w11 w57 w230 w12 w99 w140"
    (tmp_path / "six.txt").write_text(text + "\n")
    stats = collect_expert_stats(model, toy_tokenizer(), tmp_path / "six.txt", progress=False)
    summary = prune_folder(folder, tmp_path / "pruned", stats=stats, keep_mass=1.0, progress=False)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    counts = pruned.config.experts_per_layer
    assert all(c <= 12 for c in counts) and summary.experts_after == counts
    ids = torch.tensor([toy_tokenizer()(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        before, after = model(ids, output_router_logits=True), pruned(ids, output_router_logits=True)
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-5, atol=1e-5)
    for layer, (b, a) in enumerate(zip(before.router_logits, after.router_logits)):
        kept = pruned.config.router_experts[layer]
        assert sorted(kept) == kept and len(kept) == counts[layer]
        torch.testing.assert_close(a, b[:, kept], rtol=1e-5, atol=1e-5)  # the kept experts' logits, whole router
        chosen_before = b.topk(2).indices.sort().values
        assert torch.equal(torch.tensor(kept)[a.topk(2).indices].sort().values, chosen_before)  # same experts
    assert torch.equal(after.router_logits[0], before.router_logits[0][:, pruned.config.router_experts[0]])
    # ... and the same holds when loading the folder without the package (remote code)
    remote = logits_without_package(tmp_path / "pruned", ids, tmp_path)
    torch.testing.assert_close(remote, after.logits, rtol=0, atol=0)
    provenance = json.loads((tmp_path / "pruned" / "conversion.json").read_text())
    assert provenance["operation"] == "prune" and provenance["kept_experts"] == pruned.config.router_experts
    assert (tmp_path / "pruned" / "tokenizer.json").is_file()
    check_hub_folder(tmp_path / "pruned")  # what `yuan-hf push` checks: weights are those config.json describes


def test_prune_plans(tmp_path):
    config = tiny_config(num_hidden_layers=2)
    stats = ExpertStats(model={"name": "x", "num_experts_per_tok": 2}, data={}, layers=[
        {"layer": 0, "num_experts": 8, "routing_mass": [0.5, 0.3, 0.1, 0.05, 0.03, 0.02, 0.0, 0.0]},
        {"layer": 1, "num_experts": 8, "routing_mass": [0.125] * 8},
    ])  # fmt: skip
    plan = plan_pruning(stats, config, keep_mass=0.9)
    assert plan.kept == [[0, 1, 2], list(range(8))]  # concentrated layer 0 loses 5, balanced layer 1 none
    assert plan_pruning(stats, config, keep_mass=0.1).kept == [[0, 1], [0, 1]]  # never fewer than top-2
    assert plan_pruning(stats, config, num_experts=4).kept == [[0, 1, 2, 3], [0, 1, 2, 3]]
    per_expert = 3 * 64 * 128
    budget = count_config_parameters(config).total - 8 * per_expert  # room for 8 experts fewer
    adaptive = plan_pruning(stats, config, max_params=budget)
    assert sum(map(len, adaptive.kept)) == 8 and len(adaptive.kept[0]) < len(adaptive.kept[1])
    assert sum(adaptive.retained_mass(stats)) > sum(plan_pruning(stats, config, num_experts=4).retained_mass(stats))


def test_prune_bad_inputs(tmp_path):
    model, folder, data, _ = toy_setup(tmp_path)
    stats = collect_expert_stats(model, toy_tokenizer(), data, progress=False)
    stats.save(tmp_path / "stats.json")
    with pytest.raises(ExpertsError, match=r"fewer than top-2 experts"):
        prune_folder(folder, tmp_path / "out", stats=stats, num_experts=1)
    with pytest.raises(ExpertsError, match=r"layer 0 would need fewer than top-2"):
        prune_folder(folder, tmp_path / "out", stats=stats, max_params=1000)
    with pytest.raises(ExpertsError, match=r"keep_mass must be in \(0, 1\]"):
        prune_folder(folder, tmp_path / "out", stats=stats, keep_mass=1.5)
    # statistics of another model: both shapes named
    other = tmp_path / "other"
    tiny_model(num_hidden_layers=3, num_experts=4).save_pretrained(other)
    with pytest.raises(ExpertsError, match=r"2 layers with 8 experts .* but .*other has 3 layers with 4 experts"):
        prune_folder(other, tmp_path / "out", stats=tmp_path / "stats.json", keep_mass=0.9)
    # destination rules of the converters
    with pytest.raises(Exception, match="destroy the source"):
        prune_folder(folder, folder / "inside", stats=stats, keep_mass=0.9)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    with pytest.raises(Exception, match="not empty"):
        prune_folder(folder, tmp_path / "full", stats=stats, keep_mass=0.9)
    with pytest.raises(Exception, match="only replaces a previous output"):
        prune_folder(folder, tmp_path / "full", stats=stats, keep_mass=0.9, overwrite=True)
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me"
    assert (folder / "model.safetensors").is_file()  # the source is untouched
    # the CLI: one error line, exit 2
    assert cli(["experts", "prune", str(folder), str(tmp_path / "o"), "--stats", str(tmp_path / "stats.json"),
                "--num-experts", "1"]) == 2  # fmt: skip
    prune_folder(folder, tmp_path / "ok", stats=stats, keep_mass=0.9, progress=False)
    prune_folder(folder, tmp_path / "ok", stats=stats, keep_mass=0.8, overwrite=True, progress=False)  # own output


def test_pruned_model_fine_tunes_with_lora(tmp_path):
    from yuan_hf.finetune.lora import apply_lora, lora_config

    model, folder, data, _ = toy_setup(tmp_path)
    stats = collect_expert_stats(model, toy_tokenizer(), data, progress=False)
    prune_folder(folder, tmp_path / "pruned", stats=stats, max_params=count_config_parameters(model.config).total * 0.8,
                 progress=False)  # fmt: skip
    pruned = YuanM32ForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32)
    assert sum(pruned.config.experts_per_layer) < 16  # fewer experts than the 2 x 8 it started with
    peft_model = apply_lora(pruned, lora_config("all", r=4, dropout=0.0)).train()
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(6, 500, (2, 12))
    first = peft_model(input_ids=ids, labels=ids).loss
    first.backward()
    optimizer.step()
    assert peft_model(input_ids=ids, labels=ids).loss < first
    lora_experts = {n.split(".mlp.experts.")[1].split(".")[0] for n, _ in peft_model.named_parameters()
                    if "lora_A" in n and ".mlp.experts." in n and ".layers.1." in n}  # fmt: skip
    assert len(lora_experts) == pruned.config.experts_per_layer[1]


# ------------------------------------------------------------------------------------------------- placement


def test_balanced_placement_is_within_the_bound_and_beats_contiguous():
    rng = random.Random(0)
    for trial in range(30):
        loads = [rng.paretovariate(1.2) for _ in range(32)]
        for devices in (2, 4, 8, 5):
            groups = balanced_placement(loads, devices)
            assert sorted(e for g in groups for e in g) == list(range(32))
            assert max(map(len, groups)) - min(map(len, groups)) <= 1
            totals = [sum(loads[e] for e in g) for g in groups]
            assert max(totals) <= sum(loads) / devices + max(loads) + 1e-9
            assert imbalance(loads, groups) <= imbalance(loads, contiguous_placement(32, devices)) + 1e-9
    skewed = [8.0, 7.0, 6.0, 5.0, 1.0, 1.0, 1.0, 1.0]  # contiguous: 26 vs 4
    assert imbalance(skewed, contiguous_placement(8, 2)) == pytest.approx(26 / 15)
    assert imbalance(skewed, balanced_placement(skewed, 2)) == pytest.approx(1.0)


def test_place_cli_writes_a_plan_and_a_reordered_model_with_the_same_outputs(tmp_path, capsys):
    model, folder, data, _ = toy_setup(tmp_path)
    stats = collect_expert_stats(model, toy_tokenizer(), data, progress=False)
    stats.save(tmp_path / "stats.json")
    assert cli(["experts", "place", str(tmp_path / "stats.json"), "--devices", "4", "--out",
                str(tmp_path / "plan.json"), "--reorder", str(folder), str(tmp_path / "placed")]) == 0  # fmt: skip
    plan = json.loads((tmp_path / "plan.json").read_text())
    for entry in plan["layers"]:
        assert entry["imbalance_balanced"] <= entry["imbalance_contiguous"] + 1e-9
        assert entry["imbalance_balanced"] <= entry["bound"] + 1e-9
    placed = AutoModelForCausalLM.from_pretrained(tmp_path / "placed", dtype=torch.float32).eval()
    assert placed.config.router_experts == [e["expert_order"] for e in plan["layers"]]
    ids = torch.randint(6, 500, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(placed(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ExpertsError, match="9 devices but layer 0 has only 8 experts"):
        plan_placement(stats, 9)
