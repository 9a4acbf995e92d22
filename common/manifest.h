// The packed store's manifest: model config, groups, tensors, checksums (DESIGN.md "The packed store").
//
// weights.bin holds the globals group first, then for each layer its attn group and its ffn group.
// Every group starts on a 4 KiB boundary and its size is a multiple of 4 KiB, so a group (and a
// whole layer: attn and ffn are adjacent) is one O_DIRECT read into an aligned buffer. Inside a
// group each tensor starts on a 256-byte boundary so that GPU kernels can use 16-byte loads.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/model_config.h"

namespace ringllama {

inline constexpr uint64_t kGroupAlign = 4096;
inline constexpr uint64_t kTensorAlign = 256;
inline constexpr int kManifestFormat = 1;
// A manifest of kMaxLayers layers is a few MiB; anything near this limit is not a manifest.
inline constexpr uint64_t kMaxManifestBytes = 64ull << 20;

// The element type of a stored tensor (DESIGN.md "The packed store"). Norms and the embedding are
// always bf16; the linear weights (wq, wk, wv, wo, w1, w2, w3, and an untied `output`) may be
// packed: fp8_e4m3 (one byte each, then one float32 scale per row) or int4 (two per byte, then one
// pair of halves (scale, min) per `group_size` inputs of a row); common/quant.h has the formulas.
enum class DType { BF16, FP8_E4M3, INT4 };

const char* dtype_name(DType t);
DType parse_dtype(const std::string& s);  // throws StoreError
bool dtype_packed(DType t);               // fp8_e4m3 and int4: data followed by scales

// A tensor's stored format. group_size is used by int4 only (0 otherwise).
struct TensorFormat {
  DType dtype = DType::BF16;
  int64_t group_size = 0;
  bool operator==(const TensorFormat& o) const { return dtype == o.dtype && group_size == o.group_size; }
};

inline constexpr int64_t kInt4GroupDefault = 128;
// The group sizes int4 may use: 128 by default, 32 for GGUF Q4_0/Q4_1 taken over exactly.
bool int4_group_allowed(int64_t g);
// Whether a store tensor may be packed at all: a linear weight, 2-D [out, in].
bool tensor_packable(const std::string& name);
// Throws StoreError unless `f` is a format tensor `name` of `shape` may take (bf16 always; packed
// only for a packable tensor, int4 only with an allowed group size that divides the inputs).
void check_tensor_format(const std::string& name, const std::vector<int64_t>& shape, const TensorFormat& f);
// Bytes of the values (bf16: 2 per element; fp8: 1; int4: 1 per 2) and of the scales (fp8: 4 per
// row; int4: 4 per row and group; bf16: none). Throw StoreError on overflow.
uint64_t tensor_data_bytes(const std::vector<int64_t>& shape, const TensorFormat& f);
uint64_t tensor_scales_bytes(const std::vector<int64_t>& shape, const TensorFormat& f);

enum class GroupKind { Globals, Attn, Ffn };
const char* group_kind_name(GroupKind k);

struct TensorEntry {
  std::string name;             // "tok_embeddings", "wq", ... (see tensor names below)
  DType dtype = DType::BF16;
  std::vector<int64_t> shape;   // row-major; linear weights are [out, in] as in transformers
  uint64_t offset = 0;          // bytes from the start of its group
  uint64_t size = 0;            // bytes of the values (for a packed tensor, without its scales)
  int64_t group_size = 0;       // int4: inputs per (scale, min) pair; 0 for the other dtypes
  uint64_t scales_offset = 0;   // packed: bytes from the start of the group to the scales, which
  uint64_t scales_size = 0;     //   follow the values at the next kTensorAlign boundary; else 0

  int64_t numel() const;
  TensorFormat format() const { return {dtype, group_size}; }
  uint64_t end() const { return dtype_packed(dtype) ? scales_offset + scales_size : offset + size; }
};

struct GroupEntry {
  GroupKind kind = GroupKind::Globals;
  int64_t layer = -1;           // -1 for globals
  uint64_t offset = 0;          // bytes from the start of weights.bin, a multiple of kGroupAlign
  uint64_t size = 0;            // bytes, padding included, a multiple of kGroupAlign
  uint64_t xxh3 = 0;            // XXH3-64 of all `size` bytes
  std::vector<TensorEntry> tensors;

  const TensorEntry& tensor(const std::string& name) const;  // throws StoreError
  const TensorEntry* find(const std::string& name) const;
  std::string label() const;    // "globals", "layer 3 attn"
};

// Tensor names inside each group, in store order.
//   globals: tok_embeddings [vocab, dim], norm [dim], output [vocab, dim] (absent when tied)
//   attn:    attn_norm [dim], wq [q_dim, dim], wk [kv_dim, dim], wv [kv_dim, dim], wo [dim, q_dim]
//   ffn:     ffn_norm [dim], w1 (gate) [ffn, dim], w3 (up) [ffn, dim], w2 (down) [dim, ffn]
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
};
std::vector<TensorSpec> group_layout(const ModelConfig& m, GroupKind kind);

// The format each tensor of a plan takes; nullptr: bf16 everywhere. Called once per tensor.
using FormatChooser = std::function<TensorFormat(const GroupEntry& g, const TensorSpec& t)>;

struct Manifest {
  int format = kManifestFormat;
  ModelConfig model;
  std::string source;                       // where the weights came from ("hf:DIR", "random:tiny")
  std::vector<GroupEntry> groups;           // globals, then attn/ffn of layer 0, 1, ...
  uint64_t weights_size = 0;                // bytes of weights.bin
  std::vector<std::string> tokenizer_files; // copied beside the manifest

  const GroupEntry& globals() const { return groups.at(0); }
  const GroupEntry& attn(int64_t layer) const { return groups.at(1 + 2 * layer); }
  const GroupEntry& ffn(int64_t layer) const { return groups.at(2 + 2 * layer); }
  // A layer's two groups are adjacent: one span [offset, offset + size).
  uint64_t layer_offset(int64_t layer) const { return attn(layer).offset; }
  uint64_t layer_size(int64_t layer) const { return ffn(layer).offset + ffn(layer).size - attn(layer).offset; }
  uint64_t max_layer_size() const;

  // Lay out groups and tensors for a model (offsets, sizes; checksums left 0), each tensor in the
  // format `choose` gives (checked with check_tensor_format), bf16 without one.
  static Manifest plan(const ModelConfig& m, const std::string& source, const FormatChooser& choose = nullptr);

  // Checks that the groups, tensors and offsets agree with the model config and each other.
  void validate() const;

  std::string to_yaml() const;
  static Manifest from_yaml(const std::string& text, const std::string& what);  // what: for messages
  static Manifest load(const std::string& path);
  void save(const std::string& path) const;
};

uint64_t align_up(uint64_t v, uint64_t a);

}  // namespace ringllama
