// Admission control shared by the worker's front doors (the ZeroMQ socket, worker/zmq_server.h, and
// the HTTP API, worker/http_server.h): one count of requests in flight (submitted to the scheduler,
// final reply not yet handed on) against one capacity, batch_size + queue_max, and one draining
// flag. Thread-safe: HTTP handler threads admit and release alongside the socket loop.
#pragma once

#include <cstdint>
#include <mutex>

namespace ringllama {

class Admission {
 public:
  enum class Verdict { Admitted, Overloaded, Draining };

  explicit Admission(int64_t capacity) : capacity_(capacity) {}
  Admission(const Admission&) = delete;
  Admission& operator=(const Admission&) = delete;

  // Counts one more request in flight when there is room and the worker is not draining.
  Verdict try_admit() {
    std::lock_guard<std::mutex> lk(mu_);
    if (draining_) return Verdict::Draining;
    if (in_flight_ >= capacity_) return Verdict::Overloaded;
    ++in_flight_;
    return Verdict::Admitted;
  }
  // `n` requests admitted earlier have ended (their final reply went out, or their client is gone).
  void release(int64_t n = 1) {
    std::lock_guard<std::mutex> lk(mu_);
    in_flight_ -= n;
  }
  // From now on every request is refused as unavailable; never undone.
  void start_draining() {
    std::lock_guard<std::mutex> lk(mu_);
    draining_ = true;
  }
  bool draining() const {
    std::lock_guard<std::mutex> lk(mu_);
    return draining_;
  }
  int64_t in_flight() const {
    std::lock_guard<std::mutex> lk(mu_);
    return in_flight_;
  }
  int64_t capacity() const { return capacity_; }

 private:
  const int64_t capacity_;
  mutable std::mutex mu_;
  int64_t in_flight_ = 0;
  bool draining_ = false;
};

}  // namespace ringllama
