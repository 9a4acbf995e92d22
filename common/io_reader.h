// Reading byte ranges of one file through io_uring (DESIGN.md "The ring window").
//
// The file is opened twice: with O_DIRECT where the file system allows it, and buffered. A range
// is cut into blocks of `block_bytes`, cut at absolute offsets that are multiples of the direct
// I/O alignment, so that every block of an aligned range is one O_DIRECT read and only an
// unaligned head or tail (or a whole unaligned range) goes through the page cache. Up to
// `queue_depth` blocks are in flight, across every range submitted. Every completion is checked
// against the bytes asked for: an error names the file and offset, a short read continues from
// where it stopped, an end of file before the end of the range is an error.
//
// One thread owns a reader: io_uring rings are not shared.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/manifest.h"

struct io_uring;
struct io_uring_sqe;

namespace ringllama {

struct Config;
class Store;

struct IoOptions {
  uint32_t queue_depth = 32;            // blocks in flight (io_queue_depth)
  uint64_t block_bytes = 1 << 20;       // bytes per read request (io_block_kib * 1024)
  bool direct = true;                   // try O_DIRECT; false: buffered reads only
  // Test hook: a completion that brought more bytes than this is taken as if it brought only
  // this many, so that the short-read path (resubmit the rest) runs. 0: off.
  uint64_t test_short_read_bytes = 0;
  // Test hook: io_uring_get_sqe is taken as failing (a full submission ring) twice in every five
  // calls, so that blocks wait for a later fill(), also those of the completion loop.
  bool test_full_ring = false;
};

IoOptions io_options(const Config& c);

// A range to read into dst; `tag` comes back with its completion.
struct ReadRequest {
  uint64_t offset = 0;
  uint64_t len = 0;
  void* dst = nullptr;
  uint64_t tag = 0;
};

// A finished range: `error` is empty when every byte arrived.
struct ReadCompletion {
  ReadRequest request;
  std::string error;
  bool ok() const { return error.empty(); }
};

struct IoStats {
  uint64_t bytes = 0;           // bytes that arrived
  uint64_t direct_bytes = 0;    // of those, through O_DIRECT
  uint64_t ranges = 0;          // ranges completed (ok or not)
  uint64_t reads = 0;           // io_uring reads submitted
  uint64_t short_reads = 0;     // completions with fewer bytes than asked, continued
  uint64_t errors = 0;          // ranges that failed
  uint64_t busy_ns = 0;         // time with at least one range in flight
  double gib_per_s() const { return busy_ns ? double(bytes) / double(1ull << 30) / (double(busy_ns) * 1e-9) : 0.0; }
};

class IoReader {
 public:
  // Opens `path` (O_DIRECT and buffered) and sets up the ring. Throws Error.
  IoReader(const std::string& path, const IoOptions& opt);
  ~IoReader();
  IoReader(const IoReader&) = delete;
  IoReader& operator=(const IoReader&) = delete;

  // Reads [offset, offset + len) into dst and returns when every byte arrived. Throws Error
  // naming the file and offset. Completions of ranges submitted before are kept for poll().
  void read(uint64_t offset, uint64_t len, void* dst);

  // Queues a range; it is read as poll() runs. dst must stay valid until its completion.
  void submit(const ReadRequest& r);
  // Submits what fits, reaps completions and calls `done` once per finished range. With `wait`
  // it blocks until at least one range finished (or none is pending). Returns the ranges finished.
  size_t poll(const std::function<void(const ReadCompletion&)>& done, bool wait);
  // Ranges submitted and not yet handed to poll()'s callback.
  size_t pending() const { return ranges_.size() + finished_.size(); }
  // Becomes readable when a completion arrived (for zmq_poll alongside sockets); never blocks
  // poll(). Created on first use.
  int event_fd();

  bool direct() const { return direct_fd_ >= 0; }
  uint32_t mem_align() const { return mem_align_; }       // buffer alignment for O_DIRECT
  uint32_t offset_align() const { return offset_align_; } // offset and length alignment
  uint64_t file_size() const { return file_size_; }
  const std::string& path() const { return path_; }
  const IoOptions& options() const { return opt_; }
  IoStats stats() const;

 private:
  struct Range {
    ReadRequest req;
    uint32_t in_flight = 0;      // blocks submitted and not reaped
    uint64_t queued_from = 0;    // bytes before this were cut into blocks
    std::string error;
  };
  struct Block {
    uint64_t range_id = 0;
    uint64_t offset = 0;         // file offset
    uint64_t len = 0;
    char* dst = nullptr;
    bool direct = false;         // set by push(): which descriptor it went to
  };

  void fill();                              // blocks from queued ranges into the ring
  bool next_block(uint64_t range_id, Range& r, Block& b) const;
  bool push(const Block& b);                // one SQE; false: no room in the ring now, try again later
  io_uring_sqe* take_sqe();
  void reap(bool wait);                     // CQEs into ranges; finished ranges into finished_
  void on_block_done(Block b, int res);
  void finish_if_done(uint64_t range_id);
  void log_mode_once(bool direct_block, const Block& b);
  void note_busy();

  std::string path_;
  IoOptions opt_;
  int direct_fd_ = -1;
  int buffered_fd_ = -1;
  int event_fd_ = -1;
  uint32_t mem_align_ = 4096;
  uint32_t offset_align_ = 4096;
  uint64_t file_size_ = 0;
  io_uring* ring_ = nullptr;
  uint32_t in_flight_ = 0;
  uint32_t unsubmitted_ = 0;                // SQEs prepared, not yet io_uring_submit'ed
  uint64_t next_range_id_ = 1;
  uint64_t next_block_id_ = 1;
  std::unordered_map<uint64_t, Range> ranges_;
  std::deque<uint64_t> queue_;              // ranges with bytes not yet cut into blocks, in order
  std::unordered_map<uint64_t, Block> blocks_;  // in flight, by user_data
  // Blocks to submit again (a short read's rest, a retry): still counted in their range's
  // in_flight, submitted by fill() before new blocks, never from inside the completion loop.
  std::deque<Block> resubmit_;
  uint64_t sqe_calls_ = 0;                  // for test_full_ring
  std::deque<ReadCompletion> finished_;     // finished, not yet handed out
  std::deque<uint64_t> finished_ids_;       // their range ids, for read()
  bool logged_buffered_block_ = false;
  IoStats stats_;
  int64_t busy_since_ns_ = -1;
};

// Reads one group with `io` (opened on the store's weights) and checks its checksum. Throws
// StoreError naming the group.
void read_group_checked(const Store& store, IoReader& io, const GroupEntry& g, void* dst);
// Reads a whole layer (its attn and ffn groups, adjacent) in one range and checks both.
void read_layer_checked(const Store& store, IoReader& io, int64_t layer, void* dst);

}  // namespace ringllama
