// Every sophon_ext operator schema, in one place. Kernels live in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu and register with
// TORCH_LIBRARY_IMPL(sophon_ext, CPU|CUDA, m). Autograd, fake (meta) kernels
// and pure-PyTorch fallbacks are registered from Python (sophon_ext/_ops.py
// and the modules that own each op). See csrc/README.md for the recipe.
#include <torch/library.h>

TORCH_LIBRARY(sophon_ext, m) {
  // --- suppression losses: csrc/cpu/suppression_loss.cpp, csrc/cuda/suppression_loss.cu ---

  // --- fused multi-trajectory optimizer update: csrc/cpu/multi_step.cpp, csrc/cuda/multi_step.cu ---
}
