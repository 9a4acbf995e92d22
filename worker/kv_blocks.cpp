#include "worker/kv_blocks.h"

#include <algorithm>
#include <unordered_set>

#include "common/errors.h"

namespace ringllama {

KvBlockPool::KvBlockPool(int64_t block_tokens, int64_t n_blocks, int64_t max_context)
    : block_tokens_(block_tokens), n_blocks_(n_blocks), max_context_(max_context) {
  RL_REQUIRE(block_tokens > 0, "kv_block_tokens must be > 0 (got {})", block_tokens);
  RL_REQUIRE(max_context > 0, "max_context must be > 0 (got {})", max_context);
  RL_REQUIRE(n_blocks > 0 && n_blocks <= 0x7fffffff / block_tokens,
             "a KV pool of {} blocks of {} tokens cannot be indexed with 32-bit rows", n_blocks, block_tokens);
  free_.resize(static_cast<size_t>(n_blocks));
  // Block 0 on top: a fresh pool hands out blocks in order.
  for (int64_t i = 0; i < n_blocks; ++i) free_[i] = static_cast<int32_t>(n_blocks - 1 - i);
}

void KvBlockPool::add_sequence(int64_t id) {
  RL_REQUIRE(!has(id), "sequence {} already exists", id);
  seqs_.emplace(id, Seq{});
}

void KvBlockPool::free_sequence(int64_t id) {
  auto it = seqs_.find(id);
  RL_REQUIRE(it != seqs_.end(), "sequence {} does not exist", id);
  for (auto b = it->second.blocks.rbegin(); b != it->second.blocks.rend(); ++b) free_.push_back(*b);
  seqs_.erase(it);
}

const KvBlockPool::Seq& KvBlockPool::get(int64_t id) const {
  auto it = seqs_.find(id);
  RL_REQUIRE(it != seqs_.end(), "sequence {} does not exist (add_sequence first)", id);
  return it->second;
}

int64_t KvBlockPool::length(int64_t id) const { return get(id).length; }
const std::vector<int32_t>& KvBlockPool::table(int64_t id) const { return get(id).blocks; }

StepLayout KvBlockPool::prepare(const std::vector<StepItem>& items, const StepLimits& limits) {
  RL_REQUIRE(!items.empty(), "a step needs at least one item");
  RL_REQUIRE(static_cast<int64_t>(items.size()) <= limits.max_items,
             "a step of {} sequences exceeds batch_size ({})", items.size(), limits.max_items);
  std::unordered_set<int64_t> seen;
  int64_t need = 0;  // blocks to take
  for (const StepItem& it : items) {
    const Seq& s = get(it.seq);
    RL_REQUIRE(seen.insert(it.seq).second, "sequence {} appears twice in one step", it.seq);
    const int64_t n = static_cast<int64_t>(it.tokens.size());
    RL_REQUIRE(n > 0, "sequence {}: a step item needs at least one token", it.seq);
    RL_REQUIRE(n <= limits.max_item_tokens, "sequence {}: {} tokens in one step exceed prefill_chunk_tokens ({})",
               it.seq, n, limits.max_item_tokens);
    RL_REQUIRE(s.length + n <= limits.max_context && s.length + n <= max_context_,
               "sequence {}: a context of {} tokens exceeds max_context ({})", it.seq, s.length + n,
               std::min(limits.max_context, max_context_));
    for (int64_t t = 0; t < n; ++t)
      RL_REQUIRE(it.tokens[t] >= 0 && it.tokens[t] < limits.vocab_size,
                 "token {} at position {} is outside the vocabulary [0, {})", it.tokens[t], s.length + t,
                 limits.vocab_size);
    const int64_t blocks = (s.length + n + block_tokens_ - 1) / block_tokens_;
    need += std::max<int64_t>(0, blocks - static_cast<int64_t>(s.blocks.size()));
  }
  if (need > free_blocks())
    fail("the KV cache pool is exhausted: this step needs {} more blocks and {} of {} are free ({} tokens per block, "
         "sized as batch_size x max_context); end a sequence or raise batch_size or max_context",
         need, free_blocks(), n_blocks_, block_tokens_);

  StepLayout L;
  for (const StepItem& it : items) {
    Seq& s = seqs_.at(it.seq);
    const int64_t n = static_cast<int64_t>(it.tokens.size());
    while (static_cast<int64_t>(s.blocks.size()) * block_tokens_ < s.length + n) {
      s.blocks.push_back(free_.back());
      free_.pop_back();
    }
    L.seq.push_back(it.seq);
    L.row0.push_back(L.rows());
    L.count.push_back(n);
    L.start.push_back(s.length);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t p = s.length + t;
      L.ids.push_back(it.tokens[t]);
      L.pos.push_back(static_cast<int32_t>(p));
      L.slot.push_back(static_cast<int32_t>(s.blocks[p / block_tokens_] * block_tokens_ + p % block_tokens_));
    }
    if (it.want_logits) {
      L.logit_rows.push_back(L.rows() - 1);
      L.logit_item.push_back(L.items() - 1);
    }
  }
  return L;
}

void KvBlockPool::commit(const StepLayout& layout) {
  for (int64_t i = 0; i < layout.items(); ++i) seqs_.at(layout.seq[i]).length = layout.start[i] + layout.count[i];
}

}  // namespace ringllama
