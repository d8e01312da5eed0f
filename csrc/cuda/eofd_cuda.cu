// CUDA kernels of the EOFD loss: all layers of a call in the same launches (docs/design.md,
// "The passes").
// Torch-free: only CUDA headers and ours, so plain nvcc compiles it anywhere.
//
// The stats and backward kernels run a persistent grid over work items (layer, block of dims,
// chunk of rows; launch_params.h). Each kernel is an instance for a (student, teacher) pair of
// element types, each side read and written in its own. A block is kDimThreads x kRowGroups
// threads; a thread owns the dims of one 16-byte vector of the pair's promoted type (kVec)
// and, per tile, kRowsPerThread rows of each side held in registers as stored:
// exact two-pass stats around the tile's first valid row, merged tile by tile (Chan), then the
// row groups merged in order through shared memory. Memory-bound kernels stream at full
// bandwidth only with enough bytes in flight (Little's law), so every tile's loads are issued
// before any is consumed, on a fast path (aligned, whole vector) chosen once per thread.
// Every reduction order depends on shapes only: results are bitwise deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "eofd_cuda.cuh"

namespace eofd {
namespace {

// The kernels' 16-bit element types, for dispatch_dtypes (include/dtype_pairs.h).
struct CudaElements {
  using half = __half;
  using bfloat16 = __nv_bfloat16;
};

template <typename E>
struct Traits;
// bits: the element's storage, what a thread keeps in registers until the arithmetic (16-bit
// data stays two to a register). to_acc widens exactly (the caller's accumulator may be wider
// still); from_acc rounds to nearest and takes a float for every type but double, so a double
// accumulator (a pair with an fp64 side) rounds to float first, as torch's casts do: the bits
// of the promoted call's result cast to the side's dtype.
template <>
struct Traits<float> {
  using bits = unsigned int;
  __device__ static float to_acc(bits b) { return __uint_as_float(b); }
  __device__ static bits from_acc(float x) { return __float_as_uint(x); }
};
template <>
struct Traits<double> {
  using bits = unsigned long long;
  __device__ static double to_acc(bits b) { return __longlong_as_double(b); }
  __device__ static bits from_acc(double x) { return __double_as_longlong(x); }
};
template <>
struct Traits<__half> {
  using bits = unsigned short;
  __device__ static float to_acc(bits b) { return __half2float(__ushort_as_half(b)); }
  __device__ static bits from_acc(float x) { return __half_as_ushort(__float2half_rn(x)); }
};
template <>
struct Traits<__nv_bfloat16> {
  using bits = unsigned short;
  __device__ static float to_acc(bits b) { return __uint_as_float(static_cast<unsigned>(b) << 16); }
  __device__ static bits from_acc(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};

template <typename E>
using Bits = typename Traits<E>::bits;

// Dims per thread of a (Student, Teacher) pair: one 16-byte vector of the promoted type, so a
// side of that type reads 16 bytes a row and a narrower one 8 or 4. The pair then has the
// promoted call's dim blocks, plan and arithmetic (Accumulator): the same bits.
template <typename Student, typename Teacher>
constexpr int kVec = 16 / sizeof(Promoted<Student, Teacher>);
constexpr int R = kRowsPerThread;

// One thread's vector of one row, packed as stored (also on the element-wise path, whose
// unpacked scalars would need twice the registers for 16-bit data).
using RowBits = uint4;

__device__ __forceinline__ unsigned& word(uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}
__device__ __forceinline__ unsigned word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Element k of a packed vector (k is a constant once the loops unroll).
template <typename T>
__device__ __forceinline__ Bits<T> element(const uint4& v, int k) {
  if constexpr (sizeof(Bits<T>) == 2) {
    return static_cast<Bits<T>>(word(v, k / 2) >> (16 * (k % 2)));
  } else if constexpr (sizeof(Bits<T>) == 4) {
    return word(v, k);
  } else {
    return static_cast<Bits<T>>(word(v, 2 * k + 1)) << 32 | word(v, 2 * k);
  }
}

// Sets element k of a packed vector that starts as zeros.
template <typename T>
__device__ __forceinline__ void set_element(uint4& v, int k, Bits<T> b) {
  if constexpr (sizeof(Bits<T>) == 2) {
    word(v, k / 2) |= static_cast<unsigned>(b) << (16 * (k % 2));
  } else if constexpr (sizeof(Bits<T>) == 4) {
    word(v, k) = b;
  } else {
    word(v, 2 * k) = static_cast<unsigned>(b);
    word(v, 2 * k + 1) = static_cast<unsigned>(b >> 32);
  }
}

// BYTES (16, 8 or 4) at `ptr` if `pred`, else zeros, in the low words: a predicated load.
// Written in PTX because the compiler keeps `if (valid) load` as a branch per row for some
// element types, and then reuses one set of registers for every row's data, so each row's
// loads wait on the previous row's use: the tile's loads would no longer be in flight together.
template <int BYTES>
__device__ __forceinline__ uint4 load_if(const void* ptr, bool pred) {
  uint4 v = make_uint4(0, 0, 0, 0);
  if constexpr (BYTES == 16) {
    asm("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %5, 0;\n\t"
        "mov.b32 %0, 0;\n\tmov.b32 %1, 0;\n\tmov.b32 %2, 0;\n\tmov.b32 %3, 0;\n\t"
        "@p ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n\t}"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(ptr), "r"(static_cast<int>(pred)));
  } else if constexpr (BYTES == 8) {
    asm("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %3, 0;\n\t"
        "mov.b32 %0, 0;\n\tmov.b32 %1, 0;\n\t"
        "@p ld.global.nc.v2.u32 {%0, %1}, [%2];\n\t}"
        : "=r"(v.x), "=r"(v.y)
        : "l"(ptr), "r"(static_cast<int>(pred)));
  } else {
    static_assert(BYTES == 4, "a thread's vector of a side is 16, 8 or 4 bytes");
    asm("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %2, 0;\n\t"
        "mov.b32 %0, 0;\n\t"
        "@p ld.global.nc.u32 %0, [%1];\n\t}"
        : "=r"(v.x)
        : "l"(ptr), "r"(static_cast<int>(pred)));
  }
  return v;
}

// One store of BYTES (16, 8 or 4) from the low words of v to global memory. Written in PTX
// because the output pointers come from the params table: the compiler would emit generic
// stores and split the vector. Nothing in a kernel reads what it stores, so no memory clobber
// is needed (volatile keeps it in place among the stores).
template <int BYTES>
__device__ __forceinline__ void store(void* ptr, const uint4& v) {
  if constexpr (BYTES == 16) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};"
                 :
                 : "l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
  } else if constexpr (BYTES == 8) {
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" : : "l"(ptr), "r"(v.x), "r"(v.y));
  } else {
    static_assert(BYTES == 4, "a thread's vector of a side is 16, 8 or 4 bytes");
    asm volatile("st.global.b32 [%0], %1;" : : "l"(ptr), "r"(v.x));
  }
}

// A thread's V elements of type E of one row if the row counts (`valid`), else zeros.
// ALIGNED: one vector load (the host checked that every layer's vectors are aligned and inside
// their rows); else element by element, 0 past d.
template <typename E, int V, bool ALIGNED>
__device__ __forceinline__ RowBits load_row(const Bits<E>* __restrict__ row, int64_t col,
                                            int64_t d, bool valid) {
  if (ALIGNED) return load_if<V * sizeof(Bits<E>)>(row + col, valid);
  RowBits v = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (valid && col + k < d) set_element<E>(v, k, __ldg(row + col + k));
  }
  return v;
}

template <typename E, int V, bool ALIGNED>
__device__ __forceinline__ void store_row(Bits<E>* __restrict__ row, int64_t col, int64_t d,
                                          const RowBits& v) {
  if (ALIGNED) {
    store<V * sizeof(Bits<E>)>(row + col, v);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (col + k < d) row[col + k] = element<E>(v, k);
    }
  }
}

// Which of the kRowsPerThread rows from r0 count: inside the layer and (with a mask) valid.
// The mask bytes of a tile are requested one tile ahead, beside the previous tile's data, so
// no tile waits on a mask round trip before its own loads.
template <bool HAS_MASK>
__device__ __forceinline__ void row_flags(const LayerParams& p, int64_t r0, bool (&valid)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) {
    valid[i] = r0 + i < p.n;
    if (HAS_MASK && p.mask != nullptr && valid[i]) {
      valid[i] = __ldg(reinterpret_cast<const unsigned char*>(p.mask) + r0 + i) != 0;
    }
  }
}

// A work item of the persistent grid (launch_params.h, LaunchShape). Item numbers fit in 32
// bits (plan_device_launch checks it; a layer would need 2^44 elements to pass it), which
// keeps 64-bit division and its registers out of the kernels.
struct Item {
  int layer;
  int chunk;
  int64_t row0;  // first row of its chunk
  int64_t col0;  // first dim of its block
};

__device__ __forceinline__ Item item_at(const LaunchShape& shape, int w, int block_d) {
  const int chunks = static_cast<int>(shape.num_chunks);
  const int per_layer = static_cast<int>(shape.dim_blocks) * chunks;
  const int in_layer = w % per_layer;
  const int chunk = in_layer % chunks;
  return Item{w / per_layer, chunk, chunk * shape.tiles_per_chunk * kTileRows,
              int64_t(in_layer / chunks) * block_d};
}

__device__ __forceinline__ int num_items(const LaunchShape& shape) {
  return static_cast<int>(shape.num_layers * shape.dim_blocks * shape.num_chunks);
}

// One thread's moments of its V dims over a chunk: one count (the mask is per row, so every
// dim of a thread sees the same rows), per dim the pivoted mean pair and M2, and sum (S-T)^2.
template <typename acc, int V>
struct ThreadMoments {
  acc count;
  acc pivot[V], offset[V], m2[V], squared_error[V];
};

// Element k of row i of a side, widened to the pair's accumulator (exactly).
template <typename E, typename acc>
__device__ __forceinline__ acc value(const RowBits& row, int k) {
  return acc(Traits<E>::to_acc(element<E>(row, k)));
}

// Adds one tile (the thread's R rows, `valid` of them counting) to `mom`: exact two-pass
// stats around the tile's first valid row, then Chan's merge.
template <typename Student, typename Teacher, typename acc, int V>
__device__ __forceinline__ void add_tile(const RowBits (&s)[R], const RowBits (&t)[R],
                                         const bool (&valid)[R], ThreadMoments<acc, V>& mom) {
  int n_valid = 0;
#pragma unroll
  for (int i = 0; i < R; ++i) n_valid += valid[i];
  if (n_valid == 0) return;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    // The first valid row's value, selected with constant indices: t[first][k] with a
    // run-time `first` would put the tile in local memory.
    acc pivot = 0;
#pragma unroll
    for (int i = R - 1; i >= 0; --i) pivot = valid[i] ? value<Teacher, acc>(t[i], k) : pivot;
    acc sum = 0;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      if (!valid[i]) continue;
      const acc e = value<Student, acc>(s[i], k) - value<Teacher, acc>(t[i], k);
      mom.squared_error[k] += e * e;
      sum += value<Teacher, acc>(t[i], k) - pivot;
    }
    const acc mean = sum / acc(n_valid);
    acc m2 = 0;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      if (!valid[i]) continue;
      const acc dev = (value<Teacher, acc>(t[i], k) - pivot) - mean;
      m2 += dev * dev;
    }
    Moments<acc> merged{mom.count, mom.pivot[k], mom.offset[k], mom.m2[k]};
    chan_merge(merged, Moments<acc>{acc(n_valid), pivot, mean, m2});
    mom.pivot[k] = merged.pivot;
    mom.offset[k] = merged.offset;
    mom.m2[k] = merged.m2;
  }
  mom.count += acc(n_valid);  // chan_merge's count for every k: 0 + n or count + n
}

// A thread's rows of one chunk: per tile, every valid row's S and T vectors are requested
// before any is used (2 R independent vector loads in flight when ALIGNED).
template <typename Student, typename Teacher, bool HAS_MASK, bool ALIGNED, typename acc, int V>
__device__ __forceinline__ void chunk_stats(const LayerParams& p, const LaunchShape& shape,
                                            int64_t row0, int64_t col,
                                            const Bits<Student>* __restrict__ S,
                                            const Bits<Teacher>* __restrict__ Tt,
                                            ThreadMoments<acc, V>& mom) {
  int64_t r0 = row0 + threadIdx.y * R;
  bool valid[R];
  row_flags<HAS_MASK>(p, r0, valid);
  for (int64_t tile = 0; tile < shape.tiles_per_chunk && r0 < p.n; ++tile, r0 += kTileRows) {
    RowBits s[R], t[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      s[i] = load_row<Student, V, ALIGNED>(S + (r0 + i) * p.student_row, col, p.d, valid[i]);
      t[i] = load_row<Teacher, V, ALIGNED>(Tt + (r0 + i) * p.teacher_row, col, p.d, valid[i]);
    }
    bool now[R];
#pragma unroll
    for (int i = 0; i < R; ++i) now[i] = valid[i];
    row_flags<HAS_MASK>(p, r0 + kTileRows, valid);
    add_tile<Student, Teacher>(s, t, now, mom);
  }
}

// ALIGNED instances hold a tile of packed vectors in at most 128 registers (2 CTAs per SM);
// the element-wise ones, for unaligned or ragged layers, may take more (1 CTA per SM).
template <typename Student, typename Teacher, bool HAS_MASK, bool ALIGNED>
__global__ void __launch_bounds__(kBlockThreads, ALIGNED ? kMinBlocksPerSM : 1)
    stats_kernel(const LayerParams* __restrict__ layers, LaunchShape shape,
                 Accumulator<Student, Teacher>* __restrict__ partials) {
  using acc = Accumulator<Student, Teacher>;
  constexpr int V = kVec<Student, Teacher>;
  constexpr int kBlockD = kDimThreads * V;
  __shared__ acc shared[kRowGroups][kMomentFields][kBlockD];
  const int items = num_items(shape);
  for (int w = blockIdx.x; w < items; w += gridDim.x) {
    const Item item = item_at(shape, w, kBlockD);
    const LayerParams p = layers[item.layer];
    if (item.row0 >= p.n || item.col0 >= p.d) continue;  // the whole CTA: no barrier skipped
    const int64_t col = item.col0 + threadIdx.x * V;
    const bool active = col < p.d;
    ThreadMoments<acc, V> mom;
    mom.count = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      mom.pivot[k] = mom.offset[k] = mom.m2[k] = mom.squared_error[k] = 0;
    }
    const auto* S = static_cast<const Bits<Student>*>(p.student);
    const auto* Tt = static_cast<const Bits<Teacher>*>(p.teacher);
    if (active) {
      chunk_stats<Student, Teacher, HAS_MASK, ALIGNED>(p, shape, item.row0, col, S, Tt, mom);
    }

    // Row groups merge in order 0, 1, ..., kRowGroups - 1 through shared memory.
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = threadIdx.x * V + k;
      shared[threadIdx.y][kMomentCount][c] = mom.count;
      shared[threadIdx.y][kMomentPivot][c] = mom.pivot[k];
      shared[threadIdx.y][kMomentPivotOffset][c] = mom.offset[k];
      shared[threadIdx.y][kMomentM2][c] = mom.m2[k];
      shared[threadIdx.y][kMomentSquaredError][c] = mom.squared_error[k];
    }
    __syncthreads();
    if (threadIdx.y == 0 && active) {
      acc* out = partials + ((int64_t(item.layer) * shape.num_chunks + item.chunk) * kMomentFields) *
                                shape.max_d;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int c = threadIdx.x * V + k;
        Moments<acc> m{mom.count, mom.pivot[k], mom.offset[k], mom.m2[k]};
        acc squared_error = mom.squared_error[k];
        for (int g = 1; g < kRowGroups; ++g) {
          chan_merge(m, Moments<acc>{shared[g][kMomentCount][c], shared[g][kMomentPivot][c],
                                     shared[g][kMomentPivotOffset][c], shared[g][kMomentM2][c]});
          squared_error += shared[g][kMomentSquaredError][c];
        }
        if (col + k < p.d) {
          out[kMomentCount * shape.max_d + col + k] = m.count;
          out[kMomentPivot * shape.max_d + col + k] = m.pivot;
          out[kMomentPivotOffset * shape.max_d + col + k] = m.offset;
          out[kMomentM2 * shape.max_d + col + k] = m.m2;
          out[kMomentSquaredError * shape.max_d + col + k] = squared_error;
        }
      }
    }
    __syncthreads();  // the next item reuses `shared`
  }
}

// Chunk partials -> per-dim stats, in chunk order, in double. One thread per dim.
template <typename acc>
__global__ void merge_chunks_kernel(const LayerParams* layers, LaunchShape shape,
                                    const acc* partials, double* dim_stats) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= shape.max_d) return;
  const LayerParams p = layers[blockIdx.y];
  const int64_t chunk_rows = kTileRows * shape.tiles_per_chunk;
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

// A thread's rows of one chunk in the backward: every valid row's S and T vectors of a batch
// are requested before any is used, then the batch's dS (and dT) rows are stored (vector
// stores when ALIGNED). A batch is the whole tile when ALIGNED and one row on the
// element-wise path, whose loads would not fit the registers of a tile (rows are
// independent here: the results do not depend on the batch). Masked rows are not read and
// get zeros. dS is written in the student's element type, dT in the teacher's.
template <typename Student, typename Teacher, bool HAS_MASK, bool NEED_DT, bool ALIGNED,
          typename acc, int V>
__device__ __forceinline__ void chunk_grads(const LayerParams& p, const LaunchShape& shape,
                                            int64_t row0, int64_t col,
                                            const Bits<Student>* __restrict__ S,
                                            const Bits<Teacher>* __restrict__ Tt,
                                            Bits<Student>* __restrict__ dS,
                                            Bits<Teacher>* __restrict__ dT,
                                            const acc (&coef_s)[V], const acc (&coef_t)[V],
                                            const acc (&pivot)[V], const acc (&mean)[V]) {
  constexpr int kBatch = ALIGNED ? R : 1;
  int64_t r0 = row0 + threadIdx.y * R;
  bool valid[R];
  row_flags<HAS_MASK>(p, r0, valid);
  for (int64_t tile = 0; tile < shape.tiles_per_chunk && r0 < p.n; ++tile, r0 += kTileRows) {
    bool now[R];
#pragma unroll
    for (int i = 0; i < R; ++i) now[i] = valid[i];
    row_flags<HAS_MASK>(p, r0 + kTileRows, valid);
#pragma unroll
    for (int b = 0; b < R; b += kBatch) {
      RowBits s[kBatch], t[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        s[i] = load_row<Student, V, ALIGNED>(S + (r0 + b + i) * p.student_row, col, p.d,
                                             now[b + i]);
        t[i] = load_row<Teacher, V, ALIGNED>(Tt + (r0 + b + i) * p.teacher_row, col, p.d,
                                             now[b + i]);
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int64_t r = r0 + b + i;
        if (r >= p.n) break;
        RowBits ds = make_uint4(0, 0, 0, 0), dt = make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          acc ds_k = 0, dt_k = 0;
          if (now[b + i]) {
            const acc tk = value<Teacher, acc>(t[i], k);
            ds_k = coef_s[k] * (value<Student, acc>(s[i], k) - tk);
            dt_k = coef_t[k] * ((tk - pivot[k]) - mean[k]) - ds_k;
          }
          set_element<Student>(ds, k, Traits<Student>::from_acc(ds_k));
          set_element<Teacher>(dt, k, Traits<Teacher>::from_acc(dt_k));
        }
        store_row<Student, V, ALIGNED>(dS + r * p.d, col, p.d, ds);
        if (NEED_DT) store_row<Teacher, V, ALIGNED>(dT + r * p.d, col, p.d, dt);
      }
    }
  }
}

template <typename Student, typename Teacher, bool HAS_MASK, bool NEED_DT, bool ALIGNED>
__global__ void __launch_bounds__(kBlockThreads, ALIGNED ? kMinBlocksPerSM : 1)
    backward_kernel(const LayerParams* __restrict__ layers, LaunchShape shape,
                    const double* __restrict__ grads, const double* __restrict__ dim_stats) {
  using acc = Accumulator<Student, Teacher>;
  constexpr int V = kVec<Student, Teacher>;
  const int items = num_items(shape);
  for (int w = blockIdx.x; w < items; w += gridDim.x) {
    const Item item = item_at(shape, w, kDimThreads * V);
    const LayerParams p = layers[item.layer];
    const int64_t col = item.col0 + threadIdx.x * V;
    if (item.row0 >= p.n || col >= p.d) continue;  // no barriers in this kernel
    const double g = grads[item.layer];
    const double* stats = dim_stats + int64_t(item.layer) * kDimFields * shape.max_d;
    acc coef_s[V], coef_t[V], pivot[V], mean[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t j = col + k < p.d ? col + k : col;
      coef_s[k] = acc(g * stats[kCoefS * shape.max_d + j]);
      coef_t[k] = acc(g * stats[kCoefT * shape.max_d + j]);
      pivot[k] = acc(stats[kPivot * shape.max_d + j]);
      mean[k] = acc(stats[kPivotOffset * shape.max_d + j]);
    }
    const auto* S = static_cast<const Bits<Student>*>(p.student);
    const auto* Tt = static_cast<const Bits<Teacher>*>(p.teacher);
    auto* dS = static_cast<Bits<Student>*>(p.grad_student);
    auto* dT = static_cast<Bits<Teacher>*>(p.grad_teacher);
    chunk_grads<Student, Teacher, HAS_MASK, NEED_DT, ALIGNED>(p, shape, item.row0, col, S, Tt,
                                                              dS, dT, coef_s, coef_t, pivot,
                                                              mean);
  }
}

template <typename F>
const void* entry(F* kernel) {
  return reinterpret_cast<const void*>(kernel);
}

// The hot kernel instance of a variant: one selection for the occupancy query of the plan
// and for the launch.
template <typename Student, typename Teacher>
const void* hot_kernel_typed(const KernelVariant& v) {
  if (v.pass == Pass::kStats) {
    const void* const stats[2][2] = {
        {entry(stats_kernel<Student, Teacher, false, false>),
         entry(stats_kernel<Student, Teacher, false, true>)},
        {entry(stats_kernel<Student, Teacher, true, false>),
         entry(stats_kernel<Student, Teacher, true, true>)}};
    return stats[v.has_mask][v.aligned];
  }
  const void* const backward[2][2][2] = {
      {{entry(backward_kernel<Student, Teacher, false, false, false>),
        entry(backward_kernel<Student, Teacher, false, false, true>)},
       {entry(backward_kernel<Student, Teacher, false, true, false>),
        entry(backward_kernel<Student, Teacher, false, true, true>)}},
      {{entry(backward_kernel<Student, Teacher, true, false, false>),
        entry(backward_kernel<Student, Teacher, true, false, true>)},
       {entry(backward_kernel<Student, Teacher, true, true, false>),
        entry(backward_kernel<Student, Teacher, true, true, true>)}}};
  return backward[v.has_mask][v.need_teacher_grad][v.aligned];
}

const void* hot_kernel(const KernelVariant& v) {
  return dispatch_dtypes<CudaElements>(v.student, v.teacher, [&](auto s, auto t) {
    return hot_kernel_typed<type_of<decltype(s)>, type_of<decltype(t)>>(v);
  });
}

int element_size(DType dtype) {
  return dispatch_dtype<CudaElements>(
      dtype, [](auto e) { return static_cast<int>(sizeof(type_of<decltype(e)>)); });
}

// Bytes of a pair's promoted type, on the host: its dim blocks (plan_launch) and vectors (kVec).
int promoted_size(DType student, DType teacher) {
  return dispatch_dtypes<CudaElements>(student, teacher, [](auto s, auto t) {
    return static_cast<int>(sizeof(Promoted<type_of<decltype(s)>, type_of<decltype(t)>>));
  });
}

cudaError_t launch_hot(const KernelVariant& v, const LaunchShape& shape, void** args,
                       cudaStream_t stream) {
  return cudaLaunchKernel(hot_kernel(v), dim3(static_cast<unsigned>(shape.grid)),
                          dim3(kDimThreads, kRowGroups), args, 0, stream);
}

bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

}  // namespace

bool vector_aligned(const LayerParams* host_layers, int num_layers, DType student,
                    DType teacher, Pass pass) {
  const int64_t vec = 16 / promoted_size(student, teacher);
  const int64_t s_bytes = vec * element_size(student), t_bytes = vec * element_size(teacher);
  for (int l = 0; l < num_layers; ++l) {
    const LayerParams& p = host_layers[l];
    bool ok = aligned_to(p.student, s_bytes) && aligned_to(p.teacher, t_bytes) &&
              p.d % vec == 0 && p.student_row % vec == 0 && p.teacher_row % vec == 0;
    if (pass == Pass::kBackward) {
      ok = ok && aligned_to(p.grad_student, s_bytes) &&
           (p.grad_teacher == nullptr || aligned_to(p.grad_teacher, t_bytes));
    }
    if (!ok) return false;
  }
  return true;
}

cudaError_t plan_device_launch(const KernelVariant& variant, int64_t max_n, int64_t max_d,
                               int num_layers, int device, LaunchShape* shape) {
  int sms = 0, per_sm = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, hot_kernel(variant),
                                                      kBlockThreads, 0);
  if (err != cudaSuccess) return err;
  // The promoted call's dim blocks and chunks, hence its bits.
  *shape = plan_launch(max_n, max_d, num_layers, promoted_size(variant.student, variant.teacher),
                       sms, per_sm);
  const int64_t items = shape->num_layers * shape->dim_blocks * shape->num_chunks;
  return items <= INT32_MAX ? cudaSuccess : cudaErrorInvalidValue;
}

cudaError_t launch_forward(const LayerParams* layers, const LaunchShape& shape,
                           const KernelVariant& variant, double power, double eps,
                           void* partials, double* dim_stats, double* losses,
                           cudaStream_t stream) {
  LaunchShape by_value = shape;
  void* args[] = {&layers, &by_value, &partials};
  cudaError_t err = launch_hot(variant, shape, args, stream);
  if (err != cudaSuccess) return err;
  const dim3 merge_grid(static_cast<unsigned>((shape.max_d + 255) / 256), shape.num_layers);
  dispatch_dtypes<CudaElements>(variant.student, variant.teacher, [&](auto s, auto t) {
    using acc = Accumulator<type_of<decltype(s)>, type_of<decltype(t)>>;
    merge_chunks_kernel<acc><<<merge_grid, 256, 0, stream>>>(
        layers, shape, static_cast<const acc*>(partials), dim_stats);
  });
  finalize_kernel<<<shape.num_layers, kFinalizeThreads, 0, stream>>>(layers, shape, power, eps,
                                                                      dim_stats, losses);
  return cudaGetLastError();
}

cudaError_t launch_backward(const LayerParams* layers, const LaunchShape& shape,
                            const KernelVariant& variant, const double* grads,
                            const double* dim_stats, cudaStream_t stream) {
  LaunchShape by_value = shape;
  void* args[] = {&layers, &by_value, &grads, &dim_stats};
  return launch_hot(variant, shape, args, stream);
}

}  // namespace eofd
