// The host side of the plan (DESIGN.md "The host plan"): how many layers the shared-memory window
// holds (cpu_cap_layers, auto by default), what that costs in DRAM and locked memory, and the bound
// each link then sets on a step: bytes from disk (layers outside the window) over the disk's rate,
// bytes over PCIe (layers not resident on the GPU) over the H2D rate. A pure computation over the
// manifest, the config and a few figures (HostInputs), so that `--plan-only --host-memory GB
// --disk-gbps X` plans for a machine that is not this one; read_host_inputs() and
// measure_disk_gbps() take the figures from this machine.
#pragma once

#include <cstdint>
#include <limits>
#include <string>

#include "common/config.h"
#include "common/manifest.h"
#include "common/window_policy.h"

namespace CLI {
class App;
}

namespace ringllama {

inline constexpr uint64_t kUnlimited = std::numeric_limits<uint64_t>::max();

struct HostInputs {
  uint64_t mem_available_bytes = 0;        // MemAvailable at start, or --host-memory
  std::string mem_source;                  // "MemAvailable" or "--host-memory"
  uint64_t memlock_limit_bytes = kUnlimited;  // RLIMIT_MEMLOCK (soft); kUnlimited: none
  bool window_locked = false;              // the window is mlock'ed (the daemon's segment): memlock counts
  double disk_gbps = 0;                    // O_DIRECT read rate of the store, GB/s; 0 = not known
  std::string disk_source;                 // "measured: 256 MiB O_DIRECT" or "--disk-gbps"
  double h2d_gbps = 0;                     // pinned host-to-device, GB/s; 0 = no GPU / not measured
  std::string h2d_source;
};

// Flags that replace this machine's figures: --host-memory GB, --disk-gbps X.
struct HostOverrides {
  double host_memory_gib = 0;  // 0 = MemAvailable
  double disk_gbps = 0;        // 0 = measure
  void add_flags(CLI::App& app);
  bool any() const { return host_memory_gib > 0 || disk_gbps > 0; }
};

// MemAvailable from /proc/meminfo and RLIMIT_MEMLOCK, with the overrides applied (the disk rate is
// only set from --disk-gbps here; measure_disk_gbps() measures it).
HostInputs read_host_inputs(const HostOverrides& o, bool window_locked);

// Reads up to `bytes` of the store's weights.bin with O_DIRECT through the io_uring reader, in the
// window's block size and queue depth; GB/s. `note` says what was read and how. Throws Error.
double measure_disk_gbps(const std::string& store_dir, const Config& config, uint64_t bytes, std::string* note);

// The window's bytes for a number of slots: the daemon's segment layout (header, tables, globals,
// slots), which the worker's own window matches within its alignment.
uint64_t window_bytes(const Manifest& m, int64_t slots);

// What auto cpu_cap_layers picks and why: every layer when the globals plus all of them fit in
// host_memory_fraction of MemAvailable (and the memlock limit, where the window is locked);
// otherwise the most that fit, never fewer than min_window_layers(). An explicit value is checked:
// over MemAvailable, or over RLIMIT_MEMLOCK where locked, is a ConfigError naming the bytes and the
// limit. Returns the slots (<= n_layers); `why` gets one line for the plan.
int64_t resolve_cpu_cap_layers(const Manifest& m, const Config& c, const HostInputs& in, std::string* why);
// The fewest slots that keep the GPU's prefetch fed: gpu_ahead_layers + 1, and the cycling slots
// plus back_margin; at most the model's layers.
int64_t min_window_layers(const Manifest& m, const Config& c);

// The window's parameters for this config: cpu_cap_layers resolved (auto: against this machine's
// MemAvailable and memlock limit, `locked` where the window is mlock'ed) and the cycling slots.
WindowParams window_params(const Manifest& m, const Config& c, bool locked, std::string* why = nullptr);

struct HostPlan {
  int64_t n_layers = 0;
  int64_t window_layers = 0;     // slots: min(cpu_cap_layers, n_layers)
  int64_t pinned_layers = 0;     // of those, layers kept for good when the model does not fit
  int64_t cycling_slots = 0;     // the rest: cycle the layers not pinned
  std::string window_why;        // how cpu_cap_layers was chosen
  uint64_t globals_bytes = 0;
  uint64_t layer_bytes = 0;      // the largest layer: one slot
  uint64_t window_bytes = 0;     // the segment: globals + slots + tables
  uint64_t registered_bytes = 0; // registered with CUDA (pinned for DMA): the window, where a GPU streams
  uint64_t mem_available = 0;
  std::string mem_source;
  double fraction = 0;           // host_memory_fraction
  uint64_t memlock_limit = kUnlimited;
  bool window_locked = false;

  // The links, per step (one pass over the layers).
  int64_t gpu_resident_layers = 0;  // n_layers: no streaming (CPU backend, or all resident)
  bool gpu = false;                 // a GPU backend plans this (PCIe is a link)
  int64_t disk_layers_per_step = 0;
  uint64_t disk_bytes_per_step = 0;
  int64_t pcie_layers_per_step = 0;
  uint64_t pcie_bytes_per_step = 0;
  double disk_gbps = 0, h2d_gbps = 0;
  std::string disk_source, h2d_source;
  double disk_tokens_per_s = 0;     // batch-1 ceiling the disk sets (0: no disk bytes per step, or rate unknown)
  double pcie_tokens_per_s = 0;     // the same for PCIe
  std::string bound;                // "disk", "PCIe" or "none" (nothing streams: compute-bound)
  double bound_tokens_per_s = 0;    // the lower of the two ceilings; 0 = none

  std::string advice;               // when the disk binds and RAM would hold more layers: the knob and the figure

  // The aligned table, printed with the device table.
  std::string table() const;
};

// `c.cpu_cap_layers` is the resolved value (not auto). gpu_resident_layers: layers kept on the
// GPU (n_layers where nothing streams over PCIe).
HostPlan plan_host(const Manifest& m, const Config& c, const HostInputs& in, const std::string& window_why,
                   int64_t gpu_resident_layers, bool gpu);

// What a binary does at start, before it allocates: this machine's figures (or the overrides),
// c.cpu_cap_layers resolved in place, the disk measured on c.store where a step reads it, unless
// --disk-gbps (a store without its weights.bin, as --plan-only allows, leaves it unknown), the H2D
// rate from the caller (0: no GPU). Throws ConfigError when the window cannot fit.
HostPlan host_plan_at_start(const Manifest& m, Config& c, const HostOverrides& o, bool window_locked, double h2d_gbps,
                            const std::string& h2d_source, int64_t gpu_resident_layers, bool gpu);

}  // namespace ringllama
