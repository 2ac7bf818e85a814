// CPU kernels of tta::bn_calibrate / tta::bn_calibrate_update.
//
// Statistics are two-level reductions that stay accurate for fp16/bf16 inputs and large N*H*W with
// fp32 vector loops: fp32 within a cache-sized chunk, double across chunks and threads.
// Sums are shifted by a per-channel reference K near the channel's mean (the exact mean of a first
// plane or row block), so one pass gives sum(x - K) and sum((x - K)^2) without the cancellation of
// raw moments. NCHW: memory-order sweeps over the N * C planes (one for the statistics, one for the
// output). channels_last (and (N, C) inputs): per-thread per-channel partials over row blocks, then
// a row-parallel affine pass.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../ops/common.h"
#include "simd.h"

namespace tta::cpu {
namespace {

constexpr int64_t kChunk = 4096;  // values per fp32 partial sum (16 KiB); also the fp16/bf16 conversion buffer

// Rows of a row-major (R, C) block: at least kMinRows, so that the per-block bookkeeping (zeroing
// and folding C partial sums) stays small next to the block's data work when C is large; a block
// holds up to 16K floats (64 KiB).
constexpr int64_t kMinRows = 64;
inline int64_t rows_per_block(int64_t C) {
  return std::max<int64_t>({1, kChunk / C, std::min<int64_t>(kMinRows, 4 * kChunk / C)});
}

// Work split of an NCHW plane sweep: 4 parts per thread, fewer when C is large so that the
// per-part lane partials (2 x parts x C x kLanes doubles) stay within ~4 MiB, but never fewer
// parts than threads.
inline int64_t plane_parts(int64_t planes, int64_t C) {
  const int64_t threads = at::get_num_threads();
  const int64_t by_memory = std::max<int64_t>(threads, (int64_t{1} << 18) / (C * kLanes));
  return std::max<int64_t>(1, std::min<int64_t>({planes, 4 * threads, by_memory}));
}

// Calls fn(plane, c) for the NCHW planes [first, last) in memory order, c = plane's channel.
template <typename Fn>
inline void for_each_plane(int64_t first, int64_t last, int64_t C, Fn&& fn) {
  for (int64_t plane = first, c = first % C; plane < last; ++plane, c = (c + 1 == C ? 0 : c + 1)) fn(plane, c);
}

// Sum over parts (and `width` lanes) of channel c's partials, laid out [parts][C][width].
inline double fold_parts(const std::vector<double>& part, int64_t parts, int64_t C, int64_t width, int64_t c) {
  double sum = 0;
  for (int64_t p = 0; p < parts; ++p) {
    for (int64_t j = 0; j < width; ++j) sum += part[(p * C + c) * width + j];
  }
  return sum;
}

// Count, mean and sum of squared deviations of n values, from sums shifted by a reference k:
// s1 = sum(x - k), s2 = sum((x - k)^2).
struct Moments {
  double n, mean, m2;
};

inline Moments shifted_moments(double n, double k, double s1, double s2) {
  return {n, k + s1 / n, std::max(0.0, s2 - s1 * s1 / n)};
}

// Per-channel finalisation: batch statistics, mixing, scale/shift, optional running update.
struct Finalizer {
  const float* src_mean;
  const float* src_var;
  const float* weight;  // nullable, fp32
  const float* bias;    // nullable, fp32
  float* running_mean;  // nullable: update variant only (== src_mean)
  float* running_var;
  double a, momentum, eps;
  float* batch_mean;
  float* batch_var;

  void operator()(int64_t c, const Moments& m, float& scale, float& shift) const {
    const double bm = m.mean;
    const double bv = m.n > 0 ? m.m2 / m.n : 0.0;
    const double mean = a * src_mean[c] + (1.0 - a) * bm;
    const double var = a * src_var[c] + (1.0 - a) * bv;
    double s = 1.0 / std::sqrt(var + eps);
    if (weight) s *= weight[c];
    scale = static_cast<float>(s);
    shift = static_cast<float>((bias ? bias[c] : 0.0) - mean * s);
    batch_mean[c] = static_cast<float>(bm);
    batch_var[c] = static_cast<float>(bv);
    if (running_mean) {
      const double unbiased = m.n > 1 ? m.m2 / (m.n - 1) : bv;
      running_mean[c] = static_cast<float>((1.0 - momentum) * running_mean[c] + momentum * bm);
      running_var[c] = static_cast<float>((1.0 - momentum) * running_var[c] + momentum * unbiased);
    }
  }
};

template <typename scalar_t>
inline const float* as_float(const scalar_t* p, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return p;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return buf;
  }
}

template <typename scalar_t>
inline void affine_out(const scalar_t* x, scalar_t* y, int64_t n, float scale, float shift, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    simd_affine(x, y, n, scale, shift);
  } else {
    const float* xf = as_float(x, n, buf);
    simd_affine(xf, buf, n, scale, shift);
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<scalar_t>(buf[i]);
  }
}

// NCHW with S = prod(spatial) > 1: the N * C planes of S values are swept in memory order (the
// hardware prefetchers follow one linear stream; a per-channel walk jumps C * S values every S).
// Plane sums are shifted by a per-channel reference K (the mean of the channel's first plane), so
// one pass gives sum(x - K) and sum((x - K)^2) without the cancellation of raw moments: fp32 within
// a chunk, double across chunks and threads.
template <typename scalar_t>
void run_nchw(const scalar_t* x, scalar_t* y, int64_t N, int64_t C, int64_t S, const Finalizer& fin) {
  const int64_t planes = N * C;
  const int64_t parts = plane_parts(planes, C);
  std::vector<float> ref(C);
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {  // K[c]: exact mean of plane (0, c)
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : kChunk);
    for (int64_t c = c0; c < c1; ++c) {
      double sum = 0;
      for (int64_t off = 0; off < S; off += kChunk) {
        const int64_t len = std::min(kChunk, S - off);
        sum += simd_sum(as_float(x + c * S + off, len, buf.data()), len);
      }
      ref[c] = static_cast<float>(sum / static_cast<double>(S));
    }
  });
  // Per part and channel, kLanes double partials of sum(x - K) and sum((x - K)^2).
  std::vector<double> part_s1(parts * C * kLanes, 0.0), part_s2(parts * C * kLanes, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : kChunk);
    for (int64_t p = p0; p < p1; ++p) {
      for_each_plane(p * planes / parts, (p + 1) * planes / parts, C, [&](int64_t plane, int64_t c) {
        double* l1 = part_s1.data() + (p * C + c) * kLanes;
        double* l2 = part_s2.data() + (p * C + c) * kLanes;
        for (int64_t off = 0; off < S; off += kChunk) {
          const int64_t len = std::min(kChunk, S - off);
          simd_lanes_shifted_moments(as_float(x + plane * S + off, len, buf.data()), len, ref[c], l1, l2);
        }
      });
    }
  });
  std::vector<float> scale(C), shift(C);
  const double n = static_cast<double>(N * S);
  for (int64_t c = 0; c < C; ++c) {
    const Moments m = shifted_moments(n, ref[c], fold_parts(part_s1, parts, C, kLanes, c),
                                      fold_parts(part_s2, parts, C, kLanes, c));
    fin(c, m, scale[c], shift[c]);
  }
  at::parallel_for(0, planes, 16, [&](int64_t q0, int64_t q1) {
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : kChunk);
    for_each_plane(q0, q1, C, [&](int64_t plane, int64_t c) {
      for (int64_t off = 0; off < S; off += kChunk) {
        const int64_t len = std::min(kChunk, S - off);
        affine_out(x + plane * S + off, y + plane * S + off, len, scale[c], shift[c], buf.data());
      }
    });
  });
}

// Row-major (R, C): channels_last, or NCHW with one value per channel and sample.
template <typename scalar_t>
void run_rows(const scalar_t* x, scalar_t* y, int64_t R, int64_t C, const Finalizer& fin) {
  const int64_t rows_per_chunk = rows_per_block(C);
  const int64_t n_chunks = (R + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t parts = std::min<int64_t>(n_chunks, 4 * at::get_num_threads());
  // K[c]: mean of the first row block, the reference of the shifted sums.
  std::vector<float> ref(C, 0.f);
  {
    const int64_t rows = std::min(rows_per_chunk, R);
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : rows * C);
    simd_col_sum(as_float(x, rows * C, buf.data()), rows, C, ref.data());
    for (int64_t c = 0; c < C; ++c) ref[c] /= static_cast<float>(rows);
  }
  std::vector<double> part_s1(parts * C, 0.0), part_s2(parts * C, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : rows_per_chunk * C);
    std::vector<float> s1(C), s2(C);
    for (int64_t p = p0; p < p1; ++p) {
      double* ps1 = part_s1.data() + p * C;
      double* ps2 = part_s2.data() + p * C;
      for (int64_t ch = p * n_chunks / parts; ch < (p + 1) * n_chunks / parts; ++ch) {
        const int64_t r0 = ch * rows_per_chunk;
        const int64_t rows = std::min(rows_per_chunk, R - r0);
        std::fill(s1.begin(), s1.end(), 0.f);
        std::fill(s2.begin(), s2.end(), 0.f);
        simd_col_shifted_moments(as_float(x + r0 * C, rows * C, buf.data()), rows, C, ref.data(), s1.data(),
                                 s2.data());
        for (int64_t c = 0; c < C; ++c) {
          ps1[c] += s1[c];
          ps2[c] += s2[c];
        }
      }
    }
  });

  std::vector<float> scale(C), shift(C);
  const double n = static_cast<double>(R);
  for (int64_t c = 0; c < C; ++c) {
    const Moments m = shifted_moments(n, ref[c], fold_parts(part_s1, parts, C, 1, c),
                                      fold_parts(part_s2, parts, C, 1, c));
    fin(c, m, scale[c], shift[c]);
  }

  at::parallel_for(0, n_chunks, 1, [&](int64_t ch0, int64_t ch1) {
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : rows_per_chunk * C);
    for (int64_t ch = ch0; ch < ch1; ++ch) {
      const int64_t r0 = ch * rows_per_chunk;
      const int64_t rows = std::min(rows_per_chunk, R - r0);
      if constexpr (std::is_same_v<scalar_t, float>) {
        simd_col_affine(x + r0 * C, y + r0 * C, rows, C, scale.data(), shift.data());
      } else {
        const float* xf = as_float(x + r0 * C, rows * C, buf.data());
        simd_col_affine(xf, buf.data(), rows, C, scale.data(), shift.data());
        scalar_t* out = y + r0 * C;
        for (int64_t i = 0; i < rows * C; ++i) out[i] = static_cast<scalar_t>(buf[i]);
      }
    }
  });
}

// Backward: with g = dy, m/s the mixed mean and rsqrt(var + eps), w the weight, n values per
// channel: grad_bias = sum g, grad_weight = s * sum g (x - m), and
// dx = w s g + (1 - a) / n * (d_mean + 2 d_var (x - batch_mean)) = A g + B x + K per channel.
struct BackwardCoef {
  const float* src_mean;
  const float* src_var;
  const float* weight;  // nullable
  const float* batch_mean;
  const float* batch_var;
  double a, eps, n;
  float* grad_weight;
  float* grad_bias;

  float mixed_mean(int64_t c) const { return static_cast<float>(a * src_mean[c] + (1.0 - a) * batch_mean[c]); }

  void operator()(int64_t c, double sum_g, double sum_gx, float& A, float& B, float& K) const {
    const double s = 1.0 / std::sqrt(a * src_var[c] + (1.0 - a) * batch_var[c] + eps);
    const double w = weight ? weight[c] : 1.0;
    grad_bias[c] = static_cast<float>(sum_g);
    grad_weight[c] = static_cast<float>(s * sum_gx);
    const double d_mean = -s * w * sum_g;
    const double d_var = -0.5 * s * s * s * w * sum_gx;
    const double b = 2.0 * (1.0 - a) / n * d_var;
    A = static_cast<float>(w * s);
    B = static_cast<float>(b);
    K = static_cast<float>((1.0 - a) / n * d_mean - b * batch_mean[c]);
  }
};

// NCHW backward: the same memory-order plane sweeps as the forward, one for the two per-channel
// reductions (per-part partials in double) and one for dx.
template <typename scalar_t>
void backward_nchw(const scalar_t* gy, const scalar_t* x, scalar_t* dx, int64_t N, int64_t C, int64_t S,
                   const BackwardCoef& coef) {
  const int64_t planes = N * C;
  const int64_t parts = plane_parts(planes, C);
  const bool f32 = std::is_same_v<scalar_t, float>;
  std::vector<float> center(C);
  for (int64_t c = 0; c < C; ++c) center[c] = coef.mixed_mean(c);
  std::vector<double> part_g(parts * C * kLanes, 0.0), part_gx(parts * C * kLanes, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> bg(f32 ? 0 : kChunk), bx(f32 ? 0 : kChunk);
    for (int64_t p = p0; p < p1; ++p) {
      for_each_plane(p * planes / parts, (p + 1) * planes / parts, C, [&](int64_t plane, int64_t c) {
        double* lg = part_g.data() + (p * C + c) * kLanes;
        double* lgx = part_gx.data() + (p * C + c) * kLanes;
        for (int64_t off = 0; off < S; off += kChunk) {
          const int64_t len = std::min(kChunk, S - off);
          const float* g = as_float(gy + plane * S + off, len, bg.data());
          const float* v = as_float(x + plane * S + off, len, bx.data());
          simd_lanes_sum_dot_centered(g, v, len, center[c], lg, lgx);
        }
      });
    }
  });
  std::vector<float> A(C), B(C), K(C);
  for (int64_t c = 0; c < C; ++c) {
    coef(c, fold_parts(part_g, parts, C, kLanes, c), fold_parts(part_gx, parts, C, kLanes, c), A[c], B[c], K[c]);
  }
  at::parallel_for(0, planes, 16, [&](int64_t q0, int64_t q1) {
    std::vector<float> bg(f32 ? 0 : kChunk), bx(f32 ? 0 : kChunk), bo(f32 ? 0 : kChunk);
    for_each_plane(q0, q1, C, [&](int64_t plane, int64_t c) {
      for (int64_t off = 0; off < S; off += kChunk) {
        const int64_t len = std::min(kChunk, S - off);
        const int64_t at = plane * S + off;
        const float* g = as_float(gy + at, len, bg.data());
        const float* v = as_float(x + at, len, bx.data());
        if constexpr (std::is_same_v<scalar_t, float>) {
          simd_axpbyk(g, v, dx + at, len, A[c], B[c], K[c]);
        } else {
          simd_axpbyk(g, v, bo.data(), len, A[c], B[c], K[c]);
          for (int64_t i = 0; i < len; ++i) dx[at + i] = static_cast<scalar_t>(bo[i]);
        }
      }
    });
  });
}

template <typename scalar_t>
void backward_rows(const scalar_t* gy, const scalar_t* x, scalar_t* dx, int64_t R, int64_t C,
                   const BackwardCoef& coef) {
  const int64_t rows_per_chunk = rows_per_block(C);
  const int64_t n_chunks = (R + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t parts = std::min<int64_t>(n_chunks, 4 * at::get_num_threads());
  std::vector<float> center(C);
  for (int64_t c = 0; c < C; ++c) center[c] = coef.mixed_mean(c);
  std::vector<double> part_g(parts * C, 0.0), part_gx(parts * C, 0.0);
  const bool f32 = std::is_same_v<scalar_t, float>;

  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> bg(f32 ? 0 : rows_per_chunk * C), bx(f32 ? 0 : rows_per_chunk * C);
    std::vector<float> sg(C), sgx(C);
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t ch = p * n_chunks / parts; ch < (p + 1) * n_chunks / parts; ++ch) {
        const int64_t r0 = ch * rows_per_chunk;
        const int64_t rows = std::min(rows_per_chunk, R - r0);
        const float* g = as_float(gy + r0 * C, rows * C, bg.data());
        const float* v = as_float(x + r0 * C, rows * C, bx.data());
        std::fill(sg.begin(), sg.end(), 0.f);
        std::fill(sgx.begin(), sgx.end(), 0.f);
        simd_col_sum_dot_centered(g, v, rows, C, center.data(), sg.data(), sgx.data());
        for (int64_t c = 0; c < C; ++c) {
          part_g[p * C + c] += sg[c];
          part_gx[p * C + c] += sgx[c];
        }
      }
    }
  });

  std::vector<float> A(C), B(C), K(C);
  for (int64_t c = 0; c < C; ++c) {
    coef(c, fold_parts(part_g, parts, C, 1, c), fold_parts(part_gx, parts, C, 1, c), A[c], B[c], K[c]);
  }

  at::parallel_for(0, n_chunks, 1, [&](int64_t ch0, int64_t ch1) {
    std::vector<float> bg(f32 ? 0 : rows_per_chunk * C), bx(f32 ? 0 : rows_per_chunk * C),
        bo(f32 ? 0 : rows_per_chunk * C);
    for (int64_t ch = ch0; ch < ch1; ++ch) {
      const int64_t r0 = ch * rows_per_chunk;
      const int64_t rows = std::min(rows_per_chunk, R - r0);
      const float* g = as_float(gy + r0 * C, rows * C, bg.data());
      const float* v = as_float(x + r0 * C, rows * C, bx.data());
      if constexpr (std::is_same_v<scalar_t, float>) {
        simd_col_axpbyk(g, v, dx + r0 * C, rows, C, A.data(), B.data(), K.data());
      } else {
        simd_col_axpbyk(g, v, bo.data(), rows, C, A.data(), B.data(), K.data());
        for (int64_t i = 0; i < rows * C; ++i) dx[r0 * C + i] = static_cast<scalar_t>(bo[i]);
      }
    }
  });
}

at::Tensor as_float_param(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return at::Tensor();
  return t->to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_forward(const at::Tensor& x_in, const at::Tensor& src_mean,
                                                          const at::Tensor& src_var,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias, double a,
                                                          double momentum, double eps, bool update) {
  check_bn_args(x_in, src_mean, src_var, weight, bias);
  TORCH_CHECK(x_in.numel() > 0, "bn_calibrate: empty input");
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const int64_t S = x_in.numel() / (N * C);
  const BnLayout layout = bn_layout(x_in);
  const bool channels_last = layout.channels_last;
  const at::Tensor& x = layout.x;
  at::Tensor y = at::empty_like(x);  // dense input: same strides (NCHW or channels_last)
  at::Tensor batch_mean = at::empty({C}, x.options().dtype(at::kFloat));
  at::Tensor batch_var = at::empty({C}, x.options().dtype(at::kFloat));

  if (update) {
    TORCH_CHECK(src_mean.is_contiguous() && src_var.is_contiguous(),
                "bn_calibrate_update: running statistics must be contiguous");
  }
  const at::Tensor mean_c = src_mean.contiguous(), var_c = src_var.contiguous();
  const at::Tensor w = as_float_param(weight), b = as_float_param(bias);
  Finalizer fin{mean_c.data_ptr<float>(),
                var_c.data_ptr<float>(),
                w.defined() ? w.data_ptr<float>() : nullptr,
                b.defined() ? b.data_ptr<float>() : nullptr,
                update ? mean_c.data_ptr<float>() : nullptr,
                update ? var_c.data_ptr<float>() : nullptr,
                a,
                momentum,
                eps,
                batch_mean.data_ptr<float>(),
                batch_var.data_ptr<float>()};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_calibrate_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (channels_last || S == 1) {
      run_rows<scalar_t>(xp, yp, N * S, C, fin);
    } else {
      run_nchw<scalar_t>(xp, yp, N, C, S, fin);
    }
  });
  return {y, batch_mean, batch_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_calibrate_cpu(const at::Tensor& x, const at::Tensor& src_mean,
                                                                const at::Tensor& src_var,
                                                                const std::optional<at::Tensor>& weight,
                                                                const std::optional<at::Tensor>& bias,
                                                                double source_weight, double eps) {
  return bn_forward(x, src_mean, src_var, weight, bias, source_weight, 0.0, eps, false);
}

// Ghost BatchNorm on the CPU: each contiguous slice of N / groups samples through the fused pass.
at::Tensor bn_calibrate_grouped_cpu(const at::Tensor& x_in, const at::Tensor& src_mean, const at::Tensor& src_var,
                                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                    double source_weight, double eps, int64_t groups) {
  check_bn_args(x_in, src_mean, src_var, weight, bias);
  TORCH_CHECK(x_in.numel() > 0, "bn_calibrate: empty input");
  TORCH_CHECK(groups >= 1 && x_in.size(0) % groups == 0, "bn_calibrate_grouped: batch of ", x_in.size(0),
              " is not divisible into ", groups, " groups");
  const at::Tensor& x = bn_layout(x_in).x;  // dense: every batch slice is dense in the same format
  if (groups == 1) return std::get<0>(bn_forward(x, src_mean, src_var, weight, bias, source_weight, 0.0, eps, false));
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.size(0) / groups;
  for (int64_t g = 0; g < groups; ++g) {
    y.narrow(0, g * n, n).copy_(
        std::get<0>(bn_forward(x.narrow(0, g * n, n), src_mean, src_var, weight, bias, source_weight, 0.0, eps, false)));
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_calibrate_update_cpu(
    const at::Tensor& x, at::Tensor& running_mean, at::Tensor& running_var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double source_weight, double momentum, double eps) {
  return bn_forward(x, running_mean, running_var, weight, bias, source_weight, momentum, eps, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_calibrate_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& src_mean, const at::Tensor& src_var,
    const std::optional<at::Tensor>& weight, const at::Tensor& batch_mean, const at::Tensor& batch_var,
    double source_weight, double eps) {
  check_bn_args(x_in, src_mean, src_var, weight, std::nullopt);
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), "bn_calibrate_backward: grad_y and x shapes differ");
  TORCH_CHECK(batch_mean.scalar_type() == at::kFloat && batch_var.scalar_type() == at::kFloat &&
                  batch_mean.numel() == x_in.size(1) && batch_var.numel() == x_in.size(1),
              "bn_calibrate_backward: batch statistics must be fp32 (C,)");
  TORCH_CHECK(x_in.numel() > 0, "bn_calibrate_backward: empty input");
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const int64_t S = x_in.numel() / (N * C);
  const BnLayout layout = bn_layout(x_in);
  const bool channels_last = layout.channels_last;
  const at::Tensor& x = layout.x;
  const at::Tensor gy = grad_y.to(x.scalar_type()).contiguous(layout.format);
  at::Tensor dx = at::empty_like(x);
  at::Tensor grad_weight = at::empty({C}, x.options().dtype(at::kFloat));
  at::Tensor grad_bias = at::empty({C}, x.options().dtype(at::kFloat));
  const at::Tensor sm = src_mean.contiguous(), sv = src_var.contiguous();
  const at::Tensor bm = batch_mean.contiguous(), bv = batch_var.contiguous();
  const at::Tensor w = as_float_param(weight);
  BackwardCoef coef{sm.const_data_ptr<float>(), sv.const_data_ptr<float>(),
                    w.defined() ? w.const_data_ptr<float>() : nullptr, bm.const_data_ptr<float>(),
                    bv.const_data_ptr<float>(), source_weight, eps, static_cast<double>(N * S),
                    grad_weight.mutable_data_ptr<float>(), grad_bias.mutable_data_ptr<float>()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_calibrate_backward_cpu", [&] {
    if (channels_last || S == 1) {
      backward_rows<scalar_t>(gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                              dx.mutable_data_ptr<scalar_t>(), N * S, C, coef);
    } else {
      backward_nchw<scalar_t>(gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                              dx.mutable_data_ptr<scalar_t>(), N, C, S, coef);
    }
  });
  return {dx, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(tta, CPU, m) {
  m.impl("bn_calibrate", &bn_calibrate_cpu);
  m.impl("bn_calibrate_update", &bn_calibrate_update_cpu);
  m.impl("bn_calibrate_grouped", &bn_calibrate_grouped_cpu);
  m.impl("bn_calibrate_backward", &bn_calibrate_backward_cpu);
}

}  // namespace tta::cpu
