"""The native Yuan 2.0-M32 model. Self-contained: this folder is what ships to the Hub as remote code."""

from .cache_yuan_m32 import YuanM32QuantizedCache
from .configuration_yuan_m32 import YuanM32Config
from .modeling_yuan_m32 import (
    YuanM32ForCausalLM,
    YuanM32ForQuestionAnswering,
    YuanM32ForSequenceClassification,
    YuanM32ForTokenClassification,
    YuanM32Model,
    YuanM32PreTrainedModel,
)

__all__ = [
    "YuanM32Config",
    "YuanM32ForCausalLM",
    "YuanM32ForQuestionAnswering",
    "YuanM32ForSequenceClassification",
    "YuanM32ForTokenClassification",
    "YuanM32Model",
    "YuanM32PreTrainedModel",
    "YuanM32QuantizedCache",
]
