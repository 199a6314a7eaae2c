// Many outputs of one op call out of one allocation. Each is a tensor of its own — one storage each,
// so no output aliases another (the custom-op contract) — over a segment of the buffer, which each
// keeps alive by a reference to the buffer's storage. One allocator call instead of one per output,
// and no dispatcher call per output: on a model's 50+ layers these are a good part of a small call.
// What it costs: one output kept alive keeps the whole buffer; on CUDA, record_stream on an output is
// a no-op (its memory is not a block of the caching allocator of its own), so an output used on a
// side stream must be synchronised by the user before it is freed.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Storage.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <vector>

namespace fastreg {

// The tensor of shape `sizes` (contiguous) whose data starts `offset` elements into `buffer`.
inline at::Tensor carve(const at::Tensor& buffer, int64_t offset, c10::IntArrayRef sizes) {
  c10::StorageImpl* owner = buffer.storage().unsafeGetStorageImpl();
  c10::raw::intrusive_ptr::incref(owner);
  const auto release = [](void* ctx) { c10::raw::intrusive_ptr::decref(static_cast<c10::StorageImpl*>(ctx)); };
  const int64_t elem = static_cast<int64_t>(buffer.element_size());
  c10::Storage storage(c10::Storage::use_byte_size_t(), c10::multiply_integers(sizes) * elem,
                       c10::DataPtr(static_cast<char*>(buffer.data_ptr()) + offset * elem, owner, release, buffer.device()),
                       /*allocator=*/nullptr, /*resizable=*/false);
  at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), buffer.key_set(), buffer.dtype());
  t.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return t;
}

// One uninitialised tensor of each shape, in `options`, carved out of one allocation; each starts on
// a 64-byte boundary (vector loads, BLAS).
inline std::vector<at::Tensor> empty_many(const std::vector<c10::IntArrayRef>& shapes, const at::TensorOptions& options) {
  const int64_t align = std::max<int64_t>(1, 64 / static_cast<int64_t>(options.dtype().itemsize()));
  std::vector<int64_t> offset(shapes.size() + 1, 0);
  for (size_t i = 0; i < shapes.size(); ++i) {
    offset[i + 1] = offset[i] + (c10::multiply_integers(shapes[i]) + align - 1) / align * align;
  }
  const at::Tensor buffer = at::empty({offset.back()}, options);
  std::vector<at::Tensor> out;
  out.reserve(shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i) out.push_back(carve(buffer, offset[i], shapes[i]));
  return out;
}

}  // namespace fastreg
