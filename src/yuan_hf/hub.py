"""Hub-ready folders: model card, folder checks and upload through huggingface_hub."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from .conversion.common import ConversionError, read_weight_index

REMOTE_CODE_FILES = ("configuration_yuan_m32.py", "modeling_yuan_m32.py")

CARD_TEMPLATE = """---
license: {license}
library_name: transformers
pipeline_tag: text-generation
tags:
- yuan
- yuan2
- moe
- mixture-of-experts
---

# {title}

IEIT's **Yuan 2.0-M32** ({params}; {experts} experts, top-{topk}, attention router, localized-filtering
attention) in the native `yuan_m32` layout for Hugging Face transformers 5, converted with
[yuan-hf](https://github.com/yuan-hf/yuan-hf).

## Load it

With the package (recommended):

```python
import torch, yuan_hf  # registers model_type "yuan_m32"
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}", dtype=torch.bfloat16, device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```

Without it, the modeling code in this folder is used:

```python
model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True, dtype=torch.bfloat16)
tokenizer = AutoTokenizer.from_pretrained("{repo}", trust_remote_code=True)
```

Prompt format (IEIT's instruct format): `prompt<sep>` then the model answers and ends with `<eod>`;
`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` builds it.

## Provenance

| field | value |
|---|---|
{provenance_rows}

RoPE base: {rope_theta:g}. The released model was fine-tuned at 16K tokens with base 40890 (NTK rule
from 10000 at 4096 tokens); IEIT's original HF code uses 10000.
"""


def write_model_card(
    folder: str | os.PathLike,
    *,
    provenance: Mapping[str, object] | None = None,
    license: str = "other",
    repo_id: str | None = None,
) -> Path:
    """Write ``README.md`` (a model card) into a native folder; returns its path."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if provenance is None and (folder / "conversion.json").is_file():
        provenance = json.loads((folder / "conversion.json").read_text())
    provenance = dict(provenance or {"source_format": "unknown"})
    num_params = _count_parameters(folder)
    rows = "\n".join(f"| {key} | {value} |" for key, value in provenance.items())
    card = CARD_TEMPLATE.format(
        license=license,
        title=repo_id.split("/")[-1] if repo_id else folder.name,
        params=f"{num_params / 1e9:.2f}B parameters" if num_params >= 1e8 else f"{num_params:,} parameters",
        experts=config.get("num_experts"),
        topk=config.get("num_experts_per_tok"),
        repo=repo_id or str(folder),
        provenance_rows=rows,
        rope_theta=config.get("rope_parameters", {}).get("rope_theta", float("nan")),
    )
    path = folder / "README.md"
    path.write_text(card)
    return path


def _count_parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def check_hub_folder(folder: str | os.PathLike) -> list[str]:
    """Raise unless ``folder`` is a complete native folder; return the files an upload would send."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a directory")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{folder} has no config.json; save the model with save_pretrained first")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "yuan_m32":
        raise ConversionError(
            f"{config_file} has model_type={config.get('model_type')!r}, expected 'yuan_m32'; convert IEIT folders "
            "with `yuan-hf convert ieit-hf` first"
        )
    if not list(folder.glob("*.safetensors")):
        raise ConversionError(f"{folder} holds no .safetensors weights")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        read_weight_index(index)
    missing_code = [f for f in REMOTE_CODE_FILES if not (folder / f).is_file()]
    auto_map = config.get("auto_map", {})
    if missing_code or "AutoModelForCausalLM" not in auto_map:
        raise ConversionError(
            f"{folder} cannot load with trust_remote_code (missing {missing_code or 'auto_map'}); re-save it with "
            "`import yuan_hf` active (save_pretrained then copies the modeling files)"
        )
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    license: str | None = None,
    commit_message: str = "Upload Yuan 2.0-M32 (yuan_m32 native layout)",
    api=None,
) -> str:
    """Upload a checked native folder (writing a model card if it has none). Returns the commit URL.

    ``api`` defaults to ``huggingface_hub.HfApi()``; tests pass a local stand-in.
    """
    files = check_hub_folder(folder)
    folder = Path(folder)
    if "README.md" not in files or license is not None:
        write_model_card(folder, license=license or "other", repo_id=repo_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message,
        ignore_patterns=[".*", "**/.*"],
    )  # fmt: skip
    return str(getattr(info, "commit_url", info))
