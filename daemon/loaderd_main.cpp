// ringllama-loaderd: the resident loader daemon (DESIGN.md "Processes and folders").
//
//   ringllama-loaderd --store DIR [--config FILE] [--control ENDPOINT] [--cpu-cap-layers N] ...
//   ringllama-loaderd --stats [--control ENDPOINT]     print a running daemon's stats (JSON)
//   ringllama-loaderd --bench --store DIR [...]        window fill vs a plain O_DIRECT read
//   ringllama-loaderd --cleanup [--lock-dir DIR]       remove segments and locks no live daemon holds
//
// SIGTERM and SIGINT stop it cleanly: the reads in flight land, the segment, its lock file and the
// socket files are removed (those it made, checked by inode), exit 0. Under systemd (Type=notify) it
// says READY=1 once the globals and the first window are loaded without an error (a slot in error
// is read again with a backoff; STATUS= says which) and pings the watchdog at half of WatchdogSec.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <zmq.hpp>

#include "common/config.h"
#include "common/errors.h"
#include "common/host_plan.h"
#include "common/log.h"
#include "common/protocol.h"
#include "common/service.h"
#include "common/store.h"
#include "daemon/loaderd.h"
#include "daemon/loaderd_bench.h"
#include "daemon/loaderd_cleanup.h"

namespace ringllama {
namespace {

MlockMode parse_mlock(const std::string& s) {
  if (s == "require") return MlockMode::Require;
  if (s == "warn") return MlockMode::Warn;
  if (s == "off") return MlockMode::Off;
  fail("--mlock '{}' is unknown (require, warn, off)", s);
}

int query_stats(const std::string& control) {
  zmq::context_t ctx(1);
  zmq::socket_t s(ctx, zmq::socket_type::dealer);
  s.set(zmq::sockopt::linger, 0);
  s.connect(control);
  s.send(zmq::buffer(encode(ControlRequest{StatsRequest{}})), zmq::send_flags::none);
  zmq::pollitem_t item{static_cast<void*>(s), 0, ZMQ_POLLIN, 0};
  if (zmq::poll(&item, 1, std::chrono::milliseconds(3000)) == 0)
    fail("no reply from the loader daemon at {} within 3 s: is ringllama-loaderd running?", control);
  zmq::message_t msg;
  (void)s.recv(msg, zmq::recv_flags::none);
  const ControlReply r = parse_control_reply(msg.to_string());
  if (const auto* e = std::get_if<ControlError>(&r)) fail("the loader daemon refused: {}", e->message);
  const auto* st = std::get_if<StatsReply>(&r);
  if (!st) fail("the loader daemon answered stats with something else");
  std::printf("%s\n", st->stats.dump(2).c_str());
  return 0;
}

int run(int argc, char** argv) {
  CLI::App app{"Fill the shared-memory ring window from a packed store and serve the workers",
               "ringllama-loaderd"};
  ConfigLoader loader(kLoaderd);
  loader.add_flags(app);
  std::string mlock = "require";
  LoaderdOptions opt;
  bool stats = false, bench = false, no_drop = false, plan_only = false, cleanup = false;
  HostOverrides host;
  int rounds = 1;
  app.add_option("--instance", opt.instance_id, "segment instance id (default: from the control endpoint)");
  app.add_option("--mlock", mlock, "lock the segment in memory: require, warn or off")->capture_default_str();
  app.add_option("--lock-dir", opt.lock_dir,
                 "folder of the segment's lock file, the daemon's own (default: $RUNTIME_DIRECTORY, /run/ringllama "
                 "for root, $XDG_RUNTIME_DIR/ringllama, else /tmp/ringllama-<uid>)");
  app.add_flag("--cleanup", cleanup,
               "remove the segments and lock files that no live daemon holds (one a daemon killed left), and exit");
  app.add_flag("--stats", stats, "print the stats of the daemon on --control and exit");
  app.add_flag("--bench", bench, "measure the window fill against a plain O_DIRECT read of weights.bin, and exit");
  app.add_option("--bench-rounds", rounds, "with --bench: rounds of both reads")->capture_default_str();
  app.add_flag("--bench-no-drop", no_drop, "with --bench: do not drop the page cache before each read");
  app.add_flag("--plan-only", plan_only, "print the host plan (window, memory, the disk's bound) and exit");
  host.add_flags(app);
  if (const std::optional<int> done = parse_command_line(app, argc, argv)) return *done;
  opt.mlock = parse_mlock(mlock);

  // Nothing the daemon creates is for other users unless it says so (access_group, set explicitly
  // with chmod): no file appears with a looser mode between its creation and its chmod.
  ::umask(077);
  Config config = loader.load();
  init_logging("ringllama-loaderd", config.verbose);
  if (cleanup) {
    const auto items = cleanup_stale_segments(opt.lock_dir);
    for (const auto& it : items) std::printf("%s: %s\n", it.name.c_str(), it.what.c_str());
    if (items.empty()) std::printf("no ringllama segments or lock files\n");
    return 0;
  }
  // inproc:// lives inside one process: no worker could ever reach the daemon there.
  if (config.control.rfind("inproc://", 0) == 0)
    fail("control {}: an inproc endpoint cannot be reached from another process; use ipc:// or tcp://",
         config.control);
  if (stats) return query_stats(config.control);
  if (config.store.empty()) {
    if (loader.print_requested()) {
      std::fputs(loader.describe(config).c_str(), stdout);
      return 0;
    }
    fail("no store: pass --store DIR (or set store in the config file or RINGLLAMA_STORE)");
  }
  const Manifest manifest = Manifest::load(config.store + "/" + kManifestFile);
  loader.adapt_to_model(config, manifest.model);
  if (loader.print_requested()) {
    std::fputs(loader.describe(config).c_str(), stdout);
    return 0;
  }
  // The host plan, before the segment exists: the window sized (auto) or checked (explicit)
  // (RLIMIT_MEMLOCK counts with --mlock require only: warn goes on unlocked, off never locks)
  // against MemAvailable and the memlock limit, and the disk's bound on a step.
  const HostPlan plan =
      host_plan_at_start(manifest, config, host, opt.mlock == MlockMode::Require, 0, "the workers' link", 0, false);
  fmt::print(plan_only ? stdout : stderr, "{}", plan.table());
  if (plan_only) return 0;
  if (bench) {
    opt.serve = false;  // binds nothing: --control only names the segment
    return run_loaderd_bench(config, opt, rounds, !no_drop);
  }

  const int stop_fd = stop_signal_fd();
  Loaderd d(config, opt);
  if (!d.fill(stop_fd)) {
    service_notify("STOPPING=1");
    return 0;
  }
  d.bind();
  const uint64_t wd = service_watchdog_usec();
  const int64_t tick_ms = wd ? std::max<int64_t>(1, static_cast<int64_t>(wd / 2000)) : 1000;
  // READY=1 only once no slot is in error: a unit that is "active" must serve every layer. Until
  // then it serves (workers hear of the error at once) and says why in STATUS=.
  bool ready = false;
  std::string said;
  auto check_ready = [&] {
    if (ready) return;
    const std::string error = d.window_error();
    if (error.empty()) {
      ready = true;
      service_notify("READY=1\nSTATUS=serving");
      spdlog::info("ready{}", wd ? fmt::format(" (watchdog every {} ms)", tick_ms) : std::string());
    } else if (error != said) {
      said = error;
      service_notify(("STATUS=not ready, retrying: " + error).c_str());
      spdlog::warn("not ready: {}; the slot is read again with a backoff", error);
    }
  };
  check_ready();
  if (wd) service_notify("WATCHDOG=1");
  d.run(stop_fd, tick_ms, [&] {
    check_ready();
    if (wd) service_notify("WATCHDOG=1");
  });
  service_notify("STOPPING=1");
  spdlog::info("stopped: {} bytes read", d.stats().value("bytes_read", uint64_t(0)));
  return 0;
}

}  // namespace
}  // namespace ringllama

int main(int argc, char** argv) { return ringllama::run_main("ringllama-loaderd", ringllama::run, argc, argv); }
