// CUDA kernels of tta::bn_calibrate / tta::bn_calibrate_update / tta::bn_calibrate_backward.
//
// Every pass reads the input as packs of V = 16 bytes / element size values (float4 for fp32,
// 8 halves) when the innermost run (S = H*W for NCHW, C for channels_last) is a multiple of V and
// the pointers are 16-byte aligned, else one value at a time (V = 1); each thread keeps kUnroll
// independent pack loads in flight. Indices are tracked incrementally (no division per element).
// Forward:
// 1. partial moments, grid (channel blocks, splits): each block reduces a contiguous slice of one
//    channel's values (NCHW: the channel's N planes as one sequence; channels_last: a range of
//    rows, with TX lanes x TY rows per block, each lane owning V adjacent channels). Threads run
//    Welford in fp32, merging one (count, mean, M2) per kUnroll packs (Chan's formula), and the
//    block merges them (warp shuffles / a shared-memory tree); splits are chosen to give ~8 blocks
//    per SM so the whole GPU streams the input.
// 2. finalize: one warp per channel merges its splits, mixes with the source statistics, writes
//    scale/shift and the batch statistics, and (update variant) moves the running statistics.
// 3. apply: y = x * scale[c] + shift[c], a grid-stride streaming pass over packs.
// Backward: the same three-pass structure with fp32 sums of g and g * (x - m) per split.
// Small NCHW inputs (<= kFusedMaxValues values per channel) take one launch per direction instead:
// one block per channel reduces, finalizes and writes its channel.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "../ops/common.h"
#include "reduce.cuh"

namespace tta::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;     // pack loads in flight per thread and loop iteration
constexpr int kVecBytes = 16;  // one 128-bit load per pack
constexpr int kBlocksPerSm = 8;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* __restrict__ p, int64_t pack_index) {
  return reinterpret_cast<const Pack<T, V>*>(p)[pack_index];
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* __restrict__ p, int64_t pack_index, const Pack<T, V>& v) {
  reinterpret_cast<Pack<T, V>*>(p)[pack_index] = v;
}

// Position (n, s) of pack i = n * Sv + s within one channel's N planes of Sv packs, moved forward
// by a fixed stride without dividing: s += ds, n += dn, and one carry.
struct PlaneCursor {
  int64_t n, s, dn, ds, Sv;
  __device__ PlaneCursor(int64_t i, int64_t stride, int64_t Sv_) : Sv(Sv_) {
    n = i / Sv;
    s = i - n * Sv;
    dn = stride / Sv;
    ds = stride - dn * Sv;
  }
  __device__ __forceinline__ void advance() {
    s += ds;
    n += dn;
    if (s >= Sv) {
      s -= Sv;
      ++n;
    }
  }
};

// Channel of flat pack i of a (P planes x Sv packs) tensor whose plane p has channel p % C,
// moved forward by a fixed stride without dividing (channels_last: Sv = 1, C = packs per row).
struct ChannelCursor {
  int64_t s, c, ds, dc, Sv, C;
  __device__ ChannelCursor(int64_t i, int64_t stride, int64_t Sv_, int64_t C_) : Sv(Sv_), C(C_) {
    const int64_t p = i / Sv;
    s = i - p * Sv;
    c = p % C;
    const int64_t dp = stride / Sv;
    ds = stride - dp * Sv;
    dc = dp % C;
  }
  __device__ __forceinline__ void advance() {
    s += ds;
    c += dc;  // < 2C - 1 after the carry below, so one subtraction wraps it
    if (s >= Sv) {
      s -= Sv;
      ++c;
    }
    if (c >= C) c -= C;
  }
};

// Merges `valid` packs (valid * V values) into w: one Chan update per group of values. The group's
// moments are taken relative to its first value (offset data loses no digits to large sums).
template <typename T, int V>
__device__ __forceinline__ void push_packs(Welford& w, const Pack<T, V> (&p)[kUnroll], int valid) {
  if (valid == 0) return;
  const float pivot = static_cast<float>(p[0].v[0]);
  float sum = 0.f;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < valid) {
#pragma unroll
      for (int j = 0; j < V; ++j) sum += static_cast<float>(p[u].v[j]) - pivot;
    }
  }
  const float cnt = static_cast<float>(valid * V);
  const float md = sum / cnt;
  float m2 = 0.f;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < valid) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float d = (static_cast<float>(p[u].v[j]) - pivot) - md;
        m2 += d * d;
      }
    }
  }
  w.merge(cnt, pivot + md, m2);
}

// This thread's moments of channel c's packs [begin, end) (NCHW: N planes of Sv packs, plane stride
// C * Sv), the block's threads taking every blockDim.x-th pack.
template <typename scalar_t, int V>
__device__ __forceinline__ Welford thread_moments_nchw(const scalar_t* __restrict__ x, int64_t C, int64_t c,
                                                       int64_t Sv, int64_t begin, int64_t end) {
  int64_t i = begin + threadIdx.x;
  PlaneCursor cur(i, blockDim.x, Sv);
  Welford w;
  while (i < end) {
    Pack<scalar_t, V> p[kUnroll];
    int valid = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i < end) {
        p[u] = load_pack<scalar_t, V>(x, (cur.n * C + c) * Sv + cur.s);
        ++valid;
        i += blockDim.x;
        cur.advance();
      }
    }
    push_packs<scalar_t, V>(w, p, valid);
  }
  return w;
}

// NCHW: block (c, split) reduces packs [split * per_split, +per_split) of channel c's N * Sv packs.
template <typename scalar_t, int V>
__global__ void moments_nchw_kernel(const scalar_t* __restrict__ x, int64_t C, int64_t Sv, int64_t total,
                                    int64_t per_split, float* __restrict__ part) {
  const int64_t c = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  x += static_cast<int64_t>(blockIdx.z) * total * C * V;  // ghost group z: its own batch slice
  part += static_cast<int64_t>(blockIdx.z) * 3 * C * splits;
  const int64_t begin = split * per_split, end = min(total, begin + per_split);
  Welford w = block_reduce(thread_moments_nchw<scalar_t, V>(x, C, c, Sv, begin, end));
  if (threadIdx.x == 0) {
    float* out = part + 3 * (c * splits + split);
    out[0] = w.n;
    out[1] = w.mean;
    out[2] = w.m2;
  }
}

// Rows (channels_last, or one value per channel and sample): R rows of Cv packs. Block
// (blockIdx.x, split) with blockDim (TX, TY), TY a power of two: lane x owns pack column
// cv = blockIdx.x * TX + x (channels cv * V .. cv * V + V - 1) over rows [begin, end).
template <typename scalar_t, int V>
__global__ void moments_rows_kernel(const scalar_t* __restrict__ x, int64_t R, int64_t Cv, int64_t per_split,
                                    float* __restrict__ part) {
  __shared__ float sh_n[kThreads], sh_mean[kThreads * V], sh_m2[kThreads * V];
  const int TX = blockDim.x, TY = blockDim.y;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * TX + threadIdx.x;
  const int64_t split = blockIdx.y, splits = gridDim.y;
  x += static_cast<int64_t>(blockIdx.z) * R * Cv * V;  // ghost group z: its own batch slice
  part += static_cast<int64_t>(blockIdx.z) * 3 * Cv * V * splits;
  const int64_t begin = split * per_split, end = min(R, begin + per_split);
  Welford w[V];
  if (cv < Cv) {
    for (int64_t r = begin + threadIdx.y; r < end; r += static_cast<int64_t>(kUnroll) * TY) {
      Pack<scalar_t, V> p[kUnroll];
      int valid = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t row = r + static_cast<int64_t>(u) * TY;
        if (row < end) {
          p[u] = load_pack<scalar_t, V>(x, row * Cv + cv);
          ++valid;
        }
      }
      const float cnt = static_cast<float>(valid);  // >= 1: row r itself is valid
#pragma unroll
      for (int j = 0; j < V; ++j) {  // moments of the group relative to its first value, as push_packs
        const float pivot = static_cast<float>(p[0].v[j]);
        float sum = 0.f;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) sum += u < valid ? static_cast<float>(p[u].v[j]) - pivot : 0.f;
        const float md = sum / cnt;
        float m2 = 0.f;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const float d = u < valid ? (static_cast<float>(p[u].v[j]) - pivot) - md : 0.f;
          m2 += d * d;
        }
        w[j].merge(cnt, pivot + md, m2);
      }
    }
  }
  const int t = threadIdx.y * TX + threadIdx.x;
  sh_n[t] = w[0].n;  // every channel of a lane saw the same rows
#pragma unroll
  for (int j = 0; j < V; ++j) {
    sh_mean[t * V + j] = w[j].mean;
    sh_m2[t * V + j] = w[j].m2;
  }
  for (int h = TY / 2; h > 0; h >>= 1) {
    __syncthreads();
    if (static_cast<int>(threadIdx.y) < h) {
      const int o = (threadIdx.y + h) * TX + threadIdx.x;
      const float na = sh_n[t], nb = sh_n[o];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        Welford a;
        a.n = na;
        a.mean = sh_mean[t * V + j];
        a.m2 = sh_m2[t * V + j];
        a.merge(nb, sh_mean[o * V + j], sh_m2[o * V + j]);
        sh_mean[t * V + j] = a.mean;
        sh_m2[t * V + j] = a.m2;
      }
      sh_n[t] = na + nb;
    }
  }
  if (threadIdx.y == 0 && cv < Cv) {  // row 0 reads only its own tree entries: no barrier needed
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float* out = part + 3 * ((cv * V + j) * splits + split);
      out[0] = sh_n[t];
      out[1] = sh_mean[t * V + j];
      out[2] = sh_m2[t * V + j];
    }
  }
}

// Mixes channel c's batch moments `w` with the source statistics; writes scale/shift (when given),
// the batch statistics and (update variant) the running statistics. Returns (scale, shift).
__device__ __forceinline__ float2 finalize_channel(int64_t c, const Welford& w, const float* src_mean,
                                                   const float* src_var, const float* __restrict__ weight,
                                                   const float* __restrict__ bias, float* running_mean,
                                                   float* running_var, float a, float momentum, float eps,
                                                   float* __restrict__ batch_mean, float* __restrict__ batch_var) {
  const float bm = w.mean, bv = w.n > 0.f ? w.m2 / w.n : 0.f;
  const float mean = a * src_mean[c] + (1.f - a) * bm;
  const float var = a * src_var[c] + (1.f - a) * bv;
  float s = rsqrtf(var + eps);
  if (weight) s *= weight[c];
  const float t = (bias ? bias[c] : 0.f) - mean * s;
  batch_mean[c] = bm;
  batch_var[c] = bv;
  if (running_mean) {  // read above (src_mean aliases running_mean), written last
    const float unbiased = w.n > 1.f ? w.m2 / (w.n - 1.f) : bv;
    running_mean[c] = (1.f - momentum) * running_mean[c] + momentum * bm;
    running_var[c] = (1.f - momentum) * running_var[c] + momentum * unbiased;
  }
  return make_float2(s, t);
}

// One warp per channel: the lanes merge the channel's splits (strided), then a shuffle merge. A
// thread per channel walking its splits serially made this pass the slowest of the three when one
// channel block spreads over ~1000 splits (channels_last: up to 86% of the op's time on the H200).
constexpr int kFinalizeWarps = kThreads / 32;  // channels per finalize block

// `groups` ghost groups: row gc = g * C + c of the partials, scale/shift and batch statistics
// belongs to channel c of group g (the source statistics and affine are per channel; running
// statistics are only moved with one group).
__global__ void finalize_kernel(const float* __restrict__ part, int64_t C, int64_t groups, int64_t splits,
                                const float* src_mean, const float* src_var, const float* __restrict__ weight,
                                const float* __restrict__ bias, float* running_mean, float* running_var, float a,
                                float momentum, float eps, float* __restrict__ scale, float* __restrict__ shift,
                                float* __restrict__ batch_mean, float* __restrict__ batch_var) {
  const int64_t gc = static_cast<int64_t>(blockIdx.x) * kFinalizeWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (gc >= groups * C) return;  // uniform per warp: the shuffles below see all 32 lanes
  Welford w;
  for (int64_t s = lane; s < splits; s += 32) {
    const float* p = part + 3 * (gc * splits + s);
    w.merge(p[0], p[1], p[2]);
  }
  w = warp_reduce(w);
  if (lane != 0) return;
  const int64_t c = groups == 1 ? gc : gc % C, base = gc - c;
  const float2 st = finalize_channel(c, w, src_mean, src_var, weight, bias, running_mean, running_var, a, momentum,
                                     eps, batch_mean + base, batch_var + base);
  scale[gc] = st.x;
  shift[gc] = st.y;
}

// y = x * scale[c] + shift[c] over nvec packs; packs of one plane share a channel (NCHW), or
// (kRows) pack column c covers channels c * V .. c * V + V - 1.
template <typename scalar_t, int V, bool kRows>
__global__ void apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                             const float* __restrict__ scale, const float* __restrict__ shift, int64_t nvec,
                             int64_t Sv, int64_t Cdim) {
  // ghost group z: its own slice of nvec packs and its own C scale/shift values
  x += static_cast<int64_t>(blockIdx.z) * nvec * V;
  y += static_cast<int64_t>(blockIdx.z) * nvec * V;
  scale += static_cast<int64_t>(blockIdx.z) * (kRows ? Cdim * V : Cdim);
  shift += static_cast<int64_t>(blockIdx.z) * (kRows ? Cdim * V : Cdim);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  ChannelCursor cur(i, stride, Sv, Cdim);
  while (i < nvec) {
    Pack<scalar_t, V> in[kUnroll];
    int64_t pos[kUnroll], ch[kUnroll];
    int valid = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i < nvec) {
        in[u] = load_pack<scalar_t, V>(x, i);
        pos[u] = i;
        ch[u] = cur.c;
        ++valid;
        i += stride;
        cur.advance();
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u < valid) {
        Pack<scalar_t, V> out;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int64_t c = kRows ? ch[u] * V + j : ch[u];
          out.v[j] = static_cast<scalar_t>(static_cast<float>(in[u].v[j]) * scale[c] + shift[c]);
        }
        store_pack<scalar_t, V>(y, pos[u], out);
      }
    }
  }
}

// Small NCHW inputs (at most kFusedMaxValues values per channel): one block per channel computes the
// channel's moments, mixes them and normalises the channel in one launch (its second read of the
// channel hits the cache). One launch instead of three: such inputs are launch-bound.
constexpr int kFusedThreads = 512;
constexpr int64_t kFusedMaxValues = 16384;

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kFusedThreads)
    fused_channel_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t C, int64_t Sv,
                         int64_t total, const float* src_mean, const float* src_var,
                         const float* __restrict__ weight, const float* __restrict__ bias, float* running_mean,
                         float* running_var, float a, float momentum, float eps, float* __restrict__ batch_mean,
                         float* __restrict__ batch_var) {
  __shared__ float2 st;
  const int64_t c = blockIdx.x;
  x += static_cast<int64_t>(blockIdx.z) * total * C * V;  // ghost group z: its own batch slice
  y += static_cast<int64_t>(blockIdx.z) * total * C * V;
  batch_mean += static_cast<int64_t>(blockIdx.z) * C;
  batch_var += static_cast<int64_t>(blockIdx.z) * C;
  const Welford w = block_reduce(thread_moments_nchw<scalar_t, V>(x, C, c, Sv, 0, total));
  if (threadIdx.x == 0) {
    st = finalize_channel(c, w, src_mean, src_var, weight, bias, running_mean, running_var, a, momentum, eps,
                          batch_mean, batch_var);
  }
  __syncthreads();
  const float scale = st.x, shift = st.y;
  int64_t i = threadIdx.x;
  PlaneCursor out(i, blockDim.x, Sv);
  for (; i < total; i += blockDim.x, out.advance()) {
    const int64_t pos = (out.n * C + c) * Sv + out.s;
    const Pack<scalar_t, V> in = load_pack<scalar_t, V>(x, pos);
    Pack<scalar_t, V> r;
#pragma unroll
    for (int j = 0; j < V; ++j) r.v[j] = static_cast<scalar_t>(static_cast<float>(in.v[j]) * scale + shift);
    store_pack<scalar_t, V>(y, pos, r);
  }
}

// Launch geometry shared by the forward and backward passes.
struct Plan {
  bool rows;        // channels_last (or S == 1): channels are the innermost dimension
  int64_t V;        // values per pack
  int64_t Sv;       // NCHW: packs per plane
  int64_t Cv;       // rows: packs per row
  int64_t R;        // rows: N * S
  int TX, TY;       // rows: block shape
  int64_t channel_blocks, splits, per_split;
  unsigned apply_blocks;
  bool fused;       // NCHW with at most kFusedMaxValues per channel: one block per channel, one launch
};

inline bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

inline int sm_count(const at::Tensor& x) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  return std::max(sms, 1);
}

// `vec_ok`: every tensor the passes read or write is 16-byte aligned. `groups` > 1: ghost groups,
// each a contiguous slice of N / groups samples with its own statistics (the geometry is one
// group's; the grid's z dimension runs the groups, and the GPU is shared among them).
inline Plan make_plan(const at::Tensor& x, bool rows, bool vec_ok, int64_t groups = 1) {
  Plan p{};
  const int64_t N = x.size(0) / groups, C = x.size(1);
  const int64_t S = x.numel() / (x.size(0) * C);
  const int64_t pack = kVecBytes / static_cast<int64_t>(x.element_size());
  const int64_t inner = rows ? C : S;
  p.rows = rows;
  p.V = vec_ok && inner % pack == 0 ? pack : 1;
  const int64_t sms = sm_count(x);
  const int64_t target = (kBlocksPerSm * sms + groups - 1) / groups;
  int64_t units, min_per_split;
  if (rows) {
    p.R = N * S;
    p.Cv = C / p.V;
    int tx = 1;
    while (tx < p.Cv && tx < 32) tx <<= 1;
    p.TX = tx;
    p.TY = kThreads / tx;
    p.channel_blocks = (p.Cv + tx - 1) / tx;
    units = p.R;
    min_per_split = static_cast<int64_t>(p.TY) * kUnroll * 2;  // >= 2 iterations per lane before the tree
  } else {
    p.Sv = S / p.V;
    p.channel_blocks = C;
    units = N * p.Sv;
    min_per_split = static_cast<int64_t>(kThreads) * kUnroll;
  }
  int64_t splits = (target + p.channel_blocks - 1) / p.channel_blocks;
  splits = std::min<int64_t>({splits, (units + min_per_split - 1) / min_per_split, 65535});
  p.splits = std::max<int64_t>(splits, 1);
  p.per_split = (units + p.splits - 1) / p.splits;
  const int64_t nvec = N * C * S / p.V;
  p.apply_blocks = static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>((nvec + kThreads * kUnroll - 1) / (kThreads * kUnroll), target)));
  TORCH_CHECK(p.channel_blocks <= 0x7fffffff, "bn_calibrate: too many channels");
  TORCH_CHECK(groups <= 65535, "bn_calibrate_grouped: at most 65535 groups, got ", groups);
  p.fused = !rows && N * S <= kFusedMaxValues;
  return p;
}

// Calls f(std::integral_constant<int, V>) with the plan's pack width.
template <typename scalar_t, typename F>
void with_pack(const Plan& p, F&& f) {
  constexpr int kPack = kVecBytes / static_cast<int>(sizeof(scalar_t));
  if (p.V == kPack) {
    f(std::integral_constant<int, kPack>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_forward(const at::Tensor& x_in, const at::Tensor& src_mean,
                                                          const at::Tensor& src_var,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias, double a,
                                                          double momentum, double eps, bool update,
                                                          int64_t groups = 1) {
  check_bn_args(x_in, src_mean, src_var, weight, bias);
  TORCH_CHECK(x_in.numel() > 0, "bn_calibrate: empty input");
  TORCH_CHECK(groups >= 1 && x_in.size(0) % groups == 0, "bn_calibrate_grouped: batch of ", x_in.size(0),
              " is not divisible into ", groups, " groups");
  TORCH_CHECK(groups == 1 || !update, "bn_calibrate_update: one group only");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t C = x_in.size(1), n = x_in.size(0) / groups;
  const int64_t S = x_in.numel() / (x_in.size(0) * C);
  const BnLayout layout = bn_layout(x_in);
  const bool rows = layout.channels_last || S == 1;
  const at::Tensor& x = layout.x;
  at::Tensor y = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  // (groups, C) statistics: one row per ghost group (groups == 1: the op's (C,) outputs)
  at::Tensor batch_mean = at::empty({groups * C}, f32), batch_var = at::empty({groups * C}, f32);
  if (update) {
    TORCH_CHECK(src_mean.is_contiguous() && src_var.is_contiguous(),
                "bn_calibrate_update: running statistics must be contiguous");
  }
  const at::Tensor mean_c = src_mean.contiguous(), var_c = src_var.contiguous();
  const at::Tensor w = weight.has_value() ? weight->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();

  const Plan plan = make_plan(x, rows, aligned(x.const_data_ptr()) && aligned(y.const_data_ptr()), groups);
  // One workspace (not needed by the fused path), per group: scale (C), shift (C), partial
  // moments (C, splits, 3).
  const int64_t GC = groups * C;
  at::Tensor work = plan.fused ? at::Tensor() : at::empty({GC * (2 + 3 * plan.splits)}, f32);
  float* scale = plan.fused ? nullptr : work.mutable_data_ptr<float>();
  float* shift = plan.fused ? nullptr : scale + GC;
  float* part = plan.fused ? nullptr : shift + GC;
  const unsigned G = static_cast<unsigned>(groups);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_calibrate_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    with_pack<scalar_t>(plan, [&](auto pack) {
      constexpr int V = decltype(pack)::value;
      if (plan.fused) {
        fused_channel_kernel<scalar_t, V><<<dim3(static_cast<unsigned>(C), 1, G), kFusedThreads, 0, stream>>>(
            xp, yp, C, plan.Sv, n * plan.Sv, mean_c.const_data_ptr<float>(), var_c.const_data_ptr<float>(),
            w.defined() ? w.const_data_ptr<float>() : nullptr, b.defined() ? b.const_data_ptr<float>() : nullptr,
            update ? mean_c.mutable_data_ptr<float>() : nullptr, update ? var_c.mutable_data_ptr<float>() : nullptr,
            static_cast<float>(a), static_cast<float>(momentum), static_cast<float>(eps),
            batch_mean.mutable_data_ptr<float>(), batch_var.mutable_data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      const dim3 grid(static_cast<unsigned>(plan.channel_blocks), static_cast<unsigned>(plan.splits), G);
      if (plan.rows) {
        moments_rows_kernel<scalar_t, V><<<grid, dim3(plan.TX, plan.TY), 0, stream>>>(xp, plan.R, plan.Cv,
                                                                                     plan.per_split, part);
      } else {
        moments_nchw_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(xp, C, plan.Sv, n * plan.Sv,
                                                                         plan.per_split, part);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      finalize_kernel<<<static_cast<unsigned>((GC + kFinalizeWarps - 1) / kFinalizeWarps), kThreads, 0, stream>>>(
          part, C, groups, plan.splits, mean_c.const_data_ptr<float>(), var_c.const_data_ptr<float>(),
          w.defined() ? w.const_data_ptr<float>() : nullptr, b.defined() ? b.const_data_ptr<float>() : nullptr,
          update ? mean_c.mutable_data_ptr<float>() : nullptr, update ? var_c.mutable_data_ptr<float>() : nullptr,
          static_cast<float>(a), static_cast<float>(momentum), static_cast<float>(eps), scale, shift,
          batch_mean.mutable_data_ptr<float>(), batch_var.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t nvec = x.numel() / groups / V;  // per group
      const dim3 apply_grid(plan.apply_blocks, 1, G);
      if (plan.rows) {
        apply_kernel<scalar_t, V, true><<<apply_grid, kThreads, 0, stream>>>(xp, yp, scale, shift, nvec, 1, plan.Cv);
      } else {
        apply_kernel<scalar_t, V, false><<<apply_grid, kThreads, 0, stream>>>(xp, yp, scale, shift, nvec, plan.Sv,
                                                                             C);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, batch_mean, batch_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_calibrate_cuda(const at::Tensor& x, const at::Tensor& src_mean,
                                                                 const at::Tensor& src_var,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const std::optional<at::Tensor>& bias,
                                                                 double source_weight, double eps) {
  return bn_forward(x, src_mean, src_var, weight, bias, source_weight, 0.0, eps, false);
}

// Ghost BatchNorm: `groups` equal, contiguous slices of the batch, each normalised with its own
// batch statistics (mixed with the shared source statistics), in one set of launches.
at::Tensor bn_calibrate_grouped_cuda(const at::Tensor& x, const at::Tensor& src_mean, const at::Tensor& src_var,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     double source_weight, double eps, int64_t groups) {
  return std::get<0>(bn_forward(x, src_mean, src_var, weight, bias, source_weight, 0.0, eps, false, groups));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_calibrate_update_cuda(
    const at::Tensor& x, at::Tensor& running_mean, at::Tensor& running_var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double source_weight, double momentum, double eps) {
  return bn_forward(x, running_mean, running_var, weight, bias, source_weight, momentum, eps, true);
}


// ---------------------------------------------------------------- backward
// This thread's sums of g and g * (x - center) over channel c's packs [begin, end) (NCHW), the
// block's threads taking every blockDim.x-th pack.
template <typename scalar_t, int V>
__device__ __forceinline__ float2 thread_grad_sums_nchw(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                                                        int64_t C, int64_t c, int64_t Sv, int64_t begin, int64_t end,
                                                        float center) {
  int64_t i = begin + threadIdx.x;
  PlaneCursor cur(i, blockDim.x, Sv);
  float sg = 0.f, sgx = 0.f;
  while (i < end) {
    Pack<scalar_t, V> g[kUnroll], v[kUnroll];
    int valid = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i < end) {
        const int64_t pos = (cur.n * C + c) * Sv + cur.s;
        g[u] = load_pack<scalar_t, V>(gy, pos);
        v[u] = load_pack<scalar_t, V>(x, pos);
        ++valid;
        i += blockDim.x;
        cur.advance();
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u < valid) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float gj = static_cast<float>(g[u].v[j]);
          sg += gj;
          sgx += gj * (static_cast<float>(v[u].v[j]) - center);
        }
      }
    }
  }
  return make_float2(sg, sgx);
}

// Per (channel, split): sum of g and of g * (x - m), m the mixed mean. Same slicing as the moments.
template <typename scalar_t, int V>
__global__ void grad_sums_nchw_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x, int64_t C,
                                      int64_t Sv, int64_t total, int64_t per_split,
                                      const float* __restrict__ src_mean, const float* __restrict__ batch_mean,
                                      float a, float* __restrict__ part) {
  __shared__ float scratch[32];
  const int64_t c = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const float center = a * src_mean[c] + (1.f - a) * batch_mean[c];
  const int64_t begin = split * per_split, end = min(total, begin + per_split);
  const float2 sums = thread_grad_sums_nchw<scalar_t, V>(gy, x, C, c, Sv, begin, end, center);
  const float sg = block_all_reduce<false>(sums.x, scratch);
  const float sgx = block_all_reduce<false>(sums.y, scratch);
  if (threadIdx.x == 0) {
    part[2 * (c * splits + split)] = sg;
    part[2 * (c * splits + split) + 1] = sgx;
  }
}

template <typename scalar_t, int V>
__global__ void grad_sums_rows_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x, int64_t R,
                                      int64_t Cv, int64_t per_split, const float* __restrict__ src_mean,
                                      const float* __restrict__ batch_mean, float a, float* __restrict__ part) {
  __shared__ float sh_g[kThreads * V], sh_gx[kThreads * V];
  const int TX = blockDim.x, TY = blockDim.y;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * TX + threadIdx.x;
  const int64_t split = blockIdx.y, splits = gridDim.y;
  const int64_t begin = split * per_split, end = min(R, begin + per_split);
  float sg[V], sgx[V], center[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    sg[j] = 0.f;
    sgx[j] = 0.f;
    center[j] = cv < Cv ? a * src_mean[cv * V + j] + (1.f - a) * batch_mean[cv * V + j] : 0.f;
  }
  if (cv < Cv) {
    for (int64_t r = begin + threadIdx.y; r < end; r += static_cast<int64_t>(kUnroll) * TY) {
      Pack<scalar_t, V> g[kUnroll], v[kUnroll];
      int valid = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t row = r + static_cast<int64_t>(u) * TY;
        if (row < end) {
          g[u] = load_pack<scalar_t, V>(gy, row * Cv + cv);
          v[u] = load_pack<scalar_t, V>(x, row * Cv + cv);
          ++valid;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (u < valid) {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float gj = static_cast<float>(g[u].v[j]);
            sg[j] += gj;
            sgx[j] += gj * (static_cast<float>(v[u].v[j]) - center[j]);
          }
        }
      }
    }
  }
  const int t = threadIdx.y * TX + threadIdx.x;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    sh_g[t * V + j] = sg[j];
    sh_gx[t * V + j] = sgx[j];
  }
  for (int h = TY / 2; h > 0; h >>= 1) {
    __syncthreads();
    if (static_cast<int>(threadIdx.y) < h) {
      const int o = (threadIdx.y + h) * TX + threadIdx.x;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        sh_g[t * V + j] += sh_g[o * V + j];
        sh_gx[t * V + j] += sh_gx[o * V + j];
      }
    }
  }
  if (threadIdx.y == 0 && cv < Cv) {  // row 0 reads only its own tree entries
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t c = cv * V + j;
      part[2 * (c * splits + split)] = sh_g[t * V + j];
      part[2 * (c * splits + split) + 1] = sh_gx[t * V + j];
    }
  }
}

// dx = A g + B x + K per channel from the channel's sums of g and g * (x - m); writes the weight and
// bias gradients and returns (A, B, K).
__device__ __forceinline__ float3 backward_channel(int64_t c, float sg, float sgx, const float* __restrict__ src_var,
                                                   const float* __restrict__ weight,
                                                   const float* __restrict__ batch_mean,
                                                   const float* __restrict__ batch_var, float a, float eps, float n,
                                                   float* __restrict__ grad_weight, float* __restrict__ grad_bias) {
  const float s = rsqrtf(a * src_var[c] + (1.f - a) * batch_var[c] + eps);
  const float w = weight ? weight[c] : 1.f;
  grad_bias[c] = sg;
  grad_weight[c] = s * sgx;
  const float d_mean = -s * w * sg;
  const float d_var = -0.5f * s * s * s * w * sgx;
  const float b = 2.f * (1.f - a) / n * d_var;
  return make_float3(w * s, b, (1.f - a) / n * d_mean - b * batch_mean[c]);
}

// One warp per channel, as finalize_kernel.
__global__ void backward_finalize_kernel(const float* __restrict__ part, int64_t C, int64_t splits,
                                         const float* __restrict__ src_var, const float* __restrict__ weight,
                                         const float* __restrict__ batch_mean, const float* __restrict__ batch_var,
                                         float a, float eps, float n, float* __restrict__ coef,
                                         float* __restrict__ grad_weight, float* __restrict__ grad_bias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinalizeWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (c >= C) return;  // uniform per warp
  float sg = 0.f, sgx = 0.f;
  for (int64_t s = lane; s < splits; s += 32) {
    sg += part[2 * (c * splits + s)];
    sgx += part[2 * (c * splits + s) + 1];
  }
  sg = warp_sum(sg);
  sgx = warp_sum(sgx);
  if (lane != 0) return;
  const float3 k = backward_channel(c, sg, sgx, src_var, weight, batch_mean, batch_var, a, eps, n, grad_weight,
                                    grad_bias);
  coef[3 * c] = k.x;
  coef[3 * c + 1] = k.y;
  coef[3 * c + 2] = k.z;
}

template <typename scalar_t, int V, bool kRows>
__global__ void backward_apply_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                                      scalar_t* __restrict__ dx, const float* __restrict__ coef, int64_t nvec,
                                      int64_t Sv, int64_t Cdim) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  ChannelCursor cur(i, stride, Sv, Cdim);
  while (i < nvec) {
    Pack<scalar_t, V> g[kUnroll], v[kUnroll];
    int64_t pos[kUnroll], ch[kUnroll];
    int valid = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i < nvec) {
        g[u] = load_pack<scalar_t, V>(gy, i);
        v[u] = load_pack<scalar_t, V>(x, i);
        pos[u] = i;
        ch[u] = cur.c;
        ++valid;
        i += stride;
        cur.advance();
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u < valid) {
        Pack<scalar_t, V> out;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float* k = coef + 3 * (kRows ? ch[u] * V + j : ch[u]);
          out.v[j] = static_cast<scalar_t>(k[0] * static_cast<float>(g[u].v[j]) +
                                           k[1] * static_cast<float>(v[u].v[j]) + k[2]);
        }
        store_pack<scalar_t, V>(dx, pos[u], out);
      }
    }
  }
}

// Backward of the small NCHW case: one block per channel sums g and g * (x - m), derives the
// channel's coefficients and writes its input gradient, in one launch.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kFusedThreads)
    fused_backward_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                          int64_t C, int64_t Sv, int64_t total, const float* __restrict__ src_mean,
                          const float* __restrict__ src_var, const float* __restrict__ weight,
                          const float* __restrict__ batch_mean, const float* __restrict__ batch_var, float a,
                          float eps, float n, float* __restrict__ grad_weight, float* __restrict__ grad_bias) {
  __shared__ float scratch[32];
  __shared__ float3 k;
  const int64_t c = blockIdx.x;
  const float center = a * src_mean[c] + (1.f - a) * batch_mean[c];
  const float2 sums = thread_grad_sums_nchw<scalar_t, V>(gy, x, C, c, Sv, 0, total, center);
  const float sg = block_all_reduce<false>(sums.x, scratch);
  const float sgx = block_all_reduce<false>(sums.y, scratch);
  if (threadIdx.x == 0) {
    k = backward_channel(c, sg, sgx, src_var, weight, batch_mean, batch_var, a, eps, n, grad_weight, grad_bias);
  }
  __syncthreads();
  const float3 kk = k;
  int64_t i = threadIdx.x;
  PlaneCursor out(i, blockDim.x, Sv);
  for (; i < total; i += blockDim.x, out.advance()) {
    const int64_t pos = (out.n * C + c) * Sv + out.s;
    const Pack<scalar_t, V> gp = load_pack<scalar_t, V>(gy, pos), xp = load_pack<scalar_t, V>(x, pos);
    Pack<scalar_t, V> r;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      r.v[j] = static_cast<scalar_t>(kk.x * static_cast<float>(gp.v[j]) + kk.y * static_cast<float>(xp.v[j]) + kk.z);
    }
    store_pack<scalar_t, V>(dx, pos, r);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_calibrate_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& src_mean, const at::Tensor& src_var,
    const std::optional<at::Tensor>& weight, const at::Tensor& batch_mean, const at::Tensor& batch_var,
    double source_weight, double eps) {
  check_bn_args(x_in, src_mean, src_var, weight, std::nullopt);
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), "bn_calibrate_backward: grad_y and x shapes differ");
  TORCH_CHECK(batch_mean.scalar_type() == at::kFloat && batch_var.scalar_type() == at::kFloat,
              "bn_calibrate_backward: batch statistics must be fp32");
  TORCH_CHECK(x_in.numel() > 0, "bn_calibrate_backward: empty input");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const int64_t S = x_in.numel() / (N * C);
  TORCH_CHECK(batch_mean.numel() == C && batch_var.numel() == C,
              "bn_calibrate_backward: batch statistics must have C=", C, " values");
  const BnLayout layout = bn_layout(x_in);
  const bool rows = layout.channels_last || S == 1;
  const at::Tensor& x = layout.x;
  const at::Tensor gy = grad_y.to(x.scalar_type()).contiguous(layout.format);
  at::Tensor dx = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor grad_weight = at::empty({C}, f32), grad_bias = at::empty({C}, f32);
  const at::Tensor sm = src_mean.contiguous(), sv = src_var.contiguous();
  const at::Tensor bm = batch_mean.contiguous(), bv = batch_var.contiguous();
  const at::Tensor w = weight.has_value() ? weight->to(at::kFloat).contiguous() : at::Tensor();

  const Plan plan = make_plan(
      x, rows, aligned(x.const_data_ptr()) && aligned(gy.const_data_ptr()) && aligned(dx.const_data_ptr()));
  // One workspace (not needed by the fused path): coefficients (C, 3), partial sums (C, splits, 2).
  at::Tensor work = plan.fused ? at::Tensor() : at::empty({C * (3 + 2 * plan.splits)}, f32);
  float* coef = plan.fused ? nullptr : work.mutable_data_ptr<float>();
  float* part = plan.fused ? nullptr : coef + 3 * C;
  const float a = static_cast<float>(source_weight);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_calibrate_backward_cuda", [&] {
    const scalar_t* gp = gy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    with_pack<scalar_t>(plan, [&](auto pack) {
      constexpr int V = decltype(pack)::value;
      if (plan.fused) {
        fused_backward_kernel<scalar_t, V><<<static_cast<unsigned>(C), kFusedThreads, 0, stream>>>(
            gp, xp, dp, C, plan.Sv, N * plan.Sv, sm.const_data_ptr<float>(), sv.const_data_ptr<float>(),
            w.defined() ? w.const_data_ptr<float>() : nullptr, bm.const_data_ptr<float>(), bv.const_data_ptr<float>(),
            a, static_cast<float>(eps), static_cast<float>(N * S), grad_weight.mutable_data_ptr<float>(),
            grad_bias.mutable_data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      const dim3 grid(static_cast<unsigned>(plan.channel_blocks), static_cast<unsigned>(plan.splits));
      if (plan.rows) {
        grad_sums_rows_kernel<scalar_t, V><<<grid, dim3(plan.TX, plan.TY), 0, stream>>>(
            gp, xp, plan.R, plan.Cv, plan.per_split, sm.const_data_ptr<float>(), bm.const_data_ptr<float>(), a,
            part);
      } else {
        grad_sums_nchw_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(
            gp, xp, C, plan.Sv, N * plan.Sv, plan.per_split, sm.const_data_ptr<float>(), bm.const_data_ptr<float>(),
            a, part);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      backward_finalize_kernel<<<static_cast<unsigned>((C + kFinalizeWarps - 1) / kFinalizeWarps), kThreads, 0,
                                 stream>>>(
          part, C, plan.splits, sv.const_data_ptr<float>(), w.defined() ? w.const_data_ptr<float>() : nullptr,
          bm.const_data_ptr<float>(), bv.const_data_ptr<float>(), a, static_cast<float>(eps),
          static_cast<float>(N * S), coef, grad_weight.mutable_data_ptr<float>(),
          grad_bias.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t nvec = x.numel() / V;
      if (plan.rows) {
        backward_apply_kernel<scalar_t, V, true><<<plan.apply_blocks, kThreads, 0, stream>>>(gp, xp, dp, coef, nvec,
                                                                                            1, plan.Cv);
      } else {
        backward_apply_kernel<scalar_t, V, false><<<plan.apply_blocks, kThreads, 0, stream>>>(gp, xp, dp, coef,
                                                                                             nvec, plan.Sv, C);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dx, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(tta, CUDA, m) {
  m.impl("bn_calibrate", &bn_calibrate_cuda);
  m.impl("bn_calibrate_update", &bn_calibrate_update_cuda);
  m.impl("bn_calibrate_grouped", &bn_calibrate_grouped_cuda);
  m.impl("bn_calibrate_backward", &bn_calibrate_backward_cuda);
}

}  // namespace tta::cuda
