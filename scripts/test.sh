#!/usr/bin/env bash
# The gates and the whole test suite, as CI runs them: lint, format, types, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FEDLORA_VENV:-.venv}
echo "[test] ruff check" >&2
"$VENV/bin/ruff" check --output-format concise .
echo "[test] ruff format --check" >&2
"$VENV/bin/ruff" format --check .
echo "[test] mypy" >&2
"$VENV/bin/mypy"
echo "[test] pytest" >&2
exec "$VENV/bin/python" -m pytest -q "$@"
