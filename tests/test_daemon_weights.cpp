// Weights from the loader daemon (worker/daemon_weights.h): the same bits as the store read
// directly, and clear failures when there is no daemon to talk to.
#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <vector>

#include "common/protocol.h"
#include "tests/golden.h"
#include "tests/test_loaderd_proc.h"
#include "tests/test_util.h"
#include "worker/daemon_weights.h"

namespace ringllama {
namespace {

using test::Proc;

// The welcome's additions (PUB endpoint, worker table entry) survive a round trip, and a welcome
// without them still parses.
TEST(DaemonWelcome, RoundTripsPubAndWorkerId) {
  Welcome w{"/ringllama-a", 1, "a", "/s", 0xabcdef, 3, 2, 1000, "ipc:///run/x-pub", 7};
  const auto back = std::get<Welcome>(parse_control_reply(encode(ControlReply{w})));
  EXPECT_EQ(back.pub, "ipc:///run/x-pub");
  EXPECT_EQ(back.worker_id, 7);
  const auto old = std::get<Welcome>(parse_control_reply(
      R"({"type":"welcome","segment":"/x","layout_version":1,"instance_id":"i","store":"/s",)"
      R"("store_identity":"00000000000000ff","n_layers":3,"n_slots":2,"heartbeat_ms":1000})"));
  EXPECT_EQ(old.pub, "");
  EXPECT_EQ(old.worker_id, -1);
}

// (g) --daemon gives bit-identical logits to --store, through a window smaller than the model
// (slots reused within each pass) and through a window that holds it all.
TEST(DaemonWeights, LogitsBitIdenticalToStore) {
  const test::Golden fixture = test::load_golden("llama31_gqa_untied");
  const int64_t rows = fixture.rows;
  const std::string prompt = test::join_ids(fixture.prompt_ids, ",");
  test::TempDir tmp;
  const std::string store = tmp / "store";
  ASSERT_EQ(test::run_bin("ringllama-pack", {"--hf", fixture.hf_dir(), "--out", store, "--quiet"}, 60).status, 0);
  auto ref = test::run_bin("ringllama-generate", {"--store", store, "--prompt-ids", prompt, "--max-tokens",
                                                  std::to_string(rows), "--ignore-eos", "--logits-out", tmp / "ref"});
  ASSERT_EQ(ref.status, 0) << ref.err;
  const std::string want = test::read_file(tmp / "ref");
  ASSERT_FALSE(want.empty());

  for (int cap : {2, 3}) {
    SCOPED_TRACE("cpu_cap_layers " + std::to_string(cap));
    // The daemon makes no socket directory (but its own default one).
    std::filesystem::create_directory(tmp / ("run" + std::to_string(cap)));
    const std::string control = "ipc://" + (tmp / ("run" + std::to_string(cap) + "/ctl.sock"));
    Proc d("ringllama-loaderd", {"--store", store, "--control", control, "--cpu-cap-layers", std::to_string(cap),
                                 "--mlock", "warn"},
           tmp / "daemon.log");
    ASSERT_TRUE(test::wait_daemon_ready(d, control)) << d.log();
    const std::string out = tmp / ("daemon" + std::to_string(cap));
    // No --store: the manifest comes from the store the daemon names.
    auto r = test::run_bin("ringllama-generate", {"--daemon", control, "--prompt-ids", prompt, "--max-tokens",
                                                  std::to_string(rows), "--ignore-eos", "--logits-out", out}, 60);
    ASSERT_EQ(r.status, 0) << r.err << d.log();
    EXPECT_EQ(r.out, ref.out);
    const std::string got = test::read_file(out);
    EXPECT_EQ(got.size(), want.size());
    EXPECT_TRUE(got == want) << "logits differ from --store";

    // The same store named explicitly is accepted; another store is refused.
    r = test::run_bin("ringllama-generate", {"--daemon", control, "--store", store, "--prompt-ids", "1,2",
                                             "--max-tokens", "2"}, 60);
    EXPECT_EQ(r.status, 0) << r.err;
    d.signal(SIGTERM);
    EXPECT_EQ(d.wait(10000), 0) << d.log();
  }
}

// Two layers held at once (a copy in flight behind another): the daemon protects [copied, held),
// the bytes are the store's, out-of-order releases and a third hold are refused.
TEST(DaemonWeights, HoldsTwoLayersAheadInOrder) {
  test::TempDir tmp;
  const std::string store = tmp / "store";
  ASSERT_EQ(test::run_bin("ringllama-pack", {"--random", "tiny", "--layers", "8", "--out", store, "--quiet"}, 60)
                .status,
            0);
  const std::string control = "ipc://" + (tmp / "ctl.sock");
  // 4 slots for 8 layers: the last 2 pinned, 2 cycling, so at most 2 held.
  Proc d("ringllama-loaderd", {"--store", store, "--control", control, "--cpu-cap-layers", "4", "--mlock", "warn"},
         tmp / "daemon.log");
  ASSERT_TRUE(test::wait_daemon_ready(d, control)) << d.log();
  Config c;
  auto w = open_daemon_weights(control, c);
  auto ref = open_store_weights(store);
  const Manifest& m = w->manifest();
  ASSERT_EQ(w->layers_held_at_once(), 2);
  auto bytes = [&](const LayerWeights& lw, int64_t l) {
    return std::string(reinterpret_cast<const char*>(lw.attn_norm), m.layer_size(l));
  };
  for (int pass = 0; pass < 3; ++pass) {
    w->begin_pass();
    EXPECT_EQ(bytes(w->acquire_layer(0), 0), bytes(ref->acquire_layer(0), 0));
    for (int64_t l = 1; l < 8; ++l) {
      EXPECT_EQ(bytes(w->acquire_layer(l), l), bytes(ref->acquire_layer(l), l)) << "pass " << pass << " layer " << l;
      if (l == 3 && pass == 0) {
        EXPECT_THROW(w->acquire_layer(4), Error) << "a third layer held";
        EXPECT_THROW(w->release_layer(l), Error) << "released before the older one";
      }
      w->release_layer(l - 1);
    }
    w->release_layer(7);
    w->end_pass();
  }
  const std::string stats = test::run_bin("ringllama-loaderd", {"--control", control, "--stats"}, 30).out;
  EXPECT_NE(stats.find("\"pinned_layers\": 2"), std::string::npos) << stats;
  d.signal(SIGTERM);
  EXPECT_EQ(d.wait(10000), 0) << d.log();
}

TEST(DaemonWeights, OtherStoreIsRefused) {
  test::TempDir tmp;
  const std::string a = tmp / "a", b = tmp / "b";
  ASSERT_EQ(test::run_bin("ringllama-pack", {"--random", "tiny", "--out", a, "--quiet"}, 60).status, 0);
  ASSERT_EQ(test::run_bin("ringllama-pack", {"--random", "tiny", "--seed", "7", "--out", b, "--quiet"}, 60).status, 0);
  const std::string control = "ipc://" + (tmp / "ctl.sock");
  Proc d("ringllama-loaderd", {"--store", a, "--control", control, "--mlock", "warn"}, tmp / "daemon.log");
  ASSERT_TRUE(test::wait_daemon_ready(d, control)) << d.log();
  auto r = test::run_bin("ringllama-generate", {"--daemon", control, "--store", b, "--prompt-ids", "1,2",
                                                "--max-tokens", "2"}, 60);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("is not the store the loader daemon"), std::string::npos) << r.err;
}

// (h) No daemon: a clear error within a few seconds, never a hang; also when a stale socket file
// is left where the daemon would listen.
TEST(DaemonWeights, NoDaemonFailsFast) {
  test::TempDir tmp;
  const std::string store = tmp / "store";
  ASSERT_EQ(test::run_bin("ringllama-pack", {"--random", "tiny", "--out", store, "--quiet"}, 60).status, 0);

  auto t0 = std::chrono::steady_clock::now();
  auto r = test::run_bin("ringllama-generate", {"--daemon", "ipc://" + (tmp / "none.sock"), "--prompt-ids", "1,2",
                                                "--max-tokens", "2"}, 30);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("is ringllama-loaderd running?"), std::string::npos) << r.err;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(3));

  test::write_file(tmp / "stale.sock", "");
  t0 = std::chrono::steady_clock::now();
  r = test::run_bin("ringllama-generate", {"--daemon", "ipc://" + (tmp / "stale.sock"), "--prompt-ids", "1,2",
                                           "--max-tokens", "2"}, 30);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("is ringllama-loaderd running?"), std::string::npos) << r.err;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(8));
}

}  // namespace
}  // namespace ringllama
