"""Registration of the native model with transformers' Auto classes (idempotent)."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .modeling import YuanM32Config, YuanM32ForCausalLM, YuanM32Model


def register() -> None:
    """Register ``yuan_m32`` with AutoConfig / AutoModel / AutoModelForCausalLM.

    Safe to call more than once, and when transformers already knows ``yuan_m32`` (a future native
    integration, or another copy of these classes): then the existing registration is kept.
    """
    from .conversion.cache import convert_on_the_fly
    from .modeling import YuanM32PreTrainedModel

    if convert_on_the_fly not in YuanM32PreTrainedModel._source_adapters:
        YuanM32PreTrainedModel._source_adapters.append(convert_on_the_fly)
    if YuanM32Config.model_type in CONFIG_MAPPING:
        return
    AutoConfig.register(YuanM32Config.model_type, YuanM32Config)
    AutoModel.register(YuanM32Config, YuanM32Model)
    AutoModelForCausalLM.register(YuanM32Config, YuanM32ForCausalLM)
    # saved folders carry auto_map and the modeling files, so they load with trust_remote_code alone
    YuanM32Config.register_for_auto_class()
    YuanM32Model.register_for_auto_class("AutoModel")
    YuanM32ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
