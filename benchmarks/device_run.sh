#!/usr/bin/env bash
# Everything a lent GPU should run, in one call capped at TOTAL_S (default 450 s,
# under 8 minutes with the set-up), each stage in its own process with its own time cap, so an
# overrun, a hang or a CUDA error in one stage cannot take the others with it:
#
#   stage        cap (s)  what                                                        (benchmarks/device_stages.py)
#   gpu_tests      140    every test marked `gpu` under tests/ (pytest -m gpu, junit XML, counts)
#   context_parallel 60   2 GPUs or more: steered tiny FLUX on 2 ranks, Ulysses and Ring over NCCL, vs one GPU
#                         (skipped in seconds with one GPU, so it sits early and costs a one-GPU run nothing)
#   mm_addmm        30    x @ W_enc as torch.mm vs torch.addmm (bias epilogue), every spec §5 shape, bf16/fp16
#   select_bias     50    the selection alone, fp32 bias added on load vs pre-activations holding it
#   decode          30    _decode_steer alone on precomputed codes (β 0.5 all, β 0 all, β 0 10 % gated)
#   fused           50    the op, β 0.5 every token steered / β 0 ~10 % gated, against the GEMM
#   backward        45    the ops' backward: Triton kernels vs torch ops (checked first), dx only, all grads, fwd+bwd
#   eager_n16       30    N = 16: host µs per call, wall ms per call, CUDA events, CUDA-graph replay
#   spec_table     100    gpu_check.py rows + compiled baselines at FLUX 4x/16x (kernel_check.json)
#   pipeline       100    pipeline_step.py: whole transformer step, steered vs not (needs diffusers)
#
# A stage gets min(its cap, what is left of TOTAL_S); one that cannot get 20 s is recorded as
# skipped. Caps: CAP_<stage>=seconds. The JSON is rewritten after every stage and within stages
# after every shape, so whatever the call's end, $OUT holds what finished.
#
# Outputs in $OUT (default out/device), 7 files, flat, as the device tool returns them:
#   device_run.json  every stage (env: card, torch, triton, CUDA; per stage status, seconds, numbers)
#   device_run.md    the summary tables, also printed LAST (the tool returns the output's last 12 000 chars)
#   device_run.log   every stage's full output
#   gpu_tests.xml    pytest junit XML        gpu_tests.log   pytest's output
#   kernel_check.json  gpu_check.py layout   pipeline_step.json  pipeline_step.py layout
# Record a run: copy kernel_check.json and pipeline_step.json to
# benchmarks/results/<card>-<date>-kernel-check.json / -pipeline-step.json and the junit XML to
# <card>-<date>-gpu-tests.xml, then `python -m safedig_kernels.bench results` (rewrites RESULTS.md).
#
# Through the device tool (the GPU image has torch and triton but no diffusers):
#   once, here:  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp --platform manylinux_2_28_x86_64 -d .whl \
#                  diffusers==0.42.1 importlib_metadata       # /.whl/ is git-ignored
#   run:  command "WHEELS=.whl bash benchmarks/device_run.sh", timeout_s 540, carry [".whl"]
#   (540 s leaves the 450 s budget, the wheel install and the stages' kill grace inside the call.)
#
# On a CPU, a dry run of every stage (tiny shapes, fp32, Triton interpreted, GPU tests collected
# and skipped, tiny pipeline): SMOKE=1 OUT=/tmp/dr bash benchmarks/device_run.sh
# PYTHON=... picks the interpreter (default python3).
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-out/device}
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-450}
START=$SECONDS
mkdir -p "$OUT" || exit 2
LOG="$OUT/device_run.log"
: >"$LOG"
SMOKE_ARG=()
if [ "${SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  SMOKE_ARG=(--smoke)
fi

if [ -n "${WHEELS:-}" ]; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
         "$WHEELS"/*.whl >>"$LOG" 2>&1; then
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
      echo "installed: $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')"
    else
      echo "WARNING: installing the wheels in $WHEELS failed (see device_run.log); stages needing them will skip"
    fi
  else
    echo "WARNING: WHEELS=$WHEELS holds no .whl files"
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader 2>/dev/null
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"

run_stage() {  # name cap
  local name=$1 cap=$2 left t t0 rc
  local override="CAP_$name"
  cap=${!override:-$cap}
  left=$((TOTAL_S - (SECONDS - START)))
  t=$((cap < left ? cap : left))
  if [ "$t" -lt 20 ]; then
    echo "stage $name: skipped ($left s left of TOTAL_S=$TOTAL_S)"
    "$PY" benchmarks/device_stages.py --out "$OUT" --finish "$name" --rc -1
    return
  fi
  t0=$SECONDS
  echo "=== stage $name (cap $t s) ===" >>"$LOG"
  timeout -k 25 "$t" "$PY" benchmarks/device_stages.py --out "$OUT" --stage "$name" --budget-s "$((t - 5))" \
    ${SMOKE_ARG[@]+"${SMOKE_ARG[@]}"} >>"$LOG" 2>&1
  rc=$?
  "$PY" benchmarks/device_stages.py --out "$OUT" --finish "$name" --rc "$rc" --wall-s "$((SECONDS - t0))"
  echo "stage $name: exit $rc after $((SECONDS - t0)) s"
  if [ "$rc" -ne 0 ]; then  # show why, here too: the log file comes back, but read this first
    awk -v s="=== stage $name " 'index($0, "=== stage ") == 1 {on = index($0, s) == 1; if (on) n = 0}
      on {buf[n++ % 25] = $0}
      END {for (i = (n > 25 ? n - 25 : 0); i < n; i++) print "  | " buf[i % 25]}' "$LOG"
  fi
}

run_stage gpu_tests 140
run_stage context_parallel 60
run_stage mm_addmm 30
run_stage select_bias 50
run_stage decode 30
run_stage fused 50
run_stage backward 45
run_stage eager_n16 30
run_stage spec_table 100
run_stage pipeline 100

echo "total $((SECONDS - START)) s"
echo
"$PY" benchmarks/device_stages.py --out "$OUT" --summary
