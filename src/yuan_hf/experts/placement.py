"""Expert placement for expert parallelism: balance each layer's token load over N devices.

Expert-parallel runtimes (transformers' `ep_size`, Megatron, vLLM) shard a layer's experts contiguously: device d
gets experts `d*E/N .. (d+1)*E/N - 1`. When routing is skewed (measured by `yuan-hf experts stats`), that split
leaves one device with much more work than the mean, and every step waits for it. `balanced_placement` assigns
experts to devices with equal expert counts (memory stays even) and loads within a proven bound of the mean;
`reorder` (`yuan-hf experts place --reorder SRC DST`) writes a copy of the model whose experts are permuted so
that the runtime's contiguous split *is* the balanced placement (routing and outputs unchanged: the router is kept
whole and `router_experts` maps each expert to its logit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .stats import ExpertsError, ExpertStats

PLAN_FORMAT = "yuan-hf expert placement"


def device_sizes(num_experts: int, num_devices: int) -> list[int]:
    """Experts per device: equal, or differing by one (the first `E % N` devices take one more)."""
    return [num_experts // num_devices + (d < num_experts % num_devices) for d in range(num_devices)]


def contiguous_placement(num_experts: int, num_devices: int) -> list[list[int]]:
    """The runtimes' default: consecutive blocks of experts per device."""
    groups, start = [], 0
    for size in device_sizes(num_experts, num_devices):
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def balanced_placement(loads: list[float], num_devices: int) -> list[list[int]]:
    """Experts -> devices with `device_sizes` experts each and balanced loads.

    Greedy (heaviest expert first to the least-loaded device with room), then swaps between the most and the least
    loaded device while a swap lowers the larger of the two. Bound: at the end no swap helps, which implies
    `max device load - min device load <= max expert load`, hence `max device load <= mean + max expert load`.
    (If the gap were larger: with equal counts the busier device holds some expert heavier than one of the other's,
    and swapping two experts whose loads differ by less than the gap would help; with one expert more on either
    side the same holds, or the gap is already below the lightest expert there.) Each swap strictly lowers the
    sum of squared device loads, so it terminates.
    """
    sizes = device_sizes(len(loads), num_devices)
    groups: list[list[int]] = [[] for _ in range(num_devices)]
    totals = [0.0] * num_devices
    for expert in sorted(range(len(loads)), key=lambda e: (-loads[e], e)):
        device = min((d for d in range(num_devices) if len(groups[d]) < sizes[d]), key=lambda d: (totals[d], d))
        groups[device].append(expert)
        totals[device] += loads[expert]
    for _ in range(len(loads) ** 2 * num_devices + 1):  # a safety cap; the swaps end long before
        high = max(range(num_devices), key=lambda d: totals[d])
        low = min(range(num_devices), key=lambda d: totals[d])
        gap = totals[high] - totals[low]
        best = None  # the swap whose moved load is closest to gap / 2, if it lowers the larger side
        for a in groups[high]:
            for b in groups[low]:
                moved = loads[a] - loads[b]
                if 0 < moved < gap and (best is None or abs(gap / 2 - moved) < abs(gap / 2 - best[0])):
                    best = (moved, a, b)
        if best is None:
            break
        moved, a, b = best
        groups[high][groups[high].index(a)] = b
        groups[low][groups[low].index(b)] = a
        totals[high] -= moved
        totals[low] += moved
    return [sorted(g) for g in groups]


def imbalance(loads: list[float], groups: list[list[int]]) -> float:
    """Busiest device's load over the mean device load (1.0 = perfect)."""
    totals = [sum(loads[e] for e in g) for g in groups]
    mean = sum(totals) / len(totals)
    return max(totals) / mean if mean > 0 else 1.0


def plan_placement(stats: ExpertStats, num_devices: int) -> dict[str, Any]:
    """The placement plan (JSON-ready): per layer the devices' experts, loads, and the imbalance of the contiguous
    split vs the balanced one; `expert_order` is the permutation that makes the contiguous split balanced."""
    if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices < 1:
        raise ExpertsError(f"the number of devices must be a positive integer, got {num_devices!r}")
    layers = []
    for layer in stats.layers:
        loads, count = layer["token_share"], layer["num_experts"]
        if num_devices > count:
            raise ExpertsError(
                f"{num_devices} devices but layer {layer['layer']} has only {count} experts: every device needs one"
            )
        naive, balanced = contiguous_placement(count, num_devices), balanced_placement(loads, num_devices)
        mean = sum(loads) / num_devices
        layers.append({
            "layer": layer["layer"],
            "devices": balanced,
            "device_load": [sum(loads[e] for e in g) for g in balanced],
            "expert_order": [e for g in balanced for e in g],
            "imbalance_contiguous": imbalance(loads, naive),
            "imbalance_balanced": imbalance(loads, balanced),
            "bound": (mean + max(loads)) / mean if mean > 0 else 1.0,
        })  # fmt: skip
    worst = max(layers, key=lambda entry: entry["imbalance_contiguous"])
    return {
        "format": PLAN_FORMAT,
        "version": 1,
        "num_devices": num_devices,
        "experts_per_device": [device_sizes(layer["num_experts"], num_devices) for layer in stats.layers],
        "bound": "per layer: busiest device load <= mean device load + the largest single expert load",
        "stats_data": stats.data,
        "mean_imbalance_contiguous": sum(e["imbalance_contiguous"] for e in layers) / len(layers),
        "mean_imbalance_balanced": sum(e["imbalance_balanced"] for e in layers) / len(layers),
        "worst_layer_contiguous": {"layer": worst["layer"], "imbalance": worst["imbalance_contiguous"],
                                   "balanced": worst["imbalance_balanced"]},  # fmt: skip
        "layers": layers,
    }


def describe_plan(plan: dict[str, Any]) -> str:
    """A short report for the terminal."""
    lines = [f"placement over {plan['num_devices']} devices (load = busiest device / mean; 1.00 is perfect)"]
    for entry in plan["layers"]:
        lines.append(
            f"  layer {entry['layer']:>2}: contiguous {entry['imbalance_contiguous']:.2f}  balanced "
            f"{entry['imbalance_balanced']:.2f}  (bound {entry['bound']:.2f})"
        )
    lines.append(
        f"  mean: contiguous {plan['mean_imbalance_contiguous']:.2f} -> balanced {plan['mean_imbalance_balanced']:.2f}"
    )
    return "\n".join(lines)


def write_plan(plan: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=1) + "\n")
    return path


def reorder(src: str | os.PathLike, dst: str | os.PathLike, plan: dict[str, Any], *, overwrite: bool = False,
            verify: bool = False, progress: bool = True):  # fmt: skip
    """Write `src` with each layer's experts in the plan's `expert_order` (device-major), so a runtime that shards
    experts contiguously over `num_devices` places them as planned. Outputs are unchanged (tested)."""
    from .prune import open_native_folder, rewrite_experts

    _, config, _ = open_native_folder(src)
    orders = [entry["expert_order"] for entry in plan["layers"]]
    if [len(o) for o in orders] != config.experts_per_layer:
        raise ExpertsError(
            f"the placement plan covers {len(orders)} layers with {[len(o) for o in orders]} experts, but {src} has "
            f"{config.num_hidden_layers} layers with {config.experts_per_layer}"
        )
    return rewrite_experts(
        src, dst, orders, overwrite=overwrite, verify=verify, progress=progress,
        provenance={"operation": "place", "num_devices": plan["num_devices"], "expert_order": orders},
        notes=[f"contiguous expert-parallel split over {plan['num_devices']} devices = the balanced placement"],
    )  # fmt: skip
