// Fuzzes the readers of a checkpoint's JSON configs: config.json (ModelConfig::load) and the quantization config
// (read_quantization_config: config.json's quantization_config, else quantize_config.json, else quant_config.json).
// The input is config.json, optionally followed by "\n#file\n" and quantize_config.json, and by a second
// "\n#file\n" and quant_config.json. What is accepted must survive the way back: the config.json that to_json() writes
// (synth, export) and the quantization_config that quantization_config_json() writes (export) read back to the same
// values.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz/fuzz_util.hpp"
#include "io/hf_quant.hpp"
#include "io/model_config.hpp"

namespace {

using namespace pipequant;

inline constexpr std::string_view kSeparator = "\n#file\n";
inline constexpr const char* kFiles[] = {"config.json", "quantize_config.json", "quant_config.json"};

bool same_sizes(const io::ModelConfig& a, const io::ModelConfig& b) {
  return a.architecture == b.architecture && a.hidden_size == b.hidden_size &&
         a.intermediate_size == b.intermediate_size && a.num_layers == b.num_layers && a.num_heads == b.num_heads &&
         a.num_kv_heads == b.num_kv_heads && a.head_dim == b.head_dim && a.vocab_size == b.vocab_size &&
         a.max_position_embeddings == b.max_position_embeddings && a.rope_theta == b.rope_theta &&
         a.rms_norm_eps == b.rms_norm_eps && a.tie_word_embeddings == b.tie_word_embeddings &&
         a.attention_bias == b.attention_bias && a.mlp_bias == b.mlp_bias && a.sliding_window == b.sliding_window &&
         a.torch_dtype == b.torch_dtype && a.rope_scaling.type == b.rope_scaling.type &&
         a.rope_scaling.factor == b.rope_scaling.factor;
}

bool same_quant(const io::HfQuantConfig& a, const io::HfQuantConfig& b) {
  return a.format == b.format && a.bits == b.bits && a.group_size == b.group_size && a.desc_act == b.desc_act &&
         a.sym == b.sym && a.static_groups == b.static_groups && a.zero_point == b.zero_point &&
         a.damp_percent == b.damp_percent;
}

void check_model_config(const std::string& dir) {
  const io::ModelConfig c = io::ModelConfig::load(dir);
  fuzz::invariant(c.hidden_size > 0 && c.num_heads > 0 && c.num_kv_heads > 0 && c.head_dim > 0 && c.head_dim % 2 == 0,
                  "ModelConfig accepted a non-positive size or an odd head_dim");
  fuzz::invariant(c.num_heads % c.num_kv_heads == 0, "ModelConfig accepted heads that are no multiple of kv heads");
  for (const int64_t seq_len : {int64_t{1}, c.sliding_window, int64_t{1} << 62})
    fuzz::refused([&] { c.check_seq_len(seq_len); });
  const nlohmann::json written = c.to_json();
  io::ModelConfig back;
  const bool refused = fuzz::refused([&] { back = io::ModelConfig::from_json(written, "to_json"); });
  fuzz::invariant(!refused, "the config.json that to_json() writes is refused by from_json()");
  fuzz::invariant(same_sizes(c, back), "the config.json that to_json() writes reads back to other values");
}

void check_quantization_config(const std::string& dir) {
  const std::optional<io::HfQuantConfig> q = io::read_quantization_config(dir);
  if (!q) return;
  fuzz::invariant(q->bits == 2 || q->bits == 3 || q->bits == 4 || q->bits == 8, "quantization config: bits accepted");
  fuzz::invariant(q->group_size == -1 || q->group_size > 0, "quantization config: group_size accepted");
  const nlohmann::json written = io::quantization_config_json(*q, "fuzz");
  std::optional<io::HfQuantConfig> back;
  const bool refused = fuzz::refused([&] { back = io::parse_quantization_config(written, "written"); });
  fuzz::invariant(!refused && back.has_value(), "the quantization_config that export writes is refused");
  fuzz::invariant(same_quant(*q, *back), "the quantization_config that export writes reads back to other values");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = fuzz::scratch_dir("model_config");
  const std::vector<std::string_view> parts = fuzz::split(data, size, kSeparator);
  for (size_t i = 0; i < 3; ++i) {
    const std::string file = dir + "/" + kFiles[i];
    if (i < parts.size())
      fuzz::write_file(file, parts[i]);
    else
      fuzz::remove_file(file);  // not left over from the input before
  }
  fuzz::refused([&] { check_model_config(dir); });
  fuzz::refused([&] { check_quantization_config(dir); });
  return 0;
}
