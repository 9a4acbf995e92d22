#include "worker/metrics.h"

#include <cmath>
#include <initializer_list>
#include <optional>
#include <type_traits>

#include "common/errors.h"
#include "common/log.h"

namespace ringllama {

namespace {

// std::atomic<double> has no fetch_add before C++20.
void atomic_add(std::atomic<double>& a, double v) {
  double cur = a.load(std::memory_order_relaxed);
  while (!a.compare_exchange_weak(cur, cur + v, std::memory_order_relaxed)) {
  }
}

bool name_char(char c, bool first, bool colon) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_') return true;
  if (colon && c == ':') return true;
  return !first && c >= '0' && c <= '9';
}

bool valid_name(const std::string& s, bool colon) {
  if (s.empty()) return false;
  for (size_t i = 0; i < s.size(); ++i)
    if (!name_char(s[i], i == 0, colon)) return false;
  return true;
}

const char* type_name(MetricType t) {
  switch (t) {
    case MetricType::Counter: return "counter";
    case MetricType::Gauge: return "gauge";
    default: return "histogram";
  }
}

// {a="x",b="y"} (with `extra` appended, e.g. le), or nothing when there are no labels.
std::string label_text(const std::vector<std::string>& names, const std::vector<std::string>& values,
                       const std::string& extra = {}) {
  if (names.empty() && extra.empty()) return {};
  std::string s = "{";
  for (size_t i = 0; i < names.size(); ++i) {
    if (i) s += ',';
    s += names[i] + "=\"" + escape_label_value(values[i]) + '"';
  }
  if (!extra.empty()) s += (names.empty() ? "" : ",") + extra;
  return s + '}';
}

}  // namespace

// ---- the instruments ----

void Counter::inc(double v) {
  if (!(v >= 0)) fail("a counter cannot go down (inc by {})", v);
  atomic_add(v_, v);
}

void Counter::raise_to(double v) {
  double cur = v_.load(std::memory_order_relaxed);
  while (v > cur && !v_.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}

void Gauge::add(double v) { atomic_add(v_, v); }

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {
  for (size_t i = 0; i < bounds_.size(); ++i) {
    if (!std::isfinite(bounds_[i])) fail("histogram bucket {}: bounds must be finite (+Inf is implied)", i);
    if (i && !(bounds_[i] > bounds_[i - 1])) fail("histogram bucket {}: bounds must increase", i);
  }
}

void Histogram::observe(double v) {
  // The first bucket whose bound is >= v (Prometheus' buckets are upper-inclusive); NaN lands in
  // +Inf only, as client_golang does.
  size_t i = 0;
  while (i < bounds_.size() && !(v <= bounds_[i])) ++i;
  std::lock_guard<std::mutex> lk(mu_);
  ++counts_[i];
  sum_ += v;
}

Histogram::Snapshot Histogram::snapshot() const {
  Snapshot s;
  s.bounds = bounds_;
  std::lock_guard<std::mutex> lk(mu_);
  uint64_t run = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) s.cumulative.push_back(run += counts_[i]);
  s.count = run + counts_.back();
  s.sum = sum_;
  return s;
}

std::vector<double> exponential_buckets(double start, double factor, int n) {
  if (!(start > 0) || !(factor > 1) || n < 1) fail("exponential buckets: start > 0, factor > 1 and n >= 1");
  std::vector<double> b;
  for (int i = 0; i < n; ++i, start *= factor) b.push_back(start);
  return b;
}

// ---- families ----

template <typename M>
M& Family<M>::with(const std::vector<std::string>& values) {
  if (values.size() != labels_.size())
    fail("metric {}: {} label values for {} label names", name_, values.size(), labels_.size());
  std::lock_guard<std::mutex> lk(mu_);
  std::unique_ptr<M>& child = children_[values];
  if (!child) {
    if constexpr (std::is_same_v<M, Histogram>) child = std::make_unique<Histogram>(bounds_);
    else child = std::make_unique<M>();
  }
  return *child;
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

struct MetricsRegistry::Entry {
  std::string name, help;
  MetricType type;
  std::unique_ptr<Family<Counter>> counter;
  std::unique_ptr<Family<Gauge>> gauge;
  std::unique_ptr<Family<Histogram>> histogram;
};

MetricsRegistry::MetricsRegistry() = default;
MetricsRegistry::~MetricsRegistry() = default;

MetricsRegistry::Entry& MetricsRegistry::add(const std::string& name, const std::string& help, MetricType type,
                                             std::vector<std::string> labels) {
  if (!valid_name(name, true)) fail("metric name '{}': use [a-zA-Z_:][a-zA-Z0-9_:]*", name);
  if (type == MetricType::Counter && (name.size() < 6 || name.compare(name.size() - 6, 6, "_total") != 0))
    fail("counter {}: a counter's name ends in _total", name);
  for (const std::string& l : labels) {
    if (!valid_name(l, false) || l.rfind("__", 0) == 0)
      fail("metric {}: label name '{}': use [a-zA-Z_][a-zA-Z0-9_]*, not starting with __", name, l);
    if (type == MetricType::Histogram && l == "le") fail("histogram {}: le is the bucket's label", name);
  }
  std::lock_guard<std::mutex> lk(mu_);
  for (const auto& e : entries_)
    if (e->name == name) fail("metric {} registered twice", name);
  auto e = std::make_unique<Entry>();
  e->name = name;
  e->help = help;
  e->type = type;
  entries_.push_back(std::move(e));
  return *entries_.back();
}

Family<Counter>& MetricsRegistry::counter(const std::string& name, const std::string& help,
                                          std::vector<std::string> labels) {
  Entry& e = add(name, help, MetricType::Counter, labels);
  e.counter.reset(new Family<Counter>(name, std::move(labels)));
  if (e.counter->label_names().empty()) e.counter->get();  // a family without labels shows its 0
  return *e.counter;
}

Family<Gauge>& MetricsRegistry::gauge(const std::string& name, const std::string& help,
                                      std::vector<std::string> labels) {
  Entry& e = add(name, help, MetricType::Gauge, labels);
  e.gauge.reset(new Family<Gauge>(name, std::move(labels)));
  if (e.gauge->label_names().empty()) e.gauge->get();
  return *e.gauge;
}

Family<Histogram>& MetricsRegistry::histogram(const std::string& name, const std::string& help,
                                              std::vector<double> bounds, std::vector<std::string> labels) {
  Histogram check(bounds);  // bad bounds fail here, not at the first observation
  Entry& e = add(name, help, MetricType::Histogram, labels);
  e.histogram.reset(new Family<Histogram>(name, std::move(labels), std::move(bounds)));
  if (e.histogram->label_names().empty()) e.histogram->get();
  return *e.histogram;
}

void MetricsRegistry::on_scrape(std::function<void()> hook) {
  std::lock_guard<std::mutex> lk(mu_);
  hooks_.push_back(std::move(hook));
}

std::string MetricsRegistry::render() const {
  std::vector<std::function<void()>> hooks;
  {
    std::lock_guard<std::mutex> lk(mu_);
    hooks = hooks_;
  }
  for (const auto& h : hooks) {
    try {
      h();
    } catch (const std::exception& ex) {  // a scrape still shows what the observations counted
      spdlog::warn("metrics: a scrape hook failed: {}", ex.what());
    }
  }
  std::string out;
  std::lock_guard<std::mutex> lk(mu_);
  for (const auto& e : entries_) {
    out += "# HELP " + e->name + ' ' + escape_help(e->help) + '\n';
    out += "# TYPE " + e->name + ' ' + type_name(e->type) + '\n';
    if (e->counter) {
      e->counter->each([&](const std::vector<std::string>& v, const Counter& c) {
        out += e->name + label_text(e->counter->label_names(), v) + ' ' + format_value(c.value()) + '\n';
      });
    } else if (e->gauge) {
      e->gauge->each([&](const std::vector<std::string>& v, const Gauge& g) {
        out += e->name + label_text(e->gauge->label_names(), v) + ' ' + format_value(g.value()) + '\n';
      });
    } else {
      const auto& names = e->histogram->label_names();
      e->histogram->each([&](const std::vector<std::string>& v, const Histogram& h) {
        const Histogram::Snapshot s = h.snapshot();
        for (size_t i = 0; i < s.bounds.size(); ++i)
          out += e->name + "_bucket" + label_text(names, v, "le=\"" + format_value(s.bounds[i]) + '"') + ' ' +
                 std::to_string(s.cumulative[i]) + '\n';
        out += e->name + "_bucket" + label_text(names, v, "le=\"+Inf\"") + ' ' + std::to_string(s.count) + '\n';
        out += e->name + "_sum" + label_text(names, v) + ' ' + format_value(s.sum) + '\n';
        out += e->name + "_count" + label_text(names, v) + ' ' + std::to_string(s.count) + '\n';
      });
    }
  }
  return out;
}

std::string escape_label_value(std::string_view v) {
  std::string s;
  s.reserve(v.size());
  for (char c : v) {
    if (c == '\\') s += "\\\\";
    else if (c == '"') s += "\\\"";
    else if (c == '\n') s += "\\n";
    else s += c;
  }
  return s;
}

std::string escape_help(std::string_view v) {
  std::string s;
  for (char c : v) {
    if (c == '\\') s += "\\\\";
    else if (c == '\n') s += "\\n";
    else s += c;
  }
  return s;
}

std::string format_value(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  return fmt::format("{}", v);
}

// ---- ringllama-worker's metrics ----

namespace {

// A number at `path` in the stats JSON, or nullopt where the stats do not carry it (no stream
// report on the CPU backend, no window without a daemon).
std::optional<double> num(const nlohmann::json& j, std::initializer_list<const char*> path) {
  const nlohmann::json* p = &j;
  for (const char* k : path) {
    if (!p->is_object() || !p->contains(k)) return std::nullopt;
    p = &(*p)[k];
  }
  if (!p->is_number()) return std::nullopt;
  return p->get<double>();
}

}  // namespace

WorkerMetrics::WorkerMetrics(const WorkerMetricsInfo& info, std::function<nlohmann::json()> stats)
    : stats_(std::move(stats)),
      requests_(registry_.counter("ringllama_requests_total",
                                  "Requests by how they ended: finished, cancelled, dropped (client gone), failed, "
                                  "or refused before running (rejected_bad, rejected_overloaded, rejected_unavailable)",
                                  {"outcome", "api"})),
      prompt_tokens_(
          registry_.counter("ringllama_prompt_tokens_total", "Prompt tokens of the requests admitted").get()),
      completion_tokens_(registry_.counter("ringllama_completion_tokens_total", "Tokens generated").get()),
      steps_(registry_.counter("ringllama_steps_total", "Steps run (one weight pass each)").get()),
      ttft_(registry_
                .histogram("ringllama_time_to_first_token_seconds",
                           "From a request's arrival to its first generated token", exponential_buckets(0.001, 2, 17))
                .get()),
      tpot_(registry_
                .histogram("ringllama_time_per_output_token_seconds",
                           "A finished request's mean time per output token after the first",
                           exponential_buckets(0.0005, 2, 16))
                .get()),
      e2e_(registry_
               .histogram("ringllama_request_duration_seconds", "From a finished request's arrival to its last token",
                          exponential_buckets(0.01, 2, 16))
               .get()),
      step_seconds_(registry_
                        .histogram("ringllama_step_duration_seconds", "The wall time of one step",
                                   exponential_buckets(0.0005, 2, 16))
                        .get()),
      step_tokens_(registry_
                       .histogram("ringllama_step_tokens", "Tokens one step runs (prompt chunks and decode tokens)",
                                  exponential_buckets(1, 2, 14))
                       .get()),
      running_(registry_.gauge("ringllama_running_sequences", "Sequences in the running batch").get()),
      waiting_(registry_.gauge("ringllama_waiting_requests", "Requests waiting for admission").get()),
      kv_used_(registry_.gauge("ringllama_kv_blocks_used", "KV cache blocks holding a sequence's tokens").get()),
      kv_total_(registry_.gauge("ringllama_kv_blocks_capacity", "KV cache blocks in the pool").get()),
      kv_reserved_(registry_
                       .gauge("ringllama_kv_blocks_reserved",
                              "KV cache blocks reserved by admitted requests (prompt + max_tokens)")
                       .get()),
      h2d_bytes_(registry_.counter("ringllama_h2d_bytes_total", "Weight bytes streamed host to device").get()),
      h2d_seconds_(registry_
                       .counter("ringllama_h2d_seconds_total",
                                "Time of those copies on the copy stream (bytes over seconds: the achieved H2D rate)")
                       .get()),
      cpu_bytes_(registry_
                     .counter("ringllama_cpu_weight_bytes_total",
                              "Streamed weight bytes the CPU multiplied from host memory instead (cpu_share)")
                     .get()),
      cpu_seconds_(registry_
                       .counter("ringllama_cpu_weight_seconds_total",
                                "Time of those CPU multiplications (bytes over seconds: the CPU's achieved rate)")
                       .get()),
      passes_(registry_.counter("ringllama_weight_passes_total", "Weight passes that streamed layers").get()),
      stalls_(registry_
                  .counter("ringllama_source_stalls_total",
                           "Streamed layers that had to wait for the weight source (host memory, the daemon's window)")
                  .get()),
      stall_seconds_(registry_.counter("ringllama_source_stall_seconds_total", "Time spent in those waits").get()),
      reg_waits_(registry_
                     .counter("ringllama_registration_waits_total",
                              "Copies that waited for their host memory to be page-locked")
                     .get()),
      reg_wait_seconds_(
          registry_.counter("ringllama_registration_wait_seconds_total", "Time spent in those waits").get()),
      resident_layers_(registry_.gauge("ringllama_resident_layers", "Layers kept on the device for good").get()),
      streamed_layers_(registry_.gauge("ringllama_streamed_layers", "Layers streamed every pass").get()),
      window_position_(registry_
                           .gauge("ringllama_window_position",
                                  "The daemon window: the position the daemon last applied for this worker "
                                  "(pass * n_layers + layer; -1 while it holds none)")
                           .get()),
      window_pass_(registry_.gauge("ringllama_window_pass", "The daemon window: this worker's pass").get()),
      window_waits_(registry_
                        .counter("ringllama_window_waits_total",
                                 "The daemon window: acquires that had to wait for the daemon (a layer, the window)")
                        .get()),
      window_wait_seconds_(registry_
                               .counter("ringllama_window_wait_seconds_total",
                                        "The daemon window: time spent in those waits")
                               .get()) {
  registry_.gauge("ringllama_build_info", "Always 1: what this worker serves", {"model", "backend", "name", "weights"})
      .with({info.model, info.backend, info.name, info.weights})
      .set(1);
  // Every outcome shows from the start, so that rate() sees the first increment of each.
  for (const char* api : {"zmq", "http"})
    for (const char* o : {"finished", "cancelled", "dropped", "failed"}) requests_.with({o, api});
  for (const char* o : {"rejected_bad", "rejected_overloaded", "rejected_unavailable"})
    for (const char* api : {"zmq", "http"}) requests_.with({o, api});
  registry_.on_scrape([this] { scrape(); });
}

const char* WorkerMetrics::api_of(std::string_view client) {
  return client.rfind("http:", 0) == 0 ? "http" : "zmq";
}

void WorkerMetrics::request_ended(const char* outcome, const char* api, double e2e_seconds, int64_t tokens,
                                  double tpot_seconds) {
  requests_.with({outcome, api}).inc();
  if (std::string_view(outcome) != "finished") return;
  e2e_.observe(e2e_seconds);
  if (tokens > 1) tpot_.observe(tpot_seconds);
}

void WorkerMetrics::request_rejected(ErrorCode code, const char* api) {
  const char* outcome = code == ErrorCode::Overloaded    ? "rejected_overloaded"
                        : code == ErrorCode::Unavailable ? "rejected_unavailable"
                                                         : "rejected_bad";
  requests_.with({outcome, api}).inc();
}

void WorkerMetrics::first_token(double ttft_seconds) { ttft_.observe(ttft_seconds); }

void WorkerMetrics::prompt_tokens(int64_t n) { prompt_tokens_.inc(static_cast<double>(n)); }

void WorkerMetrics::step(double seconds, int64_t tokens_run, int64_t tokens_generated) {
  steps_.inc();
  step_seconds_.observe(seconds);
  step_tokens_.observe(static_cast<double>(tokens_run));
  completion_tokens_.inc(static_cast<double>(tokens_generated));
}

void WorkerMetrics::scrape() {
  if (!stats_) return;
  const nlohmann::json s = stats_();
  auto set = [&](Gauge& g, std::initializer_list<const char*> path) {
    if (const auto v = num(s, path)) g.set(*v);
  };
  auto raise = [&](Counter& c, std::initializer_list<const char*> path) {
    if (const auto v = num(s, path)) c.raise_to(*v);
  };
  set(running_, {"requests", "running"});
  set(waiting_, {"requests", "waiting"});
  set(kv_total_, {"kv_blocks", "total"});
  set(kv_reserved_, {"kv_blocks", "reserved"});
  const auto total = num(s, {"kv_blocks", "total"}), free = num(s, {"kv_blocks", "free"});
  if (total && free) kv_used_.set(*total - *free);
  // The CUDA backend's streaming report (cumulative since start).
  raise(h2d_bytes_, {"stream", "bytes"});
  raise(h2d_seconds_, {"stream", "copy_seconds"});
  raise(cpu_bytes_, {"stream", "cpu_bytes"});
  raise(cpu_seconds_, {"stream", "cpu_seconds"});
  raise(passes_, {"stream", "passes"});
  raise(stalls_, {"stream", "source_stalls"});
  raise(stall_seconds_, {"stream", "source_wait_seconds"});
  raise(reg_waits_, {"stream", "registration_waits"});
  raise(reg_wait_seconds_, {"stream", "registration_wait_seconds"});
  set(resident_layers_, {"stream", "resident_layers"});
  const auto layers = num(s, {"stream", "n_layers"}), resident = num(s, {"stream", "resident_layers"});
  if (layers && resident) streamed_layers_.set(*layers - *resident);
  // The daemon window, where the weights come from one.
  set(window_position_, {"weights", "position"});
  set(window_pass_, {"weights", "pass"});
  raise(window_waits_, {"weights", "waits"});
  raise(window_wait_seconds_, {"weights", "wait_seconds"});
}

}  // namespace ringllama
