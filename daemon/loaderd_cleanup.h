// ringllama-loaderd --cleanup: segments and lock files that no live daemon holds (a daemon killed
// with SIGKILL cannot remove its own; systemd runs this as the unit's ExecStopPost).
#pragma once

#include <string>
#include <vector>

namespace ringllama {

struct CleanupItem {
  std::string name;     // "/ringllama-<instance>"
  bool removed = false; // false: kept
  std::string what;     // the files removed, or why they were kept
};

// For every lock file <lock_dir>/ringllama-*.lock ("" = default_runtime_dir()) that no process holds
// (and whose segment's recorded daemon is not running), removes it and its segment
// /dev/shm/ringllama-*. Never touches a segment a live daemon holds, nor another user's files (root
// excepted). Segments of this user without a lock file there are listed, not removed: their
// daemon's lock lives elsewhere, if anywhere.
std::vector<CleanupItem> cleanup_stale_segments(const std::string& lock_dir);

}  // namespace ringllama
