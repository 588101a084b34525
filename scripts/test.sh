#!/usr/bin/env bash
# Set up and run the tests on a fresh machine (CPU only; nothing is downloaded but Python packages).
#   1. the core suite (model, parity with IEIT, converter) on the oldest supported transformers (5.17)
#   2. the full suite on the newest transformers 5.x
# CPU torch is installed first so that pip never pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

setup() {  # setup VENV [extra pip args...]
  local venv=$1; shift
  [[ -x $venv/bin/python ]] || "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check torch==2.13.0
  "$venv/bin/pip" install -q --disable-pip-version-check "$@"
}

echo "== transformers floor (5.17): core suite"
setup .venv-floor -e . pytest "transformers==5.17.0"
.venv-floor/bin/python -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_parity.py tests/test_convert_ieit.py

echo "== newest transformers 5.x: full suite"
setup .venv -e ".[dev]"
.venv/bin/python -m pytest -q
