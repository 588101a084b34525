"""Layer-adaptive expert pruning (LAEP, Yuan3.0) from router statistics, written as a native folder.

Per layer, keep the fewest experts that carry `keep_mass` of the routed weight (never fewer than top-k): layers
whose routing is concentrated lose many experts, balanced layers few. `--num-experts N` keeps the N heaviest of
every layer (uniform pruning); `--max-params` picks the largest common `keep_mass` that fits the budget and gives
what is left of it to the heaviest remaining experts of any layer.

The router is kept whole: Yuan's attention router computes each expert's logit from an E x E attention over every
expert's value, so dropping router rows would change the routing of every token. The pruned layer reads its kept
experts' logits (`config.router_experts`) and routes top-k among them; with `norm_topk_prob` (the release) every
token whose top-k held no removed expert gets exactly the unpruned model's experts and weights. The cost is
3 x H x E_removed router parameters per layer (0.4% of one M32 expert).

Weights are streamed tensor by tensor from the source's safetensors: pruning the 40B model needs no GPU and about
one shard of memory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..modeling import YuanM32Config
from ..hub import TOKENIZER_FILES
from ..parameters import count_config_parameters
from .stats import ExpertsError, ExpertStats

EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)$")
MASS_TOLERANCE = 1e-9  # cumulative shares are float sums; 0.95 must be reachable by shares that add up to 0.95


# ------------------------------------------------------------------------------------------------- sizes


def parse_param_count(text: str | int) -> int:
    """``"24B"`` / ``"350M"`` / ``"1.5e9"`` / ``12345`` -> a parameter count."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([KMBT]?)\s*", str(text), flags=re.IGNORECASE)
        if not match:
            raise ExpertsError(f"parameter count {text!r} is not a number; use e.g. '24B', '350M' or 24000000000")
        scale = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}[match.group(2).upper()]
        value = int(float(match.group(1)) * scale)
    if value <= 0:
        raise ExpertsError(f"parameter count {text!r} must be positive")
    return value


def expert_parameters(config: YuanM32Config) -> int:
    """Parameters of one routed expert (SwiGLU: gate, up [F, H] and down [H, F])."""
    return 3 * config.hidden_size * config.moe_intermediate_size


def _human(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count:,}"


# ------------------------------------------------------------------------------------------------- the plan


@dataclass
class PrunePlan:
    """Which experts each layer keeps (indices into the layer's current experts, ascending) and why."""

    kept: list[list[int]]
    criterion: str
    notes: list[str] = field(default_factory=list)

    def retained_mass(self, stats: ExpertStats) -> list[float]:
        """Per layer, the share of the routed weight the kept experts carried in `stats`."""
        return [sum(layer["routing_mass"][e] for e in kept) for kept, layer in zip(self.kept, stats.layers)]

    def affected_tokens(self, stats: ExpertStats) -> list[float | None]:
        """Per layer, the share of tokens that routed to at least one removed expert (the tokens whose output can
        change). Exact for top-2 (inclusion-exclusion over the co-selection matrix); None for other top-k."""
        if stats.model.get("num_experts_per_tok") != 2:
            return [None] * len(self.kept)
        shares = []
        for kept, layer in zip(self.kept, stats.layers):
            removed = sorted(set(range(layer["num_experts"])) - set(kept))
            co = layer["co_selection"]
            pairs = sum(co[a][b] for i, a in enumerate(removed) for b in removed[i + 1 :])
            shares.append(sum(co[e][e] for e in removed) - pairs)
        return shares


def experts_carrying(mass: list[float], keep_mass: float, top_k: int) -> list[int]:
    """The fewest experts whose routing mass adds up to `keep_mass` (heaviest first; ties by index), at least
    `top_k`; returned ascending. mass: the layer's `routing_mass` (sums to 1)."""
    order = sorted(range(len(mass)), key=lambda e: (-mass[e], e))
    total, count = 0.0, 0
    for count, expert in enumerate(order, start=1):
        total += mass[expert]
        if total >= keep_mass - MASS_TOLERANCE:
            break
    return sorted(order[: max(count, top_k)])


def plan_pruning(
    stats: ExpertStats,
    config: YuanM32Config,
    *,
    keep_mass: float | None = None,
    num_experts: int | None = None,
    max_params: int | str | None = None,
) -> PrunePlan:
    """Choose the experts to keep with exactly one criterion (see the module docstring)."""
    if sum(option is not None for option in (keep_mass, num_experts, max_params)) != 1:
        raise ExpertsError("choose exactly one of keep_mass (--keep-mass), num_experts (--num-experts), "
                           "max_params (--max-params)")  # fmt: skip
    top_k, counts = config.num_experts_per_tok, config.experts_per_layer
    masses = [layer["routing_mass"] for layer in stats.layers]
    if keep_mass is not None:
        if not isinstance(keep_mass, (int, float)) or not 0 < keep_mass <= 1:
            raise ExpertsError(f"keep_mass must be in (0, 1], got {keep_mass!r}")
        plan = PrunePlan([experts_carrying(m, keep_mass, top_k) for m in masses], f"keep_mass {keep_mass:g}")
        raised = [i for i, m in enumerate(masses) if len(experts_carrying(m, keep_mass, 1)) < top_k]
        if raised:
            plan.notes.append(f"layers {raised}: fewer than top-{top_k} experts carry {keep_mass:g}; kept {top_k}")
        return plan
    if num_experts is not None:
        for layer, count in enumerate(counts):
            if not isinstance(num_experts, int) or num_experts < top_k:
                raise ExpertsError(
                    f"num_experts {num_experts!r} would leave layer {layer} with fewer than top-{top_k} experts "
                    f"(every token routes to {top_k}); keep at least {top_k}"
                )
            if num_experts > count:
                raise ExpertsError(f"num_experts {num_experts} exceeds the {count} experts of layer {layer}")
        kept = [sorted(sorted(range(len(m)), key=lambda e: (-m[e], e))[:num_experts]) for m in masses]
        return PrunePlan(kept, f"num_experts {num_experts} (the heaviest of every layer)")
    return _plan_for_budget(stats, config, parse_param_count(max_params))


def _plan_for_budget(stats: ExpertStats, config: YuanM32Config, max_params: int) -> PrunePlan:
    """The largest common keep_mass whose experts fit `max_params`, then the rest of the budget to the heaviest
    remaining experts (any layer). Every expert costs the same, so the budget is a number of experts."""
    top_k, counts = config.num_experts_per_tok, config.experts_per_layer
    per_expert = expert_parameters(config)
    fixed = count_config_parameters(config).total - per_expert * sum(counts)  # everything but the experts (router included)
    budget = (max_params - fixed) // per_expert
    smallest = fixed + per_expert * top_k * len(counts)
    if budget < top_k * len(counts):
        raise ExpertsError(
            f"max_params {_human(max_params)} is below {_human(smallest)}, the model with top-{top_k} experts in "
            f"every layer (layer 0 would need fewer than top-{top_k}); raise it"
        )
    if budget >= sum(counts):
        raise ExpertsError(
            f"max_params {_human(max_params)} is not below the model's {_human(fixed + per_expert * sum(counts))} "
            "parameters: nothing to prune"
        )
    masses = [layer["routing_mass"] for layer in stats.layers]
    # candidate thresholds: every cumulative share of every layer (the kept counts only change there)
    candidates = {1.0}
    for m in masses:
        total = 0.0
        for e in sorted(range(len(m)), key=lambda e: (-m[e], e)):
            total += m[e]
            candidates.add(min(total, 1.0))
    best, kept = 0.0, [experts_carrying(m, 0.0, top_k) for m in masses]
    for threshold in sorted(candidates, reverse=True):
        trial = [experts_carrying(m, threshold, top_k) for m in masses]
        if sum(map(len, trial)) <= budget:
            best, kept = threshold, trial
            break
    spare = budget - sum(map(len, kept))
    rest = sorted(
        ((m[e], layer, e) for layer, m in enumerate(masses) for e in range(len(m)) if e not in kept[layer]),
        key=lambda item: (-item[0], item[1], item[2]),
    )
    for _, layer, expert in rest[:spare]:
        kept[layer].append(expert)
    plan = PrunePlan([sorted(k) for k in kept], f"max_params {_human(max_params)} (keep_mass {best:.4g} + fill)")
    plan.notes.append(f"common keep_mass {best:.4g}; {min(spare, len(rest))} more expert(s) from the spare budget")
    return plan


# ------------------------------------------------------------------------------------------------- the folder


def pruned_config(config: YuanM32Config, kept: list[list[int]]) -> YuanM32Config:
    """`config` with each layer's experts reduced (or reordered) to `kept`; the router keeps its outputs and
    `router_experts` says which output each remaining expert answers to (composed with an earlier pruning)."""
    if config.router_num_experts is None and len(set(config.experts_per_layer)) > 1:
        raise ExpertsError("a model whose routers differ in size per layer (num_experts a list, no router_experts) "
                           "cannot be described after pruning; prune the model it came from")  # fmt: skip
    values = config.to_dict()
    counts = [len(k) for k in kept]
    values["num_experts"] = counts[0] if len(set(counts)) == 1 else counts
    previous = config.router_experts or [list(range(e)) for e in config.experts_per_layer]
    values["router_num_experts"] = config.router_num_experts or config.experts_per_layer[0]
    values["router_experts"] = [[ids[e] for e in k] for ids, k in zip(previous, kept)]
    if all(ids == list(range(values["router_num_experts"])) for ids in values["router_experts"]):
        values["router_num_experts"] = values["router_experts"] = None  # nothing removed or moved
    for key in ("auto_map", "_name_or_path", "transformers_version"):
        values.pop(key, None)
    return YuanM32Config.from_dict(values)


def open_native_folder(path: str | os.PathLike) -> tuple[Path, YuanM32Config, dict[str, Path]]:
    """A local native yuan_m32 folder with 16/32-bit safetensors -> (folder, config, {tensor name: file})."""
    from safetensors import safe_open

    from ..conversion.common import read_weight_index

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ExpertsError(f"{path} is not a model folder (no config.json); pruning reads a local native folder")
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") == "yuan":
        raise ExpertsError(f"{path} is IEIT's HF layout; convert it first: yuan-hf convert ieit-hf {path} NATIVE_DIR")
    if raw.get("model_type") != "yuan_m32":
        raise ExpertsError(f"{path} holds model_type {raw.get('model_type')!r}, not a yuan_m32 model")
    if "quantization_config" in raw:
        raise ExpertsError(f"{path} holds quantized weights; prune the 16-bit folder and quantize when loading")
    config = YuanM32Config.from_pretrained(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = {name: folder / file for name, file in read_weight_index(index).items()}
    elif (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", framework="pt") as handle:
            files = dict.fromkeys(handle.keys(), folder / "model.safetensors")
    else:
        raise ExpertsError(f"{path} has no model.safetensors or model.safetensors.index.json")
    return folder, config, files


def iter_rewritten_tensors(
    files: dict[str, Path], kept: list[list[int]], *, progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """The source tensors, file by file, with expert `kept[l][j]` of layer l renamed to expert j and the other
    experts left out. Everything else (the router included) passes through unchanged."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    renamed = {}
    for name in files:
        match = EXPERT_KEY.match(name)
        if match is None:
            renamed[name] = name
            continue
        layer, expert, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        if expert in kept[layer]:
            renamed[name] = f"model.layers.{layer}.mlp.experts.{kept[layer].index(expert)}.{rest}"
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file in tqdm(sorted(by_file), desc="writing experts", unit="shard", disable=not progress):
        with safe_open(file, framework="pt") as handle:
            for name in sorted(by_file[file]):
                if name in renamed:
                    yield renamed[name], handle.get_tensor(name)


@dataclass
class RewriteSummary:
    destination: Path
    parameters_before: int
    parameters_after: int
    experts_before: list[int]
    experts_after: list[int]
    notes: list[str]
    seconds: float

    def __str__(self) -> str:
        before, after = self.parameters_before, self.parameters_after
        lines = [
            f"wrote {self.destination}",
            f"  parameters: {_human(before)} -> {_human(after)} ({after / before:.1%})",
            f"  experts per layer: {_counts(self.experts_before)} -> {_counts(self.experts_after)}",
            f"  time: {self.seconds:.1f} s",
        ]
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def _counts(counts: list[int]) -> str:
    return f"{counts[0]} (all layers)" if len(set(counts)) == 1 else " ".join(map(str, counts))


def rewrite_experts(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    kept: list[list[int]],
    *,
    provenance: dict[str, Any],
    overwrite: bool = False,
    verify: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = True,
    notes: list[str] | None = None,
) -> RewriteSummary:
    """Write `src` with each layer's experts reduced / reordered to `kept` as a native folder at `dst` (atomic:
    a temporary folder renamed at the end; `dst` may not be or hold `src`; a non-empty `dst` needs `overwrite`
    and must be an earlier yuan-hf output). Tokenizer files and the generation config are copied."""
    from ..conversion.common import ConversionError
    from ..conversion.native.folder import verify_folder, write_native_folder
    from ..conversion.native.output import atomic_output_dir
    from ..hub import HubError, check_weights_match_config, read_safetensors_header

    started = time.perf_counter()
    folder, config, files = open_native_folder(src)
    if len(kept) != config.num_hidden_layers:
        raise ExpertsError(f"the plan has {len(kept)} layers, {src} has {config.num_hidden_layers}")
    shapes = {}
    for file in set(files.values()):
        shapes.update(read_safetensors_header(file))
    try:
        check_weights_match_config(config.to_dict(), {k: shapes[k] for k in files}, folder=folder)
    except HubError as err:
        raise ExpertsError(str(err)) from err
    new_config = pruned_config(config, kept)
    notes = list(notes or [])
    with atomic_output_dir(dst, overwrite=overwrite, sources=[folder]) as tmp:
        write_native_folder(
            tmp, new_config, iter_rewritten_tensors(files, kept, progress=progress), max_shard_size=max_shard_size,
            provenance={"converter": "yuan-hf experts", "source": folder.resolve().name, **provenance},
        )  # fmt: skip
        for file in folder.iterdir():
            if file.is_file() and (file.name.startswith("tokenizer") or file.name in TOKENIZER_FILES
                                   or file.name == "generation_config.json"):  # fmt: skip
                shutil.copyfile(file, tmp / file.name)
        if verify:
            try:
                notes.append(verify_folder(tmp, name=Path(dst)))
            except ConversionError as err:
                raise ExpertsError(str(err)) from err
    return RewriteSummary(
        destination=Path(dst), parameters_before=count_config_parameters(config).total,
        parameters_after=count_config_parameters(new_config).total, experts_before=config.experts_per_layer,
        experts_after=new_config.experts_per_layer, notes=notes, seconds=time.perf_counter() - started,
    )  # fmt: skip


def prune_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    stats: str | os.PathLike | ExpertStats,
    keep_mass: float | None = None,
    num_experts: int | None = None,
    max_params: int | str | None = None,
    overwrite: bool = False,
    verify: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = True,
) -> RewriteSummary:
    """`yuan-hf experts prune`: plan from `stats` (checked against `src`), then write the pruned folder."""
    stats_name = Path(stats).name if isinstance(stats, (str, os.PathLike)) else "the statistics"
    stats = stats if isinstance(stats, ExpertStats) else ExpertStats.load(stats)
    _, config, _ = open_native_folder(src)
    stats.check_matches(config, model_name=str(src), stats_name=stats_name)
    plan = plan_pruning(stats, config, keep_mass=keep_mass, num_experts=num_experts, max_params=max_params)
    retained = plan.retained_mass(stats)
    affected = plan.affected_tokens(stats)
    notes = plan.notes + [f"routed mass kept per layer: {' '.join(f'{m:.3f}' for m in retained)}"]
    if affected[0] is not None:
        notes.append(f"tokens routed to a removed expert, per layer: {' '.join(f'{a:.3f}' for a in affected)}")
    provenance = {
        "operation": "prune", "criterion": plan.criterion, "stats": stats_name, "stats_data": stats.data,
        "kept_experts": plan.kept, "routed_mass_kept": retained,
    }  # fmt: skip
    return rewrite_experts(
        src, dst, plan.kept, provenance=provenance, overwrite=overwrite, verify=verify,
        max_shard_size=max_shard_size, progress=progress, notes=notes,
    )  # fmt: skip
