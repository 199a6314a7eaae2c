// Bool masks (keep masks, pruned-group masks) as the kernels read them: one byte per entry, any
// non-zero byte true, as torch treats a bool tensor's bytes (a mask viewed from uint8, read from a
// buffer or left uninitialised may hold bytes other than 0 and 1; read as C++ bool they would be
// undefined behaviour, e.g. a pruned count that disagrees with the permutation built from it).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastreg {

inline const uint8_t* mask_bytes(const at::Tensor& mask) { return static_cast<const uint8_t*>(mask.data_ptr()); }

}  // namespace fastreg
