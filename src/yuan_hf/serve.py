"""``yuan-hf serve``: transformers' OpenAI-compatible server (``transformers serve``) with Yuan 2.0-M32 registered.

``transformers serve DIR`` loads the model in a spawned process and looks the class up as
``getattr(transformers, config.architectures[0])``, which knows no ``YuanM32ForCausalLM`` unless ``yuan_hf`` is
imported *in that process*; ``--trust-remote-code`` does not help. ``yuan-hf serve`` runs the same command from a
process whose main module imports ``yuan_hf``: the spawned model process re-imports that main module, so it
registers the classes (``registration.register`` also exposes them as ``transformers.YuanM32ForCausalLM``).
Every argument is passed to ``transformers serve`` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["serve"]


def serve(args: Sequence[str]) -> int:
    """Run ``transformers serve ARGS`` with Yuan registered; returns the exit status."""
    from transformers.utils.import_utils import is_serve_available

    import yuan_hf  # noqa: F401  (registers the classes in this process and, through the main module, the model's)

    if not is_serve_available():
        raise SystemExit(
            "error: `yuan-hf serve` runs `transformers serve`, which needs fastapi, uvicorn, pydantic and openai: "
            "pip install 'yuan-hf[serve]' (or 'transformers[serving]')"
        )
    # transformers <= 5.2x answers /v1/models by scanning the Hub cache and fails (500) when that folder does not
    # exist yet, as on a fresh machine that has never downloaded anything
    from huggingface_hub import constants

    Path(constants.HF_HUB_CACHE).mkdir(parents=True, exist_ok=True)
    try:
        from transformers.cli.transformers import app
    except ImportError as error:  # e.g. transformers 5.17's CLI imports `requests`, which its [serving] extra lacks
        raise SystemExit(
            f"error: transformers' CLI does not import here ({error}); pip install 'yuan-hf[serve]' installs what "
            "`transformers serve` needs"
        ) from None

    try:
        app(args=["serve", *args], prog_name="yuan-hf")
    except SystemExit as exit:  # click ends every command with SystemExit
        return exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    return 0
