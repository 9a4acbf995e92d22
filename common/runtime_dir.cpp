#include "common/runtime_dir.h"

#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <vector>

#include "common/errors.h"

namespace ringllama {

namespace {

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

bool parse_u64(const std::string& s, uint64_t* out) {
  if (s.empty() || s.size() > 20) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  *out = v;
  return true;
}

}  // namespace

PeerCred parse_peer_address(const std::string& address) {
  // The last three fields: a host part may itself hold colons.
  PeerCred c;
  std::vector<std::string> parts;
  size_t end = address.size();
  for (int i = 0; i < 3; ++i) {
    const size_t colon = address.rfind(':', end == 0 ? 0 : end - 1);
    if (colon == std::string::npos || end == 0) return c;
    parts.push_back(address.substr(colon + 1, end - colon - 1));
    end = colon;
  }
  uint64_t pid = 0, gid = 0, uid = 0;
  if (!parse_u64(parts[0], &pid) || !parse_u64(parts[1], &gid) || !parse_u64(parts[2], &uid)) return c;
  if (pid > 0x7fffffff || gid > 0xffffffffu || uid > 0xffffffffu) return c;
  c.known = true;
  c.pid = static_cast<int64_t>(pid);
  c.gid = static_cast<gid_t>(gid);
  c.uid = static_cast<uid_t>(uid);
  return c;
}

std::string default_runtime_dir() {
  // systemd may list several directories (RuntimeDirectory=a b): ours is the first.
  std::string d = env("RUNTIME_DIRECTORY");
  if (!d.empty()) return d.substr(0, d.find(':'));
  if (::geteuid() == 0) return "/run/ringllama";
  d = env("XDG_RUNTIME_DIR");
  if (!d.empty() && d[0] == '/') return d + "/ringllama";
  return "/tmp/ringllama-" + std::to_string(::geteuid());
}

FileAccess file_access(const std::string& access_group) {
  FileAccess a;
  if (access_group.empty()) return a;
  std::vector<char> buf(16384);
  struct group g {};
  struct group* found = nullptr;
  const int rc = ::getgrnam_r(access_group.c_str(), &g, buf.data(), buf.size(), &found);
  if (rc != 0 || !found)
    fail("access_group '{}': no such group{}", access_group, rc != 0 ? " (" + errno_text(rc) + ")" : std::string());
  a.group = true;
  a.gid = found->gr_gid;
  a.group_name = access_group;
  return a;
}

void ensure_private_dir(const std::string& dir, bool create, const FileAccess& access, const char* what) {
  RL_REQUIRE(!dir.empty() && dir[0] == '/', "{} directory '{}' must be an absolute path", what, dir);
  struct stat st {};
  if (::lstat(dir.c_str(), &st) != 0) {
    const int err = errno;
    if (err != ENOENT || !create)
      fail("{} directory {} {}", what, dir,
           err == ENOENT ? "does not exist: create it (mode 0700, owned by the daemon's user) or pick another path"
                         : "cannot be read: " + errno_text(err));
    // mkdir's mode passes through the umask: set it again below.
    if (::mkdir(dir.c_str(), access.dir_mode()) != 0 && errno != EEXIST)
      fail("{} directory {}: cannot create it: {}", what, dir, errno_text(errno));
    if (::lstat(dir.c_str(), &st) != 0) fail("{} directory {}: cannot read it: {}", what, dir, errno_text(errno));
    if (S_ISDIR(st.st_mode) && st.st_uid == ::geteuid()) {
      if (access.group && ::chown(dir.c_str(), static_cast<uid_t>(-1), access.gid) != 0)
        fail("{} directory {}: cannot give it to group {}: {}", what, dir, access.group_name, errno_text(errno));
      if (::chmod(dir.c_str(), access.dir_mode()) != 0)
        fail("{} directory {}: cannot set its mode: {}", what, dir, errno_text(errno));
      if (::lstat(dir.c_str(), &st) != 0) fail("{} directory {}: cannot read it: {}", what, dir, errno_text(errno));
    }
  }
  if (S_ISLNK(st.st_mode))
    fail("{} directory {} is a symbolic link: refused (it may point anywhere; give the real path)", what, dir);
  if (!S_ISDIR(st.st_mode)) fail("{} directory {} is not a directory", what, dir);
  // Root's own directories are as safe as ours: only root could plant anything there.
  if (st.st_uid != ::geteuid() && st.st_uid != 0)
    fail("{} directory {} belongs to uid {}, not to this user (uid {}): refused, another user could replace "
         "what the daemon puts there",
         what, dir, st.st_uid, ::geteuid());
  if (st.st_mode & (S_IWGRP | S_IWOTH))
    fail("{} directory {} is writable by {} (mode {:04o}): refused, another user could plant files there; use a "
         "directory only this user can write (e.g. {})",
         what, dir, (st.st_mode & S_IWOTH) ? "every user" : "its group", st.st_mode & 07777, default_runtime_dir());
}

std::string ipc_socket_path(const std::string& endpoint) {
  const std::string prefix = "ipc://";
  if (endpoint.compare(0, prefix.size(), prefix) != 0) return {};
  std::string path = endpoint.substr(prefix.size());
  if (!path.empty() && path[0] == '@') return {};
  return path;
}

std::string canonical_endpoint(const std::string& endpoint) {
  const std::string path = ipc_socket_path(endpoint);
  if (path.empty()) return endpoint;
  const size_t slash = path.find_last_of('/');
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  if (name.empty() || name == "." || name == "..")
    fail("endpoint {}: the path must end with a socket file name", endpoint);
  char real[PATH_MAX];
  if (!::realpath(dir.c_str(), real))
    fail("endpoint {}: directory {} {}", endpoint, dir,
         errno == ENOENT ? "does not exist (create it first, owned by the daemon's user and writable only by it)"
                         : "cannot be resolved: " + errno_text(errno));
  const std::string r = real;
  return "ipc://" + (r == "/" ? std::string() : r) + "/" + name;
}

}  // namespace ringllama
