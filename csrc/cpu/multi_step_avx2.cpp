// The multi_step_update_ CPU pass compiled for AVX2+FMA (see isa.h and multi_step_kernel.h).
// CMakeLists.txt compiles csrc/cpu/*_avx2.cpp with -mavx2 -mfma -mf16c on
// x86-64; multi_step.cpp calls this pass only when ATen reports an
// AVX2-capable CPU, so the library still loads and runs everywhere.
#if defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define SOPHON_ISA avx2
#include "cpu/multi_step_kernel.h"

namespace sophon_ext::multi_step {
UpdateFn avx2_update() {
  return &avx2::update;
}
}  // namespace sophon_ext::multi_step

#else  // compiled without AVX2 flags: the baseline pass serves

#include "cpu/multi_step_kernel.h"

namespace sophon_ext::multi_step {
UpdateFn avx2_update() {
  return nullptr;
}
}  // namespace sophon_ext::multi_step

#endif
