// Configuration rules (DESIGN.md "Configuration"): precedence, sources, unknown keys, types,
// ranges, cross rules, adapting to the model, and --print-config of a real binary.
#include "common/config.h"

#include <gtest/gtest.h>

#include <cstdlib>

#include "common/errors.h"
#include "tests/test_util.h"
#include "tests/tiny_model.h"

namespace ringllama {
namespace {

using Map = std::map<std::string, std::string>;

// The message of the ConfigError that load_from throws, or "(no error)".
std::string load_error(const std::optional<std::string>& yaml, const Map& env = {}, const Map& flags = {},
                       unsigned readers = kAllReaders) {
  ConfigLoader l(readers);
  try {
    l.load_from(yaml, "test.yaml", env, flags);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

#define EXPECT_HAS(text, part) EXPECT_NE(std::string(text).find(part), std::string::npos) << (text)

TEST(Config, DefaultsWithNoInput) {
  ConfigLoader l(kAllReaders);
  Config c = l.load_from(std::nullopt, "", {}, {});
  EXPECT_EQ(c.max_context, 4096);
  EXPECT_EQ(c.cpu_cap_layers, kAuto) << "the host plan sizes the window";
  EXPECT_DOUBLE_EQ(c.host_memory_fraction, 0.75);
  EXPECT_EQ(c.gpu_max_groups, kAuto);
  EXPECT_FALSE(c.verbose);
  EXPECT_EQ(l.source("max_context").text(), "default");
  EXPECT_FALSE(l.is_explicit("max_context"));
  EXPECT_EQ(expand_listen(c), "ipc:///run/ringllama/worker-0.sock");
}

TEST(Config, LaterSourcesWin) {
  const std::string yaml = "verbose: true\nmax_context: 1000\nbatch_size: 3\n";
  const Map env = {{"RINGLLAMA_MAX_CONTEXT", "2000"}, {"RINGLLAMA_BATCH_SIZE", "5"}, {"HOME", "/root"}};
  const Map flags = {{"max_context", "3000"}};
  ConfigLoader l(kAllReaders);
  Config c = l.load_from(yaml, "ring.yaml", env, flags);
  EXPECT_EQ(c.max_context, 3000);
  EXPECT_EQ(l.source("max_context").text(), "flag (--max-context)");
  EXPECT_EQ(c.batch_size, 5);
  EXPECT_EQ(l.source("batch_size").text(), "env (RINGLLAMA_BATCH_SIZE)");
  EXPECT_TRUE(c.verbose);
  EXPECT_EQ(l.source("verbose").text(), "file (ring.yaml:1)");
  EXPECT_EQ(l.source("gpu").text(), "default");
  EXPECT_TRUE(l.is_explicit("verbose"));

  // Without the flag the environment wins; without both, the file.
  c = l.load_from(yaml, "ring.yaml", env, {});
  EXPECT_EQ(c.max_context, 2000);
  c = l.load_from(yaml, "ring.yaml", {}, {});
  EXPECT_EQ(c.max_context, 1000);
  EXPECT_EQ(l.source("max_context").text(), "file (ring.yaml:2)");
}

TEST(Config, ValuesOfEveryKind) {
  ConfigLoader l(kAllReaders);
  Config c = l.load_from(
      "verbose: yes\ngpu_memory_limit: 0.5\ngpu_max_groups: 6\nresident_layers: auto\n"
      "control: tcp://127.0.0.1:5555\nlisten: ipc:///tmp/w-<gpu>.sock\ngpu: 3\nstore: /data/s\n",
      "f.yaml", {}, {{"verbose", "off"}});
  EXPECT_FALSE(c.verbose);
  EXPECT_DOUBLE_EQ(c.gpu_memory_limit, 0.5);
  EXPECT_EQ(c.gpu_max_groups, 6);
  EXPECT_EQ(c.resident_layers, kAuto);
  EXPECT_EQ(c.control, "tcp://127.0.0.1:5555");
  EXPECT_EQ(expand_listen(c), "ipc:///tmp/w-3.sock");
  EXPECT_EQ(c.store, "/data/s");
}

TEST(Config, UnknownKeysAreNamedWithASuggestion) {
  std::string e = load_error("max_contxt: 5\n");
  EXPECT_HAS(e, "unknown config key 'max_contxt'");
  EXPECT_HAS(e, "test.yaml:1");
  EXPECT_HAS(e, "did you mean 'max_context'");

  e = load_error(std::nullopt, {{"RINGLLAMA_BATCH_SIZ", "4"}});
  EXPECT_HAS(e, "unknown config key 'batch_siz'");
  EXPECT_HAS(e, "RINGLLAMA_BATCH_SIZ");
  EXPECT_HAS(e, "did you mean 'batch_size'");

  e = load_error(std::nullopt, {}, {{"kv_blocks_tokens", "4"}});
  EXPECT_HAS(e, "unknown config key 'kv_blocks_tokens'");
  EXPECT_HAS(e, "did you mean 'kv_block_tokens'");

  e = load_error("Max-Context: 5\n");
  EXPECT_HAS(e, "did you mean 'max_context'");

  e = load_error("completely_unrelated: 1\n");
  EXPECT_HAS(e, "unknown config key 'completely_unrelated'");
  EXPECT_EQ(e.find("did you mean"), std::string::npos);

  // The variable that names the file, and variables of other programs, are not keys.
  EXPECT_EQ(load_error(std::nullopt, {{"RINGLLAMA_CONFIG", "/x.yaml"}, {"PATH", "/bin"}}), "(no error)");
}

TEST(Config, WrongTypesAreRefused) {
  EXPECT_HAS(load_error("max_context: lots\n"), "config key 'max_context' = 'lots' from file (test.yaml:1): must be an integer");
  EXPECT_HAS(load_error("max_context: 12.5\n"), "must be an integer");
  EXPECT_HAS(load_error("gpu_max_groups: many\n"), "must be an integer or auto");
  EXPECT_HAS(load_error("verbose: maybe\n"), "must be true or false");
  EXPECT_HAS(load_error("gpu_memory_limit: half\n"), "must be a number");
  EXPECT_HAS(load_error("control: /run/x.sock\n"), "must be a ZeroMQ endpoint");
  EXPECT_HAS(load_error("batch_size: [1, 2]\n"), "must be a single value");
  EXPECT_HAS(load_error("batch_size:\n  a: 1\n"), "must be a single value");
  EXPECT_HAS(load_error(std::nullopt, {{"RINGLLAMA_GPU", "zero"}}), "from env (RINGLLAMA_GPU): must be an integer");
  EXPECT_HAS(load_error(std::nullopt, {}, {{"heartbeat_ms", ""}}), "from flag (--heartbeat-ms): must be an integer");
  EXPECT_HAS(load_error("max_context: 99999999999999999999999\n"), "must be an integer");
}

TEST(Config, MalformedFilesAreRefused) {
  EXPECT_HAS(load_error("max_context: [1,\n"), "not valid YAML");
  EXPECT_HAS(load_error("- 1\n- 2\n"), "expected a mapping");
  EXPECT_EQ(load_error(""), "(no error)");
  EXPECT_EQ(load_error("# nothing but a comment\n"), "(no error)");
}

TEST(Config, ImpossibleValuesAreRefused) {
  EXPECT_HAS(load_error("max_context: 0\n"), "must be between 1 and");
  EXPECT_HAS(load_error("batch_size: -3\n"), "must be between 1 and 65536");
  EXPECT_HAS(load_error("gpu_memory_limit: 1.5\n"), "must be between 0 and 1");
  EXPECT_HAS(load_error("io_block_kib: 2\n"), "must be between 4 and");
  EXPECT_HAS(load_error("gpu_max_groups: 1\n"), "must be between 2 and");
  EXPECT_HAS(load_error("store: ''\n"), "must not be empty");
}

TEST(Config, CrossRules) {
  std::string e = load_error("cpu_cap_layers: 4\nback_margin: 4\n");
  EXPECT_HAS(e, "config key 'back_margin' from file (test.yaml:2): 4 must be less than cpu_cap_layers (4)");
  EXPECT_EQ(load_error("cpu_cap_layers: 4\nback_margin: 3\n"), "(no error)");

  e = load_error(std::nullopt, {}, {{"io_block_kib", "1026"}});
  EXPECT_HAS(e, "config key 'io_block_kib' from flag (--io-block-kib): 1026 is not a multiple of 4 KiB");

  e = load_error("max_context: 32\n", {{"RINGLLAMA_KV_BLOCK_TOKENS", "64"}});
  EXPECT_HAS(e, "config key 'kv_block_tokens' from env (RINGLLAMA_KV_BLOCK_TOKENS): 64 must not exceed max_context (32)");
  EXPECT_EQ(load_error("max_context: 32\nkv_block_tokens: 32\n"), "(no error)");
}

ModelConfig model_with(int64_t layers, int64_t positions) {
  ModelConfig m = test::tiny_config();
  m.n_layers = layers;
  m.max_position_embeddings = positions;
  return m;
}

TEST(Config, AdaptToModelClampsDefaults) {
  ConfigLoader l(kAllReaders);
  Config c = l.load_from(std::nullopt, "", {}, {});
  l.adapt_to_model(c, model_with(3, 256));
  EXPECT_EQ(c.cpu_cap_layers, kAuto) << "auto stays auto until the host plan resolves it";
  EXPECT_EQ(c.gpu_ahead_layers, 3);
  EXPECT_EQ(l.source("gpu_ahead_layers").kind, "model");
  EXPECT_HAS(l.source("gpu_ahead_layers").text(), "3 layers");
  EXPECT_EQ(c.max_context, 256);
  EXPECT_EQ(l.source("max_context").kind, "model");
  EXPECT_EQ(c.prefill_chunk_tokens, 256);
  EXPECT_FALSE(l.is_explicit("max_context"));

  // A model larger than the defaults leaves them alone.
  Config d = l.load_from(std::nullopt, "", {}, {});
  l.adapt_to_model(d, model_with(80, 131072));
  EXPECT_EQ(d.gpu_ahead_layers, 4);
  EXPECT_EQ(d.max_context, 4096);
  EXPECT_EQ(l.source("max_context").text(), "default");
}

TEST(Config, AdaptToModelRefusesWhatCannotWork) {
  auto adapt_error = [](const std::string& yaml, const ModelConfig& m) -> std::string {
    ConfigLoader l(kAllReaders);
    Config c = l.load_from(yaml, "m.yaml", {}, {});
    try {
      l.adapt_to_model(c, m);
    } catch (const ConfigError& e) {
      return e.what();
    }
    return "(no error)";
  };
  EXPECT_HAS(adapt_error("max_context: 512\n", model_with(2, 256)),
             "config key 'max_context' = 512 from file (m.yaml:1): the model supports 256 positions");
  EXPECT_EQ(adapt_error("max_context: 256\n", model_with(2, 256)), "(no error)");
  EXPECT_HAS(adapt_error("resident_layers: 5\n", model_with(4, 256)), "the model has 4 layers");
  // A margin that fitted the window no longer fits the window clamped to the model.
  EXPECT_HAS(adapt_error("cpu_cap_layers: 4\nback_margin: 3\n", model_with(2, 256)),
             "must be less than cpu_cap_layers (2)");
  // An auto window holds at most the model's layers.
  EXPECT_HAS(adapt_error("back_margin: 3\n", model_with(2, 256)), "must be less than the model's 2 layers");

  // An explicit window deeper than the model is clamped, and the source says so.
  ConfigLoader l(kAllReaders);
  Config c = l.load_from("cpu_cap_layers: 40\n", "m.yaml", {}, {});
  l.adapt_to_model(c, model_with(6, 256));
  EXPECT_EQ(c.cpu_cap_layers, 6);
  EXPECT_HAS(l.source("cpu_cap_layers").text(), "file (m.yaml:1");
  EXPECT_HAS(l.source("cpu_cap_layers").text(), "clamped");
}

// The line of `key` in a describe() table, or "".
std::string line_with(const std::string& text, const std::string& key) {
  const std::string t = "\n" + text;
  auto at = t.find("\n" + key + " ");
  if (at == std::string::npos) return "";
  return t.substr(at + 1, t.find('\n', at + 1) - at - 1);
}

// The HTTP API's keys: off by default, HOST:PORT checked, the key never printed.
TEST(Config, HttpListenAndApiKey) {
  ConfigLoader l(kWorker);
  Config c = l.load_from(std::nullopt, "", {}, {});
  EXPECT_EQ(c.http_listen, "");
  EXPECT_EQ(c.api_key, "");
  c = l.load_from("http_listen: 127.0.0.1:8080\n", "h.yaml", {{"RINGLLAMA_API_KEY", "s3cret"}}, {});
  EXPECT_EQ(c.http_listen, "127.0.0.1:8080");
  EXPECT_EQ(split_host_port(c.http_listen), std::make_pair(std::string("127.0.0.1"), 8080));
  EXPECT_EQ(split_host_port("[::1]:0"), std::make_pair(std::string("::1"), 0));
  EXPECT_EQ(c.api_key, "s3cret");
  const std::string d = l.describe(c);
  EXPECT_EQ(d.find("s3cret"), std::string::npos) << d;
  EXPECT_HAS(d, "(set)");
  for (const char* bad : {"8080", ":8080", "localhost:http", "localhost:70000", "a b:1", "::1:80"})
    EXPECT_HAS(load_error(std::nullopt, {}, {{"http_listen", bad}}, kWorker), "'http_listen'");
}

TEST(Config, DescribeListsTheReadersKeysWithSources) {
  ConfigLoader l(kGenerate);
  Config c = l.load_from("batch_size: 2\n", "g.yaml", {{"RINGLLAMA_GPU", "1"}}, {{"store", "/s"}});
  const std::string d = l.describe(c);
  // Every key generate reads has a line; keys only other binaries read have none.
  for (const char* key : {"store", "control", "io_queue_depth", "io_block_kib", "gpu", "gpu_memory_limit",
                          "free_guard_mb", "gpu_ahead_layers", "gpu_max_groups", "resident_layers",
                          "h2d_backlog_max", "batch_size", "max_context", "prefill_chunk_tokens",
                          "kv_block_tokens", "verbose", "cpu_cap_layers", "host_memory_fraction", "cycle_slots",
                          "back_margin", "cpu_share", "cpu_threads"})
    EXPECT_NE(line_with(d, key), "") << key;
  for (const char* key : {"heartbeat_ms", "queue_max", "listen", "max_request_bytes", "drain_timeout_ms"})
    EXPECT_EQ(line_with(d, key), "") << key;
  auto line_of = [&](const std::string& key) { return line_with(d, key); };
  EXPECT_HAS(line_of("batch_size"), "file (g.yaml:1)");
  EXPECT_HAS(line_of("gpu"), "env (RINGLLAMA_GPU)");
  EXPECT_HAS(line_of("store"), "/s");
  EXPECT_HAS(line_of("store"), "flag (--store)");
  EXPECT_HAS(line_of("max_context"), "4096");
  EXPECT_HAS(line_of("max_context"), "default");
  EXPECT_HAS(line_of("gpu_max_groups"), "auto");
  EXPECT_HAS(line_of("cpu_cap_layers"), "auto");
  EXPECT_HAS(line_of("cpu_share"), "0");
  EXPECT_EQ(ConfigLoader::all_keys().size(), 30u);
}

// cpu_share: 0 (off, the default), auto, a share in [0, 1], or an error naming the rule.
TEST(Config, CpuShareIsAutoOrAShare) {
  ConfigLoader l(kWorker);
  EXPECT_EQ(l.load_from(std::nullopt, "", {}, {}).cpu_share, 0.0);
  EXPECT_EQ(l.load_from("cpu_share: 0.25\n", "w.yaml", {}, {}).cpu_share, 0.25);
  EXPECT_EQ(l.load_from("cpu_share: auto\n", "w.yaml", {}, {}).cpu_share, kAutoShare);
  EXPECT_EQ(l.load_from(std::nullopt, "", {{"RINGLLAMA_CPU_SHARE", "0.4"}}, {}).cpu_share, 0.4);
  EXPECT_EQ(l.load_from(std::nullopt, "", {}, {{"cpu_threads", "12"}}).cpu_threads, 12);
  EXPECT_EQ(l.load_from(std::nullopt, "", {}, {}).cpu_threads, kAuto);
  for (const char* bad : {"1.5", "-0.1", "half", "nan"}) {
    try {
      l.load_from(std::nullopt, "", {}, {{"cpu_share", bad}});
      ADD_FAILURE() << "cpu_share " << bad << " was accepted";
    } catch (const ConfigError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("cpu_share"), std::string::npos) << what;
      EXPECT_TRUE(what.find("between 0 and 1") != std::string::npos ||
                  what.find("a number or auto") != std::string::npos)
          << what;
    }
  }
  EXPECT_THROW(l.load_from(std::nullopt, "", {}, {{"cpu_threads", "0"}}), ConfigError);
}

// ---- --print-config of a real process ----

class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) { setenv(name, value.c_str(), 1); }
  ~ScopedEnv() { unsetenv(name_); }

 private:
  const char* name_;
};


TEST(ConfigProcess, PrintConfigShowsEverySource) {
  test::TempDir dir;
  test::TinyModel(test::tiny_config()).write_store(dir.path());  // 2 layers, 64 positions
  const std::string yaml = dir / "ring.yaml";
  test::write_file(yaml, "# generate settings\nmax_context: 32\nverbose: true\n");
  ScopedEnv env("RINGLLAMA_KV_BLOCK_TOKENS", "8");
  auto r = test::run_bin("ringllama-generate", {"--config", yaml, "--print-config", "--store", dir.path(),
                                                "--prefill-chunk-tokens", "16"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_HAS(line_with(r.out, "max_context"), "32");
  EXPECT_HAS(line_with(r.out, "max_context"), "file (" + yaml + ":2)");
  EXPECT_HAS(line_with(r.out, "verbose"), "file (" + yaml + ":3)");
  EXPECT_HAS(line_with(r.out, "kv_block_tokens"), "env (RINGLLAMA_KV_BLOCK_TOKENS)");
  EXPECT_HAS(line_with(r.out, "prefill_chunk_tokens"), "flag (--prefill-chunk-tokens)");
  EXPECT_HAS(line_with(r.out, "store"), "flag (--store)");
  EXPECT_HAS(line_with(r.out, "gpu_ahead_layers"), "model");
  EXPECT_HAS(line_with(r.out, "gpu_ahead_layers"), "2 layers");
  EXPECT_HAS(line_with(r.out, "batch_size"), "default");
  EXPECT_EQ(line_with(r.out, "listen"), "");
}

TEST(ConfigProcess, ConfigFileFromTheEnvironmentAndErrors) {
  test::TempDir dir;
  test::TinyModel(test::tiny_config()).write_store(dir.path());
  const std::string yaml = dir / "ring.yaml";
  test::write_file(yaml, "batch_size: 2\n");
  {
    ScopedEnv env("RINGLLAMA_CONFIG", yaml);
    auto r = test::run_bin("ringllama-generate", {"--print-config", "--store", dir.path()});
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_HAS(line_with(r.out, "batch_size"), "file (" + yaml + ":1)");
  }
  // The flag beats the file; a value the model cannot take is refused with the rule, on one line.
  test::write_file(yaml, "max_context: 128\n");
  auto r = test::run_bin("ringllama-generate", {"--config", yaml, "--print-config", "--store", dir.path()});
  EXPECT_EQ(r.status, 1);
  EXPECT_HAS(r.err, "ringllama-generate: error: config key 'max_context' = 128");
  EXPECT_HAS(r.err, "the model supports 64 positions");
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  r = test::run_bin("ringllama-generate",
                    {"--config", yaml, "--print-config", "--store", dir.path(), "--max-context", "48"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_HAS(line_with(r.out, "max_context"), "flag (--max-context)");

  test::write_file(yaml, "max_contxt: 12\n");
  r = test::run_bin("ringllama-generate", {"--config", yaml, "--print-config", "--store", dir.path()});
  EXPECT_EQ(r.status, 1);
  EXPECT_HAS(r.err, "unknown config key 'max_contxt'");
  EXPECT_HAS(r.err, "did you mean 'max_context'");
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;

  r = test::run_bin("ringllama-generate", {"--config", dir / "absent.yaml", "--print-config"});
  EXPECT_EQ(r.status, 1);
  EXPECT_HAS(r.err, "absent.yaml: cannot open");
}

}  // namespace
}  // namespace ringllama
