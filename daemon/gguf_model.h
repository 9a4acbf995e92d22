// A llama.cpp GGUF file as a source for ringllama-pack (DESIGN.md "GGUF input").
//
// The model config comes from the `llama.*` metadata; each store tensor from its GGUF tensor,
// dequantized to float and rounded to the store's bf16. llama.cpp's converter permutes the rows of
// attn_q and attn_k (convert_hf_to_gguf.py `permute`) for its interleaved RoPE; the store keeps
// Hugging Face's layout, so those rows are put back on the way.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/gguf.h"
#include "common/manifest.h"
#include "daemon/pack_writer.h"

namespace ringllama {

// True for the tensor types the packer converts: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
// Q4_K, Q6_K.
bool gguf_type_packable(GgmlType t);

// Dequantizes `n_blocks` whole blocks of type t at `src` into out (n_blocks * block elements).
// Throws Error for a type gguf_type_packable refuses.
void dequantize_blocks(GgmlType t, const unsigned char* src, uint64_t n_blocks, float* out);

// The GGUF row (within a matrix of `rows` rows) that holds row `hf_row` of the Hugging Face
// layout, for a q or k projection of `n_head` heads (n_head_kv for k): the inverse of the
// converter's permute, which reorders each head's rows [first half | second half] to interleaved
// pairs (0, half, 1, half + 1, ...).
int64_t gguf_permuted_row(int64_t hf_row, int64_t rows, int64_t n_head);

// The llama config of a GGUF's metadata: architecture llama, dimensions, heads, rope (llama3
// scaling recovered from rope_freqs.weight), norm eps, vocabulary size from the token list, tied
// embeddings when there is no output.weight, bos/eos ids. Throws StoreError naming the key.
ModelConfig gguf_model_config(const GgufFile& f);

// The GGUF tensor name of a store tensor ("wq" of layer 3 -> "blk.3.attn_q.weight").
std::string gguf_tensor_name(const GroupEntry& g, const std::string& store_name);

// Store tensors from a GGUF. Every tensor the plan needs is found and checked (present, shape,
// type that can be converted) when the object is made, before any byte is written.
class GgufSource : public PackSource {
 public:
  GgufSource(const GgufFile& f, const Manifest& plan);
  void fill(const GroupEntry& g, size_t ti, uint64_t first, uint64_t count, bf16_t* out) const override;
  // Packed tensors are quantized from the dequantized floats, not from their bf16 rounding.
  void fill_rows_f32(const GroupEntry& g, size_t ti, int64_t row0, int64_t rows, float* out) const override;
  // Q4_0 and Q4_1 tensors packed as int4 with group size 32 are taken over block by block, exactly.
  bool fill_int4(const GroupEntry& g, size_t ti, int64_t row0, int64_t rows, uint8_t* q, uint16_t* sm) const override;
  // The GGUF type of store tensor `name` of `g` (the plan asks before the source exists).
  static GgmlType tensor_type(const GgufFile& f, const GroupEntry& g, const std::string& name);

 private:
  struct Ref {
    const GgufTensorInfo* tensor = nullptr;
    int64_t permute_heads = 0;  // > 0: rows are in the converter's q/k order for this many heads
  };
  // The raw bytes of HF row `row` of a tensor (the converter's permutation undone).
  void read_row(const Ref& r, int64_t row, std::vector<unsigned char>& raw) const;
  const GgufFile& file_;
  std::vector<std::vector<Ref>> refs_;  // [group (store order)][tensor]
};

}  // namespace ringllama
