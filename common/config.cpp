#include "common/config.h"

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>

#include "common/errors.h"
#include "common/store.h"
#include "common/yaml_doc.h"

extern char** environ;

namespace ringllama {

namespace {

enum class Kind { Int, AutoInt, Float, AutoFloat, Bool, Path, Endpoint, HostPort, Secret };

struct KeyDef {
  const char* name;
  Kind kind;
  unsigned readers;
  int64_t min;  // ints: inclusive range
  int64_t max;
  double fmin;  // floats: inclusive range
  double fmax;
  const char* help;
  std::function<void(Config&, const std::string&)> set;  // from validated text
  std::function<std::string(const Config&)> get;
};


// A config file is a few dozen lines; anything near this is not one.
constexpr uint64_t kMaxConfigFileBytes = 1ull << 20;

std::string bool_text(bool b) { return b ? "true" : "false"; }

constexpr int64_t kBig = int64_t(1) << 40;

#define INT_KEY(key, readers, lo, hi, help)                                                                     \
  KeyDef {                                                                                                     \
    #key, Kind::Int, readers, lo, hi, 0, 0, help, [](Config& c, const std::string& v) { c.key = std::stoll(v); }, \
        [](const Config& c) { return std::to_string(c.key); }                                                  \
  }
#define AUTO_KEY(key, readers, lo, hi, help)                                                           \
  KeyDef {                                                                                            \
    #key, Kind::AutoInt, readers, lo, hi, 0, 0, help,                                                 \
        [](Config& c, const std::string& v) { c.key = v == "auto" ? kAuto : std::stoll(v); },        \
        [](const Config& c) { return c.key == kAuto ? std::string("auto") : std::to_string(c.key); } \
  }
#define STR_KEY(key, kind, readers, help)                                                                     \
  KeyDef {                                                                                                   \
    #key, kind, readers, 0, 0, 0, 0, help, [](Config& c, const std::string& v) { c.key = v; }, [](const Config& c) { \
      return c.key;                                                                                          \
    }                                                                                                        \
  }

const std::vector<KeyDef>& keys() {
  static const std::vector<KeyDef> defs = {
      STR_KEY(store, Kind::Path, kLoaderd | kWorker | kGenerate, "path of the packed store"),
      STR_KEY(control, Kind::Endpoint, kLoaderd | kWorker | kGenerate, "ZeroMQ endpoint of the loader daemon"),
      STR_KEY(access_group, Kind::Path, kLoaderd,
              "group whose members may read the daemon's segment and use its sockets (default: its user only)"),
      AUTO_KEY(cpu_cap_layers, kLoaderd | kWorker | kGenerate, 1, 1 << 20,
               "layer slots in the shared-memory window, or auto (what host_memory_fraction of MemAvailable holds)"),
      KeyDef{"host_memory_fraction", Kind::Float, kLoaderd | kWorker | kGenerate, 0, 0, 0.01, 1.0,
             "share of MemAvailable at start that an auto window may take",
             [](Config& c, const std::string& v) { c.host_memory_fraction = std::stod(v); },
             [](const Config& c) { return fmt::format("{}", c.host_memory_fraction); }},
      AUTO_KEY(cycle_slots, kLoaderd | kWorker | kGenerate, 1, 1 << 20,
               "window smaller than the model: slots that cycle the layers not pinned, or auto (back_margin + 2); "
               "cpu_cap_layers or more is a plain ring"),
      INT_KEY(back_margin, kLoaderd | kWorker | kGenerate, 0, 1 << 20, "layers kept behind the window's start"),
      INT_KEY(io_queue_depth, kLoaderd | kGenerate, 1, 4096, "io_uring requests in flight"),
      INT_KEY(io_block_kib, kLoaderd | kGenerate, 4, 1 << 20, "KiB per read request (a multiple of 4)"),
      INT_KEY(heartbeat_ms, kLoaderd | kWorker, 10, 600000, "heartbeat period, ms"),
      INT_KEY(gpu, kWorker | kGenerate, 0, 1023, "CUDA device index"),
      KeyDef{"gpu_memory_limit", Kind::Float, kWorker | kGenerate, 0, 0, 0.0, 1.0,
             "fraction of device memory to plan for; 0 = what is free",
             [](Config& c, const std::string& v) { c.gpu_memory_limit = std::stod(v); },
             [](const Config& c) { return fmt::format("{}", c.gpu_memory_limit); }},
      INT_KEY(free_guard_mb, kWorker | kGenerate, 0, 1 << 20, "MiB kept free on the device"),
      INT_KEY(gpu_ahead_layers, kWorker | kGenerate, 1, 1 << 20, "layers prefetched ahead of compute"),
      AUTO_KEY(gpu_max_groups, kWorker | kGenerate, 2, 1 << 20, "group buffers in the GPU pool, or auto"),
      AUTO_KEY(resident_layers, kWorker | kGenerate, 0, 1 << 20, "layers kept on the GPU, or auto"),
      INT_KEY(h2d_backlog_max, kWorker | kGenerate, 1, 1024, "host-to-device copies in flight"),
      KeyDef{"cpu_share", Kind::AutoFloat, kWorker | kGenerate, 0, 0, 0.0, 1.0,
             "share of each streamed bf16 weight matrix's rows the CPU computes while the GPU streams the rest, "
             "or auto (from the rates measured at start); 0 = off (the default)",
             [](Config& c, const std::string& v) { c.cpu_share = v == "auto" ? kAutoShare : std::stod(v); },
             [](const Config& c) {
               return c.cpu_share < 0 ? std::string("auto") : fmt::format("{}", c.cpu_share);
             }},
      AUTO_KEY(cpu_threads, kWorker | kGenerate, 1, 4096,
               "CPU threads computing the CPU's share of streamed layers, or auto (every core the process may use)"),
      INT_KEY(batch_size, kWorker | kGenerate, 1, 65536, "sequences per step"),
      INT_KEY(max_context, kWorker | kGenerate, 1, 1 << 24, "tokens per sequence"),
      INT_KEY(prefill_chunk_tokens, kWorker | kGenerate, 1, 1 << 24, "prompt tokens per sequence per step"),
      INT_KEY(kv_block_tokens, kWorker | kGenerate, 1, 1 << 16, "tokens per KV-cache block"),
      INT_KEY(queue_max, kWorker, 0, 1 << 24, "waiting requests before overloaded"),
      STR_KEY(listen, Kind::Endpoint, kWorker, "ZeroMQ endpoint for clients; <gpu> expands"),
      INT_KEY(max_request_bytes, kWorker, 64, kBig, "largest request frame, bytes"),
      STR_KEY(http_listen, Kind::HostPort, kWorker,
              "HOST:PORT of the OpenAI-compatible HTTP API (e.g. 127.0.0.1:8080; port 0 = any free one); "
              "empty = off"),
      STR_KEY(api_key, Kind::Secret, kWorker,
              "HTTP API: the bearer token every endpoint but /health requires; empty = none (prefer the "
              "environment or a file to a flag, which other users see in ps)"),
      INT_KEY(drain_timeout_ms, kWorker, 0, 86400000, "on SIGTERM, ms that in-flight requests may still run"),
      KeyDef{"verbose", Kind::Bool, kAllReaders, 0, 0, 0, 0, "debug logs",
             [](Config& c, const std::string& v) { c.verbose = v == "true"; },
             [](const Config& c) { return bool_text(c.verbose); }},
  };
  return defs;
}

const KeyDef* find_key(const std::string& name) {
  for (const auto& k : keys())
    if (name == k.name) return &k;
  return nullptr;
}

std::string flag_of(const std::string& key) {
  std::string f = "--" + key;
  std::replace(f.begin(), f.end(), '_', '-');
  return f;
}

std::string env_of(const std::string& key) {
  std::string e = "RINGLLAMA_" + key;
  std::transform(e.begin(), e.end(), e.begin(), [](unsigned char ch) { return std::toupper(ch); });
  return e;
}

std::string near_miss(const std::string& name) {
  // Suggest a key that differs by case, dashes or one edit: typos are the usual unknown key.
  std::string norm = name;
  std::transform(norm.begin(), norm.end(), norm.begin(), [](unsigned char ch) {
    return ch == '-' ? '_' : static_cast<char>(std::tolower(ch));
  });
  for (const auto& k : keys()) {
    std::string kn = k.name;
    if (kn == norm) return fmt::format(" (did you mean '{}'?)", kn);
    if (kn.size() + 1 >= norm.size() && norm.size() + 1 >= kn.size()) {
      size_t i = 0, j = 0, diff = 0;
      while (i < kn.size() && j < norm.size()) {
        if (kn[i] == norm[j]) { ++i; ++j; continue; }
        if (++diff > 1) break;
        if (kn.size() > norm.size()) ++i;
        else if (norm.size() > kn.size()) ++j;
        else { ++i; ++j; }
      }
      diff += (kn.size() - i) + (norm.size() - j);
      if (diff <= 1) return fmt::format(" (did you mean '{}'?)", kn);
    }
  }
  return "";
}

// Parses and range-checks a raw value; returns the canonical text. Throws ConfigError.
std::string check_value(const KeyDef& k, std::string raw, const ValueSource& src) {
  auto bad = [&](const std::string& rule) {
    return ConfigError(fmt::format("config key '{}' = '{}' from {}: {}", k.name, raw, src.text(), rule));
  };
  auto trim = [](std::string s) {
    s.erase(0, s.find_first_not_of(" \t"));
    s.erase(s.find_last_not_of(" \t") + 1);
    return s;
  };
  raw = trim(raw);
  switch (k.kind) {
    case Kind::AutoInt:
      if (raw == "auto") return raw;
      [[fallthrough]];
    case Kind::Int: {
      errno = 0;
      char* end = nullptr;
      long long v = std::strtoll(raw.c_str(), &end, 10);
      if (raw.empty() || *end != '\0' || errno == ERANGE)
        throw bad(k.kind == Kind::AutoInt ? "must be an integer or auto" : "must be an integer");
      if (v < k.min || v > k.max) throw bad(fmt::format("must be between {} and {}", k.min, k.max));
      return std::to_string(v);
    }
    case Kind::AutoFloat:
      if (raw == "auto") return raw;
      [[fallthrough]];
    case Kind::Float: {
      errno = 0;
      char* end = nullptr;
      double v = std::strtod(raw.c_str(), &end);
      if (raw.empty() || *end != '\0' || errno == ERANGE || v != v)
        throw bad(k.kind == Kind::AutoFloat ? "must be a number or auto" : "must be a number");
      if (v < k.fmin || v > k.fmax) throw bad(fmt::format("must be between {} and {}", k.fmin, k.fmax));
      return raw;
    }
    case Kind::Bool: {
      std::string l = raw;
      std::transform(l.begin(), l.end(), l.begin(), [](unsigned char ch) { return std::tolower(ch); });
      if (l == "true" || l == "1" || l == "yes" || l == "on") return "true";
      if (l == "false" || l == "0" || l == "no" || l == "off") return "false";
      throw bad("must be true or false");
    }
    case Kind::Path:
      if (raw.empty()) throw bad("must not be empty");
      return raw;
    case Kind::Endpoint:
      if (raw.rfind("ipc://", 0) != 0 && raw.rfind("tcp://", 0) != 0 && raw.rfind("inproc://", 0) != 0)
        throw bad("must be a ZeroMQ endpoint (ipc://PATH, tcp://HOST:PORT or inproc://NAME)");
      return raw;
    case Kind::HostPort: {
      if (raw.empty()) return raw;  // off
      // HOST:PORT, the host a name or an IPv4 address, or [IPv6]: the port is what follows the
      // last colon.
      const size_t colon = raw.rfind(':');
      if (colon == std::string::npos || colon == 0) throw bad("must be HOST:PORT, e.g. 127.0.0.1:8080");
      const std::string host = raw.substr(0, colon), port = raw.substr(colon + 1);
      errno = 0;
      char* end = nullptr;
      const long long p = std::strtoll(port.c_str(), &end, 10);
      if (port.empty() || *end != '\0' || errno == ERANGE || p < 0 || p > 65535)
        throw bad("the port must be an integer in [0, 65535]");
      const bool bracketed = host.size() > 2 && host.front() == '[' && host.back() == ']';
      if (!bracketed && host.find_first_of(":[] \t/") != std::string::npos)
        throw bad("the host must be a name, an IPv4 address or [an IPv6 address]");
      return raw;
    }
    case Kind::Secret:
      return raw;
  }
  return raw;
}

}  // namespace

ConfigLoader::ConfigLoader(unsigned readers) : readers_(readers) {}
ConfigLoader::~ConfigLoader() = default;

std::vector<std::string> ConfigLoader::all_keys() {
  std::vector<std::string> v;
  for (const auto& k : keys()) v.push_back(k.name);
  return v;
}

void ConfigLoader::add_flags(CLI::App& app) {
  app.add_option("--config", config_path_, "YAML configuration file (also RINGLLAMA_CONFIG)");
  app.add_flag("--print-config", print_requested_, "print every setting and where it came from, then exit");
  for (const auto& k : keys()) {
    if (!(k.readers & readers_)) continue;
    std::string& slot = flag_values_[k.name];
    const std::string help = fmt::format("{} (config key {}, env {})", k.help, k.name, env_of(k.name));
    if (k.kind == Kind::Bool) {
      flag_options_[k.name] = app.add_option(flag_of(k.name), slot, help)->expected(0, 1)->default_str("true");
    } else {
      flag_options_[k.name] = app.add_option(flag_of(k.name), slot, help);
    }
  }
}

void ConfigLoader::apply(Config& c, const std::string& key, const std::string& raw, ValueSource src) {
  const KeyDef* k = find_key(key);
  if (!k) throw ConfigError(fmt::format("unknown config key '{}' from {}{}", key, src.text(), near_miss(key)));
  std::string text = check_value(*k, raw, src);
  k->set(c, text);
  sources_[key] = std::move(src);
}

Config ConfigLoader::load() {
  std::map<std::string, std::string> env;
  for (char** e = environ; e && *e; ++e) {
    std::string kv = *e;
    auto eq = kv.find('=');
    if (eq == std::string::npos) continue;
    env[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  std::string path = config_path_;
  if (path.empty() && env.count("RINGLLAMA_CONFIG")) path = env["RINGLLAMA_CONFIG"];
  std::optional<std::string> text;
  if (!path.empty()) {
    try {
      text = read_regular_file(path, kMaxConfigFileBytes);
    } catch (const StoreError& e) {
      throw ConfigError(fmt::format("config file {}", e.what()));
    }
  }
  std::map<std::string, std::string> flags;
  for (const auto& [key, value] : flag_values_) {
    const CLI::Option* opt = flag_options_.count(key) ? flag_options_.at(key) : nullptr;
    if (!value.empty()) {
      flags[key] = value;
    } else if (opt && opt->count() > 0) {
      // Given on the command line with nothing after it (--batch-size ""): refused by the key's
      // rule rather than silently ignored; a bare boolean flag means true.
      const KeyDef* k = find_key(key);
      flags[key] = k && k->kind == Kind::Bool ? "true" : value;
    }
  }
  return load_from(text, path, env, flags);
}

Config ConfigLoader::load_from(const std::optional<std::string>& yaml_text, const std::string& yaml_name,
                               const std::map<std::string, std::string>& env,
                               const std::map<std::string, std::string>& flags) {
  Config c;
  sources_.clear();
  for (const auto& k : keys()) sources_[k.name] = ValueSource{};
  if (yaml_text) {
    YAML::Node root;
    try {
      size_t docs = 0;
      root = load_yaml_document(*yaml_text, &docs);
      // A second document would be silently ignored by a reader of the first.
      if (docs > 1)
        throw ConfigError(fmt::format("config file {}: holds {} YAML documents; a config file is one", yaml_name,
                                      docs));
    } catch (const YAML::Exception& e) {
      throw ConfigError(fmt::format("config file {}: not valid YAML: {}", yaml_name, e.what()));
    }
    if (root.IsDefined() && !root.IsNull()) {
      if (!root.IsMap()) throw ConfigError(fmt::format("config file {}: expected a mapping of key: value", yaml_name));
      std::set<std::string> seen;
      for (const auto& kv : root) {
        // A list or mapping as a key ("? [a, b]: 1") is no key name; as<std::string> would throw
        // yaml-cpp's own exception past the ConfigError every caller expects.
        if (!kv.first.IsScalar())
          throw ConfigError(fmt::format("config file {}:{}: a key must be a plain name, not a list or mapping",
                                        yaml_name, kv.first.Mark().line + 1));
        std::string key = kv.first.Scalar();
        ValueSource src{"file", fmt::format("{}:{}", yaml_name, kv.first.Mark().line + 1)};
        // yaml-cpp keeps both entries of a repeated key; which one wins would be a guess.
        if (!seen.insert(key).second)
          throw ConfigError(fmt::format("config key '{}' from {}: appears twice in the file; keys must be unique",
                                        key, src.text()));
        if (!find_key(key))
          throw ConfigError(fmt::format("unknown config key '{}' from {}{}", key, src.text(), near_miss(key)));
        if (!kv.second.IsScalar())
          throw ConfigError(fmt::format("config key '{}' from {}: must be a single value, not a list or mapping", key,
                                        src.text()));
        apply(c, key, kv.second.Scalar(), src);
      }
    }
  }
  for (const auto& [name, value] : env) {
    if (name.rfind("RINGLLAMA_", 0) != 0 || name == "RINGLLAMA_CONFIG") continue;
    // RINGLLAMA_TEST_* and RINGLLAMA_DEMO_* belong to the test suites and the demo script.
    if (name.rfind("RINGLLAMA_TEST_", 0) == 0 || name.rfind("RINGLLAMA_DEMO_", 0) == 0) continue;
    std::string key = name.substr(10);
    std::transform(key.begin(), key.end(), key.begin(), [](unsigned char ch) { return std::tolower(ch); });
    ValueSource src{"env", name};
    if (!find_key(key))
      throw ConfigError(fmt::format("unknown config key '{}' from {}{}", key, src.text(), near_miss(key)));
    apply(c, key, value, src);
  }
  for (const auto& [key, value] : flags) apply(c, key, value, ValueSource{"flag", flag_of(key)});
  cross_check(c);
  return c;
}

void ConfigLoader::cross_check(const Config& c) const {
  auto rule = [&](bool ok, const std::string& key, const std::string& text) {
    if (!ok) throw ConfigError(fmt::format("config key '{}' from {}: {}", key, source(key).text(), text));
  };
  rule(c.io_block_kib % 4 == 0, "io_block_kib", fmt::format("{} is not a multiple of 4 KiB", c.io_block_kib));
  if (c.cpu_cap_layers != kAuto)  // auto: checked by the host plan once the window is sized
    rule(c.back_margin < c.cpu_cap_layers, "back_margin",
         fmt::format("{} must be less than cpu_cap_layers ({})", c.back_margin, c.cpu_cap_layers));
  rule(c.kv_block_tokens <= c.max_context, "kv_block_tokens",
       fmt::format("{} must not exceed max_context ({})", c.kv_block_tokens, c.max_context));
  if (c.gpu_max_groups != kAuto)
    rule(c.gpu_max_groups >= 2, "gpu_max_groups", "needs at least 2 (one attn and one ffn group)");
}

void ConfigLoader::adapt_to_model(Config& c, const ModelConfig& m) {
  const int64_t L = m.n_layers;
  auto clamp_default = [&](const char* key, int64_t& v, int64_t limit, const std::string& why) {
    if (v > limit) {
      if (is_explicit(key)) {
        sources_[key].detail += fmt::format(", clamped from {} to {}", v, why);
      } else {
        sources_[key] = ValueSource{"model", fmt::format("default {} clamped to {}", v, why)};
      }
      v = limit;
    }
  };
  // A window or prefetch deeper than the model only means "all of it".
  if (c.cpu_cap_layers != kAuto) clamp_default("cpu_cap_layers", c.cpu_cap_layers, L, fmt::format("{} layers", L));
  clamp_default("gpu_ahead_layers", c.gpu_ahead_layers, L, fmt::format("{} layers", L));
  if (is_explicit("max_context")) {
    if (c.max_context > m.max_position_embeddings)
      throw ConfigError(fmt::format("config key 'max_context' = {} from {}: the model supports {} positions",
                                    c.max_context, source("max_context").text(), m.max_position_embeddings));
  } else {
    clamp_default("max_context", c.max_context, m.max_position_embeddings,
                  fmt::format("the model's {} positions", m.max_position_embeddings));
  }
  if (c.resident_layers != kAuto && c.resident_layers > L)
    throw ConfigError(fmt::format("config key 'resident_layers' = {} from {}: the model has {} layers",
                                  c.resident_layers, source("resident_layers").text(), L));
  clamp_default("prefill_chunk_tokens", c.prefill_chunk_tokens, c.max_context,
                fmt::format("max_context {}", c.max_context));
  if (c.cpu_cap_layers == kAuto && c.back_margin >= L)
    throw ConfigError(fmt::format("config key 'back_margin' = {} from {}: must be less than the model's {} layers "
                                  "(the most an auto window holds)",
                                  c.back_margin, source("back_margin").text(), L));
  if (c.cpu_cap_layers != kAuto && c.back_margin >= c.cpu_cap_layers)
    throw ConfigError(fmt::format("config key 'back_margin' = {} from {}: must be less than cpu_cap_layers ({})",
                                  c.back_margin, source("back_margin").text(), c.cpu_cap_layers));
  cross_check(c);
}

const ValueSource& ConfigLoader::source(const std::string& key) const {
  static const ValueSource def;
  auto it = sources_.find(key);
  return it == sources_.end() ? def : it->second;
}

bool ConfigLoader::is_explicit(const std::string& key) const {
  const std::string& k = source(key).kind;
  return k == "file" || k == "env" || k == "flag";
}

std::string ConfigLoader::describe(const Config& c) const {
  std::string out;
  size_t w = 0;
  for (const auto& k : keys())
    if (k.readers & readers_) w = std::max(w, std::string(k.name).size());
  for (const auto& k : keys()) {
    if (!(k.readers & readers_)) continue;
    std::string v = k.get(c);
    if (std::string(k.name) == "listen") v = expand_listen(c);
    if (k.kind == Kind::Secret && !v.empty()) v = "(set)";  // a secret is not printed
    if (v.empty()) v = "(unset)";
    out += fmt::format("{:<{}}  {:<40}  {}\n", k.name, w, v, source(k.name).text());
  }
  return out;
}

std::optional<int> parse_command_line(CLI::App& app, int argc, char** argv) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    throw ConfigError(e.what());
  }
  return std::nullopt;
}

std::pair<std::string, int> split_host_port(const std::string& host_port) {
  const size_t colon = host_port.rfind(':');
  RL_REQUIRE(colon != std::string::npos && colon > 0, "'{}' is not HOST:PORT", host_port);
  std::string host = host_port.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  return {host, std::stoi(host_port.substr(colon + 1))};
}

std::string expand_listen(const Config& c) {
  std::string s = c.listen;
  const std::string tag = "<gpu>";
  for (auto p = s.find(tag); p != std::string::npos; p = s.find(tag)) s.replace(p, tag.size(), std::to_string(c.gpu));
  return s;
}

}  // namespace ringllama
