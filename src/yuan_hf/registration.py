"""Registration of the native model with transformers' Auto classes (idempotent).

Besides ``yuan_m32`` itself, IEIT's original layout (config ``model_type: "yuan"``) is recognised so that
``AutoModelForCausalLM.from_pretrained(ieit_folder)`` converts it on the fly (``conversion/cache.py``) instead of
asking for ``trust_remote_code`` and running IEIT's code, which needs transformers <= 4.41.
"""

from __future__ import annotations

import transformers
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .modeling import YuanM32Config, modeling_yuan_m32

# Auto class -> native class, from the table that also names them in auto_map
AUTO_CLASSES = {getattr(transformers, auto): getattr(modeling_yuan_m32, name) for auto, name in modeling_yuan_m32.AUTO_CLASSES.items()}


class IEITYuanConfig(PretrainedConfig):
    """IEIT's original config (``model_type: "yuan"``), known only so that Auto classes pick the converting loaders
    below instead of IEIT's remote code. Its fields are kept as read; the converter translates them."""

    model_type = "yuan"


def _converting_loader(native: type) -> type:
    """A stand-in model class for ``IEITYuanConfig``: its ``from_pretrained`` loads the folder with ``native``,
    whose source adapter converts IEIT's layout once into the cache (the IEIT config object is dropped)."""

    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        return native.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    return type(
        f"IEITYuan{native.__name__.removeprefix('YuanM32')}",
        (),
        {"config_class": IEITYuanConfig, "from_pretrained": classmethod(from_pretrained), "__doc__": _converting_loader.__doc__},
    )


def register() -> None:
    """Register ``yuan_m32`` with AutoConfig and the Auto model classes (base model, causal LM, sequence and token
    classification, question answering), IEIT's ``yuan`` layout as a converting alias, and expose the classes as
    ``transformers.<ClassName>`` (tools such as ``transformers serve`` look architectures up there).

    Safe to call more than once, and when transformers already knows ``yuan_m32`` (a future native
    integration, or another copy of these classes): then the existing registration is kept.
    """
    from .conversion.cache import convert_on_the_fly
    from .modeling import YuanM32PreTrainedModel

    if convert_on_the_fly not in YuanM32PreTrainedModel._source_adapters:
        YuanM32PreTrainedModel._source_adapters.append(convert_on_the_fly)
    if IEITYuanConfig.model_type not in CONFIG_MAPPING:
        AutoConfig.register(IEITYuanConfig.model_type, IEITYuanConfig)
        for auto_class, native in AUTO_CLASSES.items():
            auto_class.register(IEITYuanConfig, _converting_loader(native))
    if YuanM32Config.model_type in CONFIG_MAPPING:
        return
    AutoConfig.register(YuanM32Config.model_type, YuanM32Config)
    # saved folders carry auto_map and the modeling files, so they load with trust_remote_code alone
    YuanM32Config.register_for_auto_class()
    for auto_class, native in AUTO_CLASSES.items():
        auto_class.register(YuanM32Config, native)
        native.register_for_auto_class(auto_class.__name__)
        if not hasattr(transformers, native.__name__):
            setattr(transformers, native.__name__, native)
