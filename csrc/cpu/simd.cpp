#include "simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__APPLE__)
#define TTA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define TTA_SIMD_CLONES
#endif

namespace tta::cpu {

TTA_SIMD_CLONES float simd_sum(const float* p, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += p[i];
  return s;
}

TTA_SIMD_CLONES float simd_sq_dev(const float* p, int64_t n, float mean) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const float d = p[i] - mean;
    s += d * d;
  }
  return s;
}

TTA_SIMD_CLONES void simd_affine(const float* x, float* y, int64_t n, float scale, float shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * scale + shift;
}

TTA_SIMD_CLONES void simd_col_sum(const float* x, int64_t rows, int64_t C, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += row[c];
  }
}

TTA_SIMD_CLONES void simd_col_sq_dev(const float* x, int64_t rows, int64_t C, const float* mean, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float d = row[c] - mean[c];
      acc[c] += d * d;
    }
  }
}

TTA_SIMD_CLONES void simd_col_affine(const float* x, float* y, int64_t rows, int64_t C, const float* scale,
                                     const float* shift) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = x + r * C;
    float* out = y + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] = in[c] * scale[c] + shift[c];
  }
}

TTA_SIMD_CLONES float simd_dot_centered(const float* dy, const float* x, int64_t n, float center) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += dy[i] * (x[i] - center);
  return s;
}

TTA_SIMD_CLONES void simd_axpbyk(const float* dy, const float* x, float* out, int64_t n, float a, float b, float k) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a * dy[i] + b * x[i] + k;
}

TTA_SIMD_CLONES void simd_col_dot_centered(const float* dy, const float* x, int64_t rows, int64_t C,
                                           const float* center, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = dy + r * C;
    const float* v = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += g[c] * (v[c] - center[c]);
  }
}

TTA_SIMD_CLONES void simd_col_axpbyk(const float* dy, const float* x, float* out, int64_t rows, int64_t C,
                                     const float* a, const float* b, const float* k) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = dy + r * C;
    const float* v = x + r * C;
    float* o = out + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = a[c] * g[c] + b[c] * v[c] + k[c];
  }
}

}  // namespace tta::cpu
