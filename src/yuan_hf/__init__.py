"""yuan-hf: IEIT's Yuan 2.0-M32 as a native Hugging Face transformers 5 model.

Importing the package registers ``model_type="yuan_m32"`` with ``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM`` and the sequence / token classification and question answering Auto classes, and
makes IEIT's original layout (``model_type="yuan"``) load through them by converting it once. On a
transformers release outside the tested range it logs one warning naming ``yuan-hf doctor``.
"""

from . import modeling
from .modeling import *  # noqa: F403  (the public classes, listed in modeling.__all__)
from .registration import register
from .support import warn_if_untested

__version__ = "0.1.0"

register()
warn_if_untested()

__all__ = [*modeling.__all__, "register"]
