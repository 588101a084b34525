"""Which `checkpoint-N` folder a run resumes from, and which output folders a run must not write into.

transformers' Trainer (5.x) saves straight into `output_dir/checkpoint-N` (no temporary name, no rename) in this
order: model or adapter weights, `optimizer.pt` + `scheduler.pt`, RNG state, and `trainer_state.json` last. A run
killed while saving therefore leaves a `checkpoint-N` folder with the newest N but without `trainer_state.json`
(or with a torn one, or without the optimizer), and `transformers.trainer_utils.get_last_checkpoint` would pick
it. `newest_complete_checkpoint` only takes folders that hold all of it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR + "-{global_step}"
TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES: tuple[str, ...] = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Sharded engines keep weights and optimizer in sub-folders: DeepSpeed `global_step{N}/`, FSDP
# `pytorch_model_fsdp_0/` and `optimizer_0/`.
_SHARDED_WEIGHTS = re.compile(r"^(global_step\d+|pytorch_model_fsdp(_\d+)?)$")
_SHARDED_OPTIMIZER = re.compile(r"^(global_step\d+|optimizer(_\d+)?)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-N` folders of `output_dir`, oldest (smallest N) first; `[]` when the folder does not exist."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be resumed from (what is missing), or None when it holds a complete Trainer checkpoint."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE} (the Trainer writes it last: the save was interrupted)"
    try:
        step = json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return f"{TRAINER_STATE} is cut short or has no global_step (the save was interrupted)"
    if not isinstance(step, int):
        return f"{TRAINER_STATE} has global_step {step!r}, expected an integer"
    names = {p.name for p in folder.iterdir()}
    sharded = {n for n in names if (folder / n).is_dir()}
    if not (names & set(WEIGHT_FILES) or any(_SHARDED_WEIGHTS.match(n) for n in sharded)):
        return f"no model or adapter weights (none of {list(WEIGHT_FILES)})"
    if not any(_SHARDED_OPTIMIZER.match(n) for n in sharded):
        missing = [n for n in ("optimizer.pt", "scheduler.pt") if n not in names]
        if missing:
            return f"no {' or '.join(missing)} (saved with train.save_only_model=true, or the save was interrupted)"
    return None


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, dict[Path, str]]:
    """(the complete checkpoint with the largest step or None, {newer incomplete checkpoint: what it lacks})."""
    skipped: dict[Path, str] = {}
    for folder in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped[folder] = problem
    return None, skipped


__all__ = [
    "CHECKPOINT_PATTERN",
    "TRAINER_STATE",
    "WEIGHT_FILES",
    "checkpoint_problem",
    "list_checkpoints",
    "newest_complete_checkpoint",
]
