// ringllama-loaderd --bench: how close the window fill comes to the disk (DESIGN.md "Testing":
// benchmarks print ratios against the physical limit measured in the same run).
#pragma once

#include "common/config.h"
#include "daemon/loaderd.h"

namespace ringllama {

// Each round: a plain io_uring O_DIRECT read of the whole weights.bin in order (same queue depth
// and block size), then a daemon filling its window (globals + cpu_cap_layers layers, checksums
// checked); each after dropping the page cache when `drop_cache`. Prints both rates and the ratio.
int run_loaderd_bench(const Config& config, const LoaderdOptions& opt, int rounds, bool drop_cache);

}  // namespace ringllama
