// Weights from a running ringllama-loaderd (DESIGN.md "The ring window"): the layers are read
// straight from the daemon's shared-memory window, mapped read-only.
//
// The worker says hello (with its pid) on the daemon's control endpoint, maps the segment the
// welcome names (its store identity checked against the store's manifest) and listens to the PUB
// socket for wake-ups. The slot table is the truth: a wake-up only shortens a timed re-check.
//
// acquire_layer(l) waits until the daemon has applied the worker's progress up to layer l (its
// entry in the segment's worker table shows that position, so the daemon will not reload the slot
// holding l under it) and some slot holds layer l ready; release_layer(l) checks that the slot's
// generation did not move while the layer was read, then reports progress. A slot in error for
// the layer, or a daemon that died, fails the acquire with an Error instead of waiting.
#pragma once

#include <memory>
#include <string>

#include "common/config.h"
#include "worker/weights.h"

namespace ringllama {

// Connects to the daemon at `endpoint`. The store's manifest is read from `config.store` when set
// (and must be the store the daemon serves), else from the store directory the welcome names;
// `store_dir` (when given) receives that directory. `name` is how the daemon's logs and stats call
// this process ("" = generate-<pid>). Throws Error with a clear message when no daemon answers
// within a few seconds.
std::unique_ptr<WeightSource> open_daemon_weights(const std::string& endpoint, const Config& config,
                                                  std::string* store_dir = nullptr, const std::string& name = {});

}  // namespace ringllama
