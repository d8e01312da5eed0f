// eofd-kernels: the torch-free contract shared by the CPU and CUDA kernels.
//
// One LayerParams per distilled layer; the kernels loop over a table of them, so layers of
// different (n, d) go through the same launches without stacking copies. Only plain C++ (and
// CUDA qualifiers under nvcc): this header compiles where PyTorch's CUDA headers are absent.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define EOFD_HD __host__ __device__ __forceinline__
#else
#define EOFD_HD inline
#endif

namespace eofd {

// A layer's (n, d) views: rows are `*_row` elements apart, columns contiguous.
struct LayerParams {
  const void* student;
  const void* teacher;
  const bool* mask;  // (n,) or nullptr: every token counts
  int64_t n;
  int64_t d;
  int64_t student_row;
  int64_t teacher_row;
  void* grad_student;  // (n, d) contiguous, backward only
  void* grad_teacher;  // (n, d) contiguous or nullptr
};

// Fields of the per-dim statistics, (L, kDimFields, max_d) double; must match
// eofd_kernels/layout.py. Dims past a layer's d are zero. kPivotOffset holds mean - pivot;
// kSquaredError holds E_d = sum over valid tokens of (S - T)^2.
enum DimField : int {
  kCount = 0,
  kPivot,
  kPivotOffset,
  kSigma,
  kSquaredError,
  kWeight,
  kCoefS,
  kCoefT,
  kDimFields
};

// Fields of the per-dim moments of some tokens, before a finalize turns them into DimFields:
// the GPU kernels' chunk partials and the Python split-batch summaries, (kMomentFields, d) per
// layer; must match eofd_kernels/layout.py. The pivot offset is mean - pivot (not the mean).
enum MomentField : int {
  kMomentCount = 0,
  kMomentPivot,
  kMomentPivotOffset,
  kMomentM2,
  kMomentSquaredError,
  kMomentFields
};

// Count, pivot (one actual valid value), offset = mean of (x - pivot), M2 of one dim over some
// tokens.
template <typename T>
struct Moments {
  T count;
  T pivot;
  T offset;
  T m2;
};

// Chan's parallel merge of b into a, keeping a's pivot; both hold tokens.
template <typename T>
EOFD_HD void chan_merge_nonempty(Moments<T>& a, const Moments<T>& b) {
  const T n = a.count + b.count;
  const T frac = b.count / n;
  const T delta = (b.pivot - a.pivot) + (b.offset - a.offset);
  a.offset += delta * frac;
  a.m2 += b.m2 + delta * delta * a.count * frac;
  a.count = n;
}

// Chan's parallel merge of b into a, keeping a's pivot (an empty a takes b whole).
template <typename T>
EOFD_HD void chan_merge(Moments<T>& a, const Moments<T>& b) {
  if (b.count == T(0)) return;
  if (a.count == T(0)) {
    a = b;
    return;
  }
  chan_merge_nonempty(a, b);
}

// w_d = (sigma_d / (sbar + eps)) ** p, with torch's x ** 0 == 1 (std::pow agrees). The paper's
// p = 0.5 takes sqrt (correctly rounded, like pow within an ulp): glibc's pow is several times
// slower, and it runs once per dim per layer per call.
EOFD_HD double eofd_weight(double sigma, double scale, double power) {
  const double ratio = sigma / scale;
  return power == 0.5 ? sqrt(ratio) : pow(ratio, power);
}

// G_d / ((n' - 1) sigma_d): the teacher-gradient coefficient through the weights
// (docs/design.md, "Gradients"). A constant dim (sigma_d = 0) gets 0: its deviations
// T - mu_d are all 0, so any finite coefficient gives the same dT, and 0 keeps the weight's
// infinite slope at sigma = 0 (or p = 0 times it) from making 0 * inf = NaN there.
EOFD_HD double eofd_coef_teacher(double weight, double squared_error, double sigma, double n_valid,
                                 double d, double power, double mean_term) {
  if (sigma == 0.0) return 0.0;
  const double g = power / (n_valid * d) * (weight * squared_error / sigma - mean_term);
  return g / ((n_valid - 1.0) * sigma);
}

}  // namespace eofd
