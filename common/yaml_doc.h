// YAML text that must hold one document (the manifest, a config file), read without yaml-cpp's
// LoadAll: on text with a stray ',' outside a flow collection (", a", "[a],") LoadAll (0.7) never
// returns, its parser reporting the same empty document again and again while the list of
// documents grows without bound.
#pragma once

#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/exceptions.h>
#include <yaml-cpp/yaml.h>

#include <cstddef>
#include <sstream>
#include <string>

namespace ringllama {

namespace yaml_detail {

// Only where each document starts matters: a document that starts where the previous one did
// means the parser made no progress.
class DocumentStarts : public YAML::EventHandler {
 public:
  YAML::Mark start;
  void OnDocumentStart(const YAML::Mark& mark) override { start = mark; }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
  void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
  void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t, const std::string&) override {}
  void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
  void OnSequenceEnd() override {}
  void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
  void OnMapEnd() override {}
};

}  // namespace yaml_detail

// The first document of `text` (a null node when there is none); *documents gets how many the
// text holds. Throws YAML::Exception for text that is not YAML.
inline YAML::Node load_yaml_document(const std::string& text, size_t* documents) {
  std::istringstream in(text);
  YAML::Parser parser(in);
  yaml_detail::DocumentStarts starts;
  size_t n = 0;
  int last_pos = -1;
  while (parser.HandleNextDocument(starts)) {
    if (starts.start.pos == last_pos)
      throw YAML::ParserException(starts.start, "unexpected text the parser cannot go past (a ',' outside [ ] or { }?)");
    last_pos = starts.start.pos;
    ++n;
  }
  *documents = n;
  return n == 0 ? YAML::Node() : YAML::Load(text);
}

}  // namespace ringllama
