// ringllama-loaderd end to end, as real processes on the CPU backend: a daemon and
// `ringllama-generate --daemon` clients on a packed fixture (3 layers) or a random store, with a
// window smaller than the model so that slots are reused within a pass.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>
#include <zmq.hpp>

#include "common/protocol.h"
#include "common/runtime_dir.h"
#include "common/store.h"
#include "daemon/loaderd.h"
#include "tests/golden.h"
#include "tests/test_loaderd_proc.h"
#include "tests/test_util.h"

namespace ringllama {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::Proc;

constexpr const char* kFixture = "llama31_gqa_untied";  // 3 layers, with transformers' tokens

std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

std::string shm_file(const std::string& control) {
  return "/dev/shm" + Segment::shm_name(instance_id_for(control));
}

// The daemon's lock file: in its runtime directory (runtime_dir.h), never in /dev/shm.
std::string lock_file(const std::string& control) {
  return default_runtime_dir() + Segment::shm_name(instance_id_for(control)) + ".lock";
}

class Loaderd : public ::testing::Test {
 protected:
  void SetUp() override {
    const test::Golden g = test::load_golden(kFixture);
    prompt_ = test::join_ids(g.prompt_ids, ",");
    golden_ = test::join_ids(g.tokens, " ");
    rows_ = g.rows;
    store_ = tmp_ / "store";
    auto pack = test::run_bin("ringllama-pack", {"--hf", g.hf_dir(), "--out", store_, "--quiet"}, 60);
    ASSERT_EQ(pack.status, 0) << pack.err;
    fs::create_directory(tmp_ / "run");  // the daemon makes no socket directory but its own default
    control_ = "ipc://" + (tmp_ / "run/loaderd.sock");
  }

  // A daemon killed with SIGKILL leaves its segment and lock file: the test removes them.
  void TearDown() override {
    std::error_code ec;
    fs::remove(shm_file(control_), ec);
    fs::remove(lock_file(control_), ec);
  }

  std::unique_ptr<Proc> start_daemon(const std::string& store, int cap, const std::string& log = "daemon.log",
                                     const std::vector<std::string>& env = {}) {
    auto d = std::make_unique<Proc>("ringllama-loaderd",
                                    std::vector<std::string>{"--store", store, "--control", control_,
                                                             "--cpu-cap-layers", std::to_string(cap), "--mlock",
                                                             "warn", "--heartbeat-ms", "100"},
                                    tmp_ / log, env);
    EXPECT_TRUE(test::wait_daemon_ready(*d, control_)) << "the daemon did not come up:\n" << d->log();
    return d;
  }

  std::unique_ptr<Proc> start_client(const std::string& name, int64_t max_tokens, const std::string& prompt) {
    return std::make_unique<Proc>(
        "ringllama-generate",
        std::vector<std::string>{"--daemon", control_, "--backend", "cpu", "--prompt-ids", prompt, "--max-tokens",
                                 std::to_string(max_tokens), "--ignore-eos", "--tokens-out", tmp_ / (name + ".tok"),
                                 "--logits-out", tmp_ / (name + ".logits")},
        tmp_ / (name + ".log"));
  }

  std::string tokens(const std::string& name) { return trim(test::read_file(tmp_ / (name + ".tok"))); }

  test::TempDir tmp_;
  std::string store_, control_, prompt_, golden_;
  int64_t rows_ = 0;
};

// (a) Two clients at once through a window of 2 slots for 3 layers: transformers' tokens, and the
// slots were reloaded within the passes.
TEST_F(Loaderd, TwoConcurrentClientsGetGoldenTokens) {
  auto d = start_daemon(store_, 2);
  auto a = start_client("a", rows_, prompt_);
  auto b = start_client("b", rows_, prompt_);
  ASSERT_EQ(a->wait(60000), 0) << a->log();
  ASSERT_EQ(b->wait(60000), 0) << b->log();
  EXPECT_EQ(tokens("a"), golden_);
  EXPECT_EQ(tokens("b"), golden_);
  const json s = test::daemon_stats(control_);
  ASSERT_TRUE(s.is_object()) << d->log();
  EXPECT_EQ(s["slots"].size(), 2u);
  EXPECT_GT(s["loads"].get<int64_t>(), 3) << s.dump(2);
  EXPECT_EQ(s["load_errors"].get<int64_t>(), 0);
  EXPECT_EQ(s["detached_total"].get<int64_t>(), 2) << "both said bye:\n" << s.dump(2);
  EXPECT_TRUE(s["workers"].empty());
  d->signal(SIGTERM);
  EXPECT_EQ(d->wait(10000), 0) << d->log();
}

// Full residency: cpu_cap_layers >= n_layers reads every layer once, however many passes run.
TEST_F(Loaderd, FullResidencyReadsEveryLayerOnce) {
  auto d = start_daemon(store_, 8);
  auto a = start_client("a", rows_, prompt_);
  ASSERT_EQ(a->wait(60000), 0) << a->log();
  EXPECT_EQ(tokens("a"), golden_);
  const json s = test::daemon_stats(control_);
  ASSERT_TRUE(s.is_object());
  EXPECT_EQ(s["slots"].size(), 3u) << "slots are clamped to the layers";
  EXPECT_EQ(s["loads"].get<int64_t>(), 3) << s.dump(2);
  for (const auto& [layer, count] : s["layer_loads"].items()) EXPECT_EQ(count.get<int64_t>(), 1) << "layer " << layer;
}

// (b) A client killed with SIGKILL mid-run is detached (its pidfd) and the other one still finishes
// with the tokens that reading the store directly gives.
TEST_F(Loaderd, KilledClientIsDetachedOthersFinish) {
  const std::string big = tmp_ / "tiny12";
  ASSERT_EQ(test::run_bin("ringllama-pack", {"--random", "tiny", "--layers", "12", "--out", big, "--quiet"}, 60).status, 0);
  auto ref = test::run_bin("ringllama-generate", {"--store", big, "--prompt-ids", "1,2,3", "--max-tokens", "300",
                                                  "--ignore-eos"}, 120);
  ASSERT_EQ(ref.status, 0) << ref.err;

  auto d = start_daemon(big, 5);
  auto victim = start_client("victim", 2000, "1,2,3");
  // Wait until the victim is attached and in a pass.
  ASSERT_TRUE(test::eventually(
      [&] {
        const json s = test::daemon_stats(control_);
        return s.is_object() && !s["workers"].empty() && s["workers"][0]["pass"].get<int64_t>() > 5;
      },
      20000))
      << victim->log();
  auto other = start_client("other", 300, "1,2,3");
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  ASSERT_TRUE(victim->running()) << "the victim finished before it could be killed";
  const pid_t vpid = victim->pid();
  victim->signal(SIGKILL);
  EXPECT_EQ(victim->wait(5000), 128 + SIGKILL);
  ASSERT_EQ(other->wait(120000), 0) << other->log() << d->log();
  EXPECT_EQ(tokens("other"), trim(ref.out));

  const json s = test::daemon_stats(control_);
  ASSERT_TRUE(s.is_object());
  bool found = false;
  for (const auto& x : s["detached"])
    if (x["pid"].get<int64_t>() == vpid) {
      found = true;
      EXPECT_EQ(x["reason"].get<std::string>(), "its process exited");
    }
  EXPECT_TRUE(found) << s.dump(2);
  EXPECT_NE(d->log().find(fmt::format("(pid {}) detached: its process exited", vpid)), std::string::npos) << d->log();
}

// (c) A daemon killed with SIGKILL leaves its segment; a new one on the same endpoint replaces it
// and serves a new client.
TEST_F(Loaderd, RestartAfterSigkillReplacesStaleSegment) {
  {
    auto d = start_daemon(store_, 2, "first.log");
    d->signal(SIGKILL);
    EXPECT_EQ(d->wait(5000), 128 + SIGKILL);
  }
  EXPECT_TRUE(fs::exists(shm_file(control_))) << "a killed daemon cannot remove its segment";
  auto d = start_daemon(store_, 2, "second.log");
  EXPECT_NE(d->log().find("left by a daemon that is gone: replaced"), std::string::npos) << d->log();
  auto a = start_client("a", rows_, prompt_);
  ASSERT_EQ(a->wait(60000), 0) << a->log();
  EXPECT_EQ(tokens("a"), golden_);
}

// (d) A flipped byte in layer 1's ffn group: the client fails at once with the daemon's message
// naming the layer, and the daemon stays up.
TEST_F(Loaderd, CorruptGroupFailsTheClientNamingTheLayer) {
  const Store store = Store::open(store_);
  const uint64_t at = store.manifest().ffn(1).offset + 100;
  {
    std::fstream f(store.weights_path(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(at));
    char c = 0;
    f.read(&c, 1);
    c = static_cast<char>(c ^ 0x5a);
    f.seekp(static_cast<std::streamoff>(at));
    f.write(&c, 1);
  }
  // Layer 1 is in the first window: the daemon serves, but is not ready (it reads the slot again).
  auto d = std::make_unique<Proc>("ringllama-loaderd",
                                  std::vector<std::string>{"--store", store_, "--control", control_,
                                                           "--cpu-cap-layers", "2", "--mlock", "warn"},
                                  tmp_ / "daemon.log");
  ASSERT_TRUE(test::eventually([&] { return d->log().find("not ready: slot") != std::string::npos; }, 20000))
      << d->log();
  auto a = start_client("a", rows_, prompt_);
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(a->wait(20000), 1) << a->log();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
  const std::string log = a->log();
  EXPECT_NE(log.find("layer 1"), std::string::npos) << log;
  EXPECT_NE(log.find("checksum mismatch"), std::string::npos) << log;
  EXPECT_TRUE(d->running());
  const json s = test::daemon_stats(control_);
  ASSERT_TRUE(s.is_object());
  EXPECT_GE(s["load_errors"].get<int64_t>(), 1);
  EXPECT_NE(d->log().find("layer 1"), std::string::npos);
}

// (e) SIGTERM and SIGINT: exit 0, and the segment, its lock file and the socket files are gone.
TEST_F(Loaderd, SigtermAndSigintStopCleanly) {
  for (int sig : {SIGTERM, SIGINT}) {
    auto d = start_daemon(store_, 2);
    const std::string shm = shm_file(control_);
    EXPECT_TRUE(fs::exists(shm));
    EXPECT_TRUE(fs::exists(lock_file(control_)));
    d->signal(sig);
    EXPECT_EQ(d->wait(10000), 0) << d->log();
    EXPECT_FALSE(fs::exists(shm)) << shm;
    EXPECT_FALSE(fs::exists(lock_file(control_))) << lock_file(control_);
    EXPECT_FALSE(fs::exists(test::ipc_file(control_)));
  }
}

// A client whose daemon dies under it fails with "loader daemon died" instead of waiting.
TEST_F(Loaderd, DaemonDeathFailsTheClient) {
  const std::string big = tmp_ / "tiny12";
  ASSERT_EQ(test::run_bin("ringllama-pack", {"--random", "tiny", "--layers", "12", "--out", big, "--quiet"}, 60).status, 0);
  auto d = start_daemon(big, 5);
  auto a = start_client("a", 2000, "1,2,3");
  ASSERT_TRUE(test::eventually(
      [&] {
        const json s = test::daemon_stats(control_);
        return s.is_object() && !s["workers"].empty() && s["workers"][0]["pass"].get<int64_t>() > 5;
      },
      20000));
  d->signal(SIGKILL);
  EXPECT_EQ(a->wait(10000), 1) << a->log();
  EXPECT_NE(a->log().find("loader daemon died"), std::string::npos) << a->log();
}

// (f) sd_notify: READY=1 once the window is loaded, then WATCHDOG=1 at half of WATCHDOG_USEC.
TEST_F(Loaderd, NotifiesReadyAndWatchdog) {
  const std::string sock = tmp_ / "notify.sock";
  int fd = test::bind_notify_socket(sock);
  ASSERT_GE(fd, 0) << "cannot bind " << sock;

  auto d = std::make_unique<Proc>("ringllama-loaderd",
                                  std::vector<std::string>{"--store", store_, "--control", control_,
                                                           "--cpu-cap-layers", "2", "--mlock", "warn"},
                                  tmp_ / "daemon.log",
                                  std::vector<std::string>{"NOTIFY_SOCKET=" + sock, "WATCHDOG_USEC=200000",
                                                           "WATCHDOG_PID=self"});
  bool ready = false;
  int watchdogs = 0;
  bool ready_before_socket = false;
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < end && !(ready && watchdogs >= 3)) {
    char buf[512];
    const ssize_t n = ::recv(fd, buf, sizeof buf - 1, 0);
    if (n <= 0) continue;
    const std::string msg(buf, static_cast<size_t>(n));
    if (msg.find("READY=1") != std::string::npos) {
      ready = true;
      ready_before_socket = fs::exists(test::ipc_file(control_));
    }
    if (msg.find("WATCHDOG=1") != std::string::npos) ++watchdogs;
  }
  ::close(fd);
  EXPECT_TRUE(ready) << d->log();
  EXPECT_TRUE(ready_before_socket) << "READY=1 before the control socket was bound";
  EXPECT_GE(watchdogs, 2) << d->log();
  d->signal(SIGTERM);
  EXPECT_EQ(d->wait(10000), 0) << d->log();
}

// Every key the daemon reads is a flag; --print-config shows the window clamped to the model.
TEST_F(Loaderd, PrintConfigAndClearStartErrors) {
  auto r = test::run_bin("ringllama-loaderd", {"--store", store_, "--cpu-cap-layers", "99", "--back-margin", "1",
                                               "--io-queue-depth", "8", "--io-block-kib", "256", "--heartbeat-ms",
                                               "500", "--control", control_, "--print-config"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("cpu_cap_layers"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("clamped"), std::string::npos) << r.out;

  // An inproc endpoint lives inside one process: no worker could reach it.
  r = test::run_bin("ringllama-loaderd", {"--store", store_, "--control", "inproc://x", "--mlock", "warn"}, 30);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("an inproc endpoint cannot be reached"), std::string::npos) << r.err;

  // An ipc endpoint whose folder cannot exist.
  test::write_file(tmp_ / "file", "x");
  r = test::run_bin("ringllama-loaderd", {"--store", store_, "--control", "ipc://" + (tmp_ / "file/sub/ctl.sock"),
                                          "--mlock", "warn"}, 30);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("directory " + (tmp_ / "file/sub") + " cannot be resolved"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(shm_file("ipc://" + (tmp_ / "file/sub/ctl.sock")))) << "the segment is removed on error";

  // A second daemon on the same endpoint is refused while the first lives.
  auto d = start_daemon(store_, 2);
  r = test::run_bin("ringllama-loaderd", {"--store", store_, "--control", control_, "--mlock", "warn"}, 30);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("a daemon answers on " + test::ipc_file(control_)), std::string::npos) << r.err;
  EXPECT_TRUE(d->running());
}

// Bad frames and requests before hello never take the daemon down; a hello's pid gives way to the
// connection's; a worker silent for 5 heartbeats (here 1 s, the floor) is detached, and bye detaches.
TEST_F(Loaderd, BadPeersAndSilentWorkers) {
  auto d = start_daemon(store_, 2);
  zmq::context_t ctx(1);
  auto ask = [&](zmq::socket_t& s, const std::string& frame) -> std::string {
    s.send(zmq::buffer(frame), zmq::send_flags::none);
    zmq::pollitem_t item{static_cast<void*>(s), 0, ZMQ_POLLIN, 0};
    if (zmq::poll(&item, 1, std::chrono::milliseconds(3000)) == 0) return "(no reply)";
    zmq::message_t m;
    (void)s.recv(m, zmq::recv_flags::none);
    return m.to_string();
  };
  zmq::socket_t bad(ctx, zmq::socket_type::dealer);
  bad.set(zmq::sockopt::linger, 0);
  bad.connect(control_);
  EXPECT_NE(ask(bad, "not json").find("\"type\":\"error\""), std::string::npos);
  EXPECT_NE(ask(bad, R"({"op":"progress","pass":0,"copied":1})").find("send hello first"), std::string::npos);
  // A pid that is not running: the connection's pid (this process) is the one taken.
  EXPECT_NE(ask(bad, R"({"op":"hello","pid":2147483000})").find("\"welcome\""), std::string::npos);
  EXPECT_NE(d->log().find(fmt::format("hello says pid 2147483000, the connection is pid {}'s", ::getpid())),
            std::string::npos)
      << d->log();
  bad.send(zmq::buffer(encode(ControlRequest{Bye{}})), zmq::send_flags::none);

  // This process says hello and then nothing for a while.
  zmq::socket_t quiet(ctx, zmq::socket_type::dealer);
  quiet.set(zmq::sockopt::linger, 0);
  quiet.connect(control_);
  const std::string hello = encode(ControlRequest{Hello{static_cast<int64_t>(::getpid()), "quiet"}});
  const ControlReply w = parse_control_reply(ask(quiet, hello));
  ASSERT_TRUE(std::holds_alternative<Welcome>(w));
  EXPECT_EQ(std::get<Welcome>(w).pub, control_ + "-pub");
  // A progress that goes backwards is refused (logged), the pass goes on.
  quiet.send(zmq::buffer(encode(ControlRequest{Progress{0, 0}})), zmq::send_flags::none);
  quiet.send(zmq::buffer(encode(ControlRequest{Progress{0, 2}})), zmq::send_flags::none);
  quiet.send(zmq::buffer(encode(ControlRequest{Progress{0, 1}})), zmq::send_flags::none);
  json s;
  ASSERT_TRUE(test::eventually(
      [&] {
        s = test::daemon_stats(control_);
        return s.is_object() && s["workers"].size() == 1u && s["workers"][0]["layer"].get<int64_t>() == 2;
      },
      5000))
      << s.dump(2);
  EXPECT_EQ(s["workers"][0]["pid"].get<int64_t>(), ::getpid());
  EXPECT_NE(d->log().find("goes back"), std::string::npos) << d->log();
  ASSERT_TRUE(test::eventually([&] { return d->log().find("missed its heartbeat") != std::string::npos; }, 5000))
      << d->log();
  ASSERT_TRUE(test::eventually([&] { return d->log().find("detached: silent for") != std::string::npos; }, 5000))
      << d->log();
  s = test::daemon_stats(control_);
  ASSERT_TRUE(s.is_object());
  EXPECT_TRUE(s["workers"].empty()) << s.dump(2);

  // bye detaches at once.
  zmq::socket_t polite(ctx, zmq::socket_type::dealer);
  polite.set(zmq::sockopt::linger, 0);
  polite.connect(control_);
  ASSERT_TRUE(std::holds_alternative<Welcome>(parse_control_reply(ask(polite, hello))));
  polite.send(zmq::buffer(encode(ControlRequest{Bye{}})), zmq::send_flags::none);
  ASSERT_TRUE(test::eventually([&] { return d->log().find("detached: said bye") != std::string::npos; }, 5000));
  EXPECT_TRUE(d->running());
}

}  // namespace
}  // namespace ringllama
