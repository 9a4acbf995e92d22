// Page-locking host memory for the device (cudaHostRegister), at once or in the background.
//
// Why in the background: the driver pins every 4 KiB page of a range, about 0.8-1.1 s for the
// 16 GiB window of an 8B model, serialized inside the driver (threads do not help, measured). A
// worker that registered the daemon's whole segment before serving spent that second on every
// start. Registered piece by piece on a thread instead, the first pass's copies wait only for the
// pieces they read, and the pinning overlaps everything else the start does.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "worker/weights.h"

namespace ringllama {

// Host memory page-locked for the device while this object lives. Read-only where the device
// supports it (the daemon's segment is mapped read-only), else plain portable. Memory already
// registered (by its owner) is used as it is and left to it.
class HostRegistration {
 public:
  // `required`: a failure throws; otherwise it is logged and the memory is used unregistered
  // (copies from it are staged by the driver: correct but slower).
  HostRegistration(const HostRange& r, int device, bool required = true);
  ~HostRegistration();
  HostRegistration(HostRegistration&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  HostRegistration(const HostRegistration&) = delete;
  HostRegistration& operator=(const HostRegistration&) = delete;
  HostRegistration& operator=(HostRegistration&&) = delete;
  bool registered() const { return p_ != nullptr; }

 private:
  void* p_ = nullptr;
};

// Registers `pieces` in order: the first in the constructor, the others on a thread from start()
// (or from the first wait_for() that needs one). A copy must never span two pieces (the driver
// takes a range across two registrations for pageable memory): the caller passes pieces that each
// hold whole copy sources (the globals, one slot each). Pieces the driver refuses stay pageable
// (a warning each), as HostRegistration(required = false) does.
//
// The driver serializes its calls while it pins (a cudaMalloc or a copy waits for the
// cudaHostRegister in flight), so the thread pauses between pieces: the caller's own calls get
// in, each after one piece at most, and the first pass copies each piece as soon as it is
// registered instead of after all of them. The CUDA backend starts it before cuBLAS, the plan and
// its allocations, so that the pinning overlaps them.
class BackgroundRegistration {
 public:
  BackgroundRegistration(std::vector<HostRange> pieces, int device);
  // stop(), then unregisters everything.
  ~BackgroundRegistration();
  BackgroundRegistration(const BackgroundRegistration&) = delete;
  BackgroundRegistration& operator=(const BackgroundRegistration&) = delete;

  void start();  // idempotent
  void stop();   // the thread ends after its current piece; idempotent; the rest stays pageable
  bool in_background() const { return pieces_.size() > 1; }

  // Returns once every piece overlapping [p, p + bytes) is registered or refused (starting the
  // thread if need be); at once for memory outside the pieces. Counts the waits that blocked.
  void wait_for(const void* p, uint64_t bytes);
  uint64_t waits() const;
  double wait_seconds() const;

 private:
  void run();

  int device_ = 0;
  bool started_ = false;
  std::vector<HostRange> pieces_;
  std::vector<HostRegistration> done_;   // in piece order; the thread appends
  mutable std::mutex mu_;
  std::condition_variable cv_;
  size_t finished_ = 0;                  // pieces [0, finished_) registered or refused
  bool stop_ = false;
  uint64_t waits_ = 0;
  double wait_seconds_ = 0;
  std::thread thread_;
};

}  // namespace ringllama
