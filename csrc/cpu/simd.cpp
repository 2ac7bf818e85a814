#include "simd.h"

// One clone per x86-64 level: AVX-512, x86-64-v3 (AVX2 + FMA together: a comma inside one
// target_clones string makes separate clones in GCC, an AVX2 clone without FMA and an FMA-only one).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__APPLE__)
#define TTA_SIMD_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__clang__) && !defined(__APPLE__)
#define TTA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
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

TTA_SIMD_CLONES void simd_lanes_shifted_moments(const float* __restrict p, int64_t n, float shift,
                                                double* __restrict l1, double* __restrict l2) {
  float a[kLanes] = {}, b[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const float d = p[i + j] - shift;
      a[j] += d;
      b[j] += d * d;
    }
  }
  for (int64_t j = 0; i < n; ++i, ++j) {
    const float d = p[i] - shift;
    a[j] += d;
    b[j] += d * d;
  }
#pragma omp simd
  for (int64_t j = 0; j < kLanes; ++j) {
    l1[j] += a[j];
    l2[j] += b[j];
  }
}

TTA_SIMD_CLONES void simd_lanes_sum_dot_centered(const float* __restrict dy, const float* __restrict x, int64_t n,
                                                 float center, double* __restrict lg, double* __restrict lgx) {
  float a[kLanes] = {}, b[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      a[j] += dy[i + j];
      b[j] += dy[i + j] * (x[i + j] - center);
    }
  }
  for (int64_t j = 0; i < n; ++i, ++j) {
    a[j] += dy[i];
    b[j] += dy[i] * (x[i] - center);
  }
#pragma omp simd
  for (int64_t j = 0; j < kLanes; ++j) {
    lg[j] += a[j];
    lgx[j] += b[j];
  }
}

TTA_SIMD_CLONES void simd_affine(const float* x, float* y, int64_t n, float scale, float shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * scale + shift;
}

// The column reductions add kRowUnroll rows per pass over `acc`: with few channels (C = 16 is one
// AVX-512 vector) a row-at-a-time loop is one long chain of dependent adds through acc[] (add
// latency + store forwarding per row); summing row groups first cuts that chain kRowUnroll-fold.
constexpr int64_t kRowUnroll = 4;

TTA_SIMD_CLONES void simd_col_sum(const float* __restrict x, int64_t rows, int64_t C, float* __restrict acc) {
  int64_t r = 0;
  for (; r + kRowUnroll <= rows; r += kRowUnroll) {
    const float* r0 = x + r * C;
    const float* r1 = r0 + C;
    const float* r2 = r1 + C;
    const float* r3 = r2 + C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += (r0[c] + r1[c]) + (r2[c] + r3[c]);
  }
  for (; r < rows; ++r) {
    const float* row = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += row[c];
  }
}

TTA_SIMD_CLONES void simd_col_shifted_moments(const float* __restrict x, int64_t rows, int64_t C,
                                              const float* __restrict shift, float* __restrict s1,
                                              float* __restrict s2) {
  int64_t r = 0;
  for (; r + kRowUnroll <= rows; r += kRowUnroll) {
    const float* r0 = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float k = shift[c];
      const float d0 = r0[c] - k, d1 = r0[C + c] - k, d2 = r0[2 * C + c] - k, d3 = r0[3 * C + c] - k;
      s1[c] += (d0 + d1) + (d2 + d3);
      s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
  for (; r < rows; ++r) {
    const float* row = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float d = row[c] - shift[c];
      s1[c] += d;
      s2[c] += d * d;
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

TTA_SIMD_CLONES void simd_axpbyk(const float* dy, const float* x, float* out, int64_t n, float a, float b, float k) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a * dy[i] + b * x[i] + k;
}

TTA_SIMD_CLONES void simd_col_sum_dot_centered(const float* __restrict dy, const float* __restrict x, int64_t rows,
                                               int64_t C, const float* __restrict center, float* __restrict sum,
                                               float* __restrict dot) {
  int64_t r = 0;
  for (; r + kRowUnroll <= rows; r += kRowUnroll) {
    const float* g = dy + r * C;
    const float* v = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float m = center[c];
      const float g0 = g[c], g1 = g[C + c], g2 = g[2 * C + c], g3 = g[3 * C + c];
      sum[c] += (g0 + g1) + (g2 + g3);
      dot[c] += (g0 * (v[c] - m) + g1 * (v[C + c] - m)) + (g2 * (v[2 * C + c] - m) + g3 * (v[3 * C + c] - m));
    }
  }
  for (; r < rows; ++r) {
    const float* g = dy + r * C;
    const float* v = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      sum[c] += g[c];
      dot[c] += g[c] * (v[c] - center[c]);
    }
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
