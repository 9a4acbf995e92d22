// The metrics registry (worker/metrics.h): the text exposition format 0.0.4 as Prometheus parses
// it, counters that never go down, cumulative histogram buckets, label escaping, concurrent
// observations; and WorkerMetrics' observation points and scrape-time figures.
#include <gtest/gtest.h>

#include <map>
#include <sstream>
#include <thread>

#include "common/errors.h"
#include "worker/metrics.h"

namespace ringllama {
namespace {

// Every sample line of an exposition: "name{labels}" -> value (comment lines checked apart).
std::map<std::string, std::string> samples(const std::string& text) {
  std::map<std::string, std::string> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t sp = line.rfind(' ');
    EXPECT_NE(sp, std::string::npos) << line;
    EXPECT_TRUE(out.emplace(line.substr(0, sp), line.substr(sp + 1)).second) << "repeated sample: " << line;
  }
  return out;
}

TEST(Metrics, RendersHelpTypeAndSamples) {
  MetricsRegistry r;
  r.counter("demo_requests_total", "Requests seen", {"code"}).with({"200"}).inc(3);
  r.gauge("demo_temperature_celsius", "Current temperature").get().set(-2.5);
  r.histogram("demo_latency_seconds", "Latency", {0.1, 1}).get().observe(0.05);
  const std::string text = r.render();
  EXPECT_EQ(text,
            "# HELP demo_requests_total Requests seen\n"
            "# TYPE demo_requests_total counter\n"
            "demo_requests_total{code=\"200\"} 3\n"
            "# HELP demo_temperature_celsius Current temperature\n"
            "# TYPE demo_temperature_celsius gauge\n"
            "demo_temperature_celsius -2.5\n"
            "# HELP demo_latency_seconds Latency\n"
            "# TYPE demo_latency_seconds histogram\n"
            "demo_latency_seconds_bucket{le=\"0.1\"} 1\n"
            "demo_latency_seconds_bucket{le=\"1\"} 1\n"
            "demo_latency_seconds_bucket{le=\"+Inf\"} 1\n"
            "demo_latency_seconds_sum 0.05\n"
            "demo_latency_seconds_count 1\n");
}

TEST(Metrics, FamiliesWithoutLabelsShowZeroAndLabelledOnesOneLinePerChild) {
  MetricsRegistry r;
  r.counter("a_total", "a");
  auto& f = r.counter("b_total", "b", {"x", "y"});
  EXPECT_EQ(samples(r.render()), (std::map<std::string, std::string>{{"a_total", "0"}}));
  f.with({"2", "1"}).inc();
  f.with({"1", "2"}).inc(2);
  f.with({"1", "2"}).inc(0.5);
  const auto s = samples(r.render());
  EXPECT_EQ(s.at("b_total{x=\"1\",y=\"2\"}"), "2.5");
  EXPECT_EQ(s.at("b_total{x=\"2\",y=\"1\"}"), "1");
  EXPECT_THROW(f.with({"only one"}), Error);
}

TEST(Metrics, CountersAreMonotone) {
  MetricsRegistry r;
  Counter& c = r.counter("c_total", "c").get();
  c.inc(5);
  EXPECT_THROW(c.inc(-1), Error);
  EXPECT_THROW(c.inc(std::nan("")), Error);
  EXPECT_EQ(c.value(), 5);
  c.raise_to(3);  // a source that restarted: the counter does not go back
  EXPECT_EQ(c.value(), 5);
  c.raise_to(9);
  EXPECT_EQ(c.value(), 9);
  double last = 0;
  for (int i = 0; i < 100; ++i) {
    c.inc(i % 3);
    c.raise_to(i);
    EXPECT_GE(c.value(), last);
    last = c.value();
  }
}

TEST(Metrics, HistogramBucketsAreCumulativeWithInfEqualToCount) {
  MetricsRegistry r;
  Histogram& h = r.histogram("h_seconds", "h", {1, 2, 5}, {"k"}).with({"v"});
  for (double v : {0.5, 1.0, 1.5, 2.0, 4.9, 5.0, 7.0, 100.0}) h.observe(v);
  const auto s = samples(r.render());
  // Upper bounds are inclusive: 1.0 is in le="1", 5.0 in le="5".
  EXPECT_EQ(s.at("h_seconds_bucket{k=\"v\",le=\"1\"}"), "2");
  EXPECT_EQ(s.at("h_seconds_bucket{k=\"v\",le=\"2\"}"), "4");
  EXPECT_EQ(s.at("h_seconds_bucket{k=\"v\",le=\"5\"}"), "6");
  EXPECT_EQ(s.at("h_seconds_bucket{k=\"v\",le=\"+Inf\"}"), "8");
  EXPECT_EQ(s.at("h_seconds_count{k=\"v\"}"), "8");
  EXPECT_EQ(std::stod(s.at("h_seconds_sum{k=\"v\"}")), 0.5 + 1.0 + 1.5 + 2.0 + 4.9 + 5.0 + 7.0 + 100.0);
  const Histogram::Snapshot snap = h.snapshot();
  for (size_t i = 1; i < snap.cumulative.size(); ++i) EXPECT_GE(snap.cumulative[i], snap.cumulative[i - 1]);
  EXPECT_THROW(Histogram({2, 1}), Error);
  EXPECT_THROW(Histogram({1, std::numeric_limits<double>::infinity()}), Error);
  EXPECT_EQ(exponential_buckets(0.5, 2, 4), (std::vector<double>{0.5, 1, 2, 4}));
}

TEST(Metrics, LabelValuesAndHelpAreEscaped) {
  MetricsRegistry r;
  r.gauge("g", "line one\nback\\slash \"quoted\"", {"path"}).with({"C:\\dir \"x\"\nnext"}).set(1);
  const std::string text = r.render();
  EXPECT_NE(text.find("# HELP g line one\\nback\\\\slash \"quoted\"\n"), std::string::npos) << text;
  EXPECT_NE(text.find("g{path=\"C:\\\\dir \\\"x\\\"\\nnext\"} 1\n"), std::string::npos) << text;
  EXPECT_EQ(escape_label_value("plain ünïcödé"), "plain ünïcödé");
  EXPECT_EQ(format_value(std::numeric_limits<double>::infinity()), "+Inf");
  EXPECT_EQ(format_value(-std::numeric_limits<double>::infinity()), "-Inf");
  EXPECT_EQ(format_value(std::nan("")), "NaN");
  EXPECT_EQ(std::stod(format_value(0.1 + 0.2)), 0.1 + 0.2);  // round trip
}

TEST(Metrics, NamesFollowPrometheusRules) {
  MetricsRegistry r;
  EXPECT_THROW(r.counter("requests", "a counter without _total"), Error);
  EXPECT_THROW(r.gauge("9lives", "starts with a digit"), Error);
  EXPECT_THROW(r.gauge("bad-name", "dash"), Error);
  EXPECT_THROW(r.gauge("g1", "label", {"bad:label"}), Error);
  EXPECT_THROW(r.gauge("g2", "label", {"__reserved"}), Error);
  EXPECT_THROW(r.histogram("h", "le is the bucket's", {1}, {"le"}), Error);
  EXPECT_THROW(r.histogram("h2", "bounds", {3, 3}), Error);
  r.gauge("ns:ok_name", "colons are allowed in names");
  EXPECT_THROW(r.gauge("ns:ok_name", "twice"), Error);
}

TEST(Metrics, ConcurrentObservationsAddUp) {
  MetricsRegistry r;
  auto& counters = r.counter("n_total", "n", {"thread"});
  Counter& shared = r.counter("shared_total", "shared").get();
  Gauge& g = r.gauge("g", "g").get();
  Histogram& h = r.histogram("h_seconds", "h", {0.5}).get();
  constexpr int kThreads = 8, kEach = 20000;
  std::atomic<bool> stop{false};
  // A scraper renders while the observations go on: every render must be consistent.
  std::thread scraper([&] {
    while (!stop.load()) {
      const auto s = samples(r.render());
      EXPECT_EQ(s.at("h_seconds_bucket{le=\"+Inf\"}"), s.at("h_seconds_count"));
      EXPECT_LE(std::stoull(s.at("h_seconds_bucket{le=\"0.5\"}")), std::stoull(s.at("h_seconds_count")));
    }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      Counter& mine = counters.with({std::to_string(t % 4)});
      for (int i = 0; i < kEach; ++i) {
        shared.inc();
        mine.inc();
        g.add(1);
        h.observe(i % 2 ? 0.25 : 1.0);
      }
    });
  for (auto& t : threads) t.join();
  stop = true;
  scraper.join();
  EXPECT_EQ(shared.value(), kThreads * kEach);
  EXPECT_EQ(g.value(), kThreads * kEach);
  for (int k = 0; k < 4; ++k) EXPECT_EQ(counters.with({std::to_string(k)}).value(), 2 * kEach);
  const auto snap = h.snapshot();
  EXPECT_EQ(snap.count, uint64_t(kThreads) * kEach);
  EXPECT_EQ(snap.cumulative[0], uint64_t(kThreads) * kEach / 2);
  EXPECT_DOUBLE_EQ(snap.sum, kThreads * (kEach / 2) * 1.25);
}

TEST(Metrics, ScrapeHooksRunBeforeEachRender) {
  MetricsRegistry r;
  Gauge& g = r.gauge("scrapes", "renders so far").get();
  int n = 0;
  r.on_scrape([&] { g.set(++n); });
  r.on_scrape([] { throw Error("a hook that fails"); });  // logged; the render goes on
  EXPECT_EQ(samples(r.render()).at("scrapes"), "1");
  EXPECT_EQ(samples(r.render()).at("scrapes"), "2");
}

TEST(WorkerMetricsTest, ObservationsAndStatsShowInTheExposition) {
  nlohmann::json stats = {{"requests", {{"running", 3}, {"waiting", 2}}},
                          {"kv_blocks", {{"free", 10}, {"total", 64}, {"reserved", 54}}},
                          {"stream",
                           {{"bytes", 4e9}, {"copy_seconds", 0.08}, {"passes", 7}, {"source_stalls", 2},
                            {"source_wait_seconds", 0.01}, {"n_layers", 32}, {"resident_layers", 12}}},
                          {"weights", {{"pass", 7}, {"position", 230}, {"waits", 5}, {"wait_seconds", 0.5}}}};
  WorkerMetrics m({"tiny \"model\"", "cpu", "worker-0", "store"}, [&] { return stats; });
  m.prompt_tokens(12);
  m.first_token(0.02);
  m.step(0.004, 13, 1);
  m.step(0.003, 1, 1);
  m.request_ended("finished", WorkerMetrics::api_of("http:7"), 0.5, 2, 0.01);
  m.request_ended("cancelled", WorkerMetrics::api_of("abc"), 0.5, 2, 0.01);
  m.request_rejected(ErrorCode::Overloaded, "zmq");
  m.request_rejected(ErrorCode::BadRequest, "http");
  auto s = samples(m.render());
  EXPECT_EQ(
      s.at("ringllama_build_info{model=\"tiny \\\"model\\\"\",backend=\"cpu\",name=\"worker-0\",weights=\"store\"}"),
      "1");
  EXPECT_EQ(s.at("ringllama_requests_total{outcome=\"finished\",api=\"http\"}"), "1");
  EXPECT_EQ(s.at("ringllama_requests_total{outcome=\"cancelled\",api=\"zmq\"}"), "1");
  EXPECT_EQ(s.at("ringllama_requests_total{outcome=\"rejected_overloaded\",api=\"zmq\"}"), "1");
  EXPECT_EQ(s.at("ringllama_requests_total{outcome=\"rejected_bad\",api=\"http\"}"), "1");
  EXPECT_EQ(s.at("ringllama_requests_total{outcome=\"failed\",api=\"zmq\"}"), "0");
  EXPECT_EQ(s.at("ringllama_prompt_tokens_total"), "12");
  EXPECT_EQ(s.at("ringllama_completion_tokens_total"), "2");
  EXPECT_EQ(s.at("ringllama_steps_total"), "2");
  EXPECT_EQ(s.at("ringllama_step_tokens_count"), "2");
  EXPECT_EQ(s.at("ringllama_step_tokens_sum"), "14");
  EXPECT_EQ(s.at("ringllama_time_to_first_token_seconds_count"), "1");
  // Latency and TPOT: finished requests only.
  EXPECT_EQ(s.at("ringllama_request_duration_seconds_count"), "1");
  EXPECT_EQ(s.at("ringllama_time_per_output_token_seconds_count"), "1");
  EXPECT_EQ(s.at("ringllama_running_sequences"), "3");
  EXPECT_EQ(s.at("ringllama_waiting_requests"), "2");
  EXPECT_EQ(s.at("ringllama_kv_blocks_used"), "54");
  EXPECT_EQ(s.at("ringllama_kv_blocks_capacity"), "64");
  EXPECT_EQ(s.at("ringllama_h2d_bytes_total"), "4000000000");
  EXPECT_EQ(s.at("ringllama_h2d_seconds_total"), "0.08");
  EXPECT_EQ(s.at("ringllama_streamed_layers"), "20");
  EXPECT_EQ(s.at("ringllama_window_position"), "230");
  EXPECT_EQ(s.at("ringllama_window_waits_total"), "5");
  // The gauges follow the stats; the counters from them stay monotone.
  stats["requests"]["running"] = 0;
  stats["kv_blocks"]["free"] = 64;
  stats["stream"]["bytes"] = 1e9;
  s = samples(m.render());
  EXPECT_EQ(s.at("ringllama_running_sequences"), "0");
  EXPECT_EQ(s.at("ringllama_kv_blocks_used"), "0");
  EXPECT_EQ(s.at("ringllama_h2d_bytes_total"), "4000000000");
  // Stats without the stream or the window leave those figures alone.
  stats = nlohmann::json::object();
  EXPECT_NO_THROW(s = samples(m.render()));
  EXPECT_EQ(s.at("ringllama_window_position"), "230");
}

}  // namespace
}  // namespace ringllama
