"""Know and shape the experts: router statistics, layer-adaptive expert pruning (LAEP), expert placement.

- `collect_expert_stats` / `yuan-hf experts stats MODEL DATA`: per-layer token share, routing mass, entropy,
  co-selection and removal impact of every expert on your data -> stats.json (+ PNG pictures with matplotlib).
- `prune_folder` / `yuan-hf experts prune MODEL DST --stats stats.json (--keep-mass | --num-experts | --max-params)`.
- `plan_placement` / `yuan-hf experts place STATS --devices N`: a balanced expert-parallel placement.
"""

from .placement import balanced_placement, contiguous_placement, imbalance, plan_placement, reorder
from .prune import PrunePlan, plan_pruning, prune_folder, pruned_config, rewrite_experts
from .stats import ExpertsError, ExpertStats, LayerCounter, collect_expert_stats

__all__ = [
    "ExpertStats",
    "ExpertsError",
    "LayerCounter",
    "PrunePlan",
    "balanced_placement",
    "collect_expert_stats",
    "contiguous_placement",
    "imbalance",
    "plan_placement",
    "plan_pruning",
    "prune_folder",
    "pruned_config",
    "reorder",
    "rewrite_experts",
]
