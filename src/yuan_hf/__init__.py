"""yuan-hf: IEIT's Yuan 2.0-M32 as a native Hugging Face transformers 5 model.

Importing the package registers ``model_type="yuan_m32"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``.
"""

from .modeling import YuanM32Config, YuanM32ForCausalLM, YuanM32Model, YuanM32PreTrainedModel
from .registration import register

__version__ = "0.1.0"

register()

__all__ = ["YuanM32Config", "YuanM32ForCausalLM", "YuanM32Model", "YuanM32PreTrainedModel", "register"]
