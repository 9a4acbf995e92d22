// Element types of activations and GEMM outputs, and the one place where a runtime element type
// picks a kernel template (STYLE.md: dtype dispatch in one place).
#pragma once

#include <cuda_bf16.h>

#include <string>

#include "kernels/check.h"

namespace ringllama {

enum class ElemType { BF16, F32 };

inline const char* elem_type_name(ElemType t) {
  switch (t) {
    case ElemType::BF16: return "bf16";
    case ElemType::F32: return "f32";
  }
  return "unknown";
}

inline size_t elem_type_bytes(ElemType t) { return t == ElemType::BF16 ? 2 : 4; }

// Calls f(T{}) with T = __nv_bfloat16 or float; fails loudly on anything else.
template <typename F>
void dispatch_elem_type(ElemType t, const char* op, F&& f) {
  switch (t) {
    case ElemType::BF16: f(__nv_bfloat16{}); return;
    case ElemType::F32: f(float{}); return;
  }
  throw_arg_error(op, "unsupported element type " + std::to_string(static_cast<int>(t)));
}

}  // namespace ringllama
