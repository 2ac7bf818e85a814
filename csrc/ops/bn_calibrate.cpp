// Schemas of the batch-statistics calibration ops (alpha-BN / test-time BN).
//
// bn_calibrate: y = (x - m) * rsqrt(v + eps) * weight + bias per channel (dim 1), with
//   m = a * source_mean + (1 - a) * batch_mean,  v = a * source_var + (1 - a) * batch_var,
//   a = source_weight, batch_var the biased estimate. Returns (y, batch_mean, batch_var); the
//   batch statistics are fp32 whatever the input dtype (fp32 accumulation).
// bn_calibrate_update: the same output, and running_mean/running_var (the source statistics of
//   the mixing, read before the update) move towards the batch statistics with `momentum`
//   (running = (1 - momentum) * running + momentum * batch, unbiased batch variance, as PyTorch).
// bn_calibrate_grouped: ghost BatchNorm: the batch is `groups` equal, contiguous slices (e.g. the
//   stacked augmented views of one image batch), each normalised as bn_calibrate would normalise
//   it alone (its own batch statistics, the shared source statistics and affine). Returns y only;
//   forward only (no autograd formula: the callers run it without gradients).
// bn_calibrate_backward: first-order gradients of bn_calibrate given its saved batch statistics:
//   (grad_x, grad_weight, grad_bias), the last two fp32 (C,) whatever the input dtype.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tta, m) {
  m.def(
      "bn_calibrate(Tensor x, Tensor source_mean, Tensor source_var, Tensor? weight, "
      "Tensor? bias, float source_weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_calibrate_update(Tensor x, Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor? weight, Tensor? bias, float source_weight, float momentum, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_calibrate_grouped(Tensor x, Tensor source_mean, Tensor source_var, Tensor? weight, "
      "Tensor? bias, float source_weight, float eps, int groups) -> Tensor");
  m.def(
      "bn_calibrate_backward(Tensor grad_y, Tensor x, Tensor source_mean, Tensor source_var, "
      "Tensor? weight, Tensor batch_mean, Tensor batch_var, float source_weight, float eps) "
      "-> (Tensor, Tensor, Tensor)");
}

// Autograd of bn_calibrate, in C++ so a training step pays no Python per BatchNorm layer (a Python
// formula cost ~130 us of host time per forward + backward: on a GPU, 3-6x the kernels' own time
// for CIFAR-sized layers). Backward: the fused kernel gives dx, d weight, d bias; the gradients of
// the source statistics (rarely needed) follow from its per-channel sums:
//   with s = rsqrt(v + eps), w the weight (1 if none), a = source_weight,
//   dL/dm = -s * w * sum(dy),  dL/dv = -s^2 / 2 * w * sum(dy * (x - m) * s),
//   d source_mean = a * dL/dm,  d source_var = a * dL/dv.
// First order only: the backward itself is not differentiable.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

namespace tta {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bn_calibrate(
    const at::Tensor& x, const at::Tensor& source_mean, const at::Tensor& source_var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double a, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tta::bn_calibrate", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, double)>();
  return op.call(x, source_mean, source_var, weight, bias, a, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bn_calibrate_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& source_mean, const at::Tensor& source_var,
    const std::optional<at::Tensor>& weight, const at::Tensor& batch_mean, const at::Tensor& batch_var, double a,
    double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("tta::bn_calibrate_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double,
                           double)>();
  return op.call(grad_y, x, source_mean, source_var, weight, batch_mean, batch_var, a, eps);
}

class BnCalibrateFunction : public torch::autograd::Function<BnCalibrateFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& source_mean,
                               const at::Tensor& source_var, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double a, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, batch_mean, batch_var] = call_bn_calibrate(x, source_mean, source_var, weight, bias, a, eps);
    ctx->save_for_backward({x, source_mean, source_var, weight.value_or(at::Tensor()), batch_mean, batch_var});
    ctx->saved_data["a"] = a;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["bias_dtype"] = bias.has_value() ? bias->scalar_type() : at::kFloat;
    ctx->mark_non_differentiable({batch_mean, batch_var});
    // the statistics' gradients are never used: no zero tensors for them (a fill kernel per layer)
    ctx->set_materialize_grads(false);
    return {y, batch_mean, batch_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &source_mean = saved[1], &source_var = saved[2], &weight = saved[3],
                     &batch_mean = saved[4], &batch_var = saved[5];
    const double a = ctx->saved_data["a"].toDouble();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool has_weight = weight.defined();
    at::Tensor grad_y = grads[0];
    variable_list out(7);
    if (!grad_y.defined()) return out;  // only the (non-differentiable) statistics were used
    const std::optional<at::Tensor> w = has_weight ? std::optional<at::Tensor>(weight) : std::nullopt;
    auto [grad_x, g_weight, g_bias] =
        call_bn_calibrate_backward(grad_y, x, source_mean, source_var, w, batch_mean, batch_var, a, eps);
    if (ctx->needs_input_grad(0)) out[0] = grad_x;
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      const at::Tensor s = at::rsqrt(a * source_var.to(at::kFloat) + (1.0 - a) * batch_var + eps);
      const at::Tensor ws = has_weight ? weight.to(at::kFloat) * s : s;
      if (ctx->needs_input_grad(1)) out[1] = (-a * ws * g_bias).to(source_mean.scalar_type());
      if (ctx->needs_input_grad(2)) out[2] = (-0.5 * a * s * ws * g_weight).to(source_var.scalar_type());
    }
    // needs_input_grad counts tensor inputs only: an absent weight shifts the bias's index.
    if (has_weight && ctx->needs_input_grad(3)) out[3] = g_weight.to(weight.scalar_type());
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(has_weight ? 4 : 3)) {
      out[4] = g_bias.to(ctx->saved_data["bias_dtype"].toScalarType());
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_calibrate_autograd(
    const at::Tensor& x, const at::Tensor& source_mean, const at::Tensor& source_var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double a, double eps) {
  auto out = BnCalibrateFunction::apply(x, source_mean, source_var, weight, bias, a, eps);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(tta, Autograd, m) { m.impl("bn_calibrate", &bn_calibrate_autograd); }

}  // namespace tta
