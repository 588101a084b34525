"""Router statistics: which experts a dataset uses, layer by layer.

A dataset is streamed through the model in padded batches; the router logits of every layer (the model returns
them with `output_router_logits=True`) are turned into the routing the model applies (softmax -> top-k ->
renormalise) and counted for the real tokens only (padding is masked out). Per layer:

- `token_share[e]`: share of the token-expert assignments that go to expert e (sums to 1);
- `routing_mass[e]`: share of the routed weight (the renormalised top-k weights) expert e receives (sums to 1);
  LAEP's pruning criterion ranks experts by it;
- `removal_impact[e]`: share of tokens whose top-k would change if expert e were removed, i.e. tokens that have
  e among their top-k (with `norm_topk_prob`, the other tokens keep their experts *and* weights exactly);
- `co_selection[e][f]`: share of tokens routed to both e and f (diagonal: `removal_impact`);
- `load_entropy_bits` (of `token_share`; `log2 E` is perfectly balanced) and `router_entropy_bits` (mean entropy
  of a token's full routing distribution).

Memory is bounded by one batch: the data file is read line by line and only [E] / [E, E] counters are kept.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..modeling.modeling_yuan_m32 import top_k_routing

STATS_FORMAT = "yuan-hf expert stats"
STATS_VERSION = 1


class ExpertsError(ValueError):
    """A problem with the model, the data or the statistics that the user must fix."""


# ------------------------------------------------------------------------------------------------- counting


class LayerCounter:
    """Accumulates one layer's routing over batches (counters on the CPU, float64 / int64)."""

    def __init__(self, num_experts: int, top_k: int, norm_topk_prob: bool = True):
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.tokens = 0
        self.selections = torch.zeros(num_experts, dtype=torch.int64)  # tokens with e in their top-k
        self.mass = torch.zeros(num_experts, dtype=torch.float64)  # sum of the routing weights given to e
        self.co_selection = torch.zeros(num_experts, num_experts, dtype=torch.int64)  # tokens routed to e and f
        self.entropy_bits = 0.0  # sum over tokens of the routing distribution's entropy

    def update(self, router_logits: torch.Tensor, counted: torch.Tensor) -> None:
        """router_logits: [T, E] (any device, dtype); counted: [T] bool (False for padding and masked tokens)."""
        if router_logits.shape[-1] != self.num_experts:
            raise ExpertsError(
                f"router logits have {router_logits.shape[-1]} experts, expected {self.num_experts} for this layer"
            )
        logits = router_logits.detach()[counted.to(router_logits.device)].float().cpu()  # [n, E]
        probs, weights, chosen = top_k_routing(logits, self.top_k, self.norm_topk_prob)  # as YuanM32Router
        one_hot = torch.zeros_like(probs).scatter_(1, chosen, 1.0)  # [n, E]
        self.tokens += logits.shape[0]
        self.selections += one_hot.sum(0).round().to(torch.int64)
        self.mass.index_add_(0, chosen.reshape(-1), weights.reshape(-1).double())
        self.co_selection += (one_hot.T @ one_hot).round().to(torch.int64)
        self.entropy_bits += float(-(probs * torch.log2(probs.clamp_min(1e-30))).sum())

    def summary(self, layer: int) -> dict[str, Any]:
        """This layer's entry of stats.json (shares of counted tokens; raw counts kept for merging)."""
        tokens = max(self.tokens, 1)
        token_share = self.selections.double() / max(int(self.selections.sum()), 1)
        routing_mass = self.mass / self.mass.sum() if self.mass.sum() > 0 else self.mass
        nonzero = token_share[token_share > 0]
        return {
            "layer": layer,
            "num_experts": self.num_experts,
            "tokens": self.tokens,
            "token_share": token_share.tolist(),
            "routing_mass": routing_mass.tolist(),
            "removal_impact": (self.selections.double() / tokens).tolist(),
            "load_entropy_bits": float(-(nonzero * torch.log2(nonzero)).sum()),
            "router_entropy_bits": self.entropy_bits / tokens,
            "co_selection": (self.co_selection.double() / tokens).tolist(),
            "selections": self.selections.tolist(),
        }


# ------------------------------------------------------------------------------------------------- the result


@dataclass
class ExpertStats:
    """The content of stats.json: the model's routing shape, the data, and one summary per layer."""

    model: dict[str, Any]
    data: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_experts(self) -> list[int]:
        return [layer["num_experts"] for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {"format": STATS_FORMAT, "version": STATS_VERSION, "model": self.model, "data": self.data,
                "layers": self.layers}  # fmt: skip

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExpertStats:
        """Read a stats.json written by `collect_expert_stats`; a file of another kind is an error."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ExpertsError(f"statistics file not found: {path}") from None
        except (OSError, ValueError) as err:
            raise ExpertsError(f"{path} is not a readable stats.json ({err})") from err
        if not isinstance(raw, dict) or raw.get("format") != STATS_FORMAT:
            raise ExpertsError(f"{path} is not a stats.json of `yuan-hf experts stats` (no format {STATS_FORMAT!r})")
        if raw.get("version") != STATS_VERSION:
            raise ExpertsError(f"{path} has stats version {raw.get('version')!r}; this yuan-hf reads {STATS_VERSION}")
        missing = [key for key in ("model", "data", "layers") if key not in raw]
        if missing:
            raise ExpertsError(f"{path} lacks {missing} (edited by hand?); collect it again with `yuan-hf experts stats`")
        stats = cls(model=raw["model"], data=raw["data"], layers=raw["layers"])
        for index, layer in enumerate(stats.layers):
            try:
                consistent = len(layer["routing_mass"]) == layer["num_experts"] and layer["layer"] == index
            except (KeyError, TypeError):
                consistent = False
            if not consistent:
                raise ExpertsError(f"{path}: the entry of layer {index} is inconsistent (edited by hand?)")
        return stats

    def check_matches(self, config: Any, *, model_name: str, stats_name: str = "the statistics") -> None:
        """Raise unless these statistics were collected on a model with `config`'s layers and experts."""
        counts = list(config.experts_per_layer)
        if self.num_experts != counts:
            raise ExpertsError(
                f"{stats_name} describe a different model: {len(self.layers)} layers with "
                f"{_counts_text(self.num_experts)} experts (collected on {self.model.get('name')!r}), but {model_name} "
                f"has {len(counts)} layers with {_counts_text(counts)} experts. Collect statistics on this model "
                "(yuan-hf experts stats)"
            )
        if self.model.get("num_experts_per_tok") != config.num_experts_per_tok:
            raise ExpertsError(
                f"{stats_name} were collected with top-{self.model.get('num_experts_per_tok')} routing, but "
                f"{model_name} routes top-{config.num_experts_per_tok}"
            )


def _counts_text(counts: list[int]) -> str:
    return str(counts[0]) if len(set(counts)) == 1 else "/".join(map(str, counts))


# ------------------------------------------------------------------------------------------------- data


def iter_documents(path: str | os.PathLike, tokenizer: Any) -> Iterator[list[int]]:
    """Token ids of each document of a JSONL or text file, read line by line.

    JSONL (`.jsonl` / `.json`): `{"text": ...}`, `{"prompt", "response"}` (IEIT's `prompt<sep>answer<eod>`) or
    `{"messages": [...]}` (the tokenizer's chat template); the whole sequence is routed, prompt included. Any
    other file is plain text with one document per non-blank line.
    """
    path = Path(path)
    if not path.is_file():
        raise ExpertsError(f"dataset file not found: {path}")
    try:
        yield from _encode_lines(path, tokenizer, jsonl=path.suffix.lower() in (".jsonl", ".json"))
    except UnicodeDecodeError as err:
        raise ExpertsError(f"{path} is not UTF-8 text ({err}); save it as UTF-8") from None


def _encode_lines(path: Path, tokenizer: Any, *, jsonl: bool) -> Iterator[list[int]]:
    from ..finetune.data import encode_record

    with open(path, encoding="utf-8-sig", errors="strict") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if not jsonl:
                ids = list(tokenizer(line.rstrip("\n"), add_special_tokens=False)["input_ids"])
            else:
                try:
                    record = json.loads(line)
                    if isinstance(record, dict) and "text" in record:
                        if not isinstance(record["text"], str):
                            raise ValueError(f"'text' must be a string, got {type(record['text']).__name__}")
                        ids = list(tokenizer(record["text"], add_special_tokens=False)["input_ids"])
                    else:
                        ids = encode_record(record, tokenizer)["input_ids"]
                except ValueError as err:  # JSON errors and the SFT encoders' record errors
                    raise ExpertsError(
                        f"{path}, line {number}: {err} (expected {{'text'}}, {{'prompt', 'response'}} or "
                        "{'messages'})"
                    ) from err
            if ids:
                yield ids


def iter_batches(
    documents: Iterator[list[int]], *, batch_size: int, max_length: int, pad_token_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded `(input_ids, attention_mask)` batches of [batch_size, <= max_length]; a longer document is cut
    into pieces of `max_length` tokens (each routed with its own context)."""
    rows: list[list[int]] = []
    for ids in documents:
        for start in range(0, len(ids), max_length):
            rows.append(ids[start : start + max_length])
            if len(rows) == batch_size:
                yield _pad(rows, pad_token_id)
                rows = []
    if rows:
        yield _pad(rows, pad_token_id)


def _pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


# ------------------------------------------------------------------------------------------------- driver


@torch.no_grad()
def collect_expert_stats(
    model: Any,
    tokenizer: Any,
    data: str | os.PathLike,
    *,
    max_tokens: int | None = None,
    batch_size: int = 8,
    max_length: int = 1024,
    model_name: str | None = None,
    progress: bool = True,
) -> ExpertStats:
    """Stream `data` through `model` (a YuanM32ForCausalLM, also 4-bit or dispatched with `device_map`) and
    count its routing; at most `max_tokens` real tokens are counted (None: the whole file)."""
    config = model.config
    for name, value in (("batch_size", batch_size), ("max_length", max_length), ("max_tokens", max_tokens)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ExpertsError(f"{name} must be a positive integer, got {value!r}")
    counters = [LayerCounter(e, config.num_experts_per_tok, config.norm_topk_prob) for e in config.experts_per_layer]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id or 0
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model  # no LM head: logits are not needed
    device = model.get_input_embeddings().weight.device
    counted, documents = 0, 0

    def counted_documents() -> Iterator[list[int]]:
        nonlocal documents
        for ids in iter_documents(data, tokenizer):
            documents += 1
            yield ids

    bar = tqdm(total=max_tokens, desc="routing statistics", unit="tok", disable=not progress)
    for input_ids, attention_mask in iter_batches(
        counted_documents(), batch_size=batch_size, max_length=max_length, pad_token_id=pad
    ):
        real = attention_mask.reshape(-1).bool()  # [b*s] row-major, as the router sees the tokens
        if max_tokens is not None and counted + int(real.sum()) > max_tokens:  # count only up to max_tokens
            real &= real.cumsum(0) <= max_tokens - counted
        outputs = backbone(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False,
            output_router_logits=True,
        )  # fmt: skip
        for counter, logits in zip(counters, outputs.router_logits):
            counter.update(logits, real)
        added = int(real.sum())
        counted += added
        bar.update(added)
        if max_tokens is not None and counted >= max_tokens:
            break
    bar.close()
    if counted == 0:
        raise ExpertsError(f"no tokens to count in {data}: the dataset is empty (no non-blank line with text)")
    return ExpertStats(
        model={
            "name": model_name or Path(str(getattr(config, "_name_or_path", "") or "model")).name,
            "num_hidden_layers": config.num_hidden_layers,
            "num_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "norm_topk_prob": config.norm_topk_prob,
        },
        data={"source": Path(data).name, "documents": documents, "tokens": counted, "max_tokens": max_tokens,
              "max_length": max_length},  # fmt: skip
        layers=[counter.summary(i) for i, counter in enumerate(counters)],
    )


def layer_report(stats: ExpertStats) -> str:
    """A few lines per model for the terminal: per layer the entropy and the busiest / idlest experts."""
    lines = [f"{stats.data['tokens']:,} tokens from {stats.data['documents']:,} documents of {stats.data['source']}"]
    for layer in stats.layers:
        share = layer["token_share"]
        order = sorted(range(len(share)), key=lambda e: -share[e])
        unused = sum(1 for s in share if s == 0)
        lines.append(
            f"  layer {layer['layer']:>2}: load entropy {layer['load_entropy_bits']:.2f} of "
            f"{math.log2(len(share)):.2f} bits; busiest expert {order[0]} ({share[order[0]]:.1%}), idlest "
            f"{order[-1]} ({share[order[-1]]:.1%}); {unused} never chosen"
        )
    return "\n".join(lines)


def expert_stats_main(
    model_path: str,
    data: str,
    *,
    out: str | os.PathLike,
    max_tokens: int | None = None,
    batch_size: int = 8,
    max_length: int = 1024,
    tokenizer: str | None = None,
    load_in_4bit: bool = False,
    device_map: str | None = None,
    dtype: str = "auto",
    plots: bool = True,
) -> tuple[ExpertStats, list[str]]:
    """`yuan-hf experts stats`: load the model, collect, write `OUT/stats.json` (and the PNGs); return the stats and
    notes for the terminal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import registration
    from .plots import write_plots

    registration.register()
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map:
        kwargs["device_map"] = device_map
    if load_in_4bit:  # QLoRA's nf4 settings: router, LF gate and lm_head stay unquantized
        from ..finetune.quantization import bnb_config

        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        kwargs["quantization_config"] = bnb_config(bits=4, compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer or model_path)
    stats = collect_expert_stats(
        model, tok, data, max_tokens=max_tokens, batch_size=batch_size, max_length=max_length,
        model_name=Path(model_path).name,
    )  # fmt: skip
    out = Path(out)
    notes = [f"wrote {stats.save(out / 'stats.json')}"]
    if plots:
        notes += write_plots(stats, out)
    return stats, notes

