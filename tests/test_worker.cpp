// ringllama-worker end to end, as real processes on the CPU backend: a random tiny store, a worker
// on it (its own weights, or a loader daemon's), clients over ZeroMQ. Tokens are compared with
// ringllama-generate's for the same prompt: batching, arrivals, cancels and hostile neighbours must
// never change them.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "common/segment.h"
#include "daemon/loaderd.h"
#include "tests/test_loaderd_proc.h"
#include "tests/test_util.h"
#include "tests/test_worker_proc.h"

namespace ringllama {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::Proc;
using test::WorkerClient;

// 24 layers of the tiny shape: a few milliseconds a step, so that a long generation is still
// running when the next client arrives, is cancelled or loses its daemon.
constexpr int kLayers = 24;

class Worker : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir();
    store_ = *dir_ / "tiny";
    const auto r = test::run_bin("ringllama-pack", {"--random", "tiny", "--layers", std::to_string(kLayers), "--out",
                                                    store_, "--quiet"}, 120);
    ASSERT_EQ(r.status, 0) << r.err;
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }

  void SetUp() override {
    listen_ = "ipc://" + (tmp_ / "worker.sock");
    control_ = "ipc://" + (tmp_ / "loaderd.sock");
  }
  void TearDown() override {
    std::error_code ec;
    const std::string shm = "/dev/shm" + Segment::shm_name(instance_id_for(control_));
    fs::remove(shm, ec);
    fs::remove(shm + ".lock", ec);
  }

  // A worker serving `listen` (the fixture's by default), on the store or on the daemon.
  std::unique_ptr<Proc> start_worker(const std::vector<std::string>& extra = {}, const std::string& log = "worker.log",
                                     bool daemon = false, std::string listen = {}) {
    if (listen.empty()) listen = listen_;
    std::vector<std::string> args{"--backend", "cpu", "--listen", listen, "--heartbeat-ms", "100"};
    if (daemon) args.insert(args.end(), {"--daemon", control_});
    else args.insert(args.end(), {"--store", store_});
    args.insert(args.end(), extra.begin(), extra.end());
    auto w = std::make_unique<Proc>("ringllama-worker", args, tmp_ / log);
    EXPECT_TRUE(test::eventually([&] { return !w->running() || w->log().find("info: ready") != std::string::npos; },
                                 30000) &&
                w->running())
        << "the worker did not come up:\n"
        << w->log();
    return w;
  }

  std::unique_ptr<Proc> start_daemon() {
    auto d = std::make_unique<Proc>("ringllama-loaderd",
                                    std::vector<std::string>{"--store", store_, "--control", control_,
                                                             "--cpu-cap-layers", "6", "--mlock", "warn",
                                                             "--heartbeat-ms", "100"},
                                    tmp_ / "daemon.log");
    EXPECT_TRUE(test::wait_daemon_ready(*d, control_)) << d->log();
    return d;
  }

  static std::vector<int64_t> reference(const std::vector<int64_t>& prompt, int64_t n,
                                        const std::vector<std::string>& extra = {}) {
    return test::reference_tokens(store_, prompt, n, extra);
  }

  static test::TempDir* dir_;
  static std::string store_;
  test::TempDir tmp_;
  std::string listen_, control_;
};

test::TempDir* Worker::dir_ = nullptr;
std::string Worker::store_;

const std::vector<int64_t> kPromptA{1, 2, 3, 4, 5};
const std::vector<int64_t> kPromptB{300, 17, 99};

// Two clients at once get what one-prompt runs give, greedy and sampled alike; done says why and
// how many.
TEST_F(Worker, ConcurrentClientsGetSequentialTokens) {
  const auto ref_a = reference(kPromptA, 40);
  const auto ref_b = reference(kPromptB, 30, {"--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--seed", "7"});
  auto w = start_worker();
  WorkerClient a(listen_), b(listen_);
  a.generate("a", kPromptA, 40);
  b.generate("b", kPromptB, 30, {{"temperature", 0.8}, {"top_k", 50}, {"top_p", 0.9}, {"seed", 7}});
  ASSERT_TRUE(a.wait_end("a")) << w->log();
  ASSERT_TRUE(b.wait_end("b")) << w->log();
  EXPECT_EQ(a["a"].tokens, ref_a);
  EXPECT_EQ(b["b"].tokens, ref_b);
  const json& done = a["a"].final;
  EXPECT_EQ(done["type"], "done") << done.dump();
  EXPECT_EQ(done["reason"], "length");
  EXPECT_EQ(done["usage"]["prompt_tokens"], 5);
  EXPECT_EQ(done["usage"]["completion_tokens"], 40);
  EXPECT_GT(done["timing"]["ttft_ms"].get<double>(), 0);
  EXPECT_FALSE(a.out_of_order() || a.after_final() || b.out_of_order() || b.after_final());
  // Both in one connection, too: ids are per connection.
  WorkerClient c(listen_);
  c.generate("a", kPromptA, 40);
  c.generate("b", kPromptB, 30, {{"temperature", 0.8}, {"top_k", 50}, {"top_p", 0.9}, {"seed", 7}});
  ASSERT_TRUE(c.wait_end("a") && c.wait_end("b"));
  EXPECT_EQ(c["a"].tokens, ref_a);
  EXPECT_EQ(c["b"].tokens, ref_b);
  const json s = c.ask("stats");
  EXPECT_EQ(s["stats"]["requests"]["finished"], 4) << s.dump();
  EXPECT_EQ(s["stats"]["kv_blocks"]["free"], s["stats"]["kv_blocks"]["total"]) << s.dump();
}

// A request that arrives while another is generating joins the running batch, its long prompt in
// chunks of prefill_chunk_tokens beside the other's decode tokens; neither's tokens change.
TEST_F(Worker, ArrivalMidGenerationChangesNoTokens) {
  std::vector<int64_t> long_prompt;
  for (int64_t i = 0; i < 300; ++i) long_prompt.push_back((i * 37 + 11) % 512);
  const std::vector<std::string> chunk{"--prefill-chunk-tokens", "32"};
  const auto ref_a = reference(kPromptA, 400, chunk);
  const auto ref_b = reference(long_prompt, 20, chunk);
  auto w = start_worker(chunk);
  // One connection, so that the replies come in the order they were made.
  WorkerClient c(listen_);
  WorkerClient& a = c;
  WorkerClient& b = c;
  a.generate("a", kPromptA, 400);
  ASSERT_TRUE(a.wait_tokens("a", 10));
  const size_t sent_at = c.replies().size();
  b.generate("b", long_prompt, 20);
  ASSERT_TRUE(b.wait_end("b")) << w->log();
  // a kept decoding while b's prompt went in over ten steps (one a token per step).
  size_t a_tokens = 0;
  for (size_t i = sent_at; i < c.replies().size() && c.replies()[i]["id"] != "b"; ++i) ++a_tokens;
  EXPECT_GE(a_tokens, 9u);
  EXPECT_FALSE(a["a"].ended()) << "a finished before b joined: the test proves nothing";
  ASSERT_TRUE(a.wait_end("a")) << w->log();
  EXPECT_EQ(a["a"].tokens, ref_a);
  EXPECT_EQ(b["b"].tokens, ref_b);
}

// Every kind of bad input gets its error reply, the worker stays up, and a generation running
// beside them keeps its tokens.
TEST_F(Worker, HostileInputsGetErrorsOthersContinue) {
  const auto ref = reference(kPromptA, 300);
  auto w = start_worker({"--max-request-bytes", "4096", "--max-context", "512"});
  WorkerClient good(listen_), bad(listen_);
  good.generate("g", kPromptA, 300);
  ASSERT_TRUE(good.wait_tokens("g", 3));
  struct Case {
    std::string frame, id, needle;
  };
  const std::string big(5000, ' ');
  const std::vector<Case> cases = {
      {"this is not json", "", "not valid JSON"},
      {"[1,2,3]", "", "one JSON object"},
      {R"({"id":"h0","prompt_ids":[1],"max_tokens":2})", "h0", "'op' is required"},
      {R"({"op":"generate","prompt_ids":[1],"max_tokens":2})", "", "'id' is required"},
      {R"({"op":"generate","id":"h1","prompt_ids":"1,2","max_tokens":2})", "h1", "'prompt_ids' must be an array"},
      {R"({"op":"generate","id":"h2","prompt_ids":[1],"max_tokens":"2"})", "h2", "'max_tokens' must be an integer"},
      {R"({"op":"generate","id":"h3","prompt_ids":[],"max_tokens":2})", "h3", "must not be empty"},
      {R"({"op":"generate","id":"h4","prompt_ids":[1,512],"max_tokens":2})", "h4", "outside the vocabulary"},
      {R"({"op":"generate","id":"h5","prompt_ids":[1,-3],"max_tokens":2})", "h5", "'prompt_ids'[1]"},
      {R"({"op":"generate","id":"h6","prompt_ids":[1,2],"max_tokens":511})", "h6", "over max_context (512)"},
      {R"({"op":"generate","id":"h7","prompt_ids":[1],"max_tokens":0})", "h7", "'max_tokens' must be in"},
      {R"({"op":"generate","id":"h8","prompt_ids":[1],"max_tokens":2,"temperature":-1})", "h8", "'temperature'"},
      {R"({"op":"generate","id":"h9","prompt_ids":[1],"max_tokens":2,"stop_ids":[9999]})", "h9", "'stop_ids'[0]"},
      {R"({"op":"generate","id":"h10","prompt_ids":[1],"max_tokens":2,"colour":"red"})", "h10", "unknown key"},
      {R"({"op":"launch","id":"h11"})", "h11", "unknown op"},
      {R"({"op":"generate","id":"h12","prompt_ids":[1],"max_tokens":2,"pad":")" + big + R"("})", "", "over max_request_bytes"},
      {std::string(40, '[') + std::string(40, ']'), "", "nested deeper"},
      {"", "", "empty frame"},
      {R"({"op":"generate","id":"g","prompt_ids":[1],"max_tokens":2})", "g", ""},  // g is in flight on `good` only
  };
  for (const Case& c : cases) bad.send_raw(c.frame);
  // A duplicate id on one connection.
  bad.generate("dup", kPromptB, 200);
  bad.generate("dup", kPromptB, 2);
  // Every case but the last is an error; the duplicate is the other one.
  auto errors = [&] {
    size_t n = 0;
    for (const json& r : bad.replies()) n += r["type"] == "error";
    return n;
  };
  ASSERT_TRUE(bad.until([&] { return errors() >= cases.size() && bad["g"].ended(); }, 20000)) << w->log();
  EXPECT_EQ(errors(), cases.size());
  for (const json& r : bad.replies()) {
    if (r["type"] == "error") {
      EXPECT_EQ(r["code"], "bad_request") << r.dump();
    }
  }
  for (const Case& c : cases) {
    if (c.needle.empty()) continue;
    bool found = false;
    for (const json& r : bad.replies())
      if (r["type"] == "error" && r["message"].get<std::string>().find(c.needle) != std::string::npos &&
          (c.id.empty() || r["id"] == c.id))
        found = true;
    EXPECT_TRUE(found) << "no error naming '" << c.needle << "' for " << c.frame.substr(0, 80);
  }
  bool dup_refused = false;
  for (const json& r : bad.replies())
    if (r["type"] == "error" && r["id"] == "dup") dup_refused = r["message"].get<std::string>().find("already in flight") != std::string::npos;
  EXPECT_TRUE(dup_refused);
  ASSERT_TRUE(good.wait_end("g")) << w->log();
  EXPECT_EQ(good["g"].tokens, ref);
  // The first "dup" runs to its end; its refused twin's error shares the id.
  auto dup_done = [&] {
    for (const json& r : bad.replies())
      if (r["type"] == "done" && r["id"] == "dup") return true;
    return false;
  };
  EXPECT_TRUE(bad.until(dup_done, 30000));
  EXPECT_EQ(bad["dup"].tokens.size(), 200u);
  EXPECT_TRUE(w->running());
  EXPECT_EQ(bad.ask("health")["status"], "ok");
}

// A cancel stops the generation at the next step: done with reason cancelled, no token after it,
// its blocks back in the pool. A cancel for an id not in flight is ignored.
TEST_F(Worker, CancelStopsAtTheNextStep) {
  auto w = start_worker();
  WorkerClient c(listen_);
  c.generate("long", kPromptA, 1500);
  ASSERT_TRUE(c.wait_tokens("long", 5));
  c.send({{"op", "cancel"}, {"id", "long"}});
  c.send({{"op", "cancel"}, {"id", "never-sent"}});
  ASSERT_TRUE(c.wait_end("long", 10000));
  const json& d = c["long"].final;
  EXPECT_EQ(d["type"], "done") << d.dump();
  EXPECT_EQ(d["reason"], "cancelled");
  EXPECT_LT(c["long"].tokens.size(), 1500u);
  EXPECT_EQ(d["usage"]["completion_tokens"].get<size_t>(), c["long"].tokens.size());
  c.pump(200);
  EXPECT_FALSE(c.after_final());
  const json s = c.ask("stats")["stats"];
  EXPECT_EQ(s["requests"]["cancelled"], 1) << s.dump();
  EXPECT_EQ(s["requests"]["running"], 0) << s.dump();
  EXPECT_EQ(s["kv_blocks"]["free"], s["kv_blocks"]["total"]) << s.dump();
}

// A client that disconnects mid-generation frees its sequence; the worker goes on serving.
TEST_F(Worker, VanishedClientFreesItsSequence) {
  auto w = start_worker();
  {
    WorkerClient gone(listen_);
    gone.generate("x", kPromptA, 1500);
    ASSERT_TRUE(gone.wait_tokens("x", 3));
    gone.close();
  }
  WorkerClient c(listen_);
  json s;
  ASSERT_TRUE(test::eventually(
      [&] {
        s = c.ask("stats")["stats"];
        return s.is_object() && s["requests"]["abandoned"] == 1 && s["requests"]["running"] == 0;
      },
      10000))
      << s.dump() << w->log();
  EXPECT_EQ(s["kv_blocks"]["free"], s["kv_blocks"]["total"]);
  EXPECT_EQ(s["server"]["clients_gone"], 1);
  c.generate("y", kPromptB, 10);
  ASSERT_TRUE(c.wait_end("y"));
  EXPECT_EQ(c["y"].tokens, reference(kPromptB, 10));
}

// Past batch_size requests wait in the queue; past queue_max they get overloaded at once, a flood
// included; the admitted ones all finish.
TEST_F(Worker, QueueFullGetsOverloaded) {
  auto w = start_worker({"--batch-size", "1", "--queue-max", "2"});
  WorkerClient c(listen_);
  for (int i = 0; i < 3; ++i) c.generate("r" + std::to_string(i), kPromptA, 60);
  for (int i = 0; i < 50; ++i) c.generate("flood" + std::to_string(i), kPromptB, 5);
  ASSERT_TRUE(c.wait_end("r2")) << w->log();
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(c.wait_end("r" + std::to_string(i)));
    EXPECT_EQ(c["r" + std::to_string(i)].final["type"], "done");
  }
  ASSERT_TRUE(c.until([&] { return c["flood49"].ended(); }, 10000));
  int overloaded = 0;
  for (int i = 0; i < 50; ++i) {
    const json& f = c["flood" + std::to_string(i)].final;
    if (f["type"] == "error") {
      EXPECT_EQ(f["code"], "overloaded") << f.dump();
      ++overloaded;
    }
  }
  EXPECT_GE(overloaded, 45);
  EXPECT_EQ(c["r0"].tokens, reference(kPromptA, 60));
  EXPECT_EQ(c["r0"].tokens, c["r2"].tokens);
}

// SIGTERM drains: new requests get unavailable, the one in flight finishes, exit 0; past
// drain_timeout_ms the ones still running get unavailable.
TEST_F(Worker, SigtermDrains) {
  {
    auto w = start_worker();
    WorkerClient a(listen_), late(listen_);
    a.generate("a", kPromptA, 300);
    ASSERT_TRUE(a.wait_tokens("a", 3));
    w->signal(SIGTERM);
    ASSERT_TRUE(test::eventually([&] { return w->log().find("draining") != std::string::npos; }, 5000));
    late.generate("late", kPromptB, 5);
    ASSERT_TRUE(late.wait_end("late", 5000));
    EXPECT_EQ(late["late"].final["code"], "unavailable") << late["late"].final.dump();
    ASSERT_TRUE(a.wait_end("a", 30000));
    EXPECT_EQ(a["a"].final["type"], "done");
    EXPECT_EQ(a["a"].tokens, reference(kPromptA, 300));
    EXPECT_EQ(w->wait(10000), 0) << w->log();
  }
  {
    auto w = start_worker({"--drain-timeout-ms", "50"}, "worker2.log");
    WorkerClient a(listen_);
    a.generate("a", kPromptA, 1900);
    ASSERT_TRUE(a.wait_tokens("a", 3));
    w->signal(SIGTERM);
    ASSERT_TRUE(a.wait_end("a", 10000));
    EXPECT_EQ(a["a"].final["code"], "unavailable") << a["a"].final.dump();
    EXPECT_EQ(w->wait(10000), 0) << w->log();
  }
  // A second signal stops at once, whatever drain_timeout_ms says.
  auto w = start_worker({}, "worker3.log");
  WorkerClient a(listen_);
  a.generate("a", kPromptA, 1900);
  ASSERT_TRUE(a.wait_tokens("a", 3));
  w->signal(SIGTERM);
  ASSERT_TRUE(test::eventually([&] { return w->log().find("draining") != std::string::npos; }, 5000));
  w->signal(SIGINT);
  ASSERT_TRUE(a.wait_end("a", 10000));
  EXPECT_EQ(a["a"].final["code"], "unavailable") << a["a"].final.dump();
  EXPECT_EQ(w->wait(10000), 0) << w->log();
}

// A worker killed with SIGKILL is detached by the daemon; another worker on the same daemon goes on
// with unchanged tokens and takes new requests.
TEST_F(Worker, KilledWorkerIsDetachedAnotherContinues) {
  const auto ref = reference(kPromptA, 400);
  auto d = start_daemon();
  auto victim = start_worker({"--name", "victim"}, "victim.log", true, "ipc://" + (tmp_ / "victim.sock"));
  auto other = start_worker({"--name", "other"}, "other.log", true);
  WorkerClient v("ipc://" + (tmp_ / "victim.sock")), o(listen_);
  v.generate("v", kPromptA, 1900);
  o.generate("o", kPromptA, 400);
  ASSERT_TRUE(v.wait_tokens("v", 5)) << victim->log();
  ASSERT_TRUE(o.wait_tokens("o", 5)) << other->log();
  const pid_t vpid = victim->pid();
  victim->signal(SIGKILL);
  EXPECT_EQ(victim->wait(5000), 128 + SIGKILL);
  ASSERT_TRUE(o.wait_end("o", 60000)) << other->log() << d->log();
  EXPECT_EQ(o["o"].tokens, ref);
  o.generate("o2", kPromptB, 10);
  ASSERT_TRUE(o.wait_end("o2"));
  EXPECT_EQ(o["o2"].tokens, reference(kPromptB, 10));
  const json s = test::daemon_stats(control_);
  bool found = false;
  for (const auto& x : s["detached"]) found = found || x["pid"].get<int64_t>() == vpid;
  EXPECT_TRUE(found) << s.dump(2);
}

// When the daemon dies, the request in flight gets unavailable within a second and the worker exits
// non-zero; an idle worker notices too.
TEST_F(Worker, DaemonDeathFailsRequestsAndStopsWorkers) {
  auto d = start_daemon();
  auto busy = start_worker({"--name", "busy"}, "busy.log", true);
  // The idle one reads the file a systemd unit would give it: `store` there is the daemon's, and
  // the weights still come from the daemon at `control`.
  test::write_file(tmp_ / "ringllama.yaml", "store: " + store_ + "\ncontrol: " + control_ + "\n");
  auto idle = std::make_unique<Proc>("ringllama-worker",
                                     std::vector<std::string>{"--config", tmp_ / "ringllama.yaml", "--backend", "cpu",
                                                              "--listen", "ipc://" + (tmp_ / "idle.sock"), "--name",
                                                              "idle", "--heartbeat-ms", "100"},
                                     tmp_ / "idle.log");
  ASSERT_TRUE(test::eventually([&] { return idle->log().find("info: ready") != std::string::npos; }, 30000))
      << idle->log();
  const json ds = test::daemon_stats(control_);
  EXPECT_NE(ds.dump().find("\"idle\""), std::string::npos) << ds.dump(2);
  WorkerClient c(listen_);
  c.generate("a", kPromptA, 1900);
  ASSERT_TRUE(c.wait_tokens("a", 5)) << busy->log();
  const auto t0 = std::chrono::steady_clock::now();
  d->signal(SIGKILL);
  ASSERT_TRUE(c.wait_end("a", 5000)) << busy->log();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(c["a"].final["code"], "unavailable") << c["a"].final.dump();
  EXPECT_LT(s, 1.0);
  EXPECT_EQ(busy->wait(5000), 1) << busy->log();
  EXPECT_EQ(idle->wait(5000), 1) << idle->log();
  EXPECT_NE(idle->log().find("loader daemon died"), std::string::npos) << idle->log();
}

// sd_notify: READY=1 once serving, WATCHDOG=1 while the engine runs, STOPPING=1 on SIGTERM.
TEST_F(Worker, NotifiesSystemd) {
  const std::string sock = tmp_ / "notify.sock";
  const int fd = test::bind_notify_socket(sock);
  ASSERT_GE(fd, 0) << "cannot bind " << sock;
  Proc w("ringllama-worker", {"--backend", "cpu", "--listen", listen_, "--store", store_}, tmp_ / "worker.log",
         {"NOTIFY_SOCKET=" + sock, "WATCHDOG_USEC=200000", "WATCHDOG_PID=self"});
  bool ready = false, stopping = false;
  int watchdogs = 0;
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < end && !stopping) {
    char buf[512];
    const ssize_t n = ::recv(fd, buf, sizeof buf - 1, 0);
    if (n <= 0) continue;
    const std::string msg(buf, static_cast<size_t>(n));
    if (msg.find("READY=1") != std::string::npos) ready = true;
    if (msg.find("WATCHDOG=1") != std::string::npos && ++watchdogs == 3) w.signal(SIGTERM);
    if (msg.find("STOPPING=1") != std::string::npos) stopping = true;
  }
  ::close(fd);
  EXPECT_TRUE(ready) << w.log();
  EXPECT_GE(watchdogs, 3) << w.log();
  EXPECT_TRUE(stopping) << w.log();
  EXPECT_EQ(w.wait(10000), 0) << w.log();
}

// scripts/ringllama_client.py and scripts/bench_client.py against two workers
// (tests/worker_client_test.py holds the checks).
TEST_F(Worker, PythonClientAndBench) {
  if (std::system("python3 -c 'import zmq, matplotlib' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "python3 with pyzmq and matplotlib is needed (scripts/install-deps.sh installs them)";
  const std::string src = fs::canonical(test::data_dir() + "/../..").string();
  const auto ref = reference(kPromptA, 12);
  std::string ref_text;
  for (size_t i = 0; i < ref.size(); ++i) ref_text += (i ? "," : "") + std::to_string(ref[i]);
  const std::string ep_b = "ipc://" + (tmp_ / "b.sock");
  auto a = start_worker();
  auto b = start_worker({}, "worker_b.log", false, ep_b);
  const std::string log = tmp_ / "python.log";
  const std::string cmd = "python3 " + src + "/tests/worker_client_test.py " + src + "/scripts " + tmp_.path() + " " +
                          listen_ + " " + ep_b + " 1,2,3,4,5 " + ref_text + " > " + log + " 2>&1";
  const int rc = std::system(cmd.c_str());
  EXPECT_EQ(rc, 0) << test::read_file(log) << a->log() << b->log();
}

// Text in and out (tests/worker_text_test.py holds the checks): a worker on a copy of the store
// given a small tokenizer and Llama 3.2's chat template, another on the store without them.
TEST_F(Worker, TextAndChat) {
  if (std::system("python3 -c 'import zmq, tokenizers, jinja2' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "python3 with pyzmq, tokenizers and jinja2 is needed (scripts/install-deps.sh installs them)";
  const std::string src = fs::canonical(test::data_dir() + "/../..").string();
  const std::string text_store = tmp_ / "text-store", log = tmp_ / "python.log";
  const std::string tpl = test::data_dir() + "/chat_templates/llama32.json";
  fs::copy(store_, text_store, fs::copy_options::recursive);
  ASSERT_EQ(std::system(("python3 " + src + "/tests/make_test_tokenizer.py " + text_store + " 512 " + tpl + " > " + log +
                         " 2>&1").c_str()),
            0)
      << test::read_file(log);
  const std::string ep_text = "ipc://" + (tmp_ / "text.sock");
  auto plain = start_worker();
  Proc text("ringllama-worker", {"--backend", "cpu", "--listen", ep_text, "--store", text_store}, tmp_ / "text.log");
  ASSERT_TRUE(test::eventually([&] { return !text.running() || text.log().find("info: ready") != std::string::npos; },
                               30000) &&
              text.running())
      << text.log();
  const std::string cmd = "python3 " + src + "/tests/worker_text_test.py " + src + "/scripts " + test::bin_dir() + " " +
                          text_store + " " + store_ + " " + ep_text + " " + listen_ + " " + tpl + " > " + log + " 2>&1";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << test::read_file(log) << text.log() << plain->log();
}

}  // namespace
}  // namespace ringllama
