#!/usr/bin/env bash
# Set up if needed, lint, then run the tests on 2 pytest-xdist workers (one test file per
# worker at a time, so module fixtures are built once):
#   bash launch/test.sh          the default run: every test not marked `slow` (~12 min cold on 2 cores)
#   bash launch/test.sh --slow   only the slow end-to-end tests (CI runs both)
#   bash launch/test.sh --all    everything
# Further arguments go to pytest (a later -m replaces the default selection). Workers:
# JAXLLM_TEST_WORKERS (default 2; 0 runs in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
select=(-m "not slow")
fast_compile=1       # the default run is compile-bound: cheaper LLVM code generation (tests/conftest.py)
case "${1:-}" in
  --slow) select=(-m slow); fast_compile=0; shift ;;
  --all) select=(); fast_compile=0; shift ;;
esac
export JAXLLM_TEST_FAST_COMPILE="${JAXLLM_TEST_FAST_COMPILE:-$fast_compile}"
bash launch/setup.sh --beam
.venv/bin/ruff check jaxllm tests benchmarks tools   # lint + import order (pyproject [tool.ruff])
exec .venv/bin/python -m pytest -q -n "${JAXLLM_TEST_WORKERS:-2}" --dist loadfile "${select[@]}" "$@"
