// The CPU memory floor of the training step's traffic, in plain C (AVX-512, OpenMP), outside
// torch: what the schedules of csrc/cpu/ (schedule.h, cpu_ops.cpp) could reach at most on
// this machine.
// BERT-base B=8 fp32: 12 layers of S, T (1024 x 768 each); dS is streamed out (NT stores).
//
//   gcc -O3 -march=native -fopenmp benchmarks/memory_floor.c -o /tmp/memory_floor
//   OMP_NUM_THREADS=2 /tmp/memory_floor
//
// one pass       read S, T and stream dS = S - T out in the same loop: a bound no EOFD step
//                reaches (dS needs the layer's teacher std, i.e. all of T, first)
// two passes     per layer: read S, T; then reread them (from L3) and stream dS out
// pipelined      the same passes, layer l's second one beside layer l + 1's first
// T first        pipelined, but the first pass reads T only and the second reads S from
//                memory, rereads T and streams dS out (forward_and_grad's schedule)
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { kLayers = 12, kChunks = 4 };
static const size_t kElems = 1024 * 768;  // per layer and tensor
static float *S[kLayers], *T[kLayers], *D[kLayers];
static float sink[64];  // keeps the reads from being optimized away

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void read_chunk(int l, int c) {
  const size_t begin = c * kElems / kChunks, end = begin + kElems / kChunks;
  __m512 acc = _mm512_setzero_ps();
  for (size_t i = begin; i < end; i += 16) {
    acc = _mm512_add_ps(acc, _mm512_sub_ps(_mm512_load_ps(S[l] + i), _mm512_load_ps(T[l] + i)));
  }
  sink[omp_get_thread_num()] += _mm512_reduce_add_ps(acc);
}

static void read_t_chunk(int l, int c) {
  const size_t begin = c * kElems / kChunks, end = begin + kElems / kChunks;
  __m512 acc = _mm512_setzero_ps();
  for (size_t i = begin; i < end; i += 16) acc = _mm512_add_ps(acc, _mm512_load_ps(T[l] + i));
  sink[omp_get_thread_num()] += _mm512_reduce_add_ps(acc);
}

static void write_chunk(int l, int c) {
  const size_t begin = c * kElems / kChunks, end = begin + kElems / kChunks;
  for (size_t i = begin; i < end; i += 16) {
    _mm512_stream_ps(D[l] + i, _mm512_sub_ps(_mm512_load_ps(S[l] + i), _mm512_load_ps(T[l] + i)));
  }
}

static void one_pass(void) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int k = 0; k < kLayers * kChunks; ++k) write_chunk(k / kChunks, k % kChunks);
  _mm_sfence();
}

static void two_passes(void) {
  for (int l = 0; l < kLayers; ++l) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int c = 0; c < kChunks; ++c) read_chunk(l, c);
#pragma omp parallel for schedule(dynamic, 1)
    for (int c = 0; c < kChunks; ++c) write_chunk(l, c);
    _mm_sfence();
  }
}

// Layer l - 1's second pass beside layer l's first, chunk by chunk.
static void pipeline(void (*first_pass)(int, int)) {
  for (int l = 0; l <= kLayers; ++l) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int k = 0; k < 2 * kChunks; ++k) {
      if (k % 2 == 0 && l > 0) write_chunk(l - 1, k / 2);
      if (k % 2 == 1 && l < kLayers) first_pass(l, k / 2);
    }
    _mm_sfence();
  }
}

static void pipelined(void) { pipeline(read_chunk); }
static void t_first(void) { pipeline(read_t_chunk); }

int main(void) {
  for (int l = 0; l < kLayers; ++l) {
    S[l] = aligned_alloc(64, kElems * sizeof(float));
    T[l] = aligned_alloc(64, kElems * sizeof(float));
    D[l] = aligned_alloc(64, kElems * sizeof(float));
    for (size_t i = 0; i < kElems; ++i) S[l][i] = T[l][i] = D[l][i] = 1.0f;
  }
  void (*const run[])(void) = {one_pass, two_passes, pipelined, t_first};
  const char* const name[] = {"one pass", "two passes", "pipelined", "T first"};
  enum { kRuns = 4, kWarmup = 3, kReps = 40 };
  double total[kRuns] = {0}, best[kRuns] = {1e9, 1e9, 1e9, 1e9};
  for (int r = 0; r < kWarmup + kReps; ++r) {
    for (int k = 0; k < kRuns; ++k) {  // round-robin: a slow spell hits all alike
      const double t = now();
      run[k]();
      const double ms = (now() - t) * 1e3;
      if (r < kWarmup) continue;
      total[k] += ms;
      best[k] = ms < best[k] ? ms : best[k];
    }
  }
  printf("12 x 1024 x 768 fp32, %d threads, %d round-robin reps\n", omp_get_max_threads(), kReps);
  for (int k = 0; k < kRuns; ++k) {
    printf("  %-11s mean %.3f ms  min %.3f ms\n", name[k], total[k] / kReps, best[k]);
  }
  return 0;
}
