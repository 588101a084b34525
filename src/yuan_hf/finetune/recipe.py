"""Fine-tuning recipes: YAML files with fixed sections, validated in one place.

```yaml
method: qlora            # lora | qlora | full
seed: 42
model: {path: ..., tokenizer: null, dtype: bfloat16, attn_implementation: sdpa, loss_chunk_size: null}
quantization: {bits: 4, quant_type: nf4, double_quant: true, compute_dtype: bfloat16, quant_storage: null}
lora: {preset: all, r: 16, alpha: null, dropout: 0.05, extra_target_modules: []}
context: {target_length: 16384, method: ntk, original_length: null}
data: {train_file: ..., eval_file: null, format: auto, max_length: 16384, packing: true,
       overlong: truncate, on_malformed: raise, probe_rows: 8}
moe: {router: frozen, router_aux_loss_coef: 0.0, expert_lr_scale: 1.0}
train: {...}             # any transformers.TrainingArguments field
```

Unknown sections or keys are errors that name them; `key.sub=value` overrides (values parsed as YAML) apply on top.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .context import CONTEXT_METHODS
from .data import MALFORMED_POLICIES, OVERLONG_POLICIES, RECORD_FORMATS
from .lora import LORA_PRESETS, ROUTER_MODES
from .quantization import QUANT_BITS, QUANT_TYPES

METHODS: tuple[str, ...] = ("lora", "qlora", "full")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: `1e-4` is a float (YAML 1.1 reads a string) and only true/false are booleans
    (YAML 1.1 turns `save_strategy: no` into False)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.nan)$"
    ),
    list("-+0123456789."),
)


def _yaml(text: str, *, where: str) -> Any:
    """Parse YAML (plain data only); a YAML error becomes a one-line `RecipeError` naming `where` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: plain data only
    except yaml.YAMLError as error:
        raise _yaml_error(error, where) from None


def _yaml_error(error: yaml.YAMLError, where: str) -> RecipeError:
    mark = getattr(error, "problem_mark", None)
    at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = " ".join(str(getattr(error, "problem", None) or error).split())
    if isinstance(error, yaml.constructor.ConstructorError) and "tag" in problem:
        tag = problem.rsplit("tag:yaml.org,2002:", 1)[-1].rstrip("'")
        return RecipeError(
            f"{where}{at}: YAML tag !!{tag} is not allowed; a recipe is plain data (mappings, lists, strings, "
            "numbers, true/false, null): remove the tag"
        )
    return RecipeError(f"{where}{at}: not valid YAML ({problem}); check the indentation, quotes and brackets there")


class RecipeError(ValueError):
    """A recipe that cannot run as written; the message names the key."""


@dataclass
class ModelSection:
    path: str = ""  # folder or Hub id of a native yuan_m32 checkpoint (required)
    tokenizer: str | None = None  # defaults to `path`
    revision: str | None = None
    dtype: str = "bfloat16"  # weights of lora / full (qlora: see quantization.compute_dtype)
    attn_implementation: str = "sdpa"
    loss_chunk_size: int | None = None  # override config.loss_chunk_size (0 = standard full-logits loss)


@dataclass
class QuantizationSection:
    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str | None = None


@dataclass
class LoraSection:
    preset: str = "all"
    r: int = 16
    alpha: float | None = None
    dropout: float = 0.05
    extra_target_modules: list[str] = field(default_factory=list)


@dataclass
class ContextSection:
    target_length: int | None = None  # null: keep the checkpoint's RoPE settings
    method: str = "ntk"
    original_length: int | None = None


@dataclass
class DataSection:
    train_file: str = ""  # required
    eval_file: str | None = None
    format: str = "auto"
    max_length: int = 4096
    packing: bool = True
    overlong: str = "truncate"
    on_malformed: str = "raise"
    probe_rows: int = 8  # rows scored before and after training for the loss-before/after report


@dataclass
class MoESection:
    router: str = "frozen"  # frozen | lora (LoRA methods) | full
    router_aux_loss_coef: float = 0.0
    expert_lr_scale: float | str = 1.0  # "auto" = sqrt(top_k / num_experts)


@dataclass
class Recipe:
    method: str = "lora"
    seed: int = 42
    model: ModelSection = field(default_factory=ModelSection)
    quantization: QuantizationSection = field(default_factory=QuantizationSection)
    lora: LoraSection = field(default_factory=LoraSection)
    context: ContextSection = field(default_factory=ContextSection)
    data: DataSection = field(default_factory=DataSection)
    moe: MoESection = field(default_factory=MoESection)
    train: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check every field; errors name the recipe key, the value and what is allowed."""

        def choice(key: str, value: Any, allowed: tuple) -> None:
            if value not in allowed:
                raise RecipeError(f"recipe key {key}: {value!r} is not one of {allowed}")

        def positive_int(key: str, value: Any, *, optional: bool = False) -> None:
            if optional and value is None:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise RecipeError(f"recipe key {key}: expected a positive integer, got {value!r}")

        def boolean(key: str, value: Any) -> None:
            if not isinstance(value, bool):
                raise RecipeError(f"recipe key {key}: expected true or false, got {value!r}")

        choice("method", self.method, METHODS)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise RecipeError(f"recipe key seed: expected an integer >= 0, got {self.seed!r}")
        boolean("data.packing", self.data.packing)
        boolean("quantization.double_quant", self.quantization.double_quant)
        if not self.model.path:
            raise RecipeError("recipe key model.path is required (a native yuan_m32 folder or Hub id)")
        if not self.data.train_file:
            raise RecipeError("recipe key data.train_file is required (a JSONL file)")
        if self.model.loss_chunk_size is not None and (
            not isinstance(self.model.loss_chunk_size, int) or self.model.loss_chunk_size < 0
        ):
            raise RecipeError(
                f"recipe key model.loss_chunk_size: expected an integer >= 0, got {self.model.loss_chunk_size!r}"
            )
        choice("quantization.bits", self.quantization.bits, QUANT_BITS)
        choice("quantization.quant_type", self.quantization.quant_type, QUANT_TYPES)
        choice("lora.preset", self.lora.preset, tuple(LORA_PRESETS))
        positive_int("lora.r", self.lora.r)
        if not 0 <= self.lora.dropout < 1:
            raise RecipeError(f"recipe key lora.dropout: expected a number in [0, 1), got {self.lora.dropout!r}")
        positive_int("context.target_length", self.context.target_length, optional=True)
        positive_int("context.original_length", self.context.original_length, optional=True)
        choice("context.method", self.context.method, CONTEXT_METHODS)
        choice("data.format", self.data.format, RECORD_FORMATS)
        choice("data.overlong", self.data.overlong, OVERLONG_POLICIES)
        choice("data.on_malformed", self.data.on_malformed, MALFORMED_POLICIES)
        positive_int("data.max_length", self.data.max_length)
        positive_int("data.probe_rows", self.data.probe_rows)
        choice("moe.router", self.moe.router, ROUTER_MODES)
        if self.method == "full" and self.moe.router == "lora":
            raise RecipeError("recipe key moe.router: 'lora' needs method lora or qlora; use 'frozen' or 'full'")
        coef = self.moe.router_aux_loss_coef
        if not isinstance(coef, (int, float)) or isinstance(coef, bool) or coef < 0:
            raise RecipeError(f"recipe key moe.router_aux_loss_coef: expected a number >= 0, got {coef!r}")
        scale = self.moe.expert_lr_scale
        if scale != "auto" and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0):
            raise RecipeError(f"recipe key moe.expert_lr_scale: expected a positive number or 'auto', got {scale!r}")
        self._validate_train()

    def _validate_train(self) -> None:
        from transformers import TrainingArguments

        from .checkpointing import NEW, OLD, checkpointing_under_installed_names

        try:
            train = checkpointing_under_installed_names(self.train, "recipe section train")
        except ValueError as err:
            raise RecipeError(str(err)) from None
        allowed = {f.name for f in dataclasses.fields(TrainingArguments) if f.init} | set(OLD) | set(NEW)
        unknown = sorted(set(self.train) - allowed)
        if unknown:
            raise RecipeError(
                f"recipe section train: unknown key(s) {unknown}; it takes transformers.TrainingArguments fields "
                "(e.g. output_dir, learning_rate, max_steps, per_device_train_batch_size, gradient_checkpointing)"
            )
        defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
        for key, value in train.items():
            default = defaults[key]
            if isinstance(default, bool) and not isinstance(value, bool):
                raise RecipeError(f"recipe key train.{key}: expected true or false, got {value!r}")
            if isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, (str, bool)):
                raise RecipeError(f"recipe key train.{key}: expected a number, got {value!r}")
        if "output_dir" not in self.train:
            raise RecipeError("recipe key train.output_dir is required")
        resume = self.train.get("resume_from_checkpoint")
        if not (resume is None or isinstance(resume, bool) or (isinstance(resume, str) and resume)):
            raise RecipeError(
                "recipe key train.resume_from_checkpoint: expected true (the newest complete checkpoint in "
                f"train.output_dir), false, or a checkpoint folder, got {resume!r}"
            )


_SECTIONS = {
    "model": ModelSection,
    "quantization": QuantizationSection,
    "lora": LoraSection,
    "context": ContextSection,
    "data": DataSection,
    "moe": MoESection,
}
_SCALARS = ("method", "seed")


def recipe_from_dict(values: dict[str, Any], *, source: str = "<dict>") -> Recipe:
    """Build and validate a `Recipe`; unknown sections and keys are errors naming them."""
    if not isinstance(values, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - set(_SECTIONS) - set(_SCALARS) - {"train"})
    if unknown:
        raise RecipeError(
            f"{source}: unknown top-level key(s) {unknown}; allowed: {sorted([*_SCALARS, *_SECTIONS, 'train'])}"
        )
    kwargs: dict[str, Any] = {key: values[key] for key in _SCALARS if key in values}
    for name, cls in _SECTIONS.items():
        section = values.get(name) or {}
        if not isinstance(section, dict):
            raise RecipeError(f"{source}: section {name} must be a mapping, got {section!r}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(section) - allowed)
        if bad:
            raise RecipeError(
                f"{source}: unknown key(s) {[f'{name}.{k}' for k in bad]}; section {name} takes {sorted(allowed)}"
            )
        kwargs[name] = cls(**section)
    train = values.get("train") or {}
    if not isinstance(train, dict):
        raise RecipeError(f"{source}: section train must be a mapping, got {train!r}")
    kwargs["train"] = dict(train)
    recipe = Recipe(**kwargs)
    recipe.validate()
    return recipe


def apply_overrides(values: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `section.key=value` strings (value parsed as YAML: `1e-4`, `true`, `[a, b]`, `null`) in place."""
    for item in overrides or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r}: expected section.key=value (e.g. train.max_steps=100)")
        value = _yaml(raw, where=f"override {item!r}") if raw else ""
        parts = key.split(".")
        target = values
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise RecipeError(f"override {item!r}: {part} is not a section")
        target[parts[-1]] = value
    return values


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply overrides, validate. Relative `data.*_file` paths stay relative to the CWD."""
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file not found: {path}")
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte-order mark (some Windows editors write one) is not data
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise RecipeError(
            f"{path} line {line}: not UTF-8 text (byte 0x{raw[error.start]:02x}); save the recipe as UTF-8"
        ) from None
    values = _yaml(text, where=str(path)) or {}
    return recipe_from_dict(apply_overrides(values, overrides), source=str(path))


__all__ = ["METHODS", "Recipe", "RecipeError", "apply_overrides", "load_recipe", "recipe_from_dict"]
