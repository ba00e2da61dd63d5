#!/usr/bin/env bash
# Record every GPU result the book reads into mixprec.hw.recorded_dir() (code/mixprec/data/gpu/):
# matmul speed by dtype (ch. 1), FP8 _scaled_mm (ch. 5), generation (ch. 7), and training steps of
# GPT-2 124M in FP32, TF32, BF16 AMP and FP8 (ch. 3). Runs on a CUDA GPU; every writer refuses
# elsewhere. Each command runs even if an earlier one failed; the exit status counts the failures.
#     PYTHON=python3 STEP_TIMEOUT=600 tools/record_gpu_results.sh
set -u
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
limit=${STEP_TIMEOUT:-900}
failed=0
run() {
  echo "== $*"
  local t0=$SECONDS
  timeout "$limit" "$py" "$@" || { echo "FAILED ($?): $*"; failed=$((failed + 1)); }
  echo "== $((SECONDS - t0)) s"
}
run bench/matmul_dtypes.py --record
run bench/fp8_gemm.py --record
run bench/generation.py --record
for p in fp32 tf32 bf16-amp fp8; do
  run -m mixprec.bench train --size gpt2-124m --precision "$p" --steps 50 --compile --quiet --record
done
exit "$failed"
