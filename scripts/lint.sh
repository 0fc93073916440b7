#!/usr/bin/env bash
# The architecture checks CI runs: style and bug patterns (ruff, with the B and ASYNC rule
# sets), formatting, and the layer contracts (import-linter, in pyproject.toml). Needs the
# dev extras (scripts/setup.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
.venv/bin/python scripts/check_cycles.py
