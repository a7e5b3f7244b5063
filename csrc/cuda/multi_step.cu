// CUDA kernels of sophon_ext::multi_step_update_ (schema in csrc/ops.cpp).
// Argument checks and rule messages come from csrc/multi_step_checks.cpp, the
// per-trajectory coefficients (fill_row) and element rules from csrc/multi_step.h.
// A one-block prologue fills the (N, kNumCoefs) table on the device; the main
// kernel is one grid-stride loop over the flat (N, P) buffer, each element
// reading its row's coefficients (N is small, so the table stays in cache).
// Reporting out-of-range values needs a device->host copy; with check_values
// false the call has no host sync at all.
#include "multi_step.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace sophon_ext::multi_step {
namespace {

struct ScalarOps {
  __device__ static float sqrt(float x) { return ::sqrtf(x); }
  __device__ static double sqrt(double x) { return ::sqrt(x); }
  template <typename T>
  __device__ static T sign(T x) {
    return T((x > T(0)) - (x < T(0)));
  }
};

// One thread per trajectory: coefficients and broken-rule masks (`masks` null: not wanted).
template <typename step_t>
__global__ void fill_rows_kernel(Kind kind, bool nesterov, bool sgd_buffers, const double* __restrict__ hp,
                                 const step_t* __restrict__ step, int64_t rows, double* __restrict__ coefs,
                                 int32_t* __restrict__ masks) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < rows;
       row += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    // hp: (7, N) in the schema's order lr, momentum, dampening, beta1, beta2, weight_decay, eps
    const RowInputs x{hp[row],        hp[rows + row],     hp[2 * rows + row],       hp[3 * rows + row],
                      hp[4 * rows + row], hp[5 * rows + row], hp[6 * rows + row], static_cast<double>(step[row])};
    const int broken = fill_row(kind, nesterov, sgd_buffers, x, coefs + row * kNumCoefs);
    if (masks != nullptr) masks[row] = broken;
  }
}

template <typename scalar_t, Kind kKind>
__global__ void multi_step_kernel(scalar_t* __restrict__ params, const scalar_t* __restrict__ grads,
                                  scalar_t* __restrict__ state1, scalar_t* __restrict__ state2,
                                  const double* __restrict__ coefs, int64_t row_size, int64_t total, bool nesterov) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const auto r = Row<scalar_t>::template load<scalar_t>(coefs + (i / row_size) * kNumCoefs, nesterov);
    scalar_t p = params[i];
    const scalar_t g = grads[i];
    if constexpr (kKind == Kind::Sgd) {
      scalar_t buf = r.has_momentum ? state1[i] : scalar_t(0);
      sgd_element<ScalarOps>(p, g, buf, r);
      if (r.has_momentum) state1[i] = buf;
    } else if constexpr (kKind == Kind::Lion) {
      scalar_t m = state1[i];
      lion_element<ScalarOps>(p, g, m, r);
      state1[i] = m;
    } else {
      scalar_t m = state1[i], v = state2[i];
      adam_element<ScalarOps>(p, g, m, v, r, kKind == Kind::AdamW);
      state1[i] = m;
      state2[i] = v;
    }
    params[i] = p;
  }
}

template <typename scalar_t, Kind kKind>
void launch(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& state1, const at::Tensor& state2,
            const at::Tensor& coefs, bool nesterov) {
  const int64_t total = params.numel();
  constexpr int kThreads = 256;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(sms) * 8);
  multi_step_kernel<scalar_t, kKind><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      params.data_ptr<scalar_t>(), grads.const_data_ptr<scalar_t>(),
      state1.numel() ? state1.data_ptr<scalar_t>() : nullptr, state2.numel() ? state2.data_ptr<scalar_t>() : nullptr,
      coefs.const_data_ptr<double>(), params.size(1), total, nesterov);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void multi_step_update_cuda(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& state1,
                            const at::Tensor& state2, const at::Tensor& step, const at::Tensor& lr,
                            const at::Tensor& momentum, const at::Tensor& dampening, const at::Tensor& beta1,
                            const at::Tensor& beta2, const at::Tensor& weight_decay, const at::Tensor& eps,
                            c10::string_view kind_name, bool nesterov, bool check_values) {
  const at::Tensor* hparams[7] = {&lr, &momentum, &dampening, &beta1, &beta2, &weight_decay, &eps};
  const Kind kind = check_arguments(params, grads, state1, state2, step, hparams,
                                    std::string_view(kind_name.data(), kind_name.size()), nesterov);
  const c10::cuda::CUDAGuard guard(params.device());
  const int64_t n = params.size(0);
  const auto stream = at::cuda::getCurrentCUDAStream();

  const at::Tensor hp = at::stack({lr, momentum, dampening, beta1, beta2, weight_decay, eps}).to(at::kDouble);
  const at::Tensor coefs = at::empty({n, kNumCoefs}, params.options().dtype(at::kDouble));
  const at::Tensor masks = check_values ? at::empty({n}, params.options().dtype(at::kInt)) : at::Tensor();
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES(step.scalar_type(), "multi_step_fill_rows", [&] {
      const int threads = static_cast<int>(std::min<int64_t>(n, 256));
      const int64_t blocks = (n + threads - 1) / threads;
      fill_rows_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
          kind, nesterov, state1.numel() != 0, hp.const_data_ptr<double>(), step.const_data_ptr<scalar_t>(), n,
          coefs.data_ptr<double>(), check_values ? masks.data_ptr<int32_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // the one device->host copy of a checked call: were any values out of range?
    if (check_values && masks.max().item<int32_t>() != 0) throw_broken_rule(masks.cpu(), step, hparams);
  }

  step.add_(1);
  if (params.numel() == 0) return;
  const at::Tensor grads_dense = grads.contiguous();
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "multi_step_update_cuda", [&] {
    switch (kind) {
      case Kind::Sgd:
        launch<scalar_t, Kind::Sgd>(params, grads_dense, state1, state2, coefs, nesterov);
        break;
      case Kind::Adam:
        launch<scalar_t, Kind::Adam>(params, grads_dense, state1, state2, coefs, nesterov);
        break;
      case Kind::AdamW:
        launch<scalar_t, Kind::AdamW>(params, grads_dense, state1, state2, coefs, nesterov);
        break;
      case Kind::Lion:
        launch<scalar_t, Kind::Lion>(params, grads_dense, state1, state2, coefs, nesterov);
        break;
    }
  });
}

}  // namespace
}  // namespace sophon_ext::multi_step

TORCH_LIBRARY_IMPL(sophon_ext, CUDA, m) {
  m.impl("multi_step_update_", &sophon_ext::multi_step::multi_step_update_cuda);
}
