// Where the loader daemon keeps its files, and who may use them (DESIGN.md "Trust").
//
// /dev/shm and /tmp are writable by every local user: a lock file or a socket there can be planted
// in advance (a symlink that a root daemon then truncates, a file another user owns and holds
// locked). So the daemon's lock files live, and its ipc sockets live by default, in a directory it
// owns that nobody else may write to:
//
//   $RUNTIME_DIRECTORY          systemd's RuntimeDirectory=ringllama (/run/ringllama)
//   /run/ringllama              root without systemd
//   $XDG_RUNTIME_DIR/ringllama  a user's session
//   /tmp/ringllama-<uid>        else; created 0700, refused if someone else made it
//
// The segment itself must live in /dev/shm (shm_open): it is created O_EXCL (never a file someone
// planted), and only files this user owns are ever removed there.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

namespace ringllama {

// The directory above, for this process's user and environment.
std::string default_runtime_dir();

// Who may use the daemon's segment and sockets besides its own user: a group (the config key
// `access_group`) gets read access to the segment and write access to the sockets.
struct FileAccess {
  bool group = false;       // false: the daemon's user only
  gid_t gid = 0;            // the group, when `group`
  std::string group_name;
  unsigned segment_mode() const { return group ? 0640 : 0600; }
  unsigned socket_mode() const { return group ? 0660 : 0600; }
  unsigned dir_mode() const { return group ? 0750 : 0700; }
};
// "" = the user only; else the group must exist. Throws Error.
FileAccess file_access(const std::string& access_group);

// Checks that `dir` is a directory (not a symlink to one) owned by this user (or by root, for a
// system directory root made) and writable by nobody else; with `create`, a missing one is made
// with `access`'s mode (its parent must exist). Throws Error naming the directory and the rule.
// `what` says what the directory is for, in messages.
void ensure_private_dir(const std::string& dir, bool create, const FileAccess& access, const char* what);

// The canonical form of an ipc:// endpoint: "ipc://" + realpath(directory) + "/" + file name, so
// that two spellings of one socket (./, .., symlinks) give one lock and one segment name. The
// directory must exist. Other transports come back as they are.
std::string canonical_endpoint(const std::string& endpoint);

// Who is at the other end of an ipc connection, as the kernel says (SO_PEERCRED, which libzmq
// reads when the connection is made and hands on as each message's "Peer-Address" property,
// "<host>:<uid>:<gid>:<pid>"), never as a message says. Unknown for tcp connections.
struct PeerCred {
  bool known = false;
  int64_t pid = 0;  // 0 where the peer's pid namespace has no mapping into ours
  uid_t uid = 0;
  gid_t gid = 0;
};
// "localhost:1000:1000:4242" -> uid 1000, gid 1000, pid 4242; unknown for anything else.
PeerCred parse_peer_address(const std::string& address);

// ipc://PATH -> PATH; "" for other transports and for abstract sockets (ipc://@name).
std::string ipc_socket_path(const std::string& endpoint);

}  // namespace ringllama
