// The worker's metrics in Prometheus' text exposition format 0.0.4 (DESIGN.md "Metrics"), served on
// the HTTP side's GET /metrics.
//
// MetricsRegistry is a small thread-safe registry: counters, gauges and fixed-bucket histograms,
// each a family with label names, a child per tuple of label values. Observations are lock-free for
// counters and gauges (atomics) and take a histogram's own mutex, so that a scrape never sees a
// bucket count that disagrees with _count. render() runs the scrape hooks (gauges read from the
// scheduler's last published stats), then writes every family in registration order.
//
// WorkerMetrics is what ringllama-worker exports on top of it: the scheduler's observation points
// (requests by outcome, tokens, steps, TTFT/TPOT/latency histograms), both front doors' refusals, and
// at scrape time the gauges and the link figures of the stats JSON (KV blocks, running and waiting
// sequences, the CUDA backend's H2D bytes and seconds, waits on the weight source, the daemon
// window's position).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "common/protocol.h"

namespace ringllama {

class Counter {
 public:
  // Adds v (>= 0: a counter never goes down; a negative v throws Error).
  void inc(double v = 1.0);
  // For a total kept elsewhere (the backend's bytes streamed): takes v when it is above the value,
  // so that the counter stays monotone even if the source restarts from zero.
  void raise_to(double v);
  double value() const { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> v_{0.0};
};

class Gauge {
 public:
  void set(double v) { v_.store(v, std::memory_order_relaxed); }
  void add(double v);
  double value() const { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> v_{0.0};
};

class Histogram {
 public:
  // `bounds`: the buckets' upper bounds, strictly increasing and finite (+Inf is implied).
  explicit Histogram(std::vector<double> bounds);
  void observe(double v);
  struct Snapshot {
    std::vector<double> bounds;
    std::vector<uint64_t> cumulative;  // per bound: observations <= it
    uint64_t count = 0;                // all observations (the +Inf bucket)
    double sum = 0;
  };
  Snapshot snapshot() const;

 private:
  const std::vector<double> bounds_;
  mutable std::mutex mu_;
  std::vector<uint64_t> counts_;  // per bound, not cumulative; the last entry: above every bound
  double sum_ = 0;
};

// Bounds start, start*factor, ... (n of them), as Prometheus' ExponentialBuckets.
std::vector<double> exponential_buckets(double start, double factor, int n);

enum class MetricType { Counter, Gauge, Histogram };

template <typename M>
class Family;

class MetricsRegistry {
 public:
  MetricsRegistry();
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;
  ~MetricsRegistry();

  // Registers a family. Names follow Prometheus' rules ([a-zA-Z_:][a-zA-Z0-9_:]*, counters end in
  // _total); label names are [a-zA-Z_][a-zA-Z0-9_]*, not reserved (__*, and le for a histogram).
  // A bad or repeated name throws Error. The references stay valid for the registry's lifetime.
  Family<Counter>& counter(const std::string& name, const std::string& help, std::vector<std::string> labels = {});
  Family<Gauge>& gauge(const std::string& name, const std::string& help, std::vector<std::string> labels = {});
  Family<Histogram>& histogram(const std::string& name, const std::string& help, std::vector<double> bounds,
                               std::vector<std::string> labels = {});

  // Runs before every render(), in the order added (fills gauges read at scrape time).
  void on_scrape(std::function<void()> hook);
  // The text exposition (format 0.0.4) of every family.
  std::string render() const;

 private:
  struct Entry;
  Entry& add(const std::string& name, const std::string& help, MetricType type, std::vector<std::string> labels);
  mutable std::mutex mu_;  // the families list and the hooks (each family has its own lock)
  std::vector<std::unique_ptr<Entry>> entries_;
  std::vector<std::function<void()>> hooks_;
};

// One family: a child per tuple of label values, made on first use.
template <typename M>
class Family {
 public:
  // The child for these label values, in the order of the family's label names (a count that
  // differs throws Error). Cheap enough per request; keep the reference for hot paths.
  M& with(const std::vector<std::string>& values);
  // The child of a family without labels.
  M& get() { return with({}); }
  const std::vector<std::string>& label_names() const { return labels_; }

 private:
  friend class MetricsRegistry;
  Family(std::string name, std::vector<std::string> labels, std::vector<double> bounds = {})
      : name_(std::move(name)), labels_(std::move(labels)), bounds_(std::move(bounds)) {}
  const std::string name_;
  const std::vector<std::string> labels_;
  const std::vector<double> bounds_;  // histograms
  mutable std::mutex mu_;
  std::map<std::vector<std::string>, std::unique_ptr<M>> children_;
  // For render(): every child with its label values, under the family's lock.
  template <typename F>
  void each(F f) const {
    std::lock_guard<std::mutex> lk(mu_);
    for (const auto& [values, child] : children_) f(values, *child);
  }
};

// A label value or HELP text as the exposition writes it: backslash, double quote (label values
// only) and newline escaped.
std::string escape_label_value(std::string_view v);
std::string escape_help(std::string_view v);
// A sample value: shortest round-trip decimal, +Inf, -Inf, NaN.
std::string format_value(double v);

// ---- what ringllama-worker exports ----

struct WorkerMetricsInfo {
  std::string model;    // the served model's name
  std::string backend;  // cpu, cuda
  std::string name;     // the worker's name
  std::string weights;  // store, daemon
};

class WorkerMetrics {
 public:
  // `stats`: the scheduler's last published stats (Scheduler::stats()), read at scrape time for
  // the gauges and the backend's link figures; may be empty.
  WorkerMetrics(const WorkerMetricsInfo& info, std::function<nlohmann::json()> stats);

  // "http" for a client id the HTTP side made ("http:...", worker/zmq_server.h kHttpClientPrefix), else "zmq".
  static const char* api_of(std::string_view client);

  // ---- observation points (any thread) ----
  // A request's end: outcome finished, cancelled, dropped or failed (the scheduler's); for finished
  // ones the end-to-end latency and the mean time per output token (tokens > 1) too.
  void request_ended(const char* outcome, const char* api, double e2e_seconds, int64_t tokens, double tpot_seconds);
  // A request refused before the scheduler saw it: outcome rejected_bad (bad_request),
  // rejected_overloaded or rejected_unavailable (internal counts as rejected_bad).
  void request_rejected(ErrorCode code, const char* api);
  void first_token(double ttft_seconds);
  void prompt_tokens(int64_t n);
  // One step: its wall time, the tokens it ran (prompt chunks and decode tokens) and the tokens it
  // generated.
  void step(double seconds, int64_t tokens_run, int64_t tokens_generated);

  std::string render() const { return registry_.render(); }
  MetricsRegistry& registry() { return registry_; }

 private:
  void scrape();
  MetricsRegistry registry_;
  std::function<nlohmann::json()> stats_;
  Family<Counter>& requests_;
  Counter &prompt_tokens_, &completion_tokens_, &steps_;
  Histogram &ttft_, &tpot_, &e2e_, &step_seconds_, &step_tokens_;
  Gauge &running_, &waiting_, &kv_used_, &kv_total_, &kv_reserved_;
  Counter &h2d_bytes_, &h2d_seconds_, &cpu_bytes_, &cpu_seconds_, &passes_, &stalls_, &stall_seconds_, &reg_waits_, &reg_wait_seconds_;
  Gauge &resident_layers_, &streamed_layers_;
  Gauge &window_position_, &window_pass_;
  Counter &window_waits_, &window_wait_seconds_;
};

}  // namespace ringllama
