// Weights through a ring window in this process's own memory (DESIGN.md "The ring window", with
// no daemon): the globals plus min(cpu_cap_layers, n_layers) slots of one layer each, in one
// 4 KiB-aligned allocation, filled by a background thread that reads the store with the io_uring
// reader (every group's checksum checked) in the order the WindowPolicy gives. This process is the
// window's only worker, so the reads run ahead of the consumer by up to the window's size.
//
// The WeightSource contract, as this source keeps it:
//   - begin_pass() starts a pass (acquire_layer starts one when none is in flight); end_pass()
//     ends it, releasing whatever is still held. The pass also ends when every layer was released.
//   - acquire_layer(l) in increasing layer order; a layer jumped over counts as done (it is not
//     waited for). It blocks until the layer's slot is loaded; a read or checksum error comes back
//     as Error naming the layer (the next pass reads it again). Several layers may be held at once:
//     up to max_held_layers() = cap - back_margin; asking for one more while they are held would
//     wait forever (only releases move the window), so it throws Error instead.
//   - release_layer(l) in any order; the window moves past the lowest layer not yet released.
// The bytes are the store's, bit for bit (read_layer_checked into the slot, viewed with
// layer_view), the same as open_store_weights gives.
//
// Ordering: a slot holding a layer that is acquired and not released is shown to the policy as
// busy, and the policy never reuses a slot serving a position its worker has not released, so a
// held view's bytes never change. Every load of a slot takes a new generation (unique over the
// whole ring); slot_token()/still_valid() let a consumer that copies from a held view
// asynchronously check that afterwards.
//
// One thread consumes (acquire/release/pass calls); the loader thread is internal. No CUDA here:
// the GPU side registers host_ranges() itself (worker/gpu_weights.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/config.h"
#include "worker/weights.h"

namespace ringllama {

// What a host weight source with slots tells the GPU group pool beyond WeightSource. Sources
// without it (the whole store, the daemon) are used through WeightSource alone.
class HostSlots {
 public:
  virtual ~HostSlots() = default;
  // Every span the source's views point into; they stay valid for the source's lifetime, and every
  // page of them has been written once (so that a read-only registration pins the real pages).
  virtual std::vector<HostRange> host_ranges() const = 0;
  // Layers that may be acquired and not yet released at the same time.
  virtual int64_t max_held_layers() const = 0;
  // The load of the slot holding `layer`, which must be acquired; Error if it is not.
  virtual uint64_t slot_token(int64_t layer) const = 0;
  // True when the slot that had `token` still holds `layer`, loaded, unchanged.
  virtual bool still_valid(int64_t layer, uint64_t token) const = 0;
  // From the next pass on the consumer acquires only layers >= first (the others are resident on
  // the GPU): the source does not read the others, and a pass starts past them.
  virtual void set_streamed_from(int64_t first) = 0;
};

struct WindowStats {
  int64_t slots = 0;              // layer slots in the ring: min(cpu_cap_layers, n_layers)
  uint64_t layer_reads = 0;       // layers read into a slot, checksums good
  uint64_t read_errors = 0;       // layer reads that failed (I/O or checksum)
  uint64_t read_bytes = 0;        // bytes of the good reads
  double read_seconds = 0;        // loader thread time in reads and checksums
  std::vector<uint64_t> reads_per_layer;  // good reads of each layer
  uint64_t acquires = 0;          // acquire_layer calls that returned a view
  uint64_t stalls = 0;            // of those, the ones that had to wait for the read
  double stall_seconds = 0;       // time acquire_layer spent waiting
  int64_t max_held = 0;           // most layers held at once by the consumer
  int64_t max_loaded = 0;         // most slots holding a layer (loading or loaded) at once
  uint64_t passes = 0;            // passes begun
};

class WindowWeights : public WeightSource, public HostSlots {
 public:
  virtual WindowStats stats() const = 0;
};

// Opens the store at `store_dir`, reads the globals (checksum checked) and starts the loader
// thread. From `config`: cpu_cap_layers, back_margin (validated as the daemon does),
// io_queue_depth and io_block_kib. Throws StoreError / ConfigError / Error.
std::unique_ptr<WindowWeights> open_window_weights(const std::string& store_dir, const Config& config);

}  // namespace ringllama
