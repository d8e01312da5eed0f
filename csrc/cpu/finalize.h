// The finalize: a layer's chunk partials merged in chunk order (fp64) into sigma_d, the
// weights, the loss and the backward's per-dim coefficients (docs/design.md, "Finalize").
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../include/eofd_params.h"

namespace eofd {

// Merges a layer's chunk partials in chunk order (fp64) into its moments and finalizes the
// weights and the dS coefficients into `stats` (kDimFields rows of max_d; every field is zero
// past the layer's d, as the buffer is not zeroed). Returns the weights' scale, sbar + eps.
// A chunk's token count is the same for all its dims, so the merge goes chunk by chunk over
// vectors of dims (a merge per dim showed in the forward's profile: docs/performance.md).
template <typename acc_t>
double finalize_moments(const LayerParams& p, const acc_t* partials, int64_t num_chunks,
                        double power, double eps, double* stats, int64_t max_d) {
  const int64_t d = p.d;
  auto field = [&](DimField f) { return stats + f * max_d; };
  double* __restrict__ pivot = field(kPivot);
  double* __restrict__ mean = field(kPivotOffset);
  double* __restrict__ m2 = field(kSigma);  // M2 until it becomes sigma below
  double count = 0;
  const acc_t* part = partials;
  for (int64_t c = 0; c < num_chunks; ++c, part += 4 * d + 1) {
    const double chunk_count = part[4 * d];
    if (chunk_count == 0) continue;
    if (count == 0) {
      for (int64_t j = 0; j < d; ++j) {
        pivot[j] = part[j];
        mean[j] = part[d + j];
        m2[j] = part[2 * d + j];
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        Moments<double> acc{count, pivot[j], mean[j], m2[j]};
        chan_merge_nonempty(acc, Moments<double>{chunk_count, part[j], part[d + j],
                                                 part[2 * d + j]});
        mean[j] = acc.offset;
        m2[j] = acc.m2;
      }
    }
    count += chunk_count;
  }
  if (count == 0) {  // every token masked: zeros, and NaN weights below (n' < 2 gives NaN like the reference)
    for (double* row : {pivot, mean, m2}) std::fill(row, row + d, 0.0);
  }
  double sigma_sum = 0;
  for (int64_t j = 0; j < d; ++j) {
    field(kCount)[j] = count;
    m2[j] = std::sqrt(m2[j] / (count - 1.0));
    sigma_sum += m2[j];
  }
  const double scale = sigma_sum / d + eps;
  const double inv_nd = 1.0 / (count * d);
  for (int64_t j = 0; j < d; ++j) {
    const double w = eofd_weight(field(kSigma)[j], scale, power);
    field(kWeight)[j] = w;
    field(kCoefS)[j] = 2.0 * w * inv_nd;
  }
  for (int f = 0; f < kDimFields; ++f) {
    std::fill(field(static_cast<DimField>(f)) + d, field(static_cast<DimField>(f)) + max_d, 0.0);
  }
  return scale;
}

// The rest of a layer's finalize, once its chunks' sums of (S - T)^2 are in: merges them in
// chunk order into `stats`, and finalizes the dT coefficients and the loss (returned).
template <typename acc_t>
double finalize_loss(const LayerParams& p, const acc_t* partials, int64_t num_chunks,
                     double power, double scale, double* stats, int64_t max_d) {
  const int64_t d = p.d;
  auto field = [&](DimField f) { return stats + f * max_d; };
  double* __restrict__ squared_error = field(kSquaredError);
  std::fill(squared_error, squared_error + d, 0.0);
  const acc_t* part = partials;
  for (int64_t c = 0; c < num_chunks; ++c, part += 4 * d + 1) {
    if (part[4 * d] == 0) continue;  // masked rows only: nothing to add
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) squared_error[j] += part[3 * d + j];
  }
  const double n_valid = field(kCount)[0];
  const double inv_nd = 1.0 / (n_valid * d);
  double weighted = 0;
  for (int64_t j = 0; j < d; ++j) weighted += field(kWeight)[j] * squared_error[j];
  const double mean_term = weighted / (d * scale);
  for (int64_t j = 0; j < d; ++j) {
    field(kCoefT)[j] = eofd_coef_teacher(field(kWeight)[j], squared_error[j], field(kSigma)[j],
                                         n_valid, static_cast<double>(d), power, mean_term);
  }
  return weighted * inv_nd;
}

}  // namespace eofd
