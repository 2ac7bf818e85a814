// Argument checks and small helpers shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string_view>

namespace tta {

// The largest k the kernels accept (the CUDA top-k keeps k rounded up to a power of two in
// shared memory).
constexpr int64_t kMaxK = 256;

enum class Metric : int { Cosine = 0, InnerProduct = 1, L2 = 2 };

inline Metric parse_metric(std::string_view name) {
  if (name == "cosine") return Metric::Cosine;
  if (name == "ip") return Metric::InnerProduct;
  if (name == "l2") return Metric::L2;
  TORCH_CHECK(false, "knn_vote: metric must be 'cosine', 'ip' or 'l2', got '", std::string(name), "'");
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_bn_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                          const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 2, "bn_calibrate: x must be (N, C, ...), got ", x.dim(), " dims");
  TORCH_CHECK(is_float_type(x.scalar_type()), "bn_calibrate: x must be float32/float16/bfloat16, got ",
              x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == C && var.dim() == 1 && var.size(0) == C,
              "bn_calibrate: source statistics must be 1-D of size C=", C);
  TORCH_CHECK(mean.scalar_type() == at::kFloat && var.scalar_type() == at::kFloat,
              "bn_calibrate: source statistics must be float32");
  TORCH_CHECK(mean.device() == x.device() && var.device() == x.device(),
              "bn_calibrate: statistics must be on the device of x");
  for (const auto* p : {&weight, &bias}) {
    if (p->has_value()) {
      TORCH_CHECK((*p)->dim() == 1 && (*p)->size(0) == C, "bn_calibrate: weight/bias must be 1-D of size C=", C);
      TORCH_CHECK((*p)->device() == x.device(), "bn_calibrate: weight/bias must be on the device of x");
    }
  }
}

// The dense layout a BatchNorm kernel runs on: a channels_last (4-D) / channels_last_3d (5-D)
// input as given, anything else made contiguous (NCHW). Outputs and gradients follow `format`.
struct BnLayout {
  at::Tensor x;
  bool channels_last;
  at::MemoryFormat format;
};

inline BnLayout bn_layout(const at::Tensor& x_in) {
  const auto cl_format = x_in.dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
  const bool channels_last = x_in.dim() >= 4 && x_in.dim() <= 5 && !x_in.is_contiguous() &&
                             x_in.is_contiguous(cl_format);
  if (channels_last) return {x_in, true, cl_format};
  return {x_in.contiguous(), false, at::MemoryFormat::Contiguous};
}

inline void check_knn_args(const at::Tensor& q, const at::Tensor& mem, const at::Tensor& labels,
                           int64_t num_classes, int64_t k, double temperature) {
  TORCH_CHECK(q.dim() == 2, "knn_vote: queries must be (B, D), got ", q.dim(), " dims");
  TORCH_CHECK(mem.dim() == 2, "knn_vote: memory must be (M, D), got ", mem.dim(), " dims");
  TORCH_CHECK(q.size(1) == mem.size(1), "knn_vote: queries have D=", q.size(1), " but memory has D=",
              mem.size(1));
  TORCH_CHECK(is_float_type(q.scalar_type()) && is_float_type(mem.scalar_type()),
              "knn_vote: queries/memory must be float32/float16/bfloat16");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == mem.size(0) && labels.scalar_type() == at::kLong,
              "knn_vote: labels must be int64 of shape (M,) = (", mem.size(0), ",)");
  TORCH_CHECK(mem.device() == q.device() && labels.device() == q.device(),
              "knn_vote: queries, memory and labels must be on one device");
  TORCH_CHECK(num_classes >= 1, "knn_vote: num_classes must be >= 1");
  TORCH_CHECK(k >= 1 && k <= kMaxK, "knn_vote: k must be in [1, ", kMaxK, "], got ", k);
  TORCH_CHECK(temperature > 0, "knn_vote: temperature must be > 0, got ", temperature);
}

}  // namespace tta
