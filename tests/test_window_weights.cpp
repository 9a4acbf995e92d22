// The local ring window (worker/window_weights.h): the same bytes as the whole store, pass after
// pass, through rings smaller than the model and one that holds it all; never more layers than
// slots; a corrupted group fails the acquire of its layer with an Error that names it, not a hang.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "common/errors.h"
#include "common/store.h"
#include "tests/test_util.h"
#include "worker/window_weights.h"

namespace ringllama {
namespace {

constexpr int64_t kLayers = 7;

std::string pack_store(const test::TempDir& tmp, const std::string& name = "store") {
  const std::string dir = tmp / name;
  const auto r = test::run_bin("ringllama-pack", {"--random", "tiny", "--layers", std::to_string(kLayers), "--seed",
                                                  "3", "--out", dir, "--quiet"},
                               120);
  EXPECT_EQ(r.status, 0) << r.err;
  return dir;
}

Config window_config(int64_t cap, int64_t back_margin = 0, int64_t cycle_slots = kAuto) {
  Config c;
  c.cpu_cap_layers = cap;
  c.back_margin = back_margin;
  c.cycle_slots = cycle_slots;
  c.io_queue_depth = 4;
  c.io_block_kib = 64;  // several blocks per layer: the reader's splitting runs too
  return c;
}

// The attn and ffn groups of a host layer view, as bytes.
std::string group_bytes(const void* first_tensor, const GroupEntry& g, const char* name) {
  const char* base = static_cast<const char*>(first_tensor) - g.tensor(name).offset;
  return std::string(base, g.size);
}

void expect_same_layer(const Manifest& m, int64_t l, const LayerWeights& got, const LayerWeights& want) {
  EXPECT_TRUE(group_bytes(got.attn_norm, m.attn(l), "attn_norm") == group_bytes(want.attn_norm, m.attn(l), "attn_norm"))
      << "layer " << l << " attn differs";
  EXPECT_TRUE(group_bytes(got.ffn_norm, m.ffn(l), "ffn_norm") == group_bytes(want.ffn_norm, m.ffn(l), "ffn_norm"))
      << "layer " << l << " ffn differs";
  // Every tensor at the same offset from its group as in the store's view.
  EXPECT_EQ(reinterpret_cast<const char*>(got.w2.data) - reinterpret_cast<const char*>(got.ffn_norm),
            reinterpret_cast<const char*>(want.w2.data) - reinterpret_cast<const char*>(want.ffn_norm));
  EXPECT_EQ(reinterpret_cast<const char*>(got.wo.data) - reinterpret_cast<const char*>(got.attn_norm),
            reinterpret_cast<const char*>(want.wo.data) - reinterpret_cast<const char*>(want.attn_norm));
}

TEST(WindowWeights, BitIdenticalToStoreOverSeveralPasses) {
  test::TempDir tmp;
  const std::string dir = pack_store(tmp);
  auto store = open_store_weights(dir);
  const Manifest& m = store->manifest();
  ASSERT_EQ(m.model.n_layers, kLayers);
  constexpr int kPasses = 4;

  for (int64_t cap : {2, 3, 7}) {
    SCOPED_TRACE("cpu_cap_layers " + std::to_string(cap));
    auto w = open_window_weights(dir, window_config(cap));
    EXPECT_EQ(w->manifest().weights_size, m.weights_size);
    const GroupEntry& gg = m.globals();
    EXPECT_TRUE(group_bytes(w->globals().tok_embeddings, gg, "tok_embeddings") ==
                group_bytes(store->globals().tok_embeddings, gg, "tok_embeddings"));

    // One allocation: the globals and exactly min(cap, layers) slots, 4 KiB-aligned.
    const std::vector<HostRange> ranges = w->host_ranges();
    ASSERT_EQ(ranges.size(), 1u);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(ranges[0].data) % kGroupAlign, 0u);
    const int64_t slots = std::min<int64_t>(cap, kLayers);
    EXPECT_GE(ranges[0].bytes, gg.size + static_cast<uint64_t>(slots) * m.max_layer_size());
    EXPECT_LT(ranges[0].bytes, gg.size + static_cast<uint64_t>(slots + 1) * m.max_layer_size() + 2 * kGroupAlign);
    // A window smaller than the model pins its last cap - 2 layers and cycles the others through
    // 2 slots, which bound what may be held at once.
    const int64_t pinned = cap < kLayers && cap > 2 ? cap - 2 : 0;
    EXPECT_EQ(w->max_held_layers(), pinned > 0 ? 2 : slots);

    for (int pass = 0; pass < kPasses; ++pass) {
      w->begin_pass();
      for (int64_t l = 0; l < kLayers; ++l) {
        const LayerWeights got = w->acquire_layer(l);
        const char* lo = static_cast<const char*>(ranges[0].data);
        const auto* p = reinterpret_cast<const char*>(got.attn_norm);
        EXPECT_TRUE(p >= lo && p + m.layer_size(l) <= lo + ranges[0].bytes) << "a view outside host_ranges()";
        const uint64_t token = w->slot_token(l);
        expect_same_layer(m, l, got, store->acquire_layer(l));
        EXPECT_TRUE(w->still_valid(l, token));
        EXPECT_FALSE(w->still_valid(l, token + 1000000));
        w->release_layer(l);
      }
      w->end_pass();
    }
    const WindowStats s = w->stats();
    EXPECT_EQ(s.slots, slots);
    EXPECT_LE(s.max_loaded, slots) << "the ring held more layers than it has slots";
    EXPECT_EQ(s.max_held, 1);
    EXPECT_EQ(s.acquires, static_cast<uint64_t>(kPasses * kLayers));
    EXPECT_EQ(s.passes, static_cast<uint64_t>(kPasses));
    EXPECT_EQ(s.read_errors, 0u);
    EXPECT_EQ(s.read_bytes, s.layer_reads * m.layer_size(0));
    ASSERT_EQ(s.reads_per_layer.size(), static_cast<size_t>(kLayers));
    if (cap >= kLayers) {
      // The whole model fits: each layer is read once, whatever the passes.
      for (int64_t l = 0; l < kLayers; ++l) EXPECT_EQ(s.reads_per_layer[l], 1u) << "layer " << l;
    } else {
      // A pass reads each layer at most once (a slot still holding a layer when it comes round
      // again serves it unread, at most cap of them per pass); the next pass's first layers may
      // already be read.
      for (int64_t l = 0; l < kLayers; ++l) {
        EXPECT_GE(s.reads_per_layer[l], 1u) << "layer " << l;
        EXPECT_LE(s.reads_per_layer[l], static_cast<uint64_t>(kPasses + 1)) << "layer " << l;
      }
      EXPECT_GE(s.layer_reads, static_cast<uint64_t>(kPasses * (kLayers - slots)));
      EXPECT_LE(s.layer_reads, static_cast<uint64_t>(kPasses * kLayers + slots));
      // Pinned layers are read once, whatever the passes.
      for (int64_t l = kLayers - pinned; l < kLayers; ++l) EXPECT_EQ(s.reads_per_layer[l], 1u) << "layer " << l;
      if (pinned > 0)
        EXPECT_LE(s.layer_reads, static_cast<uint64_t>(kPasses * (kLayers - pinned) + slots))
            << "the unpinned layers, once a pass";
    }
  }
}

// A consumer of a ring may hold cap - back_margin layers at once, sliding; one more throws instead
// of waiting forever (only its own releases could move the window).
TEST(WindowWeights, HoldsUpToTheWindowAndRefusesMore) {
  test::TempDir tmp;
  const std::string dir = pack_store(tmp);
  auto store = open_store_weights(dir);
  const Manifest& m = store->manifest();
  for (int64_t back_margin : {0, 1}) {
    SCOPED_TRACE("back_margin " + std::to_string(back_margin));
    auto w = open_window_weights(dir, window_config(3, back_margin, 3));  // cycle_slots 3: a plain ring
    const int64_t hold = 3 - back_margin;
    EXPECT_EQ(w->max_held_layers(), hold);
    for (int pass = 0; pass < 2; ++pass) {
      w->begin_pass();
      for (int64_t l = 0; l < hold; ++l) expect_same_layer(m, l, w->acquire_layer(l), store->acquire_layer(l));
      if (back_margin == 0) {
        try {
          w->acquire_layer(hold);
          ADD_FAILURE() << "acquiring a layer past the window did not throw";
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("layer " + std::to_string(hold)), std::string::npos) << e.what();
        }
      }
      // After a release the next layer can be had (the one refused above too).
      for (int64_t l = hold; l < kLayers; ++l) {
        w->release_layer(l - hold);
        expect_same_layer(m, l, w->acquire_layer(l), store->acquire_layer(l));
      }
      for (int64_t l = kLayers - hold; l < kLayers; ++l) w->release_layer(l);
      w->end_pass();
    }
    EXPECT_EQ(w->stats().max_held, hold);
    EXPECT_THROW(w->release_layer(2), Error);  // not held
  }
}

// Layers below set_streamed_from are neither read nor handed out; the others are as before.
TEST(WindowWeights, StreamedFromLeavesResidentLayersOut) {
  test::TempDir tmp;
  const std::string dir = pack_store(tmp);
  auto store = open_store_weights(dir);
  const Manifest& m = store->manifest();
  auto w = open_window_weights(dir, window_config(2));
  w->set_streamed_from(3);
  for (int pass = 0; pass < 3; ++pass) {
    w->begin_pass();
    for (int64_t l = 3; l < kLayers; ++l) {
      expect_same_layer(m, l, w->acquire_layer(l), store->acquire_layer(l));
      w->release_layer(l);
    }
    w->end_pass();
  }
  EXPECT_THROW(w->acquire_layer(1), Error);
  w->end_pass();
  const WindowStats s = w->stats();
  // Only the preload of the first pass, before set_streamed_from, may have read layers 0 and 1.
  for (int64_t l = 0; l < 3; ++l) EXPECT_LE(s.reads_per_layer[l], 1u) << "layer " << l;
  for (int64_t l = 3; l < kLayers; ++l) EXPECT_GE(s.reads_per_layer[l], 3u) << "layer " << l;
}

// A group whose bytes do not match the manifest's checksum: the acquire of its layer throws an
// Error naming the layer, in every pass (the layer is read again), and the other layers still come.
TEST(WindowWeights, CorruptedGroupFailsItsLayer) {
  test::TempDir tmp;
  const std::string dir = pack_store(tmp);
  const Manifest m = Store::open(dir).manifest();
  constexpr int64_t kBad = 4;
  {
    std::fstream f(dir + "/" + kWeightsFile, std::ios::in | std::ios::out | std::ios::binary);
    ASSERT_TRUE(f.good());
    const uint64_t at = m.ffn(kBad).offset + 100;
    f.seekg(static_cast<std::streamoff>(at));
    char c = 0;
    f.read(&c, 1);
    c = static_cast<char>(c ^ 0x5a);
    f.seekp(static_cast<std::streamoff>(at));
    f.write(&c, 1);
  }
  for (int64_t cap : {2, 7}) {
    SCOPED_TRACE("cpu_cap_layers " + std::to_string(cap));
    auto w = open_window_weights(dir, window_config(cap));
    for (int pass = 0; pass < 2; ++pass) {
      w->begin_pass();
      for (int64_t l = 0; l < kLayers; ++l) {
        if (l == kBad) {
          try {
            w->acquire_layer(l);
            ADD_FAILURE() << "a corrupted layer was handed out";
          } catch (const Error& e) {
            const std::string what = e.what();
            EXPECT_NE(what.find("layer 4"), std::string::npos) << what;
            EXPECT_NE(what.find("checksum"), std::string::npos) << what;
          }
          continue;
        }
        w->acquire_layer(l);
        w->release_layer(l);
      }
      w->end_pass();
    }
    const WindowStats s = w->stats();
    EXPECT_GE(s.read_errors, 2u);  // read again for the second pass
    EXPECT_EQ(s.acquires, static_cast<uint64_t>(2 * (kLayers - 1)));
  }
}

TEST(WindowWeights, RefusesAWindowThatCannotWork) {
  test::TempDir tmp;
  const std::string dir = pack_store(tmp);
  EXPECT_THROW(open_window_weights(dir, window_config(0)), ConfigError);
  EXPECT_THROW(open_window_weights(dir, window_config(2, 2)), ConfigError);
  EXPECT_THROW(open_window_weights(tmp / "none", window_config(2)), StoreError);
}

}  // namespace
}  // namespace ringllama
