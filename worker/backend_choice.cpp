#include "worker/backend_choice.h"

#include <algorithm>

#include "common/errors.h"
#include "common/log.h"
#include "worker/window_weights.h"
#ifdef RINGLLAMA_HAVE_CUDA
#include "worker/cuda_backend.h"
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

std::unique_ptr<Backend> make_backend(const std::string& name, WeightSource& weights, const Config& config) {
  require_backend(name);
#ifdef RINGLLAMA_HAVE_CUDA
  if (name == "cuda") return make_cuda_backend(weights, config);
#endif
  return make_cpu_backend(weights, config);
}

std::unique_ptr<WeightSource> open_local_weights(const Store& store, const std::string& backend, const Config& config) {
#ifdef RINGLLAMA_HAVE_CUDA
  const int64_t L = store.model().n_layers;
  if (backend == "cuda" && cuda_planned_resident_layers(store.manifest(), config) < L) {
    // The window sizes itself: an auto cpu_cap_layers is resolved against this machine's memory
    // (common/host_plan.h).
    spdlog::info("the CUDA backend streams some layers: weights through a ring window (cpu_cap_layers {})",
                 config.cpu_cap_layers == kAuto ? std::string("auto") : std::to_string(std::min(config.cpu_cap_layers, L)));
    return open_window_weights(store.dir(), config);
  }
#else
  (void)backend;
  (void)config;
#endif
  return open_store_weights(store.dir());
}

}  // namespace ringllama
