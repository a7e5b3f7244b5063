// Fused multi-trajectory optimizer update (op sophon_ext::multi_step_update_),
// shared by csrc/cpu/multi_step*.cpp and csrc/cuda/multi_step.cu.
//
// N trajectories' parameters live in one (N, P) buffer. Per call: the
// arguments are checked, fill_row() turns each trajectory's hyperparameters
// and step count into a row of coefficients (and flags out-of-range values,
// which the call reports unless check_values is false), then the kernels make
// one pass over the flat buffers applying the element rules below. The rules
// follow torch.optim's single-tensor formulas in the same order of operations
// (as sophon_ext/optim/functional.py does).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace sophon_ext::multi_step {

enum class Kind : int { Sgd, Adam, AdamW, Lion };

// Columns of the float64 coefficient table, one row per trajectory.
enum Coef : int {
  kLr,
  kWeightDecay,
  kMomentum,
  kOneMinusDampening,
  kBeta1,
  kOneMinusBeta1,
  kBeta2,
  kOneMinusBeta2,
  kEps,
  kStepSize,   // Adam: lr / (1 - beta1^t)
  kBias2Sqrt,  // Adam: sqrt(1 - beta2^t)
  kDecay,      // AdamW: 1 - lr * weight_decay
  kHasWeightDecay,  // flags stored as 0/1
  kHasMomentum,
  kFirstStep,
  kLerpFromStart,  // the branch torch.lerp takes: |1 - beta1| < 0.5
  kNumCoefs
};

// Range rules, checked in this order (the first broken rule is reported).
enum Rule : int {
  kRuleLr,
  kRuleWeightDecay,
  kRuleMomentum,
  kRuleDampening,
  kRuleNesterovMomentum,
  kRuleNesterovDampening,
  kRuleNoBufferMomentum,
  kRuleBeta1,
  kRuleBeta2,
  kRuleEps,
  kRuleStep,
  kNumRules
};

// One trajectory's hyperparameters and the number of updates done so far.
struct RowInputs {
  double lr, momentum, dampening, beta1, beta2, weight_decay, eps, step;
};

// Fills one row of the coefficient table; returns a bit mask of broken rules.
// `sgd_buffers`: whether kind sgd was given momentum buffers. Whatever the
// values, the row never makes the kernels touch a buffer that was not given.
C10_HOST_DEVICE inline int fill_row(Kind kind, bool nesterov, bool sgd_buffers, const RowInputs& x, double* c) {
  int broken = 0;
  auto rule = [&broken](bool ok, Rule r) {
    if (!ok) broken |= 1 << r;
  };
  // finite: inf - inf and NaN are NaN; a non-finite rate or update count writes NaN/inf
  rule(x.lr >= 0 && x.lr - x.lr == 0, kRuleLr);
  rule(x.step >= 0 && x.step - x.step == 0, kRuleStep);
  rule(x.weight_decay >= 0, kRuleWeightDecay);
  if (kind == Kind::Sgd) {
    rule(x.momentum >= 0, kRuleMomentum);
    rule(x.dampening - x.dampening == 0, kRuleDampening);  // finite: inf - inf and NaN are NaN
    if (nesterov) {
      rule(x.momentum > 0, kRuleNesterovMomentum);
      rule(x.dampening == 0, kRuleNesterovDampening);
    }
    if (!sgd_buffers) rule(x.momentum == 0, kRuleNoBufferMomentum);
  } else {
    rule(x.beta1 >= 0 && x.beta1 < 1, kRuleBeta1);
    rule(x.beta2 >= 0 && x.beta2 < 1, kRuleBeta2);
    if (kind != Kind::Lion) rule(x.eps >= 0, kRuleEps);
  }
  const double t = x.step + 1;
  c[kLr] = x.lr;
  c[kWeightDecay] = x.weight_decay;
  c[kMomentum] = x.momentum;
  c[kOneMinusDampening] = 1 - x.dampening;
  c[kBeta1] = x.beta1;
  c[kOneMinusBeta1] = 1 - x.beta1;
  c[kBeta2] = x.beta2;
  c[kOneMinusBeta2] = 1 - x.beta2;
  c[kEps] = x.eps;
  c[kStepSize] = x.lr / (1 - ::pow(x.beta1, t));
  c[kBias2Sqrt] = ::sqrt(1 - ::pow(x.beta2, t));
  c[kDecay] = 1 - x.lr * x.weight_decay;
  c[kHasWeightDecay] = x.weight_decay != 0;
  c[kHasMomentum] = x.momentum != 0 && sgd_buffers;  // unchecked values: no momentum without buffers
  c[kFirstStep] = x.step == 0;
  c[kLerpFromStart] = ::fabs(1 - x.beta1) < 0.5;
  return broken;
}

// --- host helpers, defined in csrc/multi_step_checks.cpp ---

// Checks kind, shapes, dtypes, devices and layout (ValueError / TypeError
// naming the argument and what is accepted); returns the kind.
Kind check_arguments(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& state1,
                     const at::Tensor& state2, const at::Tensor& step, const at::Tensor* hparams[7],
                     std::string_view kind, bool nesterov);

// Throws the ValueError for the first broken rule. `masks`: one int32 per
// trajectory (CPU); `step` and `hparams` (in the schema's order, lr ... eps) as given.
[[noreturn]] void throw_broken_rule(const at::Tensor& masks, const at::Tensor& step, const at::Tensor* hparams[7]);

// --- element rules, for T a scalar or an at::vec::Vectorized; `Ops` supplies sqrt and sign ---

template <typename T>
struct Row {
  T lr, weight_decay, momentum, one_minus_dampening, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
      step_size, bias2_sqrt, decay;
  bool has_weight_decay, has_momentum, first_step, lerp_from_start, nesterov;

  // E: the element type (the coefficients are rounded to it, as torch.optim
  // rounds its Python-float scalars to the tensor's dtype).
  template <typename E>
  C10_HOST_DEVICE static Row load(const double* c, bool nesterov) {
    auto v = [c](int k) { return T(static_cast<E>(c[k])); };
    return {v(kLr),    v(kWeightDecay),   v(kMomentum), v(kOneMinusDampening), v(kBeta1),     v(kOneMinusBeta1),
            v(kBeta2), v(kOneMinusBeta2), v(kEps),      v(kStepSize),          v(kBias2Sqrt), v(kDecay),
            c[kHasWeightDecay] != 0, c[kHasMomentum] != 0, c[kFirstStep] != 0, c[kLerpFromStart] != 0,
            nesterov};
  }
};

template <typename Ops, typename T>
C10_HOST_DEVICE inline void sgd_element(T& p, T g, T& buf, const Row<T>& r) {
  if (r.has_weight_decay) g = g + r.weight_decay * p;
  if (!r.has_momentum) {  // torch.optim: plain SGD, no buffer, dampening ignored
    p = p - r.lr * g;
    return;
  }
  // the buffer starts as a copy of the first gradient (no dampening)
  buf = r.first_step ? g : buf * r.momentum + r.one_minus_dampening * g;
  const T direction = r.nesterov ? g + r.momentum * buf : buf;
  p = p - r.lr * direction;
}

template <typename Ops, typename T>
C10_HOST_DEVICE inline void adam_element(T& p, T g, T& exp_avg, T& exp_avg_sq, const Row<T>& r, bool decoupled) {
  if (r.has_weight_decay) {
    if (decoupled) {
      p = p * r.decay;
    } else {
      g = g + r.weight_decay * p;
    }
  }
  // torch.lerp(exp_avg, g, 1 - beta1), taking the same branch as torch
  exp_avg = r.lerp_from_start ? exp_avg + r.one_minus_beta1 * (g - exp_avg) : g - (g - exp_avg) * r.beta1;
  exp_avg_sq = exp_avg_sq * r.beta2 + r.one_minus_beta2 * (g * g);
  const T denom = Ops::sqrt(exp_avg_sq) / r.bias2_sqrt + r.eps;
  p = p - r.step_size * (exp_avg / denom);
}

template <typename Ops, typename T>
C10_HOST_DEVICE inline void lion_element(T& p, T g, T& exp_avg, const Row<T>& r) {
  const T c = r.beta1 * exp_avg + r.one_minus_beta1 * g;
  p = p - r.lr * (Ops::sign(c) + r.weight_decay * p);
  exp_avg = r.beta2 * exp_avg + r.one_minus_beta2 * g;
}

}  // namespace sophon_ext::multi_step
