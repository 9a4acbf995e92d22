// A Hugging Face config.json -> ModelConfig. Both forms in use are read: the one Llama 3.x was
// published with (top-level rope_theta, rope_scaling {rope_type|type, ...}, torch_dtype) and the
// transformers 5 form (rope_parameters {rope_type, rope_theta, ...}, dtype). Unknown fields are
// ignored; anything this engine cannot run (another architecture, a rope type other than default
// or llama3, biases) is refused with the field named.
#pragma once

#include <string>

#include "common/model_config.h"

namespace ringllama {

// `what` names the source in messages ("DIR/config.json"). Throws StoreError.
ModelConfig parse_hf_config(const std::string& json_text, const std::string& what);

// Reads DIR/config.json. Throws StoreError (also when the file is missing).
ModelConfig load_hf_config(const std::string& dir);

}  // namespace ringllama
