// The argument checks of sophon_ext::multi_step_update_ shared by the CPU and CUDA kernels
// (declared in multi_step.h): shapes, dtypes and devices, and the message for a hyperparameter
// that breaks an update rule. Device-independent: compiled into every build.
#include "multi_step.h"

#include <ATen/ATen.h>

#include <sstream>
#include <string>

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

}  // namespace sophon_ext::multi_step
