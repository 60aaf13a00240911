// config.json of a Llama-family checkpoint: read, validated field by field, and written back.
#include "io/model_config.hpp"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string_view>

#include "base/error.hpp"
#include "io/json.hpp"

namespace pipequant::io {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Architectures whose forward is the Llama block pipequant computes (RMSNorm, rotate_half RoPE, GQA, SwiGLU, HF
// names), with their model_type. Mistral is Llama without biases, plus a sliding window (check_seq_len); Qwen2 is
// Llama with biases on q, k and v_proj (none on o_proj or the MLP, whatever the file says); Qwen3 is Llama with an
// RMSNorm over each head of q and k before RoPE (q_norm, k_norm), biases as attention_bias says, none in the MLP;
// Mixtral is Mistral with a Mixture-of-Experts MLP (num_local_experts, num_experts_per_tok; src/moe.hpp); Qwen2-MoE
// and Qwen3-MoE are Qwen2 and Qwen3 whose MoE blocks (moe_block) have experts of width moe_intermediate_size, the
// top-k weights renormalized only with norm_topk_prob, and for Qwen2-MoE a gated shared expert.
struct KnownArchitecture {
  std::string_view architecture;
  std::string_view model_type;
};
// clang-format off
inline constexpr KnownArchitecture kArchitectures[] = {{"LlamaForCausalLM", "llama"},
                                                       {"MistralForCausalLM", "mistral"},
                                                       {"Qwen2ForCausalLM", "qwen2"},
                                                       {"Qwen3ForCausalLM", "qwen3"},
                                                       {"MixtralForCausalLM", "mixtral"},
                                                       {"Qwen2MoeForCausalLM", "qwen2_moe"},
                                                       {"Qwen3MoeForCausalLM", "qwen3_moe"}};
// clang-format on

// "A, B or C" of one column of kArchitectures, each in `quote`s.
std::string known_list(std::string_view KnownArchitecture::*column, const char* quote) {
  std::string s;
  const size_t n = std::size(kArchitectures);
  for (size_t i = 0; i < n; ++i) {
    if (i > 0) s += i + 1 < n ? ", " : " or ";
    s += quote + std::string(kArchitectures[i].*column) + quote;
  }
  return s;
}

std::string_view model_type_of(const std::string& architecture) {
  for (const auto& k : kArchitectures)
    if (architecture == k.architecture) return k.model_type;
  return {};
}

inline constexpr std::string_view kRopeTypes[] = {"default", "linear", "llama3"};

// The value as written in the file, shortened so that an error stays one line.
std::string show(const json& v) {
  std::string s = v.dump();
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

// Field access with errors of the form "<origin>: field <name>: <what was expected>, got <value>".
// An optional field that is absent or null keeps its default.
class Fields {
 public:
  Fields(const json& j, const std::string& origin, std::string prefix = "")
      : j_(j), origin_(origin), prefix_(std::move(prefix)) {}

  bool present(const char* name) const { return j_.contains(name) && !j_[name].is_null(); }

  [[noreturn]] void bad(const char* name, const std::string& expected) const {
    if (!present(name)) fail(origin_, ": field ", prefix_, name, ": missing (expected ", expected, ")");
    fail(origin_, ": field ", prefix_, name, ": expected ", expected, ", got ", show(j_[name]));
  }

  int64_t positive_int(const char* name) const {
    if (!present(name)) bad(name, "a positive integer");
    const json& v = j_[name];
    if (v.is_number_unsigned()) {
      if (v.get<uint64_t>() > 0 && v.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX)) return v.get<int64_t>();
    } else if (v.is_number_integer()) {
      if (v.get<int64_t>() > 0) return v.get<int64_t>();
    }
    bad(name, "a positive integer");
  }
  void positive_int(const char* name, int64_t* out) const {
    if (present(name)) *out = positive_int(name);
  }

  double positive_number(const char* name) const {
    if (!present(name)) bad(name, "a positive number");
    const json& v = j_[name];
    if (v.is_number() && std::isfinite(v.get<double>()) && v.get<double>() > 0) return v.get<double>();
    bad(name, "a positive number");
  }
  void positive_number(const char* name, double* out) const {
    if (present(name)) *out = positive_number(name);
  }

  void boolean(const char* name, bool* out) const {
    if (!present(name)) return;
    if (!j_[name].is_boolean()) bad(name, "true or false");
    *out = j_[name].get<bool>();
  }

  // A list of block indices in [0, blocks) (mlp_only_layers).
  void index_list(const char* name, int64_t blocks, std::vector<int64_t>* out) const {
    if (!present(name)) return;
    const std::string expected = "a list of block indices in [0, " + std::to_string(blocks) + ")";
    if (!j_[name].is_array()) bad(name, expected);
    out->clear();
    for (const json& v : j_[name]) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= blocks) bad(name, expected);
      out->push_back(v.get<int64_t>());
    }
  }

  void string(const char* name, std::string* out) const {
    if (!present(name)) return;
    if (!j_[name].is_string()) bad(name, "a string");
    *out = j_[name].get<std::string>();
  }

  const json& operator[](const char* name) const { return j_[name]; }

 private:
  const json& j_;
  const std::string& origin_;
  std::string prefix_;
};

RopeScaling parse_rope_scaling(const json& v, const std::string& origin) {
  RopeScaling rs;
  if (v.is_null()) return rs;
  if (!v.is_object())
    fail(origin, ": field rope_scaling: expected null or an object {rope_type, factor, ...}, got ", show(v));
  const Fields f(v, origin, "rope_scaling.");
  // Newer configs say "rope_type", older ones "type"; some write both.
  const char* type_key = f.present("rope_type") ? "rope_type" : "type";
  if (!f.present(type_key)) f.bad("rope_type", "\"llama3\", \"linear\" or \"default\"");
  if (!v[type_key].is_string()) f.bad(type_key, "\"llama3\", \"linear\" or \"default\"");
  rs.type = v[type_key].get<std::string>();
  bool known = false;
  for (auto t : kRopeTypes) known |= rs.type == t;
  if (!known) f.bad(type_key, "\"llama3\", \"linear\" or \"default\" (other RoPE scalings are not supported)");

  if (rs.type == "default") {
    f.positive_number("factor", &rs.factor);
  } else {
    rs.factor = f.positive_number("factor");
  }
  if (rs.type == "llama3") {
    rs.low_freq_factor = f.positive_number("low_freq_factor");
    rs.high_freq_factor = f.positive_number("high_freq_factor");
    rs.original_max_position_embeddings = f.positive_int("original_max_position_embeddings");
    // the smooth ramp between the two wavelengths divides by their difference
    if (!(rs.high_freq_factor > rs.low_freq_factor))
      f.bad("high_freq_factor", "a number above low_freq_factor " + show(v["low_freq_factor"]));
  } else {
    f.positive_number("low_freq_factor", &rs.low_freq_factor);
    f.positive_number("high_freq_factor", &rs.high_freq_factor);
    f.positive_int("original_max_position_embeddings", &rs.original_max_position_embeddings);
  }
  return rs;
}

}  // namespace

ModelConfig ModelConfig::load(const std::string& path) {
  std::error_code ec;
  std::string file = path;
  if (fs::is_directory(path, ec)) file = (fs::path(path) / "config.json").string();
  PQ_REQUIRE(fs::is_regular_file(file, ec), file,
             ": not found (expected a config.json file or a checkpoint directory holding one)");
  return from_json(read_json_file(file), file);
}

namespace {

// architectures and model_type name the model whose forward a loader runs; both, where given, must name one that
// pipequant computes exactly. Unknown ones are refused rather than run as Llama. Returns the architecture.
std::string parse_architecture(const json& j, const Fields& f, const std::string& origin) {
  std::string architecture;
  std::string model_type;
  f.string("model_type", &model_type);
  if (f.present("architectures")) {
    const json& a = j["architectures"];
    if (!a.is_array() || a.empty()) f.bad("architectures", "a list such as [\"LlamaForCausalLM\"]");
    for (const auto& name : a) {  // every entry, not the first known one: a list naming another class is refused
      bool known = false;
      for (const auto& k : kArchitectures) {
        if (name.is_string() && name.get<std::string>() == k.architecture) {
          if (!architecture.empty() && architecture != k.architecture)
            f.bad("architectures", "one model class (two differ in their forward)");
          architecture = std::string(k.architecture);
          known = true;
        }
      }
      if (!known)
        f.bad("architectures", "a Llama-layout model (" + known_list(&KnownArchitecture::architecture, "") + ")");
    }
    // transformers' Auto classes build the model of model_type, vLLM the one of architectures: they must agree
    const std::string expected_type = std::string(model_type_of(architecture));
    if (!model_type.empty() && model_type != expected_type)
      f.bad("model_type", "\"" + expected_type + "\", the model_type of architectures " + architecture);
  } else if (!model_type.empty()) {
    architecture = architecture_of_model_type(model_type);
    if (architecture.empty())
      fail(origin, ": field architectures: missing, and field model_type ", show(j["model_type"]),
           " is not a Llama-layout model (expected architectures [\"LlamaForCausalLM\"] or model_type ",
           known_list(&KnownArchitecture::model_type, "\""), ")");
  }
  if (f.present("hidden_act")) {
    if (!(j["hidden_act"].is_string() && j["hidden_act"].get<std::string>() == "silu"))
      f.bad("hidden_act", "\"silu\" (the SwiGLU MLP of Llama)");
  }
  return architecture;
}

// The sizes: widths, layers, heads (GQA groups) and head_dim (given, or hidden_size / heads; even, for RoPE).
void parse_sizes(const Fields& f, const std::string& origin, ModelConfig& c) {
  c.hidden_size = f.positive_int("hidden_size");
  c.intermediate_size = f.positive_int("intermediate_size");
  c.num_layers = f.positive_int("num_hidden_layers");
  c.num_heads = f.positive_int("num_attention_heads");
  c.vocab_size = f.positive_int("vocab_size");

  c.num_kv_heads = c.num_heads;
  f.positive_int("num_key_value_heads", &c.num_kv_heads);
  if (c.num_heads % c.num_kv_heads != 0)
    f.bad("num_key_value_heads", "a divisor of num_attention_heads " + std::to_string(c.num_heads) +
                                     " (each KV head serves a group of query heads)");

  if (f.present("head_dim")) {
    c.head_dim = f.positive_int("head_dim");
  } else {
    if (c.hidden_size % c.num_heads != 0)
      f.bad("hidden_size",
            "a multiple of num_attention_heads " + std::to_string(c.num_heads) + " when head_dim is not given");
    c.head_dim = c.hidden_size / c.num_heads;
  }
  // RoPE rotates pairs of channels
  if (c.head_dim % 2 != 0)
    fail(origin, ": field head_dim: expected an even number (RoPE rotates pairs of channels), got ", c.head_dim,
         f.present("head_dim") ? "" : " (hidden_size / num_attention_heads)");
}

// The experts of a Mixture-of-Experts family: Mixtral's num_local_experts of width intermediate_size in every block,
// renormalized; Qwen MoE's num_experts of width moe_intermediate_size in the blocks moe_block picks, with their
// defaults as transformers' Qwen2MoeConfig and Qwen3MoeConfig have them (norm_topk_prob false, mlp_only_layers [],
// decoder_sparse_step 1), and Qwen2-MoE's shared expert. Nothing for the dense families.
void parse_experts(const Fields& f, ModelConfig& c) {
  if (!c.reads_experts()) return;
  const char* experts_field = c.reads_qwen_moe_fields() ? "num_experts" : "num_local_experts";
  c.num_experts = f.positive_int(experts_field);
  c.expert_intermediate_size = c.intermediate_size;
  if (c.reads_qwen_moe_fields()) {
    c.expert_intermediate_size = f.positive_int("moe_intermediate_size");
    f.boolean("norm_topk_prob", &c.norm_topk_prob);
    f.index_list("mlp_only_layers", c.num_layers, &c.mlp_only_layers);
    f.positive_int("decoder_sparse_step", &c.decoder_sparse_step);
    if (c.reads_shared_expert()) c.shared_expert_intermediate_size = f.positive_int("shared_expert_intermediate_size");
  }
  c.experts_per_token = f.positive_int("num_experts_per_tok");
  if (c.experts_per_token > c.num_experts)
    f.bad("num_experts_per_tok", std::string("at most ") + experts_field + " " + std::to_string(c.num_experts));
}

// The fields with defaults: positions, RoPE, norm epsilon, tying, biases, the sliding window, dtype, rope scaling.
void parse_optional_fields(const json& j, const Fields& f, const std::string& origin, ModelConfig& c) {
  f.positive_int("max_position_embeddings", &c.max_position_embeddings);
  f.positive_number("rope_theta", &c.rope_theta);
  f.positive_number("rms_norm_eps", &c.rms_norm_eps);
  f.boolean("tie_word_embeddings", &c.tie_word_embeddings);
  // The bias fields the architecture's modeling code reads (Mistral's and Qwen2's fix their biases whatever the file
  // says; bias tensors their checkpoint should not have are refused as unused by the checkpoint validation).
  if (c.reads_attention_bias()) f.boolean("attention_bias", &c.attention_bias);
  if (c.reads_mlp_bias()) f.boolean("mlp_bias", &c.mlp_bias);
  parse_experts(f, c);
  bool use_window = true;  // Qwen2-style configs switch the window off with use_sliding_window false
  f.boolean("use_sliding_window", &use_window);
  if (use_window) f.positive_int("sliding_window", &c.sliding_window);
  f.string("torch_dtype", &c.torch_dtype);
  if (j.contains("rope_scaling")) c.rope_scaling = parse_rope_scaling(j["rope_scaling"], origin);
}

}  // namespace

ModelConfig ModelConfig::from_json(const json& j, const std::string& origin) {
  PQ_REQUIRE(j.is_object(), origin, ": expected a JSON object of model fields, got a JSON ", j.type_name());
  const Fields f(j, origin);
  ModelConfig c;
  c.path = origin;
  c.raw = j;
  const std::string architecture = parse_architecture(j, f, origin);
  c.set_architecture(architecture.empty() ? c.architecture : architecture);
  parse_sizes(f, origin, c);
  parse_optional_fields(j, f, origin, c);
  return c;
}

std::string architecture_of_model_type(const std::string& model_type) {
  for (const auto& k : kArchitectures)
    if (model_type == k.model_type) return std::string(k.architecture);
  return "";
}

void ModelConfig::set_architecture(const std::string& name) {
  architecture = name;
  // Qwen2's attention (and Qwen2-MoE's): biases on q, k and v_proj, always
  qkv_bias = name == "Qwen2ForCausalLM" || name == "Qwen2MoeForCausalLM";
  // Qwen3's attention (and Qwen3-MoE's): RMSNorm over each head of q and k
  qk_norm = name == "Qwen3ForCausalLM" || name == "Qwen3MoeForCausalLM";
  // Mixtral renormalizes the top-k weights always; norm_topk_prob of the Qwen MoE configs defaults to false
  norm_topk_prob = !reads_qwen_moe_fields();
  if (!reads_attention_bias()) attention_bias = false;
  if (!reads_mlp_bias()) mlp_bias = false;
}

bool ModelConfig::reads_attention_bias() const {
  return architecture == "LlamaForCausalLM" || architecture == "Qwen3ForCausalLM" ||
         architecture == "Qwen3MoeForCausalLM";
}

bool ModelConfig::reads_experts() const { return architecture == "MixtralForCausalLM" || reads_qwen_moe_fields(); }

bool ModelConfig::reads_qwen_moe_fields() const {
  return architecture == "Qwen2MoeForCausalLM" || architecture == "Qwen3MoeForCausalLM";
}

bool ModelConfig::reads_shared_expert() const { return architecture == "Qwen2MoeForCausalLM"; }

bool ModelConfig::moe_block(int64_t b) const {
  if (!moe() || decoder_sparse_step <= 0 || (b + 1) % decoder_sparse_step != 0) return false;
  for (const int64_t d : mlp_only_layers)
    if (d == b) return false;
  return true;
}

bool ModelConfig::reads_mlp_bias() const { return architecture == "LlamaForCausalLM"; }

void ModelConfig::check_seq_len(int64_t seq_len) const {
  if (sliding_window == 0 || sliding_window >= seq_len) return;
  fail(path, ": field sliding_window: expected null or at least --seq-len ", seq_len, ", got ", sliding_window,
       " (the model attends only to the last ", sliding_window,
       " tokens; pipequant computes full causal attention): use --seq-len ", sliding_window, " or less");
}

namespace {

// The expert fields of the family (parse_experts reads them back).
void write_experts(const ModelConfig& c, json& j) {
  if (!c.moe()) return;
  j["num_experts_per_tok"] = c.experts_per_token;
  if (!c.reads_qwen_moe_fields()) {
    j["num_local_experts"] = c.num_experts;
    return;
  }
  j["num_experts"] = c.num_experts;
  j["moe_intermediate_size"] = c.expert_intermediate_size;
  j["norm_topk_prob"] = c.norm_topk_prob;
  j["mlp_only_layers"] = c.mlp_only_layers;
  j["decoder_sparse_step"] = c.decoder_sparse_step;
  if (c.reads_shared_expert()) j["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size;
}

}  // namespace

json ModelConfig::to_json() const {
  // Fields this struct does not model (bos_token_id, ...) are kept from the source file.
  json j = raw.is_object() ? raw : json::object();
  j["architectures"] = json::array({architecture});
  if (!j.contains("model_type")) j["model_type"] = std::string(model_type_of(architecture));
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_layers;
  j["num_attention_heads"] = num_heads;
  j["num_key_value_heads"] = num_kv_heads;
  j["head_dim"] = head_dim;
  j["vocab_size"] = vocab_size;
  if (max_position_embeddings > 0) j["max_position_embeddings"] = max_position_embeddings;
  j["rope_theta"] = rope_theta;
  j["rms_norm_eps"] = rms_norm_eps;
  j["hidden_act"] = "silu";
  j["tie_word_embeddings"] = tie_word_embeddings;
  // the bias fields the architecture reads (the others fix their biases)
  j.erase("attention_bias");
  j.erase("mlp_bias");
  if (reads_attention_bias()) j["attention_bias"] = attention_bias;
  if (reads_mlp_bias()) j["mlp_bias"] = mlp_bias;
  write_experts(*this, j);
  if (!torch_dtype.empty()) j["torch_dtype"] = torch_dtype;
  if (rope_scaling.type == "default" && rope_scaling.factor == 1.0) {
    j["rope_scaling"] = nullptr;
  } else {
    json rs = {{"rope_type", rope_scaling.type}, {"factor", rope_scaling.factor}};
    if (rope_scaling.type == "llama3") {
      rs["low_freq_factor"] = rope_scaling.low_freq_factor;
      rs["high_freq_factor"] = rope_scaling.high_freq_factor;
      rs["original_max_position_embeddings"] = rope_scaling.original_max_position_embeddings;
    }
    j["rope_scaling"] = rs;
  }
  return j;
}

}  // namespace pipequant::io
