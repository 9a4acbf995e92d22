// Checksums of finished reads, off the daemon's event loop: while one layer is being checked the
// loop keeps reaping and submitting, so the disk never waits for the hash.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/store.h"

namespace ringllama {

class ChecksumThread {
 public:
  struct Job {
    uint64_t tag = 0;
    std::vector<const GroupEntry*> groups;   // checked in order, each at data + (offset - base)
    const uint8_t* data = nullptr;
    uint64_t base = 0;                       // file offset of data[0]
  };
  struct Result {
    uint64_t tag = 0;
    std::string error;                       // empty: every checksum matched
  };

  explicit ChecksumThread(const Store& store);
  ~ChecksumThread();
  ChecksumThread(const ChecksumThread&) = delete;
  ChecksumThread& operator=(const ChecksumThread&) = delete;

  void post(Job job);
  // Readable (eventfd) when results are waiting.
  int event_fd() const { return event_fd_; }
  // The finished results, in order; resets the eventfd.
  std::vector<Result> take();
  size_t busy() const;                       // jobs posted and not yet taken

 private:
  void loop();

  const Store& store_;
  int event_fd_ = -1;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;
  std::vector<Result> done_;
  size_t outstanding_ = 0;
  bool quit_ = false;
  std::thread thread_;
};

}  // namespace ringllama
