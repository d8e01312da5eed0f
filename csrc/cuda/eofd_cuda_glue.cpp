// Torch glue of the CUDA kernels: checks, allocation, stream, registration under CUDA.
// Only c10/cuda beside ATen: ATen/cuda/CUDAContext.h pulls in cuSPARSE and cuBLAS headers,
// which a CUDA toolkit without those libraries (or torch's pip wheels) may not provide.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../layer_table.h"
#include "eofd_cuda.cuh"

namespace eofd {
namespace {

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "eofd_ext: CUDA launch failed: ", cudaGetErrorString(err));
}

bool any_mask(const LayerTable& table) {
  return std::any_of(table.layers.begin(), table.layers.end(),
                     [](const LayerParams& p) { return p.mask != nullptr; });
}

// The kernel instance of a call: from its pair of dtypes, masks and pointers (for the
// backward, with the outputs already in the table).
KernelVariant kernel_variant(const LayerTable& table, Pass pass, bool need_teacher_grad) {
  const DType student = table.student_element, teacher = table.teacher_element;
  return KernelVariant{pass, student, teacher, any_mask(table), need_teacher_grad,
                       vector_aligned(table.layers.data(), static_cast<int>(table.layers.size()),
                                      student, teacher, pass)};
}

// From shapes and the device alone, so the reduction order (the bits) never varies.
LaunchShape launch_shape(const LayerTable& table, const KernelVariant& variant,
                         const at::Device& device) {
  int64_t max_n = 0;
  for (const LayerParams& p : table.layers) max_n = std::max(max_n, p.n);
  LaunchShape shape{};
  check_launch(plan_device_launch(variant, max_n, table.max_d,
                                  static_cast<int>(table.layers.size()), device.index(),
                                  &shape));
  return shape;
}

// The params table in device memory, written on the current stream from kernel parameters
// (device_table.cu): CUDA-graph capture records it with the values it needs.
at::Tensor device_table(const LayerTable& table, const at::Device& device) {
  const int64_t bytes = table.layers.size() * sizeof(LayerParams);
  at::Tensor layers = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  check_launch(write_device_table(table.layers.data(), static_cast<int>(table.layers.size()),
                                  reinterpret_cast<LayerParams*>(layers.data_ptr()),
                                  c10::cuda::getCurrentCUDAStream()));
  return layers;
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(
    at::TensorList students, at::TensorList teachers,
    const c10::List<std::optional<at::Tensor>>& masks, double power, double eps) {
  const c10::cuda::CUDAGuard guard(students[0].device());
  const LayerTable table = make_layer_table(students, teachers, masks);
  const KernelVariant variant = kernel_variant(table, Pass::kStats, false);
  const LaunchShape shape = launch_shape(table, variant, students[0].device());
  const auto options = students[0].options();
  const auto acc = table.accumulator_dtype();
  at::Tensor partials = at::empty(
      {shape.num_layers * shape.num_chunks * kMomentFields * shape.max_d}, options.dtype(acc));
  at::Tensor dim_stats = at::empty({shape.num_layers, kDimFields, shape.max_d},
                                   options.dtype(at::kDouble));
  at::Tensor losses = at::empty({shape.num_layers}, options.dtype(at::kDouble));
  const at::Tensor layers = device_table(table, students[0].device());
  check_launch(launch_forward(reinterpret_cast<const LayerParams*>(layers.data_ptr()), shape,
                              variant, power, eps, partials.data_ptr(),
                              dim_stats.data_ptr<double>(), losses.data_ptr<double>(),
                              c10::cuda::getCurrentCUDAStream()));
  return {losses.to(acc), dim_stats};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> backward_cuda(
    const at::Tensor& grad_losses, at::TensorList students, at::TensorList teachers,
    const c10::List<std::optional<at::Tensor>>& masks, const at::Tensor& dim_stats,
    bool need_teacher_grad) {
  const c10::cuda::CUDAGuard guard(students[0].device());
  LayerTable table = make_layer_table(students, teachers, masks);
  check_backward_inputs(table, grad_losses, dim_stats, students[0].device());
  const at::Tensor grads = grad_losses.to(at::kDouble).contiguous();
  auto grads_out =
      allocate_grads(table, students, teachers, need_teacher_grad,
                     [](const at::Tensor& x) { return at::empty(x.sizes(), x.options()); });
  const KernelVariant variant = kernel_variant(table, Pass::kBackward, need_teacher_grad);
  const LaunchShape shape = launch_shape(table, variant, students[0].device());
  const at::Tensor layers = device_table(table, students[0].device());
  check_launch(launch_backward(reinterpret_cast<const LayerParams*>(layers.data_ptr()), shape,
                               variant, grads.data_ptr<double>(), dim_stats.data_ptr<double>(),
                               c10::cuda::getCurrentCUDAStream()));
  return grads_out;
}

}  // namespace

TORCH_LIBRARY_IMPL(eofd_ext, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("backward", &backward_cuda);
}

}  // namespace eofd
