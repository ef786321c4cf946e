#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with jaxllm installed (editable).
# Idempotent: re-running only installs what is missing. Override the interpreter with PYTHON=.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import jaxllm, pytest, pyarrow, array_record" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev,data]"
fi
