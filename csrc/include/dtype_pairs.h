// eofd-kernels: the element types of a call, shared by the CPU and CUDA kernels; torch-free.
//
// The student and the teacher keep their own dtypes (no promoted copies): every kernel is an
// instance for a (student, teacher) pair of element types, chosen by dispatch_dtypes. Each
// pair computes as a call on copies promoted to the common dtype would (Promoted,
// Accumulator), so a mixed pair gives the promoted call's bits without its copies
// (docs/design.md, "Numerics").
#pragma once

#include <type_traits>

namespace eofd {

// Element type of one side of a call (the launchers take no torch types).
enum class DType : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

template <typename X>
struct TypeTag {
  using type = X;
};
template <typename Tag>
using type_of = typename Tag::type;

// Calls fn(TypeTag<X>{}) for the element type X of `dtype`. `Elements` names the 16-bit types
// of the kernels at hand (`half`, `bfloat16`: c10's or CUDA's).
template <typename Elements, typename Fn>
decltype(auto) dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16: return fn(TypeTag<typename Elements::half>{});
    case DType::kBFloat16: return fn(TypeTag<typename Elements::bfloat16>{});
    case DType::kFloat32: return fn(TypeTag<float>{});
    case DType::kFloat64: break;
  }
  return fn(TypeTag<double>{});
}

// Calls fn(TypeTag<S>{}, TypeTag<T>{}) for the student's and the teacher's element types: the
// one dispatch of the ops (every pair is an instance; type_of<decltype(tag)> is the type).
template <typename Elements, typename Fn>
decltype(auto) dispatch_dtypes(DType student, DType teacher, Fn&& fn) {
  return dispatch_dtype<Elements>(student, [&](auto s) {
    return dispatch_dtype<Elements>(teacher, [&](auto t) { return fn(s, t); });
  });
}

// What torch.promote_types gives a pair of these four types: the type itself when both agree,
// else fp64 when one side is fp64, else fp32 (fp16 with bf16 included).
template <typename S, typename T>
using Promoted = std::conditional_t<
    std::is_same_v<S, T>, S,
    std::conditional_t<std::is_same_v<S, double> || std::is_same_v<T, double>, double, float>>;

// The accumulation type of a pair: that of its promoted type (fp64 for fp64, else fp32).
template <typename S, typename T>
using Accumulator = std::conditional_t<std::is_same_v<Promoted<S, T>, double>, double, float>;

}  // namespace eofd
