// One instruction-set scheme for the CPU kernels. A kernel header is compiled twice: by <op>.cpp
// with SOPHON_ISA defined as `baseline`, and by <op>_avx2.cpp with SOPHON_ISA defined as `avx2`
// (CMakeLists.txt compiles csrc/cpu/*_avx2.cpp with -mavx2 -mfma -mf16c on x86-64); each copy
// lives in namespace SOPHON_ISA, and at::vec picks its implementation from the CPU_CAPABILITY_*
// macros of the including file. Without SOPHON_ISA a kernel header only declares. At run time
// choose_isa() takes the AVX2 copy when it was compiled and ATen reports an AVX2 CPU: the rule of
// ATen's own kernels, so ATEN_CPU_CAPABILITY=default forces the baseline.
#pragma once

#include <ATen/Version.h>

#include <string>

namespace sophon_ext::cpu_isa {

inline bool runs_avx2() {
  static const bool avx2 = [] {
    const std::string capability = at::get_cpu_capability();
    return capability == "AVX2" || capability == "AVX512";
  }();
  return avx2;
}

template <typename Kernels>
Kernels choose_isa(Kernels baseline, Kernels avx2) {
  return (avx2 != nullptr && runs_avx2()) ? avx2 : baseline;
}

}  // namespace sophon_ext::cpu_isa
