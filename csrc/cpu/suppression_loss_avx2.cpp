// The suppression-loss row kernels compiled for AVX2+FMA (see isa.h and suppression_loss_rows.h).
// CMakeLists.txt compiles csrc/cpu/*_avx2.cpp with -mavx2 -mfma -mf16c on
// x86-64; suppression_loss.cpp calls these kernels only when ATen reports an
// AVX2-capable CPU, so the library still loads and runs everywhere.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define SOPHON_ISA avx2
#include "cpu/suppression_loss_rows.h"

namespace sophon_ext::cpu {
const RowKernelSet* avx2_row_kernels() {
  return avx2::row_kernels();
}
}  // namespace sophon_ext::cpu

#else  // compiled without AVX2 flags: the baseline kernels serve

#include "cpu/suppression_loss_rows.h"

namespace sophon_ext::cpu {
const RowKernelSet* avx2_row_kernels() {
  return nullptr;
}
}  // namespace sophon_ext::cpu

#endif
