#!/usr/bin/env bash
# The main job: sets up .venv/ on first use, then runs a short demo of the loss.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec python examples/loss_demo.py "$@"
