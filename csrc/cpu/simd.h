// Hot float loops of the CPU kernels, compiled once per instruction set (AVX-512, AVX2, baseline)
// and picked at load time (GCC/Clang `target_clones`), so one portable build runs the widest
// vector unit of the machine it lands on.
#pragma once

#include <cstdint>

namespace tta::cpu {

// sum_i p[i]
float simd_sum(const float* p, int64_t n);
// sum_i (p[i] - mean)^2
float simd_sq_dev(const float* p, int64_t n, float mean);
// y[i] = x[i] * scale + shift  (x may alias y)
void simd_affine(const float* x, float* y, int64_t n, float scale, float shift);
// acc[c] += sum_r x[r * C + c]   (row-major (rows, C) block)
void simd_col_sum(const float* x, int64_t rows, int64_t C, float* acc);
// acc[c] += sum_r (x[r * C + c] - mean[c])^2
void simd_col_sq_dev(const float* x, int64_t rows, int64_t C, const float* mean, float* acc);
// y[r * C + c] = x[r * C + c] * scale[c] + shift[c]
void simd_col_affine(const float* x, float* y, int64_t rows, int64_t C, const float* scale, const float* shift);

// sum_i dy[i] * (x[i] - center)
float simd_dot_centered(const float* dy, const float* x, int64_t n, float center);
// out[i] = a * dy[i] + b * x[i] + k
void simd_axpbyk(const float* dy, const float* x, float* out, int64_t n, float a, float b, float k);
// acc[c] += sum_r dy[r * C + c] * (x[r * C + c] - center[c])
void simd_col_dot_centered(const float* dy, const float* x, int64_t rows, int64_t C, const float* center, float* acc);
// out[r * C + c] = a[c] * dy[r * C + c] + b[c] * x[r * C + c] + k[c]
void simd_col_axpbyk(const float* dy, const float* x, float* out, int64_t rows, int64_t C, const float* a,
                     const float* b, const float* k);

}  // namespace tta::cpu
