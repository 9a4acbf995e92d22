// A small pool of threads for the CPU backend's loops.
//
// Idle threads sleep on a condition variable rather than spin: the CPU backend often shares the
// machine with other processes (builds, tests, the daemon), and a spinning barrier stalls every
// loop whenever one thread loses its core. Work is handed out one index at a time, so a thread
// that is descheduled holds up at most one index.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ringllama {

class ThreadPool {
 public:
  // threads: how many run a loop, the caller included; 0 = the cores this process may use.
  // pin: worker t runs only on the (t mod n)-th core of this process's affinity mask, so that a
  // loop over contiguous rows keeps each thread's cache and memory channel; the caller's thread is
  // left as it is (it is the caller's to place) and is counted as core 0's user.
  explicit ThreadPool(int threads = 0, bool pin = false);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(i, thread) for every i in [0, n), thread in [0, threads()); returns when all are done.
  // fn must not throw. Calls from several threads at once are not supported.
  void parallel_for(int64_t n, const std::function<void(int64_t, int)>& fn);

 private:
  void work(int thread);
  void run(int thread);

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  uint64_t generation_ = 0;  // bumped for every loop
  int busy_ = 0;             // workers still in the current loop
  bool stop_ = false;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
};

// Cores this process may run on (its affinity mask), at least 1.
int usable_cores();

}  // namespace ringllama
