// Argument checks shared by the CPU and CUDA suppression-loss kernels. They
// raise c10 errors that reach Python as ValueError / TypeError / IndexError.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace sophon_ext {

inline void check_loss_logits(const char* op, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must have shape (N, C), got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) >= 2, op, ": logits need C >= 2 classes, got C = ", logits.size(1));
  const auto t = logits.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
                   ": logits must be float32, float64, float16 or bfloat16, got ", t);
}

// Checks target's dtype, shape and device (not its values: see each kernel).
inline void check_loss_target(const char* op, const at::Tensor& target, const at::Tensor& logits) {
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": target must be int64, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(0), op, ": target must have shape (",
                    logits.size(0), ",), got ", target.sizes());
  TORCH_CHECK_VALUE(target.device() == logits.device(), op, ": target is on ", target.device(), " but logits on ",
                    logits.device());
}

// Checks a backward input indexed by row: (N,) or (N, k).
inline void check_row_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits,
                            int64_t row_width) {
  const bool shape_ok = row_width == 0 ? (t.dim() == 1 && t.size(0) == logits.size(0))
                                       : (t.dim() == 2 && t.size(0) == logits.size(0) && t.size(1) == row_width);
  TORCH_CHECK_VALUE(shape_ok, op, ": ", name, " has shape ", t.sizes(), ", which does not match logits ",
                    logits.sizes());
  TORCH_CHECK_VALUE(t.device() == logits.device(), op, ": ", name, " is on ", t.device(), " but logits on ",
                    logits.device());
  TORCH_CHECK_TYPE(t.is_floating_point(), op, ": ", name, " must be floating point, got ", t.scalar_type());
}

}  // namespace sophon_ext
