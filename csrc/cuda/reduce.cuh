// Warp/block reductions shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

namespace tta::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Running moments (count, mean, sum of squared deviations), merged with Chan's formula.
struct Welford {
  float n = 0.f, mean = 0.f, m2 = 0.f;

  __device__ __forceinline__ void push(float v) {
    n += 1.f;
    const float d = v - mean;
    mean += d / n;
    m2 += d * (v - mean);
  }
  __device__ __forceinline__ void merge(float nb, float mb, float m2b) {
    const float total = n + nb;
    if (total == 0.f) return;
    const float delta = mb - mean;
    const float fb = nb / total;
    mean += delta * fb;
    m2 += m2b + delta * delta * n * fb;
    n = total;
  }
};

__device__ __forceinline__ Welford warp_reduce(Welford w) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float nb = __shfl_down_sync(kFullMask, w.n, offset);
    const float mb = __shfl_down_sync(kFullMask, w.mean, offset);
    const float m2b = __shfl_down_sync(kFullMask, w.m2, offset);
    w.merge(nb, mb, m2b);
  }
  return w;
}

// Block-wide merge (blockDim.x a multiple of 32, <= 1024); the result is valid in thread 0.
__device__ __forceinline__ Welford block_reduce(Welford w) {
  __shared__ float sn[32], smean[32], sm2[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  w = warp_reduce(w);
  if (lane == 0) {
    sn[warp] = w.n;
    smean[warp] = w.mean;
    sm2[warp] = w.m2;
  }
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x >> 5;
    Welford r;
    if (lane < n_warps) {
      r.n = sn[lane];
      r.mean = smean[lane];
      r.m2 = sm2[lane];
    }
    w = warp_reduce(r);
  }
  return w;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Block-wide max/sum; every thread gets the result. `scratch` holds 32 floats of shared memory.
template <bool kMax>
__device__ __forceinline__ float block_all_reduce(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = lane < n_warps ? scratch[lane] : (kMax ? -INFINITY : 0.f);
  return kMax ? warp_max(r) : warp_sum(r);
}

}  // namespace tta::cuda
