// The loader daemon's endpoints (DESIGN.md "Trust"): where their files may live, who is on the other
// end of a connection, and what the daemon removes when it exits.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "common/runtime_dir.h"

namespace zmq {
class message_t;
class socket_t;
}  // namespace zmq

namespace ringllama {

// Who sent a message (PeerCred, runtime_dir.h), from its connection.
PeerCred peer_credentials(zmq::message_t& msg);

// Before the daemon takes an ipc endpoint: its directory must exist (the default runtime directory
// is made, `access`'s mode), be this user's (or root's) and writable by nobody else; a file at the
// path must be a socket that nobody answers on (one left by a daemon that died). Throws Error
// ("... a daemon answers on ..."). Nothing for tcp and abstract sockets.
void check_endpoint(const std::string& endpoint, const FileAccess& access, const char* what);

// An endpoint the daemon bound. For ipc, its socket file gets `access`'s mode and group and is
// removed by the destructor only if the path still names the file bound here (its inode), never a
// socket another daemon bound since.
class BoundEndpoint {
 public:
  BoundEndpoint() = default;
  // Binds `s`; throws Error with a hint (in use, path too long, permission).
  BoundEndpoint(zmq::socket_t& s, const std::string& endpoint, const FileAccess& access, const char* what);
  BoundEndpoint(BoundEndpoint&& o) noexcept { *this = std::move(o); }
  BoundEndpoint& operator=(BoundEndpoint&& o) noexcept;
  ~BoundEndpoint() { remove(); }
  void remove();

 private:
  std::string path_;  // "" = nothing to remove
  dev_t dev_ = 0;
  ino_t ino_ = 0;
};

}  // namespace ringllama
