#!/usr/bin/env bash
# The GPU check: everything only a GPU can show, in one command, under 8 minutes.
#
#     bench/gpu_check.sh [OUT_DIR]        # default runs/gpu_check; PYTHON=... to pick the interpreter
#
# 1. tests     the tests that need CUDA (tests/test_optim_pinned.py: an optimizer
#              follows its model to the GPU), and the backend differential test
#              (tests/test_backends.py) on CUDA: GMN/MLP trajectories of 24 steps on
#              every backend that applies there (forward; chunked forced onto the GPU;
#              the fused kernels are CPU code)
# 2. steps     bench/gpu_check.py: the CUDA step equals the CPU step; train-step time
#              and peak memory vs AdamW up to GPT-2 medium; meta-training throughput;
#              ShardedGMNOptimizer on a one-rank FSDP2 model (NCCL) equals GMNOptimizer
# 3. meta      a tiny meta-training (meta_train.py --preset tiny --device cuda)
# 4. overhead  bench/step_overhead.py --device cuda (reference CNN and MLP vs Adam)
#
# Each stage has a time limit (together 7.5 minutes) and its own log under OUT_DIR;
# the summary at the end says which passed. Exits 0 when all did, 1 otherwise, and
# 0 with a "no CUDA device" line on a machine without one (nothing to check there).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing to check"
    exit 0
fi
mkdir -p "$OUT"
"$PYTHON" -c "import torch; print('gpu_check on', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)" | tee "$OUT/device.txt"

declare -a SUMMARY
FAILED=0
stage() {  # stage NAME SECONDS COMMAND...: runs it with a time limit, logs to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo; echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then
        SUMMARY+=("$name: ok (${took}s)")
    else
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why="timed out" || why="exit $rc"
        SUMMARY+=("$name: FAILED, $why (${took}s; see $OUT/$name.log)")
        FAILED=1
    fi
}

stage tests 150 env L2O_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -rs -p no:cacheprovider -m "not slow" \
    tests/test_backends.py tests/test_optim_pinned.py
stage steps 180 "$PYTHON" bench/gpu_check.py --device cuda --steps 3 --json "$OUT/gpu_check.json"
stage meta 60 "$PYTHON" meta_train.py --preset tiny --device cuda --out "$OUT/meta_tiny" --outer-steps 12 \
    --eval-every 12 --checkpoint-every 12 --no-progress
stage overhead 60 "$PYTHON" bench/step_overhead.py --device cuda --rounds 3 --steps 5

echo; echo "== summary (logs in $OUT)"
printf '  %s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
exit $FAILED
