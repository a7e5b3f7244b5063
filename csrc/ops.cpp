// Every sophon_ext operator schema, in one place. Kernels live in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu and register with
// TORCH_LIBRARY_IMPL(sophon_ext, CPU|CUDA, m). Autograd, fake (meta) kernels
// and pure-PyTorch fallbacks are registered from Python (sophon_ext/ops/:
// losses.py, multi_step.py). See csrc/README.md for the recipe.
#include <torch/library.h>

TORCH_LIBRARY(sophon_ext, m) {
  // --- suppression losses: csrc/cpu/suppression_loss.cpp, csrc/cuda/suppression_loss.cu ---
  // Row-wise on logits (N, C) with target (N,) int64: per-row loss (N,) in the
  // logits' dtype (0 where target == ignore_index) and per-row stats for the
  // backward op. Python (sophon_ext/functional.py) adds weights and reductions.
  // suppression_loss: ice_weight * ICE + klu_weight * KLU; stats (N, 2) float64: the row max m and
  // r = log-sum relative to m (everything relative to m stays exact at huge logits).
  m.def(
      "suppression_loss(Tensor logits, Tensor? target, float ice_weight, float klu_weight, int ignore_index) "
      "-> (Tensor, Tensor)");
  m.def(
      "suppression_loss_backward(Tensor grad_loss, Tensor logits, Tensor? target, Tensor stats, float ice_weight, "
      "float klu_weight, int ignore_index) -> Tensor");
  // inverse_cross_entropy_reference: CE(1 - z, y) = z_y + logsumexp(-z); stats (N, 2) float64, the
  // same (max, log-sum relative to it) pair for -z.
  m.def("inverse_cross_entropy_reference(Tensor logits, Tensor target, int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "inverse_cross_entropy_reference_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor stats, "
      "int ignore_index) -> Tensor");

  // --- fused multi-trajectory optimizer update: csrc/cpu/multi_step.cpp, csrc/cuda/multi_step.cu ---
  // One update of N trajectories' stacked flat parameters (N, P), in place.
  // kind: sgd (momentum, dampening, nesterov) | adam | adamw | lion; hyperparameters
  // and step counters are (N,) tensors. See csrc/multi_step.h.
  // check_values=False skips the range checks of the hyperparameter and step values (the CUDA
  // kernel's one device->host copy), for callers that checked them once themselves; shapes,
  // dtypes and devices are always checked.
  m.def(
      "multi_step_update_(Tensor(a!) params, Tensor grads, Tensor(b!) state1, Tensor(c!) state2, "
      "Tensor(d!) step, Tensor lr, Tensor momentum, Tensor dampening, Tensor beta1, Tensor beta2, "
      "Tensor weight_decay, Tensor eps, str kind, bool nesterov, bool check_values=True) -> ()");
}
