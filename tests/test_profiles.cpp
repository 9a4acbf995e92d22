// The YAML profiles under configs/ (DESIGN.md "Processes and folders"): each loads through
// ConfigLoader, and for its card and its host's DRAM both Llama 3.1 70B and 8B fit:
//   GPU:  the memory plan fits the card (gpu-<N>g: N GiB) at the profile's batch and context;
//   DRAM: the host plan on a host of that DRAM (dram-<M>g: M GiB, 90% of it available when idle)
//         sizes the loader daemon's window within 75% of the DRAM, leaving the rest to the OS, the
//         page cache and the processes; the whole 8B fits (no disk reads per token), and 70B keeps
//         at least what the prefetch needs, pinned layers reading fewer than all 80 per token.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <filesystem>
#include <iostream>

#include "common/config.h"
#include "common/host_plan.h"
#include "daemon/random_model.h"
#include "tests/test_util.h"
#include "worker/planner.h"

namespace ringllama {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t GiB = uint64_t{1} << 30;
constexpr double kDramShare = 0.75;

struct Profile {
  const char* file;
  int64_t card_gib;
  int64_t dram_gib;
};
constexpr Profile kProfiles[] = {
    {"gpu-16g-dram-32g.yaml", 16, 32},
    {"gpu-24g-dram-64g.yaml", 24, 64},
    {"gpu-40g-dram-64g.yaml", 40, 64},
    {"gpu-80g-dram-128g.yaml", 80, 128},
};

std::string configs_dir() { return (fs::path(test::data_dir()) / ".." / ".." / "configs").lexically_normal().string(); }

std::string text_of(const Profile& p) {
  const std::string path = configs_dir() + "/" + p.file;
  EXPECT_TRUE(fs::exists(path)) << path;
  return test::read_file(path);
}

TEST(Profiles, EveryProfileIsThere) {
  size_t yaml = 0;
  for (const auto& e : fs::directory_iterator(configs_dir()))
    if (e.path().extension() == ".yaml") ++yaml;
  EXPECT_EQ(yaml, std::size(kProfiles));
  for (const Profile& p : kProfiles) EXPECT_TRUE(fs::exists(configs_dir() + "/" + p.file)) << p.file;
}

TEST(Profiles, EachLoadsThroughConfigLoaderAndSaysWhatItIsFor) {
  for (const Profile& p : kProfiles) {
    SCOPED_TRACE(p.file);
    const std::string text = text_of(p);
    EXPECT_EQ(text.rfind("# ringllama profile: ", 0), 0u) << "a comment header first";
    std::string header;
    for (size_t at = 0; at < text.size() && text[at] == '#';) {
      const size_t end = std::min(text.find('\n', at), text.size());
      header += text.substr(at, end - at) + "\n";
      at = end + 1;
    }
    for (const char* why : {"cpu_cap_layers", "gpu_ahead_layers", "batch_size", "max_context",
                            "prefill_chunk_tokens", "kv_block_tokens", "70B", "8B", "DRAM"})
      EXPECT_NE(header.find(why), std::string::npos) << "the header explains " << why;
    ConfigLoader loader(kAllReaders);
    Config c;
    ASSERT_NO_THROW(c = loader.load_from(text, p.file, {}, {}));
    for (const char* key : {"cpu_cap_layers", "host_memory_fraction", "gpu_ahead_layers", "batch_size",
                            "max_context", "prefill_chunk_tokens", "kv_block_tokens"})
      EXPECT_EQ(loader.source(key).kind, "file") << key << " is set by the profile";
    EXPECT_EQ(c.cpu_cap_layers, kAuto) << "the window is sized per model from the host's memory";
  }
}

class ProfileFits : public ::testing::TestWithParam<std::tuple<Profile, const char*>> {};

TEST_P(ProfileFits, OnTheCardAndInTheDram) {
  const auto& [p, shape] = GetParam();
  ConfigLoader loader(kAllReaders);
  Config c = loader.load_from(text_of(p), p.file, {}, {});
  const Manifest man = Manifest::plan(random_shape(shape), std::string("random:") + shape);
  loader.adapt_to_model(c, man.model);

  const MemoryPlan plan = plan_memory(man, c, estimated_inputs(uint64_t(p.card_gib) * GiB));
  std::cout << p.file << " x " << shape << ": batch " << c.batch_size << ", max_context " << c.max_context
            << ", prefill " << c.prefill_chunk_tokens << ", ahead " << c.gpu_ahead_layers << ": "
            << format_bytes(plan.total_bytes) << " of " << format_bytes(plan.budget_bytes) << ", "
            << plan.resident_layers << " of " << plan.n_layers << " layers resident\n";
  EXPECT_TRUE(plan.fits) << plan.table() << plan.refusal();
  // Cards report less than their name: an H100 80GB 79.2 GiB, a T4 "16 GB" 15.0 GiB (15/16).
  const MemoryPlan real = plan_memory(man, c, estimated_inputs(uint64_t(p.card_gib) * GiB / 16 * 15));
  EXPECT_TRUE(real.fits) << real.table() << real.refusal();

  const uint64_t dram = uint64_t(p.dram_gib) * GiB;
  HostInputs host;
  host.mem_available_bytes = dram / 10 * 9;
  host.mem_source = "MemAvailable";
  host.window_locked = true;  // the daemon's segment; LimitMEMLOCK=infinity in its unit
  host.disk_gbps = 2.0;
  host.h2d_gbps = 25.0;
  std::string why;
  ASSERT_NO_THROW(c.cpu_cap_layers = resolve_cpu_cap_layers(man, c, host, &why));
  const HostPlan hp = plan_host(man, c, host, why, 0, false);
  std::cout << "  window " << hp.window_layers << " layers + globals = " << format_bytes(hp.window_bytes) << " of "
            << format_bytes(dram) << " DRAM; " << hp.disk_layers_per_step << " layers per token from the disk; "
            << why << "\n";
  EXPECT_LE(double(hp.window_bytes), kDramShare * double(dram))
      << hp.window_layers << " x " << format_bytes(man.max_layer_size()) << " + globals "
      << format_bytes(man.globals().size) << " is over " << kDramShare * 100 << "% of " << p.dram_gib << " GiB";
  if (std::string(shape) == "llama-3.1-8b") {
    EXPECT_EQ(hp.window_layers, man.model.n_layers) << "the whole 8B stays in DRAM";
    EXPECT_EQ(hp.disk_layers_per_step, 0);
  } else {
    EXPECT_GE(hp.window_layers, min_window_layers(man, c));
    EXPECT_EQ(hp.disk_layers_per_step, man.model.n_layers - hp.window_layers + 2) << "pinned layers are not re-read";
    EXPECT_EQ(hp.bound, "disk");
    EXPECT_NE(hp.table().find(fmt::format("{} layers per step", hp.disk_layers_per_step)), std::string::npos)
        << hp.table();
  }
}

INSTANTIATE_TEST_SUITE_P(AllProfiles, ProfileFits,
                         ::testing::Combine(::testing::ValuesIn(kProfiles),
                                            ::testing::Values("llama-3.1-70b", "llama-3.1-8b")),
                         [](const auto& info) {
                           std::string n = std::string(std::get<0>(info.param).file) + "_" + std::get<1>(info.param);
                           for (char& ch : n)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

}  // namespace
}  // namespace ringllama
