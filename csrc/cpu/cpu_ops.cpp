// The CPU ops eofd_ext::forward, forward_and_grad and backward (same algorithm as the GPU
// kernels): the passes (statistics_pass.h, finalize.h, gradient_pass.h) scheduled over chunks
// (tiles.h, schedule.h), and the torch glue and registration. Work is split into fixed
// 256-row chunks per layer, never by thread count, and chunk results are merged in chunk
// order: the bits do not depend on how many threads run.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "../layer_table.h"
#include "finalize.h"
#include "gradient_pass.h"
#include "output_pool.h"
#include "schedule.h"
#include "statistics_pass.h"
#include "stream_store.h"

namespace eofd {
namespace {

// s_elem, t_elem: the student's and the teacher's element types (CpuElements).
template <typename s_elem, typename t_elem>
void backward_impl(const LayerTable& table, const std::vector<double>& grads,
                   const at::Tensor& dim_stats, bool need_teacher_grad) {
  using acc_t = Accumulator<s_elem, t_elem>;
  const int64_t num_layers = table.layers.size();
  const int64_t max_d = table.max_d;
  std::vector<acc_t> coefs(num_layers * 4 * max_d);
  for (int64_t l = 0; l < num_layers; ++l) {
    fill_coefs(dim_stats.data_ptr<double>() + l * kDimFields * max_d, grads[l], max_d,
               coefs.data() + l * 4 * max_d);
  }
  int64_t unused = 0;
  const std::vector<Chunk> chunks = make_chunks(table, &unused);
  parallel_over_chunks(
      static_cast<int64_t>(chunks.size()),
      [&](int64_t i) {
        const Chunk& ch = chunks[i];
        backward_chunk<s_elem, t_elem>(table.layers[ch.layer], ch,
                                       coefs.data() + ch.layer * 4 * max_d, max_d,
                                       need_teacher_grad);
      },
      stream_fence);
}

// The forward. With group_bytes > 0 it also writes dS for the incoming grads `grads` (one per
// layer; the backward's formula and bits) into the table's grad_student buffers: a layer's
// statistics chunks then read only T, and its gradient chunks read S and reread T from L3
// shortly after (groups of at most group_bytes, claim_order), writing dS and summing
// (S - T)^2 for the loss, which the last of them finalizes. A training step so reads S and T
// from memory once instead of twice (docs/design.md, "The CPU training step"; measured in
// docs/performance.md). One parallel region, no barriers: the thread that finishes a layer's
// last statistics chunk finalizes the layer's moments and weights, and a gradient chunk waits
// for that. Every statistics chunk of a layer is claimed before any of its gradient chunks,
// so a wait is on running work, never on unclaimed work.
template <typename s_elem, typename t_elem>
void forward_impl(const LayerTable& table, double power, double eps, int64_t group_bytes,
                  const std::vector<double>& grads, at::Tensor& losses, at::Tensor& dim_stats) {
  using acc_t = Accumulator<s_elem, t_elem>;
  int64_t workspace_size = 0;
  const std::vector<Chunk> chunks = make_chunks(table, &workspace_size);
  // Every partial is written in full before it is read: no zeroing, and pooled pages that are
  // already faulted in (a fresh zeroed vector costs page faults and a memset every call).
  const at::Tensor workspace_buffer = OutputPool::instance()->empty(
      {workspace_size}, c10::CppTypeToScalarType<acc_t>::value);
  acc_t* const workspace = static_cast<acc_t*>(workspace_buffer.data_ptr());
  const int64_t num_layers = table.layers.size();
  const int64_t max_d = table.max_d;
  const bool with_grads = group_bytes > 0;
  const std::vector<int64_t> first_chunk = first_chunks(chunks, num_layers);
  const std::vector<int64_t> order = claim_order(
      first_chunk, with_grads ? group_ends(table, group_bytes)
                              : std::vector<int64_t>{num_layers},
      with_grads, at::get_num_threads());
  double* stats = dim_stats.data_ptr<double>();
  std::vector<double> layer_loss(num_layers);
  std::vector<acc_t> coef_s(with_grads ? num_layers * max_d : 0);
  std::vector<double> scale(num_layers);
  auto partials = [&](int64_t l) { return workspace + chunks[first_chunk[l]].offset; };
  auto num_chunks = [&](int64_t l) { return first_chunk[l + 1] - first_chunk[l]; };
  auto layer_stats = [&](int64_t l) { return stats + l * kDimFields * max_d; };
  // Chunks not done per layer: statistics chunks, then gradient chunks.
  std::vector<std::atomic<int64_t>> stats_left(num_layers), grads_left(num_layers);
  std::vector<std::atomic<bool>> finalized(num_layers);
  for (int64_t l = 0; l < num_layers; ++l) {
    stats_left[l].store(num_chunks(l), std::memory_order_relaxed);
    grads_left[l].store(num_chunks(l), std::memory_order_relaxed);
    finalized[l].store(false, std::memory_order_relaxed);
  }
  auto finalize_loss_of = [&](int64_t l) {
    layer_loss[l] = finalize_loss(table.layers[l], partials(l), num_chunks(l), power, scale[l],
                                  layer_stats(l), max_d);
  };
  auto finalize = [&](int64_t l) {  // the last statistics chunk of layer l is done
    scale[l] = finalize_moments(table.layers[l], partials(l), num_chunks(l), power, eps,
                                layer_stats(l), max_d);
    if (!with_grads) return finalize_loss_of(l);
    fill_student_coefs(layer_stats(l), grads[l], max_d, coef_s.data() + l * max_d);
    finalized[l].store(true, std::memory_order_release);
  };
  parallel_over_chunks(
      static_cast<int64_t>(order.size()),
      [&](int64_t i) {
        const bool is_grad = order[i] < 0;
        const Chunk& c = chunks[is_grad ? ~order[i] : order[i]];
        const LayerParams& p = table.layers[c.layer];
        if (is_grad) {
          while (!finalized[c.layer].load(std::memory_order_acquire)) spin_pause();
          student_grad_chunk<s_elem, t_elem>(p, c, coef_s.data() + c.layer * max_d,
                                             workspace + c.offset);
          if (grads_left[c.layer].fetch_sub(1, std::memory_order_acq_rel) == 1) {
            finalize_loss_of(c.layer);
          }
          return;
        }
        if (with_grads) {
          chunk_stats<false, s_elem, t_elem>(p, c.row_begin, c.row_end, workspace + c.offset);
        } else {
          chunk_stats<true, s_elem, t_elem>(p, c.row_begin, c.row_end, workspace + c.offset);
        }
        if (stats_left[c.layer].fetch_sub(1, std::memory_order_acq_rel) == 1) finalize(c.layer);
      },
      stream_fence);
  losses.copy_(at::tensor(layer_loss, at::kDouble));
}

at::Tensor pooled_empty_like(const at::Tensor& x) {
  return OutputPool::instance()->empty(x.sizes(), x.scalar_type());
}

// Losses (L,) in the result dtype and dim_stats; dS for `grads` too when group_bytes > 0
// (into the table's grad_student buffers, allocated by the caller).
std::tuple<at::Tensor, at::Tensor> run_forward(const LayerTable& table, double power, double eps,
                                               int64_t group_bytes,
                                               const std::vector<double>& grads = {}) {
  const int64_t num_layers = table.layers.size();
  // From the pool: a fresh zeroed buffer per call would cost page faults and a memset at large
  // d and L; finalize writes every element.
  auto dim_stats = OutputPool::instance()->empty({num_layers, kDimFields, table.max_d},
                                                 at::kDouble);
  auto losses = at::empty({num_layers}, at::kDouble);
  dispatch_dtypes<CpuElements>(table.student_element, table.teacher_element, [&](auto s, auto t) {
    forward_impl<type_of<decltype(s)>, type_of<decltype(t)>>(table, power, eps, group_bytes,
                                                             grads, losses, dim_stats);
  });
  return {losses.to(table.accumulator_dtype()), dim_stats};
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(
    at::TensorList students, at::TensorList teachers,
    const c10::List<std::optional<at::Tensor>>& masks, double power, double eps) {
  return run_forward(make_layer_table(students, teachers, masks), power, eps, 0);
}

// grad_losses (already checked against the layer count) as host fp64 values.
std::vector<double> host_grads(const at::Tensor& grad_losses) {
  const at::Tensor g = grad_losses.to(at::kDouble).contiguous();
  return {g.data_ptr<double>(), g.data_ptr<double>() + g.numel()};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> forward_and_grad_cpu(
    at::TensorList students, at::TensorList teachers,
    const c10::List<std::optional<at::Tensor>>& masks, double power, double eps,
    const at::Tensor& grad_losses, int64_t group_bytes) {
  TORCH_CHECK(group_bytes > 0, "eofd_ext::forward_and_grad: group_bytes must be positive, got ",
              group_bytes);
  LayerTable table = make_layer_table(students, teachers, masks);
  check_grad_losses(table, grad_losses);
  const std::vector<double> grads = host_grads(grad_losses);
  auto d_students = std::get<0>(allocate_grads(table, students, teachers, false,
                                               pooled_empty_like));
  auto [losses, dim_stats] = run_forward(table, power, eps, group_bytes, grads);
  return {losses, dim_stats, d_students};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> backward_cpu(
    const at::Tensor& grad_losses, at::TensorList students, at::TensorList teachers,
    const c10::List<std::optional<at::Tensor>>& masks, const at::Tensor& dim_stats,
    bool need_teacher_grad) {
  LayerTable table = make_layer_table(students, teachers, masks);
  check_backward_inputs(table, grad_losses, dim_stats, students[0].device());
  const std::vector<double> grads = host_grads(grad_losses);
  auto grads_out = allocate_grads(table, students, teachers, need_teacher_grad,
                                  pooled_empty_like);
  dispatch_dtypes<CpuElements>(table.student_element, table.teacher_element, [&](auto s, auto t) {
    backward_impl<type_of<decltype(s)>, type_of<decltype(t)>>(table, grads, dim_stats,
                                                              need_teacher_grad);
  });
  return grads_out;
}

// The pool's controls take no tensors, so the dispatcher cannot route them by device: they
// register for every key (CompositeImplicitAutograd), as the one implementation there is.
int64_t empty_cpu_cache() { return static_cast<int64_t>(OutputPool::instance()->release()); }

std::vector<int64_t> cpu_cache_info() {
  OutputPool* pool = OutputPool::instance();
  return {static_cast<int64_t>(pool->cached_bytes()), static_cast<int64_t>(pool->limit())};
}

void set_cpu_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_cpu_cache_limit: bytes must be >= 0, got ", bytes);
  OutputPool::instance()->set_limit(static_cast<size_t>(bytes));
}

}  // namespace

TORCH_LIBRARY_IMPL(eofd_ext, CompositeImplicitAutograd, m) {
  m.impl("empty_cpu_cache", &empty_cpu_cache);
  m.impl("cpu_cache_info", &cpu_cache_info);
  m.impl("set_cpu_cache_limit", &set_cpu_cache_limit);
}

TORCH_LIBRARY_IMPL(eofd_ext, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("forward_and_grad", &forward_and_grad_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace eofd