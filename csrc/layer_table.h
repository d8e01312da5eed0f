// Torch glue shared by the CPU and CUDA impls: input checks and the per-layer params table.
#pragma once

#include <ATen/ATen.h>
#include <ATen/TensorUtils.h>

#include <optional>
#include <tuple>
#include <vector>

#include "include/dtype_pairs.h"
#include "include/eofd_params.h"

namespace eofd {

// The kernels' element type of a side's dtype; `side` names it in the error.
inline DType element_dtype(at::ScalarType dtype, const char* side) {
  switch (dtype) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK(false, "eofd_ext: ", side, " must be float16/bfloat16/float32/float64, got ",
                  dtype);
  }
}

// Each side keeps its dtype: every student is student_dtype, every teacher teacher_dtype
// (include/dtype_pairs.h: the kernels are instances for the pair).
struct LayerTable {
  std::vector<at::Tensor> copies;  // inputs that no (tokens, d) view describes, made contiguous
  std::vector<LayerParams> layers;
  int64_t max_d = 0;
  at::ScalarType student_dtype, teacher_dtype;
  DType student_element, teacher_element;  // the same, as the kernels' element types
  // What the kernels accumulate in and the losses come back in: fp64 when a side is fp64, else
  // fp32 (Accumulator: that of the promoted pair).
  at::ScalarType accumulator_dtype() const {
    return student_dtype == at::kDouble || teacher_dtype == at::kDouble ? at::kDouble : at::kFloat;
  }
};

// x (..., d) as n = numel / d rows of d contiguous elements: its data and row stride in place
// when a (n, d) view of it has unit column stride, else those of a contiguous copy (a
// transposed (N, B, d), strided columns). Computed from sizes and strides, without the
// dispatcher, whose reshape() per layer and side would be most of a small layer's op time.
struct LayerRows {
  const void* data;
  int64_t n, d, row_stride;
};

inline LayerRows as_rows(const at::Tensor& x, LayerTable& table) {
  const int64_t d = x.size(-1);
  const int64_t n = x.numel() / d;
  const auto strides = at::detail::computeStride(x.sizes(), x.strides(), at::IntArrayRef{n, d});
  if (strides.has_value() && (*strides)[1] == 1) return {x.data_ptr(), n, d, (*strides)[0]};
  table.copies.push_back(x.contiguous());
  return {table.copies.back().data_ptr(), n, d, d};
}

// Checks the layers of one call and lays out their params; every message names the argument.
inline LayerTable make_layer_table(at::TensorList students, at::TensorList teachers,
                                   const c10::List<std::optional<at::Tensor>>& masks) {
  const size_t num_layers = students.size();
  TORCH_CHECK(num_layers > 0, "eofd_ext: students is empty");
  TORCH_CHECK(teachers.size() == num_layers && masks.size() == num_layers,
              "eofd_ext: got ", num_layers, " students, ", teachers.size(), " teachers and ",
              masks.size(), " masks");
  LayerTable table;
  table.student_dtype = students[0].scalar_type();
  table.teacher_dtype = teachers[0].scalar_type();
  table.student_element = element_dtype(table.student_dtype, "students");
  table.teacher_element = element_dtype(table.teacher_dtype, "teachers");
  const auto device = students[0].device();
  for (size_t i = 0; i < num_layers; ++i) {
    const at::Tensor& s = students[i];
    const at::Tensor& t = teachers[i];
    TORCH_CHECK(s.dim() >= 2 && s.sizes() == t.sizes(), "eofd_ext: layer ", i,
                ": student ", s.sizes(), " and teacher ", t.sizes(),
                " must be the same (..., d) with at least one token dim");
    TORCH_CHECK(s.scalar_type() == table.student_dtype && t.scalar_type() == table.teacher_dtype,
                "eofd_ext: layer ", i, ": every student must be ", table.student_dtype,
                " and every teacher ", table.teacher_dtype, " (layer 0's), got ",
                s.scalar_type(), " and ", t.scalar_type());
    TORCH_CHECK(s.device() == device && t.device() == device, "eofd_ext: layer ", i,
                ": expected tensors on ", device, ", got ", s.device(), " and ", t.device());
    TORCH_CHECK(s.numel() >= 1, "eofd_ext: layer ", i, " is empty: ", s.sizes());
    const LayerRows sv = as_rows(s, table);
    const LayerRows tv = as_rows(t, table);
    const int64_t n = sv.n, d = sv.d;
    const bool* mask = nullptr;
    const std::optional<at::Tensor> m = masks[i];
    if (m.has_value()) {
      TORCH_CHECK(m->scalar_type() == at::kBool && m->dim() == 1 && m->size(0) == n &&
                      m->is_contiguous() && m->device() == device,
                  "eofd_ext: masks[", i, "] must be a contiguous bool (", n, ",) on ",
                  device, ", got ", m->scalar_type(), " ", m->sizes());
      mask = m->data_ptr<bool>();
    }
    table.layers.push_back(LayerParams{sv.data, tv.data, mask, n, d, sv.row_stride,
                                       tv.row_stride, nullptr, nullptr});
    table.max_d = std::max(table.max_d, d);
  }
  return table;
}

// One incoming grad per layer.
inline void check_grad_losses(const LayerTable& table, const at::Tensor& grad_losses) {
  const int64_t num_layers = table.layers.size();
  TORCH_CHECK(grad_losses.numel() == num_layers, "eofd_ext: grad_losses has ",
              grad_losses.numel(), " values for ", num_layers, " layers");
}

// The backward's own inputs: one grad per layer, and the forward's float64 dim_stats.
inline void check_backward_inputs(const LayerTable& table, const at::Tensor& grad_losses,
                                  const at::Tensor& dim_stats, const at::Device& device) {
  check_grad_losses(table, grad_losses);
  TORCH_CHECK(grad_losses.device() == device && dim_stats.device() == device,
              "eofd_ext: grad_losses (on ", grad_losses.device(), ") and dim_stats (on ",
              dim_stats.device(), ") must be on the layers' device ", device);
  const int64_t num_layers = table.layers.size();
  TORCH_CHECK(dim_stats.scalar_type() == at::kDouble && dim_stats.is_contiguous() &&
                  dim_stats.sizes() == at::IntArrayRef({num_layers, kDimFields, table.max_d}),
              "eofd_ext: dim_stats must be the forward's contiguous float64 (", num_layers, ", ",
              int(kDimFields), ", ", table.max_d, "), got ", dim_stats.sizes());
}

// dS (and dT) for every layer, in the inputs' shapes and dtypes, wired into the table.
// `empty_like(x)`: an uninitialised contiguous tensor of x's sizes and dtype (the kernels write
// rows at r * d), from the device's allocator.
template <typename EmptyLike>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> allocate_grads(
    LayerTable& table, at::TensorList students, at::TensorList teachers,
    bool need_teacher_grad, EmptyLike empty_like) {
  std::vector<at::Tensor> d_students, d_teachers;
  for (size_t l = 0; l < table.layers.size(); ++l) {
    d_students.push_back(empty_like(students[l]));
    table.layers[l].grad_student = d_students.back().data_ptr();
    if (need_teacher_grad) {
      d_teachers.push_back(empty_like(teachers[l]));
      table.layers[l].grad_teacher = d_teachers.back().data_ptr();
    }
  }
  return {d_students, d_teachers};
}

}  // namespace eofd
