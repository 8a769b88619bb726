#!/usr/bin/env bash
# The project's test command. 0) ruff over the repository; 1) the whole suite in the current environment (kernels through
# Triton's CPU interpreter); 2) the PyHealth parity tier in the PyHealth environment
# (tests/pyhealth_env.sh), where the parity tests must run, not skip.
# FASTATTR_SKIP_PARITY=1 skips step 2. Extra arguments go to the first pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m ruff check .  # the house rules (pyproject.toml [tool.ruff]) are part of the tests
python -m pytest "$@"
if [ "${FASTATTR_SKIP_PARITY:-0}" != "1" ]; then
  venv="$(bash tests/pyhealth_env.sh)"
  FASTATTR_REQUIRE_PYHEALTH=1 "$venv/bin/python" -m pytest -m parity
fi
