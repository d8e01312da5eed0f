// Launchers of the CUDA kernels (eofd_cuda.cu, device_table.cu); torch-free.
#pragma once

#include <cuda_runtime.h>

#include "../include/dtype_pairs.h"
#include "../include/eofd_params.h"
#include "launch_params.h"

namespace eofd {

// Which instance of a hot kernel a call runs.
struct KernelVariant {
  Pass pass;
  DType student, teacher;  // the pair's element types (include/dtype_pairs.h)
  bool has_mask;           // some layer has a mask
  bool need_teacher_grad;  // backward: dT too
  bool aligned;            // vector_aligned: whole-vector loads and stores
};

// Whether every layer of a call takes whole vectors (a thread's dims of a row: 16 bytes of the
// pair's promoted type, its count of elements of each side): S and T (and, for the backward,
// dS and dT) aligned to their vector's bytes, d and the row strides multiples of the vector.
// One test per call, as the Triton launcher's ALIGNED: the kernels then need no per-row or
// per-thread test.
bool vector_aligned(const LayerParams* host_layers, int num_layers, DType student,
                    DType teacher, Pass pass);

// The launch of a variant for a call on `device`: the grid heuristic of launch_params.h
// (plan_launch) with the CTAs per SM the selected kernel's registers allow.
cudaError_t plan_device_launch(const KernelVariant& variant, int64_t max_n, int64_t max_d,
                               int num_layers, int device, LaunchShape* shape);

// layers: device array of num_layers LayerParams. partials: device workspace of
// num_layers * num_chunks * kMomentFields * max_d accumulators (the pair's Accumulator: double
// when a side is kFloat64, else float).
// dim_stats: (L, kDimFields, max_d) double; losses: (L,) double.
cudaError_t launch_forward(const LayerParams* layers, const LaunchShape& shape,
                           const KernelVariant& variant, double power, double eps,
                           void* partials, double* dim_stats, double* losses,
                           cudaStream_t stream);

// grads: (L,) double, the incoming gradient of every layer's loss.
cudaError_t launch_backward(const LayerParams* layers, const LaunchShape& shape,
                            const KernelVariant& variant, const double* grads,
                            const double* dim_stats, cudaStream_t stream);

// Copies num_layers params from host memory into the device table through kernel parameters
// (capture-safe: no host buffer is read when a CUDA graph replays).
cudaError_t write_device_table(const LayerParams* host_layers, int num_layers,
                               LayerParams* device_layers, cudaStream_t stream);

}  // namespace eofd
