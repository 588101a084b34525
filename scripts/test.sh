#!/usr/bin/env bash
# Set up and run the tests on a fresh machine (CPU only; nothing is downloaded but Python packages), on the
# transformers release train:
#   1. the full suite on the floor (5.17.0),
#   2. the compatibility subset (`-m compat`: IEIT parity incl. cached greedy, every generation path against
#      uncached forwards for the package and the remote-code copy, remote-code load, QLoRA steps) on the newest
#      patch of every minor release in between,
#   3. the vLLM plugin's tests in their own venv (scripts/test_vllm.sh: vLLM pins an older transformers;
#      YUAN_HF_SKIP_VLLM=1 skips this step),
#   4. the full suite on the newest 5.x release on PyPI (checked, not assumed), last, so the output ends with
#      pytest's summary line.
# One venv (.venv-test) is reused: transformers is swapped in place with pip, which also moves its pinned
# dependencies (5.17 needs huggingface-hub < 2). CPU torch is installed first so pip never pulls a CUDA build.
# Environment: PYTHON (default python3), TRANSFORMERS_MINORS="5.18 5.20" to restrict the middle of the train.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-test
FLOOR=5.17
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)

[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[dev]"

# newest patch of each 5.x minor from the floor up, from the package index
releases=$("$VENV/bin/pip" index versions transformers --disable-pip-version-check 2>/dev/null |
  sed -n 's/^Available versions: //p' | tr ',' '\n' | tr -d ' ' | "$VENV/bin/python" -c '
import sys
from packaging.version import Version
floor = Version(sys.argv[1])
newest = {}
for line in sys.stdin:
    v = Version(line.strip())
    if v.major == floor.major and v >= floor and not v.is_prerelease:
        key = (v.major, v.minor)
        newest[key] = max(newest.get(key, v), v)
print(" ".join(str(newest[k]) for k in sorted(newest)))
' "$FLOOR")
[[ -n $releases ]] || { echo "could not list transformers releases from the package index" >&2; exit 1; }
read -r -a train <<<"$releases"
floor=${train[0]} newest=${train[-1]} middle=("${train[@]:1:${#train[@]}-2}")
if [[ -n ${TRANSFORMERS_MINORS:-} ]]; then
  keep=()
  for v in "${middle[@]}"; do [[ " $TRANSFORMERS_MINORS " == *" ${v%.*} "* ]] && keep+=("$v"); done
  middle=("${keep[@]}")
fi
echo "== transformers release train: floor $floor, middle ${middle[*]:-none}, newest $newest"

run() {  # run VERSION [pytest args...]
  local version=$1; shift
  "${PIP[@]}" "transformers==$version"
  local installed
  installed=$("$VENV/bin/python" -c "import transformers; print(transformers.__version__)")
  [[ $installed == "$version" ]] || { echo "asked for transformers $version, got $installed" >&2; exit 1; }
  echo "== transformers $installed: pytest $*"
  "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
}

run "$floor"
for v in "${middle[@]}"; do run "$v" -m compat; done
if [[ -z ${YUAN_HF_SKIP_VLLM:-} ]]; then
  echo "== vLLM plugin (scripts/test_vllm.sh)"
  bash scripts/test_vllm.sh
fi
run "$newest"
