// Helpers for the worker's end-to-end suites: a ZeroMQ DEALER client of the worker's protocol that
// keeps the replies of several requests apart, and reference tokens from ringllama-generate.
#pragma once

#include <chrono>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>
#include <zmq.hpp>

#include "tests/test_util.h"

namespace ringllama::test {

class WorkerClient {
 public:
  explicit WorkerClient(const std::string& endpoint) : sock_(ctx_, zmq::socket_type::dealer) {
    sock_.set(zmq::sockopt::linger, 0);
    sock_.connect(endpoint);
  }

  struct Request {
    std::vector<int64_t> tokens;
    nlohmann::json final;  // the done or error reply; null while in flight
    bool ended() const { return !final.is_null(); }
  };

  void send_raw(const std::string& frame) { sock_.send(zmq::buffer(frame), zmq::send_flags::none); }
  void send(const nlohmann::json& j) { send_raw(j.dump()); }
  void generate(const std::string& id, const std::vector<int64_t>& prompt, int64_t max_tokens,
                nlohmann::json extra = nlohmann::json::object()) {
    extra["op"] = "generate";
    extra["id"] = id;
    extra["prompt_ids"] = prompt;
    extra["max_tokens"] = max_tokens;
    if (!extra.contains("ignore_eos")) extra["ignore_eos"] = true;
    send(extra);
  }

  // Reads what arrives for at most timeout_ms (returns at the first reply when `one`).
  void pump(int timeout_ms, bool one = false) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
      zmq::pollitem_t item{static_cast<void*>(sock_), 0, ZMQ_POLLIN, 0};
      if (left.count() <= 0 || zmq::poll(&item, 1, left) == 0) return;
      zmq::message_t m;
      while (sock_.recv(m, zmq::recv_flags::dontwait)) {
        nlohmann::json j = nlohmann::json::parse(m.to_string());
        replies_.push_back(j);
        const std::string id = j["id"].is_string() ? j["id"].get<std::string>() : "";
        const std::string type = j["type"].get<std::string>();
        if (type == "token") {
          Request& r = requests_[id];
          if (j["index"].get<size_t>() != r.tokens.size()) out_of_order_ = true;
          if (r.ended()) after_final_ = true;
          r.tokens.push_back(j["token"].get<int64_t>());
        } else if (type == "done" || type == "error") {
          Request& r = requests_[id];
          if (r.ended()) after_final_ = true;
          r.final = j;
        } else {
          others_.push_back(j);
        }
        if (one) return;
      }
    }
  }

  // Pumps until `cond` holds or timeout_ms passes.
  template <typename Cond>
  bool until(Cond cond, int timeout_ms) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (!cond()) {
      if (std::chrono::steady_clock::now() > end) return false;
      pump(20, true);
    }
    return true;
  }
  bool wait_end(const std::string& id, int timeout_ms = 60000) {
    return until([&] { return requests_[id].ended(); }, timeout_ms);
  }
  bool wait_tokens(const std::string& id, size_t n, int timeout_ms = 60000) {
    return until([&] { return requests_[id].tokens.size() >= n || requests_[id].ended(); }, timeout_ms);
  }

  // The reply to a stats or health request (null on timeout).
  nlohmann::json ask(const std::string& op, int timeout_ms = 5000) {
    others_.clear();
    send({{"op", op}});
    until([&] { return !others_.empty(); }, timeout_ms);
    return others_.empty() ? nlohmann::json() : others_.front();
  }

  Request& operator[](const std::string& id) { return requests_[id]; }
  const std::vector<nlohmann::json>& replies() const { return replies_; }
  bool out_of_order() const { return out_of_order_; }
  bool after_final() const { return after_final_; }
  void close() { sock_.close(); }

 private:
  zmq::context_t ctx_{1};
  zmq::socket_t sock_;
  std::map<std::string, Request> requests_;
  std::vector<nlohmann::json> replies_, others_;
  bool out_of_order_ = false, after_final_ = false;
};

// The tokens ringllama-generate gives for one prompt on the CPU backend (the model's eos ignored).
inline std::vector<int64_t> reference_tokens(const std::string& store, const std::vector<int64_t>& prompt,
                                             int64_t max_tokens, const std::vector<std::string>& extra = {}) {
  std::string ids;
  for (size_t i = 0; i < prompt.size(); ++i) ids += (i ? "," : "") + std::to_string(prompt[i]);
  std::vector<std::string> args{"--store", store, "--backend", "cpu", "--prompt-ids", ids, "--max-tokens",
                                std::to_string(max_tokens), "--ignore-eos"};
  args.insert(args.end(), extra.begin(), extra.end());
  const RunResult r = run_bin("ringllama-generate", args, 300);
  if (r.status != 0) throw std::runtime_error("ringllama-generate failed: " + r.err);
  std::vector<int64_t> out;
  size_t at = 0;
  while (at < r.out.size()) {
    size_t e = r.out.find_first_of(" \n", at);
    if (e == std::string::npos) e = r.out.size();
    if (e > at) out.push_back(std::stoll(r.out.substr(at, e - at)));
    at = e + 1;
  }
  return out;
}

}  // namespace ringllama::test
