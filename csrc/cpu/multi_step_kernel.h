// The CPU pass of sophon_ext::multi_step_update_ over the flat (N, P) buffers.
//
// Compiled twice, in namespace SOPHON_ISA (baseline in multi_step.cpp, avx2 in
// multi_step_avx2.cpp; see isa.h); without SOPHON_ISA it only declares.
#pragma once

#include "multi_step.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace sophon_ext::multi_step {

// Type-erased pointers of one call; update() casts them to the element type.
struct KernelArgs {
  Kind kind;
  bool nesterov;
  bool is_double;
  void* params;
  const void* grads;
  void* state1;  // null when the kind (or plain SGD) has none
  void* state2;
  const double* coefs;  // (N, kNumCoefs)
  int64_t rows, row_size;
};

using UpdateFn = void (*)(const KernelArgs&);

// Defined in multi_step_avx2.cpp; null when that file was not compiled for AVX2.
UpdateFn avx2_update();

#ifdef SOPHON_ISA
namespace SOPHON_ISA {

struct VecOps {
  template <typename V>
  static V sqrt(const V& x) {
    return x.sqrt();
  }
  template <typename V>
  static V sign(const V& x) {
    const V zero(0), one(1);
    return ((x > zero) & one) - ((x < zero) & one);  // comparisons give all-ones masks
  }
};

template <typename Vec, typename E>
inline Vec load(const E* ptr, int64_t count) {
  return count == Vec::size() ? Vec::loadu(ptr) : Vec::loadu(ptr, count);
}

// Elements per parallel task (ATen's at::internal::GRAIN_SIZE).
constexpr int64_t kGrainSize = 32768;

// Calls element(offset, count, row) over SIMD-sized pieces of the flat buffer,
// split across threads; a piece never spans two rows.
template <typename E, typename Element>
void for_each_piece(const KernelArgs& a, const Element& element) {
  using Vec = at::vec::Vectorized<E>;
  const int64_t p = a.row_size;
  at::parallel_for(0, a.rows * p, kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t row = i / p;
      const int64_t stop = std::min(end, (row + 1) * p);
      const auto r = Row<Vec>::template load<E>(a.coefs + row * kNumCoefs, a.nesterov);
      int64_t j = i;
      for (; j + Vec::size() <= stop; j += Vec::size()) element(j, Vec::size(), r);
      if (j < stop) element(j, stop - j, r);
      i = stop;
    }
  });
}

template <typename E>
void update_typed(const KernelArgs& a) {
  using Vec = at::vec::Vectorized<E>;
  E* param = static_cast<E*>(a.params);
  const E* grad = static_cast<const E*>(a.grads);
  E* s1 = static_cast<E*>(a.state1);
  E* s2 = static_cast<E*>(a.state2);
  switch (a.kind) {
    case Kind::Sgd:
      for_each_piece<E>(a, [&](int64_t j, int64_t count, const Row<Vec>& r) {
        Vec pv = load<Vec>(param + j, count);
        Vec buf = r.has_momentum ? load<Vec>(s1 + j, count) : Vec(0);
        sgd_element<VecOps>(pv, load<Vec>(grad + j, count), buf, r);
        pv.store(param + j, count);
        if (r.has_momentum) buf.store(s1 + j, count);
      });
      break;
    case Kind::Adam:
    case Kind::AdamW: {
      const bool decoupled = a.kind == Kind::AdamW;
      for_each_piece<E>(a, [&](int64_t j, int64_t count, const Row<Vec>& r) {
        Vec pv = load<Vec>(param + j, count), m = load<Vec>(s1 + j, count), v = load<Vec>(s2 + j, count);
        adam_element<VecOps>(pv, load<Vec>(grad + j, count), m, v, r, decoupled);
        pv.store(param + j, count);
        m.store(s1 + j, count);
        v.store(s2 + j, count);
      });
      break;
    }
    case Kind::Lion:
      for_each_piece<E>(a, [&](int64_t j, int64_t count, const Row<Vec>& r) {
        Vec pv = load<Vec>(param + j, count), m = load<Vec>(s1 + j, count);
        lion_element<VecOps>(pv, load<Vec>(grad + j, count), m, r);
        pv.store(param + j, count);
        m.store(s1 + j, count);
      });
      break;
  }
}

inline void update(const KernelArgs& a) {
  if (a.is_double) {
    update_typed<double>(a);
  } else {
    update_typed<float>(a);
  }
}

}  // namespace SOPHON_ISA
#endif  // SOPHON_ISA

}  // namespace sophon_ext::multi_step
