// Choosing a backend and the host weights it runs on, the same way for every binary that runs the
// model (ringllama-generate, ringllama-worker).
#pragma once

#include <future>
#include <memory>
#include <string>

#include "common/config.h"
#include "common/host_plan.h"
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
// Creates the device's context for the cuda backend on a thread (~0.1 s of driver work that the
// caller overlaps with attaching the weights); get() before make_backend, which would otherwise
// create it itself. Ready at once for the cpu backend or a GPU index that does not exist (the
// backend then says why).
std::future<void> prepare_backend(const std::string& name, int64_t gpu);

// The pinned H2D rate for a host plan where a GPU is visible (a short measurement: 256 MiB copies),
// GB/s, and what it was; 0 and "no GPU here" without one.
double h2d_for_plan(const Config& config, std::string* source);

// The host weights of `store` for a backend that reads them itself, after the host plan (printed
// to stderr before anything is allocated; config.cpu_cap_layers resolved in place): when the CUDA
// backend will stream some layers, a window in this process's memory; else the whole store.
std::unique_ptr<WeightSource> open_local_weights(const Store& store, const std::string& backend, Config& config,
                                                 const HostOverrides& host = {});

}  // namespace ringllama
