// CPU kernel of sophon_ext::multi_step_update_ (schema in csrc/ops.cpp), and
// the argument checks shared with the CUDA kernel (csrc/multi_step.h).
#define SOPHON_ISA baseline
#include "cpu/multi_step_kernel.h"
#include "cpu/isa.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <vector>

namespace sophon_ext::multi_step {
namespace {

constexpr const char* kOp = "multi_step_update_: ";
constexpr const char* kHparamNames[7] = {"lr", "momentum", "dampening", "beta1", "beta2", "weight_decay", "eps"};

// What each rule says, and the hyperparameter (index in kHparamNames, or kStepArg) it is about.
constexpr int kStepArg = -1;
struct RuleText {
  int hparam;
  const char* accepted;
};
constexpr RuleText kRules[kNumRules] = {
    {0, "finite and >= 0"},                             // kRuleLr
    {5, ">= 0"},                                        // kRuleWeightDecay
    {1, ">= 0"},                                        // kRuleMomentum
    {2, "finite"},                                      // kRuleDampening
    {1, "> 0 with nesterov"},                           // kRuleNesterovMomentum
    {2, "0 with nesterov"},                             // kRuleNesterovDampening
    {1, "0 when state1 (momentum buffers) is empty"},  // kRuleNoBufferMomentum
    {3, "in [0, 1)"},                                   // kRuleBeta1
    {4, "in [0, 1)"},                                   // kRuleBeta2
    {6, ">= 0"},                                        // kRuleEps
    {kStepArg, "finite and >= 0"},                      // kRuleStep
};

Kind parse_kind(std::string_view kind) {
  if (kind == "sgd") return Kind::Sgd;
  if (kind == "adam") return Kind::Adam;
  if (kind == "adamw") return Kind::AdamW;
  if (kind == "lion") return Kind::Lion;
  TORCH_CHECK_VALUE(false, kOp, "unknown kind '", std::string(kind), "'; accepted: 'adam', 'adamw', 'lion', 'sgd'");
}

std::string shape_str(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

// `t` must be laid out exactly like `params` (it is read or written element for element).
void check_like_params(const at::Tensor& t, const char* name, const at::Tensor& params, bool written) {
  TORCH_CHECK_VALUE(t.sizes() == params.sizes(), kOp, name, " must have the shape of params ", shape_str(params),
                    ", got ", shape_str(t));
  TORCH_CHECK_TYPE(t.scalar_type() == params.scalar_type(), kOp, name, " must have dtype ", params.scalar_type(),
                   " like params, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == params.device(), kOp, name, " must be on device ", params.device(),
                    " like params, got ", t.device());
  TORCH_CHECK_VALUE(!written || t.is_contiguous(), kOp, name, " must be contiguous (it is updated in place)");
}

// One value per trajectory: shape (N,), floating point, on the parameters' device.
void check_per_trajectory(const at::Tensor& t, const char* name, const at::Tensor& params) {
  const int64_t n = params.size(0);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, kOp, name, " must have shape [", n,
                    "] (one value per trajectory), got ", shape_str(t));
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), kOp, name, " must be a floating-point tensor, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == params.device(), kOp, name, " must be on device ", params.device(),
                    " like params, got ", t.device());
}

UpdateFn cpu_update() {
  static const UpdateFn fn = cpu_isa::choose_isa<UpdateFn>(&baseline::update, avx2_update());
  return fn;
}

}  // namespace

Kind check_arguments(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& state1,
                     const at::Tensor& state2, const at::Tensor& step, const at::Tensor* hparams[7],
                     std::string_view kind_name, bool nesterov) {
  const Kind kind = parse_kind(kind_name);
  TORCH_CHECK_TYPE(params.scalar_type() == at::kFloat || params.scalar_type() == at::kDouble, kOp,
                   "params must be float32 or float64, got ", params.scalar_type());
  TORCH_CHECK_VALUE(params.dim() == 2, kOp, "params must be 2-D (trajectories, flattened parameters), got shape ",
                    shape_str(params));
  TORCH_CHECK_VALUE(params.is_contiguous(), kOp, "params must be contiguous (it is updated in place)");
  check_like_params(grads, "grads", params, /*written=*/false);
  TORCH_CHECK_VALUE(!nesterov || kind == Kind::Sgd, kOp, "nesterov applies only to kind 'sgd', got kind '",
                    std::string(kind_name), "'");
  check_per_trajectory(step, "step", params);
  for (int i = 0; i < 7; ++i) check_per_trajectory(*hparams[i], kHparamNames[i], params);
  TORCH_CHECK_VALUE(step.is_contiguous(), kOp, "step must be contiguous (it is updated in place)");
  // the state each kind reads and writes
  if (kind == Kind::Sgd && state1.numel() != 0) check_like_params(state1, "state1 (momentum buffers)", params, true);
  if (kind == Kind::Adam || kind == Kind::AdamW) {
    check_like_params(state1, "state1 (exp_avg)", params, true);
    check_like_params(state2, "state2 (exp_avg_sq)", params, true);
  }
  if (kind == Kind::Lion) check_like_params(state1, "state1 (exp_avg)", params, true);
  return kind;
}

void throw_broken_rule(const at::Tensor& masks, const at::Tensor& step, const at::Tensor* hparams[7]) {
  const int32_t* m = masks.const_data_ptr<int32_t>();
  for (int rule = 0; rule < kNumRules; ++rule) {
    for (int64_t row = 0; row < masks.numel(); ++row) {
      if (!(m[row] & (1 << rule))) continue;
      const RuleText& text = kRules[rule];
      const bool is_step = text.hparam == kStepArg;
      const double value = (is_step ? step : *hparams[text.hparam]).select(0, row).item<double>();
      TORCH_CHECK_VALUE(false, kOp, is_step ? "step" : kHparamNames[text.hparam], " must be ", text.accepted,
                        " for every trajectory, got ", value, " at trajectory ", row);
    }
  }
  TORCH_INTERNAL_ASSERT(false, "throw_broken_rule called without a broken rule");
}

namespace {

void multi_step_update_cpu(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& state1,
                           const at::Tensor& state2, const at::Tensor& step, const at::Tensor& lr,
                           const at::Tensor& momentum, const at::Tensor& dampening, const at::Tensor& beta1,
                           const at::Tensor& beta2, const at::Tensor& weight_decay, const at::Tensor& eps,
                           c10::string_view kind_name, bool nesterov) {
  const at::Tensor* hparams[7] = {&lr, &momentum, &dampening, &beta1, &beta2, &weight_decay, &eps};
  const Kind kind = check_arguments(params, grads, state1, state2, step, hparams,
                                    std::string_view(kind_name.data(), kind_name.size()), nesterov);
  const int64_t n = params.size(0);
  const bool sgd_buffers = state1.numel() != 0;

  // the coefficient table, row by row (N is small: plain loops, no ATen calls)
  std::vector<at::Tensor> hp64;
  for (const at::Tensor* t : hparams) hp64.push_back(t->to(at::kDouble).contiguous());
  const at::Tensor step64 = step.to(at::kDouble).contiguous();
  std::vector<double> coefs(n * kNumCoefs);
  at::Tensor masks = at::empty({n}, at::kInt);
  int32_t* mask = masks.data_ptr<int32_t>();
  int32_t any_broken = 0;
  for (int64_t row = 0; row < n; ++row) {
    auto at_row = [&](int k) { return hp64[k].const_data_ptr<double>()[row]; };
    const RowInputs x{at_row(0), at_row(1), at_row(2), at_row(3), at_row(4), at_row(5), at_row(6),
                      step64.const_data_ptr<double>()[row]};
    mask[row] = fill_row(kind, nesterov, sgd_buffers, x, coefs.data() + row * kNumCoefs);
    any_broken |= mask[row];
  }
  if (any_broken) throw_broken_rule(masks, step, hparams);

  step.add_(1);
  if (params.numel() == 0) return;
  const at::Tensor grads_dense = grads.contiguous();
  const KernelArgs args{kind,
                        nesterov,
                        params.scalar_type() == at::kDouble,
                        params.data_ptr(),
                        grads_dense.const_data_ptr(),
                        state1.numel() ? state1.data_ptr() : nullptr,
                        state2.numel() ? state2.data_ptr() : nullptr,
                        coefs.data(),
                        n,
                        params.size(1)};
  cpu_update()(args);
}

}  // namespace
}  // namespace sophon_ext::multi_step

TORCH_LIBRARY_IMPL(sophon_ext, CPU, m) {
  m.impl("multi_step_update_", &sophon_ext::multi_step::multi_step_update_cpu);
}
