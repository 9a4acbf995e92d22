// Host views of the model's weights, and where they come from.
//
// A backend never owns host weights: it asks a WeightSource for the globals once and for each
// layer as its pass reaches it. The source may hold the whole model (StoreWeights), or a ring
// window that a daemon fills (DaemonWeights); either way a LayerWeights stays valid until the
// layer is released.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/bf16.h"
#include "common/manifest.h"

namespace ringllama {

struct GlobalWeights {
  const bf16_t* tok_embeddings = nullptr;  // [vocab, dim]
  const bf16_t* norm = nullptr;            // [dim]
  const bf16_t* output = nullptr;          // [vocab, dim]; == tok_embeddings when tied
};

struct LayerWeights {
  const bf16_t* attn_norm = nullptr;  // [dim]
  const bf16_t* wq = nullptr;         // [q_dim, dim]
  const bf16_t* wk = nullptr;         // [kv_dim, dim]
  const bf16_t* wv = nullptr;         // [kv_dim, dim]
  const bf16_t* wo = nullptr;         // [dim, q_dim]
  const bf16_t* ffn_norm = nullptr;   // [dim]
  const bf16_t* w1 = nullptr;         // gate [ffn, dim]
  const bf16_t* w3 = nullptr;         // up [ffn, dim]
  const bf16_t* w2 = nullptr;         // down [dim, ffn]
};

// Pointers into a globals group that starts at `base`.
GlobalWeights globals_view(const Manifest& m, const void* base);
// Pointers into a layer span (attn group then ffn group) that starts at `base`.
LayerWeights layer_view(const Manifest& m, int64_t layer, const void* base);

// A span of host memory that holds weights (to be registered with cudaHostRegister).
struct HostRange {
  const void* data = nullptr;
  uint64_t bytes = 0;
};

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual const Manifest& manifest() const = 0;
  virtual GlobalWeights globals() = 0;
  // Blocks until the layer is in host memory; the view stays valid until release_layer.
  // Throws Error when the layer cannot be had (read error, checksum, dead daemon).
  virtual LayerWeights acquire_layer(int64_t layer) = 0;
  virtual void release_layer(int64_t layer) = 0;
  // A forward pass over the layers starts / ends (a window source tracks its progress by them).
  virtual void begin_pass() {}
  virtual void end_pass() {}
  // Between passes, while the consumer has nothing to run (a serving worker calls it every
  // ~100 ms): keeps the source's peers informed (heartbeats) and throws Error once the source can
  // no longer serve (its daemon died), so that an idle worker finds out too.
  virtual void keep_alive() {}
  // Where a source fed by the loader daemon stands, for the worker's stats and metrics (on the
  // consumer's thread); window false for the others.
  struct Report {
    bool window = false;
    int64_t pass = 0;           // this worker's pass through the daemon's window
    int64_t position = -1;      // the position the daemon last applied for it (-1: none)
    uint64_t waits = 0;         // waits on the daemon (a layer, a position applied, the globals)
    double wait_seconds = 0;    // time in them
  };
  virtual Report report() const { return {}; }
  // Layers the consumer may hold at once (acquired, not released) without waiting on itself: the
  // copies it may have in flight. Sources with HostSlots say so there instead.
  virtual int64_t layers_held_at_once() const { return 1; }
  // The host memory the views point into, for the GPU side to page-lock (cudaHostRegister) so
  // that its copies are true async DMA; empty when the source does not know (copies from pageable
  // memory are staged by the driver: correct, slower). Every page has been written once. Several
  // ranges: the first (holding the globals) is registered before the globals are copied, the
  // others in the background as the first pass needs them, so no copy may span two of them.
  virtual std::vector<HostRange> host_memory() const { return {}; }
};

// The whole store read into one host buffer, every checksum checked on the way in.
std::unique_ptr<WeightSource> open_store_weights(const std::string& store_dir);

}  // namespace ringllama
