// What the machine offers, asked without failing where there is no GPU or no driver, and device
// memory owned by RAII buffers.
#pragma once

#include <cstddef>
#include <utility>

namespace ringllama {

// Number of CUDA devices; 0 (no error) where there is no GPU, no driver or the runtime refuses.
int cuda_device_count();

// Multiprocessor count of `device` (for sizing grids).
int cuda_sm_count(int device);

// cudaMalloc that names what it was for, and the size, when it fails.
void* device_alloc(size_t bytes, const char* what);
void device_free(void* p) noexcept;

// One device allocation of `count` elements of T, freed when the object dies.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(size_t count, const char* what)
      : ptr_(static_cast<T*>(device_alloc(count * sizeof(T), what))), count_(count) {}
  ~DeviceBuffer() { device_free(ptr_); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), count_(std::exchange(o.count_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      device_free(ptr_);
      ptr_ = std::exchange(o.ptr_, nullptr);
      count_ = std::exchange(o.count_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() const { return ptr_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

}  // namespace ringllama
