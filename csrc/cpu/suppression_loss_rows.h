// Row kernels of the suppression losses (see suppression_loss.cpp for the ops).
//
// This header is compiled twice: by suppression_loss.cpp for the baseline
// instruction set (namespace `baseline`) and by suppression_loss_avx2.cpp for
// AVX2+FMA (namespace `avx2`); at::vec picks its implementation from the
// CPU_CAPABILITY_* macros of the including file. suppression_loss.cpp picks
// the set at run time, as ATen does (ATEN_CPU_CAPABILITY=default forces the
// baseline).
//
// Maths, per row z (C logits), target y (or none), L = logsumexp of the
// non-target logits (all logits without a target), d = z_y - L (-inf without
// a target):
//   ICE = -log(1 - p_y) = softplus(d),   logsumexp(z) = L + softplus(d),
//   KLU = logsumexp(z) - mean(z) - log C,
//   dICE/dz = p_y (e_y - q) with q_j = exp(z_j - L) (j != y), q_y = 0, p_y = sigmoid(d),
//   dKLU/dz = p - 1/C with p_j = (1 - p_y) q_j (j != y).
// The reference-code variant: ICE_ref = CE(1 - z, y) = z_y + logsumexp(-z),
//   dICE_ref/dz = e_y - softmax(-z).
// Row stats saved for backward: (L, d) for the suppression loss, logsumexp(-z)
// for the reference variant, always in float64: a float32 L of logits ~1e4
// would be off by ulp(1e4) ~ 1e-3 and so would exp(z - L). The backward
// splits L into a float part and a small remainder to keep exp(z - L) exact
// to float rounding. Row sums accumulate in float for float/half/bfloat16,
// double for double.
#pragma once

#include <cstdint>

namespace sophon_ext::cpu {

// Type-erased pointers of one call; the kernels cast them to their types.
struct RowArgs {
  const void* logits = nullptr;     // (N, C) scalar_t, contiguous
  const int64_t* target = nullptr;  // (N,) or null (label-free KLU)
  const void* grad_loss = nullptr;  // (N,) scalar_t (backward)
  const double* stats_in = nullptr; // (N, k) (backward)
  void* loss = nullptr;             // (N,) scalar_t (forward)
  double* stats = nullptr;          // (N, k) (forward)
  void* grad = nullptr;             // (N, C) scalar_t (backward)
  int64_t num_classes = 0;
  int64_t ignore_index = -100;
  double ice_weight = 0.0;
  double klu_weight = 0.0;
};

using RowRangeFn = void (*)(const RowArgs&, int64_t begin, int64_t end);

// Index of a logits dtype in the tables below.
enum RowDtype : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3, kNumRowDtypes = 4 };

// The row kernels one instruction set provides, per dtype.
struct RowKernelSet {
  RowRangeFn suppression_forward[kNumRowDtypes];
  RowRangeFn suppression_backward[kNumRowDtypes];
  RowRangeFn ice_reference_forward[kNumRowDtypes];
  RowRangeFn ice_reference_backward[kNumRowDtypes];
};

// Defined in suppression_loss_avx2.cpp; null when that file was not compiled for AVX2.
const RowKernelSet* avx2_row_kernels();

}  // namespace sophon_ext::cpu

#ifdef SOPHON_ROW_KERNEL_NAMESPACE

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace sophon_ext::cpu::SOPHON_ROW_KERNEL_NAMESPACE {

using at::vec::Vectorized;

template <typename T>
inline T nan_max(T a, T b) {
  // NaN wins, so a NaN logit makes the row's loss NaN.
  return (a != a || a > b) ? a : b;
}

template <typename T>
inline T softplus(T d) {
  return d > T(0) ? d + std::log1p(std::exp(-d)) : std::log1p(std::exp(d));
}

template <typename T>
inline T sigmoid(T d) {
  if (d >= T(0)) {
    return T(1) / (T(1) + std::exp(-d));
  }
  const T e = std::exp(d);
  return e / (T(1) + e);
}

// exp(x - L) = exp(x - hi) * scale for a float64 L: hi is L rounded to T and
// scale = exp(hi - L) carries the remainder that rounding dropped.
template <typename T>
struct SplitShift {
  T hi;
  double scale;
  explicit SplitShift(double L) : hi(static_cast<T>(L)), scale(std::isfinite(L) ? std::exp(static_cast<double>(hi) - L) : 1.0) {}
};

// logsumexp's shift: the max, or 0 when the max is infinite, so that +inf
// logits give +inf and all -inf give -inf (as torch.logsumexp).
template <typename T>
inline T lse_shift(T m) {
  return std::isinf(m) ? T(0) : m;
}

// The last n < W elements of x as a vector, the missing lanes set to fill.
template <typename T>
Vectorized<T> load_tail(const T* x, int64_t n, T fill) {
  return Vectorized<T>::set(Vectorized<T>(fill), Vectorized<T>::loadu(x, n), n);
}

// max_j s*x_j over x[0, n), s = -1 when Negate; -inf for n == 0.
template <bool Negate, typename T>
T row_max(const T* x, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  constexpr T inf = std::numeric_limits<T>::infinity();
  Vec acc(-inf);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    Vec v = Vec::loadu(x + j);
    acc = at::vec::maximum(acc, Negate ? v.neg() : v);
  }
  if (j < n) {
    Vec v = load_tail(x + j, n - j, Negate ? inf : -inf);
    acc = at::vec::maximum(acc, Negate ? v.neg() : v);
  }
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, acc);
}

// (sum_j exp(s*x_j - shift), sum_j x_j) over x[0, n), s = -1 when Negate.
template <bool Negate, typename T>
std::pair<T, T> row_sum_exp(const T* x, int64_t n, T shift) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  constexpr T inf = std::numeric_limits<T>::infinity();
  const Vec vshift(shift);
  Vec sum_e0(T(0)), sum_e1(T(0)), sum_x(T(0));
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {  // two accumulators hide exp latency
    Vec a = Vec::loadu(x + j), b = Vec::loadu(x + j + W);
    sum_x += a + b;
    sum_e0 += ((Negate ? a.neg() : a) - vshift).exp();
    sum_e1 += ((Negate ? b.neg() : b) - vshift).exp();
  }
  for (; j < n; j += W) {  // last full vector and the tail; padded lanes add exp(-inf) = 0
    const int64_t m = std::min<int64_t>(W, n - j);
    sum_x += Vec::loadu(x + j, m);  // zero-filled lanes
    Vec a = load_tail(x + j, m, Negate ? inf : -inf);
    sum_e0 += ((Negate ? a.neg() : a) - vshift).exp();
  }
  auto add = [](Vec& a, Vec& b) { return a + b; };
  sum_e0 += sum_e1;
  return {at::vec::vec_reduce_all<T>(add, sum_e0), at::vec::vec_reduce_all<T>(add, sum_x)};
}

// out_j = a * exp(s*x_j - shift) + b over [0, n), s = -1 when Negate.
template <bool Negate, typename T>
void row_affine_exp(const T* x, T* out, int64_t n, T shift, T a, T b) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec vshift(shift), va(a), vb(b);
  for (int64_t j = 0; j < n; j += W) {
    const int64_t m = std::min<int64_t>(W, n - j);
    Vec v = m == W ? Vec::loadu(x + j) : Vec::loadu(x + j, m);
    Vec r = at::vec::fmadd(((Negate ? v.neg() : v) - vshift).exp(), va, vb);
    if (m == W) {
      r.store(out + j);
    } else {
      r.store(out + j, m);
    }
  }
}

// Reads row i as acc_t (converting half/bfloat16 rows into a per-thread
// buffer of C elements) and writes acc_t results back as scalar_t.
template <typename scalar_t>
class RowIO {
 public:
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;

  explicit RowIO(int64_t num_classes) : num_classes_(num_classes) {
    if constexpr (kConvert) {
      in_.resize(num_classes);
      out_.resize(num_classes);
    }
  }
  const acc_t* load(const scalar_t* row) {
    if constexpr (kConvert) {
      for (int64_t j = 0; j < num_classes_; ++j) {
        in_[j] = static_cast<acc_t>(row[j]);
      }
      return in_.data();
    } else {
      return row;
    }
  }
  acc_t* output(scalar_t* row) {
    if constexpr (kConvert) {
      return out_.data();
    } else {
      return row;
    }
  }
  void store(scalar_t* row) {
    if constexpr (kConvert) {
      for (int64_t j = 0; j < num_classes_; ++j) {
        row[j] = static_cast<scalar_t>(out_[j]);
      }
    }
  }

 private:
  int64_t num_classes_;
  std::vector<acc_t> in_, out_;
};

template <typename scalar_t>
void suppression_forward_rows(const RowArgs& args, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = args.num_classes;
  const auto* logits = static_cast<const scalar_t*>(args.logits);
  auto* loss = static_cast<scalar_t*>(args.loss);
  double* stats = args.stats;
  const double log_c = std::log(static_cast<double>(C));
  RowIO<scalar_t> io(C);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t y = args.target ? args.target[i] : -1;
    if (args.target && y == args.ignore_index) {
      loss[i] = scalar_t(0);
      stats[2 * i] = stats[2 * i + 1] = 0.0;
      continue;
    }
    const acc_t* z = io.load(logits + i * C);
    double lse_rest, d, sum_z;
    if (y >= 0) {  // logsumexp over the classes other than y: [0, y) and (y, C)
      const acc_t m = nan_max(row_max<false>(z, y), row_max<false>(z + y + 1, C - y - 1));
      const acc_t shift = lse_shift(m);
      const auto [se_lo, sx_lo] = row_sum_exp<false>(z, y, shift);
      const auto [se_hi, sx_hi] = row_sum_exp<false>(z + y + 1, C - y - 1, shift);
      lse_rest = static_cast<double>(shift) + std::log(static_cast<double>(se_lo + se_hi));
      d = static_cast<double>(z[y]) - lse_rest;
      sum_z = static_cast<double>(sx_lo + sx_hi) + static_cast<double>(z[y]);
    } else {
      const acc_t shift = lse_shift(row_max<false>(z, C));
      const auto [se, sx] = row_sum_exp<false>(z, C, shift);
      lse_rest = static_cast<double>(shift) + std::log(static_cast<double>(se));
      d = -std::numeric_limits<double>::infinity();
      sum_z = static_cast<double>(sx);
    }
    const double ice = softplus(d);
    double value = 0.0;
    // A zero weight must not turn an infinite term into NaN (0 * inf).
    if (args.ice_weight != 0.0) {
      value += args.ice_weight * ice;
    }
    if (args.klu_weight != 0.0) {
      value += args.klu_weight * (lse_rest + ice - sum_z / static_cast<double>(C) - log_c);
    }
    loss[i] = static_cast<scalar_t>(value);
    stats[2 * i] = lse_rest;
    stats[2 * i + 1] = d;
  }
}

template <typename scalar_t>
void suppression_backward_rows(const RowArgs& args, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = args.num_classes;
  const auto* logits = static_cast<const scalar_t*>(args.logits);
  const auto* grad_loss = static_cast<const scalar_t*>(args.grad_loss);
  const double* stats = args.stats_in;
  auto* grad = static_cast<scalar_t*>(args.grad);
  const double ice_w = args.ice_weight, klu_w = args.klu_weight, inv_c = 1.0 / static_cast<double>(C);
  RowIO<scalar_t> io(C);
  for (int64_t i = begin; i < end; ++i) {
    scalar_t* grad_row = grad + i * C;
    const int64_t y = args.target ? args.target[i] : -1;
    if (args.target && y == args.ignore_index) {
      std::fill(grad_row, grad_row + C, scalar_t(0));
      continue;
    }
    const double g = static_cast<double>(grad_loss[i]);
    const double d = stats[2 * i + 1];
    const double p_y = sigmoid(d), rest = sigmoid(-d);
    const SplitShift<acc_t> lse_rest(stats[2 * i]);
    const acc_t* z = io.load(logits + i * C);
    acc_t* out = io.output(grad_row);
    const double a = g * (klu_w * rest - ice_w * p_y);
    row_affine_exp<false>(z, out, C, lse_rest.hi, static_cast<acc_t>(a * lse_rest.scale), static_cast<acc_t>(-g * klu_w * inv_c));
    if (y >= 0) {
      out[y] = static_cast<acc_t>(g * (ice_w * p_y + klu_w * (p_y - inv_c)));
    }
    io.store(grad_row);
  }
}

template <typename scalar_t>
void ice_reference_forward_rows(const RowArgs& args, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = args.num_classes;
  const auto* logits = static_cast<const scalar_t*>(args.logits);
  auto* loss = static_cast<scalar_t*>(args.loss);
  double* stats = args.stats;
  RowIO<scalar_t> io(C);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t y = args.target[i];
    if (y == args.ignore_index) {
      loss[i] = scalar_t(0);
      stats[i] = 0.0;
      continue;
    }
    const acc_t* z = io.load(logits + i * C);
    const acc_t shift = lse_shift(row_max<true>(z, C));
    const double log_sum = std::log(static_cast<double>(row_sum_exp<true>(z, C, shift).first));
    // z_y + shift first: both large and close when y is the lowest logit
    loss[i] = static_cast<scalar_t>(static_cast<double>(z[y]) + static_cast<double>(shift) + log_sum);
    stats[i] = static_cast<double>(shift) + log_sum;
  }
}

template <typename scalar_t>
void ice_reference_backward_rows(const RowArgs& args, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = args.num_classes;
  const auto* logits = static_cast<const scalar_t*>(args.logits);
  const auto* grad_loss = static_cast<const scalar_t*>(args.grad_loss);
  const double* stats = args.stats_in;
  auto* grad = static_cast<scalar_t*>(args.grad);
  RowIO<scalar_t> io(C);
  for (int64_t i = begin; i < end; ++i) {
    scalar_t* grad_row = grad + i * C;
    const int64_t y = args.target[i];
    if (y == args.ignore_index) {
      std::fill(grad_row, grad_row + C, scalar_t(0));
      continue;
    }
    const double g = static_cast<double>(grad_loss[i]);
    // exp(-z_j - S) = exp(-z_j - hi) * scale with S = logsumexp(-z)
    const SplitShift<acc_t> lse_neg(stats[i]);
    const acc_t* z = io.load(logits + i * C);
    acc_t* out = io.output(grad_row);
    row_affine_exp<true>(z, out, C, lse_neg.hi, static_cast<acc_t>(-g * lse_neg.scale), acc_t(0));
    // out_y = g (1 - r_y): 1 - r_y from the float64 stats when r_y is near 1
    out[y] = static_cast<acc_t>(g * -std::expm1(-static_cast<double>(z[y]) - stats[i]));
    io.store(grad_row);
  }
}

#define SOPHON_ROW_KERNELS_OF(fn) {&fn<float>, &fn<double>, &fn<c10::Half>, &fn<c10::BFloat16>}

inline const RowKernelSet* row_kernels() {
  static const RowKernelSet set{
      SOPHON_ROW_KERNELS_OF(suppression_forward_rows),
      SOPHON_ROW_KERNELS_OF(suppression_backward_rows),
      SOPHON_ROW_KERNELS_OF(ice_reference_forward_rows),
      SOPHON_ROW_KERNELS_OF(ice_reference_backward_rows),
  };
  return &set;
}

#undef SOPHON_ROW_KERNELS_OF

}  // namespace sophon_ext::cpu::SOPHON_ROW_KERNEL_NAMESPACE

#endif  // SOPHON_ROW_KERNEL_NAMESPACE
