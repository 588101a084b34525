"""QLoRA loading: bitsandbytes 4-bit (nf4 / fp4) or 8-bit weights with the experts quantized.

The experts are per-expert `nn.Linear`s (DESIGN.md section 5), so bitsandbytes quantizes all of them: the 39.9B
parameters of Yuan 2.0-M32 become about 22 GB of nf4 weights. Kept in higher precision (the skip list):
the router `mlp.gate.{query,key,value}` (fp32, E = 32 outputs: tiny, decides routing, and bitsandbytes' CPU
kernels cannot take 32-wide outputs), the LF gate convolutions (`nn.Conv1d`, which bitsandbytes never touches;
listed so the intent is explicit) and `lm_head` (tied to the embeddings).

Note: patterns must name the Linear modules themselves (`mlp.gate.query`): transformers 5 matches skip patterns
from the start of the full name or as a suffix, so a parent name like `mlp.gate` would not protect them.
"""

from __future__ import annotations

import logging as pylogging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel
from transformers.utils import logging

logger = logging.get_logger(__name__)

QLORA_SKIP_MODULES: tuple[str, ...] = (
    "lm_head",
    "mlp.gate.query",
    "mlp.gate.key",
    "mlp.gate.value",
    "lf_gate.conv1",
    "lf_gate.conv2",
)
QUANT_BITS: tuple[int, ...] = (4, 8)
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
BNB_OPTIONAL_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _OptionalKernelNotice(pylogging.Filter):
    """Demote one bitsandbytes (0.50) import-time warning to a debug line; every other bitsandbytes record passes.

    On CPUs with AVX512-BF16, `import bitsandbytes` tries to fetch an optional 4-bit inference kernel from the Hub
    (kernels-community) and warns when it cannot (offline, publisher not trusted, `kernels` not installed). PEFT
    imports bitsandbytes whenever it is installed, so the warning came with every LoRA run, quantized or not. Nothing
    is lost: bitsandbytes falls back to its built-in kernel, and that inference-only path is switched off for
    training anyway (`_keep_cpu_4bit_weights_trainable`).
    """

    def filter(self, record: pylogging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(BNB_OPTIONAL_KERNEL_NOTICE):
            logger.debug(f"bitsandbytes: {message}")
            return False
        return True


# installed before anything imports bitsandbytes (the warning is logged while bitsandbytes is being imported)
pylogging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelNotice())


def _dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {value!r}; use e.g. 'bfloat16', 'float16' or 'float32'")
    return dtype


def bnb_config(
    *,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str | torch.dtype = torch.bfloat16,
    quant_storage: str | torch.dtype | None = None,
    skip_modules: Sequence[str] = QLORA_SKIP_MODULES,
) -> BitsAndBytesConfig:
    """`BitsAndBytesConfig` for Yuan: 4-bit (QLoRA: nf4, double quantization) or 8-bit (LLM.int8).

    Args:
        bits: 4 or 8.
        quant_type: 4-bit data type, `"nf4"` (QLoRA's) or `"fp4"`.
        double_quant: Quantize the 4-bit block scales too (about 0.4 bit/parameter saved).
        compute_dtype: dtype of the 4-bit matmuls (bf16 on GPUs that have it; fp32 on CPU).
        quant_storage: Storage dtype of packed 4-bit weights; set it to the model dtype (e.g. bf16) for FSDP.
        skip_modules: Modules left unquantized; the default keeps router, LF gate and lm_head.
    """
    if bits not in QUANT_BITS:
        raise ValueError(f"bnb_config: bits must be one of {QUANT_BITS}, got {bits!r}")
    if bits == 4 and quant_type not in QUANT_TYPES:
        raise ValueError(f"bnb_config: quant_type must be one of {QUANT_TYPES} for 4-bit, got {quant_type!r}")
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))
    kwargs: dict[str, Any] = {}
    if quant_storage is not None:
        kwargs["bnb_4bit_quant_storage"] = _dtype(quant_storage)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=_dtype(compute_dtype),
        llm_int8_skip_modules=list(skip_modules),
        **kwargs,
    )


def _default_device_map() -> dict[str, Any] | None:
    """One whole model per process: GPU `LOCAL_RANK` under torchrun/accelerate, else the current GPU; None on CPU."""
    if not torch.cuda.is_available():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}


def load_for_qlora(
    path_or_model_id: str | os.PathLike,
    *,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str | torch.dtype | None = None,
    quant_storage: str | torch.dtype | None = None,
    skip_modules: Sequence[str] = QLORA_SKIP_MODULES,
    gradient_checkpointing: bool = True,
    attn_implementation: str = "sdpa",
    device_map: Any = "default",
    prepare: bool = True,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """Load a Yuan checkpoint quantized for QLoRA and ready for `apply_lora`.

    Loads with bitsandbytes (`bnb_config`), then runs `peft.prepare_model_for_kbit_training`: frozen base
    weights, unquantized parameters upcast to fp32, and (by default) non-reentrant gradient checkpointing.

    Args:
        path_or_model_id: Local folder or Hub id of a native `yuan_m32` checkpoint.
        bits, quant_type, double_quant, quant_storage, skip_modules: See `bnb_config`.
        compute_dtype: Matmul dtype; default bf16 with a GPU, fp32 on CPU. Unquantized modules load in it too.
        gradient_checkpointing: Enable non-reentrant activation checkpointing (`use_reentrant=False`).
        attn_implementation: `"sdpa"` (default), `"eager"`, `"flash_attention_2"`, ...
        device_map: Where to load; default: the process's GPU (`LOCAL_RANK`), or CPU without a GPU.
        prepare: Run `prepare_model_for_kbit_training` (turn off to inspect the raw quantized model).
        **from_pretrained_kwargs: More `from_pretrained` options (`revision`, `config`, ...).

    Returns:
        The quantized `YuanM32ForCausalLM` (not yet wrapped by PEFT).
    """
    from peft import prepare_model_for_kbit_training

    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    quantization = bnb_config(
        bits=bits,
        quant_type=quant_type,
        double_quant=double_quant,
        compute_dtype=compute_dtype,
        quant_storage=quant_storage,
        skip_modules=skip_modules,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path_or_model_id,
        quantization_config=quantization,
        dtype=_dtype(compute_dtype),
        attn_implementation=attn_implementation,
        device_map=_default_device_map() if device_map == "default" else device_map,
        **from_pretrained_kwargs,
    )
    counts = count_quantized_linears(model)
    if counts["quantized"] == 0:
        raise RuntimeError(
            f"load_for_qlora: no Linear layer of {path_or_model_id} was quantized to {bits}-bit (found "
            f"{counts['unquantized']} plain nn.Linear). Check that bitsandbytes supports this device and that "
            f"skip_modules {list(skip_modules)} does not cover the experts."
        )
    logger.info(
        f"load_for_qlora: {counts['quantized']} Linear layers in {bits}-bit, {counts['unquantized']} kept "
        f"unquantized ({counts['unquantized_names'][:8]}...); memory footprint "
        f"{model.get_memory_footprint() / 2**30:.2f} GiB"
    )
    if prepare:
        _keep_cpu_4bit_weights_trainable(model)
        # the checkpointing kwargs go by position: PEFT renamed that parameter (gradient_ -> activation_checkpointing_kwargs)
        model = prepare_model_for_kbit_training(
            model, gradient_checkpointing, {"use_reentrant": False} if gradient_checkpointing else None
        )
    return model


def _keep_cpu_4bit_weights_trainable(model: nn.Module) -> None:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights for its AVX512-BF16 CPU kernel.

    On such CPUs the first eval-mode forward rewrites every `Linear4bit` weight in place into an inference-only
    layout whose matmul has no backward: training after an evaluation (e.g. a loss probe) then gets no gradient
    through the base weights or dies with SIGFPE. Training keeps the standard layout; no effect on GPUs.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def count_quantized_linears(model: nn.Module) -> dict[str, Any]:
    """Count bitsandbytes-quantized Linear layers (`Linear4bit` / `Linear8bitLt`) and plain `nn.Linear`s left.

    Returns `{"quantized": int, "unquantized": int, "quantized_names": [...], "unquantized_names": [...]}`.
    """
    import bitsandbytes as bnb

    quantized_types = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    quantized, plain = [], []
    for name, module in model.named_modules():
        if isinstance(module, quantized_types):
            quantized.append(name)
        elif isinstance(module, nn.Linear):
            plain.append(name)
    return {
        "quantized": len(quantized),
        "unquantized": len(plain),
        "quantized_names": quantized,
        "unquantized_names": plain,
    }


__all__ = ["QLORA_SKIP_MODULES", "bnb_config", "count_quantized_linears", "load_for_qlora"]
