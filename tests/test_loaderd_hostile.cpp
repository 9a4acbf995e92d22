// ringllama-loaderd against hostile local peers and careless operators, as real processes: a peer
// that lies about its pid and goes silent, a request flood, two daemons on one socket path, socket
// directories that do not exist or anyone may write, a corrupt layer that is repaired while the
// daemon runs, and --cleanup after a daemon was killed.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>
#include <zmq.hpp>

#include "common/config.h"
#include "common/protocol.h"
#include "common/segment.h"
#include "common/store.h"
#include "daemon/loaderd.h"
#include "tests/test_loaderd_proc.h"
#include "tests/test_util.h"

namespace ringllama {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::Proc;
using Clock = std::chrono::steady_clock;

std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

class LoaderdHostile : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = tmp_ / "store";
    auto pack = test::run_bin("ringllama-pack", {"--random", "tiny", "--layers", "3", "--out", store_, "--quiet"}, 60);
    ASSERT_EQ(pack.status, 0) << pack.err;
    fs::create_directory(tmp_ / "run");
    fs::create_directory(tmp_ / "locks");
    control_ = "ipc://" + (tmp_ / "run/ctl.sock");
  }

  void TearDown() override {
    for (const std::string& c : controls_) {
      std::error_code ec;
      const std::string name = Segment::shm_name(instance_id_for(c));
      fs::remove("/dev/shm" + name, ec);
      fs::remove(tmp_ / "locks" + name + ".lock", ec);
    }
  }

  std::vector<std::string> daemon_args(const std::string& control, int cap) {
    controls_.push_back(control);
    return {"--store", store_, "--control", control, "--cpu-cap-layers", std::to_string(cap), "--mlock", "warn",
            "--heartbeat-ms", "100", "--lock-dir", tmp_ / "locks"};
  }

  std::unique_ptr<Proc> start_daemon(int cap, const std::string& log = "daemon.log",
                                     const std::vector<std::string>& env = {}) {
    auto d = std::make_unique<Proc>("ringllama-loaderd", daemon_args(control_, cap), tmp_ / log, env);
    EXPECT_TRUE(test::wait_daemon_ready(*d, control_)) << "the daemon did not come up:\n" << d->log();
    return d;
  }

  std::unique_ptr<Proc> start_client(const std::string& name, int64_t max_tokens = 6) {
    return std::make_unique<Proc>(
        "ringllama-generate",
        std::vector<std::string>{"--daemon", control_, "--backend", "cpu", "--prompt-ids", "1,2,3", "--max-tokens",
                                 std::to_string(max_tokens), "--ignore-eos", "--tokens-out", tmp_ / (name + ".tok")},
        tmp_ / (name + ".log"));
  }

  // The tokens that reading the store directly gives.
  std::string reference(int64_t max_tokens = 6) {
    auto r = test::run_bin("ringllama-generate", {"--store", store_, "--prompt-ids", "1,2,3", "--max-tokens",
                                                  std::to_string(max_tokens), "--ignore-eos"}, 120);
    EXPECT_EQ(r.status, 0) << r.err;
    return trim(r.out);
  }

  std::string tokens(const std::string& name) { return trim(test::read_file(tmp_ / (name + ".tok"))); }

  test::TempDir tmp_;
  std::string store_, control_;
  std::vector<std::string> controls_;
};

zmq::socket_t dealer(zmq::context_t& ctx, const std::string& endpoint) {
  zmq::socket_t s(ctx, zmq::socket_type::dealer);
  s.set(zmq::sockopt::linger, 0);
  s.connect(endpoint);
  return s;
}

std::string ask(zmq::socket_t& s, const std::string& frame) {
  s.send(zmq::buffer(frame), zmq::send_flags::none);
  zmq::pollitem_t item{static_cast<void*>(s), 0, ZMQ_POLLIN, 0};
  if (zmq::poll(&item, 1, std::chrono::milliseconds(3000)) == 0) return "(no reply)";
  zmq::message_t m;
  (void)s.recv(m, zmq::recv_flags::none);
  return m.to_string();
}

// 1. hello{pid:1} (a pid that never exits), one progress, then silence: the daemon takes the pid
// from the connection and detaches the silent peer, so it cannot pin the window; 64 of them fill
// the worker table only until they are detached.
TEST_F(LoaderdHostile, FalsePidAndSilenceDoNotStallWorkers) {
  const std::string want = reference();
  auto d = start_daemon(2);
  zmq::context_t ctx(1);
  std::vector<zmq::socket_t> spoofers;
  for (int i = 0; i < kMaxWorkers; ++i) {
    spoofers.push_back(dealer(ctx, control_));
    const std::string r = ask(spoofers.back(), R"({"op":"hello","pid":1,"worker":"spoof"})");
    ASSERT_NE(r.find("\"welcome\""), std::string::npos) << r;
    spoofers.back().send(zmq::buffer(encode(ControlRequest{Progress{0, 0}})), zmq::send_flags::none);
  }
  json s = test::daemon_stats(control_);
  ASSERT_TRUE(s.is_object());
  ASSERT_EQ(s["workers"].size(), size_t(kMaxWorkers));
  EXPECT_EQ(s["workers"][0]["pid"].get<int64_t>(), ::getpid()) << "the pid comes from the connection";
  EXPECT_TRUE(s["workers"][0]["pid_verified"].get<bool>());
  // The table is full now...
  zmq::socket_t late = dealer(ctx, control_);
  EXPECT_NE(ask(late, R"({"op":"hello","pid":1})").find("at most 64 workers"), std::string::npos);
  // ...and a worker that comes gets its layers once the silent ones are gone (about 1 s).
  const auto t0 = Clock::now();
  ASSERT_TRUE(test::eventually(
      [&] {
        const json t = test::daemon_stats(control_);
        return t.is_object() && t["workers"].empty();
      },
      10000))
      << d->log();
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(8));
  auto a = start_client("a");
  ASSERT_EQ(a->wait(30000), 0) << a->log() << d->log();
  EXPECT_EQ(tokens("a"), want);
  EXPECT_NE(d->log().find("detached: silent for"), std::string::npos) << d->log();
  // A detached peer that speaks again hears why.
  const std::string again = ask(spoofers.back(), encode(ControlRequest{Progress{0, 1}}));
  EXPECT_NE(again.find("was detached (silent for"), std::string::npos) << again;
  EXPECT_TRUE(d->running());
}

// A spoofer that stays silent while a real worker runs: the worker finishes (before, it waited on
// "still waiting for layer 1" for good).
TEST_F(LoaderdHostile, SilentPeerInAPassDoesNotHoldTheWindow) {
  const std::string want = reference();
  auto d = start_daemon(2);
  zmq::context_t ctx(1);
  zmq::socket_t spoof = dealer(ctx, control_);
  ASSERT_NE(ask(spoof, R"({"op":"hello","pid":1})").find("\"welcome\""), std::string::npos);
  spoof.send(zmq::buffer(encode(ControlRequest{Progress{0, 0}})), zmq::send_flags::none);
  auto a = start_client("a");
  ASSERT_EQ(a->wait(30000), 0) << a->log() << d->log();
  EXPECT_EQ(tokens("a"), want);
}

// 4. A client sending stats in a loop: a worker still gets its layers and the watchdog keeps its pace.
TEST_F(LoaderdHostile, RequestFloodStarvesNeitherWorkersNorTheWatchdog) {
  const std::string want = reference(12);
  const std::string sock = tmp_ / "notify.sock";
  const int fd = test::bind_notify_socket(sock);
  ASSERT_GE(fd, 0);
  auto d = std::make_unique<Proc>("ringllama-loaderd", daemon_args(control_, 2), tmp_ / "daemon.log",
                                  std::vector<std::string>{"NOTIFY_SOCKET=" + sock, "WATCHDOG_USEC=200000",
                                                           "WATCHDOG_PID=self"});
  ASSERT_TRUE(test::wait_daemon_ready(*d, control_)) << d->log();

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> sent{0};
  std::thread flood([&] {
    zmq::context_t ctx(1);
    zmq::socket_t s = dealer(ctx, control_);
    s.set(zmq::sockopt::sndtimeo, 100);
    const std::string req = encode(ControlRequest{StatsRequest{}});
    while (!stop) {
      if (s.send(zmq::buffer(req), zmq::send_flags::none)) ++sent;
      zmq::message_t m;  // read what comes back now and then, not all of it
      if (sent % 64 == 0) (void)s.recv(m, zmq::recv_flags::dontwait);
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const auto t0 = Clock::now();
  auto a = start_client("a", 12);
  // Watchdog pings while the flood goes on and the worker runs: the longest gap between two.
  auto last = Clock::now();
  double worst_gap_ms = 0;
  int pings = 0;
  while (a->running() && Clock::now() - t0 < std::chrono::seconds(30)) {
    char buf[512];
    const ssize_t n = ::recv(fd, buf, sizeof buf - 1, 0);
    const auto now = Clock::now();
    if (n > 0 && std::string(buf, static_cast<size_t>(n)).find("WATCHDOG=1") != std::string::npos) {
      worst_gap_ms = std::max(worst_gap_ms, std::chrono::duration<double, std::milli>(now - last).count());
      last = now;
      ++pings;
    }
  }
  const double worker_s = std::chrono::duration<double>(Clock::now() - t0).count();
  worst_gap_ms = std::max(worst_gap_ms, std::chrono::duration<double, std::milli>(Clock::now() - last).count());
  stop = true;
  flood.join();
  ::close(fd);
  EXPECT_GT(sent.load(), 1000u) << "the flood did not flood";
  ASSERT_EQ(a->wait(5000), 0) << a->log() << d->log();
  EXPECT_EQ(tokens("a"), want);
  EXPECT_LT(worker_s, 25.0);
  EXPECT_GE(pings, 2);
  EXPECT_LT(worst_gap_ms, 1500.0) << "watchdog pings every 100 ms; " << pings << " in " << worker_s << " s";
  EXPECT_TRUE(d->running());
}

// 3. Two spellings of one socket path: the second daemon is refused (same lock, or a daemon answers
// there), the first keeps its socket and segment.
TEST_F(LoaderdHostile, SecondDaemonOnTheSameSocketPathIsRefused) {
  auto d = start_daemon(2);
  const std::string same = "ipc://" + (tmp_ / "run/./ctl.sock");
  fs::create_directory_symlink(tmp_ / "run", tmp_ / "alias");
  for (const std::string& ep : {same, "ipc://" + (tmp_ / "alias/ctl.sock")}) {
    auto r = test::run_bin("ringllama-loaderd", daemon_args(ep, 2), 30);
    EXPECT_EQ(r.status, 1) << ep << "\n" << r.err;
    EXPECT_TRUE(r.err.find("a daemon answers on") != std::string::npos ||
                r.err.find("another loaderd") != std::string::npos)
        << r.err;
  }
  // With another lock directory the lock cannot tell: the live socket does.
  fs::create_directory(tmp_ / "locks2");
  std::vector<std::string> args = daemon_args(same, 2);
  args.back() = tmp_ / "locks2";
  auto r = test::run_bin("ringllama-loaderd", args, 30);
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_NE(r.err.find("a daemon answers on"), std::string::npos) << r.err;

  EXPECT_TRUE(d->running());
  EXPECT_TRUE(fs::exists(tmp_ / "run/ctl.sock"));
  EXPECT_TRUE(test::daemon_stats(control_).is_object()) << "the first daemon lost its socket";
  auto a = start_client("a");
  EXPECT_EQ(a->wait(30000), 0) << a->log();
  d->signal(SIGTERM);
  EXPECT_EQ(d->wait(10000), 0);
  EXPECT_FALSE(fs::exists(tmp_ / "run/ctl.sock"));
  EXPECT_FALSE(fs::exists(tmp_ / "run/ctl.sock-pub"));
}

// 9 and 2. A socket directory that does not exist is not made; one anyone may write is refused.
TEST_F(LoaderdHostile, SocketDirectoryMustExistAndBePrivate) {
  auto r = test::run_bin("ringllama-loaderd", daemon_args("ipc://" + (tmp_ / "nonexistent/c.sock"), 2), 30);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("does not exist"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(tmp_ / "nonexistent"));
  fs::create_directory(tmp_ / "open");
  ASSERT_EQ(::chmod((tmp_ / "open").c_str(), 0777), 0);
  r = test::run_bin("ringllama-loaderd", daemon_args("ipc://" + (tmp_ / "open/c.sock"), 2), 30);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("writable by every user"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(tmp_ / "open/c.sock"));
  // 5. The sockets are the user's only.
  auto d = start_daemon(2);
  struct stat st {};
  ASSERT_EQ(::stat((tmp_ / "run/ctl.sock").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(::stat((tmp_ / "run/ctl.sock-pub").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(::stat(("/dev/shm" + Segment::shm_name(instance_id_for(control_))).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

// 8. The PUB socket is bound first: when the control socket then fails, its file goes too.
TEST_F(LoaderdHostile, FailedControlBindLeavesNoPubSocket) {
  Config c;
  c.store = store_;
  c.control = control_;
  c.cpu_cap_layers = 2;
  ConfigLoader(kLoaderd).adapt_to_model(c, Store::open(store_).manifest().model);
  LoaderdOptions o;
  o.mlock = MlockMode::Warn;
  o.lock_dir = tmp_ / "locks";
  controls_.push_back(control_);
  {
    Loaderd d(c, o);
    ASSERT_TRUE(d.fill(-1));
    fs::create_directory(tmp_ / "run/ctl.sock");  // appears while the window fills
    EXPECT_THROW(d.bind(), Error);
  }
  EXPECT_FALSE(fs::exists(tmp_ / "run/ctl.sock-pub"));
  EXPECT_TRUE(fs::is_directory(tmp_ / "run/ctl.sock"));
}

void flip_byte(const std::string& path, uint64_t at) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(at));
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x5a);
  f.seekp(static_cast<std::streamoff>(at));
  f.write(&c, 1);
}

// 6. Every layer resident and one corrupt: no READY=1 (STATUS= says why), the slot is read again
// with a backoff, and once the file is repaired the daemon becomes ready and serves.
TEST_F(LoaderdHostile, CorruptResidentLayerIsRetriedAndReadyWaitsForIt) {
  const std::string want = reference();
  const Store store = Store::open(store_);
  const uint64_t at = store.manifest().ffn(1).offset + 100;
  flip_byte(store.weights_path(), at);
  const std::string sock = tmp_ / "notify.sock";
  const int fd = test::bind_notify_socket(sock);
  ASSERT_GE(fd, 0);
  auto d = std::make_unique<Proc>("ringllama-loaderd", daemon_args(control_, 8), tmp_ / "daemon.log",
                                  std::vector<std::string>{"NOTIFY_SOCKET=" + sock});
  bool ready = false, status = false;
  auto listen = [&](std::chrono::milliseconds span, bool until_status) {
    const auto end = Clock::now() + span;
    while (Clock::now() < end && !ready && !(until_status && status)) {
      char buf[1024];
      const ssize_t n = ::recv(fd, buf, sizeof buf - 1, 0);
      if (n <= 0) continue;
      const std::string m(buf, static_cast<size_t>(n));
      if (m.find("READY=1") != std::string::npos) ready = true;
      if (m.find("STATUS=not ready") != std::string::npos && m.find("layer 1") != std::string::npos) status = true;
    }
  };
  listen(std::chrono::seconds(20), true);
  ASSERT_TRUE(status) << d->log();
  ASSERT_TRUE(test::eventually(
      [&] { return d->log().find("reading layer 1 again (retry 2)") != std::string::npos; }, 10000))
      << d->log();
  listen(std::chrono::milliseconds(100), false);
  EXPECT_FALSE(ready) << "READY=1 with layer 1 in error:\n" << d->log();
  flip_byte(store.weights_path(), at);  // repaired
  const auto t0 = Clock::now();
  listen(std::chrono::seconds(15), false);
  ::close(fd);
  ASSERT_TRUE(ready) << d->log();
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(10));
  EXPECT_NE(d->log().find("layer 1 loaded after"), std::string::npos) << d->log();
  auto a = start_client("a");
  ASSERT_EQ(a->wait(30000), 0) << a->log();
  EXPECT_EQ(tokens("a"), want);
}

// 7. --cleanup removes what a killed daemon left and never what a live one holds.
TEST_F(LoaderdHostile, CleanupRemovesOnlyDeadDaemonsFiles) {
  const std::string other = "ipc://" + (tmp_ / "run/other.sock");
  auto live = std::make_unique<Proc>("ringllama-loaderd", daemon_args(other, 2), tmp_ / "live.log");
  ASSERT_TRUE(test::wait_daemon_ready(*live, other)) << live->log();
  {
    auto d = start_daemon(2, "killed.log");
    d->signal(SIGKILL);
    EXPECT_EQ(d->wait(5000), 128 + SIGKILL);
  }
  const std::string dead = Segment::shm_name(instance_id_for(control_));
  const std::string alive = Segment::shm_name(instance_id_for(other));
  ASSERT_TRUE(fs::exists("/dev/shm" + dead));
  ASSERT_TRUE(fs::exists(tmp_ / "locks" + dead + ".lock"));
  auto r = test::run_bin("ringllama-loaderd", {"--cleanup", "--lock-dir", tmp_ / "locks"}, 30);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_FALSE(fs::exists("/dev/shm" + dead));
  EXPECT_FALSE(fs::exists(tmp_ / "locks" + dead + ".lock"));
  EXPECT_NE(r.out.find(dead + ": removed /dev/shm" + dead), std::string::npos) << r.out;
  EXPECT_TRUE(fs::exists("/dev/shm" + alive));
  EXPECT_TRUE(fs::exists(tmp_ / "locks" + alive + ".lock"));
  EXPECT_NE(r.out.find(fmt::format("{}: kept: a live daemon (pid {})", alive, live->pid())), std::string::npos)
      << r.out;
  EXPECT_TRUE(test::daemon_stats(other).is_object());
}

}  // namespace
}  // namespace ringllama
