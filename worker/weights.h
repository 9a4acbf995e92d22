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

// One linear weight [rows = out, cols = in] as stored: bf16 values, or packed values followed by
// their scales (DESIGN.md "The packed store", common/quant.h for the formulas).
struct MatrixView {
  const void* data = nullptr;
  DType dtype = DType::BF16;
  int64_t rows = 0;
  int64_t cols = 0;
  const void* scales = nullptr;  // fp8_e4m3: float[rows]; int4: half pairs (scale, min) [rows][cols / group]
  int64_t group = 0;             // int4: inputs per scale pair

  bool packed() const { return dtype != DType::BF16; }
  // The values as bf16, for code that multiplies bf16 only; throws Error naming the dtype when
  // the matrix is packed.
  const bf16_t* bf16() const;
};

// The view of tensor `name` of `g`, whose group starts at `group_base` (host or device memory).
MatrixView matrix_view(const GroupEntry& g, const std::string& name, const void* group_base);

// Norms and the embedding are always bf16 (an embedding lookup gathers rows); the linear weights
// may be packed.
struct GlobalWeights {
  const bf16_t* tok_embeddings = nullptr;  // [vocab, dim]
  const bf16_t* norm = nullptr;            // [dim]
  MatrixView output;                       // [vocab, dim]; the embedding (bf16) when tied
};

struct LayerWeights {
  const bf16_t* attn_norm = nullptr;  // [dim]
  MatrixView wq;                      // [q_dim, dim]
  MatrixView wk;                      // [kv_dim, dim]
  MatrixView wv;                      // [kv_dim, dim]
  MatrixView wo;                      // [dim, q_dim]
  const bf16_t* ffn_norm = nullptr;   // [dim]
  MatrixView w1;                      // gate [ffn, dim]
  MatrixView w3;                      // up [ffn, dim]
  MatrixView w2;                      // down [dim, ffn]
};

// Views into a globals group that starts at `base`.
GlobalWeights globals_view(const Manifest& m, const void* base);
// Views into a layer span (attn group then ffn group) that starts at `base`.
LayerWeights layer_view(const Manifest& m, int64_t layer, const void* base);
// Whether any tensor of the store is packed (fp8 or int4).
bool store_packed(const Manifest& m);

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
