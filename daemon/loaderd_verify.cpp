#include "daemon/loaderd_verify.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include "common/errors.h"

namespace ringllama {

ChecksumThread::ChecksumThread(const Store& store) : store_(store) {
  event_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (event_fd_ < 0) fail("eventfd: {}", errno_text(errno));
  thread_ = std::thread([this] { loop(); });
}

ChecksumThread::~ChecksumThread() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    quit_ = true;
  }
  cv_.notify_all();
  thread_.join();
  ::close(event_fd_);
}

void ChecksumThread::post(Job job) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    jobs_.push_back(std::move(job));
    ++outstanding_;
  }
  cv_.notify_one();
}

std::vector<ChecksumThread::Result> ChecksumThread::take() {
  uint64_t v;
  while (::read(event_fd_, &v, sizeof v) > 0) {
  }
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<Result> out;
  out.swap(done_);
  outstanding_ -= out.size();
  return out;
}

size_t ChecksumThread::busy() const {
  std::lock_guard<std::mutex> lk(mu_);
  return outstanding_;
}

void ChecksumThread::loop() {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return quit_ || !jobs_.empty(); });
      if (jobs_.empty()) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    Result r;
    r.tag = job.tag;
    try {
      for (const GroupEntry* g : job.groups) store_.check_group(*g, job.data + (g->offset - job.base));
    } catch (const std::exception& e) {
      r.error = e.what();
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      done_.push_back(std::move(r));
    }
    const uint64_t one = 1;
    ssize_t n = ::write(event_fd_, &one, sizeof one);
    (void)n;  // a full counter still reads as readable
  }
}

}  // namespace ringllama
