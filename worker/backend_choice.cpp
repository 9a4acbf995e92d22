#include "worker/backend_choice.h"

#include <fmt/format.h>

#include <algorithm>

#include "common/errors.h"
#include "common/log.h"
#include "worker/window_weights.h"
#ifdef RINGLLAMA_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "kernels/check.h"
#include "worker/cuda_backend.h"
#include "worker/cuda_memory.h"
#endif

namespace ringllama {

std::string default_backend() {
#ifdef RINGLLAMA_HAVE_CUDA
  if (cuda_device_count() > 0) return "cuda";
#endif
  return "cpu";
}

void require_backend(const std::string& name) {
  if (name == "cpu") return;
  if (name == "cuda") {
#ifdef RINGLLAMA_HAVE_CUDA
    if (cuda_device_count() == 0) fail("--backend cuda: no CUDA device is visible");
    return;
#else
    fail("--backend cuda is not available in this build");
#endif
  }
  fail("--backend '{}' is unknown (cpu, cuda)", name);
}

std::future<void> prepare_backend(const std::string& name, int64_t gpu) {
#ifdef RINGLLAMA_HAVE_CUDA
  if (name == "cuda" && gpu >= 0 && gpu < cuda_device_count()) {
    return std::async(std::launch::async, [gpu] {
      CUDA_CHECK(cudaSetDevice(static_cast<int>(gpu)));
      CUDA_CHECK(cudaFree(nullptr));
    });
  }
#endif
  (void)name;
  (void)gpu;
  std::promise<void> ready;
  ready.set_value();
  return ready.get_future();
}

std::unique_ptr<Backend> make_backend(const std::string& name, WeightSource& weights, const Config& config) {
  require_backend(name);
#ifdef RINGLLAMA_HAVE_CUDA
  if (name == "cuda") return make_cuda_backend(weights, config);
#endif
  return make_cpu_backend(weights, config);
}

double h2d_for_plan(const Config& config, std::string* source) {
#ifdef RINGLLAMA_HAVE_CUDA
  if (cuda_device_count() > config.gpu) {
    CUDA_CHECK(cudaSetDevice(static_cast<int>(config.gpu)));
    *source = "measured: pinned, 256 MiB copies";
    return measure_pinned_h2d(size_t{256} << 20, 5) / 1e9;
  }
#endif
  (void)config;
  *source = "no GPU here";
  return 0;
}

std::unique_ptr<WeightSource> open_local_weights(const Store& store, const std::string& backend, Config& config,
                                                 const HostOverrides& host) {
  const ModelConfig& m = store.model();
  int64_t resident = m.n_layers;
  double h2d = 0;
  std::string h2d_source;
#ifdef RINGLLAMA_HAVE_CUDA
  if (backend == "cuda") {
    resident = cuda_planned_resident_layers(store.manifest(), config);
    h2d = h2d_for_plan(config, &h2d_source);
  }
#endif
  const bool window = resident < m.n_layers;
  if (!window) config.cpu_cap_layers = m.n_layers;  // the whole store is read into memory
  HostPlan plan = host_plan_at_start(store.manifest(), config, host, false, h2d, h2d_source, resident,
                                     backend == "cuda");
  if (!window) plan.window_why = "nothing streams: the whole store is read into memory once";
  fmt::print(stderr, "{}", plan.table());
  if (!window) return open_store_weights(store.dir());
  spdlog::info("the CUDA backend streams {} of {} layers: weights through a window of {} layers", m.n_layers - resident,
               m.n_layers, config.cpu_cap_layers);
  return open_window_weights(store.dir(), config);
}

}  // namespace ringllama
