#include "worker/host_registration.h"

#include <cuda_runtime_api.h>

#include <chrono>

#include "common/errors.h"
#include "common/log.h"
#include "kernels/check.h"

namespace ringllama {

HostRegistration::HostRegistration(const HostRange& r, int device, bool required) {
  if (!r.data || r.bytes == 0) return;
  void* p = const_cast<void*>(r.data);
  int read_only = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&read_only, cudaDevAttrHostRegisterReadOnlySupported, device));
  cudaError_t e = cudaErrorNotSupported;
  if (read_only) {
    e = cudaHostRegister(p, r.bytes, cudaHostRegisterPortable | cudaHostRegisterReadOnly);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      spdlog::debug("cudaHostRegister read-only of {} bytes: {}; registering without read-only", r.bytes,
                    cudaGetErrorString(e));
    }
  }
  if (e != cudaSuccess) e = cudaHostRegister(p, r.bytes, cudaHostRegisterPortable);
  if (e == cudaErrorHostMemoryAlreadyRegistered) {
    (void)cudaGetLastError();  // registered by its owner: used as it is, left to it
    return;
  }
  if (e != cudaSuccess && !required) {
    (void)cudaGetLastError();
    spdlog::warn("cudaHostRegister of {} bytes of host weights: {}; copying from pageable memory (slower)", r.bytes,
                 cudaGetErrorString(e));
    return;
  }
  CUDA_CHECK(e);
  p_ = p;
}

HostRegistration::~HostRegistration() {
  if (p_) cudaHostUnregister(p_);
}

BackgroundRegistration::BackgroundRegistration(std::vector<HostRange> pieces, int device)
    : device_(device), pieces_(std::move(pieces)) {
  done_.reserve(pieces_.size());
  if (pieces_.empty()) return;
  done_.emplace_back(pieces_.front(), device, false);
  finished_ = 1;
}

BackgroundRegistration::~BackgroundRegistration() {
  stop();
  done_.clear();  // unregisters
}

void BackgroundRegistration::start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (started_ || stop_) return;
  started_ = true;
  if (finished_ < pieces_.size()) thread_ = std::thread([this] { run(); });
}

void BackgroundRegistration::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    finished_ = pieces_.size();  // what is left stays pageable: no wait_for() blocks on it
  }
  cv_.notify_all();
}

void BackgroundRegistration::run() {
  const auto t0 = std::chrono::steady_clock::now();
  uint64_t bytes = 0;
  size_t pieces = 0;
  try {
    CUDA_CHECK(cudaSetDevice(device_));
    for (size_t i = 1; i < pieces_.size(); ++i) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_) break;
      }
      // Registered outside the lock: wait_for() answers for the pieces already done meanwhile.
      HostRegistration r(pieces_[i], device_, false);
      bytes += pieces_[i].bytes;
      ++pieces;
      {
        std::lock_guard<std::mutex> lock(mu_);
        done_.push_back(std::move(r));
        finished_ = i + 1;
      }
      cv_.notify_all();
      // Long enough for a waiting driver call of another thread to take its turn.
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  } catch (const std::exception& e) {
    spdlog::warn("registering the host weights in the background: {}; the rest is copied from pageable memory",
                 e.what());
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Whatever is left (stopped, or an error) counts as refused: the copies fall back to pageable.
    finished_ = pieces_.size();
  }
  cv_.notify_all();
  spdlog::info("host weights registered for GPU {} in the background: {} pieces, {:.1f} GiB in {:.0f} ms", device_,
               pieces, double(bytes) / double(uint64_t{1} << 30),
               std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
}

void BackgroundRegistration::wait_for(const void* p, uint64_t bytes) {
  const auto* a = static_cast<const char*>(p);
  size_t need = 0;  // pieces [0, need) must be finished
  for (size_t i = 0; i < pieces_.size(); ++i) {
    const auto* b = static_cast<const char*>(pieces_[i].data);
    if (a < b + pieces_[i].bytes && b < a + bytes) need = i + 1;
  }
  std::unique_lock<std::mutex> lock(mu_);
  if (finished_ >= need) return;
  if (!started_) {
    lock.unlock();
    start();
    lock.lock();
  }
  const auto t0 = std::chrono::steady_clock::now();
  ++waits_;
  cv_.wait(lock, [&] { return finished_ >= need; });
  wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

uint64_t BackgroundRegistration::waits() const {
  std::lock_guard<std::mutex> lock(mu_);
  return waits_;
}

double BackgroundRegistration::wait_seconds() const {
  std::lock_guard<std::mutex> lock(mu_);
  return wait_seconds_;
}

}  // namespace ringllama
