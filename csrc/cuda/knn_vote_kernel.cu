// CUDA kernels of tta::knn_vote: tiled GEMM similarities + split top-k scan + merge + softmax vote.
//
// The memory is processed in row tiles so the (B, T) similarity block stays bounded for any M:
//   1. row_norms_kernel: per-row squared norms (warp per row) of the queries and of each tile,
//      giving the metric's correction terms (1/|x| for cosine, |x|^2 for l2).
//   2. cuBLAS GEMM (at::mm) of the queries with the fp32 tile.
//   3. topk_merge_kernel, grid (B, splits): each query's tile columns are cut into `splits`
//      contiguous ranges, one block per (query, range), so few queries still fill the GPU
//      (B * splits >= ~4x the SM count when the memory is large); each thread loads
//      kScanUnroll similarities ahead of merging them. Each block keeps the running
//      top-k of its range slot (sorted, in global memory, (B, splits, kp)) across tiles: threads
//      apply the metric correction on the fly, keep values above the current k-th best (warp
//      ballot + one shared atomic per warp to compact survivors into a shared buffer) and a
//      bitonic sort of the buffer re-establishes the top-k whenever it could overflow.
//   4. the same kernel, grid (B, 1), merges the splits' lists of each query into its final top-k
//      (no metric correction; indices come from the lists). Skipped when splits == 1.
//   5. vote_kernel: one block per query, block max/sum reductions for the softmax over its k
//      neighbours, then the weights are added to the label columns of the score row.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../ops/common.h"
#include "reduce.cuh"

namespace tta::cuda {
namespace {

constexpr int kThreads = 256;   // threads of the merge/vote blocks (>= kMaxK)
constexpr int kCapacity = 1024;  // candidate buffer of the merge: running top-k + survivors
constexpr float kNormEps = 1e-12f;
static_assert(kThreads >= kMaxK, "one vote thread per neighbour");
static_assert(kCapacity >= kMaxK + 2 * kThreads, "room for at least two chunks between sorts");
constexpr int64_t kMinSplitCols = 2048;  // fewest similarity columns a (query, split) block scans
constexpr int64_t kMaxSplits = 64;
constexpr int kScanUnroll = 4;  // similarity loads in flight per thread in the scan

template <typename scalar_t>
__global__ void row_norms_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t D, int metric,
                                 float* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const scalar_t* p = x + row * D;
  float s = 0.f;
  for (int64_t d = lane; d < D; d += 32) {
    const float v = static_cast<float>(p[d]);
    s += v * v;
  }
  s = warp_sum(s);
  if (lane == 0) out[row] = metric == static_cast<int>(Metric::Cosine) ? 1.f / fmaxf(sqrtf(s), kNormEps) : s;
}

// Descending bitonic sort of kCapacity (value, index) pairs in shared memory.
__device__ void bitonic_sort_desc(float* v, int64_t* id) {
  for (int size = 2; size <= kCapacity; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int t = threadIdx.x; t < kCapacity / 2; t += blockDim.x) {
        const int lo = 2 * t - (t & (stride - 1));
        const int hi = lo + stride;
        const bool descending = (lo & size) == 0;
        const float a = v[lo], b = v[hi];
        if (descending ? (a < b) : (a > b)) {
          v[lo] = b;
          v[hi] = a;
          const int64_t tmp = id[lo];
          id[lo] = id[hi];
          id[hi] = tmp;
        }
      }
    }
  }
  __syncthreads();
}

// Merges values[b, begin:end) into the sorted top-kp list (b, split) of best_v/best_i, with
// begin = split * chunk, end = min(len, begin + chunk), split = blockIdx.y, b = blockIdx.x.
// Index of value j: idx[b * row_stride + j] when idx is given (merging lists), else index_base + j.
// Metric correction (similarity rows only): cosine v * q_aux[b] * m_aux[j]; l2 2v - q_aux[b] - m_aux[j].
__global__ void topk_merge_kernel(const float* __restrict__ values, const int64_t* __restrict__ idx,
                                  int64_t row_stride, int64_t len, int64_t chunk, int64_t index_base,
                                  const float* __restrict__ q_aux, const float* __restrict__ m_aux, int metric,
                                  int k, int kp, float* __restrict__ best_v, int64_t* __restrict__ best_i) {
  __shared__ float sv[kCapacity];
  __shared__ int64_t si[kCapacity];
  __shared__ int count;
  __shared__ float threshold;
  const int64_t b = blockIdx.x;
  const int64_t list = (b * gridDim.y + blockIdx.y) * kp;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t end = min(len, begin + chunk);
  const float* row = values + b * row_stride;
  const int64_t* row_idx = idx ? idx + b * row_stride : nullptr;
  const float qa = q_aux ? q_aux[b] : 0.f;

  for (int t = threadIdx.x; t < kCapacity; t += blockDim.x) {
    sv[t] = t < kp ? best_v[list + t] : -INFINITY;
    si[t] = t < kp ? best_i[list + t] : -1;
  }
  if (threadIdx.x == 0) {
    count = kp;
    threshold = best_v[list + k - 1];
  }
  // kScanUnroll values per thread are loaded up front (independent loads in flight), then merged
  // one round of blockDim.x values at a time. Loop bounds are uniform across the block.
  for (int64_t base = begin; base < end; base += static_cast<int64_t>(kScanUnroll) * blockDim.x) {
    float vals[kScanUnroll];
    int64_t ids[kScanUnroll];
#pragma unroll
    for (int r = 0; r < kScanUnroll; ++r) {
      const int64_t j = base + static_cast<int64_t>(r) * blockDim.x + threadIdx.x;
      float v = -INFINITY;
      int64_t id = -1;
      if (j < end) {
        v = row[j];
        id = row_idx ? row_idx[j] : index_base + j;
        if (metric == static_cast<int>(Metric::Cosine)) {
          v *= qa * m_aux[j];
        } else if (metric == static_cast<int>(Metric::L2)) {
          v = 2.f * v - qa - m_aux[j];
        }
      }
      vals[r] = v;
      ids[r] = id;
    }
#pragma unroll
    for (int r = 0; r < kScanUnroll; ++r) {
      __syncthreads();  // previous round's writes (and the initial load) are visible
      const int current = count;
      __syncthreads();  // everyone has read `count` before this round's atomics change it
      if (current + static_cast<int>(blockDim.x) > kCapacity) {
        bitonic_sort_desc(sv, si);
        for (int t = kp + threadIdx.x; t < kCapacity; t += blockDim.x) {
          sv[t] = -INFINITY;
          si[t] = -1;
        }
        if (threadIdx.x == 0) {
          count = kp;
          threshold = sv[k - 1];
        }
        __syncthreads();
      }
      const bool keep = ids[r] >= 0 && vals[r] > threshold;  // NaN, padding and empty list slots never pass
      const unsigned mask = __ballot_sync(kFullMask, keep);
      const int lane = threadIdx.x & 31;
      int warp_base = 0;
      if (lane == 0 && mask) warp_base = atomicAdd(&count, __popc(mask));
      warp_base = __shfl_sync(kFullMask, warp_base, 0);
      if (keep) {
        const int pos = warp_base + __popc(mask & ((1u << lane) - 1u));
        sv[pos] = vals[r];
        si[pos] = ids[r];
      }
    }
  }
  bitonic_sort_desc(sv, si);
  for (int t = threadIdx.x; t < kp; t += blockDim.x) {
    best_v[list + t] = sv[t];
    best_i[list + t] = si[t];
  }
}

__global__ void vote_kernel(const float* __restrict__ best_v, const int64_t* __restrict__ best_i, int kp, int k,
                            const int64_t* __restrict__ labels, int64_t C, float inv_temp,
                            float* __restrict__ scores, int64_t* __restrict__ out_idx,
                            float* __restrict__ out_sim) {
  __shared__ float scratch[32];
  const int64_t b = blockIdx.x;
  const int t = threadIdx.x;
  const bool in_k = t < k;
  const int64_t idx = in_k ? best_i[b * kp + t] : -1;
  const bool valid = idx >= 0;
  const float v = valid ? best_v[b * kp + t] : -INFINITY;
  const float top = block_all_reduce<true>(v, scratch);
  const float e = valid ? __expf((v - top) * inv_temp) : 0.f;
  const float z = block_all_reduce<false>(e, scratch);
  if (in_k) {
    out_idx[b * k + t] = idx;
    out_sim[b * k + t] = v;
  }
  if (valid) {
    const int64_t label = labels[idx];
    CUDA_KERNEL_ASSERT(label >= 0 && label < C);
    atomicAdd(scores + b * C + label, e / z);
  }
}

template <typename scalar_t>
void launch_row_norms(const at::Tensor& x, Metric metric, at::Tensor& out, cudaStream_t stream) {
  const int64_t rows = x.size(0);
  if (rows == 0) return;
  constexpr int kWarps = kThreads / 32;
  row_norms_kernel<scalar_t><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
      x.const_data_ptr<scalar_t>(), rows, x.size(1), static_cast<int>(metric), out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_vote_cuda(const at::Tensor& queries, const at::Tensor& memory_in,
                                                             const at::Tensor& labels_in, int64_t num_classes,
                                                             int64_t k, double temperature,
                                                             c10::string_view metric_name) {
  check_knn_args(queries, memory_in, labels_in, num_classes, k, temperature);
  const Metric metric = parse_metric(metric_name);
  const c10::cuda::CUDAGuard guard(queries.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = queries.size(0), M = memory_in.size(0);
  const auto f32 = queries.options().dtype(at::kFloat);
  const at::Tensor q = queries.to(at::kFloat).contiguous();
  const at::Tensor memory = memory_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();

  int kp = 1;
  while (kp < k) kp <<= 1;
  at::Tensor q_aux = at::empty({B}, f32);
  if (metric != Metric::InnerProduct && B > 0) launch_row_norms<float>(q, metric, q_aux, stream);

  // Tile: at most 64 Mi similarities (256 MiB) per GEMM, at least 4096 rows.
  const int64_t tile = std::max<int64_t>(4096, std::min<int64_t>(M, (int64_t{1} << 26) / std::max<int64_t>(B, 1)));
  // Splits of each tile's columns: enough (query, split) blocks for ~4 per SM (B * splits >= 4x the
  // SM count), each range at least kMinSplitCols columns (below that the per-block list
  // load/sort/store dominates), at most kMaxSplits lists per query for the merge.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, queries.device().index()));
  const int64_t first_tile = std::min(tile, M);
  int64_t splits = (4 * static_cast<int64_t>(sms) + std::max<int64_t>(B, 1) - 1) / std::max<int64_t>(B, 1);
  splits = std::min<int64_t>({splits, (first_tile + kMinSplitCols - 1) / kMinSplitCols, kMaxSplits});
  splits = std::max<int64_t>(splits, 1);
  at::Tensor part_v = at::full({B, splits, kp}, -INFINITY, f32);
  at::Tensor part_i = at::full({B, splits, kp}, -1, queries.options().dtype(at::kLong));
  at::Tensor m_aux = at::empty({std::max<int64_t>(first_tile, 1)}, f32);
  for (int64_t start = 0; start < M && B > 0; start += tile) {
    const int64_t T = std::min(tile, M - start);
    const at::Tensor block = memory.narrow(0, start, T);
    if (metric != Metric::InnerProduct) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, block.scalar_type(), "knn_row_norms",
                                      [&] { launch_row_norms<scalar_t>(block, metric, m_aux, stream); });
    }
    const at::Tensor sims = at::mm(q, block.to(at::kFloat).t());  // (B, T) fp32, contiguous
    const int64_t chunk = (T + splits - 1) / splits;
    topk_merge_kernel<<<dim3(static_cast<unsigned>(B), static_cast<unsigned>(splits)), kThreads, 0, stream>>>(
        sims.const_data_ptr<float>(), nullptr, T, T, chunk, start,
        metric == Metric::InnerProduct ? nullptr : q_aux.const_data_ptr<float>(), m_aux.const_data_ptr<float>(),
        static_cast<int>(metric), static_cast<int>(k), kp, part_v.mutable_data_ptr<float>(),
        part_i.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor best_v = part_v, best_i = part_i;  // (B, 1, kp) when there is one split
  if (splits > 1 && B > 0) {
    best_v = at::full({B, 1, kp}, -INFINITY, f32);
    best_i = at::full({B, 1, kp}, -1, queries.options().dtype(at::kLong));
    const int64_t len = splits * kp;
    topk_merge_kernel<<<dim3(static_cast<unsigned>(B), 1u), kThreads, 0, stream>>>(
        part_v.const_data_ptr<float>(), part_i.const_data_ptr<int64_t>(), len, len, len, 0, nullptr, nullptr,
        static_cast<int>(Metric::InnerProduct), static_cast<int>(k), kp, best_v.mutable_data_ptr<float>(),
        best_i.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  at::Tensor scores = at::zeros({B, num_classes}, f32);
  at::Tensor out_idx = at::empty({B, k}, queries.options().dtype(at::kLong));
  at::Tensor out_sim = at::empty({B, k}, f32);
  if (B > 0) {
    vote_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        best_v.const_data_ptr<float>(), best_i.const_data_ptr<int64_t>(), kp, static_cast<int>(k),
        labels.const_data_ptr<int64_t>(), num_classes, static_cast<float>(1.0 / temperature),
        scores.mutable_data_ptr<float>(), out_idx.mutable_data_ptr<int64_t>(), out_sim.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {scores, out_idx, out_sim};
}

}  // namespace

TORCH_LIBRARY_IMPL(tta, CUDA, m) { m.impl("knn_vote", &knn_vote_cuda); }

}  // namespace tta::cuda
