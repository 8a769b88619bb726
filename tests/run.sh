#!/usr/bin/env bash
# The project's test command. 0) ruff over the repository, and the documentation site built with --strict;
# 1) the whole suite in the current environment (kernels through
# Triton's CPU interpreter); 2) the default tier and the PyHealth parity tier in the PyHealth 2.1.0 environment
# PyHealth's users have (Python 3.12, pip's own resolution: tests/pyhealth_env.sh), where the parity tests must
# run, not skip. -P keeps
# the working directory off sys.path there, so the tests import fastattr as pip installed it (editable).
# No top-level folder of the repository shadows a package transformers imports (tests/test_repo_root_imports.py).
# FASTATTR_SKIP_PARITY=1 skips step 2. Extra arguments go to the first pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m ruff check .  # the house rules (pyproject.toml [tool.ruff]) are part of the tests
# the documentation site: a broken link, anchor, snippet or API reference fails the build (mkdocs.yml)
NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
python -m pytest "$@"
if [ "${FASTATTR_SKIP_PARITY:-0}" != "1" ]; then
  venv="$(bash tests/pyhealth_env.sh)"
  # the default tier again on PyHealth's Python (3.12), and the parity tier there
  FASTATTR_REQUIRE_PYHEALTH=1 "$venv/bin/python" -P -m pytest -m "parity or not slow"
fi
