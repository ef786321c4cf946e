#!/usr/bin/env bash
# Set up if needed, then run the test suite. Extra arguments go to pytest
# (e.g. `bash launch/test.sh -m "not slow"` for the quick subset).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --beam
.venv/bin/ruff check jaxllm tests benchmarks tools   # lint + import order (pyproject [tool.ruff])
exec .venv/bin/python -m pytest -q "$@"
