// ringllama-tokenize: what the model sees of a text, and the text of token ids.
//
//   ringllama-tokenize (--store DIR | --tokenizer FILE) [--file F] [--add-special]
//       the whole input (stdin or F) as one string → its ids on one line, separated by spaces
//   ringllama-tokenize ... --decode [--skip-special]
//       ids (separated by blanks or commas) → the text, written as it is
//   --lines: one item per input line, one result per output line: encoding reads each line as a
//       JSON string and writes its ids; --decode reads a JSON list of ids and writes a JSON string,
//       or with --stream the JSON list of the pieces a streaming decode returns.
//   --time: encoding's seconds, bytes and tokens on stderr (the load not counted).
//   ringllama-tokenize --store DIR --chat [--chat-template NAME]
//       messages (a JSON list, or {"messages": [...], "add_generation_prompt": true}) → the prompt
//       text the store's chat template renders (common/chat_template.h); no tokenizer needed.
//
// A store without tokenizer.json or tokenizer.model is refused with a message that says to give
// token ids. Errors: one line, exit 1.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/chat_template.h"
#include "common/errors.h"
#include "common/tokenizer.h"

namespace ringllama {
namespace {

struct Options {
  std::string store, tokenizer, file, chat_template;
  bool chat = false;
  bool add_special = false, decode = false, skip_special = false, lines = false, stream = false, time = false;
};

std::string read_input(const std::string& file) {
  std::ostringstream ss;
  if (file.empty()) {
    ss << std::cin.rdbuf();
    RL_REQUIRE(!std::cin.bad(), "reading stdin failed");
  } else {
    std::ifstream f(file, std::ios::binary);
    RL_REQUIRE(f, "cannot open {}: {}", file, errno_text(errno));
    ss << f.rdbuf();
    RL_REQUIRE(!f.bad(), "reading {} failed", file);
  }
  return ss.str();
}

std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i < text.size()) {
    const char c = text[i];
    if (c == ' ' || c == ',' || c == '\n' || c == '\t' || c == '\r') {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < text.size() && text[j] >= '0' && text[j] <= '9') ++j;
    RL_REQUIRE(j > i && j - i <= 9, "not a token id: \"{}\"", text.substr(i, std::min<size_t>(20, text.size() - i)));
    ids.push_back(int32_t(std::stol(text.substr(i, j - i))));
    i = j;
  }
  return ids;
}

std::string join_ids(const std::vector<int32_t>& ids) { return fmt::format("{}", fmt::join(ids, " ")); }

int run(int argc, char** argv) {
  Options o;
  CLI::App app{"Token ids of a text, and the text of token ids"};
  auto* store = app.add_option("--store", o.store, "packed store folder (its tokenizer.json or tokenizer.model)");
  app.add_option("--tokenizer", o.tokenizer, "tokenizer.json or tokenizer.model")->excludes(store);
  app.add_option("--file", o.file, "read this file instead of stdin");
  app.add_flag("--add-special", o.add_special, "add the special tokens the tokenizer adds (BOS)");
  app.add_flag("--decode", o.decode, "ids in, text out");
  app.add_flag("--skip-special", o.skip_special, "leave special tokens out of decoded text");
  app.add_flag("--lines", o.lines, "one JSON item per line (a string to encode, a list of ids to decode)");
  app.add_flag("--stream", o.stream, "with --decode --lines: the streaming decode's pieces");
  app.add_flag("--time", o.time, "encoding's time, bytes and tokens on stderr");
  app.add_flag("--chat", o.chat, "messages JSON in, the prompt the store's chat template renders out");
  app.add_option("--chat-template", o.chat_template,
                 std::string("with --chat: the template family instead of the store's (") + chat_template_names() + ")");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  RL_REQUIRE(!o.store.empty() || !o.tokenizer.empty(), "give --store DIR or --tokenizer FILE");
  RL_REQUIRE(!o.stream || (o.decode && o.lines), "--stream goes with --decode --lines");
  RL_REQUIRE(o.chat_template.empty() || o.chat, "--chat-template goes with --chat");
  if (o.chat) {
    RL_REQUIRE(!o.store.empty() && !o.decode && !o.lines, "--chat takes --store and neither --decode nor --lines");
    const std::string prompt = render_chat_json(load_chat_template(o.store, o.chat_template), read_input(o.file));
    RL_REQUIRE(fwrite(prompt.data(), 1, prompt.size(), stdout) == prompt.size() && fflush(stdout) == 0,
               "writing the output failed: {}", errno_text(errno));
    return 0;
  }
  std::unique_ptr<Tokenizer> tok =
      o.store.empty() ? Tokenizer::from_file(o.tokenizer) : Tokenizer::require_store(o.store);
  const std::string input = read_input(o.file);

  std::string out;
  double seconds = 0;
  size_t n_tokens = 0;
  auto timed_encode = [&](std::string_view text) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<int32_t> ids = tok->encode(text, o.add_special);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    n_tokens += ids.size();
    return ids;
  };
  if (!o.lines) {
    out = o.decode ? tok->decode(parse_ids(input), o.skip_special) : join_ids(timed_encode(input)) + "\n";
  } else {
    std::istringstream in(input);
    std::string line;
    size_t n = 0;
    while (std::getline(in, line)) {
      ++n;
      nlohmann::json item;
      try {
        item = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        fail("line {}: not JSON: {}", n, e.what());
      }
      if (!o.decode) {
        RL_REQUIRE(item.is_string(), "line {}: not a JSON string", n);
        out += join_ids(timed_encode(item.get<std::string>())) + "\n";
        continue;
      }
      RL_REQUIRE(item.is_array(), "line {}: not a JSON list of ids", n);
      std::vector<int32_t> ids;
      for (const auto& v : item) {
        RL_REQUIRE(v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() < (int64_t(1) << 31),
                   "line {}: not a token id: {}", n, v.dump());
        ids.push_back(v.get<int32_t>());
      }
      if (!o.stream) {
        out += nlohmann::json(tok->decode(ids, o.skip_special)).dump() + "\n";
        continue;
      }
      Tokenizer::Stream s = tok->stream(o.skip_special);
      nlohmann::json pieces = nlohmann::json::array();
      for (int32_t id : ids) pieces.push_back(s.push(id));
      pieces.push_back(s.flush());
      out += pieces.dump() + "\n";
    }
  }
  RL_REQUIRE(fwrite(out.data(), 1, out.size(), stdout) == out.size() && fflush(stdout) == 0,
             "writing the output failed: {}", errno_text(errno));
  if (o.time && !o.decode) fmt::print(stderr, "encode: {} bytes, {} tokens, {:.6f} s\n", input.size(), n_tokens, seconds);
  return 0;
}

}  // namespace
}  // namespace ringllama

int main(int argc, char** argv) { return ringllama::run_main("ringllama-tokenize", ringllama::run, argc, argv); }
