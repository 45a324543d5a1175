#!/usr/bin/env bash
# One-shot set-up on a fresh machine: a local venv with torch, then the pack with its test extras.
# torch is installed first, pinned, so that no dependency resolution can pull a different (multi-GB) build.
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.11.0", pip options allowed) where another build is wanted.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # split into words on purpose: TORCH_SPEC may carry pip options, e.g.
    # TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    read -r -a spec <<< "${TORCH_SPEC:-torch==2.13.0}"
    .venv/bin/pip install -q "${spec[@]}"
elif [ -n "${TORCH_SPEC:-}" ]; then
    echo "setup: .venv already has torch $(.venv/bin/python -c 'import torch; print(torch.__version__)');" \
         "TORCH_SPEC is not applied (delete .venv to install another build)" >&2
fi
.venv/bin/pip install -q -e ".[dev]"
