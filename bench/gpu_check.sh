#!/usr/bin/env bash
# One-shot GPU check, for a machine with an NVIDIA GPU, nvcc and a CUDA build of torch (plus timm
# and pytest) already installed: builds tta._C in place with its CUDA kernels, runs the CUDA tests,
# the CUDA kernel benchmark and CoTTA's fast path vs reference_mode on the GPU.
#
#   OUT=runs/gpu bash bench/gpu_check.sh         # ~4 min on an H200
#   OUT=runs/gpu TRAIN_VIT=1 TTA_FASHION_MNIST_DIR=... bash bench/gpu_check.sh
#   ADAPTERS=0 skips the last stage (adapter steps vs source forward, twice: compiled ops and torch ops);
#   R50_BREAKDOWN=0 the resnet50 CoTTA phase breakdown; R50_MODES=fast_v4,fast_v8 adds bench_cotta modes.
#   ORT_WHEEL=path/to/onnxruntime_gpu-*.whl replaces the machine's onnxruntime by it and runs the edge
#   runtime on the CUDA execution provider against PyTorch on the GPU (bench/bench_edge.py).
#
# Nothing is installed: the build goes next to the sources (tta/_C*.so) and PYTHONPATH points here.
# Pure-Python dependencies the machine lacks (platformdirs, ...) can sit as wheels in $WHEELS (default
# .whl); they are unpacked to a temporary folder first. Every stage has its own time limit, so a stage
# that fails or hangs leaves the others' results.
# TRAIN_VIT=1 also trains the ViT card (models/vit-fmnist's recipe, `tta train-source --device cuda`)
# while the extension builds and the CUDA tests run; the timed stages start after it has finished.
# Writes $OUT/log.txt (everything printed, with the build's warnings), cuda_tests.txt (the whole pytest
# output), ops_cuda.json, cotta_card.json, cotta_r50.json,
# adapters_cuda.json and adapters_cuda_torch.json (the same with the torch reference ops), and with
# TRAIN_VIT=1 vit.tar (models/vit-fmnist.* and the log).
set -u
OUT=${OUT:-runs/gpu}
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/tta-site "$WHEELS"/*.whl \
    && export PYTHONPATH=/tmp/tta-site:$PYTHONPATH
fi
log() { tee -a "$OUT/log.txt"; }
stage() { echo -e "\n== $* ($(date -u +%T))" | log; }

stage environment
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name())"
  nvcc --version | tail -2; nproc
  echo '$ python3 -c "import tensorrt"'; $PY -c "import tensorrt; print('tensorrt', tensorrt.__version__)"
  $PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, 'providers:', o.get_available_providers())"
  $PY -c "
import torch
x = torch.empty(2**29, device='cuda'); y = torch.empty_like(x)  # 2 GiB each, far above the L2
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(10): y.copy_(x)
e.record(); e.synchronize()
print(f'device-to-device copy: {2 * x.numel() * 4 * 10 / (s.elapsed_time(e) * 1e-3) / 1e9:.0f} GB/s (read + write)')"
  } 2>&1 | log

if [ "${TRAIN_VIT:-0}" = 1 ]; then
  stage "train the ViT card on the GPU, then its ViDA warm-up, EATA Fisher and RMT prototypes (background)"
  rm -rf /tmp/tta-vit; mkdir -p /tmp/tta-vit/models
  ( ( cd /tmp/tta-vit && set -e
    timeout "${VIT_TIMEOUT:-300}" $PY -m tta train-source --dataset fashion-mnist \
      --arch vit_patch4_32 --epochs 60 --lr 0.002 --threads 4 --eval-every 10 --device cuda --no-progress \
      --arch-kwargs '{"embed_dim":64,"depth":6,"num_heads":4,"mlp_ratio":2.0}' --out models/vit-fmnist
    timeout 120 $PY -m tta warmup-adapters --model vit-fmnist --steps 200 --device cuda --no-progress
    timeout 60 $PY -m tta build-fisher --model vit-fmnist --device cuda --out models/vit-fmnist.fisher.safetensors
    timeout 90 $PY -m tta build-prototypes --model vit-fmnist --device cuda \
      --out models/vit-fmnist.prototypes.safetensors ) >/tmp/tta-vit/vit.log 2>&1
  echo "vit stage exit $?" >>/tmp/tta-vit/vit.log; tar -C /tmp/tta-vit -cf "$OUT/vit.tar" models vit.log ) &
  VIT_PID=$!
fi

stage "build tta._C (TORCH_CUDA_ARCH_LIST=$ARCH)"
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=$ARCH TTA_WITH_CUDA=1 timeout 420 $PY setup.py build_ext --inplace >/tmp/tta-build.log 2>&1
echo "build exit $? in $(($(date +%s) - start)) s" | log
grep -i -E "warning|error" /tmp/tta-build.log | grep -v "^ninja" | tail -20 | log; tail -2 /tmp/tta-build.log | log
$PY -c "import tta.ops as o; print('backend', o.backend(), o.LOAD_ERROR or '')" 2>&1 | log

stage "CUDA tests"
timeout 300 $PY -m pytest -q -m cuda -p no:cacheprovider -o addopts="" -rfE \
  tests/test_ops_bn.py tests/test_ops_knn.py tests/test_engine.py tests/test_cuda_adapters.py >"$OUT/cuda_tests.txt" 2>&1
echo "pytest exit $?" | log
grep -E "^(FAILED|ERROR)|Fatal Python error|passed|failed" "$OUT/cuda_tests.txt" | tail -30 | log

stage "errors raised inside the compiled library reach Python (CPU source, then CUDA source; child processes)"
for dev in cpu cuda; do
  timeout 60 $PY -c "
import torch, tta.ops
x = torch.zeros(6, 4, 3, 3, device='$dev'); m = torch.zeros(4, device='$dev'); v = torch.ones(4, device='$dev')
try:
    torch.ops.tta.bn_calibrate_grouped(x, m, v, None, None, 0.0, 1e-5, 4)
except RuntimeError as e:
    print('$dev: raised', str(e).splitlines()[0])" >/tmp/tta-err.txt 2>&1
  echo "$dev: exit $?; $(tail -c 600 /tmp/tta-err.txt)" | log
done
{ echo "CXX=${CXX:-} CC=${CC:-}; g++: $(command -v g++) $(g++ -dumpfullversion 2>/dev/null)"
  ldd tta/_C*.so | grep -E "stdc\+\+|gcc_s|c10|torch_cpu"; } 2>&1 | log

stage "which call of the input checks synchronises (sync debug mode as errors, with the stack)"
timeout 60 $PY - <<'PYEOF' 2>&1 | tail -25 | log
import traceback, warnings, torch
from tta.adapters.inputs import value_verdict
import tta, tta.models
x = torch.rand(8, 3, 32, 32, device="cuda")
a = tta.adapt(tta.models.load("resnet20-fmnist"), "tent").cuda()
a(x); torch.cuda.synchronize()
for what, fn in (("validate_batch", lambda: a.validate_batch(x)),
                 ("value_verdict", lambda: value_verdict(x, a.input_range)),
                 ("step", lambda: a(x))):
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(); print(what, "no sync")
    except RuntimeError:
        print(what, "SYNC:"); traceback.print_exc(limit=-6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
PYEOF

if [ -n "${VIT_PID:-}" ]; then
  stage "waiting for the ViT training"
  wait "$VIT_PID"; tar -xOf "$OUT/vit.tar" vit.log | grep -v "^epoch=[0-9]*[1-9] " | tail -12 | log
fi

stage "CUDA kernel benchmark"
timeout 240 $PY bench/bench_ops_cuda.py --out "$OUT/ops_cuda.json" 2>&1 | log

stage "where the BN op's time goes: per-kernel device time and host time (torch.profiler)"
timeout 120 $PY bench/profile_bn_cuda.py --iters 30 2>&1 | log
timeout 60 $PY bench/profile_bn_cuda.py --iters 30 --train --layouts nchw \
  --shapes 200x64x8x8,64x256x14x14,256x64x56x56 2>&1 | log

stage "CoTTA on the GPU: default card, batch 200, 32 views, grey input"
timeout 240 $PY bench/bench_cotta.py --device cuda --batch 200 --size 32 --views 32 --input grey --batches 5 \
  --modes floor,fast,reference,skip,fast_bf16,fast_nchw --out "$OUT/cotta_card.json" 2>&1 \
  | grep -v '^batch' | log
stage "CoTTA on the GPU: default card fast path, time per phase (--breakdown)"
timeout 120 $PY bench/bench_cotta.py --device cuda --batch 200 --size 32 --views 32 --input grey --batches 5 \
  --breakdown 2>&1 | log

stage "CoTTA on the GPU: timm resnet50 (random weights), batch 64, 224 px, 32 views"
timeout 300 $PY bench/bench_cotta.py --device cuda --model timm:resnet50 --classes 1000 --batch 64 --size 224 \
  --views 32 --batches 3 --modes floor,fast,reference,skip,fast_bf16,fast_nchw${R50_MODES:+,$R50_MODES} \
  --out "$OUT/cotta_r50.json" 2>&1 | grep -v '^batch' | log
if [ "${R50_BREAKDOWN:-1}" = 1 ]; then
stage "CoTTA on the GPU: resnet50 fast path, time per phase (--breakdown)"
timeout 120 $PY bench/bench_cotta.py --device cuda --model timm:resnet50 --classes 1000 --batch 64 --size 224 \
  --views 32 --batches 3 --breakdown 2>&1 | log
fi
if [ -n "${ORT_WHEEL:-}" ]; then
stage "edge runtime on onnxruntime-gpu (CUDA execution provider) vs PyTorch on the GPU"
{ $PY -m pip uninstall -y -q onnxruntime; $PY -m pip install -q --no-deps --no-index "$ORT_WHEEL" \
  && $PY -c "import onnxruntime as o; o.preload_dlls(); print('onnxruntime', o.__version__, o.get_available_providers())" \
  && timeout 240 $PY bench/bench_edge.py --device cuda --providers cuda --stream fmnist-c-recurring \
    --n-per-domain 100 --threads 4; } 2>&1 | grep -v '^    ' | log
fi
if [ "${ADAPTERS:-1}" = 1 ]; then
stage "adapter step vs source forward on the GPU (default card, batch 200): compiled ops, then TTA_DISABLE_C=1"
timeout 200 $PY bench/bench_adapters.py --device cuda --rounds 15 --json "$OUT/adapters_cuda.json" 2>&1 | log
TTA_DISABLE_C=1 timeout 200 $PY bench/bench_adapters.py --device cuda --rounds 15 \
  --json "$OUT/adapters_cuda_torch.json" 2>&1 | log
fi
stage done
