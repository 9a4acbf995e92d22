// The host side of the plan (common/host_plan.h): auto cpu_cap_layers against made-up
// MemAvailable and memlock figures, the refusals of what cannot fit (bytes and limits named), and
// the bound each link sets per step, on the real Llama 3.1 8B and 70B shapes (manifests only).
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <string>

#include "common/errors.h"
#include "common/host_plan.h"
#include "daemon/random_model.h"

namespace ringllama {
namespace {

constexpr uint64_t GiB = uint64_t{1} << 30;

Manifest shape(const char* name) { return Manifest::plan(random_shape(name), std::string("random:") + name); }

HostInputs machine(double mem_gib, double disk_gbps = 1.6, double h2d_gbps = 52) {
  HostInputs in;
  in.mem_available_bytes = static_cast<uint64_t>(mem_gib * GiB);
  in.mem_source = "MemAvailable";
  in.disk_gbps = disk_gbps;
  in.disk_source = "test";
  in.h2d_gbps = h2d_gbps;
  in.h2d_source = "test";
  return in;
}

Config auto_config() {
  Config c;
  EXPECT_EQ(c.cpu_cap_layers, kAuto) << "cpu_cap_layers is auto by default";
  EXPECT_DOUBLE_EQ(c.host_memory_fraction, 0.75);
  return c;
}

std::string error_of(const Manifest& m, const Config& c, const HostInputs& in) {
  try {
    resolve_cpu_cap_layers(m, c, in, nullptr);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(HostPlan, WindowBytesAreTheSegmentLayout) {
  const Manifest m = shape("llama-3.1-8b");
  // Globals + slots, each rounded up, plus the tables: a little over the bytes of the layers.
  const uint64_t raw = m.globals().size + 32 * m.max_layer_size();
  EXPECT_GE(window_bytes(m, 32), raw);
  EXPECT_LT(window_bytes(m, 32), raw + 64 * (uint64_t{1} << 20));
  EXPECT_EQ(window_bytes(m, 40), window_bytes(m, 32)) << "slots beyond the layers count for nothing";
  EXPECT_LT(window_bytes(m, 12), window_bytes(m, 13));
}

TEST(HostPlan, AutoTakesEveryLayerWhenTheyFitInTheFractionOfMemAvailable) {
  const Manifest m = shape("llama-3.1-8b");  // 15.0 GiB
  const Config c = auto_config();
  std::string why;
  EXPECT_EQ(resolve_cpu_cap_layers(m, c, machine(125), &why), 32);
  EXPECT_NE(why.find("all 32 layers fit"), std::string::npos) << why;
  // 0.75 x 21 GiB = 15.75 GiB: still all of it; 0.75 x 19 GiB = 14.25 GiB: no longer.
  EXPECT_EQ(resolve_cpu_cap_layers(m, c, machine(21), nullptr), 32);
  const int64_t at19 = resolve_cpu_cap_layers(m, c, machine(19), &why);
  EXPECT_LT(at19, 32);
  EXPECT_NE(why.find("of 32 layers fit"), std::string::npos) << why;
  EXPECT_LE(window_bytes(m, at19), static_cast<uint64_t>(0.75 * 19 * GiB));
  EXPECT_GT(window_bytes(m, at19 + 1), static_cast<uint64_t>(0.75 * 19 * GiB)) << "the most that fit";
}

TEST(HostPlan, AutoFollowsTheFraction) {
  const Manifest m = shape("llama-3.1-70b");
  Config c = auto_config();
  const int64_t at75 = resolve_cpu_cap_layers(m, c, machine(64), nullptr);
  c.host_memory_fraction = 0.5;
  const int64_t at50 = resolve_cpu_cap_layers(m, c, machine(64), nullptr);
  EXPECT_GT(at75, at50);
  // 70B: 3.9 GiB of globals, 1.6 GiB a layer. 0.75 x 64 = 48 GiB: 27 layers; 0.5 x 64: 17.
  EXPECT_EQ(at75, 27);
  EXPECT_EQ(at50, 17);
}

TEST(HostPlan, AutoCountsTheMemlockLimitWhereTheWindowIsLocked) {
  const Manifest m = shape("llama-3.1-8b");
  const Config c = auto_config();
  HostInputs in = machine(125);
  in.memlock_limit_bytes = 8 * GiB;
  EXPECT_EQ(resolve_cpu_cap_layers(m, c, in, nullptr), 32) << "an unlocked window ignores RLIMIT_MEMLOCK";
  in.window_locked = true;
  std::string why;
  const int64_t locked = resolve_cpu_cap_layers(m, c, in, &why);
  EXPECT_LE(window_bytes(m, locked), 8 * GiB);
  EXPECT_GT(window_bytes(m, locked + 1), 8 * GiB);
  EXPECT_NE(why.find("RLIMIT_MEMLOCK"), std::string::npos) << why;
}

TEST(HostPlan, AutoNeverGoesBelowWhatThePrefetchNeeds) {
  const Manifest m = shape("llama-3.1-70b");
  Config c = auto_config();
  c.gpu_ahead_layers = 4;
  EXPECT_EQ(min_window_layers(m, c), 5);
  // 0.75 x 12 GiB = 9 GiB: 3 layers beside the globals, fewer than the 5 the prefetch needs,
  // which still fit in the 12 GiB itself: the floor, said so.
  std::string why;
  EXPECT_EQ(resolve_cpu_cap_layers(m, c, machine(12), &why), 5);
  EXPECT_NE(why.find("the fewest gpu_ahead_layers 4 needs"), std::string::npos) << why;
  // Not even the floor fits: refused with the bytes and the memory.
  const std::string e = error_of(m, c, machine(8));
  EXPECT_NE(e.find("cpu_cap_layers auto: even the smallest window (5 layers"), std::string::npos) << e;
  EXPECT_NE(e.find(std::to_string(window_bytes(m, 5))), std::string::npos) << e;
  EXPECT_NE(e.find("MemAvailable 8.0 GiB"), std::string::npos) << e;
}

TEST(HostPlan, AnExplicitWindowOverMemAvailableIsRefusedWithBytesAndLimit) {
  const Manifest m = shape("llama-3.1-70b");
  Config c = auto_config();
  c.cpu_cap_layers = 40;
  const std::string e = error_of(m, c, machine(32));
  EXPECT_NE(e.find("cpu_cap_layers 40: the window needs " + std::to_string(window_bytes(m, 40)) + " bytes"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("MemAvailable has " + std::to_string(static_cast<uint64_t>(32.0 * GiB)) + " bytes"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("lower cpu_cap_layers to 17"), std::string::npos) << e;  // (32 - 3.9) / 1.6
  // The same count within the memory is taken as set, even over the fraction: the operator's call.
  c.cpu_cap_layers = 17;
  std::string why;
  EXPECT_EQ(resolve_cpu_cap_layers(m, c, machine(32), &why), 17);
  EXPECT_EQ(why, "cpu_cap_layers 17 as set");
}

TEST(HostPlan, AnExplicitLockedWindowOverRlimitMemlockIsRefused) {
  const Manifest m = shape("llama-3.1-8b");
  Config c = auto_config();
  c.cpu_cap_layers = 32;
  HostInputs in = machine(125);
  in.window_locked = true;
  in.memlock_limit_bytes = 64 << 20;  // a distribution's default 64 MiB
  const std::string e = error_of(m, c, in);
  EXPECT_NE(e.find("locked in memory, over RLIMIT_MEMLOCK 67108864 bytes"), std::string::npos) << e;
  EXPECT_NE(e.find("LimitMEMLOCK=infinity"), std::string::npos) << e;
  in.memlock_limit_bytes = kUnlimited;
  EXPECT_EQ(error_of(m, c, in), "(no error)");
}

TEST(HostPlan, TheBoundOfEachLink) {
  const Manifest m = shape("llama-3.1-8b");
  Config c = auto_config();
  c.cpu_cap_layers = 32;
  // Everything in DRAM, 8 layers on the GPU: PCIe carries 24 layers a step, the disk nothing.
  HostPlan p = plan_host(m, c, machine(125), "test", 8, true);
  EXPECT_EQ(p.disk_layers_per_step, 0);
  EXPECT_EQ(p.pcie_layers_per_step, 24);
  EXPECT_EQ(p.pcie_bytes_per_step, 24 * m.max_layer_size());
  EXPECT_EQ(p.bound, "PCIe");
  EXPECT_NEAR(p.bound_tokens_per_s, 52e9 / (24.0 * m.max_layer_size()), 1e-9);
  EXPECT_TRUE(p.advice.empty()) << p.advice;
  EXPECT_EQ(p.registered_bytes, p.window_bytes);

  // A 12-layer window beside 8 resident layers: the last 10 pinned, 2 slots cycle the 14 between.
  c.cpu_cap_layers = 12;
  p = plan_host(m, c, machine(125), "cpu_cap_layers 12 as set", 8, true);
  EXPECT_EQ(p.pinned_layers, 10);
  EXPECT_EQ(p.cycling_slots, 2);
  EXPECT_EQ(p.disk_layers_per_step, 14);
  EXPECT_EQ(p.bound, "disk");
  EXPECT_NEAR(p.bound_tokens_per_s, 1.6e9 / (14.0 * m.max_layer_size()), 1e-9);
  // The knob that lifts it, and the figure it would reach.
  EXPECT_NE(p.advice.find("cpu_cap_layers 12 -> 32 would make decode PCIe-bound"), std::string::npos) << p.advice;
  EXPECT_NE(p.advice.find(fmt::format("<= {:.2f} tokens/s", 52e9 / (24.0 * m.max_layer_size()))), std::string::npos)
      << p.advice;
  const std::string t = p.table();
  for (const char* s : {"window (segment)", "disk per step", "PCIe per step", "bound: disk", "the last 10 pinned"})
    EXPECT_NE(t.find(s), std::string::npos) << s << " in\n" << t;

  // The CPU backend: no PCIe line, the disk alone, every layer read through the window.
  p = plan_host(m, c, machine(125), "x", 32, false);
  EXPECT_EQ(p.disk_layers_per_step, 22);
  EXPECT_EQ(p.pcie_bytes_per_step, 0u);
  EXPECT_EQ(p.registered_bytes, 0u);
  EXPECT_EQ(p.bound, "disk");
}

TEST(HostPlan, WhenRamHoldsNoMoreTheAdviceSaysSo) {
  const Manifest m = shape("llama-3.1-70b");
  Config c = auto_config();
  HostInputs in = machine(24);
  std::string why;
  c.cpu_cap_layers = resolve_cpu_cap_layers(m, c, in, &why);
  const HostPlan p = plan_host(m, c, in, why, 0, true);
  EXPECT_EQ(p.bound, "disk");
  // Auto already took what the fraction allows: the fraction is the knob, up to what RAM holds.
  EXPECT_NE(p.advice.find("host_memory_fraction 0.75 ->"), std::string::npos) << p.advice;
  c.host_memory_fraction = 1.0;
  c.cpu_cap_layers = kAuto;
  c.cpu_cap_layers = resolve_cpu_cap_layers(m, c, in, &why);
  const HostPlan full = plan_host(m, c, in, why, 0, true);
  EXPECT_NE(full.advice.find("holds no more layers"), std::string::npos) << full.advice;
}

TEST(HostPlan, TheLocalWindowParametersResolveAuto) {
  const Manifest m = shape("tiny");
  Config c = auto_config();
  const WindowParams p = window_params(m, c, false);
  EXPECT_EQ(p.cpu_cap_layers, m.model.n_layers) << "a tiny model fits in any machine";
  c.cpu_cap_layers = 1;
  c.gpu_ahead_layers = 1;
  const WindowParams one = window_params(m, c, false);
  EXPECT_EQ(one.cpu_cap_layers, 1);
  EXPECT_EQ(one.cycle_slots, 1) << "a window smaller than two slots is a plain ring";
}

}  // namespace
}  // namespace ringllama
