#!/usr/bin/env bash
# One-shot GPU check, for a machine with an NVIDIA GPU, nvcc and a CUDA build of torch (plus timm
# and pytest) already installed: builds tta._C in place with its CUDA kernels, runs the CUDA tests,
# the CUDA kernel benchmark and CoTTA's fast path vs reference_mode on the GPU.
#
#   OUT=runs/gpu bash bench/gpu_check.sh         # ~3 min on an H200
#
# Nothing is installed: the build goes next to the sources (tta/_C*.so) and PYTHONPATH points here.
# Every stage has its own time limit, so a stage that fails or hangs leaves the others' results.
# Writes $OUT/log.txt (everything printed), build.log, ops_cuda.json, cotta_card.json, cotta_r50.json,
# adapters_cuda.json and adapters_cuda_torch.json (the same with the torch reference ops).
set -u
OUT=${OUT:-runs/gpu}
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
log() { tee -a "$OUT/log.txt"; }
stage() { echo -e "\n== $* ($(date -u +%T))" | log; }

stage environment
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name())"
  nvcc --version | tail -2; nproc; } 2>&1 | log

stage "build tta._C (TORCH_CUDA_ARCH_LIST=$ARCH)"
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=$ARCH TTA_WITH_CUDA=1 timeout 420 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
echo "build exit $? in $(($(date +%s) - start)) s" | log
tail -3 "$OUT/build.log" | log
$PY -c "import tta.ops as o; print('backend', o.backend(), o.LOAD_ERROR or '')" 2>&1 | log

stage "CUDA tests"
timeout 300 $PY -m pytest -q -m cuda -p no:cacheprovider -o addopts="" -rfE \
  tests/test_ops_bn.py tests/test_ops_knn.py tests/test_engine.py tests/test_cuda_adapters.py 2>&1 | tail -40 | log

stage "CUDA kernel benchmark"
timeout 240 $PY bench/bench_ops_cuda.py --out "$OUT/ops_cuda.json" 2>&1 | log

stage "CoTTA on the GPU: default card, batch 200, 32 views, grey input"
timeout 240 $PY bench/bench_cotta.py --device cuda --batch 200 --size 32 --views 32 --input grey --batches 5 \
  --modes floor,fast,reference,skip,fast_bf16 --out "$OUT/cotta_card.json" 2>&1 | grep -v '^batch' | log

stage "CoTTA on the GPU: timm resnet50 (random weights), batch 64, 224 px, 32 views"
timeout 300 $PY bench/bench_cotta.py --device cuda --model timm:resnet50 --classes 1000 --batch 64 --size 224 \
  --views 32 --batches 3 --modes floor,fast,reference,skip,fast_bf16 --out "$OUT/cotta_r50.json" 2>&1 \
  | grep -v '^batch' | log
stage "adapter step vs source forward on the GPU (default card, batch 200): compiled ops, then TTA_DISABLE_C=1"
timeout 200 $PY bench/bench_adapters.py --device cuda --rounds 15 --json "$OUT/adapters_cuda.json" 2>&1 | log
TTA_DISABLE_C=1 timeout 200 $PY bench/bench_adapters.py --device cuda --rounds 15 \
  --json "$OUT/adapters_cuda_torch.json" 2>&1 | log
stage done
