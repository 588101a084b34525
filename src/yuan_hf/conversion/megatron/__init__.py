"""IEIT's Megatron-LM checkpoints of Yuan 2.0-M32 (any TP x PP), read without Megatron, CUDA or ``torch.load``.

Modules in data-flow order (details in ``shared/fixtures/README.md``):

* ``pickle_reader.py``: one rank file -> nested dicts of :class:`LazyTensor` (restricted unpickler).
* ``checkpoint.py``: the folder -> the rank files of one iteration (:class:`MegatronCheckpoint`).
* ``args.py``: the saved ``args`` -> :class:`MegatronDims` and ``YuanM32Config`` kwargs.
* ``merge.py``: the TP/PP merge table; :func:`iter_ieit_stages` yields one stage at a time in IEIT-HF names.
* ``convert.py``: :func:`convert_megatron`, which hands the stages to the native sink.

Writing such checkpoints is ``conversion/writers/megatron.py``.
"""

from .args import MegatronDims, native_config_from_args
from .checkpoint import MegatronCheckpoint
from .convert import convert_megatron
from .merge import MEGATRON_TO_IEIT, ieit_key_shapes, iter_ieit_stages
from .pickle_reader import DROPPED_ENTRIES, LazyTensor, MegatronStub, flatten_model_state, load_megatron_file

__all__ = [
    "DROPPED_ENTRIES",
    "LazyTensor",
    "MEGATRON_TO_IEIT",
    "MegatronCheckpoint",
    "MegatronDims",
    "MegatronStub",
    "convert_megatron",
    "flatten_model_state",
    "ieit_key_shapes",
    "iter_ieit_stages",
    "load_megatron_file",
    "native_config_from_args",
]
