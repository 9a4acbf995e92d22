// The GPU group pool (DESIGN.md "The GPU group pool"): the globals and `resident_layers` layers
// copied to the device once; every other layer streamed, pass after pass, through a FIFO ring of
// group buffers counted per kind (attn, ffn) by one copy stream that runs ahead of the compute
// stream by up to `gpu_ahead_layers` layers.
//
// Use, from ONE host thread, in program order (the backend's forward):
//
//   GpuWeights gw(source, pool_plan(memory_plan, config), compute_stream, slots);
//   for each step:
//     gw.begin_pass();                        // optional: acquire(0) begins one
//     for l in 0 .. n_layers-1:
//       DeviceLayer d = gw.acquire(l);        // compute_stream now waits for d's bytes
//       ... launch layer l's kernels on compute_stream, reading d.w.* ...
//       gw.release(l);                        // after the last launch that reads d
//     gw.end_pass();
//
// Layers are acquired in order, each once per pass, and released in order. Holding several at
// once is allowed as far as the buffers go: acquire(l) while l - min(attn, ffn buffers) is still
// held throws Error (it could never get a buffer). Resident layers are layers [0, resident_layers):
// their compute overlaps the copies of the first streamed layers of the pass.
//
// Per pass, the copies of the streamed layers up to l + gpu_ahead_layers are enqueued on the copy
// stream by the time acquire(l) returns: begin_pass() starts layers 0 .. ahead, release(l) the ones
// up to l + 1 + ahead (after the caller launched layer l, so that a wait for the source overlaps
// the GPU's work on l), and acquire(l) forces l's own copy when it is not enqueued yet. Each is:
//     host = source.acquire_layer(j)                            (may block: counted as a stall)
//     copy stream: wait done_attn[a], wait done_ffn[f]          (a = k % attn buffers, f = k % ffn
//                  record start; attn group -> attn buffer a;    buffers, k = j - resident_layers:
//                  record ready_attn[a]; ffn group -> buffer f;  the FIFO ring)
//                  record ready_ffn[f]; record end
// then makes the compute stream wait ready_attn[a] and ready_ffn[f] of layer l and returns device
// pointers at the same offsets as the host view. release(l) records done_attn[a] and done_ffn[f]
// on the compute stream. A prefetch that cannot start yet (its buffers' previous layer is not
// released, or the backlog is full) is left for a later release or acquire; only the copy of the
// layer being acquired is forced. The source's Error for a layer (a read or checksum error) comes
// out of the call that asked for it: acquire(), or release() for a prefetch; end_pass() then ends
// the pass cleanly.
//
// Why a buffer is never overwritten before the compute is done with it: the copy of stream index k
// into buffer a is enqueued only after release() of its previous user, index k - attn buffers, has
// recorded done_attn[a] on the compute stream after every kernel that reads the buffer (checked on
// the host before enqueuing; a forced copy that breaks it throws). The copy stream waits that
// record before the copy, so the copy starts after those kernels end. Likewise for ffn.
//
// Why cudaStreamWaitEvent never waits on an event not yet recorded (which would wait for nothing):
// one thread enqueues everything in program order. The compute wait on ready_*[a] for layer l is
// enqueued after the copy of l recorded it (forced in the same acquire), and no later copy into a
// can record it again before release(l) (the rule above), so the wait is for l's own copy. The
// copy's wait on done_*[a] is enqueued after release() of the buffer's previous user recorded it;
// a buffer never used before is not waited on.
//
// Host side: a host layer stays acquired from the source until its copy has completed, then is
// released (in order; with HostSlots, its slot token is checked first: a changed slot throws Error
// naming the layer, since the compute may already have read the copy — the policy-driven window
// never lets it happen). At most min(h2d_backlog_max, layers the source lets be held) copies are
// in flight. Completed copies are found with cudaEventQuery when later copies are enqueued; only
// when the copy being forced needs room (backlog full, or the source's held limit: the daemon's
// hold_max) does the host block, in cudaEventSynchronize on the OLDEST copy's end event.
// That event depends only on work already enqueued (earlier copies, and done records of layers
// already released), and the compute stream still holds the launched layers queued behind it, so
// the wait delays only the host's next enqueue, not the GPU. end_pass() waits the same way for the
// pass's last copies (not for the compute) and then ends the source's pass.
//
// Copied in part (set_skipped_bytes, the hybrid): the CPU reads the layer's host copy while the
// GPU computes it, so its host layer is released once an event recorded by release(l) on the
// compute stream (after every kernel and wait of the layer) has completed, and its copy has; the
// oldest such layer is waited for the same way, and it is always released before a forced copy
// needs room (layers are acquired in order, each after the previous one's release). Such a pass
// holds up to held_layers_max() host layers: the copies in flight and the layers computing.
//
// Sources: without HostSlots, the source's host_memory() is registered when it names any (the
// store's buffer, the daemon's segment read-only), falling back to pageable copies on a refusal.
// With HostSlots (open_window_weights), host_ranges() are registered with
// cudaHostRegister (portable, read-only where the device supports it; every page of the ranges
// must have been written once before, or a read-only pin may hold the zero page) for true async
// copies, the
// resident layers are left out of the window's reads (set_streamed_from), and several host layers
// may be in flight. Without (open_store_weights, open_daemon_weights), the host memory is
// registered in the background (BackgroundRegistration; a refusal leaves pageable copies, staged
// by the driver: correct, not async), the host layers in flight are the source's
// layers_held_at_once() (the daemon's hold_max) unless source_held_max replaces it, and resident
// layers are still acquired and released each pass, since those sources expect every layer in
// order.
//
// The current device must be the one to use when constructing; every call happens with it current.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "common/config.h"
#include "worker/host_registration.h"
#include "worker/planner.h"
#include "worker/weights.h"
#include "worker/window_weights.h"

namespace ringllama {

struct GpuPoolPlan {
  int64_t resident_layers = 0;    // layers [0, resident_layers) copied once and kept
  int64_t attn_buffers = 0;       // attn group buffers; 0: gpu_ahead_layers + 1
  int64_t ffn_buffers = 0;        // ffn group buffers; 0: gpu_ahead_layers + 1
  int64_t gpu_ahead_layers = 4;   // streamed layers whose copies are enqueued ahead of the compute
  int64_t h2d_backlog_max = 4;    // layer copies (attn + ffn group) in flight
  int64_t source_held_max = 0;    // host layers the source lets be held at once; 0: HostSlots'
                                  // max_held_layers(), or 1 without HostSlots
};

// The pool the memory planner counted (resident layers, buffers per kind) with the config's
// gpu_ahead_layers and h2d_backlog_max.
GpuPoolPlan pool_plan(const MemoryPlan& plan, const Config& config);

// A layer's weights on the device.
struct DeviceLayer {
  LayerWeights w;               // device pointers, each at its tensor's offset inside its group
  const void* attn = nullptr;   // the attn group (manifest attn(l).size bytes)
  const void* ffn = nullptr;    // the ffn group (manifest ffn(l).size bytes)
  bool resident = false;
  // A streamed layer copied in part (set_skipped_bytes): the host views of its tensors, held by
  // the pool until release(l) has been reached on the compute stream. Empty otherwise.
  LayerWeights host;
  bool host_held = false;
};

// Bytes of a streamed layer's group that are not copied to the device (the hybrid: the CPU
// computes those rows from the host copy). Offsets from the group's start; begin < end.
struct SkippedBytes {
  bool ffn = false;  // in the ffn group, else the attn group
  uint64_t begin = 0, end = 0;
};

struct GpuWeightsStats {
  uint64_t passes = 0;
  uint64_t resident_bytes = 0;      // globals and resident layers, copied once
  uint64_t copies = 0;              // streamed layer copies
  uint64_t bytes = 0;               // bytes streamed host to device
  uint64_t skipped_bytes = 0;       // bytes of streamed layers left on the host (set_skipped_bytes)
  double copy_seconds = 0;          // sum of the copies' times on the copy stream (events)
  uint64_t source_stalls = 0;       // source.acquire_layer calls that blocked (over 100 us)
  double source_wait_seconds = 0;   // time in source.acquire_layer
  uint64_t event_syncs = 0;         // host waits on a copy's end event (cudaEventSynchronize)
  uint64_t backlog_deferrals = 0;   // prefetches left for later: copies in flight at the limit
  uint64_t buffer_deferrals = 0;    // prefetches left for later: buffer still in use
  uint64_t slot_changes = 0;        // host slots found reused under a copy (each throws)
  uint64_t registration_waits = 0;  // copies that waited for their host memory to be registered
  double registration_wait_seconds = 0;
  std::vector<double> layer_copy_seconds;  // the last pass: each layer's copy time (0: resident)
  double gb_per_s() const { return copy_seconds > 0 ? double(bytes) / copy_seconds * 1e-9 : 0.0; }
};

class GpuWeights {
 public:
  // Allocates the device memory (globals, resident layers, pool), creates the copy stream and the
  // events, registers the HostSlots' ranges, and copies the globals and the resident layers
  // (blocking). `source` and `slots` (usually the same object, or null) and the compute stream
  // must outlive this object. Throws Error / ConfigError (a plan that cannot work, named).
  // `registration`: the source's host memory (WeightSource::host_memory), already being registered
  // by the owner (it starts that before planning, so the pinning overlaps the start); null = made
  // here. Only for sources without HostSlots.
  GpuWeights(WeightSource& source, const GpuPoolPlan& plan, cudaStream_t compute, HostSlots* slots = nullptr,
             std::unique_ptr<BackgroundRegistration> registration = nullptr);
  // Waits for the copy and compute streams (the buffers are freed), releases the host layers still
  // held, unregisters the host memory.
  ~GpuWeights();
  GpuWeights(const GpuWeights&) = delete;
  GpuWeights& operator=(const GpuWeights&) = delete;

  const GlobalWeights& globals() const;  // device pointers
  void begin_pass();
  DeviceLayer acquire(int64_t layer);
  void release(int64_t layer);
  void end_pass();

  int64_t resident_layers() const;
  int64_t attn_buffers() const;
  int64_t ffn_buffers() const;
  int64_t copies_in_flight_max() const;  // min(h2d_backlog_max, layers the source lets be held)
  // Host layers in flight in a pass that holds them through their compute (set_skipped_bytes):
  // min(h2d_backlog_max + buffers per kind, layers the source lets be held), at least the above.
  int64_t held_layers_max() const;
  uint64_t device_bytes() const;         // everything allocated here
  cudaStream_t copy_stream() const;
  GpuWeightsStats stats() const;
  // From the next pass on, streamed layer l's copy leaves out skipped[l]'s bytes (empty or a
  // vector shorter than l: the whole groups, as before), and a layer copied in part keeps its host
  // layer held until its compute is done (the event its release() records on the compute stream),
  // not only until its copy landed, so the CPU may read it meanwhile. Ranges are checked against
  // the groups (Error). Call between passes.
  void set_skipped_bytes(std::vector<std::vector<SkippedBytes>> skipped);
  // A source that names its host memory in pieces (the daemon's globals and slots) has the first
  // registered at once and the others on a thread (worker/host_registration.h), started by the
  // owner or here, or by the first copy that needs one.
  void start_background_registration();
  bool registers_in_background() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ringllama
