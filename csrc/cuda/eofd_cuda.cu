// CUDA kernels of the EOFD loss: all layers of a call in the same launches (docs/design.md,
// "The passes").
// Torch-free: only CUDA headers and ours, so plain nvcc compiles it anywhere.
//
// Stats and backward grids are (chunk of rows, block of dims, layer). A block is
// kDimThreads x kRowGroups threads; a thread owns one 16-byte vector of dims and, per tile,
// kRowsPerThread rows held in registers: exact two-pass stats around the tile's first valid
// row, merged tile by tile (Chan), then the row groups merged in order through shared memory.
// Every reduction order depends on shapes only: results are bitwise deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "eofd_cuda.cuh"

namespace eofd {
namespace {

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  using acc = float;
  __device__ static float load(float x) { return x; }
  __device__ static float store(float x) { return x; }
};
template <>
struct Traits<double> {
  using acc = double;
  __device__ static double load(double x) { return x; }
  __device__ static double store(double x) { return x; }
};
template <>
struct Traits<__half> {
  using acc = float;
  __device__ static float load(__half x) { return __half2float(x); }
  __device__ static __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Traits<__nv_bfloat16> {
  using acc = float;
  __device__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

template <typename T>
constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte access

template <typename T>
__device__ bool vec_aligned(const void* base, int64_t row_stride) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && row_stride % kVec<T> == 0;
}

// One vector of a row, in acc; 16-byte load when aligned and fully inside the row.
template <typename T>
__device__ void load_vec(const T* row, int64_t col, int64_t d, bool aligned,
                         typename Traits<T>::acc* out) {
  constexpr int V = kVec<T>;
  if (aligned && col + V <= d) {
    alignas(16) T v[V];
    *reinterpret_cast<uint4*>(v) = __ldg(reinterpret_cast<const uint4*>(row + col));
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = Traits<T>::load(v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = col + k < d ? Traits<T>::load(row[col + k]) : 0;
  }
}

template <typename T>
__device__ void store_vec(T* row, int64_t col, int64_t d, bool aligned,
                          const typename Traits<T>::acc* in) {
  constexpr int V = kVec<T>;
  alignas(16) T v[V];
#pragma unroll
  for (int k = 0; k < V; ++k) v[k] = Traits<T>::store(in[k]);
  if (aligned && col + V <= d) {
    *reinterpret_cast<uint4*>(row + col) = *reinterpret_cast<const uint4*>(v);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (col + k < d) row[col + k] = v[k];
    }
  }
}

__device__ __forceinline__ bool row_valid(const LayerParams& p, int64_t r) {
  return r < p.n && (p.mask == nullptr || p.mask[r]);
}


template <typename T, bool HAS_MASK>
__global__ void __launch_bounds__(kDimThreads * kRowGroups)
    stats_kernel(const LayerParams* layers, LaunchShape shape,
                 typename Traits<T>::acc* partials) {
  using acc = typename Traits<T>::acc;
  constexpr int V = kVec<T>;
  constexpr int kBlockD = kDimThreads * V;
  const LayerParams p = layers[blockIdx.z];
  const int64_t chunk_rows = int64_t(kRowGroups) * kRowsPerThread * shape.tiles_per_chunk;
  const int64_t row0 = blockIdx.x * chunk_rows;
  const int64_t col = blockIdx.y * int64_t(kBlockD) + threadIdx.x * V;
  const bool active = row0 < p.n && col < p.d;

  Moments<acc> mom[V];
  acc squared_error[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    mom[k] = Moments<acc>{0, 0, 0, 0};
    squared_error[k] = 0;
  }
  if (active) {
    const auto* S = static_cast<const T*>(p.student);
    const auto* Tt = static_cast<const T*>(p.teacher);
    const bool s_aligned = vec_aligned<T>(S, p.student_row);
    const bool t_aligned = vec_aligned<T>(Tt, p.teacher_row);
    for (int64_t tile = 0; tile < shape.tiles_per_chunk; ++tile) {
      const int64_t r0 = row0 + (tile * kRowGroups + threadIdx.y) * kRowsPerThread;
      acc s[kRowsPerThread][V], t[kRowsPerThread][V];
      bool valid[kRowsPerThread];
      int n_valid = 0;
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        valid[i] = HAS_MASK ? row_valid(p, r0 + i) : r0 + i < p.n;
        if (valid[i]) {
          load_vec(S + (r0 + i) * p.student_row, col, p.d, s_aligned, s[i]);
          load_vec(Tt + (r0 + i) * p.teacher_row, col, p.d, t_aligned, t[i]);
          ++n_valid;
        }
      }
      if (n_valid == 0) continue;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        // The first valid row's value, selected with constant indices: t[first][k] with a
        // run-time `first` would put the tile in local memory.
        acc pivot = 0;
#pragma unroll
        for (int i = kRowsPerThread - 1; i >= 0; --i) pivot = valid[i] ? t[i][k] : pivot;
        acc sum = 0;
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
          if (!valid[i]) continue;
          const acc e = s[i][k] - t[i][k];
          squared_error[k] += e * e;
          sum += t[i][k] - pivot;
        }
        const acc mean = sum / acc(n_valid);
        acc m2 = 0;
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
          const acc dev = (t[i][k] - pivot) - mean;
          if (valid[i]) m2 += dev * dev;
        }
        chan_merge(mom[k], Moments<acc>{acc(n_valid), pivot, mean, m2});
      }
    }
  }

  // Row groups merge in order 0, 1, ..., kRowGroups - 1 through shared memory.
  __shared__ acc shared[kRowGroups][kMomentFields][kBlockD];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int c = threadIdx.x * V + k;
    shared[threadIdx.y][0][c] = mom[k].count;
    shared[threadIdx.y][1][c] = mom[k].pivot;
    shared[threadIdx.y][2][c] = mom[k].offset;
    shared[threadIdx.y][3][c] = mom[k].m2;
    shared[threadIdx.y][4][c] = squared_error[k];
  }
  __syncthreads();
  if (threadIdx.y != 0 || !active) return;
  acc* out = partials + ((int64_t(blockIdx.z) * shape.num_chunks + blockIdx.x) * kMomentFields) *
                            shape.max_d;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int c = threadIdx.x * V + k;
    for (int g = 1; g < kRowGroups; ++g) {
      chan_merge(mom[k], Moments<acc>{shared[g][0][c], shared[g][1][c], shared[g][2][c],
                                      shared[g][3][c]});
      squared_error[k] += shared[g][4][c];
    }
    if (col + k < p.d) {
      out[kMomentCount * shape.max_d + col + k] = mom[k].count;
      out[kMomentPivot * shape.max_d + col + k] = mom[k].pivot;
      out[kMomentPivotOffset * shape.max_d + col + k] = mom[k].offset;
      out[kMomentM2 * shape.max_d + col + k] = mom[k].m2;
      out[kMomentSquaredError * shape.max_d + col + k] = squared_error[k];
    }
  }
}

// Chunk partials -> per-dim stats, in chunk order, in double. One thread per dim.
template <typename acc>
__global__ void merge_chunks_kernel(const LayerParams* layers, LaunchShape shape,
                                    const acc* partials, double* dim_stats) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= shape.max_d) return;
  const LayerParams p = layers[blockIdx.y];
  const int64_t chunk_rows = int64_t(kRowGroups) * kRowsPerThread * shape.tiles_per_chunk;
  Moments<double> mom{0, 0, 0, 0};
  double squared_error = 0;
  if (j < p.d) {
    for (int64_t c = 0; c < (p.n + chunk_rows - 1) / chunk_rows; ++c) {
      const acc* part = partials +
                        ((int64_t(blockIdx.y) * shape.num_chunks + c) * kMomentFields) *
                            shape.max_d + j;
      chan_merge(mom, Moments<double>{part[kMomentCount * shape.max_d], part[kMomentPivot * shape.max_d],
                                      part[kMomentPivotOffset * shape.max_d],
                                      part[kMomentM2 * shape.max_d]});
      squared_error += part[kMomentSquaredError * shape.max_d];
    }
  }
  double* stats = dim_stats + int64_t(blockIdx.y) * kDimFields * shape.max_d + j;
  const bool in_layer = j < p.d;
  stats[kCount * shape.max_d] = mom.count;
  stats[kPivot * shape.max_d] = mom.pivot;
  stats[kPivotOffset * shape.max_d] = mom.offset;
  stats[kSigma * shape.max_d] = in_layer ? sqrt(mom.m2 / (mom.count - 1.0)) : 0.0;
  stats[kSquaredError * shape.max_d] = squared_error;
}

constexpr int kFinalizeThreads = 512;

// Deterministic block sum: a fixed tree over the threads' partial sums.
__device__ double block_sum(double x, double* scratch) {
  scratch[threadIdx.x] = x;
  __syncthreads();
  for (int stride = kFinalizeThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  const double total = scratch[0];
  __syncthreads();
  return total;
}

// One block per layer: sbar, w, the loss, and the backward's per-dim coefficients.
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const LayerParams* layers, LaunchShape shape, double power, double eps,
                    double* dim_stats, double* losses) {
  __shared__ double scratch[kFinalizeThreads];
  const LayerParams p = layers[blockIdx.x];
  const int64_t max_d = shape.max_d;
  double* stats = dim_stats + int64_t(blockIdx.x) * kDimFields * max_d;
  const double d = double(p.d);
  const double n_valid = stats[kCount * max_d];
  double part = 0;
  for (int64_t j = threadIdx.x; j < p.d; j += kFinalizeThreads) part += stats[kSigma * max_d + j];
  const double scale = block_sum(part, scratch) / d + eps;
  const double inv_nd = 1.0 / (n_valid * d);
  part = 0;
  for (int64_t j = threadIdx.x; j < max_d; j += kFinalizeThreads) {
    const double w = j < p.d ? eofd_weight(stats[kSigma * max_d + j], scale, power) : 0.0;
    stats[kWeight * max_d + j] = w;
    stats[kCoefS * max_d + j] = 2.0 * w * inv_nd;
    part += w * stats[kSquaredError * max_d + j];
  }
  const double weighted = block_sum(part, scratch);
  if (threadIdx.x == 0) losses[blockIdx.x] = weighted * inv_nd;
  const double mean_term = weighted / (d * scale);
  for (int64_t j = threadIdx.x; j < max_d; j += kFinalizeThreads) {
    stats[kCoefT * max_d + j] =
        j < p.d ? eofd_coef_teacher(stats[kWeight * max_d + j], stats[kSquaredError * max_d + j],
                                    stats[kSigma * max_d + j], n_valid, d, power, mean_term)
                : 0.0;
  }
}

template <typename T, bool HAS_MASK, bool NEED_DT>
__global__ void __launch_bounds__(kDimThreads * kRowGroups)
    backward_kernel(const LayerParams* layers, LaunchShape shape, const double* grads,
                    const double* dim_stats) {
  using acc = typename Traits<T>::acc;
  constexpr int V = kVec<T>;
  const LayerParams p = layers[blockIdx.z];
  const int64_t chunk_rows = int64_t(kRowGroups) * kRowsPerThread * shape.tiles_per_chunk;
  const int64_t row0 = blockIdx.x * chunk_rows;
  const int64_t col = blockIdx.y * int64_t(kDimThreads * V) + threadIdx.x * V;
  if (row0 >= p.n || col >= p.d) return;
  const double g = grads[blockIdx.z];
  const double* stats = dim_stats + int64_t(blockIdx.z) * kDimFields * shape.max_d;
  acc coef_s[V], coef_t[V], pivot[V], mean[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t j = col + k < p.d ? col + k : col;
    coef_s[k] = acc(g * stats[kCoefS * shape.max_d + j]);
    coef_t[k] = acc(g * stats[kCoefT * shape.max_d + j]);
    pivot[k] = acc(stats[kPivot * shape.max_d + j]);
    mean[k] = acc(stats[kPivotOffset * shape.max_d + j]);
  }
  const auto* S = static_cast<const T*>(p.student);
  const auto* Tt = static_cast<const T*>(p.teacher);
  const bool s_aligned = vec_aligned<T>(S, p.student_row);
  const bool t_aligned = vec_aligned<T>(Tt, p.teacher_row);
  const bool out_aligned = vec_aligned<T>(p.grad_student, p.d) &&
                           (!NEED_DT || vec_aligned<T>(p.grad_teacher, p.d));
  for (int64_t tile = 0; tile < shape.tiles_per_chunk; ++tile) {
    const int64_t r0 = row0 + (tile * kRowGroups + threadIdx.y) * kRowsPerThread;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t r = r0 + i;
      if (r >= p.n) break;
      acc s[V], t[V], ds[V], dt[V];
      const bool valid = HAS_MASK ? row_valid(p, r) : true;
      if (valid) {
        load_vec(S + r * p.student_row, col, p.d, s_aligned, s);
        load_vec(Tt + r * p.teacher_row, col, p.d, t_aligned, t);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        ds[k] = valid ? coef_s[k] * (s[k] - t[k]) : acc(0);
        dt[k] = valid ? coef_t[k] * ((t[k] - pivot[k]) - mean[k]) - ds[k] : acc(0);
      }
      store_vec(static_cast<T*>(p.grad_student) + r * p.d, col, p.d, out_aligned, ds);
      if (NEED_DT) store_vec(static_cast<T*>(p.grad_teacher) + r * p.d, col, p.d, out_aligned, dt);
    }
  }
}

template <typename T>
dim3 rows_grid(const LaunchShape& shape) {
  const int64_t block_d = int64_t(kDimThreads) * kVec<T>;
  return dim3(static_cast<unsigned>(shape.num_chunks),
              static_cast<unsigned>((shape.max_d + block_d - 1) / block_d),
              static_cast<unsigned>(shape.num_layers));
}

template <typename T>
cudaError_t forward_typed(const LayerParams* layers, const LaunchShape& shape, bool has_mask,
                          double power, double eps, void* partials, double* dim_stats,
                          double* losses, cudaStream_t stream) {
  using acc = typename Traits<T>::acc;
  const dim3 block(kDimThreads, kRowGroups);
  auto* part = static_cast<acc*>(partials);
  if (has_mask) {
    stats_kernel<T, true><<<rows_grid<T>(shape), block, 0, stream>>>(layers, shape, part);
  } else {
    stats_kernel<T, false><<<rows_grid<T>(shape), block, 0, stream>>>(layers, shape, part);
  }
  const dim3 merge_grid(static_cast<unsigned>((shape.max_d + 255) / 256), shape.num_layers);
  merge_chunks_kernel<acc><<<merge_grid, 256, 0, stream>>>(layers, shape, part, dim_stats);
  finalize_kernel<<<shape.num_layers, kFinalizeThreads, 0, stream>>>(layers, shape, power, eps,
                                                                      dim_stats, losses);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const LayerParams* layers, const LaunchShape& shape, bool has_mask,
                           bool need_dt, const double* grads, const double* dim_stats,
                           cudaStream_t stream) {
  const dim3 grid = rows_grid<T>(shape), block(kDimThreads, kRowGroups);
  if (has_mask && need_dt) {
    backward_kernel<T, true, true><<<grid, block, 0, stream>>>(layers, shape, grads, dim_stats);
  } else if (has_mask) {
    backward_kernel<T, true, false><<<grid, block, 0, stream>>>(layers, shape, grads, dim_stats);
  } else if (need_dt) {
    backward_kernel<T, false, true><<<grid, block, 0, stream>>>(layers, shape, grads, dim_stats);
  } else {
    backward_kernel<T, false, false><<<grid, block, 0, stream>>>(layers, shape, grads, dim_stats);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_forward(const LayerParams* layers, const LaunchShape& shape, DType dtype,
                           bool has_mask, double power, double eps, void* partials,
                           double* dim_stats, double* losses, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return forward_typed<__half>(layers, shape, has_mask, power, eps, partials, dim_stats,
                                   losses, stream);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16>(layers, shape, has_mask, power, eps, partials,
                                          dim_stats, losses, stream);
    case DType::kFloat32:
      return forward_typed<float>(layers, shape, has_mask, power, eps, partials, dim_stats,
                                  losses, stream);
    case DType::kFloat64:
      return forward_typed<double>(layers, shape, has_mask, power, eps, partials, dim_stats,
                                   losses, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(const LayerParams* layers, const LaunchShape& shape, DType dtype,
                            bool has_mask, bool need_teacher_grad, const double* grads,
                            const double* dim_stats, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return backward_typed<__half>(layers, shape, has_mask, need_teacher_grad, grads,
                                    dim_stats, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(layers, shape, has_mask, need_teacher_grad, grads,
                                           dim_stats, stream);
    case DType::kFloat32:
      return backward_typed<float>(layers, shape, has_mask, need_teacher_grad, grads, dim_stats,
                                   stream);
    case DType::kFloat64:
      return backward_typed<double>(layers, shape, has_mask, need_teacher_grad, grads,
                                    dim_stats, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace eofd
