"""Activation checkpointing under the installed transformers' names.

transformers 5.25 renamed `TrainingArguments.gradient_checkpointing(_kwargs)` to `activation_checkpointing(_kwargs)`.
The old names stay as deprecated aliases (a FutureWarning) that are mirrored into the new ones only while the
arguments are constructed: setting `args.gradient_checkpointing_kwargs` afterwards is silently ignored by 5.25's
Trainer, which reads the new name. Recipes may use either name; the runner writes the installed one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import TrainingArguments

OLD = ("gradient_checkpointing", "gradient_checkpointing_kwargs")
NEW = ("activation_checkpointing", "activation_checkpointing_kwargs")

__all__ = ["activation_checkpointing_args", "checkpointing_fields", "checkpointing_under_installed_names"]


def checkpointing_fields() -> tuple[str, str]:
    """(flag, kwargs) field names of activation checkpointing in the installed `TrainingArguments`."""
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    return NEW if NEW[0] in fields else OLD


def activation_checkpointing_args(enabled: bool = True, *, use_reentrant: bool = False) -> dict[str, Any]:
    """`TrainingArguments` / TRL `SFTConfig` keywords that turn activation checkpointing on (non-reentrant by
    default), under the names the installed transformers reads: `TrainingArguments(..., **activation_checkpointing_args())`.
    """
    flag, kwargs = checkpointing_fields()
    return {flag: enabled, kwargs: {"use_reentrant": use_reentrant}} if enabled else {flag: False}


def checkpointing_under_installed_names(values: dict[str, Any], where: str = "arguments") -> dict[str, Any]:
    """A copy of TrainingArguments values with either spelling of the checkpointing fields under the installed
    names. Both spellings of one field -> ValueError naming them (which one would win is not obvious)."""
    installed = checkpointing_fields()
    other = OLD if installed == NEW else NEW
    out = dict(values)
    for mine, theirs in zip(installed, other):
        if theirs in out:
            if mine in out:
                raise ValueError(f"{where}: give one of {theirs} and {mine} (the same setting; transformers 5.25 renamed it)")
            out[mine] = out.pop(theirs)
    return out
