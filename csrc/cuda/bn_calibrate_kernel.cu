// CUDA kernels of tta::bn_calibrate / tta::bn_calibrate_update.
//
// 1. partial moments: the (channel, split) grid gives each block a slice of one channel's values;
//    threads run Welford in fp32 and the block merges them with warp shuffles (Chan's formula).
//    NCHW walks each channel's N contiguous planes; channels_last maps 32 adjacent channels to the
//    lanes of a warp so loads stay coalesced, with 8 row lanes per block.
// 2. finalize: one thread per channel merges its splits, mixes with the source statistics, writes
//    scale/shift and the batch statistics, and (update variant) moves the running statistics.
// 3. apply: y = x * scale[c] + shift[c], grid-stride, any float dtype in and out.
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
#include <tuple>

#include "../ops/common.h"
#include "reduce.cuh"

namespace tta::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kClLanes = 32, kClRows = 8;

template <typename scalar_t>
__global__ void partial_nchw_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t C, int64_t S,
                                    int64_t per_split, float* __restrict__ part) {
  const int64_t c = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int64_t total = N * S;
  const int64_t begin = split * per_split, end = min(total, begin + per_split);
  Welford w;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t n = i / S, s = i - n * S;
    w.push(static_cast<float>(x[(n * C + c) * S + s]));
  }
  w = block_reduce(w);
  if (threadIdx.x == 0) {
    float* out = part + 3 * (c * splits + split);
    out[0] = w.n;
    out[1] = w.mean;
    out[2] = w.m2;
  }
}

template <typename scalar_t>
__global__ void partial_rows_kernel(const scalar_t* __restrict__ x, int64_t R, int64_t C, int64_t per_split,
                                    float* __restrict__ part) {
  __shared__ float sn[kClRows][kClLanes], smean[kClRows][kClLanes], sm2[kClRows][kClLanes];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kClLanes + threadIdx.x;
  const int64_t split = blockIdx.y, splits = gridDim.y;
  const int64_t begin = split * per_split, end = min(R, begin + per_split);
  Welford w;
  if (c < C) {
    for (int64_t r = begin + threadIdx.y; r < end; r += kClRows) w.push(static_cast<float>(x[r * C + c]));
  }
  sn[threadIdx.y][threadIdx.x] = w.n;
  smean[threadIdx.y][threadIdx.x] = w.mean;
  sm2[threadIdx.y][threadIdx.x] = w.m2;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int j = 1; j < kClRows; ++j) w.merge(sn[j][threadIdx.x], smean[j][threadIdx.x], sm2[j][threadIdx.x]);
    float* out = part + 3 * (c * splits + split);
    out[0] = w.n;
    out[1] = w.mean;
    out[2] = w.m2;
  }
}

__global__ void finalize_kernel(const float* __restrict__ part, int64_t C, int64_t splits,
                                const float* src_mean, const float* src_var, const float* __restrict__ weight,
                                const float* __restrict__ bias, float* running_mean, float* running_var, float a,
                                float momentum, float eps, float* __restrict__ scale, float* __restrict__ shift,
                                float* __restrict__ batch_mean, float* __restrict__ batch_var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Welford w;
  for (int64_t s = 0; s < splits; ++s) {
    const float* p = part + 3 * (c * splits + s);
    w.merge(p[0], p[1], p[2]);
  }
  const float bm = w.mean, bv = w.n > 0.f ? w.m2 / w.n : 0.f;
  const float mean = a * src_mean[c] + (1.f - a) * bm;
  const float var = a * src_var[c] + (1.f - a) * bv;
  float s = rsqrtf(var + eps);
  if (weight) s *= weight[c];
  scale[c] = s;
  shift[c] = (bias ? bias[c] : 0.f) - mean * s;
  batch_mean[c] = bm;
  batch_var[c] = bv;
  if (running_mean) {
    const float unbiased = w.n > 1.f ? w.m2 / (w.n - 1.f) : bv;
    running_mean[c] = (1.f - momentum) * running_mean[c] + momentum * bm;
    running_var[c] = (1.f - momentum) * running_var[c] + momentum * unbiased;
  }
}

template <typename scalar_t, bool kRows>
__global__ void apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                             const float* __restrict__ scale, const float* __restrict__ shift, int64_t numel,
                             int64_t C, int64_t S) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = kRows ? i % C : (i / S) % C;
    y[i] = static_cast<scalar_t>(static_cast<float>(x[i]) * scale[c] + shift[c]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_forward(const at::Tensor& x_in, const at::Tensor& src_mean,
                                                          const at::Tensor& src_var,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias, double a,
                                                          double momentum, double eps, bool update) {
  check_bn_args(x_in, src_mean, src_var, weight, bias);
  TORCH_CHECK(x_in.numel() > 0, "bn_calibrate: empty input");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const int64_t S = x_in.numel() / (N * C);
  const BnLayout layout = bn_layout(x_in);
  const bool channels_last = layout.channels_last;
  const bool rows = channels_last || S == 1;
  const at::Tensor& x = layout.x;
  at::Tensor y = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor batch_mean = at::empty({C}, f32), batch_var = at::empty({C}, f32);
  at::Tensor scale = at::empty({C}, f32), shift = at::empty({C}, f32);
  if (update) {
    TORCH_CHECK(src_mean.is_contiguous() && src_var.is_contiguous(),
                "bn_calibrate_update: running statistics must be contiguous");
  }
  const at::Tensor mean_c = src_mean.contiguous(), var_c = src_var.contiguous();
  const at::Tensor w = weight.has_value() ? weight->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();

  const auto stream = c10::cuda::getCurrentCUDAStream();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  const int64_t per_channel = N * S;
  // Enough blocks to fill the GPU ~4x over, each with at least ~16 values per thread.
  const int64_t target_blocks = 4 * static_cast<int64_t>(sms);
  const int64_t channel_blocks = rows ? (C + kClLanes - 1) / kClLanes : C;
  const int64_t min_per_split = rows ? kClRows * 16 : kThreads * 16;
  int64_t splits = std::max<int64_t>(1, (target_blocks + channel_blocks - 1) / channel_blocks);
  splits = std::min<int64_t>({splits, (per_channel + min_per_split - 1) / min_per_split, 65535});
  splits = std::max<int64_t>(splits, 1);
  const int64_t per_split = (per_channel + splits - 1) / splits;
  at::Tensor part = at::empty({C, splits, 3}, f32);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_calibrate_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (rows) {
      const dim3 grid(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(splits));
      partial_rows_kernel<scalar_t><<<grid, dim3(kClLanes, kClRows), 0, stream>>>(
          xp, per_channel, C, per_split, part.mutable_data_ptr<float>());
    } else {
      const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(splits));
      partial_nchw_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(xp, N, C, S, per_split,
                                                                     part.mutable_data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalize_kernel<<<static_cast<unsigned>((C + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        part.const_data_ptr<float>(), C, splits, mean_c.const_data_ptr<float>(), var_c.const_data_ptr<float>(),
        w.defined() ? w.const_data_ptr<float>() : nullptr, b.defined() ? b.const_data_ptr<float>() : nullptr,
        update ? mean_c.mutable_data_ptr<float>() : nullptr, update ? var_c.mutable_data_ptr<float>() : nullptr,
        static_cast<float>(a), static_cast<float>(momentum), static_cast<float>(eps),
        scale.mutable_data_ptr<float>(), shift.mutable_data_ptr<float>(), batch_mean.mutable_data_ptr<float>(),
        batch_var.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t numel = x.numel();
    const unsigned blocks = static_cast<unsigned>(
        std::min<int64_t>((numel + kThreads - 1) / kThreads, 32 * static_cast<int64_t>(sms)));
    if (rows) {
      apply_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          xp, y.mutable_data_ptr<scalar_t>(), scale.const_data_ptr<float>(), shift.const_data_ptr<float>(), numel,
          C, S);
    } else {
      apply_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          xp, y.mutable_data_ptr<scalar_t>(), scale.const_data_ptr<float>(), shift.const_data_ptr<float>(), numel,
          C, S);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_calibrate_update_cuda(
    const at::Tensor& x, at::Tensor& running_mean, at::Tensor& running_var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double source_weight, double momentum, double eps) {
  return bn_forward(x, running_mean, running_var, weight, bias, source_weight, momentum, eps, true);
}


// ---------------------------------------------------------------- backward
// Per (channel, split): sum of g and of g * (x - m), m the mixed mean.
template <typename scalar_t>
__global__ void backward_partial_nchw_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                                             int64_t N, int64_t C, int64_t S, int64_t per_split,
                                             const float* __restrict__ src_mean,
                                             const float* __restrict__ batch_mean, float a,
                                             float* __restrict__ part) {
  __shared__ float scratch[32];
  const int64_t c = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const float center = a * src_mean[c] + (1.f - a) * batch_mean[c];
  const int64_t total = N * S;
  const int64_t begin = split * per_split, end = min(total, begin + per_split);
  float sg = 0.f, sgx = 0.f;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t n = i / S, s = i - n * S;
    const int64_t idx = (n * C + c) * S + s;
    const float g = static_cast<float>(gy[idx]);
    sg += g;
    sgx += g * (static_cast<float>(x[idx]) - center);
  }
  sg = block_all_reduce<false>(sg, scratch);
  sgx = block_all_reduce<false>(sgx, scratch);
  if (threadIdx.x == 0) {
    part[2 * (c * splits + split)] = sg;
    part[2 * (c * splits + split) + 1] = sgx;
  }
}

template <typename scalar_t>
__global__ void backward_partial_rows_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                                             int64_t R, int64_t C, int64_t per_split,
                                             const float* __restrict__ src_mean,
                                             const float* __restrict__ batch_mean, float a,
                                             float* __restrict__ part) {
  __shared__ float s_g[kClRows][kClLanes], s_gx[kClRows][kClLanes];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kClLanes + threadIdx.x;
  const int64_t split = blockIdx.y, splits = gridDim.y;
  const int64_t begin = split * per_split, end = min(R, begin + per_split);
  float sg = 0.f, sgx = 0.f;
  if (c < C) {
    const float center = a * src_mean[c] + (1.f - a) * batch_mean[c];
    for (int64_t r = begin + threadIdx.y; r < end; r += kClRows) {
      const float g = static_cast<float>(gy[r * C + c]);
      sg += g;
      sgx += g * (static_cast<float>(x[r * C + c]) - center);
    }
  }
  s_g[threadIdx.y][threadIdx.x] = sg;
  s_gx[threadIdx.y][threadIdx.x] = sgx;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int j = 1; j < kClRows; ++j) {
      sg += s_g[j][threadIdx.x];
      sgx += s_gx[j][threadIdx.x];
    }
    part[2 * (c * splits + split)] = sg;
    part[2 * (c * splits + split) + 1] = sgx;
  }
}

// dx = A g + B x + K per channel; grad_bias = sum g, grad_weight = s * sum g (x - m).
__global__ void backward_finalize_kernel(const float* __restrict__ part, int64_t C, int64_t splits,
                                         const float* __restrict__ src_var, const float* __restrict__ weight,
                                         const float* __restrict__ batch_mean, const float* __restrict__ batch_var,
                                         float a, float eps, float n, float* __restrict__ coef,
                                         float* __restrict__ grad_weight, float* __restrict__ grad_bias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sg = 0.f, sgx = 0.f;
  for (int64_t s = 0; s < splits; ++s) {
    sg += part[2 * (c * splits + s)];
    sgx += part[2 * (c * splits + s) + 1];
  }
  const float s = rsqrtf(a * src_var[c] + (1.f - a) * batch_var[c] + eps);
  const float w = weight ? weight[c] : 1.f;
  grad_bias[c] = sg;
  grad_weight[c] = s * sgx;
  const float d_mean = -s * w * sg;
  const float d_var = -0.5f * s * s * s * w * sgx;
  const float b = 2.f * (1.f - a) / n * d_var;
  coef[3 * c] = w * s;
  coef[3 * c + 1] = b;
  coef[3 * c + 2] = (1.f - a) / n * d_mean - b * batch_mean[c];
}

template <typename scalar_t, bool kRows>
__global__ void backward_apply_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                                      scalar_t* __restrict__ dx, const float* __restrict__ coef, int64_t numel,
                                      int64_t C, int64_t S) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = kRows ? i % C : (i / S) % C;
    const float* k = coef + 3 * c;
    dx[i] = static_cast<scalar_t>(k[0] * static_cast<float>(gy[i]) + k[1] * static_cast<float>(x[i]) + k[2]);
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
  const BnLayout layout = bn_layout(x_in);
  const bool channels_last = layout.channels_last;
  const bool rows = channels_last || S == 1;
  const at::Tensor& x = layout.x;
  const at::Tensor gy = grad_y.to(x.scalar_type()).contiguous(layout.format);
  at::Tensor dx = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor grad_weight = at::empty({C}, f32), grad_bias = at::empty({C}, f32), coef = at::empty({C, 3}, f32);
  const at::Tensor sm = src_mean.contiguous(), sv = src_var.contiguous();
  const at::Tensor bm = batch_mean.contiguous(), bv = batch_var.contiguous();
  const at::Tensor w = weight.has_value() ? weight->to(at::kFloat).contiguous() : at::Tensor();

  const auto stream = c10::cuda::getCurrentCUDAStream();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  const int64_t per_channel = N * S;
  const int64_t channel_blocks = rows ? (C + kClLanes - 1) / kClLanes : C;
  const int64_t min_per_split = rows ? kClRows * 16 : kThreads * 16;
  int64_t splits = std::max<int64_t>(1, (4 * static_cast<int64_t>(sms) + channel_blocks - 1) / channel_blocks);
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, (per_channel + min_per_split - 1) / min_per_split, 65535}));
  const int64_t per_split = (per_channel + splits - 1) / splits;
  at::Tensor part = at::empty({C, splits, 2}, f32);
  const float a = static_cast<float>(source_weight);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_calibrate_backward_cuda", [&] {
    const scalar_t* gp = gy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (rows) {
      const dim3 grid(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(splits));
      backward_partial_rows_kernel<scalar_t><<<grid, dim3(kClLanes, kClRows), 0, stream>>>(
          gp, xp, per_channel, C, per_split, sm.const_data_ptr<float>(), bm.const_data_ptr<float>(), a,
          part.mutable_data_ptr<float>());
    } else {
      const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(splits));
      backward_partial_nchw_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          gp, xp, N, C, S, per_split, sm.const_data_ptr<float>(), bm.const_data_ptr<float>(), a,
          part.mutable_data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    backward_finalize_kernel<<<static_cast<unsigned>((C + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        part.const_data_ptr<float>(), C, splits, sv.const_data_ptr<float>(),
        w.defined() ? w.const_data_ptr<float>() : nullptr, bm.const_data_ptr<float>(), bv.const_data_ptr<float>(), a,
        static_cast<float>(eps), static_cast<float>(per_channel), coef.mutable_data_ptr<float>(),
        grad_weight.mutable_data_ptr<float>(), grad_bias.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t numel = x.numel();
    const unsigned blocks = static_cast<unsigned>(
        std::min<int64_t>((numel + kThreads - 1) / kThreads, 32 * static_cast<int64_t>(sms)));
    if (rows) {
      backward_apply_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          gp, xp, dx.mutable_data_ptr<scalar_t>(), coef.const_data_ptr<float>(), numel, C, S);
    } else {
      backward_apply_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          gp, xp, dx.mutable_data_ptr<scalar_t>(), coef.const_data_ptr<float>(), numel, C, S);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(tta, CUDA, m) {
  m.impl("bn_calibrate", &bn_calibrate_cuda);
  m.impl("bn_calibrate_update", &bn_calibrate_update_cuda);
  m.impl("bn_calibrate_backward", &bn_calibrate_backward_cuda);
}

}  // namespace tta::cuda
