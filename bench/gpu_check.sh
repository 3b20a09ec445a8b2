#!/usr/bin/env bash
# The one prepared script for a lent GPU (an H200 here): build with the CUDA
# kernels, run the CUDA tests, run the GPU benchmarks, print a short table.
# Meant to finish in under 8 minutes.  Logs go to $OUT when it is set.
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/sslops-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

echo "== build (sm_90 only, to save time)"
SSLOPS_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=16 \
  timeout 300 pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
rc=$?; echo "build rc=$rc ($(( $(date +%s) - T0 )) s)"; [ $rc -eq 0 ] || { tail -40 "$OUT/build.log"; exit 1; }

echo "== CUDA tests"
# the tests marked cuda, and the Triton kernel tests (they compile for the GPU when one is there)
SSLOPS_POISON=1 timeout 240 python -m pytest -q -m cuda tests/ -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25
SSLOPS_POISON=1 timeout 180 python -m pytest -q tests/test_nt_xent_triton.py tests/test_augment_triton.py \
  tests/test_attention_triton.py -p no:cacheprovider 2>&1 | tee "$OUT/tests_triton.log" | tail -10
echo "tests done ($(( $(date +%s) - T0 )) s)"

echo "== GPU benchmarks (attention: bench/bench_attention.py::test_attention_gpu, ~1-2 min of it)"
timeout 240 python -m pytest -q bench/ --benchmark-only -k "gpu or cuda" -p no:cacheprovider \
  --benchmark-columns=median,min,rounds --benchmark-json="$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" \
  | sed -n '/sslops side-by-side/,$p'
echo "total $(( $(date +%s) - T0 )) s"
