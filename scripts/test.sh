#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite against the installed package.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k losses`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv="$(cd "${VENV:-.venv}" && pwd)"
# Run from python_tests/ so the installed package (with its compiled kernels)
# is imported, not the source tree.
cd python_tests
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider --benchmark-disable "$@" .
