"""Pictures of the router statistics (matplotlib, PNG): the per-layer load heat map and co-selection matrices.

matplotlib is an optional extra (`pip install 'yuan-hf[experts]'`): without it the statistics are still written
and the pictures are skipped with a note saying how to get them.
"""

from __future__ import annotations

import math
from pathlib import Path

from .stats import ExpertStats

MISSING_MATPLOTLIB = "matplotlib is not installed: no PNG written (pip install 'yuan-hf[experts]' for the pictures)"


def write_plots(stats: ExpertStats, out: str | Path) -> list[str]:
    """Write `load_heatmap.png` (layers x experts, token share) and `co_selection.png` (one matrix per layer) into
    `out`; return notes for the terminal (the files written, or why none were)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return [MISSING_MATPLOTLIB]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [f"wrote {_load_heatmap(plt, stats, out / 'load_heatmap.png')}",
            f"wrote {_co_selection(plt, stats, out / 'co_selection.png')}"]  # fmt: skip


def _load_heatmap(plt, stats: ExpertStats, path: Path) -> Path:
    """Rows: layers; columns: experts; colour: share of the layer's assignments relative to a uniform load (1 =
    the layer mean). Layers with fewer experts (a pruned model) leave their missing columns blank."""
    width = max(stats.num_experts)
    grid = [[math.nan] * width for _ in stats.layers]
    for row, layer in zip(grid, stats.layers):
        count = layer["num_experts"]
        row[:count] = [share * count for share in layer["token_share"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * width + 2), max(3, 0.3 * len(grid) + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"expert load (x layer mean), {stats.data['tokens']:,} tokens of {stats.data['source']}")
    fig.colorbar(image, ax=ax, label="load / mean load")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _co_selection(plt, stats: ExpertStats, path: Path) -> Path:
    """One panel per layer: share of tokens routed to both experts (diagonal blanked: it is the removal impact)."""
    n = len(stats.layers)
    cols = min(n, 6)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, stats.layers):
        matrix = [list(row) for row in layer["co_selection"]]
        for e in range(len(matrix)):
            matrix[e][e] = math.nan
        ax.imshow(matrix, cmap="magma", interpolation="nearest")
        ax.set_title(f"layer {layer['layer']}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("top-k co-selection (share of tokens routed to both experts)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
