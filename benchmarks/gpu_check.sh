#!/usr/bin/env bash
# One prepared check for a machine with a GPU and no internet, in well under 10 minutes:
#   1. the test suite (CPU, as CI runs it) and the loss tests on the GPU,
#   2. benchmarks/loss_bench.py, large_class_bench.py and train_step_bench.py on the GPU,
#   3. the MNIST paper config (train/configs/mnist_paper.py) trained to completion,
# then a short table. Logs and JSON go to $OUT_DIR (default: $OUT if set, else /tmp/gpu_check).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   DRY_RUN=1 bash benchmarks/gpu_check.sh       # same steps, small settings, on any machine
#
# Environment:
#   PYTHON    the interpreter (default: .venv/bin/python if it imports jax, else python3)
#   DATA_DIR  prepared TFDS data holding mnist/ (default: .data/tensorflow_datasets in the
#             repository if present, else ~/tensorflow_datasets). There is no internet on
#             the GPU machine: carry a prepared copy (`python -m train.prepare_data
#             --dataset mnist --data_dir .data/tensorflow_datasets` here, about 26 MB).
#   .whl/     wheels of Python packages missing on the GPU machine (ml_collections,
#             tensorflow_datasets, array_record, ...): installed into /tmp/site first.
#   DRY_RUN=1 small settings: loss tests only, --quick benchmarks, 20 steps of the default net.
# Each step has its own time limit; a failed or skipped step shows in the table and the
# script goes on to the next one. The exit status is 1 if any step failed.

set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT_DIR=${OUT_DIR:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT_DIR"
START=$(date +%s)
DRY_RUN=${DRY_RUN:-0}
export PYTHONUNBUFFERED=1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import jax" 2>/dev/null; then
        PYTHON=.venv/bin/python
    else
        PYTHON=python3
    fi
fi
if [ -z "${DATA_DIR:-}" ]; then
    if [ -d .data/tensorflow_datasets/mnist ]; then DATA_DIR=$REPO/.data/tensorflow_datasets
    else DATA_DIR=$HOME/tensorflow_datasets; fi
fi

declare -a NAMES STATUSES NOTES
record() { NAMES+=("$1"); STATUSES+=("$2"); NOTES+=("$3"); }
elapsed() { echo $(( $(date +%s) - START )); }

# run_step NAME LIMIT_S LOG COMMAND...: runs with a time limit, returns the status word.
run_step() {
    local name=$1 limit=$2 log=$3; shift 3
    echo "=== [$(elapsed)s] $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then STEP_STATUS=ok
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then STEP_STATUS=timeout
    else STEP_STATUS="failed($rc)"; fi
}

echo "=== preflight"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "(no nvidia-smi)"
"$PYTHON" - <<'PY' 2>&1 | tee "$OUT_DIR/preflight.txt"
import importlib.util, jax
print("python", __import__("sys").version.split()[0], "jax", jax.__version__,
      "backend", jax.default_backend(), "devices", jax.devices())
missing = [m for m in ("flax", "optax", "pytest", "scipy", "ml_collections", "orbax.checkpoint",
                       "tensorflow_datasets", "array_record", "PIL", "tqdm", "absl", "hypothesis")
           if importlib.util.find_spec(m.split(".")[0]) is None]
print("missing:", " ".join(missing) if missing else "none")
PY
BACKEND=$("$PYTHON" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none)
MISSING=$(sed -n 's/^missing: //p' "$OUT_DIR/preflight.txt")
DEVICE=$("$PYTHON" -c "import jax; print(jax.devices()[0].device_kind)" 2>/dev/null || echo unknown)
if [ "$BACKEND" != "gpu" ] && [ "$DRY_RUN" != 1 ]; then
    echo "warning: JAX backend is '$BACKEND', not gpu; the numbers below are not GPU numbers"
fi
TRAIN_READY=1
for m in ml_collections tensorflow_datasets array_record PIL orbax.checkpoint absl tqdm; do
    case " $MISSING " in *" $m "*) TRAIN_READY=0 ;; esac
done

# 1. Tests. The suite as CI runs it (tests/conftest.py pins CPU and 8 emulated devices), then
#    the loss tests again on the accelerator (the one-device-only sharding test left out).
if [ "$DRY_RUN" = 1 ]; then
    run_step "tests (cpu)" 300 tests_cpu.log "$PYTHON" -m pytest -q -p no:cacheprovider -x \
        tests/test_loss_performance.py
else
    XDIST=()
    "$PYTHON" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
    run_step "tests (cpu)" 120 tests_cpu.log "$PYTHON" -m pytest -q -p no:cacheprovider \
        -m "not slow" "${XDIST[@]}" tests
fi
record "tests (cpu, as CI)" "$STEP_STATUS" "$(grep -Eo '[0-9]+ (passed|failed|error)[^=]*' "$OUT_DIR/tests_cpu.log" | tail -1)"
if [ "$BACKEND" = gpu ]; then
    JAX_PLATFORMS=cuda,cpu run_step "loss tests (gpu)" 80 tests_gpu.log "$PYTHON" -m pytest -q \
        -p no:cacheprovider tests/test_loss.py tests/test_loss_performance.py \
        tests/test_large_class.py \
        -k "not sharded_over_eight and not sharded_equals and not hlo_has and not bad_input"
    record "loss tests (gpu)" "$STEP_STATUS" "$(grep -Eo '[0-9]+ (passed|failed|error)[^=]*' "$OUT_DIR/tests_gpu.log" | tail -1)"
fi

# 2. Benchmarks, on the default backend (the GPU where there is one).
if [ "$DRY_RUN" = 1 ]; then LOSS_ARGS=(--quick); TRAIN_ARGS=(--quick)
else LOSS_ARGS=(--budget 2); TRAIN_ARGS=(--budget 5); fi
run_step "loss benchmark" 110 loss_bench.log "$PYTHON" benchmarks/loss_bench.py "${LOSS_ARGS[@]}" \
    --json "$OUT_DIR/loss_bench.json"
LOSS_STATUS=$STEP_STATUS
record "loss benchmark" "$LOSS_STATUS" "$(awk '$1 ~ /x/ && $5 ~ /^[0-9.]+$/ {if ($5 > m) m = $5} END {if (m) printf "worst ratio %.3f", m}' "$OUT_DIR/loss_bench.log")"
if [ "$DRY_RUN" = 1 ]; then LARGE_ARGS=(--quick); else LARGE_ARGS=(--budget 5 --min-repeats 3); fi
run_step "large-class benchmark" 75 large_class_bench.log "$PYTHON" \
    benchmarks/large_class_bench.py "${LARGE_ARGS[@]}" --json "$OUT_DIR/large_class_bench.json"
record "large-class benchmark" "$STEP_STATUS" "$(awk '$2 ~ /^(float32|bfloat16)$/ && NF == 7 {printf "%s %s ratio %s  ", $1, $2, $5}' "$OUT_DIR/large_class_bench.log")"
if [ "$TRAIN_READY" = 1 ]; then
    run_step "train-step benchmark" 90 train_step_bench.log "$PYTHON" \
        benchmarks/train_step_bench.py "${TRAIN_ARGS[@]}" --json "$OUT_DIR/train_step_bench.json"
    record "train-step benchmark" "$STEP_STATUS" "$(awk '$2 ~ /^[0-9]+$/ && $5 ~ /^[0-9.]+$/ {printf "%s %.3f  ", $1, $5}' "$OUT_DIR/train_step_bench.log")"
else
    record "train-step benchmark" skipped "missing: $MISSING (carry wheels in .whl/)"
fi

# 3. The MNIST paper config, to completion.
if [ "$TRAIN_READY" = 1 ] && [ -d "$DATA_DIR/mnist" ]; then
    # The dry run trains the small default net for 20 steps instead (the VGG net needs a GPU).
    TRAIN_ARGS=(--config train/configs/mnist_paper.py)
    [ "$DRY_RUN" = 1 ] && TRAIN_ARGS=(--config train/configs/default.py --config.num_steps=20)
    WORKDIR=$(mktemp -d /tmp/gpu_check_mnist_paper.XXXX)
    run_step "train mnist_paper" 180 train_mnist_paper.log "$PYTHON" -m train \
        "${TRAIN_ARGS[@]}" --workdir "$WORKDIR" --config.data_dir="$DATA_DIR" \
        --config.prepare_data=False --config.progress_bar=False
    NOTE=$("$PYTHON" - "$WORKDIR/results.json" <<'PY' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
print(f"test accuracy {r['test_accuracy']:.4f}, {r.get('images_per_sec') or 0:.0f} img/s, "
      f"train {r.get('train_time_s') or 0:.0f}s")
PY
)
    cp "$WORKDIR/results.json" "$OUT_DIR/mnist_paper_results.json" 2>/dev/null
    record "train mnist_paper" "$STEP_STATUS" "${NOTE:-no results.json}"
elif [ "$TRAIN_READY" = 1 ]; then
    record "train mnist_paper" skipped "no prepared MNIST in $DATA_DIR (set DATA_DIR)"
else
    record "train mnist_paper" skipped "missing: $MISSING"
fi

echo
echo "=== summary: $DEVICE ($BACKEND), $(elapsed)s in all, logs in $OUT_DIR"
FAILED=0
for i in "${!NAMES[@]}"; do
    printf "%-24s %-12s %s\n" "${NAMES[$i]}" "${STATUSES[$i]}" "${NOTES[$i]}"
    case "${STATUSES[$i]}" in ok|skipped) ;; *) FAILED=1 ;; esac
done
if [ -f "$OUT_DIR/loss_bench.log" ]; then
    echo; echo "loss, forward + backward, ours / Optax:"; grep -E "^ *[0-9]+x[0-9]+ |size" "$OUT_DIR/loss_bench.log"
fi
if [ -f "$OUT_DIR/large_class_bench.log" ]; then
    echo; echo "large numbers of classes, fused / materialised:"; grep -E "^ *(classes|[0-9]+ ) *" "$OUT_DIR/large_class_bench.log"
fi
if [ -f "$OUT_DIR/train_step_bench.log" ]; then
    echo; echo "train step, noisy / softmax:"; grep -E "^ *(model|small_cnn|vgg_)" "$OUT_DIR/train_step_bench.log"
fi
exit $FAILED
