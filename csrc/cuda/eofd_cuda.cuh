// Launchers of the CUDA kernels (eofd_cuda.cu, device_table.cu); torch-free.
#pragma once

#include <cuda_runtime.h>

#include "../include/eofd_params.h"
#include "launch_params.h"

namespace eofd {

// layers: device array of num_layers LayerParams. partials: device workspace of
// num_layers * num_chunks * kMomentFields * max_d accumulators (double for kFloat64, else float).
// dim_stats: (L, kDimFields, max_d) double; losses: (L,) double.
cudaError_t launch_forward(const LayerParams* layers, const LaunchShape& shape, DType dtype,
                           bool has_mask, double power, double eps, void* partials,
                           double* dim_stats, double* losses, cudaStream_t stream);

// grads: (L,) double, the incoming gradient of every layer's loss.
cudaError_t launch_backward(const LayerParams* layers, const LaunchShape& shape, DType dtype,
                            bool has_mask, bool need_teacher_grad, const double* grads,
                            const double* dim_stats, cudaStream_t stream);

// Copies num_layers params from host memory into the device table through kernel parameters
// (capture-safe: no host buffer is read when a CUDA graph replays).
cudaError_t write_device_table(const LayerParams* host_layers, int num_layers,
                               LayerParams* device_layers, cudaStream_t stream);

}  // namespace eofd
