#include "daemon/pack_writer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <spdlog/spdlog.h>
#include <unistd.h>
#include <xxhash.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <memory>
#include <mutex>
#include <thread>

#include "common/errors.h"
#include "common/quant.h"
#include "common/store.h"

namespace fs = std::filesystem;

namespace ringllama {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

[[noreturn]] void io_fail(const std::string& path, const char* action, int err) {
  if (err == ENOSPC || err == EDQUOT) throw StoreError(fmt::format("{}: no space left on device", path));
  throw StoreError(fmt::format("{}: {} failed: {}", path, action, errno_text(err)));
}

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  // close(2) can report a deferred write error (NFS, quotas): check it where the data matters.
  void close_checked(const std::string& path) {
    int f = fd;
    fd = -1;
    if (::close(f) != 0) io_fail(path, "close", errno);
  }
};

void fsync_checked(int fd, const std::string& path) {
  if (::fsync(fd) != 0 && errno != EINVAL) io_fail(path, "fsync", errno);
}

void fsync_dir(const std::string& dir) {
  Fd d;
  d.fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (d.fd >= 0) fsync_checked(d.fd, dir);
}

std::string normal_out(const std::string& out) {
  std::string o = out;
  while (o.size() > 1 && o.back() == '/') o.pop_back();
  return o;
}

// Writes a whole small file, checked, and makes it durable.
void write_small_file(const std::string& path, const std::string& text) {
  Fd f;
  f.fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (f.fd < 0) io_fail(path, "create", errno);
  write_all(f.fd, text.data(), text.size(), path);
  fsync_checked(f.fd, path);
  f.close_checked(path);
}

void copy_file_checked(const std::string& from, const std::string& to) {
  Fd in;
  in.fd = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (in.fd < 0) throw StoreError(fmt::format("{}: cannot open: {}", from, errno_text(errno)));
  Fd out;
  out.fd = ::open(to.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out.fd < 0) io_fail(to, "create", errno);
  std::vector<char> buf(1 << 20);
  for (;;) {
    ssize_t n = ::read(in.fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw StoreError(fmt::format("{}: read failed: {}", from, errno_text(errno)));
    if (n == 0) break;
    write_all(out.fd, buf.data(), static_cast<uint64_t>(n), to);
  }
  fsync_checked(out.fd, to);
  out.close_checked(to);
}

// Removes the temporary directory unless the store was committed.
struct TmpGuard {
  std::string dir;
  bool committed = false;
  ~TmpGuard() {
    if (committed) return;
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

// Bytes [pos, stop) of a packed tensor's values (scales: false) or scales (true), `base` being
// where that block starts in the group. A slice of a chunk may begin or end inside a row: the rows
// it touches are packed whole and the bytes asked for copied out.
void fill_packed(const GroupEntry& g, size_t ti, const PackSource& src, bool scales, uint64_t base, uint64_t pos,
                 uint64_t stop, char* dst, const ScaleRules& rules) {
  const TensorEntry& t = g.tensors[ti];
  const int64_t rows = t.shape[0];
  const uint64_t data_row = t.size / static_cast<uint64_t>(rows), scale_row = t.scales_size / static_cast<uint64_t>(rows);
  const uint64_t row_bytes = scales ? scale_row : data_row;
  // A few rows at a time: the scratch stays small whatever the tensor.
  constexpr int64_t kRowsPerBatch = 64;
  std::vector<uint8_t> d, s;
  for (uint64_t at = pos; at < stop;) {
    const int64_t r0 = static_cast<int64_t>((at - base) / row_bytes);
    const int64_t n = std::min<int64_t>(kRowsPerBatch, rows - r0);
    d.resize(static_cast<size_t>(n) * data_row);
    s.resize(static_cast<size_t>(n) * scale_row);
    pack_rows(g, ti, src, r0, n, d.data(), s.data(), rules);
    const uint64_t b0 = base + static_cast<uint64_t>(r0) * row_bytes;
    const uint64_t b1 = std::min(stop, b0 + static_cast<uint64_t>(n) * row_bytes);
    std::memcpy(dst + (at - pos), (scales ? s.data() : d.data()) + (at - b0), b1 - at);
    at = b1;
  }
}

// Group bytes [off, off + len): tensor values (and packed tensors' scales) where they lie, zeros
// in the padding.
void fill_range(const GroupEntry& g, const PackSource& src, uint64_t off, uint64_t len, char* dst, const ScaleRules& rules) {
  struct Block {
    size_t ti;
    bool scales;
    uint64_t begin, end;
  };
  std::vector<Block> blocks;
  for (size_t ti = 0; ti < g.tensors.size(); ++ti) {
    const TensorEntry& t = g.tensors[ti];
    blocks.push_back({ti, false, t.offset, t.offset + t.size});
    if (dtype_packed(t.dtype)) blocks.push_back({ti, true, t.scales_offset, t.scales_offset + t.scales_size});
  }
  uint64_t pos = off;
  const uint64_t end = off + len;
  for (const Block& b : blocks) {
    if (pos >= end) break;
    if (b.end <= pos) continue;
    if (b.begin >= end) break;
    if (b.begin > pos) {
      std::memset(dst + (pos - off), 0, b.begin - pos);
      pos = b.begin;
    }
    const uint64_t stop = std::min(b.end, end);
    const TensorEntry& t = g.tensors[b.ti];
    if (dtype_packed(t.dtype)) {
      fill_packed(g, b.ti, src, b.scales, b.begin, pos, stop, dst + (pos - off), rules);
    } else {
      // Slices start on kGroupAlign boundaries and tensors on kTensorAlign ones: never mid-element.
      src.fill(g, b.ti, (pos - b.begin) / 2, (stop - pos) / 2, reinterpret_cast<bf16_t*>(dst + (pos - off)));
    }
    pos = stop;
  }
  if (pos < end) std::memset(dst + (pos - off), 0, end - pos);
}

// The chunk [off, off + len) in pieces that cost about the same, taken by the threads in turn.
// A packed tensor whose values and scales both lie in the chunk is packed by rows, `threads` runs
// of rows, each row quantized once for both its bytes and its scales. Other tensors' values and
// scales split `threads` ways, cut at multiples of kTensorAlign so that no piece starts
// mid-element (a packed row cut off from its scales by the chunk's edge is quantized for each
// side); the padding between blocks rides with the piece before it.
void parallel_fill(const GroupEntry& g, const PackSource& src, uint64_t off, uint64_t len, char* dst, int threads,
                   const ScaleRules& rules) {
  const uint64_t end = off + len;
  auto inside = [&](uint64_t b, uint64_t n) { return b >= off && b + n <= end; };
  std::vector<uint64_t> cuts{off};
  auto cut = [&](uint64_t at) {
    if (at > cuts.back() && at < end) cuts.push_back(at);
  };
  struct Rows {
    size_t ti;
    int64_t r0, r1;
  };
  std::vector<Rows> row_tasks;
  std::vector<std::pair<uint64_t, uint64_t>> by_rows;  // blocks the row tasks fill
  for (size_t ti = 0; ti < g.tensors.size(); ++ti) {
    const TensorEntry& t = g.tensors[ti];
    const bool packed = dtype_packed(t.dtype);
    if (packed && inside(t.offset, t.size) && inside(t.scales_offset, t.scales_size)) {
      for (const auto& [b, n] : {std::pair{t.offset, t.size}, std::pair{t.scales_offset, t.scales_size}}) {
        cut(b);
        cut(b + n);
        by_rows.emplace_back(b, b + n);
      }
      const int64_t rows = t.shape[0], step = std::max<int64_t>(1, (rows + threads - 1) / threads);
      for (int64_t r = 0; r < rows; r += step) row_tasks.push_back({ti, r, std::min(rows, r + step)});
      continue;
    }
    const uint64_t begins[2] = {t.offset, t.scales_offset}, sizes[2] = {t.size, t.scales_size};
    for (int b = 0; b < (packed ? 2 : 1); ++b) {
      const uint64_t lo = std::max(off, begins[b]), hi = std::min(end, begins[b] + sizes[b]);
      if (lo >= hi) continue;
      cut(lo);
      const uint64_t step = align_up((hi - lo + threads - 1) / threads, kTensorAlign);
      for (uint64_t at = lo + step; at < hi; at += step) cut(at);
    }
  }
  cuts.push_back(end);
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) {
    bool filled_by_rows = false;
    for (const auto& [b, e] : by_rows) filled_by_rows |= cuts[i] == b && cuts[i + 1] == e;
    if (!filled_by_rows) ranges.emplace_back(cuts[i], cuts[i + 1]);
  }

  auto pack_run = [&](const Rows& rt) {
    const TensorEntry& t = g.tensors[rt.ti];
    const uint64_t rows = static_cast<uint64_t>(t.shape[0]);
    const uint64_t data_row = t.size / rows, scale_row = t.scales_size / rows;
    constexpr int64_t kRowsPerBatch = 64;  // the scratch stays small whatever the tensor
    std::vector<uint8_t> d, s;
    for (int64_t r = rt.r0; r < rt.r1; r += kRowsPerBatch) {
      const int64_t n = std::min<int64_t>(kRowsPerBatch, rt.r1 - r);
      d.resize(static_cast<size_t>(n) * data_row);
      s.resize(static_cast<size_t>(n) * scale_row);
      pack_rows(g, rt.ti, src, r, n, d.data(), s.data(), rules);
      std::memcpy(dst + (t.offset + static_cast<uint64_t>(r) * data_row - off), d.data(), d.size());
      std::memcpy(dst + (t.scales_offset + static_cast<uint64_t>(r) * scale_row - off), s.data(), s.size());
    }
  };
  const size_t pieces = row_tasks.size() + ranges.size();
  std::atomic<size_t> next{0};
  std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
  auto work = [&](int k) {
    try {
      for (size_t i; (i = next.fetch_add(1)) < pieces;) {
        if (i < row_tasks.size()) {
          pack_run(row_tasks[i]);
        } else {
          const auto& [a, b] = ranges[i - row_tasks.size()];
          fill_range(g, src, a, b - a, dst + (a - off), rules);
        }
      }
    } catch (...) {
      errors[static_cast<size_t>(k)] = std::current_exception();
      next = pieces;  // the others stop at their next piece
    }
  };
  std::vector<std::thread> pool;
  for (int k = 1; k < threads && static_cast<size_t>(k) < pieces; ++k) pool.emplace_back(work, k);
  work(0);
  for (auto& t : pool) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

class Progress {
 public:
  Progress(uint64_t total, bool enabled) : total_(total), enabled_(enabled), tty_(::isatty(2) == 1) {}

  void add(uint64_t n) {
    done_ += n;
    if (!enabled_) return;
    const double t = seconds_since(start_);
    if (tty_ ? t - last_ < 0.2 && done_ < total_ : t - last_ < 5.0) return;
    last_ = t;
    show(t);
  }

  // Ends the bar's line, so that what is printed next starts on its own.
  void finish() {
    if (enabled_ && tty_ && shown_) {
      show(seconds_since(start_));
      std::fputc('\n', stderr);
    }
  }

 private:
  void show(double t) {
    shown_ = true;
    const double mbs = t > 0 ? done_ / t / 1e6 : 0;
    const double frac = total_ ? static_cast<double>(done_) / total_ : 1;
    if (!tty_) {
      spdlog::info("wrote {:.2f} of {:.2f} GB ({:.0f}%), {:.0f} MB/s", done_ / 1e9, total_ / 1e9, frac * 100, mbs);
      return;
    }
    constexpr int kWidth = 30;
    const int fill = static_cast<int>(frac * kWidth);
    std::string bar(fill, '#');
    bar.resize(kWidth, '-');
    std::fprintf(stderr, "\r[%s] %3.0f%%  %.2f/%.2f GB  %.0f MB/s ", bar.c_str(), frac * 100, done_ / 1e9,
                 total_ / 1e9, mbs);
    std::fflush(stderr);
  }

  uint64_t total_;
  bool enabled_;
  bool tty_;
  uint64_t done_ = 0;
  double last_ = 0;
  bool shown_ = false;
  Clock::time_point start_ = Clock::now();
};

struct Job {
  char* buf = nullptr;
  uint64_t len = 0;
  size_t group = 0;
  bool first = false;  // first chunk of its group
  bool last = false;   // last chunk of its group
};

// Hands filled chunks to the thread that hashes and writes them, and empty buffers back.
struct Pipe {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Job> queue;
  std::vector<char*> free;
  bool done = false;    // no more jobs will come
  bool abort = false;   // the producer failed: drop what is queued
  std::exception_ptr writer_error;
};

}  // namespace

void PackSource::fill_rows_f32(const GroupEntry& g, size_t ti, int64_t row0, int64_t rows, float* out) const {
  const int64_t in = g.tensors.at(ti).shape.at(1);
  std::vector<bf16_t> b(static_cast<size_t>(rows * in));
  fill(g, ti, static_cast<uint64_t>(row0 * in), b.size(), b.data());
  for (size_t i = 0; i < b.size(); ++i) out[i] = bf16_to_f32(b[i]);
}

void pack_rows(const GroupEntry& g, size_t ti, const PackSource& src, int64_t row0, int64_t rows, uint8_t* data,
               uint8_t* scales, const ScaleRules& rules) {
  const TensorEntry& t = g.tensors.at(ti);
  const int64_t in = t.shape.at(1);
  if (t.dtype == DType::INT4) {
    auto* sm = reinterpret_cast<uint16_t*>(scales);
    if (src.fill_int4(g, ti, row0, rows, data, sm)) return;
    std::vector<float> w(static_cast<size_t>(rows * in));
    src.fill_rows_f32(g, ti, row0, rows, w.data());
    const int64_t G = t.group_size;
    for (int64_t r = 0; r < rows; ++r)
      quantize_row_int4(w.data() + r * in, in, G, data + r * (in / 2), sm + r * (in / G) * 2, rules.int4);
    return;
  }
  if (t.dtype != DType::FP8_E4M3) throw Error(fmt::format("{}: tensor '{}' is not packed", g.label(), t.name));
  std::vector<float> w(static_cast<size_t>(rows * in));
  src.fill_rows_f32(g, ti, row0, rows, w.data());
  for (int64_t r = 0; r < rows; ++r) {
    const float scale = quantize_row_fp8(w.data() + r * in, in, data + r * in, rules.fp8);
    std::memcpy(scales + 4 * r, &scale, 4);
  }
}

void write_all(int fd, const void* data, uint64_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  uint64_t done = 0;
  while (done < n) {
    // Linux writes at most ~2 GiB per call; ask for no more than 1 GiB.
    ssize_t w = ::write(fd, p + done, std::min<uint64_t>(n - done, 1ull << 30));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) io_fail(path, "write", errno);
    if (w == 0) throw StoreError(fmt::format("{}: write made no progress at byte {}", path, done));
    done += static_cast<uint64_t>(w);
  }
}

void stream_groups(Manifest& plan, const PackSource& src, const WriteOptions& opts,
                   const std::function<void(const char*, uint64_t)>& sink) {
  const int threads = opts.threads > 0 ? opts.threads : std::max(1u, std::thread::hardware_concurrency());
  const uint64_t chunk = align_up(std::max<uint64_t>(opts.chunk_bytes, kGroupAlign), kGroupAlign);
  constexpr int kBuffers = 3;  // one filling, one queued, one being written

  std::vector<std::unique_ptr<char, decltype(&std::free)>> buffers;
  Pipe pipe;
  for (int i = 0; i < kBuffers; ++i) {
    char* b = static_cast<char*>(std::aligned_alloc(kGroupAlign, chunk));
    if (!b) throw Error(fmt::format("cannot allocate a {} MiB chunk buffer", chunk >> 20));
    buffers.emplace_back(b, &std::free);
    pipe.free.push_back(b);
  }

  std::vector<uint64_t> hashes(plan.groups.size(), 0);
  Progress progress(plan.weights_size, opts.progress);

  // The checksum is computed in pieces: the same XXH3-64 value as checksum() over the whole group,
  // without a 4 GB globals group ever sitting in memory.
  std::thread writer([&] {
    std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(), &XXH3_freeState);
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lk(pipe.mu);
        pipe.cv.wait(lk, [&] { return !pipe.queue.empty() || pipe.done || pipe.abort; });
        if (pipe.abort || pipe.queue.empty()) return;
        job = pipe.queue.front();
        pipe.queue.pop_front();
      }
      try {
        if (job.first) XXH3_64bits_reset(state.get());
        XXH3_64bits_update(state.get(), job.buf, job.len);
        sink(job.buf, job.len);
        progress.add(job.len);
        if (job.last) hashes[job.group] = XXH3_64bits_digest(state.get());
      } catch (...) {
        std::lock_guard<std::mutex> lk(pipe.mu);
        pipe.writer_error = std::current_exception();
        pipe.cv.notify_all();
        return;
      }
      std::lock_guard<std::mutex> lk(pipe.mu);
      pipe.free.push_back(job.buf);
      pipe.cv.notify_all();
    }
  });

  auto stop_writer = [&](bool abort) {
    {
      std::lock_guard<std::mutex> lk(pipe.mu);
      pipe.done = true;
      pipe.abort = abort;
      pipe.cv.notify_all();
    }
    writer.join();
  };

  try {
    for (size_t gi = 0; gi < plan.groups.size(); ++gi) {
      const GroupEntry& g = plan.groups[gi];
      for (uint64_t off = 0; off < g.size; off += chunk) {
        if (opts.cancel && opts.cancel->load()) throw Error("interrupted");
        char* buf = nullptr;
        {
          std::unique_lock<std::mutex> lk(pipe.mu);
          pipe.cv.wait(lk, [&] { return !pipe.free.empty() || pipe.writer_error; });
          if (pipe.writer_error) std::rethrow_exception(pipe.writer_error);
          buf = pipe.free.back();
          pipe.free.pop_back();
        }
        const uint64_t len = std::min(chunk, g.size - off);
        parallel_fill(g, src, off, len, buf, threads, opts.scales);
        std::lock_guard<std::mutex> lk(pipe.mu);
        pipe.queue.push_back(Job{buf, len, gi, off == 0, off + len == g.size});
        pipe.cv.notify_all();
      }
    }
  } catch (...) {
    stop_writer(true);
    progress.finish();
    throw;
  }
  stop_writer(false);
  if (pipe.writer_error) std::rethrow_exception(pipe.writer_error);
  progress.finish();
  for (size_t gi = 0; gi < plan.groups.size(); ++gi) plan.groups[gi].xxh3 = hashes[gi];
}

void check_output(const std::string& out_arg, bool force) {
  const std::string out = normal_out(out_arg);
  if (out.empty()) throw StoreError("the output path is empty");
  std::error_code ec;
  const fs::file_type type = fs::symlink_status(out, ec).type();
  if (type != fs::file_type::not_found && !ec) {
    if (!force) throw StoreError(fmt::format("{}: already exists (--force replaces it)", out));
    // --force replaces a store or an empty directory, never whatever else happens to be there.
    const bool store = type == fs::file_type::directory && fs::is_regular_file(fs::path(out) / kManifestFile, ec);
    const bool empty = type == fs::file_type::directory && fs::is_empty(out, ec) && !ec;
    if (!store && !empty)
      throw StoreError(fmt::format("{}: --force replaces only a store (a directory with {}) or an empty directory; "
                                   "this is {}",
                                   out, kManifestFile,
                                   type == fs::file_type::directory ? "a directory of other files"
                                   : type == fs::file_type::symlink ? "a symbolic link"
                                                                    : "not a directory"));
  }
  fs::path parent = fs::path(out).parent_path();
  if (parent.empty()) parent = ".";
  if (!fs::is_directory(parent, ec))
    throw StoreError(fmt::format("{}: the output's parent directory does not exist", parent.string()));
}

WriteResult write_store(Manifest plan, const PackSource& src, const WriteOptions& opts) {
  const auto t0 = Clock::now();
  const std::string out = normal_out(opts.out);
  check_output(out, opts.force);

  TmpGuard tmp{fmt::format("{}.tmp-{}", out, ::getpid())};
  std::error_code ec;
  fs::remove_all(tmp.dir, ec);  // left by an earlier process that had our pid and was killed
  if (::mkdir(tmp.dir.c_str(), 0755) != 0) io_fail(tmp.dir, "mkdir", errno);

  const std::string wpath = tmp.dir + "/" + kWeightsFile;
  Fd wf;
  wf.fd = ::open(wpath.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (wf.fd < 0) io_fail(wpath, "create", errno);
  // Reserve the space up front: a full disk fails now, not after minutes of work. File systems
  // without fallocate just skip this.
  if (plan.weights_size > 0 && ::fallocate(wf.fd, 0, 0, static_cast<off_t>(plan.weights_size)) != 0 &&
      (errno == ENOSPC || errno == EDQUOT))
    io_fail(wpath, "fallocate", errno);

  stream_groups(plan, src, opts, [&](const char* data, uint64_t n) { write_all(wf.fd, data, n, wpath); });
  fsync_checked(wf.fd, wpath);
  wf.close_checked(wpath);
  if (opts.cancel && opts.cancel->load()) throw Error("interrupted");  // during the fsync

  plan.tokenizer_files.clear();
  for (const std::string& f : opts.copy_files) {
    const std::string name = fs::path(f).filename().string();
    copy_file_checked(f, tmp.dir + "/" + name);
    plan.tokenizer_files.push_back(name);
  }
  for (const auto& [name, text] : opts.write_files) {
    write_small_file(tmp.dir + "/" + name, text);
    plan.tokenizer_files.push_back(name);
  }
  write_small_file(tmp.dir + "/" + kManifestFile, plan.to_yaml());
  fsync_dir(tmp.dir);

  // Commit: the new store appears under its name in one rename; a replaced one goes away after.
  std::string old;
  if (fs::symlink_status(out, ec).type() != fs::file_type::not_found) {
    check_output(out, opts.force);  // still a store or an empty directory, as at the start
    old = fmt::format("{}.old-{}", out, ::getpid());
    if (::rename(out.c_str(), old.c_str()) != 0) io_fail(out, "rename", errno);
  }
  if (::rename(tmp.dir.c_str(), out.c_str()) != 0) {
    const int err = errno;
    if (!old.empty()) ::rename(old.c_str(), out.c_str());
    io_fail(out, "rename", err);
  }
  tmp.committed = true;
  if (!old.empty()) fs::remove_all(old, ec);
  fs::path parent = fs::path(out).parent_path();
  fsync_dir(parent.empty() ? "." : parent.string());

  WriteResult r;
  r.manifest = std::move(plan);
  r.seconds = seconds_since(t0);
  r.bytes = r.manifest.weights_size;
  return r;
}

}  // namespace ringllama
