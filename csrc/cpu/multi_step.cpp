// CPU kernel of sophon_ext::multi_step_update_ (schema in csrc/ops.cpp; argument checks shared
// with the CUDA kernel in csrc/multi_step_checks.cpp).
#define SOPHON_ISA baseline
#include "cpu/multi_step_kernel.h"
#include "cpu/isa.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace sophon_ext::multi_step {
namespace {

UpdateFn cpu_update() {
  static const UpdateFn fn = cpu_isa::choose_isa<UpdateFn>(&baseline::update, avx2_update());
  return fn;
}


void multi_step_update_cpu(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& state1,
                           const at::Tensor& state2, const at::Tensor& step, const at::Tensor& lr,
                           const at::Tensor& momentum, const at::Tensor& dampening, const at::Tensor& beta1,
                           const at::Tensor& beta2, const at::Tensor& weight_decay, const at::Tensor& eps,
                           c10::string_view kind_name, bool nesterov, bool check_values) {
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
  if (check_values && any_broken) throw_broken_rule(masks, step, hparams);  // false: the caller checked them

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
