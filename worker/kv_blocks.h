// The paged KV cache's bookkeeping, shared by every backend: a pool of blocks of block_tokens
// positions, a free list, and each sequence's block table (logical block i of a sequence lives in
// physical block table[i]). The pool is sized once (batch_size x ceil(max_context / block_tokens)
// blocks, DESIGN.md "The memory planner"); the backends allocate the K/V memory for that many
// blocks once and never again. Blocks are taken as a sequence grows and given back when it ends.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace ringllama {

// One item of a step: new tokens of one sequence.
struct StepItem {
  int64_t seq = 0;              // a sequence id given to add_sequence
  std::vector<int32_t> tokens;  // at positions [cached, cached + tokens.size())
  bool want_logits = true;      // false: an early prompt chunk, only its cache rows matter
};

// What one step may hold.
struct StepLimits {
  int64_t max_items = 0;        // sequences per step (batch_size)
  int64_t max_item_tokens = 0;  // tokens of one item (prefill_chunk_tokens, <= max_context)
  int64_t max_context = 0;      // positions of one sequence
  int64_t vocab_size = 0;       // token ids are in [0, vocab_size)
};

// A checked step, flattened: its tokens as rows, item by item.
struct StepLayout {
  std::vector<int64_t> seq;         // [items] sequence id
  std::vector<int64_t> row0;        // [items] first row of the item
  std::vector<int64_t> count;       // [items] rows (new tokens)
  std::vector<int64_t> start;       // [items] position of the first new token (cached before)
  std::vector<int32_t> ids;         // [rows] token ids
  std::vector<int32_t> pos;         // [rows] positions
  std::vector<int32_t> slot;        // [rows] cache row: block * block_tokens + pos % block_tokens
  std::vector<int64_t> logit_rows;  // rows whose logits are wanted: each wanting item's last row
  std::vector<int64_t> logit_item;  // [logit_rows] the item each comes from
  int64_t rows() const { return static_cast<int64_t>(ids.size()); }
  int64_t items() const { return static_cast<int64_t>(seq.size()); }
};

class KvBlockPool {
 public:
  KvBlockPool(int64_t block_tokens, int64_t n_blocks, int64_t max_context);

  void add_sequence(int64_t id);
  void free_sequence(int64_t id);
  bool has(int64_t id) const { return seqs_.count(id) != 0; }
  int64_t length(int64_t id) const;               // cached positions
  const std::vector<int32_t>& table(int64_t id) const;  // physical blocks, in order
  int64_t sequences() const { return static_cast<int64_t>(seqs_.size()); }

  int64_t block_tokens() const { return block_tokens_; }
  int64_t n_blocks() const { return n_blocks_; }
  int64_t free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t max_blocks_per_sequence() const { return (max_context_ + block_tokens_ - 1) / block_tokens_; }

  // Checks the items (known sequences, each once, token ids, counts, context) and takes the blocks
  // their new positions need: all of them or, with an Error that says the pool is exhausted, none.
  StepLayout prepare(const std::vector<StepItem>& items, const StepLimits& limits);
  // After a successful pass: the new positions count as cached.
  void commit(const StepLayout& layout);

 private:
  struct Seq {
    int64_t length = 0;
    std::vector<int32_t> blocks;
  };
  const Seq& get(int64_t id) const;

  int64_t block_tokens_, n_blocks_, max_context_;
  std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
  std::unordered_map<int64_t, Seq> seqs_;
};

}  // namespace ringllama
