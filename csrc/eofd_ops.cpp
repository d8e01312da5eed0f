// The op schemas, declared once. CPU and CUDA implementations register separately
// (cpu/cpu_ops.cpp, cuda/eofd_cuda_glue.cpp); fake impls and autograd live in Python
// (eofd_kernels/backends/ext_backend.py, layer_losses.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(eofd_ext, m) {
  // Layer l: student and teacher (..., d_l), its tokens all the leading dims; mask (tokens,)
  // bool or None. Per-layer losses (L,) and per-dim statistics (L, 8, max d) float64.
  m.def("forward(Tensor[] students, Tensor[] teachers, Tensor?[] masks, float power, "
        "float eps) -> (Tensor, Tensor)");
  // forward, plus backward's dS for an expected grad_losses, computed while a group of layers
  // (at most group_bytes of S and T) is still cached (CPU only: cpu/cpu_ops.cpp, schedule.h).
  m.def("forward_and_grad(Tensor[] students, Tensor[] teachers, Tensor?[] masks, float power, "
        "float eps, Tensor grad_losses, int group_bytes) -> (Tensor, Tensor, Tensor[])");
  // dS per layer, and dT per layer when need_teacher_grad (else []).
  m.def("backward(Tensor grad_losses, Tensor[] students, Tensor[] teachers, Tensor?[] masks, "
        "Tensor dim_stats, bool need_teacher_grad) -> (Tensor[], Tensor[])");
  // The CPU buffer cache's controls (cpu/output_pool.h): bytes freed; cached bytes and the
  // limit; a new limit.
  m.def("empty_cpu_cache() -> int");
  m.def("cpu_cache_info() -> int[]");
  m.def("set_cpu_cache_limit(int bytes) -> ()");
}

// An importable module, so `import eofd_kernels._C` loads the library and registers the ops.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
