// Schemas of the batch-statistics calibration ops (alpha-BN / test-time BN).
//
// bn_calibrate: y = (x - m) * rsqrt(v + eps) * weight + bias per channel (dim 1), with
//   m = a * source_mean + (1 - a) * batch_mean,  v = a * source_var + (1 - a) * batch_var,
//   a = source_weight, batch_var the biased estimate. Returns (y, batch_mean, batch_var); the
//   batch statistics are fp32 whatever the input dtype (fp32 accumulation).
// bn_calibrate_update: the same output, and running_mean/running_var (the source statistics of
//   the mixing, read before the update) move towards the batch statistics with `momentum`
//   (running = (1 - momentum) * running + momentum * batch, unbiased batch variance, as PyTorch).
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
      "bn_calibrate_backward(Tensor grad_y, Tensor x, Tensor source_mean, Tensor source_var, "
      "Tensor? weight, Tensor batch_mean, Tensor batch_var, float source_weight, float eps) "
      "-> (Tensor, Tensor, Tensor)");
}
