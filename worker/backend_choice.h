// Choosing a backend and the host weights it runs on, the same way for every binary that runs the
// model (ringllama-generate, ringllama-worker).
#pragma once

#include <memory>
#include <string>

#include "common/config.h"
#include "common/store.h"
#include "worker/backend.h"
#include "worker/weights.h"

namespace ringllama {

// "cuda" where the build has it and a GPU is visible, else "cpu".
std::string default_backend();
// Throws Error for a name that is unknown, or cuda where it is not built or no GPU is visible.
// Checked before the weights are read, so that a wrong name fails at once.
void require_backend(const std::string& name);
std::unique_ptr<Backend> make_backend(const std::string& name, WeightSource& weights, const Config& config);

// The host weights of `store` for a backend that reads them itself: when the CUDA backend will
// stream some layers, a ring window in this process's memory (cpu_cap_layers slots; auto: what the
// host plan fits); else the whole store.
std::unique_ptr<WeightSource> open_local_weights(const Store& store, const std::string& backend, const Config& config);

}  // namespace ringllama
