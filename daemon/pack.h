// ringllama-pack's work: a Hugging Face Llama folder or a built-in random shape -> packed store,
// and checking a store's checksums. The binary is a thin command line over these.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <ostream>
#include <set>
#include <string>
#include <vector>

#include "common/manifest.h"
#include "daemon/pack_writer.h"
#include "daemon/safetensors.h"

namespace ringllama {

// Tokenizer and generation files copied into the store when the source folder has them.
const std::vector<std::string>& tokenizer_file_names();

// The Hugging Face name of a store tensor ("wq" of layer 3 -> "model.layers.3.self_attn.q_proj.weight").
std::string hf_tensor_name(const GroupEntry& g, const std::string& store_name);

// The weights of a Hugging Face folder: model.safetensors, or the shards that
// model.safetensors.index.json lists. Every tensor the store needs is found and checked (present,
// shape as config.json says, dtype that can be converted) when the object is made, before any
// byte is written.
class HfSource : public PackSource {
 public:
  HfSource(const std::string& dir, const Manifest& plan);
  void fill(const GroupEntry& g, size_t ti, uint64_t first, uint64_t count, bf16_t* out) const override;

 private:
  struct Ref {
    const SafetensorsFile* file = nullptr;
    const StTensor* tensor = nullptr;
  };
  const SafetensorsFile& shard(const std::string& dir, const std::string& name);

  std::map<std::string, std::unique_ptr<SafetensorsFile>> files_;
  std::vector<std::vector<Ref>> refs_;  // [group (store order)][tensor]
};

struct PackOptions {
  std::string out;                              // store directory to create
  bool force = false;                           // replace an existing store
  int threads = 0;                              // 0 = one per core
  bool progress = true;                         // progress on stderr
  const std::atomic<bool>* cancel = nullptr;    // stops the write with an error when set
  // --weights: the format of the linear weights (norms and the embedding stay bf16).
  DType weights = DType::BF16;
  // --group-size for int4: 32 or 128. 0: 128, except GGUF Q4_0/Q4_1 tensors, taken over at 32.
  int64_t group_size = 0;
  // --scales: how fp8 and int4 scales are chosen (by default the rule that measured best for each).
  ScaleRules scales;
  // --random --tokenizer: files copied beside the manifest (a real vocabulary for random weights).
  std::vector<std::string> tokenizer_files;
};

// The format each tensor takes under `opts` (DESIGN.md "The packed store"): packable tensors take
// opts.weights, int4 in groups of opts.group_size (or `native_group` where it is > 0); a tensor
// whose inputs do not split into such groups stays bf16, and its name goes into `kept_bf16`.
TensorFormat choose_format(const PackOptions& opts, const TensorSpec& t, int64_t native_group = 0,
                           std::set<std::string>* kept_bf16 = nullptr);

// Both throw Error/StoreError; on failure no output and no temporary directory remain.
WriteResult pack_hf(const std::string& hf_dir, const PackOptions& opts);
// A llama.cpp GGUF file (daemon/gguf_model.h); its tokenizer becomes tokenizer.json and
// tokenizer_config.json in the store.
WriteResult pack_gguf(const std::string& gguf_path, const PackOptions& opts);
// layers > 0 overrides the shape's layer count.
WriteResult pack_random(const std::string& shape, uint64_t seed, int64_t layers, const PackOptions& opts);

// One paragraph for the terminal: model shape, groups, bytes, time, speed.
std::string pack_summary(const WriteResult& r, const std::string& out);

// Opens the store and checks every group's checksum. Prints "DIR: N groups, X GB, all checksums
// match" to `out`, or one line per bad group to `err`. Returns the number of bad groups; a store
// that cannot be opened throws StoreError.
size_t verify_store(const std::string& dir, std::ostream& out, std::ostream& err);

}  // namespace ringllama
