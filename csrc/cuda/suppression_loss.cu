// CUDA kernels of the suppression losses (same ops and maths as
// csrc/cpu/suppression_loss.cpp; derivation in csrc/cpu/suppression_loss_rows.h).
// One warp per row: each lane streams a strided slice of the row once,
// keeping an online (max, sum of exp) pair, then the warp merges the pairs.
// Row stats are float64, as on the CPU: (m, r) with m the logsumexp shift
// and r = log sum exp(z_j - m), never the rounded sum m + r (see
// suppression_loss_rows.h: logits of 1e16 or 1e37 must keep their differences).
#include "suppression_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

namespace sophon_ext::cuda {
namespace {

using at::Tensor;

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;

// Online logsumexp of one lane's (or the warp's) values. Non-finite values
// are only flagged, so +inf gives +inf, NaN gives NaN and all -inf gives -inf
// (as torch.logsumexp and the CPU kernels).
template <typename T>
struct OnlineLse {
  T max = -std::numeric_limits<T>::infinity();
  T sum = T(0);
  bool nan = false;
  bool pos_inf = false;

  __device__ void push(T x) {
    if (isnan(x)) {
      nan = true;
    } else if (isinf(x)) {
      pos_inf |= x > T(0);
    } else if (x > max) {
      sum = sum * exp(max - x) + T(1);
      max = x;
    } else {
      sum += exp(x - max);
    }
  }

  __device__ void merge(const OnlineLse& o) {
    if (o.max > max) {
      sum = sum * exp(max - o.max) + o.sum;
      max = o.max;
    } else if (o.max > -std::numeric_limits<T>::infinity()) {
      sum += o.sum * exp(o.max - max);
    }
    nan |= o.nan;
    pos_inf |= o.pos_inf;
  }

  __device__ void warp_merge() {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      OnlineLse other;
      other.max = __shfl_xor_sync(0xffffffffu, max, offset);
      other.sum = __shfl_xor_sync(0xffffffffu, sum, offset);
      other.nan = __shfl_xor_sync(0xffffffffu, static_cast<int>(nan), offset) != 0;
      other.pos_inf = __shfl_xor_sync(0xffffffffu, static_cast<int>(pos_inf), offset) != 0;
      merge(other);
    }
  }

  // The shift m (the max, 0 when it is infinite, NaN with a NaN) and r = log
  // sum_j exp(x_j - m), as the CPU's row_logsumexp: m + r is the logsumexp.
  __device__ double shift() const {
    if (nan) {
      return std::numeric_limits<double>::quiet_NaN();
    }
    return pos_inf || max == -std::numeric_limits<T>::infinity() ? 0.0 : static_cast<double>(max);
  }
  __device__ double log_sum() const {
    if (nan) {
      return std::numeric_limits<double>::quiet_NaN();
    }
    if (pos_inf) {
      return std::numeric_limits<double>::infinity();
    }
    if (max == -std::numeric_limits<T>::infinity()) {
      return -std::numeric_limits<double>::infinity();
    }
    return ::log(static_cast<double>(sum));
  }
};

template <typename T>
__device__ T warp_sum(T x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

__device__ inline double softplus(double d) {
  return d > 0.0 ? d + ::log1p(::exp(-d)) : ::log1p(::exp(d));
}

__device__ inline double sigmoid(double d) {
  if (d >= 0.0) {
    return 1.0 / (1.0 + ::exp(-d));
  }
  const double e = ::exp(d);
  return e / (1.0 + e);
}

// a q_j + b with q_j = exp(s x_j - m - r) in [0, 1] for a row's float64 stats
// (m, r), as the CPU's row_scaled_exp: finite m and r give
// (a exp(-r)) exp(s x_j - m) (no rounding of m + r), others the exp of
// s x_j - (m + r); a == 0 gives b (a q_j is 0 even where q_j is inf - inf).
template <typename T>
struct ScaledExp {
  T shift, coef, offset;
  bool zero;
  __device__ ScaledExp(double m, double r, double a, double b) : offset(static_cast<T>(b)), zero(a == 0.0) {
    const bool finite = isfinite(m) && isfinite(r);
    shift = static_cast<T>(finite ? m : m + r);
    coef = static_cast<T>(finite ? a * ::exp(-r) : a);
  }
  __device__ T operator()(T sx) const { return zero ? offset : coef * exp(sx - shift) + offset; }
};

struct RowState {
  int64_t row;
  int64_t y;     // target class, -1 without target
  bool skip;     // ignored row: zeros
  bool invalid;  // out-of-range target (the host checks first): NaN, no read
};

__device__ inline RowState row_state(const int64_t* target, int64_t row, int64_t C, int64_t ignore_index) {
  RowState st{row, -1, false, false};
  if (target != nullptr) {
    st.y = target[row];
    st.skip = st.y == ignore_index;
    st.invalid = !st.skip && (st.y < 0 || st.y >= C);
  }
  return st;
}

// Loops warps over rows; the body is warp-uniform.
#define SOPHON_FOR_EACH_ROW_OF_WARP(row, N)                                                                     \
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; row < (N); \
       row += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock)

template <typename scalar_t>
__global__ void suppression_forward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                                           int64_t N, int64_t C, int64_t ignore_index, double ice_w, double klu_w,
                                           scalar_t* __restrict__ loss, double* __restrict__ stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  SOPHON_FOR_EACH_ROW_OF_WARP(row, N) {
    const RowState st = row_state(target, row, C, ignore_index);
    if (st.skip || st.invalid) {
      if (lane == 0) {
        const double fill = st.skip ? 0.0 : std::numeric_limits<double>::quiet_NaN();
        loss[row] = static_cast<scalar_t>(fill);
        stats[2 * row] = stats[2 * row + 1] = fill;
      }
      continue;
    }
    const scalar_t* z = logits + row * C;
    OnlineLse<acc_t> lse;
    // sum_j (z_j - ref) over all j, ref = z_0 (0 if not finite): differences of
    // nearby logits, exact where the row sits at 1e16 (a plain sum_j z_j would not be)
    const acc_t first = static_cast<acc_t>(z[0]);
    const acc_t ref = isfinite(first) ? first : acc_t(0);
    acc_t sum_dev = acc_t(0);
    for (int64_t j = lane; j < C; j += kWarpSize) {
      const acc_t x = static_cast<acc_t>(z[j]);
      sum_dev += x - ref;
      if (j != st.y) {
        lse.push(x);
      }
    }
    lse.warp_merge();
    sum_dev = warp_sum(sum_dev);
    if (lane == 0) {
      const double m = lse.shift(), r = lse.log_sum();
      const double d = st.y >= 0 ? (static_cast<double>(static_cast<acc_t>(z[st.y])) - m) - r
                                 : -std::numeric_limits<double>::infinity();
      const double ice = softplus(d);
      double value = 0.0;
      if (ice_w != 0.0) {  // a zero weight must not turn inf into NaN
        value += ice_w * ice;
      }
      if (klu_w != 0.0) {
        // mean_j (z_j - m) = mean_j (z_j - ref) + (ref - m)
        const double mean_dev = static_cast<double>(sum_dev) / static_cast<double>(C) + (static_cast<double>(ref) - m);
        const double klu = r + ice - mean_dev - ::log(static_cast<double>(C));
        value += klu_w * (klu < 0.0 ? 0.0 : klu);  // KL >= 0: negatives are rounding (NaN stays)
      }
      loss[row] = static_cast<scalar_t>(value);
      stats[2 * row] = m;
      stats[2 * row + 1] = r;
    }
  }
}

template <typename scalar_t>
__global__ void suppression_backward_kernel(const scalar_t* __restrict__ grad_loss, const scalar_t* __restrict__ logits,
                                            const int64_t* __restrict__ target, const double* __restrict__ stats,
                                            int64_t N, int64_t C, int64_t ignore_index, double ice_w, double klu_w,
                                            scalar_t* __restrict__ grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  SOPHON_FOR_EACH_ROW_OF_WARP(row, N) {
    const RowState st = row_state(target, row, C, ignore_index);
    scalar_t* out = grad + row * C;
    if (st.skip || st.invalid) {
      const scalar_t fill = static_cast<scalar_t>(st.skip ? 0.0 : std::numeric_limits<double>::quiet_NaN());
      for (int64_t j = lane; j < C; j += kWarpSize) {
        out[j] = fill;
      }
      continue;
    }
    const double g = static_cast<double>(static_cast<acc_t>(grad_loss[row]));
    const double m = stats[2 * row], r = stats[2 * row + 1];
    const scalar_t* z = logits + row * C;
    // d as the forward computed it
    const double d = st.y >= 0 ? (static_cast<double>(static_cast<acc_t>(z[st.y])) - m) - r
                               : -std::numeric_limits<double>::infinity();
    const double p_y = sigmoid(d), rest = sigmoid(-d), inv_c = 1.0 / static_cast<double>(C);
    const ScaledExp<acc_t> off_target(m, r, g * (klu_w * rest - ice_w * p_y), -g * klu_w * inv_c);
    const acc_t grad_y = static_cast<acc_t>(g * (ice_w * p_y + klu_w * (p_y - inv_c)));
    for (int64_t j = lane; j < C; j += kWarpSize) {
      const acc_t value = j == st.y ? grad_y : off_target(static_cast<acc_t>(z[j]));
      out[j] = static_cast<scalar_t>(value);
    }
  }
}

template <typename scalar_t>
__global__ void ice_reference_forward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                                             int64_t N, int64_t C, int64_t ignore_index, scalar_t* __restrict__ loss,
                                             double* __restrict__ stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  SOPHON_FOR_EACH_ROW_OF_WARP(row, N) {
    const RowState st = row_state(target, row, C, ignore_index);
    if (st.skip || st.invalid) {
      if (lane == 0) {
        const double fill = st.skip ? 0.0 : std::numeric_limits<double>::quiet_NaN();
        loss[row] = static_cast<scalar_t>(fill);
        stats[2 * row] = stats[2 * row + 1] = fill;
      }
      continue;
    }
    const scalar_t* z = logits + row * C;
    OnlineLse<acc_t> lse;
    for (int64_t j = lane; j < C; j += kWarpSize) {
      lse.push(-static_cast<acc_t>(z[j]));
    }
    lse.warp_merge();
    if (lane == 0) {
      const double m = lse.shift(), r = lse.log_sum();
      // z_y + m first: both large and close when y is the lowest logit
      loss[row] = static_cast<scalar_t>((static_cast<double>(static_cast<acc_t>(z[st.y])) + m) + r);
      stats[2 * row] = m;
      stats[2 * row + 1] = r;
    }
  }
}

template <typename scalar_t>
__global__ void ice_reference_backward_kernel(const scalar_t* __restrict__ grad_loss,
                                              const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                                              const double* __restrict__ stats, int64_t N, int64_t C,
                                              int64_t ignore_index, scalar_t* __restrict__ grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  SOPHON_FOR_EACH_ROW_OF_WARP(row, N) {
    const RowState st = row_state(target, row, C, ignore_index);
    scalar_t* out = grad + row * C;
    if (st.skip || st.invalid) {
      const scalar_t fill = static_cast<scalar_t>(st.skip ? 0.0 : std::numeric_limits<double>::quiet_NaN());
      for (int64_t j = lane; j < C; j += kWarpSize) {
        out[j] = fill;
      }
      continue;
    }
    const double g = static_cast<double>(static_cast<acc_t>(grad_loss[row]));
    const double m = stats[2 * row], r = stats[2 * row + 1];
    const ScaledExp<acc_t> off_target(m, r, -g, 0.0);  // -g R_j, R = softmax(-z)
    const scalar_t* z = logits + row * C;
    for (int64_t j = lane; j < C; j += kWarpSize) {
      const acc_t x = static_cast<acc_t>(z[j]);
      // g (1 - R_y) from float64 values: R_y can be within rounding of 1
      const acc_t value = j == st.y ? static_cast<acc_t>(g * -::expm1((-static_cast<double>(x) - m) - r))
                                    : off_target(-x);
      out[j] = static_cast<scalar_t>(value);
    }
  }
}

#undef SOPHON_FOR_EACH_ROW_OF_WARP

// ---------------------------------------------------------------------------- host side

dim3 grid_for_rows(int64_t rows) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return dim3(static_cast<unsigned>(std::min<int64_t>(blocks, 65535)));
}

constexpr unsigned kThreads = kWarpSize * kWarpsPerBlock;

// Contiguous int64 target, checked (values too: one device sync); undefined when absent.
Tensor checked_target(const char* op, const std::optional<Tensor>& target, const Tensor& logits, int64_t ignore_index) {
  if (!target.has_value()) {
    return Tensor();
  }
  check_loss_target(op, *target, logits);
  const Tensor t = target->contiguous();
  const int64_t C = logits.size(1);
  if (t.numel() > 0) {
    const bool out_of_range = t.ne(ignore_index).logical_and(t.lt(0).logical_or(t.ge(C))).any().item<bool>();
    TORCH_CHECK_INDEX(!out_of_range, op, ": target values must lie in [0, ", C, ") or equal ignore_index (",
                      ignore_index, ")");
  }
  return t;
}

// The four ops share their host side: checks, the device guard, contiguous inputs, outputs, and
// no launch for an empty batch. `launch` dispatches on the dtype and starts the kernel.
template <typename Launch>
std::tuple<Tensor, Tensor> forward_rows(const char* op, const Tensor& logits_in, const std::optional<Tensor>& target_in,
                                        bool target_required, int64_t ignore_index, const Launch& launch) {
  check_loss_logits(op, logits_in);
  TORCH_CHECK_VALUE(target_in.has_value() || !target_required, op, ": target is required when ice_weight != 0");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const Tensor logits = logits_in.contiguous();
  const Tensor target = checked_target(op, target_in, logits, ignore_index);
  const int64_t N = logits.size(0), C = logits.size(1);
  Tensor loss = at::empty({N}, logits.options());
  Tensor stats = at::empty({N, 2}, logits.options().dtype(at::kDouble));
  if (N > 0) {
    launch(logits, target, N, C, loss, stats);
  }
  return {loss, stats};
}

template <typename Launch>
Tensor backward_rows(const char* op, const Tensor& grad_loss_in, const Tensor& logits_in,
                     const std::optional<Tensor>& target_in, bool target_required, const Tensor& stats_in,
                     int64_t ignore_index, const Launch& launch) {
  check_loss_logits(op, logits_in);
  TORCH_CHECK_VALUE(target_in.has_value() || !target_required, op, ": target is required when ice_weight != 0");
  check_row_input(op, "grad_loss", grad_loss_in, logits_in, 0);
  check_row_input(op, "stats", stats_in, logits_in, 2);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const Tensor logits = logits_in.contiguous();
  const Tensor target = checked_target(op, target_in, logits, ignore_index);
  const Tensor grad_loss = grad_loss_in.to(logits.scalar_type()).contiguous();
  const Tensor stats = stats_in.to(at::kDouble).contiguous();
  const int64_t N = logits.size(0), C = logits.size(1);
  Tensor grad = at::empty({N, C}, logits.options());
  if (N > 0) {
    launch(grad_loss, logits, target, stats, N, C, grad);
  }
  return grad;
}

const int64_t* target_data(const Tensor& target) {
  return target.defined() ? target.const_data_ptr<int64_t>() : nullptr;
}

std::tuple<Tensor, Tensor> suppression_loss_cuda(const Tensor& logits_in, const std::optional<Tensor>& target_in,
                                                 double ice_weight, double klu_weight, int64_t ignore_index) {
  return forward_rows(
      "sophon_ext::suppression_loss", logits_in, target_in, ice_weight != 0.0, ignore_index,
      [&](const Tensor& logits, const Tensor& target, int64_t N, int64_t C, Tensor& loss, Tensor& stats) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "suppression_loss_cuda", [&] {
          suppression_forward_kernel<scalar_t><<<grid_for_rows(N), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              logits.const_data_ptr<scalar_t>(), target_data(target), N, C, ignore_index, ice_weight, klu_weight,
              loss.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<double>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
}

Tensor suppression_loss_backward_cuda(const Tensor& grad_loss_in, const Tensor& logits_in,
                                      const std::optional<Tensor>& target_in, const Tensor& stats_in,
                                      double ice_weight, double klu_weight, int64_t ignore_index) {
  return backward_rows(
      "sophon_ext::suppression_loss_backward", grad_loss_in, logits_in, target_in, ice_weight != 0.0, stats_in,
      ignore_index,
      [&](const Tensor& grad_loss, const Tensor& logits, const Tensor& target, const Tensor& stats, int64_t N,
          int64_t C, Tensor& grad) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "suppression_loss_backward_cuda", [&] {
          suppression_backward_kernel<scalar_t><<<grid_for_rows(N), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              grad_loss.const_data_ptr<scalar_t>(), logits.const_data_ptr<scalar_t>(), target_data(target),
              stats.const_data_ptr<double>(), N, C, ignore_index, ice_weight, klu_weight,
              grad.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
}

std::tuple<Tensor, Tensor> ice_reference_cuda(const Tensor& logits_in, const Tensor& target_in, int64_t ignore_index) {
  return forward_rows(
      "sophon_ext::inverse_cross_entropy_reference", logits_in, target_in, true, ignore_index,
      [&](const Tensor& logits, const Tensor& target, int64_t N, int64_t C, Tensor& loss, Tensor& stats) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ice_reference_cuda", [&] {
          ice_reference_forward_kernel<scalar_t><<<grid_for_rows(N), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              logits.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), N, C, ignore_index,
              loss.mutable_data_ptr<scalar_t>(), stats.mutable_data_ptr<double>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
}

Tensor ice_reference_backward_cuda(const Tensor& grad_loss_in, const Tensor& logits_in, const Tensor& target_in,
                                   const Tensor& stats_in, int64_t ignore_index) {
  return backward_rows(
      "sophon_ext::inverse_cross_entropy_reference_backward", grad_loss_in, logits_in, target_in, true, stats_in,
      ignore_index,
      [&](const Tensor& grad_loss, const Tensor& logits, const Tensor& target, const Tensor& stats, int64_t N,
          int64_t C, Tensor& grad) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ice_reference_backward_cuda", [&] {
          ice_reference_backward_kernel<scalar_t><<<grid_for_rows(N), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              grad_loss.const_data_ptr<scalar_t>(), logits.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(),
              stats.const_data_ptr<double>(), N, C, ignore_index, grad.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(sophon_ext, CUDA, m) {
  m.impl("suppression_loss", &suppression_loss_cuda);
  m.impl("suppression_loss_backward", &suppression_loss_backward_cuda);
  m.impl("inverse_cross_entropy_reference", &ice_reference_cuda);
  m.impl("inverse_cross_entropy_reference_backward", &ice_reference_backward_cuda);
}

}  // namespace sophon_ext::cuda
