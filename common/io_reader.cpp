#include "common/io_reader.h"

#include <fcntl.h>
#include <liburing.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>

#include "common/config.h"
#include "common/errors.h"
#include "common/log.h"
#include "common/store.h"

namespace ringllama {

namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

uint64_t align_down(uint64_t v, uint64_t a) { return v - v % a; }

}  // namespace

IoOptions io_options(const Config& c) {
  IoOptions o;
  o.queue_depth = static_cast<uint32_t>(c.io_queue_depth);
  o.block_bytes = static_cast<uint64_t>(c.io_block_kib) * 1024;
  return o;
}

IoReader::IoReader(const std::string& path, const IoOptions& opt) : path_(path), opt_(opt) {
  RL_REQUIRE(opt_.queue_depth >= 1 && opt_.queue_depth <= 4096, "io_queue_depth {} is outside [1, 4096]",
             opt_.queue_depth);
  RL_REQUIRE(opt_.block_bytes >= 512, "io block of {} bytes is too small (at least 512)", opt_.block_bytes);

  buffered_fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (buffered_fd_ < 0) fail("{}: cannot open: {}", path, errno_text(errno));
  struct stat st {};
  if (::fstat(buffered_fd_, &st) != 0) {
    int err = errno;
    ::close(buffered_fd_);
    fail("{}: cannot stat: {}", path, errno_text(err));
  }
  file_size_ = static_cast<uint64_t>(st.st_size);

  std::string refused;
  if (opt_.direct) {
    direct_fd_ = ::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (direct_fd_ < 0) refused = errno_text(errno);
  } else {
    refused = "buffered reads asked for";
  }
#ifdef STATX_DIOALIGN
  // The file system's own alignment rule where the kernel reports it (6.1+); 4096 covers every
  // logical block size otherwise. An offset alignment of 0 means "no O_DIRECT for this file".
  if (direct_fd_ >= 0) {
    struct statx sx {};
    if (::statx(direct_fd_, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 && (sx.stx_mask & STATX_DIOALIGN)) {
      if (sx.stx_dio_offset_align == 0) {
        ::close(direct_fd_);
        direct_fd_ = -1;
        refused = "the file system reports no direct I/O for this file";
      } else {
        mem_align_ = std::max<uint32_t>(sx.stx_dio_mem_align, 1);
        offset_align_ = sx.stx_dio_offset_align;
      }
    }
  }
#endif
  // Blocks are cut at multiples of the offset alignment, so the block size must be one.
  opt_.block_bytes = align_up(opt_.block_bytes, offset_align_);

  ring_ = new io_uring;
  int rc = io_uring_queue_init(opt_.queue_depth, ring_, 0);
  if (rc < 0) {
    delete ring_;
    ring_ = nullptr;
    if (direct_fd_ >= 0) ::close(direct_fd_);
    ::close(buffered_fd_);
    fail("{}: cannot set up io_uring with {} entries: {}", path, opt_.queue_depth, errno_text(-rc));
  }

  if (direct_fd_ >= 0)
    spdlog::info("{}: reading with O_DIRECT through io_uring (alignment: buffer {}, offset {}; queue depth {}, "
                 "blocks of {} KiB)",
                 path, mem_align_, offset_align_, opt_.queue_depth, opt_.block_bytes / 1024);
  else
    spdlog::info("{}: reading buffered through io_uring, without O_DIRECT ({}); queue depth {}, blocks of {} KiB",
                 path, refused, opt_.queue_depth, opt_.block_bytes / 1024);
}

IoReader::~IoReader() {
  // The kernel writes into the callers' buffers until each read completes: wait for them all
  // before the buffers can go away.
  if (ring_) {
    while (in_flight_ > 0) {
      if (unsubmitted_ > 0 && io_uring_submit(ring_) >= 0) unsubmitted_ = 0;
      io_uring_cqe* cqe = nullptr;
      int rc = io_uring_wait_cqe(ring_, &cqe);
      if (rc == -EINTR) continue;
      if (rc < 0) break;
      io_uring_cqe_seen(ring_, cqe);
      --in_flight_;
    }
    io_uring_queue_exit(ring_);
    delete ring_;
  }
  if (event_fd_ >= 0) ::close(event_fd_);
  if (direct_fd_ >= 0) ::close(direct_fd_);
  if (buffered_fd_ >= 0) ::close(buffered_fd_);
}

int IoReader::event_fd() {
  if (event_fd_ < 0) {
    event_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (event_fd_ < 0) fail("{}: eventfd: {}", path_, errno_text(errno));
    int rc = io_uring_register_eventfd(ring_, event_fd_);
    if (rc < 0) fail("{}: cannot register an eventfd with io_uring: {}", path_, errno_text(-rc));
  }
  return event_fd_;
}

IoStats IoReader::stats() const {
  IoStats s = stats_;
  if (busy_since_ns_ >= 0) s.busy_ns += static_cast<uint64_t>(now_ns() - busy_since_ns_);
  return s;
}

void IoReader::submit(const ReadRequest& r) {
  RL_REQUIRE(r.dst != nullptr || r.len == 0, "{}: read of {} bytes at offset {} into a null buffer", path_, r.len,
             r.offset);
  uint64_t id = next_range_id_++;
  Range range;
  range.req = r;
  if (r.len == 0) {
    finished_.push_back({r, {}});
    finished_ids_.push_back(id);
    ++stats_.ranges;
    return;
  }
  if (busy_since_ns_ < 0) busy_since_ns_ = now_ns();
  ranges_.emplace(id, std::move(range));
  queue_.push_back(id);
  fill();
}

bool IoReader::next_block(uint64_t range_id, Range& r, Block& b) const {
  const uint64_t end = r.req.offset + r.req.len;
  const uint64_t pos = r.req.offset + r.queued_from;
  if (pos >= end) return false;
  const uint64_t oa = offset_align_;
  uint64_t next;
  if (pos % oa != 0) {
    next = std::min(end, align_up(pos, oa));  // unaligned head: up to the next aligned offset
  } else {
    next = std::min(end, pos + opt_.block_bytes);
    // An unaligned tail goes alone, so that the aligned part before it stays one direct read.
    if (next == end && end % oa != 0 && align_down(end, oa) > pos) next = align_down(end, oa);
  }
  b.range_id = range_id;
  b.offset = pos;
  b.len = next - pos;
  b.dst = static_cast<char*>(r.req.dst) + r.queued_from;
  return true;
}

void IoReader::log_mode_once(bool direct_block, const Block& b) {
  if (direct_block || direct_fd_ < 0 || logged_buffered_block_) return;
  logged_buffered_block_ = true;
  spdlog::info("{}: unaligned range (offset {}, {} bytes, buffer {:#x}) read through the page cache; aligned "
               "ranges stay O_DIRECT",
               path_, b.offset, b.len, reinterpret_cast<uintptr_t>(b.dst));
}

bool IoReader::push(const Block& b) {
  io_uring_sqe* sqe = take_sqe();
  if (!sqe) {
    // The SQ ring has as many entries as blocks may be in flight, so it is only full of entries
    // prepared and not yet submitted: submit them and look again; a ring the kernel cannot take
    // now (EBUSY, EAGAIN) keeps the block for a later fill().
    int rc = io_uring_submit(ring_);
    if (rc >= 0) unsubmitted_ = 0;
    else if (rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) fail("{}: io_uring submit: {}", path_, errno_text(-rc));
    sqe = take_sqe();
    if (!sqe) return false;
  }
  const bool direct = direct_fd_ >= 0 && b.offset % offset_align_ == 0 && b.len % offset_align_ == 0 &&
                      reinterpret_cast<uintptr_t>(b.dst) % mem_align_ == 0;
  log_mode_once(direct, b);
  // A single read never asks for more than the kernel transfers at once (just under 2 GiB).
  const uint64_t len = std::min<uint64_t>(b.len, 0x7ffff000u);
  io_uring_prep_read(sqe, direct ? direct_fd_ : buffered_fd_, b.dst, static_cast<unsigned>(len), b.offset);
  const uint64_t id = next_block_id_++;
  io_uring_sqe_set_data64(sqe, id);
  Block stored = b;
  stored.direct = direct;
  blocks_.emplace(id, stored);
  ++in_flight_;
  ++unsubmitted_;
  ++stats_.reads;
  return true;
}

io_uring_sqe* IoReader::take_sqe() {
  if (opt_.test_full_ring && ++sqe_calls_ % 5 >= 3) return nullptr;
  return io_uring_get_sqe(ring_);
}

void IoReader::fill() {
  // Blocks kept from the completion loop first: they belong to ranges already under way.
  while (in_flight_ < opt_.queue_depth && !resubmit_.empty()) {
    if (!push(resubmit_.front())) break;
    resubmit_.pop_front();
  }
  while (in_flight_ < opt_.queue_depth && resubmit_.empty() && !queue_.empty()) {
    const uint64_t id = queue_.front();
    auto it = ranges_.find(id);
    Block b;
    if (it == ranges_.end() || !it->second.error.empty() || !next_block(id, it->second, b)) {
      queue_.pop_front();
      continue;
    }
    if (!push(b)) break;
    it->second.queued_from += b.len;
    ++it->second.in_flight;
  }
  if (unsubmitted_ > 0) {
    int rc = io_uring_submit(ring_);
    if (rc >= 0) {
      unsubmitted_ = 0;
    } else if (rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
      fail("{}: io_uring submit: {}", path_, errno_text(-rc));
    }  // else: the entries stay queued and go with the next submit
  }
}

void IoReader::reap(bool wait) {
  if (in_flight_ == 0) return;
  io_uring_cqe* cqe = nullptr;
  if (wait) {
    for (;;) {
      if (unsubmitted_ > 0 && io_uring_submit(ring_) >= 0) unsubmitted_ = 0;
      int rc = io_uring_wait_cqe(ring_, &cqe);
      if (rc == 0) break;
      if (rc != -EINTR && rc != -EAGAIN) fail("{}: io_uring wait: {}", path_, errno_text(-rc));
    }
  }
  while (io_uring_peek_cqe(ring_, &cqe) == 0) {
    const uint64_t id = io_uring_cqe_get_data64(cqe);
    const int res = cqe->res;
    io_uring_cqe_seen(ring_, cqe);
    --in_flight_;
    auto it = blocks_.find(id);
    if (it == blocks_.end()) continue;
    Block b = it->second;
    blocks_.erase(it);
    on_block_done(b, res);
  }
}

void IoReader::on_block_done(Block b, int res) {
  const bool was_direct = b.direct;
  auto it = ranges_.find(b.range_id);
  if (it == ranges_.end()) return;
  Range& r = it->second;
  if (res == -EAGAIN || res == -EINTR) {
    resubmit_.push_back(b);
    return;
  }
  if (res == -EINVAL && was_direct) {
    // Some file systems accept O_DIRECT at open and refuse it at read time.
    spdlog::warn("{}: O_DIRECT read at offset {} refused ({}); reading buffered from now on", path_, b.offset,
                 errno_text(EINVAL));
    ::close(direct_fd_);
    direct_fd_ = -1;
    resubmit_.push_back(b);
    return;
  }
  if (res < 0) {
    if (r.error.empty())
      r.error = fmt::format("{}: read error at offset {} ({} bytes): {}", path_, b.offset, b.len, errno_text(-res));
    --r.in_flight;
    finish_if_done(b.range_id);
    return;
  }
  if (res == 0) {
    if (r.error.empty())
      r.error = fmt::format("{}: unexpected end of file at offset {} (the file has {} bytes; [{}, {}) was asked)",
                            path_, b.offset, file_size_, r.req.offset, r.req.offset + r.req.len);
    --r.in_flight;
    finish_if_done(b.range_id);
    return;
  }
  uint64_t got = std::min<uint64_t>(static_cast<uint64_t>(res), b.len);
  if (opt_.test_short_read_bytes > 0) got = std::min(got, opt_.test_short_read_bytes);
  stats_.bytes += got;
  if (was_direct) stats_.direct_bytes += got;
  if (got < b.len && r.error.empty()) {
    // Short read: continue from where it stopped. The rest may be unaligned and then goes
    // through the page cache.
    ++stats_.short_reads;
    b.offset += got;
    b.dst += got;
    b.len -= got;
    resubmit_.push_back(b);
    return;
  }
  --r.in_flight;
  finish_if_done(b.range_id);
}

void IoReader::finish_if_done(uint64_t range_id) {
  auto it = ranges_.find(range_id);
  Range& r = it->second;
  if (r.in_flight > 0) return;
  if (r.error.empty() && r.queued_from < r.req.len) return;
  ++stats_.ranges;
  if (!r.error.empty()) ++stats_.errors;
  finished_.push_back({r.req, std::move(r.error)});
  finished_ids_.push_back(range_id);
  ranges_.erase(it);
  if (ranges_.empty() && busy_since_ns_ >= 0) {
    stats_.busy_ns += static_cast<uint64_t>(now_ns() - busy_since_ns_);
    busy_since_ns_ = -1;
  }
}

size_t IoReader::poll(const std::function<void(const ReadCompletion&)>& done, bool wait) {
  if (event_fd_ >= 0) {
    uint64_t v;
    while (::read(event_fd_, &v, sizeof v) > 0) {
    }
  }
  fill();
  reap(false);
  fill();
  while (wait && finished_.empty() && (in_flight_ > 0 || !resubmit_.empty())) {
    reap(true);
    fill();
  }
  std::deque<ReadCompletion> out;
  out.swap(finished_);
  finished_ids_.clear();
  for (const auto& c : out) done(c);
  return out.size();
}

void IoReader::read(uint64_t offset, uint64_t len, void* dst) {
  if (len == 0) return;
  const uint64_t id = next_range_id_;
  submit({offset, len, dst, 0});
  while (ranges_.count(id)) {
    reap(true);
    fill();
  }
  for (size_t i = 0; i < finished_ids_.size(); ++i) {
    if (finished_ids_[i] != id) continue;
    std::string error = std::move(finished_[i].error);
    finished_.erase(finished_.begin() + static_cast<std::ptrdiff_t>(i));
    finished_ids_.erase(finished_ids_.begin() + static_cast<std::ptrdiff_t>(i));
    if (!error.empty()) throw Error(error);
    return;
  }
}

void read_group_checked(const Store& store, IoReader& io, const GroupEntry& g, void* dst) {
  try {
    io.read(g.offset, g.size, dst);
  } catch (const StoreError&) {
    throw;
  } catch (const Error& e) {
    throw StoreError(fmt::format("{} ({}): {}", g.label(), store.dir(), e.what()));
  }
  store.check_group(g, dst);
}

void read_layer_checked(const Store& store, IoReader& io, int64_t layer, void* dst) {
  const Manifest& m = store.manifest();
  RL_REQUIRE(layer >= 0 && layer < m.model.n_layers, "layer {} is outside [0, {})", layer, m.model.n_layers);
  const uint64_t off = m.layer_offset(layer);
  try {
    io.read(off, m.layer_size(layer), dst);
  } catch (const StoreError&) {
    throw;
  } catch (const Error& e) {
    throw StoreError(fmt::format("layer {} ({}): {}", layer, store.dir(), e.what()));
  }
  auto* base = static_cast<char*>(dst);
  store.check_group(m.attn(layer), base + (m.attn(layer).offset - off));
  store.check_group(m.ffn(layer), base + (m.ffn(layer).offset - off));
}

}  // namespace ringllama
