"""The one seam between Yuan 2.0-M32 and the transformers internals that move between 5.x releases.

Self-contained (ships to the Hub next to the modeling file, which imports it relatively). Everything here is
probed from public objects of the installed transformers, never from its version string, so a release that
back-ports or reverts a change is handled by what it actually does.

What moves, and where we read it:
- 5.24 renamed the cache argument `past_key_values` -> `cache`: in model forwards (generate passes `cache=`),
  in the masking functions and in the output dataclasses' field (`outputs.past_key_values` remains a property
  there). `CACHE_FIELD` is the name the installed release uses; forwards accept both names.
"""

import dataclasses
import warnings

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.utils import TransformersKwargs

# The name of the cache in outputs and in the masking functions of the installed transformers.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(MoeModelOutputWithPast)} else "past_key_values"

# Keyword arguments a transformers model forward may receive besides its named parameters: the model-agnostic
# attention/output arguments (`TransformersKwargs`, e.g. packed-sequence metadata from TRL) and `return_dict`.
# Anything else would disappear into `**kwargs` and change nothing, so it is refused (`check_kwargs`).
KNOWN_FORWARD_KWARGS = frozenset(TransformersKwargs.__annotations__) | {"return_dict"}


def resolve_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache passed under either name (`cache` since transformers 5.24, `past_key_values` before)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the cache once: both `cache` and `past_key_values` were given (they are one argument)")
    return past_key_values if cache is None else cache


def cache_capacity(cache: Cache | None) -> int:
    """Tokens a static cache can hold, as a host int (-1 for caches that grow). `Cache.get_max_length()` does not
    tell it for hybrid layers (their conv-state side answers -1 first), so it is read from the layers'
    `max_cache_len`, which every static K/V layer of 5.17 .. 5.25 sets in `__init__`."""
    capacity = -1
    for layer in getattr(cache, "layers", ()):  # a plain loop: torch.compile traces it (not max() of a generator)
        capacity = max(capacity, getattr(layer, "max_cache_len", -1))
    return capacity


def warn_old_cache_name(past_key_values: Cache | None, where: str) -> None:
    """On releases that call the argument `cache` (5.24+), `past_key_values` is deprecated, as for in-tree models
    (their `@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")`, same message); before 5.24 it is the
    name generate itself passes, so nothing is said there."""
    if past_key_values is not None and CACHE_FIELD == "cache":
        warnings.warn(
            f"`past_key_values` is deprecated and will be removed in version 5.40.0 for `{where}`. Use `cache` instead.",
            FutureWarning,
            stacklevel=3,
        )


def cache_kwargs(cache: Cache | None) -> dict:
    """`{name: cache}` under the name the installed release uses for masks and model outputs."""
    return {CACHE_FIELD: cache}


def check_kwargs(kwargs: dict, where: str) -> None:
    """Refuse keyword arguments no code path reads (a misspelt or unsupported argument must not vanish)."""
    unknown = sorted(set(kwargs) - KNOWN_FORWARD_KWARGS)
    if unknown:
        hint = ""
        if "token_type_ids" in unknown:
            hint = " (Yuan has no token type embeddings: tokenize with return_token_type_ids=False)"
        elif {"past_key_value", "cache_params", "layer_past"} & set(unknown):
            hint = " (pass the cache as `cache`, or `past_key_values` on transformers < 5.24)"
        raise TypeError(f"{where}() got unexpected keyword arguments {unknown}{hint}")


def check_cache(cache: object, config, batch_size: int) -> None:
    """A cache built for this model: a transformers `Cache` with one hybrid (K/V + conv state) layer per decoder
    layer and, once filled, states of this config's shapes. Errors name what does not match and what to pass."""
    if not isinstance(cache, Cache):
        raise TypeError(
            "The cache must be a transformers Cache, e.g. DynamicCache(config=model.config) or the `cache` of a "
            f"previous output; legacy tuples are not supported, got {type(cache).__name__}"
        )
    layers = getattr(cache, "layers", None)
    if layers is None:  # an encoder-decoder or other composite cache
        raise TypeError(f"{type(cache).__name__} is not a decoder-only cache; use DynamicCache(config=model.config)")
    num_layers = config.num_hidden_layers
    if len(layers) != num_layers or not all(hasattr(layer, "conv_states") for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers}) or ["no layers"]
        raise ValueError(
            f"The cache has {len(layers)} layers ({', '.join(kinds)}), but this model needs {num_layers} hybrid layers "
            "(keys/values plus the LF-gate conv state): build it with DynamicCache(config=model.config) or "
            "StaticCache(config=model.config, max_cache_len=...), not with another model's config or no config"
        )
    keys = getattr(layers[0], "keys", None)
    if isinstance(keys, torch.Tensor) and keys.ndim == 4 and keys.numel():
        expected = (config.num_key_value_heads, config.head_dim)
        distributed = getattr(config, "distributed_config", None)
        tp_size = getattr(distributed, "tp_size", None) or 1
        if tp_size > 1 and getattr(distributed, "tp_plan", None) != {}:  # tensor parallel: this rank's heads
            expected = (config.num_key_value_heads // tp_size, config.head_dim)
        if tuple(keys.shape[1:2]) + tuple(keys.shape[3:]) != expected:
            raise ValueError(
                f"The cache holds keys of {keys.shape[1]} heads x {keys.shape[3]} dims, but this model has "
                f"{expected[0]} key/value heads x {expected[1]} dims: it was filled by another model"
            )
        if keys.shape[0] != batch_size:
            raise ValueError(
                f"The cache holds {keys.shape[0]} sequences but the input has {batch_size} rows; continue a cache "
                "with the same batch (or reorder/select it with the cache's own methods)"
            )
    conv = getattr(layers[0], "conv_states", None)
    conv = conv.get(0) if isinstance(conv, dict) else conv  # {state index: [b, H, time]}
    if isinstance(conv, torch.Tensor) and conv.ndim == 3 and conv.numel() and conv.shape[1] != config.hidden_size:
        raise ValueError(
            f"The cache's LF-gate state has {conv.shape[1]} channels, but this model's hidden_size is "
            f"{config.hidden_size}: it was filled by another model"
        )
