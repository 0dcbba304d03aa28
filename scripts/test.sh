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
# Two workers (pytest-xdist): much of the suite is real processes starting (torch, transformers and peft imports,
# ~5 CPU-s each) and waiting on sockets and deadlines, so one worker left a core idle (837 s of pytest in one
# process, 641 s with two, same tests and machine); FEDLORA_TEST_WORKERS=0 runs it in one process.
exec "$VENV/bin/python" -m pytest -q -n "${FEDLORA_TEST_WORKERS:-2}" --dist worksteal "$@"
