#!/usr/bin/env bash
# Everything a lent GPU should run, in one call with a hard time budget (see README "Tests"):
#   1. GPU tests + kernel tuning sweep + kernel benchmark   (benchmarks/gpu_check.py)
#   2. whole transformer step, FLUX.1-dev and SD3.5 Large   (benchmarks/pipeline_step.py)
#   3. the benchmark suite's quick set                      (python -m safedig_kernels.bench)
# Each step has its own cap so one overrun cannot starve the others. Outputs go to $OUT (or
# ./out/device): one archive with everything, plus the markdown tables, printed last.
# Usage: [WHEELS=.whl] bash benchmarks/device_run.sh   (WHEELS: wheels to install first, e.g. diffusers)
set -u
OUT=${OUT:-out/device}
WORK=$(mktemp -d)
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

timeout "${KERNEL_S:-200}" python3 benchmarks/gpu_check.py --out "$WORK/kernels" --reps 15 \
  --tests "tests/test_kernels_gpu.py tests/test_diffusers_integration.py" --tests-timeout 75 \
  --shapes flux-4x,flux-16x,latency-n16 --compiled-shapes flux-4x > "$WORK/kernels.log" 2>&1
echo "gpu_check exit $?"; grep -E "GPU tests|tuned" "$WORK/kernels.log" | tail -3

timeout "${PIPELINE_S:-110}" python3 benchmarks/pipeline_step.py --out "$WORK/pipeline" --budget-s 75 \
  > "$WORK/pipeline.log" 2>&1
echo "pipeline_step exit $?"

timeout -s TERM "${BENCH_S:-75}" python3 -m safedig_kernels.bench run --quick --out "$WORK/bench" --time-budget 40 \
  > "$WORK/bench.log" 2>&1
echo "bench exit $?"

tar czf "$OUT/device_run.tgz" -C "$WORK" . 2>/dev/null
for f in kernels/gpu_check.md pipeline/pipeline_step.md bench/results.md; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$(echo "$f" | tr / _)"
done
for f in kernels/gpu_check.md pipeline/pipeline_step.md; do
  [ -f "$WORK/$f" ] && { echo; cat "$WORK/$f"; }
done
tail -5 "$WORK/bench.log"
