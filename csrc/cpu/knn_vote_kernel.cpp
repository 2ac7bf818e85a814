// CPU kernel of tta::knn_vote: tiled similarity + fused top-k + softmax vote.
//
// The memory is scanned in tiles of rows: each tile is converted to fp32 (fp16/bf16 storage),
// multiplied with the queries by one BLAS GEMM (B x T similarities, T sized so the block stays
// a few MiB whatever M is), and every query folds its row of the block into its own size-k
// min-heap; the metric's normalisation is applied on the fly while folding. This is faiss's flat
// search strategy; the vote (softmax of similarity / temperature, summed per label) runs on the
// k survivors.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string_view>
#include <tuple>
#include <vector>

#include "../ops/common.h"

namespace tta::cpu {
namespace {

constexpr float kNormEps = 1e-12f;

// Squared norm of each row of a (rows, D) fp32 block.
void row_sq_norms(const float* x, int64_t rows, int64_t D, float* out) {
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* p = x + r * D;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += p[d] * p[d];
      out[r] = s;
    }
  });
}

// Size-k min-heap over (value, index); the root is the weakest kept neighbour.
inline void heap_replace_top(float* v, int64_t* id, int64_t k, float val, int64_t idx) {
  int64_t i = 0;
  while (true) {
    const int64_t l = 2 * i + 1;
    if (l >= k) break;
    const int64_t r = l + 1;
    const int64_t c = (r < k && v[r] < v[l]) ? r : l;
    if (v[c] >= val) break;
    v[i] = v[c];
    id[i] = id[c];
    i = c;
  }
  v[i] = val;
  id[i] = idx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_vote_cpu(const at::Tensor& queries, const at::Tensor& memory_in,
                                                            const at::Tensor& labels_in, int64_t num_classes,
                                                            int64_t k, double temperature,
                                                            c10::string_view metric_name) {
  check_knn_args(queries, memory_in, labels_in, num_classes, k, temperature);
  const Metric metric = parse_metric(metric_name);
  const int64_t B = queries.size(0), D = queries.size(1), M = memory_in.size(0);
  const int64_t kk = std::min(k, M);  // neighbours that exist
  const auto f32 = queries.options().dtype(at::kFloat);

  at::Tensor q = queries.to(at::kFloat).contiguous();
  const at::Tensor memory = memory_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();

  // Per-query term of the metric: 1/|q| (cosine) or |q|^2 (l2).
  std::vector<float> q_aux(B, 0.f);
  if (metric != Metric::InnerProduct) {
    row_sq_norms(q.const_data_ptr<float>(), B, D, q_aux.data());
    if (metric == Metric::Cosine)
      for (auto& s : q_aux) s = 1.f / std::max(std::sqrt(s), kNormEps);
  }

  std::vector<float> heap_v(B * std::max<int64_t>(kk, 1), -std::numeric_limits<float>::infinity());
  std::vector<int64_t> heap_i(B * std::max<int64_t>(kk, 1), -1);

  // Tile: about 4 Mi similarities per GEMM, at least 1024 rows for BLAS efficiency (smaller
  // cache-sized tiles measured 2-5x slower: per-tile GEMM and thread start-up dominate).
  const int64_t tile = std::max<int64_t>(1024, std::min<int64_t>(M, (int64_t{1} << 22) / std::max<int64_t>(B, 1)));
  std::vector<float> m_aux(tile);
  for (int64_t start = 0; start < M && kk > 0; start += tile) {
    const int64_t T = std::min(tile, M - start);
    const at::Tensor block = memory.narrow(0, start, T).to(at::kFloat).contiguous();
    if (metric != Metric::InnerProduct) {
      row_sq_norms(block.const_data_ptr<float>(), T, D, m_aux.data());
      if (metric == Metric::Cosine)
        for (int64_t j = 0; j < T; ++j) m_aux[j] = 1.f / std::max(std::sqrt(m_aux[j]), kNormEps);
    }
    at::Tensor sims = at::mm(q, block.t());  // (B, T), contiguous, ours to overwrite
    float* sp = sims.mutable_data_ptr<float>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float* hv = heap_v.data() + b * kk;
        int64_t* hi = heap_i.data() + b * kk;
        float* row = sp + b * T;
        const float qa = q_aux[b];
        const float* ma = m_aux.data();
        if (metric == Metric::Cosine) {
#pragma omp simd
          for (int64_t j = 0; j < T; ++j) row[j] *= qa * ma[j];
        } else if (metric == Metric::L2) {
#pragma omp simd
          for (int64_t j = 0; j < T; ++j) row[j] = 2.f * row[j] - qa - ma[j];
        }
        // Blocks of 32 whose maximum cannot enter the heap are skipped with one vector max;
        // after the first tiles almost every block is.
        constexpr int64_t kBlock = 32;
        for (int64_t j0 = 0; j0 < T; j0 += kBlock) {
          const int64_t n = std::min(kBlock, T - j0);
          float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
          for (int64_t j = 0; j < n; ++j) mx = std::max(mx, row[j0 + j]);
          if (!(mx > hv[0])) continue;
          for (int64_t j = 0; j < n; ++j) {
            const float s = row[j0 + j];
            if (s > hv[0]) heap_replace_top(hv, hi, kk, s, start + j0 + j);  // NaN never enters
          }
        }
      }
    });
  }

  at::Tensor scores = at::zeros({B, num_classes}, f32);
  at::Tensor out_idx = at::empty({B, k}, queries.options().dtype(at::kLong));
  at::Tensor out_sim = at::empty({B, k}, f32);
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  float* sc = scores.mutable_data_ptr<float>();
  int64_t* oi = out_idx.mutable_data_ptr<int64_t>();
  float* os = out_sim.mutable_data_ptr<float>();
  const float inv_t = static_cast<float>(1.0 / temperature);
  std::atomic<bool> bad_label{false};
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    std::vector<std::pair<float, int64_t>> nb(kk);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t j = 0; j < kk; ++j) nb[j] = {heap_v[b * kk + j], heap_i[b * kk + j]};
      std::sort(nb.begin(), nb.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
      int64_t n_valid = 0;
      while (n_valid < kk && nb[n_valid].second >= 0) ++n_valid;
      const float top = n_valid ? nb[0].first : 0.f;
      float z = 0.f;
      for (int64_t j = 0; j < n_valid; ++j) z += std::exp((nb[j].first - top) * inv_t);
      for (int64_t j = 0; j < k; ++j) {
        const bool valid = j < n_valid;
        oi[b * k + j] = valid ? nb[j].second : -1;
        os[b * k + j] = valid ? nb[j].first : -std::numeric_limits<float>::infinity();
        if (!valid) continue;
        const int64_t label = lab[nb[j].second];
        if (label < 0 || label >= num_classes) {
          bad_label.store(true, std::memory_order_relaxed);
          continue;
        }
        sc[b * num_classes + label] += std::exp((nb[j].first - top) * inv_t) / z;
      }
    }
  });
  TORCH_CHECK(!bad_label.load(), "knn_vote: a memory label is outside [0, num_classes=", num_classes, ")");
  return {scores, out_idx, out_sim};
}

}  // namespace

TORCH_LIBRARY_IMPL(tta, CPU, m) { m.impl("knn_vote", &knn_vote_cpu); }

}  // namespace tta::cpu
