// Hot float loops of the CPU kernels, compiled once per instruction set (AVX-512, x86-64-v3 = AVX2
// + FMA, baseline) and picked at load time (GCC/Clang `target_clones`), so one portable build runs
// the widest vector unit of the machine it lands on.
#pragma once

#include <cstdint>

namespace tta::cpu {

// sum_i p[i]
float simd_sum(const float* p, int64_t n);
// Lane-wise one-pass partials (for many short runs): with d = p[i] - shift, l1[i % kLanes] += d and
// l2[i % kLanes] += d^2, in fp32 within the call and double in l1/l2 (kLanes values each).
constexpr int64_t kLanes = 16;
void simd_lanes_shifted_moments(const float* p, int64_t n, float shift, double* l1, double* l2);
// lg[i % kLanes] += dy[i], lgx[i % kLanes] += dy[i] * (x[i] - center)
void simd_lanes_sum_dot_centered(const float* dy, const float* x, int64_t n, float center, double* lg, double* lgx);
// y[i] = x[i] * scale + shift  (x may alias y)
void simd_affine(const float* x, float* y, int64_t n, float scale, float shift);
// acc[c] += sum_r x[r * C + c]   (row-major (rows, C) block)
void simd_col_sum(const float* x, int64_t rows, int64_t C, float* acc);
// s1[c] += sum_r (x[r * C + c] - shift[c]), s2[c] += sum_r (x[r * C + c] - shift[c])^2, in one pass
void simd_col_shifted_moments(const float* x, int64_t rows, int64_t C, const float* shift, float* s1, float* s2);
// y[r * C + c] = x[r * C + c] * scale[c] + shift[c]
void simd_col_affine(const float* x, float* y, int64_t rows, int64_t C, const float* scale, const float* shift);

// out[i] = a * dy[i] + b * x[i] + k
void simd_axpbyk(const float* dy, const float* x, float* out, int64_t n, float a, float b, float k);
// sum[c] += sum_r dy[r * C + c], dot[c] += sum_r dy[r * C + c] * (x[r * C + c] - center[c]), in one pass
void simd_col_sum_dot_centered(const float* dy, const float* x, int64_t rows, int64_t C, const float* center,
                               float* sum, float* dot);
// out[r * C + c] = a[c] * dy[r * C + c] + b[c] * x[r * C + c] + k[c]
void simd_col_axpbyk(const float* dy, const float* x, float* out, int64_t rows, int64_t C, const float* a,
                     const float* b, const float* k);

}  // namespace tta::cpu
