"""Does layer-adaptive expert pruning (LAEP) preserve quality better than uniform pruning at equal size?

Random weights cannot answer this (every expert is as good as any other), so a small Yuan model is first trained
on CPU on data with real structure: a mixture of synthetic "languages" of different frequency (each its own
vocabulary and its own sparse bigram grammar, documents start with a language tag), until its experts specialise.
Then, with router statistics from a calibration split (`collect_expert_stats`, the `yuan-hf experts stats` code),
the model is pruned through the real tool (`prune_folder`, i.e. `yuan-hf experts prune`) at 100/90/75/50% of its
experts, uniformly (`--num-experts N`: the N heaviest of every layer) and layer-adaptively at the same parameter
count (`--max-params` = the uniform model's size), and measured on a held-out split: perplexity and top-1
next-token agreement with the unpruned model. A third column drops the pruned experts' router rows instead of
keeping the router whole (what a naive prune would do) to show what the attention router's E x E mixing costs.

    PYTHONPATH=src python benchmarks/expert_pruning.py            # ~5 min on one CPU core
    PYTHONPATH=src python benchmarks/expert_pruning.py --steps 100 --experts 8   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch

from yuan_hf.experts import ExpertStats, collect_expert_stats, count_parameters, plan_pruning, prune_folder
from yuan_hf.experts.prune import open_native_folder
from yuan_hf.finetune.toy import toy_tokenizer
from yuan_hf.modeling import YuanM32Config, YuanM32ForCausalLM
from yuan_hf.testing import tiny_config

SPECIALS = 6  # toy tokenizer ids 0..5
WORDS_PER_LANGUAGE = 56


class Languages:
    """K languages: language i is drawn with probability ~ 1/(i+1); its documents are its tag followed by a walk on
    its own sparse bigram graph (every word has 4 successors with probabilities .55/.25/.15/.05)."""

    def __init__(self, num_languages: int, seed: int = 0):
        rng = random.Random(seed)
        self.k = num_languages
        self.weights = [1 / (i + 1) for i in range(num_languages)]
        self.tag = [SPECIALS + i for i in range(num_languages)]
        first = SPECIALS + num_languages
        self.words = [list(range(first + i * WORDS_PER_LANGUAGE, first + (i + 1) * WORDS_PER_LANGUAGE))
                      for i in range(num_languages)]  # fmt: skip
        self.next = [{w: rng.sample(words, 4) for w in words} for words in self.words]
        self.vocab_size = first + num_languages * WORDS_PER_LANGUAGE

    def document(self, rng: random.Random, length: int) -> list[int]:
        lang = rng.choices(range(self.k), weights=self.weights)[0]
        word = rng.choice(self.words[lang])
        ids = [self.tag[lang], word]
        while len(ids) < length:
            word = rng.choices(self.next[lang][word], weights=(0.55, 0.25, 0.15, 0.05))[0]
            ids.append(word)
        return ids

    def batch(self, rng: random.Random, size: int, length: int) -> torch.Tensor:
        return torch.tensor([self.document(rng, length) for _ in range(size)])


def train(config: YuanM32Config, data: Languages, *, steps: int, batch: int, length: int, lr: float, seed: int):
    torch.manual_seed(seed)
    model = YuanM32ForCausalLM(config).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed + 1)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        ids = data.batch(rng, batch, length)
        out = model(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(steps // 10, 1) == 0:
            print(f"  step {step:>5}  loss {out.loss.item():.3f}  aux {out.aux_loss.item():.3f}  "
                  f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    return model.eval()


@torch.no_grad()
def evaluate(model, reference_argmax: torch.Tensor | None, held_out: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """Held-out perplexity (every next-token prediction) and top-1 agreement with the reference model."""
    nll, count, argmaxes = 0.0, 0, []
    for rows in held_out.split(32):
        logits = model(rows, use_cache=False).logits[:, :-1].float()
        targets = rows[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 reduction="sum").item()  # fmt: skip
        count += targets.numel()
        argmaxes.append(logits.argmax(-1))
    argmax = torch.cat(argmaxes)
    agreement = 1.0 if reference_argmax is None else (argmax == reference_argmax).float().mean().item()
    return math.exp(nll / count), agreement, argmax


def drop_router_rows(folder: Path) -> YuanM32ForCausalLM:
    """The pruned folder's model with the removed experts' router rows dropped (a naive prune) instead of the
    router kept whole: the E x E attention then mixes only the kept experts' values."""
    model = YuanM32ForCausalLM.from_pretrained(folder).float().eval()
    values = model.config.to_dict()
    values.update(router_num_experts=None, router_experts=None)
    naive = YuanM32ForCausalLM(YuanM32Config.from_dict(values)).float().eval()
    state = model.state_dict()
    for layer, ids in enumerate(model.config.router_experts or [None] * model.config.num_hidden_layers):
        if ids is None:
            continue
        for part in ("query", "key", "value"):
            key = f"model.layers.{layer}.mlp.gate.{part}.weight"
            state[key] = state[key][ids]
    naive.load_state_dict(state)
    return naive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=20, help="experts per layer of the trained model")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--languages", type=int, default=10)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--aux", type=float, default=0.01, help="load-balancing loss coefficient while training")
    parser.add_argument("--keep", default="1.0,0.9,0.75,0.5", help="keep levels (share of experts per layer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="keep the folders here (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # 1: on a shared 2-core box more threads were 20x slower (contention)

    data = Languages(args.languages, seed=args.seed)
    config = tiny_config(
        vocab_size=max(512, data.vocab_size), hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, head_dim=args.hidden // 2, moe_intermediate_size=128, num_experts=args.experts, router_aux_loss_coef=args.aux,
        loss_chunk_size=0,
    )  # fmt: skip
    print(f"training {count_parameters(config):,} parameters, {args.layers} layers x {args.experts} experts top-2, "
          f"{args.languages} languages, {args.steps} steps of {args.batch} x {args.length} tokens")  # fmt: skip
    model = train(config, data, steps=args.steps, batch=args.batch, length=args.length, lr=args.lr, seed=args.seed)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="expert-pruning-"))
    source = work / "trained"
    model.save_pretrained(source)
    tokenizer = toy_tokenizer(vocab_size=config.vocab_size)
    tokenizer.save_pretrained(source)
    calibration = work / "calibration.txt"  # word text, so the stats go through the real data path
    rng = random.Random(args.seed + 2)
    calibration.write_text("\n".join(" ".join(f"w{i}" for i in data.document(rng, args.length)) for _ in range(300)))
    stats = collect_expert_stats(model, tokenizer, calibration, batch_size=16, max_length=args.length, progress=False)
    stats.save(work / "stats.json")
    for layer in stats.layers:
        print(f"  layer {layer['layer']}: load entropy {layer['load_entropy_bits']:.2f} of "
              f"{math.log2(layer['num_experts']):.2f} bits, lightest expert mass {min(layer['routing_mass']):.4f}")  # fmt: skip

    held_out = data.batch(random.Random(args.seed + 3), 256, args.length)
    base_ppl, _, reference = evaluate(model, None, held_out)
    print(f"unpruned: held-out perplexity {base_ppl:.3f}")
    native_config = open_native_folder(source)[1]
    rows = []
    for keep in (float(k) for k in args.keep.split(",")):
        n = max(round(keep * args.experts), 2)
        row = {"keep": keep, "experts_per_layer": n}
        uniform_dir = work / f"uniform-{n}"
        if n < args.experts:
            prune_folder(source, uniform_dir, stats=stats, num_experts=n, overwrite=True, progress=False)
            budget = count_parameters(open_native_folder(uniform_dir)[1])
            adaptive_dir = work / f"adaptive-{n}"
            prune_folder(source, adaptive_dir, stats=stats, max_params=budget, overwrite=True, progress=False)
            adaptive_config = open_native_folder(adaptive_dir)[1]
            plan = plan_pruning(stats, native_config, max_params=budget)
            uniform = YuanM32ForCausalLM.from_pretrained(uniform_dir).float().eval()
            adaptive = YuanM32ForCausalLM.from_pretrained(adaptive_dir).float().eval()
            row["params"] = budget
            row["params_adaptive"] = count_parameters(adaptive_config)
            row["adaptive_counts"] = adaptive_config.experts_per_layer
            row["uniform_mass"] = plan_pruning(stats, native_config, num_experts=n).retained_mass(stats)
            row["adaptive_mass"] = plan.retained_mass(stats)
            for name, candidate in (("uniform", uniform), ("adaptive", adaptive),
                                    ("adaptive_router_rows_dropped", drop_router_rows(adaptive_dir))):  # fmt: skip
                ppl, agree, _ = evaluate(candidate, reference, held_out)
                row[name] = {"ppl": ppl, "agreement": agree}
        else:
            row["params"] = row["params_adaptive"] = count_parameters(config)
            row["adaptive_counts"] = config.experts_per_layer
            for name in ("uniform", "adaptive", "adaptive_router_rows_dropped"):
                row[name] = {"ppl": base_ppl, "agreement": 1.0}
        rows.append(row)
        print(f"keep {keep:.0%} ({n}/{args.experts} per layer, {row['params']:,} params): "
              f"uniform ppl {row['uniform']['ppl']:.3f} agree {row['uniform']['agreement']:.3f} | "
              f"adaptive {row['adaptive_counts']} ppl {row['adaptive']['ppl']:.3f} agree "
              f"{row['adaptive']['agreement']:.3f} | rows dropped ppl {row['adaptive_router_rows_dropped']['ppl']:.3f} "
              f"agree {row['adaptive_router_rows_dropped']['agreement']:.3f}", flush=True)  # fmt: skip

    print("\n| keep | params | uniform: ppl / agreement | layer-adaptive: experts per layer | ppl / agreement | "
          "adaptive, router rows dropped: ppl / agreement |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for row in rows:
        u, a, d = row["uniform"], row["adaptive"], row["adaptive_router_rows_dropped"]
        print(f"| {row['keep']:.0%} ({row['experts_per_layer']}/{args.experts}) | {row['params'] / 1e6:.2f}M | "
              f"{u['ppl']:.3f} / {u['agreement']:.1%} | {' '.join(map(str, row['adaptive_counts']))} | "
              f"{a['ppl']:.3f} / {a['agreement']:.1%} | {d['ppl']:.3f} / {d['agreement']:.1%} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "base_ppl": base_ppl, "rows": rows,
                                               "stats": ExpertStats.load(work / "stats.json").to_dict()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
