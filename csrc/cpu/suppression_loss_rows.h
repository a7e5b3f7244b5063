// Row kernels of the suppression losses (see suppression_loss.cpp for the ops).
//
// This header is compiled twice, in namespace SOPHON_ISA (baseline in
// suppression_loss.cpp, avx2 in suppression_loss_avx2.cpp; see isa.h);
// without SOPHON_ISA it only declares.
//
// Maths, per row z (C logits), target y (or none). Everything is relative to
// a shift m, the max of the non-target logits (of all logits without a
// target; 0 when that max is infinite, as torch.logsumexp): logits of 1e16
// (float64) or 1e37 (float32) must not be rounded to the ulp of m, so no sum
// m + (something small) is ever formed. With r = log sum_{j != y} exp(z_j - m)
// (so logsumexp of the non-target logits is L = m + r) and
// d = (z_y - m) - r = z_y - L (-inf without a target):
//   ICE = -log(1 - p_y) = softplus(d),   logsumexp(z) - m = r + softplus(d),
//   KLU = logsumexp(z) - mean(z) - log C = r + softplus(d) - mean_j (z_j - m) - log C,
//     clamped at 0 (KL >= 0 by Jensen; a negative value is rounding only,
//     and clamping it cannot move the result away from the exact one),
//   dICE/dz = p_y (e_y - q) with q_j = exp(z_j - m - r) (j != y), q_y = 0, p_y = sigmoid(d),
//   dKLU/dz = p - 1/C with p_j = (1 - p_y) q_j (j != y).
// The off-target gradient a q_j + b has q_j in [0, 1]: where a == 0 (e.g.
// ICE alone with p_y = 0, at a +inf off-target logit) it is b, also where
// q_j itself would be inf - inf = NaN.
// The reference-code variant: ICE_ref = CE(1 - z, y) = z_y + logsumexp(-z)
//   = (z_y + m') + r' with m' = max_j (-z_j) and r' = log sum_j exp(-z_j - m'),
//   dICE_ref/dz = e_y - softmax(-z).
// Row stats saved for backward, float64: (m, r) for the suppression loss
// (the backward recomputes d from z_y exactly as the forward does), (m', r')
// for the reference variant. m is a logit of the row (exact in the logits'
// accumulation type) and r lies in [0, log C] for finite rows, so the
// backward's exp(z_j - m) * exp(-r) is exact to float rounding at any
// magnitude. Row sums accumulate in float for float/half/bfloat16,
// double for double. On AVX2, float row passes use a polynomial exp (~2 ulp,
// exp_nonpositive) where every argument they keep is <= 0, i.e. when the
// row's shift is finite; a NaN or infinite row max (or r) takes the exact exp.
// Each pass runs over the whole row in W-blocks; only the block holding the
// target (left out of L) and the last partial block are masked.
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

#ifdef SOPHON_ISA

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

namespace sophon_ext::cpu::SOPHON_ISA {

using at::vec::Vectorized;

template <typename T>
inline T softplus(T d) {
  return d > T(0) ? d + std::log1p(std::exp(-d)) : std::log1p(std::exp(d));
}

// (sigmoid(d), sigmoid(-d)) = (p_y, 1 - p_y), each accurate, from one exp.
template <typename T>
inline std::pair<T, T> sigmoid_pair(T d) {
  const T e = std::exp(-std::abs(d));  // in [0, 1]; NaN stays NaN
  const T lo = e / (T(1) + e), hi = T(1) / (T(1) + e);
  return d >= T(0) ? std::pair<T, T>{hi, lo} : std::pair<T, T>{lo, hi};
}

// logsumexp's shift: the max, or 0 when the max is infinite, so that +inf
// logits give +inf and all -inf give -inf (as torch.logsumexp).
template <typename T>
inline T lse_shift(T m) {
  return std::isinf(m) ? T(0) : m;
}

// exp of the row passes. Fast: for float on AVX2, a polynomial exp (see
// exp_nonpositive) in place of Sleef's; the passes use it only where every
// argument they keep is <= 0 (a finite shift at least the kept logits' max),
// the exact exp() otherwise and for double.
#if defined(CPU_CAPABILITY_AVX2)
// exp(x) for x <= 0 within 2 ulp (x >= -87.3; below, it flushes to 0 by
// ~1e-38): round n = x log2(e), r = x - n ln2 in two parts (Cody-Waite),
// exp(r) by its degree-6 Taylor-like minimax polynomial (Sleef's expf
// coefficients), 2^n built in the exponent bits. x is clamped to >= -88
// first, so -inf gives 0 (2^-127 is built as +0); NaN stays NaN (max returns
// its second operand when one is NaN). x > 88 gives an unspecified value: the
// passes mask such lanes or overwrite them (the backward's target lane).
inline Vectorized<float> exp_nonpositive(const Vectorized<float>& xv) {
  const __m256 x = _mm256_max_ps(_mm256_set1_ps(-88.0f), __m256(xv));
  const __m256 magic = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln2 high part: n * it is exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(0.000198527617612853646278381f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.00139304355252534151077271f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.00833336077630519866943359f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.0416664853692054748535156f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.166666671633720397949219f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // t's low mantissa bits hold n (two's complement): (n + 127) << 23 is 2^n, +0 for n = -127
  const __m256i pow2n = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(t), 23), _mm256_set1_epi32(127 << 23));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
}
#endif

template <bool Fast, typename T>
inline Vectorized<T> vexp(const Vectorized<T>& x) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (Fast && std::is_same_v<T, float>) {
    return exp_nonpositive(x);
  }
#endif
  return x.exp();
}

// Calls f(v, drop, slot) for the W-blocks of x[0, n) in order: v is the block
// (lanes past n read as 0); drop is NoDrop for a full block without `skip`,
// else the mask of the lanes a pass leaves out (those past n, and lane skip
// when 0 <= skip < n); slot alternates between std::integral_constant 0 and 1
// so that f can keep two accumulators. Only the block holding `skip` and the
// last partial block are masked, all others are plain (unaligned) loads.
// With `prefetch`, each pair of plain blocks also prefetches the next 64
// bytes from there (the caller's next row), so that its memory reads overlap
// this row's arithmetic.
struct NoDrop {};
using Slot0 = std::integral_constant<int, 0>;
using Slot1 = std::integral_constant<int, 1>;

template <typename T, typename F>
inline void for_each_block(const T* x, int64_t n, int64_t skip, F&& f, const char* prefetch = nullptr) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t full = n - n % W;
  const bool has_skip = skip >= 0 && skip < n;
  const int64_t skip_block = has_skip ? skip - skip % W : n;
  auto plain = [&](int64_t j, int64_t end) {
    for (; j + 2 * W <= end; j += 2 * W) {
      if (prefetch != nullptr) {
        __builtin_prefetch(prefetch);
        prefetch += 64;
      }
      f(Vec::loadu(x + j), NoDrop{}, Slot0{});
      f(Vec::loadu(x + j + W), NoDrop{}, Slot1{});
    }
    if (j < end) {
      f(Vec::loadu(x + j), NoDrop{}, Slot0{});
    }
  };
  const auto lane = [] { return Vec::arange(T(0), T(1)); };
  if (skip_block < full) {
    plain(0, skip_block);
    f(Vec::loadu(x + skip_block), Vec(lane() == Vec(static_cast<T>(skip - skip_block))), Slot1{});
    plain(skip_block + W, full);
  } else {
    plain(0, full);
  }
  if (full < n) {
    Vec drop = lane() >= Vec(static_cast<T>(n - full));
    if (has_skip && skip_block == full) {
      drop = drop | (lane() == Vec(static_cast<T>(skip - full)));
    }
    f(Vec::loadu(x + full, n - full), drop, Slot1{});
  }
}

template <typename Drop>
inline constexpr bool kPlain = std::is_same_v<std::decay_t<Drop>, NoDrop>;

// max_j s*x_j over j in [0, n) without j = skip (-inf when none; NaN when
// any is NaN), s = -1 when Negate.
template <bool Negate, typename T>
T row_max(const T* x, int64_t n, int64_t skip) {
  using Vec = Vectorized<T>;
  const Vec neg_inf(-std::numeric_limits<T>::infinity());
  Vec acc0 = neg_inf, acc1 = neg_inf;
  for_each_block(x, n, skip, [&](const Vec& v, const auto& drop, auto slot) {
    Vec s = Negate ? v.neg() : v;
    if constexpr (!kPlain<decltype(drop)>) {
      s = Vec::blendv(s, neg_inf, drop);
    }
    Vec& acc = decltype(slot)::value == 0 ? acc0 : acc1;
    acc = at::vec::maximum(acc, s);
  });
  return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, at::vec::maximum(acc0, acc1));
}

// (sum_j exp(s*x_j - shift), and with SumDev sum_j (s*x_j - shift)) over j
// in [0, n) without j = skip, s = -1 when Negate. Fast: see vexp. prefetch:
// see for_each_block.
template <bool Negate, bool Fast, bool SumDev, typename T>
std::pair<T, T> row_sum_exp(const T* x, int64_t n, int64_t skip, T shift, const char* prefetch) {
  using Vec = Vectorized<T>;
  const Vec vshift(shift), zero(T(0));
  Vec sum0 = zero, sum1 = zero, dev0 = zero, dev1 = zero;
  for_each_block(
      x, n, skip,
      [&](const Vec& v, const auto& drop, auto slot) {
        constexpr bool first = decltype(slot)::value == 0;
        Vec t = (Negate ? v.neg() : v) - vshift;
        Vec e = vexp<Fast>(t);
        if constexpr (!kPlain<decltype(drop)>) {
          e = Vec::blendv(e, zero, drop);
          if constexpr (SumDev) {
            t = Vec::blendv(t, zero, drop);
          }
        }
        (first ? sum0 : sum1) += e;
        if constexpr (SumDev) {
          (first ? dev0 : dev1) += t;
        }
      },
      prefetch);
  const auto add = [](Vec& a, Vec& b) { return a + b; };
  return {at::vec::vec_reduce_all<T>(add, sum0 + sum1), SumDev ? at::vec::vec_reduce_all<T>(add, dev0 + dev1) : T(0)};
}

// logsumexp_j s*x_j over j in [0, n) without j = skip (s = -1 when Negate),
// kept apart as shift + log_sum (shift = lse_shift(max), log_sum =
// log sum_j exp(s*x_j - shift); -inf when no j), and (SumDev)
// sum_dev = sum_j (s*x_j - shift) over the same j. prefetch: see for_each_block.
template <typename T>
struct RowLogSumExp {
  T shift;
  double log_sum;
  double sum_dev;
};

template <bool Negate, bool SumDev, typename T>
RowLogSumExp<T> row_logsumexp(const T* x, int64_t n, int64_t skip, const char* prefetch) {
  const T m = row_max<Negate>(x, n, skip);
  const T shift = lse_shift(m);
  // Finite max: every kept argument s*x_j - m is <= 0 (or NaN), the fast exp's domain.
  const auto [sum_e, sum_dev] = std::isfinite(m) ? row_sum_exp<Negate, true, SumDev>(x, n, skip, shift, prefetch)
                                                 : row_sum_exp<Negate, false, SumDev>(x, n, skip, shift, prefetch);
  return {shift, std::log(static_cast<double>(sum_e)), static_cast<double>(sum_dev)};
}

// out_j = a * exp(s*x_j - shift) + b over [0, n), s = -1 when Negate. Fast: see vexp.
template <bool Negate, bool Fast, typename T>
void row_affine_exp(const T* x, T* out, int64_t n, T shift, T a, T b, const char* prefetch) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec vshift(shift), va(a), vb(b);
  auto value = [&](const Vec& v) { return at::vec::fmadd(vexp<Fast>((Negate ? v.neg() : v) - vshift), va, vb); };
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    if (prefetch != nullptr) {
      __builtin_prefetch(prefetch);
      prefetch += 64;
    }
    const Vec r0 = value(Vec::loadu(x + j)), r1 = value(Vec::loadu(x + j + W));
    r0.store(out + j);
    r1.store(out + j + W);
  }
  for (; j < n; j += W) {
    const int64_t m = std::min<int64_t>(W, n - j);
    if (m == W) {
      value(Vec::loadu(x + j)).store(out + j);
    } else {
      value(Vec::loadu(x + j, m)).store(out + j, m);
    }
  }
}

// out_j = a * q_j + b over [0, n) with q_j = exp(s*x_j - m - r) in [0, 1]
// (m, r: a row's float64 stats), s = -1 when Negate. Finite m and r (every
// finite row): q_j = exp(s*x_j - m) * exp(-r), the fast exp on arguments
// <= 0 but at the target lane (which the callers overwrite), and no
// rounding of m + r. Otherwise (an infinite or NaN logit) the exact exp of
// s*x_j - (m + r). a == 0 gives b: q_j is bounded, so a q_j is 0 even where
// q_j is inf - inf (a +inf logit when p_y = 0).
template <bool Negate, typename T>
void row_scaled_exp(const T* x, T* out, int64_t n, double m, double r, double a, double b, const char* prefetch) {
  if (a == 0.0) {
    std::fill(out, out + n, static_cast<T>(b));
  } else if (std::isfinite(m) && std::isfinite(r)) {
    row_affine_exp<Negate, true>(x, out, n, static_cast<T>(m), static_cast<T>(a * std::exp(-r)), static_cast<T>(b),
                                 prefetch);
  } else {
    row_affine_exp<Negate, false>(x, out, n, static_cast<T>(m + r), static_cast<T>(a), static_cast<T>(b), prefetch);
  }
}

// The bytes of row i + 1 for the row passes to prefetch; null after the last row.
template <typename scalar_t>
inline const char* next_row(const scalar_t* rows, int64_t i, int64_t end, int64_t C) {
  return i + 1 < end ? reinterpret_cast<const char*>(rows + (i + 1) * C) : nullptr;
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
    // logsumexp over the classes other than y (all classes without a target), as m + r
    const RowLogSumExp<acc_t> rest = row_logsumexp<false, true>(z, C, y, next_row(logits, i, end, C));
    const double m = static_cast<double>(rest.shift), r = rest.log_sum;
    const double dev_y = y >= 0 ? static_cast<double>(z[y]) - m : 0.0;  // z_y - m: exact for float rows
    const double d = y >= 0 ? dev_y - r : -std::numeric_limits<double>::infinity();
    const double ice = softplus(d);
    double value = 0.0;
    // A zero weight must not turn an infinite term into NaN (0 * inf).
    if (args.ice_weight != 0.0) {
      value += args.ice_weight * ice;
    }
    if (args.klu_weight != 0.0) {
      // mean_j (z_j - m): the target's term was left out of the row pass
      const double mean_dev = (rest.sum_dev + dev_y) / static_cast<double>(C);
      const double klu = r + ice - mean_dev - log_c;
      value += args.klu_weight * (klu < 0.0 ? 0.0 : klu);  // KL >= 0: negatives are rounding (NaN stays)
    }
    loss[i] = static_cast<scalar_t>(value);
    stats[2 * i] = m;
    stats[2 * i + 1] = r;
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
    const double m = stats[2 * i], r = stats[2 * i + 1];
    const acc_t* z = io.load(logits + i * C);
    // d as the forward computed it
    const double d = y >= 0 ? (static_cast<double>(z[y]) - m) - r : -std::numeric_limits<double>::infinity();
    const auto [p_y, rest] = sigmoid_pair(d);
    acc_t* out = io.output(grad_row);
    row_scaled_exp<false>(z, out, C, m, r, g * (klu_w * rest - ice_w * p_y), -g * klu_w * inv_c,
                          next_row(logits, i, end, C));
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
      stats[2 * i] = stats[2 * i + 1] = 0.0;
      continue;
    }
    const acc_t* z = io.load(logits + i * C);
    const RowLogSumExp<acc_t> lse_neg = row_logsumexp<true, false>(z, C, -1, next_row(logits, i, end, C));
    const double m = static_cast<double>(lse_neg.shift);
    // z_y + m first: both large and close when y is the lowest logit
    loss[i] = static_cast<scalar_t>((static_cast<double>(z[y]) + m) + lse_neg.log_sum);
    stats[2 * i] = m;
    stats[2 * i + 1] = lse_neg.log_sum;
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
    const double m = stats[2 * i], r = stats[2 * i + 1];
    const acc_t* z = io.load(logits + i * C);
    acc_t* out = io.output(grad_row);
    // -g R_j, R_j = exp(-z_j - m - r) = softmax(-z)_j
    row_scaled_exp<true>(z, out, C, m, r, -g, 0.0, next_row(logits, i, end, C));
    // out_y = g (1 - R_y): 1 - R_y from float64 values when R_y is near 1
    out[y] = static_cast<acc_t>(g * -std::expm1((-static_cast<double>(z[y]) - m) - r));
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

}  // namespace sophon_ext::cpu::SOPHON_ISA

#endif  // SOPHON_ISA
