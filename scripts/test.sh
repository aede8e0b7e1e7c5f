#!/usr/bin/env bash
# The whole test suite: sets up .venv/ on first use, then runs pytest (slow tests and
# notebooks included). Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow".
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec python -m pytest "$@"
