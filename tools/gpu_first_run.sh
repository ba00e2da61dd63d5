#!/usr/bin/env bash
# One call on a GPU machine that has torch and transformers but nothing else: install the wheels brought in
# .wheels/, check the environment, record every GPU result the book reads, execute every chapter.
#
#     bash tools/gpu_first_run.sh          # writes into $OUT (default /tmp/gpu-first-run)
#
# $OUT/run.log       everything printed, with a FAILED or SKIPPED line for each step that did not finish
# $OUT/gpu/          the recorded results (JSON with provenance), as they are written: copy them into
#                    code/mixprec/data/gpu/ and commit them with this script's commit
# $OUT/chapters/     one JSON per chapter from tools/execute_chapters.py (ok, or the failing cell), and its log
#
# Every step runs under the time left before a deadline (BUDGET_S, default 500 s), so that a call of at most
# 9 minutes always returns its partial results; a step that cannot get MIN_STEP_S seconds is skipped. The
# exit status is the number of steps that failed or were skipped (4: the environment check failed, nothing ran).
# PY (default python3) is the interpreter: tests/test_gpu_first_run.py replaces it with a stub to test the deadlines.
# Prepare .wheels on a machine with the network: see README, "The first GPU run".
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-first-run}
mkdir -p "$OUT/gpu" "$OUT/chapters"
exec > >(tee "$OUT/run.log") 2>&1
PY=${PY:-python3}
WHEELS=${WHEELS:-.wheels}
SITE=${SITE:-/tmp/gpu-first-run-site}
MIN_STEP_S=${MIN_STEP_S:-30}
T0=$SECONDS
END=$((T0 + ${BUDGET_S:-500}))
fails=0

export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
export MIXPREC_CACHE=${MIXPREC_CACHE:-/tmp/gpu-first-run-cache}
export MIXPREC_GPU_DATA="$OUT/gpu"                 # recorded here, and read from here by the chapters below
export PYTHONPATH="$PWD/code:$SITE${PYTHONPATH:+:$PYTHONPATH}"

left() { local l=$((END - SECONDS)); echo $((l < $1 ? l : $1)); }

# step LIMIT_S NAME COMMAND...: run COMMAND for at most LIMIT_S seconds, or less if the deadline is nearer.
step() {
  local limit name t rc
  limit=$1 name=$2
  shift 2
  t=$(left "$limit")
  if [ "$t" -lt "$MIN_STEP_S" ]; then
    echo "SKIPPED (no time left): $name"
    fails=$((fails + 1))
    return 1
  fi
  echo "== [$((SECONDS - T0)) s] $name (limit $t s)"
  timeout -k 5 "$t" "$@"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "FAILED ($rc$([ "$rc" -eq 124 ] && echo ', timed out')): $name"
    fails=$((fails + 1))
  fi
  return "$rc"
}

train() { step "$1" "train $2" "$PY" -m mixprec.bench train --size gpt2-124m --precision "$2" --steps 50 --compile --quiet --record; }

if [ -d "$WHEELS" ]; then
  step 90 "install .wheels" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
else
  echo "no $WHEELS folder: using what is installed (IPython and torchao are needed)"
fi

# Versions, that torch sees the GPU, native FP8, the CUDA E4M3 cast, that results can be written.
step 90 "environment check" "$PY" - <<'EOF' || { echo "== the environment check failed: nothing else runs"; exit 4; }
import sys

import IPython
import torch
import transformers

from mixprec import formats, fp8, hw

assert torch.cuda.is_available(), "torch sees no GPU"
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| IPython", IPython.__version__)
print(hw.device_info().as_dict())
print("peak row:", hw.peak_row(torch.cuda.get_device_name()), "| native fp8:", fp8.native_fp8_available())
x = torch.tensor([464.0, 480.0, 1e6, float("inf")], device="cuda")
print("e4m3fn cast on cuda:", x.to(torch.float8_e4m3fn).float().tolist(), formats.torch_overflow_convention(formats.E4M3, "cuda"))
hw.recording_device()  # raises where recorded_dir() cannot be written
print("recording into", hw.recorded_dir())
EOF

step 60 "bench/matmul_dtypes.py" "$PY" bench/matmul_dtypes.py --record
step 45 "bench/fp8_gemm.py" "$PY" bench/fp8_gemm.py --record
step 120 "bench/generation.py (also trains the storyteller the chapters load)" "$PY" bench/generation.py --record
train 120 fp8                                     # torchao + autocast + torch.compile: the riskiest path first
c=$(left 230)  # each chapter gets the step's time less 10 s, so the executor reports the slow ones itself
step 230 "chapters (quick profile, in parallel)" env MIXPREC_PROFILE=quick OMP_NUM_THREADS=2 \
  "$PY" tools/execute_chapters.py book/[0-9]*.md book/misconceptions.md --out "$OUT/chapters" --parallel --timeout $((c > 40 ? c - 10 : 30))
train 100 bf16-amp
train 90 fp32
train 70 tf32
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
echo "== done in $((SECONDS - T0)) s; $fails step(s) failed or skipped; recorded: $(ls "$OUT/gpu" | tr '\n' ' ')"
exit "$fails"
