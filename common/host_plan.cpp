#include "common/host_plan.h"

#include <fmt/format.h>
#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>

#include "common/errors.h"
#include "common/io_reader.h"
#include "common/segment.h"
#include "common/store.h"
#include "common/window_policy.h"

namespace ringllama {

namespace {

constexpr double kGiBd = 1024.0 * 1024.0 * 1024.0;

std::string gib(uint64_t b) {
  if (b == kUnlimited) return "unlimited";
  if (b >= (uint64_t{1} << 30)) return fmt::format("{:.1f} GiB", static_cast<double>(b) / kGiBd);
  if (b >= (uint64_t{1} << 20)) return fmt::format("{:.1f} MiB", static_cast<double>(b) / (1 << 20));
  return fmt::format("{:.1f} KiB", static_cast<double>(b) / 1024);
}

// The most slots (<= n_layers) whose window fits in `limit` bytes; 0 when not even one does.
int64_t most_slots_within(const Manifest& m, uint64_t limit) {
  int64_t best = 0;
  for (int64_t s = 1; s <= m.model.n_layers; ++s)
    if (window_bytes(m, s) <= limit) best = s;
  return best;
}

double tokens_per_s(uint64_t bytes_per_step, double gbps) {
  return bytes_per_step > 0 && gbps > 0 ? gbps * 1e9 / static_cast<double>(bytes_per_step) : 0;
}

// Batch-1 ceiling of a plan with `slots` window layers: the lower of the disk's and PCIe's.
double ceiling_for(const Manifest& m, const Config& c, const HostInputs& in, int64_t slots, int64_t gpu_resident,
                   bool gpu, std::string* bound) {
  Config x = c;
  x.cpu_cap_layers = slots;
  const HostPlan p = plan_host(m, x, in, "", gpu_resident, gpu);
  if (bound) *bound = p.bound;
  return p.bound_tokens_per_s;
}

}  // namespace

void HostOverrides::add_flags(CLI::App& app) {
  app.add_option("--host-memory", host_memory_gib,
                 "plan the host part for this many GiB of available memory instead of this machine's MemAvailable");
  app.add_option("--disk-gbps", disk_gbps, "the store's disk reads this many GB/s (skips measuring it)");
}

HostInputs read_host_inputs(const HostOverrides& o, bool window_locked) {
  if (o.host_memory_gib < 0 || o.host_memory_gib > 1 << 24)
    fail("--host-memory must be a size in GiB above 0 (got {})", o.host_memory_gib);
  if (o.disk_gbps < 0 || o.disk_gbps > 1e4) fail("--disk-gbps must be a rate in GB/s above 0 (got {})", o.disk_gbps);
  HostInputs in;
  in.window_locked = window_locked;
  if (o.host_memory_gib > 0) {
    in.mem_available_bytes = static_cast<uint64_t>(o.host_memory_gib * kGiBd);
    in.mem_source = "--host-memory";
  } else {
    std::ifstream f("/proc/meminfo");
    std::string line;
    while (std::getline(f, line)) {
      if (line.rfind("MemAvailable:", 0) != 0) continue;
      std::istringstream ss(line.substr(13));
      uint64_t kib = 0;
      ss >> kib;
      in.mem_available_bytes = kib * 1024;
    }
    if (in.mem_available_bytes == 0)
      fail("cannot read MemAvailable from /proc/meminfo; pass --host-memory GB (the memory the window may use)");
    in.mem_source = "MemAvailable";
  }
  rlimit rl{};
  if (::getrlimit(RLIMIT_MEMLOCK, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
    in.memlock_limit_bytes = static_cast<uint64_t>(rl.rlim_cur);
  if (o.disk_gbps > 0) {
    in.disk_gbps = o.disk_gbps;
    in.disk_source = "--disk-gbps";
  }
  return in;
}

double measure_disk_gbps(const std::string& store_dir, const Config& config, uint64_t bytes, std::string* note) {
  const Store store = Store::open(store_dir);
  IoReader io(store.weights_path(), io_options(config));
  const uint64_t align = std::max<uint64_t>(io.mem_align(), 4096);
  // Past the globals, in whole aligned blocks: the bytes a window fill reads.
  const uint64_t from = std::min(store.manifest().globals().size, io.file_size()) / align * align;
  uint64_t len = std::min<uint64_t>(bytes, io.file_size() - from) / align * align;
  if (len == 0) len = io.file_size() / align * align;
  if (len == 0) fail("{}: too small to measure the disk", store.weights_path());
  void* p = nullptr;
  if (posix_memalign(&p, align, len) != 0) fail("cannot allocate {} bytes to measure the disk", len);
  std::unique_ptr<void, void (*)(void*)> buf(p, std::free);
  const auto t0 = std::chrono::steady_clock::now();
  io.read(from == len ? 0 : from, len, buf.get());
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double rate = static_cast<double>(len) / std::max(s, 1e-9) / 1e9;
  if (note)
    *note = fmt::format("measured: {} {} in {:.0f} ms", gib(len),
                        io.direct() ? "O_DIRECT" : "buffered (no O_DIRECT here: the page cache may flatter it)",
                        s * 1e3);
  return rate;
}

uint64_t window_bytes(const Manifest& m, int64_t slots) {
  return SegmentLayout::for_manifest(m, std::min(slots, m.model.n_layers)).total_bytes;
}

int64_t min_window_layers(const Manifest& m, const Config& c) {
  const int64_t want = std::max(c.gpu_ahead_layers + 1, default_cycle_slots(m.model.n_layers, c.back_margin) + 1);
  return std::min(m.model.n_layers, std::max<int64_t>(1, want));
}

int64_t resolve_cpu_cap_layers(const Manifest& m, const Config& c, const HostInputs& in, std::string* why) {
  const int64_t n = m.model.n_layers;
  const uint64_t lock = in.window_locked ? in.memlock_limit_bytes : kUnlimited;
  if (c.cpu_cap_layers != kAuto) {
    const int64_t slots = std::min(c.cpu_cap_layers, n);
    const uint64_t need = window_bytes(m, slots);
    if (need > in.mem_available_bytes)
      throw ConfigError(fmt::format(
          "cpu_cap_layers {}: the window needs {} bytes ({}: globals and {} layer slots), {} has {} bytes ({}); "
          "lower cpu_cap_layers to {} or leave it auto",
          c.cpu_cap_layers, need, gib(need), slots, in.mem_source, in.mem_available_bytes, gib(in.mem_available_bytes),
          most_slots_within(m, in.mem_available_bytes)));
    if (need > lock)
      throw ConfigError(fmt::format(
          "cpu_cap_layers {}: the window needs {} bytes ({}) locked in memory, over RLIMIT_MEMLOCK {} bytes ({}); "
          "raise the limit (LimitMEMLOCK=infinity in the systemd unit, or ulimit -l) or lower cpu_cap_layers to {}",
          c.cpu_cap_layers, need, gib(need), lock, gib(lock), most_slots_within(m, lock)));
    if (why) *why = fmt::format("cpu_cap_layers {} as set", c.cpu_cap_layers);
    return slots;
  }
  const uint64_t budget =
      std::min<uint64_t>(static_cast<uint64_t>(c.host_memory_fraction * static_cast<double>(in.mem_available_bytes)),
                         lock);
  const std::string budget_text = fmt::format("{} of {} {}{}", c.host_memory_fraction, in.mem_source,
                                              gib(in.mem_available_bytes),
                                              lock != kUnlimited ? fmt::format(", RLIMIT_MEMLOCK {}", gib(lock)) : "");
  const int64_t fit = most_slots_within(m, budget);
  if (fit == n) {
    if (why) *why = fmt::format("auto: all {} layers fit in {} ({})", n, gib(budget), budget_text);
    return n;
  }
  const int64_t floor = min_window_layers(m, c);
  if (fit >= floor) {
    if (why) *why = fmt::format("auto: {} of {} layers fit in {} ({})", fit, n, gib(budget), budget_text);
    return fit;
  }
  const uint64_t need = window_bytes(m, floor);
  if (need > std::min(in.mem_available_bytes, lock))
    throw ConfigError(fmt::format(
        "cpu_cap_layers auto: even the smallest window ({} layers, what gpu_ahead_layers {} needs) takes {} bytes "
        "({}), over {} {}{}; free memory or lower gpu_ahead_layers",
        floor, c.gpu_ahead_layers, need, gib(need), in.mem_source, gib(in.mem_available_bytes),
        lock != kUnlimited ? fmt::format(" or RLIMIT_MEMLOCK {}", gib(lock)) : ""));
  if (why)
    *why = fmt::format("auto: {} layers, the fewest gpu_ahead_layers {} needs, though only {} fit in {} ({})", floor,
                       c.gpu_ahead_layers, fit, gib(budget), budget_text);
  return floor;
}

WindowParams window_params(const Manifest& m, const Config& c, bool locked, std::string* why) {
  int64_t cap = c.cpu_cap_layers;
  if (cap == kAuto) {
    cap = resolve_cpu_cap_layers(m, c, read_host_inputs(HostOverrides{}, locked), why);
  } else if (why) {
    *why = fmt::format("cpu_cap_layers {} as set", cap);
  }
  cap = std::min(cap, m.model.n_layers);
  const int64_t cycle = c.cycle_slots == kAuto ? default_cycle_slots(cap, c.back_margin) : c.cycle_slots;
  return WindowParams{m.model.n_layers, cap, c.back_margin, cycle};
}

HostPlan plan_host(const Manifest& m, const Config& c, const HostInputs& in, const std::string& window_why,
                   int64_t gpu_resident_layers, bool gpu) {
  if (c.cpu_cap_layers == kAuto) fail("host plan: cpu_cap_layers is still auto (resolve it first)");
  HostPlan p;
  p.n_layers = m.model.n_layers;
  p.window_layers = std::min(c.cpu_cap_layers, p.n_layers);
  p.gpu = gpu;
  p.gpu_resident_layers = std::min(gpu_resident_layers, p.n_layers);
  // The layers the GPU keeps never come back to the window after the start (a window that feeds
  // one GPU gives them no slot).
  WindowParams wp = window_params(m, c, in.window_locked);
  if (gpu) wp.first_layer = p.gpu_resident_layers;
  WindowPolicy policy(wp);
  p.disk_layers_per_step = layers_read_per_pass(wp);
  p.pinned_layers = policy.pinned_layers();
  p.cycling_slots = policy.cycling_slots();
  p.window_why = window_why;
  p.globals_bytes = m.globals().size;
  p.layer_bytes = m.max_layer_size();
  p.window_bytes = window_bytes(m, p.window_layers);
  p.registered_bytes = gpu && p.gpu_resident_layers < p.n_layers ? p.window_bytes : 0;
  p.mem_available = in.mem_available_bytes;
  p.mem_source = in.mem_source;
  p.fraction = c.host_memory_fraction;
  p.memlock_limit = in.memlock_limit_bytes;
  p.window_locked = in.window_locked;

  const int64_t streamed = p.n_layers - p.gpu_resident_layers;
  p.disk_bytes_per_step = static_cast<uint64_t>(p.disk_layers_per_step) * p.layer_bytes;
  p.pcie_layers_per_step = gpu ? streamed : 0;
  p.pcie_bytes_per_step = static_cast<uint64_t>(p.pcie_layers_per_step) * p.layer_bytes;
  p.disk_gbps = in.disk_gbps;
  p.h2d_gbps = in.h2d_gbps;
  p.disk_source = in.disk_source;
  p.h2d_source = in.h2d_source;
  p.disk_tokens_per_s = tokens_per_s(p.disk_bytes_per_step, p.disk_gbps);
  p.pcie_tokens_per_s = tokens_per_s(p.pcie_bytes_per_step, p.h2d_gbps);
  p.bound = "none";
  if (p.disk_tokens_per_s > 0 && (p.pcie_tokens_per_s == 0 || p.disk_tokens_per_s <= p.pcie_tokens_per_s)) {
    p.bound = "disk";
    p.bound_tokens_per_s = p.disk_tokens_per_s;
  } else if (p.pcie_tokens_per_s > 0) {
    p.bound = "PCIe";
    p.bound_tokens_per_s = p.pcie_tokens_per_s;
  }

  if (p.bound == "disk" && !window_why.empty()) {
    // More slots pin more layers: the smallest window that lifts the disk bound, within the RAM.
    const uint64_t lock = in.window_locked ? in.memlock_limit_bytes : kUnlimited;
    const int64_t in_fraction = most_slots_within(
        m, std::min<uint64_t>(static_cast<uint64_t>(c.host_memory_fraction * static_cast<double>(in.mem_available_bytes)),
                              lock));
    const int64_t in_ram = most_slots_within(m, std::min(in.mem_available_bytes, lock));
    auto describe = [&](int64_t slots) {
      std::string b;
      const double t = ceiling_for(m, c, in, slots, gpu_resident_layers, gpu, &b);
      if (b == "disk")
        return fmt::format("would raise the disk's ceiling to <= {:.2f} tokens/s from <= {:.2f} (still disk-bound)", t,
                           p.bound_tokens_per_s);
      return fmt::format("would make decode {}-bound: <= {:.2f} tokens/s instead of <= {:.2f}",
                         b == "none" ? "compute" : b, t, p.bound_tokens_per_s);
    };
    if (in_fraction > p.window_layers) {
      p.advice = fmt::format("the disk binds: cpu_cap_layers {} -> {} {} (it fits in {} of {})", p.window_layers,
                             in_fraction, describe(in_fraction), c.host_memory_fraction, p.mem_source);
    } else if (in_ram > p.window_layers) {
      const double f = std::min(1.0, static_cast<double>(window_bytes(m, in_ram)) /
                                         static_cast<double>(std::max<uint64_t>(in.mem_available_bytes, 1)) + 0.01);
      p.advice = fmt::format("the disk binds: host_memory_fraction {} -> {:.2f} (cpu_cap_layers {} -> {}) {}",
                             c.host_memory_fraction, f, p.window_layers, in_ram, describe(in_ram));
    } else {
      p.advice = fmt::format(
          "the disk binds and {} holds no more layers: every layer in DRAM needs {} ({} bytes); a faster disk or "
          "more memory lifts it",
          p.mem_source, gib(window_bytes(m, p.n_layers)), window_bytes(m, p.n_layers));
    }
  }
  return p;
}

std::string HostPlan::table() const {
  std::string out = fmt::format("{:<24} {:>14}  {:>10}  {}\n", "host", "bytes", "size", "note");
  auto line = [&](const std::string& what, uint64_t b, const std::string& note) {
    out += fmt::format("{:<24} {:>14}  {:>10}  {}\n", what, b, gib(b), note);
  };
  std::string wnote = fmt::format("globals {} + {} of {} layers x {}", gib(globals_bytes), window_layers, n_layers,
                                  gib(layer_bytes));
  if (cycling_slots > 0)
    wnote += fmt::format(" (the last {} pinned, {} slots cycle the {} before)", pinned_layers, cycling_slots,
                         disk_layers_per_step);
  if (!window_why.empty()) wnote += "; " + window_why;
  line("window (segment)", window_bytes, wnote);
  line("registered with CUDA", registered_bytes,
       registered_bytes ? "the window, pinned for DMA" : (gpu ? "none: every layer is resident on the GPU" : "no GPU"));
  line(mem_source, mem_available, fmt::format("{} left after the window; host_memory_fraction {}",
                                              gib(mem_available > window_bytes ? mem_available - window_bytes : 0),
                                              fraction));
  if (window_locked)
    out += fmt::format("{:<24} {:>14}  {:>10}  {}\n", "RLIMIT_MEMLOCK",
                       memlock_limit == kUnlimited ? std::string("-") : std::to_string(memlock_limit), gib(memlock_limit),
                       "the window is locked in memory");
  auto link = [&](const char* name, int64_t layers, uint64_t bytes, double gbps, const std::string& src, double tps) {
    std::string rate = gbps > 0 ? fmt::format("{:.2f} GB/s ({})", gbps, src) : "rate not measured";
    std::string ceiling = bytes == 0 ? "no bytes per step" : tps > 0 ? fmt::format("<= {:.2f} tokens/s", tps) : "-";
    out += fmt::format("{:<24} {:>14}  {:>10}  {} layers per step / {}: {}\n", name, bytes, gib(bytes), layers, rate,
                       ceiling);
  };
  link("disk per step", disk_layers_per_step, disk_bytes_per_step, disk_gbps, disk_source, disk_tokens_per_s);
  if (gpu) link("PCIe per step", pcie_layers_per_step, pcie_bytes_per_step, h2d_gbps, h2d_source, pcie_tokens_per_s);
  if (bound == "none")
    out += "bound: nothing streams per step: compute and device memory set the pace\n";
  else
    out += fmt::format("bound: {} (batch 1: <= {:.2f} tokens/s; a step serves a whole batch for the same bytes)\n",
                       bound, bound_tokens_per_s);
  if (!advice.empty()) out += advice + "\n";
  return out;
}

HostPlan host_plan_at_start(const Manifest& m, Config& c, const HostOverrides& o, bool window_locked, double h2d_gbps,
                            const std::string& h2d_source, int64_t gpu_resident_layers, bool gpu) {
  HostInputs in = read_host_inputs(o, window_locked);
  std::string why;
  c.cpu_cap_layers = resolve_cpu_cap_layers(m, c, in, &why);
  in.h2d_gbps = h2d_gbps;
  in.h2d_source = h2d_source;
  const HostPlan plan = plan_host(m, c, in, why, gpu_resident_layers, gpu);
  // The disk is read at start only where a step reads it: a window that holds every streamed
  // layer needs no rate, and its start-up no extra 256 MiB read.
  if (in.disk_gbps > 0 || c.store.empty() || plan.disk_bytes_per_step == 0) return plan;
  try {
    in.disk_gbps = measure_disk_gbps(c.store, c, uint64_t{256} << 20, &in.disk_source);
  } catch (const std::exception& e) {
    in.disk_source = fmt::format("not measured: {}", e.what());
  }
  return plan_host(m, c, in, why, gpu_resident_layers, gpu);
}

}  // namespace ringllama
