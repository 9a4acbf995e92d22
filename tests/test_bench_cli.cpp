// ringllama-bench's command line, as a real process, where no GPU is needed to judge it: the
// arguments --daemon needs, and a loader daemon that is absent or serves another store, each refused
// with a clear message before the GPU is touched (never a hang). The bench exists only in CUDA
// builds; elsewhere the suite skips.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include "tests/test_loaderd_proc.h"
#include "tests/test_util.h"
#ifdef RINGLLAMA_HAVE_CUDA
#include "kernels/device_info.h"
#endif

namespace ringllama {
namespace {

namespace fs = std::filesystem;
using test::Proc;
using test::run_bin;

bool have_bench() { return fs::exists(test::bin_dir() + "/ringllama-bench"); }

bool have_gpu() {
#ifdef RINGLLAMA_HAVE_CUDA
  return cuda_device_count() > 0;
#else
  return false;
#endif
}

#define SKIP_WITHOUT_BENCH() \
  if (!have_bench()) GTEST_SKIP() << "no ringllama-bench in " << test::bin_dir() << " (a build without CUDA)"

TEST(BenchCli, DaemonNeedsTheStreamedMode) {
  SKIP_WITHOUT_BENCH();
  auto r = run_bin("ringllama-bench", {"--daemon", "ipc:///nonexistent/ringllama.sock"}, 30);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("--daemon measures the streamed mode: give --gpu-budget-gib too"), std::string::npos) << r.err;

  r = run_bin("ringllama-bench", {"--daemon", "ipc:///nonexistent/ringllama.sock", "--gpu-budget-gib", "4",
                                  "--long-context", "1024"},
              30);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("--long-context is a resident run's: not with --daemon"), std::string::npos) << r.err;

  r = run_bin("ringllama-bench", {"--daemon", "ipc:///nonexistent/ringllama.sock", "--h2d-only"}, 30);
  EXPECT_NE(r.status, 0);
  EXPECT_NE((r.out + r.err).find("excludes"), std::string::npos) << r.out << r.err;
}

TEST(BenchCli, NoDaemonFailsFast) {
  SKIP_WITHOUT_BENCH();
  test::TempDir tmp;
  const auto t0 = std::chrono::steady_clock::now();
  auto r = run_bin("ringllama-bench", {"--daemon", "ipc://" + (tmp / "none.sock"), "--gpu-budget-gib", "4"}, 30);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("is ringllama-loaderd running?"), std::string::npos) << r.err;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(3));
}

// A daemon serving store a: the bench with --store b is refused by name; without --store it takes
// a (the welcome's) and, with no GPU here, stops at the GPU after saying goodbye to the daemon.
TEST(BenchCli, DaemonStoreIsChecked) {
  SKIP_WITHOUT_BENCH();
  test::TempDir tmp;
  const std::string a = tmp / "a", b = tmp / "b";
  ASSERT_EQ(run_bin("ringllama-pack", {"--random", "tiny", "--out", a, "--quiet"}, 60).status, 0);
  ASSERT_EQ(run_bin("ringllama-pack", {"--random", "tiny", "--seed", "7", "--out", b, "--quiet"}, 60).status, 0);
  const std::string control = "ipc://" + (tmp / "ctl.sock");
  Proc d("ringllama-loaderd", {"--store", a, "--control", control, "--mlock", "warn"}, tmp / "daemon.log");
  ASSERT_TRUE(test::wait_daemon_ready(d, control)) << d.log();

  auto r = run_bin("ringllama-bench", {"--daemon", control, "--store", b, "--gpu-budget-gib", "4"}, 60);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("is not the store the loader daemon"), std::string::npos) << r.err;

  if (!have_gpu()) {
    r = run_bin("ringllama-bench", {"--daemon", control, "--gpu-budget-gib", "4"}, 60);
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.err.find("needs a CUDA GPU"), std::string::npos) << r.err;
    // It had reached the daemon, and left it as a worker does.
    bool said_bye = false;
    ASSERT_TRUE(test::eventually(
        [&] {
          const nlohmann::json s = test::daemon_stats(control);
          if (!s.is_object()) return false;
          for (const auto& x : s["detached"])
            if (x["name"].get<std::string>().rfind("bench-", 0) == 0 && x["reason"] == "said bye") said_bye = true;
          return said_bye;
        },
        10000))
        << d.log();
  }
  d.signal(SIGTERM);
  EXPECT_EQ(d.wait(10000), 0) << d.log();
}

}  // namespace
}  // namespace ringllama
