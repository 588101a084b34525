"""Writers of IEIT-format checkpoints (HF layout, Megatron-LM) and a tiny tokenizer: the inverse of the readers.

They make the inputs of tests, ``yuan-hf demo`` and benchmarks from native (or random) weights. They live
apart from the readers so that the conversion path (``ieit_hf.py``, ``megatron/``, ``native/``) never
depends on them; they reuse the readers' tables, so a write -> read round trip checks one table, not two.
"""

from .ieit_hf import ieit_config_from_native, ieit_state_dict_from_native, make_ieit_checkpoint
from .megatron import make_megatron_checkpoint, megatron_args_for, write_megatron_checkpoint
from .tokenizer import build_demo_tokenizer

__all__ = [
    "build_demo_tokenizer",
    "ieit_config_from_native",
    "ieit_state_dict_from_native",
    "make_ieit_checkpoint",
    "make_megatron_checkpoint",
    "megatron_args_for",
    "write_megatron_checkpoint",
]
