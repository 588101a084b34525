"""A quantized decode cache for Yuan 2.0-M32: keys/values in 2-8 bits, the LF-gate conv state in full precision.

Self-contained (ships to the Hub next to the modeling file, which imports it relatively).

transformers' own `QuantizedCache` (`cache_implementation="quantized"`) refuses models whose layers are not all
"full_attention"; every Yuan layer is "hybrid" (K/V plus the LF gate's last two inputs). This cache combines, per
layer, transformers' quantized K/V layer of the chosen backend (quanto or HQQ: KIVI-style, the newest
`residual_length` tokens kept in full precision, older ones quantized per group of `q_group_size`) with its
linear-attention conv-state layer, the same way transformers' own hybrid layers combine a K/V layer and that
conv-state layer.

Use it from `generate` either as the standard option (`YuanM32ForCausalLM.generate` builds it)::

    model.generate(..., cache_implementation="quantized", cache_config={"backend": "quanto", "nbits": 4})

or by passing an instance: `model.generate(..., cache=YuanM32QuantizedCache(model.config, backend="hqq", nbits=8))`
(`past_key_values=` before transformers 5.24).
"""

import functools

from transformers.cache_utils import (
    Cache,
    HQQQuantizedLayer,
    LinearAttentionLayer,
    QuantoQuantizedLayer,
)
from transformers.utils import is_hqq_available, is_optimum_quanto_available

# backend -> (transformers' quantized K/V layer, is the package installed, package to install, bit widths it offers)
QUANTIZED_KV_BACKENDS = {
    "quanto": (QuantoQuantizedLayer, is_optimum_quanto_available, "optimum-quanto", (2, 4)),
    "hqq": (HQQQuantizedLayer, is_hqq_available, "hqq", (1, 2, 3, 4, 8)),
}


@functools.cache  # one class per backend: layers of two caches are of the same type
def _hybrid_quantized_layer(kv_layer_class: type) -> type:
    """A cache layer class holding a quantized K/V layer of `kv_layer_class` and an unquantized conv state."""

    class HybridQuantizedLayer(LinearAttentionLayer, kv_layer_class):
        is_compileable = False  # the K/V part grows (dynamic shapes)
        is_croppable = False  # quantized states cannot be cut back

        def __init__(self, **kv_kwargs):
            kv_layer_class.__init__(self, **kv_kwargs)
            LinearAttentionLayer.__init__(self)

        def lazy_initialization(self, *args, **kwargs) -> None:
            # the K/V part is initialised by `update(keys, values)` (two positional tensors), the conv part by
            # `update_conv_state` (keywords), as in transformers' LinearAttentionAndFullAttentionLayer
            if len(args) == 2 and not kwargs:
                kv_layer_class.lazy_initialization(self, *args)
            else:
                LinearAttentionLayer.lazy_initialization(self, **kwargs)

        def get_seq_length(self) -> int:
            return kv_layer_class.get_seq_length(self)

        def get_max_length(self) -> int:
            return kv_layer_class.get_max_length(self)

        def get_mask_sizes(self, *args, **kwargs):
            return kv_layer_class.get_mask_sizes(self, *args, **kwargs)

        def reset(self) -> None:
            LinearAttentionLayer.reset(self)
            kv_layer_class.reset(self)

        def reorder_cache(self, beam_idx) -> None:
            LinearAttentionLayer.reorder_cache(self, beam_idx)
            kv_layer_class.reorder_cache(self, beam_idx)

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError(
                "A quantized cache cannot be cropped (assisted/speculative decoding needs that): use a DynamicCache"
            )

    HybridQuantizedLayer.__name__ = HybridQuantizedLayer.__qualname__ = f"Hybrid{kv_layer_class.__name__}"
    return HybridQuantizedLayer


class YuanM32QuantizedCache(Cache):
    """Decode cache with K/V quantized through quanto or HQQ (as transformers' `QuantizedCache`) and the LF-gate conv
    state (two hidden vectors per layer and sequence) in the model's precision.

    Args:
        config: the model's `YuanM32Config` (one hybrid layer per decoder layer).
        backend: `"quanto"` (pip install optimum-quanto; 2 or 4 bits) or `"hqq"` (pip install hqq; 1-4 or 8 bits).
        nbits: bits per key/value element.
        axis_key, axis_value: quantization axis as transformers' backends take it (quanto 0 or -1, HQQ 0 or 1).
        q_group_size: elements sharing one scale and zero point.
        residual_length: newest tokens kept unquantized; older ones are quantized whenever this many accumulate.
    """

    def __init__(
        self,
        config,
        backend: str = "quanto",
        nbits: int = 4,
        axis_key: int = 0,
        axis_value: int = 0,
        q_group_size: int = 64,
        residual_length: int = 128,
    ):
        if backend not in QUANTIZED_KV_BACKENDS:
            raise ValueError(f"Unknown quantized cache backend {backend!r}: use one of {sorted(QUANTIZED_KV_BACKENDS)}")
        kv_layer_class, is_available, package, bit_widths = QUANTIZED_KV_BACKENDS[backend]
        if nbits not in bit_widths:
            raise ValueError(f"backend={backend!r} quantizes to {bit_widths} bits, got nbits={nbits}")
        if not is_available():
            raise ImportError(
                f"The quantized cache with backend={backend!r} needs the `{package}` package: pip install {package}"
            )
        layer_types = getattr(config, "layer_types", None)
        if layer_types is None or set(layer_types) != {"hybrid"}:
            raise ValueError(
                "YuanM32QuantizedCache is for models whose layers are all 'hybrid' (Yuan 2.0-M32); for other models "
                f"use transformers' QuantizedCache. Got layer_types={layer_types!r}"
            )
        layer_class = _hybrid_quantized_layer(kv_layer_class)
        kv_kwargs = dict(
            nbits=nbits, axis_key=axis_key, axis_value=axis_value, q_group_size=q_group_size,
            residual_length=residual_length,
        )  # fmt: skip
        super().__init__(layers=[layer_class(**kv_kwargs) for _ in layer_types])
        self.backend, self.nbits = backend, nbits


__all__ = ["YuanM32QuantizedCache"]
