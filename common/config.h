// Configuration of every binary (DESIGN.md "Configuration"): one YAML file, RINGLLAMA_<KEY>
// environment variables and --<key-with-dashes> flags, over defaults that adapt to the model.
// Later sources win: default < file < environment < flag. Values are validated where they are
// loaded; the error names the key, where the value came from and the rule it breaks.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/model_config.h"

namespace CLI {
class App;
class Option;
}

namespace ringllama {

// Which binaries read a key (a bit mask).
enum Reader : unsigned {
  kLoaderd = 1u << 0,
  kWorker = 1u << 1,
  kGenerate = 1u << 2,
  kPack = 1u << 3,
  kAllReaders = kLoaderd | kWorker | kGenerate | kPack,
};

inline constexpr int64_t kAuto = -1;  // value of an `auto` key
inline constexpr double kAutoShare = -1.0;  // value of an `auto` fraction key (cpu_share)

struct Config {
  std::string store;                                      // path of the packed store
  std::string control = "ipc:///run/ringllama/loaderd.sock";  // the daemon's ZeroMQ endpoint
  std::string access_group;           // "" = the daemon's user only; else this group may read the segment
                                      // and connect to the daemon's sockets
  int64_t cpu_cap_layers = kAuto;     // layer slots in the shared-memory window; auto = what the host plan fits
  double host_memory_fraction = 0.75; // share of MemAvailable at start the window may take (auto cpu_cap_layers)
  int64_t cycle_slots = kAuto;        // window smaller than the model: slots cycling the unpinned layers;
                                      // auto = back_margin + 2; >= cpu_cap_layers = a plain ring
  int64_t back_margin = 0;            // layers kept behind the window's start
  int64_t io_queue_depth = 32;        // io_uring requests in flight
  int64_t io_block_kib = 1024;        // KiB per read request
  int64_t heartbeat_ms = 1000;        // worker -> daemon heartbeat period, ms
  int64_t gpu = 0;                    // CUDA device index
  double gpu_memory_limit = 0.9;      // fraction of device memory to plan for; 0 = what is free
  int64_t free_guard_mb = 1024;       // MiB left free on the device
  int64_t gpu_ahead_layers = 4;       // layers prefetched ahead of compute
  int64_t gpu_max_groups = kAuto;     // group buffers in the pool; auto = from gpu_ahead_layers
  int64_t resident_layers = kAuto;    // layers kept on the GPU; auto = what fits
  int64_t h2d_backlog_max = 4;        // host-to-device copies in flight
  double cpu_share = 0;               // share of each streamed bf16 matrix's rows the CPU computes (hybrid):
                                      // auto = from the rates measured at start; 0 = off (the default until
                                      // the hybrid has been measured on a GPU: DESIGN.md)
  int64_t cpu_threads = kAuto;        // the hybrid's CPU threads; auto = every core this process may use
  int64_t batch_size = 8;             // sequences per step
  int64_t max_context = 4096;         // tokens per sequence (<= the model's)
  int64_t prefill_chunk_tokens = 512; // prompt tokens per sequence per step
  int64_t kv_block_tokens = 16;       // tokens per KV-cache block
  int64_t queue_max = 64;             // waiting requests before `overloaded`
  std::string listen = "ipc:///run/ringllama/worker-<gpu>.sock";  // client endpoint; <gpu> expands
  int64_t max_request_bytes = 1048576;  // largest request frame, bytes
  std::string http_listen;            // "HOST:PORT" of the HTTP API (OpenAI's); "" = off
  std::string api_key;                // the HTTP API's bearer token; "" = no authentication
  int64_t drain_timeout_ms = 30000;   // on SIGTERM: how long in-flight requests may run before exit
  bool verbose = false;               // debug logs
};

// Where a value came from, for --print-config.
struct ValueSource {
  std::string kind = "default";  // default | model | file | env | flag
  std::string detail;            // the file, variable or flag; or why the default changed
  std::string text() const { return detail.empty() ? kind : kind + " (" + detail + ")"; }
};

class ConfigLoader {
 public:
  // `readers`: the binary's bit in Reader; it gets a flag for every key it reads.
  explicit ConfigLoader(unsigned readers);
  ~ConfigLoader();

  // Adds --config FILE, --print-config and --<key> for each key this binary reads.
  void add_flags(CLI::App& app);

  // After the command line is parsed: applies the file (from --config, else RINGLLAMA_CONFIG),
  // the environment and the flags, and validates. Throws ConfigError.
  Config load();

  // The same from explicit inputs (tests, and anything that is not a command line). Flags are
  // given as key -> raw text.
  Config load_from(const std::optional<std::string>& yaml_text, const std::string& yaml_name,
                   const std::map<std::string, std::string>& env,
                   const std::map<std::string, std::string>& flags);

  // Defaults that depend on the model are clamped to it; explicit values that cannot work with it
  // are refused. Call once the store is known.
  void adapt_to_model(Config& c, const ModelConfig& m);

  bool print_requested() const { return print_requested_; }
  // A table of every key this binary reads: value and source.
  std::string describe(const Config& c) const;
  const ValueSource& source(const std::string& key) const;
  bool is_explicit(const std::string& key) const;

  // Every key's name, for docs and tests.
  static std::vector<std::string> all_keys();

 private:
  void apply(Config& c, const std::string& key, const std::string& raw, ValueSource src);
  void cross_check(const Config& c) const;

  unsigned readers_;
  std::map<std::string, ValueSource> sources_;
  bool print_requested_ = false;
  std::string config_path_;
  std::map<std::string, std::string> flag_values_;  // filled by CLI11
  std::map<std::string, CLI::Option*> flag_options_;  // given or not: an empty value given is an error
};

// Parses a binary's command line: --help prints the usage and gives its exit code (0); a bad option
// throws ConfigError (the binary's one-line error, exit 1); nullopt: go on.
std::optional<int> parse_command_line(CLI::App& app, int argc, char** argv);

// "127.0.0.1:8080" -> {"127.0.0.1", 8080}; "[::1]:80" -> {"::1", 80}. Throws Error when there is no
// port (http_listen is checked where it is loaded).
std::pair<std::string, int> split_host_port(const std::string& host_port);

// The `listen` endpoint with <gpu> replaced by the device index.
std::string expand_listen(const Config& c);

}  // namespace ringllama
