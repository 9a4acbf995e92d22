// Writing a packed store (DESIGN.md "The packed store") from any source of tensor values.
//
// The model is never held in memory: weights.bin is produced group by group in large chunks that
// several threads fill while one thread hashes and writes the previous chunk. Everything goes into
// a temporary directory beside the output, which is renamed into place only when complete, so a
// failure or an interrupt never leaves a half-written store behind.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "common/bf16.h"
#include "common/manifest.h"
#include "common/quant.h"

namespace ringllama {

// Where the values of every tensor come from.
class PackSource {
 public:
  virtual ~PackSource() = default;
  // Elements [first, first + count) of tensor `ti` of group `g`, as bf16 bits. Called from several
  // threads at once, for disjoint ranges. Throws Error/StoreError.
  virtual void fill(const GroupEntry& g, size_t ti, uint64_t first, uint64_t count, bf16_t* out) const = 0;
  // Rows [row0, row0 + rows) of the 2-D tensor `ti` as float: what a packed tensor is quantized
  // from. By default fill()'s bf16 values; a source with finer values (a dequantized GGUF block)
  // gives those instead.
  virtual void fill_rows_f32(const GroupEntry& g, size_t ti, int64_t row0, int64_t rows, float* out) const;
  // The same rows already in the int4 format of the tensor's group size (q: rows * in / 2 bytes,
  // sm: rows * in / group_size (scale, min) pairs), where the source holds exactly that (GGUF
  // Q4_0/Q4_1 at group size 32). false: the writer quantizes fill_rows_f32's values instead.
  virtual bool fill_int4(const GroupEntry&, size_t, int64_t, int64_t, uint8_t*, uint16_t*) const { return false; }
};

// Rows [row0, row0 + rows) of packed tensor `ti` of `g` in its stored form: values into `data`
// (rows * the bytes of one row), scales into `scales` (rows * the scale bytes of one row), the
// scales chosen by `rules` (rows the source gives in int4 already are taken as they are).
void pack_rows(const GroupEntry& g, size_t ti, const PackSource& src, int64_t row0, int64_t rows, uint8_t* data,
               uint8_t* scales, const ScaleRules& rules = {});

// write(2) until all n bytes are out, retrying short writes and EINTR. Throws StoreError naming
// `path`; a full disk or quota (ENOSPC, EDQUOT) reads "PATH: no space left on device".
void write_all(int fd, const void* data, uint64_t n, const std::string& path);

struct WriteOptions {
  std::string out;                       // the store directory to create
  bool force = false;                    // replace an existing output
  int threads = 0;                       // threads filling chunks; 0 = one per core
  uint64_t chunk_bytes = 64ull << 20;    // bytes per chunk, a multiple of kGroupAlign
  std::vector<std::string> copy_files;   // files copied beside the manifest (tokenizer); listed in it
  // Files made by the packer (a tokenizer converted from GGUF metadata): name, contents; listed too.
  std::vector<std::pair<std::string, std::string>> write_files;
  const std::atomic<bool>* cancel = nullptr;  // set (by a signal handler) to stop with an error
  bool progress = true;                  // progress on stderr: a bar on a tty, else log lines
  ScaleRules scales;                     // how fp8 and int4 scales are chosen (common/quant.h)
};

struct WriteResult {
  Manifest manifest;      // as written, checksums filled in
  double seconds = 0;     // wall time of the whole write, fsync included
  uint64_t bytes = 0;     // bytes of weights.bin
};

// Refuses an existing output unless `force`, and an output whose parent directory is missing.
// Cheap: call it before any other work. Throws StoreError.
void check_output(const std::string& out, bool force);

// Writes the store described by `plan` (from Manifest::plan) with values from `src`.
WriteResult write_store(Manifest plan, const PackSource& src, const WriteOptions& opts);

// Produces every group's bytes in order (tensors, zero padding) and fills in each group's xxh3.
// `sink` gets the bytes chunk by chunk, in order, on one thread; `progress` is as in WriteOptions.
// write_store is this with a file as the sink; alone it measures how fast a source can be packed.
void stream_groups(Manifest& plan, const PackSource& src, const WriteOptions& opts,
                   const std::function<void(const char* data, uint64_t n)>& sink);

}  // namespace ringllama
