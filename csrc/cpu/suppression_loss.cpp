// CPU kernels of the suppression losses: sophon_ext::suppression_loss,
// sophon_ext::inverse_cross_entropy_reference and their backward ops
// (schemas in csrc/ops.cpp, maths in suppression_loss_rows.h). Rows run in
// parallel (at::parallel_for); each row is vectorised with at::vec.
#define SOPHON_ISA baseline
#include "cpu/suppression_loss_rows.h"
#include "cpu/isa.h"
#include "suppression_loss.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace sophon_ext::cpu {
namespace {

using at::Tensor;

const RowKernelSet& row_kernel_set() {
  static const RowKernelSet* set = cpu_isa::choose_isa(baseline::row_kernels(), avx2_row_kernels());
  return *set;
}

RowDtype row_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kFloat;
    case at::kDouble:
      return kDouble;
    case at::kHalf:
      return kHalf;
    default:
      return kBFloat16;  // check_loss_logits admits nothing else
  }
}

// Validates target values so that no kernel reads outside the row.
void check_target_values(const char* op, const Tensor& target, int64_t num_classes, int64_t ignore_index) {
  const int64_t* y = target.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = target.numel(); i < n; ++i) {
    TORCH_CHECK_INDEX(y[i] == ignore_index || (y[i] >= 0 && y[i] < num_classes), op, ": target[", i, "] = ", y[i],
                      " is outside [0, ", num_classes, ") and is not ignore_index (", ignore_index, ")");
  }
}

// Contiguous int64 target, checked; undefined when absent.
Tensor checked_target(const char* op, const std::optional<Tensor>& target, const Tensor& logits, int64_t ignore_index) {
  if (!target.has_value()) {
    return Tensor();
  }
  check_loss_target(op, *target, logits);
  Tensor t = target->contiguous();
  check_target_values(op, t, logits.size(1), ignore_index);
  return t;
}

void run_rows(RowRangeFn fn, const RowArgs& args, int64_t rows) {
  // About 32k logits per task keeps threads busy without tiny chunks.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / args.num_classes);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
}

// Loss (N,) and row stats ((N,) when stats_width is 0, else (N, stats_width))
// of a forward op through its row kernels (one per dtype in `kernels`).
std::tuple<Tensor, Tensor> forward_rows(const char* op, const RowRangeFn* kernels, const Tensor& logits_in,
                                        const std::optional<Tensor>& target_in, int64_t stats_width,
                                        double ice_weight, double klu_weight, int64_t ignore_index) {
  check_loss_logits(op, logits_in);
  TORCH_CHECK_VALUE(target_in.has_value() || ice_weight == 0.0, op, ": target is required when ice_weight != 0");
  const Tensor logits = logits_in.contiguous();
  const Tensor target = checked_target(op, target_in, logits, ignore_index);
  const int64_t n = logits.size(0);
  Tensor loss = at::empty({n}, logits.options());
  const auto double_options = logits.options().dtype(at::kDouble);
  Tensor stats = stats_width == 0 ? at::empty({n}, double_options) : at::empty({n, stats_width}, double_options);
  RowArgs args;
  args.logits = logits.const_data_ptr();
  args.target = target.defined() ? target.const_data_ptr<int64_t>() : nullptr;
  args.loss = loss.data_ptr();
  args.stats = stats.data_ptr<double>();
  args.num_classes = logits.size(1);
  args.ignore_index = ignore_index;
  args.ice_weight = ice_weight;
  args.klu_weight = klu_weight;
  run_rows(kernels[row_dtype(logits.scalar_type())], args, n);
  return {loss, stats};
}

// Gradient with respect to the logits of a backward op through its row kernels
// (stats_width as in forward_rows).
Tensor backward_rows(const char* op, const RowRangeFn* kernels, const Tensor& grad_loss_in, const Tensor& logits_in,
                     const std::optional<Tensor>& target_in, const Tensor& stats_in, int64_t stats_width,
                     double ice_weight, double klu_weight, int64_t ignore_index) {
  check_loss_logits(op, logits_in);
  TORCH_CHECK_VALUE(target_in.has_value() || ice_weight == 0.0, op, ": target is required when ice_weight != 0");
  check_row_input(op, "grad_loss", grad_loss_in, logits_in, 0);
  check_row_input(op, "stats", stats_in, logits_in, stats_width);
  const Tensor logits = logits_in.contiguous();
  const Tensor target = checked_target(op, target_in, logits, ignore_index);
  const Tensor grad_loss = grad_loss_in.to(logits.scalar_type()).contiguous();
  const Tensor stats = stats_in.to(at::kDouble).contiguous();
  Tensor grad = at::empty(logits.sizes(), logits.options());
  RowArgs args;
  args.logits = logits.const_data_ptr();
  args.target = target.defined() ? target.const_data_ptr<int64_t>() : nullptr;
  args.grad_loss = grad_loss.const_data_ptr();
  args.stats_in = stats.const_data_ptr<double>();
  args.grad = grad.data_ptr();
  args.num_classes = logits.size(1);
  args.ignore_index = ignore_index;
  args.ice_weight = ice_weight;
  args.klu_weight = klu_weight;
  run_rows(kernels[row_dtype(logits.scalar_type())], args, logits.size(0));
  return grad;
}

std::tuple<Tensor, Tensor> suppression_loss_cpu(const Tensor& logits, const std::optional<Tensor>& target,
                                                double ice_weight, double klu_weight, int64_t ignore_index) {
  return forward_rows("sophon_ext::suppression_loss", row_kernel_set().suppression_forward, logits, target, 2,
                      ice_weight, klu_weight, ignore_index);
}

Tensor suppression_loss_backward_cpu(const Tensor& grad_loss, const Tensor& logits,
                                     const std::optional<Tensor>& target, const Tensor& stats, double ice_weight,
                                     double klu_weight, int64_t ignore_index) {
  return backward_rows("sophon_ext::suppression_loss_backward", row_kernel_set().suppression_backward, grad_loss,
                       logits, target, stats, 2, ice_weight, klu_weight, ignore_index);
}

std::tuple<Tensor, Tensor> ice_reference_cpu(const Tensor& logits, const Tensor& target, int64_t ignore_index) {
  return forward_rows("sophon_ext::inverse_cross_entropy_reference", row_kernel_set().ice_reference_forward, logits,
                      target, 2, 0.0, 0.0, ignore_index);
}

Tensor ice_reference_backward_cpu(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                                  const Tensor& stats, int64_t ignore_index) {
  return backward_rows("sophon_ext::inverse_cross_entropy_reference_backward", row_kernel_set().ice_reference_backward,
                       grad_loss, logits, target, stats, 2, 0.0, 0.0, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(sophon_ext, CPU, m) {
  m.impl("suppression_loss", &suppression_loss_cpu);
  m.impl("suppression_loss_backward", &suppression_loss_backward_cpu);
  m.impl("inverse_cross_entropy_reference", &ice_reference_cpu);
  m.impl("inverse_cross_entropy_reference_backward", &ice_reference_backward_cpu);
}

}  // namespace sophon_ext::cpu
