"""Hub-ready folders: model card, folder checks, the upload allow-list and the upload itself.

``yuan-hf push`` sends only what loading needs (an allow-list, never "everything in the folder"):
credentials, training data, optimizer states and other stray files stay on disk. Before anything is
sent it proves that the weights cover the model ``config.json`` describes (safetensors headers
against the model built on the ``meta`` device), refuses links that leave the folder, and never
modifies the folder: the model card is rendered in memory and committed as bytes.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .conversion.common import ConversionError, read_weight_index
from .parameters import count_parameters

REMOTE_CODE_FILES = ("configuration_yuan_m32.py", "modeling_yuan_m32.py")
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
PROVENANCE_FILE = "conversion.json"
CARD_FILE = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header larger than this is not a header
DEFAULT_COMMIT_MESSAGE = "Upload Yuan 2.0-M32 (yuan_m32 native layout)"


class HubError(ValueError):
    """A folder cannot be pushed as it is, or the upload failed; the message says what to do."""


CARD_TEMPLATE = """---
license: {license}
{license_details}{base_model}language:
- zh
- en
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

ADAPTER_CARD_TEMPLATE = """---
license: {license}
library_name: peft
tags:
- yuan
- yuan2
- moe
- lora
---

# {title}

A {peft_type} adapter for IEIT's **Yuan 2.0-M32** (native `yuan_m32` layout), trained with
[yuan-hf](https://github.com/yuan-hf/yuan-hf). Base model: `{base}`.

```python
import torch, yuan_hf  # registers model_type "yuan_m32"
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base}", dtype=torch.bfloat16, device_map="auto")
model = PeftModel.from_pretrained(base, "{repo}")
```
"""


# ----------------------------------------------------------------------------------------------
# Reading the folder: JSON, safetensors headers, links


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a one-line :class:`HubError` naming the file and the problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HubError(f"{path} is not valid JSON ({err}); fix or re-save it (save_pretrained writes it)") from err
    if not isinstance(data, dict):
        raise HubError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header; reads the header only, never the data."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
            raise HubError(f"{path} is not a safetensors file (header length {length}, file size {size} bytes)")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
        return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise HubError(f"{path} has an unreadable safetensors header ({err}); re-save the weights") from err


def _inside(folder: Path, name: str) -> Path:
    """``folder/name`` resolved, after checking that it (or the link it is) stays inside ``folder``.

    ``folder`` is already resolved. Links that stay inside are followed; a link that leaves the folder
    is refused, because push never uploads anything from outside the folder it was given.
    """
    path = folder / name
    target = _resolve(path)
    if target is None:
        raise HubError(f"{path} is a link that cannot be resolved (a loop?); replace it with the file it stands for")
    if not target.is_relative_to(folder):
        shown = os.readlink(path) if path.is_symlink() else target
        raise HubError(
            f"{path} leads outside {folder} (to {shown}); push never follows links out of the folder. "
            "Replace the link with a copy of the file (e.g. `cp -rL` the folder) and retry"
        )
    return target


def _resolve(path: Path) -> Path | None:
    """``path.resolve()``, or ``None`` for a symlink loop (OSError from Python 3.13, RuntimeError before)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return None


def _plain_name(name: object, *, where: Path) -> str:
    """Refuse weight-index entries that are not plain file names inside the folder."""
    if not isinstance(name, str) or not name or name != Path(name).name or name in (".", ".."):
        raise HubError(
            f"{where} names {name!r}, which is not a file of {where.parent} (no folders, no '..'); "
            "an index may only name shards saved next to it: re-save the model"
        )
    return name


# ----------------------------------------------------------------------------------------------
# The plan: which files, why the rest is skipped


@dataclass(frozen=True)
class UploadFile:
    """One file of an upload: either a file inside the folder or bytes made in memory (the card)."""

    path_in_repo: str
    size: int
    source: Path | None = None
    content: bytes | None = None
    note: str = ""

    @property
    def payload(self) -> bytes | str:
        """What ``CommitOperationAdd`` sends: the in-memory bytes, or the resolved path inside the folder."""
        return self.content if self.content is not None else str(self.source)


@dataclass
class PushPlan:
    """What ``push`` would send from ``folder`` (``kind`` is ``"model"`` or ``"adapter"``)."""

    folder: Path
    kind: str
    files: list[UploadFile]
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [f.path_in_repo for f in self.files]

    def describe(self) -> str:
        width = max(len(name) for name in self.names)
        lines = [f"{len(self.files)} file(s) to upload from {self.folder} ({self.kind} folder):"]
        for f in self.files:
            lines.append(f"  {f.path_in_repo:<{width}}  {_human(f.size):>10}" + (f"  ({f.note})" if f.note else ""))
        lines.append(f"  total {_human(sum(f.size for f in self.files))}")
        if self.skipped:
            lines.append(f"not uploaded ({len(self.skipped)}): " + ", ".join(self.skipped))
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _human(size: int) -> str:
    """Bytes as ``812 B`` / ``3.4 kB`` / ``80.1 GB`` (decimal units, as the Hub shows them)."""
    if size < 1000:
        return f"{size} B"
    scaled, unit = next((size / 10**p, u) for p, u in ((9, "GB"), (6, "MB"), (3, "kB")) if size >= 10**p)
    return f"{scaled:.1f} {unit}"


def _file(folder: Path, name: str, note: str = "") -> UploadFile:
    source = _inside(folder, name)
    if not source.is_file():
        raise HubError(f"{folder / name} is not a regular file")
    return UploadFile(name, source.stat().st_size, source=source, note=note)


def _optional(folder: Path, names: tuple[str, ...]) -> list[UploadFile]:
    return [_file(folder, name) for name in names if (folder / name).exists() or (folder / name).is_symlink()]


def _skipped(folder: Path, uploaded: set[str], weights_named: set[str]) -> list[str]:
    """Every top-level entry not uploaded, with the reason (folders are not listed inside)."""
    out = []
    for entry in sorted(folder.iterdir()):
        if entry.name in uploaded:
            continue
        target = _resolve(entry)
        if target is None or (entry.is_symlink() and not target.is_relative_to(folder)):
            out.append(f"{entry.name} (link to {os.readlink(entry)}, outside the folder or a loop)")
        elif entry.is_dir():
            out.append(f"{entry.name}/ (folder)")
        elif entry.suffix == ".safetensors" and weights_named:
            out.append(f"{entry.name} (not named by the weight index)")
        elif entry.name in PICKLE_WEIGHTS or entry.suffix in (".bin", ".pt", ".pth", ".pkl"):
            out.append(f"{entry.name} (pickle)")
        else:
            out.append(f"{entry.name} (not needed to load the model)")
    return out


# ----------------------------------------------------------------------------------------------
# Model folders: weights, completeness, remote code


def _weight_names(folder: Path) -> list[str]:
    """The safetensors files loading reads: ``model.safetensors`` or the shards its index names."""
    single, index = folder / SINGLE_WEIGHTS, folder / WEIGHTS_INDEX
    if single.exists() and index.exists():
        raise HubError(
            f"{folder} holds both {SINGLE_WEIGHTS} and {WEIGHTS_INDEX}; one is stale. Remove it (or re-save the "
            "model into an empty folder) and retry"
        )
    if index.exists():
        weight_map = _read_json(_inside(folder, WEIGHTS_INDEX)).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HubError(f"{index} has no weight_map (tensor name -> shard file); re-save the model")
        names = sorted({_plain_name(name, where=index) for name in weight_map.values()})  # before any file is opened
        try:
            read_weight_index(index)  # the converters' check: a weight_map whose files all exist
        except ConversionError as err:
            raise HubError(str(err)) from err
        return names
    if single.exists():
        return [SINGLE_WEIGHTS]
    pickled = [name for name in PICKLE_WEIGHTS if (folder / name).exists()]
    raise HubError(
        f"{folder} holds no {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}"
        + (f" (found pickle weights {pickled}, which push does not upload)" if pickled else "")
        + "; save the model with save_pretrained (safetensors) or convert it with `yuan-hf convert`"
    )


def _headers(folder: Path, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over all weight files, checked against the index when there is one."""
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    for name in names:
        for key, shape in read_safetensors_header(_inside(folder, name)).items():
            if key in where:
                raise HubError(f"tensor {key!r} is stored twice, in {where[key]} and {name}; re-save the model")
            shapes[key], where[key] = shape, name
    if (folder / WEIGHTS_INDEX).exists():
        weight_map = read_weight_index(folder / WEIGHTS_INDEX)
        wrong = sorted(k for k in set(weight_map) | set(where) if weight_map.get(k) != where.get(k))
        if wrong:
            shown = ", ".join(f"{k} (index: {weight_map.get(k)}, stored in: {where.get(k)})" for k in wrong[:5])
            raise HubError(f"{folder / WEIGHTS_INDEX} does not match its shards: {shown}; re-save the model")
    return shapes


def check_weights_match_config(config: Mapping, shapes: Mapping[str, tuple[int, ...]], *, folder: Path) -> list[str]:
    """Raise unless the stored tensors are exactly those of the model ``config`` describes.

    The model is built on the ``meta`` device (no memory, no data) and its ``state_dict`` names and
    shapes are compared with the safetensors headers. A tied ``lm_head`` may be absent. Quantized
    folders store packed shapes and extra statistics, so only names are checked there (returned note).
    """
    import torch

    from .modeling import YuanM32Config, YuanM32ForCausalLM

    try:
        model_config = YuanM32Config.from_dict(dict(config))
    except (ValueError, TypeError, KeyError) as err:
        raise HubError(f"{folder / 'config.json'} does not describe a valid yuan_m32 model: {err}") from err
    with torch.device("meta"):
        model = YuanM32ForCausalLM(model_config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    optional = set(YuanM32ForCausalLM._tied_weights_keys) if model_config.tie_word_embeddings else set()
    quantized = "quantization_config" in config
    missing = sorted(set(expected) - set(shapes) - optional)
    extra = [] if quantized else sorted(set(shapes) - set(expected))
    misshaped = [] if quantized else sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])
    if missing or extra or misshaped:
        problems = [
            _listed("missing", missing, lambda k: k),
            _listed("unexpected", extra, lambda k: k),
            _listed("wrong shape", misshaped, lambda k: f"{k} {list(shapes[k])} (config implies {list(expected[k])})"),
        ]
        raise HubError(
            f"the weights in {folder} do not match the model its config.json describes: "
            + "; ".join(p for p in problems if p)
            + ". Loading would leave tensors randomly initialised or fail; re-save or reconvert the model"
        )
    return ["quantized weights: tensor names checked, shapes not (they are packed)"] if quantized else []


def _listed(what: str, keys: list[str], show: Callable[[str], str]) -> str:
    """``"2 missing: a, b"`` (at most six shown), or ``""`` when there are none."""
    if not keys:
        return ""
    return f"{len(keys)} {what}: " + ", ".join(show(k) for k in keys[:6]) + (" ..." if len(keys) > 6 else "")


def _remote_code(folder: Path, config: Mapping) -> list[str]:
    """The ``.py`` files ``trust_remote_code`` loading needs: ``auto_map``'s modules and what they import."""
    from transformers.dynamic_module_utils import get_relative_imports

    auto_map = config.get("auto_map") or {}
    missing_code = [name for name in REMOTE_CODE_FILES if not (folder / name).exists()]
    if missing_code or "AutoModelForCausalLM" not in auto_map:
        raise HubError(
            f"{folder} cannot load with trust_remote_code (missing {missing_code or 'auto_map'}); re-save it with "
            "`import yuan_hf` active (save_pretrained then copies the modeling files)"
        )
    refs = [ref for value in auto_map.values() for ref in (value if isinstance(value, list) else [value]) if ref]
    queue = sorted({ref.rsplit(".", 1)[0] + ".py" for ref in refs if "--" not in ref})  # "repo--mod.Class": elsewhere
    files: set[str] = set()
    while queue:
        module = queue.pop()
        if module in files:
            continue
        if not (folder / module).exists():
            raise HubError(f"{folder} lacks {module}, which trust_remote_code loading needs; re-save the model")
        files.add(module)
        queue += [f"{name}.py" for name in get_relative_imports(_inside(folder, module))]
    return sorted(files)


def _plan_model(folder: Path) -> tuple[list[UploadFile], list[str], set[str]]:
    config = _read_json(_inside(folder, "config.json"))
    if config.get("model_type") != "yuan_m32":
        raise HubError(
            f"{folder / 'config.json'} has model_type={config.get('model_type')!r}, expected 'yuan_m32'; convert "
            "IEIT folders with `yuan-hf convert ieit-hf` first"
        )
    weights = _weight_names(folder)
    code = _remote_code(folder, config)
    notes = check_weights_match_config(config, _headers(folder, weights), folder=folder)
    files = _optional(folder, CONFIG_FILES)
    if (folder / WEIGHTS_INDEX).exists():
        files.append(_file(folder, WEIGHTS_INDEX))
    files += [_file(folder, name) for name in weights] + [_file(folder, name, "remote code") for name in code]
    files += _optional(folder, TOKENIZER_FILES) + _optional(folder, (PROVENANCE_FILE,))
    if not any(f.path_in_repo in TOKENIZER_FILES for f in files):
        notes.append("no tokenizer files: users will need the tokenizer from elsewhere")
    return files, notes, set(weights)


# ----------------------------------------------------------------------------------------------
# Adapter folders (PEFT): what a fine-tuned LoRA/QLoRA result needs


def _plan_adapter(folder: Path) -> tuple[list[UploadFile], list[str], set[str]]:
    """adapter_config.json + adapter_model.safetensors (+ tokenizer files and card) are all PEFT loads.

    Checkpoints, optimizer states and ``training_args.bin`` (a pickle that may hold a ``hub_token``)
    are never sent.
    """
    adapter_config = _read_json(_inside(folder, ADAPTER_CONFIG))
    if "peft_type" not in adapter_config:
        raise HubError(f"{folder / ADAPTER_CONFIG} has no peft_type; is it a PEFT adapter? re-save it with PEFT")
    if not (folder / ADAPTER_WEIGHTS).exists():
        pickled = (folder / "adapter_model.bin").exists()
        found = " (found adapter_model.bin, a pickle push does not upload)" if pickled else ""
        raise HubError(f"{folder} has no {ADAPTER_WEIGHTS}{found}; save the adapter with safe_serialization=True")
    if not read_safetensors_header(_inside(folder, ADAPTER_WEIGHTS)):
        raise HubError(f"{folder / ADAPTER_WEIGHTS} holds no tensors; the adapter was not saved")
    notes = []
    base = adapter_config.get("base_model_name_or_path")
    if not base or os.path.isabs(base) or Path(base).exists():
        notes.append(
            f"{ADAPTER_CONFIG}'s base_model_name_or_path is {base!r}, which Hub users cannot resolve; set it to the "
            "base model's Hub id"
        )
    files = [_file(folder, ADAPTER_CONFIG), _file(folder, ADAPTER_WEIGHTS)] + _optional(folder, TOKENIZER_FILES)
    return files, notes, set()


# ----------------------------------------------------------------------------------------------
# Model card: generated, or the user's own with only the license field changed


# IEIT's repository of each source layout (the card's `base_model`), and its model license (`license: other`).
BASE_MODELS = {"ieit_hf": "IEIT-Yuan/Yuan2-M32-hf", "megatron": "IEIT-Yuan/Yuan2-M32"}
YUAN_LICENSE = "license_name: yuan2-license\nlicense_link: https://github.com/IEIT-Yuan/Yuan-2.0/blob/main/LICENSE-Yuan\n"


def render_model_card(
    folder: str | os.PathLike,
    *,
    provenance: Mapping[str, object] | None = None,
    license: str = "other",
    repo_id: str | None = None,
) -> str:
    """The model card (``README.md`` text) for a native folder, from its config, weights and provenance."""
    folder = Path(folder).resolve()
    config = _read_json(folder / "config.json")
    if provenance is None and (folder / PROVENANCE_FILE).is_file():
        provenance = _read_json(_inside(folder, PROVENANCE_FILE))
    provenance = dict(provenance or {"source_format": "unknown"})
    shapes = _headers(folder, _weight_names(folder))
    counts = count_parameters(
        ((name, math.prod(shape)) for name, shape in shapes.items()), top_k=config.get("num_experts_per_tok") or 1
    )
    base_model = BASE_MODELS.get(str(provenance.get("source_format")))
    return CARD_TEMPLATE.format(
        license=license,
        license_details=YUAN_LICENSE if license == "other" else "",
        base_model=f"base_model: {base_model}\n" if base_model else "",
        title=repo_id.split("/")[-1] if repo_id else folder.name,
        params=counts.describe(),
        experts=config.get("num_experts"),
        topk=config.get("num_experts_per_tok"),
        repo=repo_id or str(folder),
        provenance_rows="\n".join(f"| {key} | {value} |" for key, value in provenance.items()),
        rope_theta=(config.get("rope_parameters") or {}).get("rope_theta", float("nan")),
    )


def write_model_card(
    folder: str | os.PathLike,
    *,
    provenance: Mapping[str, object] | None = None,
    license: str = "other",
    repo_id: str | None = None,
) -> Path:
    """Write ``README.md`` (a model card) into a native folder; returns its path. ``push`` never calls this."""
    path = Path(folder) / CARD_FILE
    path.write_text(render_model_card(folder, provenance=provenance, license=license, repo_id=repo_id))
    return path


def _render_adapter_card(folder: Path, *, license: str, repo_id: str | None) -> str:
    adapter_config = _read_json(folder / ADAPTER_CONFIG)
    return ADAPTER_CARD_TEMPLATE.format(
        license=license,
        title=repo_id.split("/")[-1] if repo_id else folder.name,
        peft_type=adapter_config.get("peft_type", "PEFT"),
        base=adapter_config.get("base_model_name_or_path") or "BASE_MODEL",
        repo=repo_id or str(folder),
    )


FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*$", flags=re.DOTALL | re.MULTILINE)


def set_card_license(card: str, license: str) -> str:
    """``card`` with its YAML front matter's ``license`` set to ``license``; every other byte is kept.

    A card without front matter gets one holding only the license. A ``license`` value that is not a
    one-line scalar is refused rather than rewritten, so a user's card is never mangled.
    """
    match = FRONT_MATTER.match(card)
    if match is None:
        return f"---\nlicense: {license}\n---\n\n{card}"
    body = match.group(1)
    found = re.search(r"^license:([^\n]*)$", body, flags=re.MULTILINE)
    if found and not found.group(1).split("#")[0].strip():
        raise HubError(
            "README.md's front matter has a license entry that is not a one-line value; edit its license field by "
            "hand, or push without --license"
        )
    if found:
        new_body = body[: found.start()] + f"license: {license}" + body[found.end() :]
    else:
        new_body = f"license: {license}\n{body}"
    try:
        parsed = yaml.safe_load(new_body)
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())
        raise HubError(
            f"README.md's YAML front matter does not parse ({reason}); fix it or push without --license"
        ) from err
    if not isinstance(parsed, dict) or parsed.get("license") != license:
        raise HubError(f"could not set license: {license} in README.md's front matter; edit it by hand")
    return card[: match.start(1)] + new_body + card[match.end(1) :]


def _card(folder: Path, kind: str, *, license: str | None, repo_id: str | None) -> UploadFile:
    """The README.md to upload, made in memory: the user's card is kept (only --license edits it)."""
    if (folder / CARD_FILE).exists() or (folder / CARD_FILE).is_symlink():
        source = _inside(folder, CARD_FILE)
        if license is None:
            return _file(folder, CARD_FILE)
        text = set_card_license(source.read_text(encoding="utf-8"), license).encode()
        note = f"your card with license: {license}; the file on disk is unchanged"
    else:
        render = render_model_card if kind == "model" else _render_adapter_card
        text = render(folder, license=license or "other", repo_id=repo_id).encode()
        note = "generated card, not written to the folder"
    return UploadFile(CARD_FILE, len(text), content=text, note=note)


# ----------------------------------------------------------------------------------------------
# Entry points


def plan_push(folder: str | os.PathLike, *, repo_id: str | None = None, license: str | None = None) -> PushPlan:
    """Check ``folder`` and list exactly what a push would upload; reads headers only, writes nothing."""
    given = Path(folder)
    if not given.is_dir():
        raise HubError(f"{given} is not a directory")
    root = given.resolve()
    has_weights = (root / SINGLE_WEIGHTS).exists() or (root / WEIGHTS_INDEX).exists()
    has_model = (root / "config.json").exists() and has_weights
    if (root / ADAPTER_CONFIG).exists() and has_model:
        raise HubError(f"{given} holds both a full model and a PEFT adapter; push them from separate folders")
    if (root / ADAPTER_CONFIG).exists():
        kind, (files, notes, weights) = "adapter", _plan_adapter(root)
    elif (root / "config.json").exists() or (root / "config.json").is_symlink():
        kind, (files, notes, weights) = "model", _plan_model(root)
    else:
        raise HubError(
            f"{given} has no config.json (model) or {ADAPTER_CONFIG} (adapter); save the model with save_pretrained "
            "first"
        )
    files.append(_card(root, kind, license=license, repo_id=repo_id))
    skipped = _skipped(root, {f.path_in_repo for f in files}, weights)
    return PushPlan(folder=root, kind=kind, files=files, skipped=skipped, notes=notes)


def check_hub_folder(folder: str | os.PathLike) -> list[str]:
    """Raise unless ``folder`` is complete; return the names an upload would send (a card is always added)."""
    return sorted(plan_push(folder).names)


def _hub_errors() -> tuple[type[Exception], ...]:
    """What a failed Hub call raises: ``OSError`` (HTTP status, missing token, offline mode), ``ValueError``
    (invalid repo id) and the HTTP client's transport errors (httpx2 under huggingface_hub 2, httpx under 1)."""
    errors: list[type[Exception]] = [OSError, ValueError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except ImportError:
            continue
    return tuple(errors)


def upload(
    plan: PushPlan, repo_id: str, *, private: bool = False, commit_message: str = DEFAULT_COMMIT_MESSAGE, api=None
) -> str:
    """Create ``repo_id`` if needed and commit exactly ``plan.files`` in one commit; returns the commit URL.

    ``api`` defaults to ``huggingface_hub.HfApi()``. Nothing is written to the folder, so a failed
    upload leaves it as it was; the failure is one :class:`HubError` line.
    """
    from huggingface_hub import CommitOperationAdd

    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=f.payload) for f in plan.files]
        info = api.create_commit(
            repo_id=repo_id, repo_type="model", operations=operations, commit_message=commit_message
        )
    except _hub_errors() as err:
        reason = (str(err).strip().splitlines() or [""])[0]
        raise HubError(
            f"upload of {plan.folder} to {repo_id} failed ({type(err).__name__}: {reason}); {plan.folder} was not "
            "changed. Check the network, your token (`hf auth login`) and the repo id, then retry"
        ) from err
    return str(getattr(info, "commit_url", info))


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    license: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    dry_run: bool = False,
    api=None,
) -> str:
    """Check ``folder``, then upload its allow-listed files (``dry_run``: only describe them).

    Returns the commit URL, or the plan's description for a dry run. ``api`` defaults to
    ``huggingface_hub.HfApi()``; tests pass a stand-in.
    """
    plan = plan_push(folder, repo_id=repo_id, license=license)
    if dry_run:
        return plan.describe()
    return upload(plan, repo_id, private=private, commit_message=commit_message, api=api)
