#include "daemon/loaderd_cleanup.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <fmt/ranges.h>

#include "common/errors.h"
#include "common/runtime_dir.h"
#include "common/segment.h"

namespace ringllama {

namespace {

constexpr const char* kPrefix = "ringllama-";
constexpr const char* kLockSuffix = ".lock";

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

std::vector<std::string> names_in(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n.compare(0, std::strlen(kPrefix), kPrefix) == 0) out.push_back(n);
  }
  ::closedir(d);
  return out;
}

// The daemon pid a segment's header records, or 0 (not ours, not set up, unreadable).
int64_t recorded_daemon(const std::string& shm_name) {
  const int fd = ::shm_open(shm_name.c_str(), O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0) return 0;
  SegmentHeader h;
  const ssize_t n = ::pread(fd, &h, sizeof h, 0);
  ::close(fd);
  if (n != static_cast<ssize_t>(sizeof h) || h.magic.load() != kSegmentMagic) return 0;
  return h.daemon_pid;
}

// A running ringllama-loaderd with this pid (the kernel keeps 15 characters of its name).
bool daemon_running(int64_t pid) {
  if (pid <= 0 || (::kill(static_cast<pid_t>(pid), 0) != 0 && errno != EPERM)) return false;
  std::ifstream f("/proc/" + std::to_string(pid) + "/comm");
  std::string comm;
  std::getline(f, comm);
  return comm.rfind("ringllama-loade", 0) == 0;
}

bool may_remove(const struct stat& st) { return ::geteuid() == 0 || st.st_uid == ::geteuid(); }

}  // namespace

std::vector<CleanupItem> cleanup_stale_segments(const std::string& lock_dir_in) {
  const std::string lock_dir = lock_dir_in.empty() ? default_runtime_dir() : lock_dir_in;
  struct stat dst {};
  if (::stat(lock_dir.c_str(), &dst) == 0 && !S_ISDIR(dst.st_mode))
    fail("lock directory {} is not a directory", lock_dir);

  // The instances of this lock directory: "/ringllama-<id>". A segment without a lock file here
  // belongs to a daemon with another lock directory (a daemon being set up, another user's, a
  // test's): it is only listed, since nothing here tells whether its daemon lives.
  std::set<std::string> instances;
  for (const auto& n : names_in(lock_dir))
    if (ends_with(n, kLockSuffix)) instances.insert("/" + n.substr(0, n.size() - std::strlen(kLockSuffix)));

  std::vector<CleanupItem> out;
  for (const auto& n : names_in("/dev/shm")) {
    struct stat st {};
    if (ends_with(n, kLockSuffix) || instances.count("/" + n) || ::lstat(("/dev/shm/" + n).c_str(), &st) != 0 ||
        st.st_uid != ::geteuid())
      continue;
    CleanupItem item;
    item.name = "/" + n;
    const int64_t pid = recorded_daemon(item.name);
    item.what = fmt::format("kept: no lock file in {}{}; remove /dev/shm/{} by hand if no daemon serves it", lock_dir,
                            pid > 0 ? fmt::format(" (its daemon was pid {}, {})", pid,
                                                  daemon_running(pid) ? "running" : "gone")
                                    : std::string(),
                            n);
    out.push_back(item);
  }
  for (const std::string& name : instances) {
    CleanupItem item;
    item.name = name;
    const std::string seg = "/dev/shm" + name;
    const std::string lock = lock_dir + name + kLockSuffix;
    struct stat sst {}, lst {};
    const bool have_seg = ::lstat(seg.c_str(), &sst) == 0;
    const bool have_lock = ::lstat(lock.c_str(), &lst) == 0;
    if ((have_seg && !may_remove(sst)) || (have_lock && !may_remove(lst))) {
      item.what = fmt::format("kept: belongs to uid {}", have_seg && !may_remove(sst) ? sst.st_uid : lst.st_uid);
      out.push_back(item);
      continue;
    }
    // The lock is held while the files go, so that a daemon starting now waits for a clean name.
    int fd = -1;
    if (have_lock) {
      fd = ::open(lock.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
      if (fd < 0 || !S_ISREG(lst.st_mode)) {
        if (fd >= 0) ::close(fd);
        item.what = fmt::format("kept: {} is not a lock file ringllama-loaderd made: remove it by hand", lock);
        out.push_back(item);
        continue;
      }
      if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
        char buf[32] = {};
        const ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
        ::close(fd);
        item.what = fmt::format("kept: a live daemon (pid {}) holds {}", n > 0 ? std::strtoll(buf, nullptr, 10) : 0,
                                lock);
        out.push_back(item);
        continue;
      }
    }
    // No lock here: a daemon given another --lock-dir may hold one elsewhere; its pid is in the
    // segment's header.
    const int64_t pid = have_seg ? recorded_daemon(name) : 0;
    if (daemon_running(pid)) {
      if (fd >= 0) ::close(fd);
      item.what = fmt::format("kept: its daemon (pid {}) is running", pid);
      out.push_back(item);
      continue;
    }
    std::vector<std::string> gone;
    if (have_seg && ::shm_unlink(name.c_str()) == 0) gone.push_back(seg);
    struct stat now {}, held {};
    if (fd >= 0 && ::fstat(fd, &held) == 0 && ::lstat(lock.c_str(), &now) == 0 && now.st_ino == held.st_ino &&
        now.st_dev == held.st_dev && ::unlink(lock.c_str()) == 0)
      gone.push_back(lock);
    if (fd >= 0) ::close(fd);
    item.removed = !gone.empty();
    item.what = item.removed ? "removed " + fmt::format("{}", fmt::join(gone, " and ")) + " (no live daemon)"
                             : "nothing could be removed: " + errno_text(errno);
    out.push_back(item);
  }
  return out;
}

}  // namespace ringllama
