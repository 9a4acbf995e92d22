#include "daemon/loaderd_sockets.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>
#include <zmq.hpp>

#include "common/errors.h"
#include "common/log.h"

namespace ringllama {

namespace {

// Whether a process listens on the unix socket at `path`: a connect that succeeds says so; one
// refused says the file is left from a process that is gone.
bool someone_listens(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un a {};
  a.sun_family = AF_UNIX;
  if (path.size() >= sizeof a.sun_path) {
    ::close(fd);
    return false;
  }
  std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
  const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

std::string parent_dir(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace

PeerCred peer_credentials(zmq::message_t& msg) {
  const char* a = ::zmq_msg_gets(msg.handle(), "Peer-Address");
  return a ? parse_peer_address(a) : PeerCred{};
}

void check_endpoint(const std::string& endpoint, const FileAccess& access, const char* what) {
  const std::string path = ipc_socket_path(endpoint);
  if (path.empty()) return;
  RL_REQUIRE(path[0] == '/', "{} endpoint {}: give an absolute path (ipc:///dir/name.sock)", what, endpoint);
  const std::string dir = parent_dir(path);
  const bool ours = dir == default_runtime_dir();
  ensure_private_dir(dir, ours, access, fmt::format("{} endpoint {}: socket", what, endpoint).c_str());
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;
  // libzmq unlinks whatever is at the path before it binds: only a dead daemon's socket may go.
  if (!S_ISSOCK(st.st_mode))
    fail("{} endpoint {}: {} exists and is not a socket: refused (remove it, or pick another path)", what, endpoint,
         path);
  if (someone_listens(path))
    fail("{} endpoint {}: a daemon answers on {} already: refused (stop it first, or pick another path)", what,
         endpoint, path);
}

BoundEndpoint::BoundEndpoint(zmq::socket_t& s, const std::string& endpoint, const FileAccess& access,
                             const char* what) {
  try {
    s.bind(endpoint);
  } catch (const zmq::error_t& e) {
    std::string hint;
    if (e.num() == EADDRINUSE) hint = ": the address is in use (another loaderd?)";
    else if (e.num() == ENAMETOOLONG) hint = ": the socket path is too long for a unix socket (about 107 bytes at most)";
    else if (e.num() == EACCES) hint = ": permission denied";
    else if (e.num() == ENOENT) hint = ": its directory does not exist";
    fail("{} endpoint {}: cannot bind: {}{}", what, endpoint, e.what(), hint);
  }
  const std::string path = ipc_socket_path(endpoint);
  if (path.empty()) return;
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) fail("{} endpoint {}: the socket file is gone after bind", what, endpoint);
  path_ = path;
  dev_ = st.st_dev;
  ino_ = st.st_ino;
  // Connecting needs write access to the socket file: the user, or the access group.
  try {
    if (access.group && ::chown(path.c_str(), static_cast<uid_t>(-1), access.gid) != 0)
      fail("{} endpoint {}: cannot give the socket to group {}: {}", what, endpoint, access.group_name,
           errno_text(errno));
    if (::chmod(path.c_str(), access.socket_mode()) != 0)
      fail("{} endpoint {}: cannot set the socket's mode: {}", what, endpoint, errno_text(errno));
  } catch (...) {
    remove();
    throw;
  }
}

BoundEndpoint& BoundEndpoint::operator=(BoundEndpoint&& o) noexcept {
  if (this != &o) {
    remove();
    path_ = std::move(o.path_);
    dev_ = o.dev_;
    ino_ = o.ino_;
    o.path_.clear();
  }
  return *this;
}

void BoundEndpoint::remove() {
  if (path_.empty()) return;
  // A socket file left behind would make a client wait for a reply instead of failing at once; one
  // that replaced ours belongs to the daemon that bound it.
  struct stat st {};
  if (::lstat(path_.c_str(), &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_) ::unlink(path_.c_str());
  path_.clear();
}

}  // namespace ringllama
