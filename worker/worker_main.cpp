// ringllama-worker: serves clients over ZeroMQ and, with http_listen, over an OpenAI-compatible
// HTTP API (DESIGN.md "The worker"): continuous batching of many requests on one backend, weights
// from the loader daemon or from the store.
//
//   ringllama-worker --daemon ENDPOINT --listen ENDPOINT [--backend cpu|cuda] [--config FILE] ...
//   ringllama-worker --store DIR --listen ENDPOINT ...     no daemon: its own window, or the whole store
//
// Without --daemon and without --store on the command line, the daemon at `control` is used (a
// `store` key in the config file shared with the daemon is checked against the daemon's store). The engine thread runs the
// steps (worker/scheduler.h); the main thread serves the ROUTER socket (worker/zmq_server.h).
// SIGTERM/SIGINT drain: new requests get `unavailable`, those in flight run for at most
// drain_timeout_ms, then exit 0. When the daemon dies, the requests in flight get `unavailable` and
// the exit status is 1 (systemd restarts the worker after the daemon). Under systemd (Type=notify):
// READY=1 once the socket is bound, WATCHDOG=1 while the engine thread goes round, STOPPING=1.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <future>
#include <optional>
#include <thread>
#include <tuple>

#include "common/chat_template.h"
#include "common/config.h"
#include "common/errors.h"
#include "common/log.h"
#include "common/store.h"
#include "common/tokenizer.h"
#include "worker/backend_choice.h"
#include "worker/admission.h"
#include "worker/daemon_weights.h"
#include "worker/http_server.h"
#include "worker/metrics.h"
#include "worker/openai_api.h"
#include "worker/scheduler.h"
#include "common/service.h"
#include "worker/zmq_server.h"
#ifdef RINGLLAMA_HAVE_CUDA
#include "worker/cuda_backend.h"
#endif

namespace ringllama {
namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

// The CUDA backend's streaming figures for stats: bytes per pass and the copy stream's rate.
SchedulerOptions scheduler_options() {
  SchedulerOptions o;
#ifdef RINGLLAMA_HAVE_CUDA
  o.backend_stats = [](const Backend& b) -> nlohmann::json {
    CudaStreamReport sr;
    if (!cuda_stream_report(b, &sr)) return nullptr;
    return {{"n_layers", sr.n_layers},
            {"resident_layers", sr.resident_layers},
            {"attn_buffers", sr.attn_buffers},
            {"ffn_buffers", sr.ffn_buffers},
            {"graphs", sr.graphs},
            {"passes", sr.passes},
            {"bytes", sr.bytes},
            {"bytes_per_pass", sr.passes > 0 ? sr.bytes / sr.passes : 0},
            {"copy_seconds", sr.copy_seconds},
            {"copy_gb_per_s", sr.gb_per_s()},
            {"source_stalls", sr.source_stalls},
            {"source_wait_seconds", sr.source_wait_seconds},
            {"event_syncs", sr.event_syncs},
            {"registration_waits", sr.registration_waits},
            {"registration_wait_seconds", sr.registration_wait_seconds},
            {"hybrid", sr.hybrid},
            {"gpu_fraction", sr.gpu_fraction},
            {"cpu_bytes", sr.cpu_bytes},
            {"cpu_seconds", sr.cpu_seconds},
            {"cpu_join_wait_seconds", sr.cpu_join_wait_seconds},
            {"cpu_gb_per_s", sr.cpu_seconds > 0 ? double(sr.cpu_bytes) / sr.cpu_seconds * 1e-9 : 0.0}};
  };
#endif
  return o;
}

int run(int argc, char** argv) {
  CLI::App app{"Serve generation requests over ZeroMQ with continuous batching", "ringllama-worker"};
  ConfigLoader loader(kWorker);
  loader.add_flags(app);
  std::string daemon, backend_name, name, chat_template;
  app.add_option("--daemon", daemon,
                 "read the weights from the loader daemon at this control endpoint (default without --store: "
                 "the `control` key)");
  app.add_option("--backend", backend_name, "cpu or cuda (default: cuda where a GPU is visible, else cpu)");
  app.add_option("--name", name, "this worker's name in the daemon's stats (default: worker-<gpu>-<pid>)");
  app.add_option("--chat-template", chat_template,
                 fmt::format("the chat template for `messages` requests, by family ({}), instead of the store's",
                             chat_template_names()));
  if (const std::optional<int> done = parse_command_line(app, argc, argv)) return *done;
  // Declared first, destroyed last: how long the release of everything took once stopped (the
  // backend's device memory and host registrations, the daemon's goodbye), for restart figures.
  struct ReleaseTimer {
    std::optional<Clock::time_point> since;
    ~ReleaseTimer() {
      if (since) spdlog::info("released in {:.0f} ms", ms_since(*since));
    }
  } release_timer;
  Config config = loader.load();
  init_logging("ringllama-worker", config.verbose);
  for (const std::string& ep : {config.control, config.listen})
    if (ep.rfind("inproc://", 0) == 0)
      fail("{}: an inproc endpoint cannot be reached from another process; use ipc:// or tcp://", ep);
  // One config file serves the daemon and its workers, so a `store` key there does not make a
  // worker read the store itself: only --store on the command line does (without --daemon).
  // Otherwise the weights come from the daemon at `control`, and a `store` must be its store.
  const bool own_weights = daemon.empty() && loader.source("store").kind == "flag";
  if (daemon.empty() && !own_weights) daemon = config.control;
  if (loader.print_requested()) {
    std::fputs(loader.describe(config).c_str(), stdout);
    return 0;
  }
  // Before any thread starts: the CUDA driver's (the backend checks below start them), the daemon
  // source's sockets, the window's reader, the engine. A thread created with SIGTERM unblocked
  // takes the signal's default action (the process dies without draining).
  const int stop_fd = stop_signal_fd();
  if (backend_name.empty()) backend_name = default_backend();
  require_backend(backend_name);
  if (name.empty()) name = fmt::format("worker-{}-{}", config.gpu, ::getpid());
  if (!chat_template.empty()) named_chat_template(chat_template);  // a bad name fails now, not per request

  const auto t0 = Clock::now();
  std::future<void> device_ready = prepare_backend(backend_name, config.gpu);
  std::unique_ptr<WeightSource> weights;
  if (!daemon.empty()) {
    weights = open_daemon_weights(daemon, config, &config.store, name);
    const Store store = Store::open(config.store);
    loader.adapt_to_model(config, store.model());
  } else {
    const Store store = Store::open(config.store);
    loader.adapt_to_model(config, store.model());
    weights = open_local_weights(store, backend_name, config);
  }
  const double weights_ms = ms_since(t0);
  const ModelConfig model = weights->manifest().model;
  const std::string model_source = weights->manifest().source;
  // The tokenizer loads while the backend starts (a 128k-token tokenizer.json takes ~0.7 s).
  std::future<std::unique_ptr<Tokenizer>> tokenizer_ready =
      std::async(std::launch::async, [store = config.store] { return Tokenizer::from_store(store); });
  const auto t1 = Clock::now();
  device_ready.get();
  std::unique_ptr<Backend> backend = make_backend(backend_name, *weights, config);
  const double backend_ms = ms_since(t1);

  // Text in and out: the store's tokenizer and chat template, loaded once. Without them the worker
  // still serves prompt_ids, and text requests get bad_request saying why.
  ServerOptions so;
  std::unique_ptr<Tokenizer> tokenizer;
  std::optional<ChatTemplate> chat;
  try {
    tokenizer = tokenizer_ready.get();
  } catch (const Error& e) {
    so.no_tokenizer = fmt::format("this model's tokenizer cannot be used ({}): send prompt_ids", e.what());
    spdlog::warn("{}", so.no_tokenizer);
  }
  if (tokenizer) {
    try {
      chat = load_chat_template(config.store, chat_template);
    } catch (const Error& e) {
      so.no_chat_template = fmt::format("no chat template: {}", e.what());
      spdlog::info("`messages` requests will be refused: {}", e.what());
    }
  }
  if (chat && !tokenizer->token_id(chat->end_of_turn()))
    spdlog::warn("chat template {}: its end of turn {} is not a token of the tokenizer", chat->name(),
                 chat->end_of_turn());
  so.tokenizer = tokenizer.get();
  so.chat = chat ? &*chat : nullptr;

  Waker waker;
  SchedulerOptions sched = scheduler_options();
  sched.tokenizer = tokenizer.get();
  // What /metrics shows (worker/metrics.h): the scheduler's observations as they happen, and at
  // scrape time its last published stats.
  const Scheduler* published = nullptr;
  WorkerMetrics metrics({openai::model_name(model_source, config.store), backend->name(), name,
                         daemon.empty() ? "store" : "daemon"},
                        [&published] { return published ? published->stats() : nlohmann::json(); });
  sched.metrics = &metrics;
  Scheduler scheduler(*backend, *weights, std::move(sched), [&waker] { waker.wake(); });
  published = &scheduler;
  so.metrics = &metrics;
  so.listen = expand_listen(config);
  so.max_request_bytes = config.max_request_bytes;
  // One count of requests in flight for both front doors (ZeroMQ and HTTP).
  Admission admission(config.batch_size + config.queue_max);
  std::unique_ptr<HttpServer> http;
  so.http_replies = [&http](Outgoing&& o) {
    if (http) http->deliver(std::move(o));
  };
  so.drain_timeout_ms = config.drain_timeout_ms;
  so.limits = backend->limits();
  for (int64_t id : model.eos_ids) so.eos.insert(static_cast<int32_t>(id));
  so.info = {{"backend", backend->name()},
             {"pid", ::getpid()},
             {"name", name},
             {"weights", daemon.empty() ? "store" : "daemon " + daemon},
             {"store", config.store},
             {"n_layers", model.n_layers},
             {"vocab_size", model.vocab_size},
             {"max_context", config.max_context},
             {"batch_size", config.batch_size},
             {"queue_max", config.queue_max},
             {"tokenizer", tokenizer ? nlohmann::json(tokenizer->source()) : nlohmann::json()},
             {"chat_template", chat ? nlohmann::json(chat->name()) : nlohmann::json()}};
  ClientServer server(scheduler, waker, admission, so);
  const auto t2 = Clock::now();
  server.bind();
  // The HTTP API listens once the model is ready to serve, next to the ZeroMQ socket.
  if (!config.http_listen.empty()) {
    HttpOptions ho;
    std::tie(ho.host, ho.port) = split_host_port(config.http_listen);
    ho.api_key = config.api_key;
    ho.model = openai::model_name(model_source, config.store);
    ho.max_request_bytes = config.max_request_bytes;
    // A streaming response holds its thread: room for every request that can be in flight, and
    // a few more to answer the rest (429, /health, /metrics).
    ho.threads = std::min<int64_t>(admission.capacity() + 16, 1024);
    ho.metrics = [&metrics] { return metrics.render(); };
    http = std::make_unique<HttpServer>(scheduler, admission, so, ho);
    const int port = http->start();
    const bool bracket = ho.host.find(':') != std::string::npos;
    spdlog::info("http: listening on http://{}{}{}:{} (model '{}'{})", bracket ? "[" : "", ho.host, bracket ? "]" : "",
                 port, ho.model, ho.api_key.empty() ? "" : ", API key required");
  }
  const double bind_ms = ms_since(t2);

  int engine_code = 0;
  std::thread engine([&] {
    try {
      engine_code = scheduler.run();
    } catch (const std::exception& e) {
      spdlog::error("engine: {}", e.what());
      engine_code = 1;
    }
  });

  const uint64_t wd = service_watchdog_usec();
  const int64_t tick_ms = wd ? std::clamp<int64_t>(static_cast<int64_t>(wd / 2000), 1, 1000) : 1000;
  service_notify("READY=1\nSTATUS=serving");
  spdlog::info("ready: listening on {} ({} backend, batch_size {}, queue_max {}, max_context {}); started in {:.0f} ms "
               "(weights {:.0f} ms, backend {:.0f} ms, bind {:.0f} ms)",
               so.listen, backend->name(), config.batch_size, config.queue_max, config.max_context, ms_since(t0),
               weights_ms, backend_ms, bind_ms);
  // The watchdog is fed only while the engine thread goes round: a hung step stops the pings.
  const auto wd_period = std::chrono::microseconds(wd);
  server.run(
      stop_fd, tick_ms,
      [&] {
        if (wd && Clock::now() - scheduler.last_beat() < wd_period) service_notify("WATCHDOG=1");
      },
      [] { service_notify("STOPPING=1\nSTATUS=draining"); });
  if (http) {
    // Requests the stopped scheduler never took get unavailable; the responses being written end.
    http->close_pending("the worker is stopping");
    http->stop();
  }
  engine.join();
  service_notify("STOPPING=1");
  const nlohmann::json st = scheduler.stats();
  spdlog::info("stopped: {} requests finished, {} tokens generated in {} steps{}", st["requests"]["finished"].get<int64_t>(),
               st["tokens"]["generated"].get<int64_t>(), st["steps"].get<int64_t>(),
               engine_code ? " (the weights became unavailable)" : "");
  ::close(stop_fd);
  release_timer.since = Clock::now();
  return engine_code;
}

}  // namespace
}  // namespace ringllama

int main(int argc, char** argv) { return ringllama::run_main("ringllama-worker", ringllama::run, argc, argv); }
