// A size-keyed cache for the CPU op's large buffers (dS, dT, dim_stats, the forward's chunk
// partials).
//
// glibc hands every multi-MB allocation back to the OS when it is freed, so each backward's
// fresh dS pages fault in again and the kernel zeroes them, which costs more than the backward
// itself (docs/performance.md). Training asks for the same sizes every step, so buffers freed by autograd are kept
// here, already faulted in, and handed out again for an exact size match, up to limit() bytes
// in total (beyond that they are freed; 1 GiB by default). This is the CPU analogue of the CUDA
// caching allocator, and like torch.cuda.empty_cache, release() hands the cache back
// (eofd_kernels.empty_cpu_cache; the limit: eofd_kernels.set_cpu_cache_limit).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstddef>
#include <mutex>
#include <unordered_map>

namespace eofd {

class OutputPool final : public c10::Allocator {
 public:
  static constexpr size_t kDefaultLimitBytes = size_t{1} << 30;

  // Never destroyed: tensors holding pooled buffers may be freed during static destruction.
  static OutputPool* instance() {
    static OutputPool* pool = new OutputPool();
    return pool;
  }

  at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
    return at::detail::empty_generic(sizes, this, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     dtype, std::nullopt);
  }

  c10::DataPtr allocate(size_t bytes) override {
    void* data = take(bytes);
    if (data == nullptr) data = c10::alloc_cpu(bytes);
    return {data, new Block{data, bytes}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees every cached buffer (tensors in use keep theirs); returns the bytes freed.
  size_t release() {
    std::unordered_multimap<size_t, void*> cached;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      cached.swap(free_);
      bytes = cached_bytes_;
      cached_bytes_ = 0;
    }
    for (const auto& entry : cached) c10::free_cpu(entry.second);
    return bytes;
  }

  // The most bytes kept cached; a lower limit takes effect as buffers come back (release()
  // empties the cache at once). 0 turns caching off.
  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
  }

  size_t limit() {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_;
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };

  static void release(void* context) {
    auto* block = static_cast<Block*>(context);
    instance()->give(block->data, block->bytes);
    delete block;
  }

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end()) return nullptr;
    void* data = it->second;
    free_.erase(it);
    cached_bytes_ -= bytes;
    return data;
  }

  void give(void* data, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + bytes <= limit_) {
        free_.emplace(bytes, data);
        cached_bytes_ += bytes;
        return;
      }
    }
    c10::free_cpu(data);
  }

  std::mutex mutex_;
  std::unordered_multimap<size_t, void*> free_;
  size_t cached_bytes_ = 0;
  size_t limit_ = kDefaultLimitBytes;
};

}  // namespace eofd
