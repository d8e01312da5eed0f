// Writes a call's LayerParams table to device memory from kernel parameters. Torch-free.
//
// Kernel parameters are captured into a CUDA graph by value, so the table reaches the GPU
// without any host buffer: no pageable copy (which capture forbids) and no pinned staging
// buffer that a replay could read after it went back to the allocator.
#include <cuda_runtime.h>

#include <cstring>

#include "eofd_cuda.cuh"

namespace eofd {
namespace {

// 32 x 72 B of params per launch stays under the 4 KB kernel-parameter limit of every arch.
constexpr int kParamsPerLaunch = 32;

struct ParamsBatch {
  LayerParams layers[kParamsPerLaunch];
};

__global__ void write_table_kernel(ParamsBatch batch, int count, LayerParams* out) {
  if (static_cast<int>(threadIdx.x) < count) out[threadIdx.x] = batch.layers[threadIdx.x];
}

}  // namespace

cudaError_t write_device_table(const LayerParams* host_layers, int num_layers,
                               LayerParams* device_layers, cudaStream_t stream) {
  for (int first = 0; first < num_layers; first += kParamsPerLaunch) {
    const int count = num_layers - first < kParamsPerLaunch ? num_layers - first
                                                            : kParamsPerLaunch;
    ParamsBatch batch;
    std::memcpy(batch.layers, host_layers + first, count * sizeof(LayerParams));
    write_table_kernel<<<1, kParamsPerLaunch, 0, stream>>>(batch, count, device_layers + first);
  }
  return cudaGetLastError();
}

}  // namespace eofd
