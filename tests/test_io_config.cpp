// config.json: the two real test checkpoints, defaults, rope_scaling, round trip, and one test per bad field.
#include <gtest/gtest.h>

#include <fstream>
#include <functional>

#include "io/model_config.hpp"
#include "base/error.hpp"
#include "tests/testdata.hpp"

namespace pipequant::io {
namespace {

using nlohmann::json;
using pipequant::testing::scratch_dir;
using pipequant::testing::expect_user_error;
using pipequant::testing::testdata;


// A valid minimal config; tests change one field.
json base() {
  return {{"architectures", {"LlamaForCausalLM"}},
          {"hidden_size", 64},
          {"intermediate_size", 172},
          {"num_hidden_layers", 2},
          {"num_attention_heads", 8},
          {"vocab_size", 512}};
}

// from_json(j) must throw naming the origin "cfg.json", the field, and every part.
void expect_bad(const json& j, const std::string& field, std::vector<std::string> parts) {
  parts.push_back("cfg.json");
  parts.push_back("field " + field);
  expect_user_error([&] { ModelConfig::from_json(j, "cfg.json"); }, parts);
}

TEST(ModelConfig, Stories260K) {
  const ModelConfig c = ModelConfig::load(testdata("stories260K"));
  EXPECT_EQ(c.path, testdata("stories260K") + "/config.json");
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 172);
  EXPECT_EQ(c.num_layers, 5);
  EXPECT_EQ(c.num_heads, 8);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 8);  // not in the file: hidden / heads
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.max_position_embeddings, 512);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.mlp_bias);
  EXPECT_EQ(c.torch_dtype, "float32");
  EXPECT_EQ(c.rope_scaling.type, "default");
  EXPECT_EQ(c.raw["bos_token_id"], 1);
}

TEST(ModelConfig, TinyLlama6LByFilePath) {
  const ModelConfig c = ModelConfig::load(testdata("tiny-llama-6L/config.json"));
  EXPECT_EQ(c.hidden_size, 256);
  EXPECT_EQ(c.intermediate_size, 768);
  EXPECT_EQ(c.num_layers, 6);
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.vocab_size, 4096);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
}

TEST(ModelConfig, Defaults) {
  json j = base();
  j.erase("architectures");
  const ModelConfig c = ModelConfig::from_json(j, "cfg.json");
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.max_position_embeddings, 0);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.torch_dtype, "");
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
}

TEST(ModelConfig, NullOptionalFieldsKeepDefaults) {
  json j = base();
  j["head_dim"] = nullptr;
  j["rope_scaling"] = nullptr;
  j["num_key_value_heads"] = nullptr;
  const ModelConfig c = ModelConfig::from_json(j, "cfg.json");
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.rope_scaling.type, "default");
}

TEST(ModelConfig, ExplicitHeadDimAndMistral) {
  json j = base();
  j["architectures"] = {"MistralForCausalLM"};
  j["head_dim"] = 16;  // q_proj is then [128, 64], as Mistral-Nemo / Llama variants allow
  j["num_key_value_heads"] = 2;
  const ModelConfig c = ModelConfig::from_json(j, "cfg.json");
  EXPECT_EQ(c.architecture, "MistralForCausalLM");
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.num_kv_heads, 2);
}

TEST(ModelConfig, RopeScalingLlama3) {
  json j = base();
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  j["rope_theta"] = 500000.0;
  const ModelConfig c = ModelConfig::from_json(j, "cfg.json");
  EXPECT_EQ(c.rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
}

TEST(ModelConfig, RopeScalingLinearWithOldTypeKey) {
  json j = base();
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  const ModelConfig c = ModelConfig::from_json(j, "cfg.json");
  EXPECT_EQ(c.rope_scaling.type, "linear");
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 2.0);
}

TEST(ModelConfig, ToJsonRoundTrip) {
  json j = base();
  j["num_key_value_heads"] = 4;
  j["tie_word_embeddings"] = true;
  j["rms_norm_eps"] = 1e-6;
  j["bos_token_id"] = 1;
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 32.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  const ModelConfig a = ModelConfig::from_json(j, "cfg.json");
  const json out = a.to_json();
  EXPECT_EQ(out["bos_token_id"], 1);  // fields not modelled are kept
  EXPECT_EQ(out["hidden_act"], "silu");
  const ModelConfig b = ModelConfig::from_json(out, "out.json");
  EXPECT_EQ(b.hidden_size, a.hidden_size);
  EXPECT_EQ(b.intermediate_size, a.intermediate_size);
  EXPECT_EQ(b.num_layers, a.num_layers);
  EXPECT_EQ(b.num_heads, a.num_heads);
  EXPECT_EQ(b.num_kv_heads, 4);
  EXPECT_EQ(b.head_dim, a.head_dim);
  EXPECT_EQ(b.vocab_size, a.vocab_size);
  EXPECT_EQ(b.tie_word_embeddings, true);
  EXPECT_DOUBLE_EQ(b.rms_norm_eps, 1e-6);
  EXPECT_EQ(b.rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(b.rope_scaling.factor, 32.0);

  // a config built in code (as synth does) writes a complete file
  ModelConfig fresh;
  fresh.hidden_size = 32;
  fresh.intermediate_size = 96;
  fresh.num_layers = 1;
  fresh.num_heads = 4;
  fresh.num_kv_heads = 2;
  fresh.head_dim = 8;
  fresh.vocab_size = 100;
  const ModelConfig back = ModelConfig::from_json(fresh.to_json(), "fresh");
  EXPECT_EQ(back.num_kv_heads, 2);
  EXPECT_EQ(back.head_dim, 8);
  EXPECT_TRUE(back.to_json()["rope_scaling"].is_null());
}

// ---- bad fields ----

TEST(ModelConfigBad, MissingRequiredField) {
  for (const char* field :
       {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"}) {
    json j = base();
    j.erase(field);
    expect_bad(j, field, {"missing", "positive integer"});
  }
}

TEST(ModelConfigBad, StringWhereIntegerExpected) {
  json j = base();
  j["hidden_size"] = "abc";
  expect_bad(j, "hidden_size", {"expected a positive integer, got \"abc\""});
}

TEST(ModelConfigBad, ZeroNegativeAndFractional) {
  json j = base();
  j["vocab_size"] = 0;
  expect_bad(j, "vocab_size", {"positive integer", "got 0"});
  j = base();
  j["num_hidden_layers"] = -3;
  expect_bad(j, "num_hidden_layers", {"got -3"});
  j = base();
  j["intermediate_size"] = 171.5;
  expect_bad(j, "intermediate_size", {"got 171.5"});
}

TEST(ModelConfigBad, KvHeadsDoNotDivideHeads) {
  json j = base();
  j["num_key_value_heads"] = 3;
  expect_bad(j, "num_key_value_heads", {"divisor of num_attention_heads 8", "got 3"});
}

TEST(ModelConfigBad, HiddenNotMultipleOfHeads) {
  json j = base();
  j["num_attention_heads"] = 6;
  j["num_key_value_heads"] = 6;
  expect_bad(j, "hidden_size", {"multiple of num_attention_heads 6"});
}

TEST(ModelConfigBad, OddHeadDim) {
  json j = base();
  j["head_dim"] = 7;
  expect_bad(j, "head_dim", {"even", "7"});
}

TEST(ModelConfigBad, WrongArchitecture) {
  json j = base();
  j["architectures"] = {"GPT2LMHeadModel"};
  expect_bad(j, "architectures", {"LlamaForCausalLM", "got [\"GPT2LMHeadModel\"]"});
  j["architectures"] = "LlamaForCausalLM";
  expect_bad(j, "architectures", {"a list"});
}

TEST(ModelConfigBad, ArchitectureListNamingAnotherModel) {
  json j = base();
  // every entry counts, not the first known one
  j["architectures"] = json::array({"LlamaForCausalLM", "GemmaForCausalLM"});
  expect_bad(j, "architectures", {"LlamaForCausalLM", "GemmaForCausalLM"});
  j["architectures"] = json::array({"LlamaForCausalLM", "Qwen3ForCausalLM"});  // two known ones: which would run?
  EXPECT_THROW(ModelConfig::from_json(j, "cfg.json"), UserError);
  j["architectures"] = json::array();
  expect_bad(j, "architectures", {"a list such as"});
}

TEST(ModelConfig, MixtralHasExperts) {
  const ModelConfig c = ModelConfig::load(testdata("mixtral-tiny"));
  EXPECT_EQ(c.architecture, "MixtralForCausalLM");
  EXPECT_TRUE(c.moe());
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.experts_per_token, 2);
  EXPECT_EQ(c.intermediate_size, 128);
  EXPECT_FALSE(ModelConfig::load(testdata("stories260K")).moe());
  json j = c.raw;
  j["num_experts_per_tok"] = 9;
  expect_bad(j, "num_experts_per_tok", {"at most num_local_experts 8"});
  j.erase("num_local_experts");
  expect_bad(j, "num_local_experts", {"missing"});
}

// A Qwen3-MoE config as transformers' Qwen3MoeConfig writes it (the fields pipequant reads).
json qwen3_moe() {
  json j = base();
  j["architectures"] = {"Qwen3MoeForCausalLM"};
  j["model_type"] = "qwen3_moe";
  j["num_hidden_layers"] = 4;
  j["head_dim"] = 16;
  j["num_experts"] = 8;
  j["num_experts_per_tok"] = 2;
  j["moe_intermediate_size"] = 32;
  return j;
}

TEST(ModelConfig, Qwen3MoeExpertsWithTransformersDefaults) {
  ModelConfig c = ModelConfig::from_json(qwen3_moe(), "cfg.json");
  EXPECT_EQ(c.architecture, "Qwen3MoeForCausalLM");
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.experts_per_token, 2);
  EXPECT_EQ(c.expert_intermediate_size, 32);
  EXPECT_EQ(c.intermediate_size, 172);  // the dense blocks' width
  EXPECT_FALSE(c.norm_topk_prob);       // Qwen3MoeConfig's default
  EXPECT_TRUE(c.mlp_only_layers.empty());
  EXPECT_EQ(c.decoder_sparse_step, 1);
  EXPECT_FALSE(c.shared_expert());
  for (int64_t b = 0; b < 4; ++b) EXPECT_TRUE(c.moe_block(b)) << b;
  // mlp_only_layers and decoder_sparse_step pick the MoE blocks as Qwen3MoeDecoderLayer does
  json j = qwen3_moe();
  j["mlp_only_layers"] = {0, 3};
  j["decoder_sparse_step"] = 2;
  j["norm_topk_prob"] = true;
  j["attention_bias"] = true;
  c = ModelConfig::from_json(j, "cfg.json");
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_EQ(c.mlp_only_layers, (std::vector<int64_t>{0, 3}));
  EXPECT_EQ((std::vector<bool>{c.moe_block(0), c.moe_block(1), c.moe_block(2), c.moe_block(3)}),
            (std::vector<bool>{false, true, false, false}));
  // written back and read again the same
  const json out = c.to_json();
  EXPECT_EQ(out["model_type"], "qwen3_moe");
  EXPECT_FALSE(out.contains("num_local_experts"));
  const ModelConfig back = ModelConfig::from_json(out, "out.json");
  EXPECT_EQ(back.num_experts, 8);
  EXPECT_EQ(back.expert_intermediate_size, 32);
  EXPECT_EQ(back.mlp_only_layers, c.mlp_only_layers);
  EXPECT_EQ(back.decoder_sparse_step, 2);
  EXPECT_TRUE(back.norm_topk_prob);
  // model_type alone names it too
  j.erase("architectures");
  EXPECT_EQ(ModelConfig::from_json(j, "cfg.json").architecture, "Qwen3MoeForCausalLM");
}

TEST(ModelConfig, Qwen2MoeSharedExpertAndQkvBiases) {
  json j = qwen3_moe();
  j["architectures"] = {"Qwen2MoeForCausalLM"};
  j["model_type"] = "qwen2_moe";
  j.erase("head_dim");
  j["shared_expert_intermediate_size"] = 48;
  j["attention_bias"] = true;  // not a Qwen2-MoE field: its q, k, v_proj have biases, o_proj none
  ModelConfig c = ModelConfig::from_json(j, "cfg.json");
  EXPECT_EQ(c.architecture, "Qwen2MoeForCausalLM");
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_TRUE(c.shared_expert());
  EXPECT_EQ(c.shared_expert_intermediate_size, 48);
  EXPECT_FALSE(c.norm_topk_prob);
  const json out = c.to_json();
  EXPECT_EQ(out["shared_expert_intermediate_size"], 48);
  EXPECT_EQ(ModelConfig::from_json(out, "out.json").shared_expert_intermediate_size, 48);
  j.erase("shared_expert_intermediate_size");
  expect_bad(j, "shared_expert_intermediate_size", {"missing", "positive integer"});
  // Qwen3-MoE has no shared expert: the field means nothing there
  j = qwen3_moe();
  j["shared_expert_intermediate_size"] = 48;
  EXPECT_FALSE(ModelConfig::from_json(j, "cfg.json").shared_expert());
  // Mixtral renormalizes always, whatever norm_topk_prob says
  json m = ModelConfig::load(testdata("mixtral-tiny")).raw;
  m["norm_topk_prob"] = false;
  EXPECT_TRUE(ModelConfig::from_json(m, "cfg.json").norm_topk_prob);
}

TEST(ModelConfigBad, QwenMoeFields) {
  json j = qwen3_moe();
  j["num_experts_per_tok"] = 9;
  expect_bad(j, "num_experts_per_tok", {"at most num_experts 8", "got 9"});
  j = qwen3_moe();
  j.erase("num_experts");
  expect_bad(j, "num_experts", {"missing"});
  j = qwen3_moe();
  j.erase("moe_intermediate_size");
  expect_bad(j, "moe_intermediate_size", {"missing"});
  j = qwen3_moe();
  j["decoder_sparse_step"] = 0;
  expect_bad(j, "decoder_sparse_step", {"positive integer", "got 0"});
  j = qwen3_moe();
  j["mlp_only_layers"] = {1, 4};  // 4 blocks: 0..3
  expect_bad(j, "mlp_only_layers", {"block indices in [0, 4)", "got [1,4]"});
  j["mlp_only_layers"] = 1;
  expect_bad(j, "mlp_only_layers", {"a list of block indices"});
  j["mlp_only_layers"] = {-1};
  expect_bad(j, "mlp_only_layers", {"block indices"});
  j = qwen3_moe();
  j["norm_topk_prob"] = "false";
  expect_bad(j, "norm_topk_prob", {"true or false"});
}

TEST(ModelConfig, ModelTypeWithoutArchitectures) {
  json j = base();
  j.erase("architectures");
  j["model_type"] = "llama";
  EXPECT_EQ(ModelConfig::from_json(j, "cfg.json").architecture, "LlamaForCausalLM");
  j["model_type"] = "mistral";
  EXPECT_EQ(ModelConfig::from_json(j, "cfg.json").architecture, "MistralForCausalLM");
}

TEST(ModelConfigBad, ModelTypeOfAnotherModel) {
  json j = base();
  j.erase("architectures");
  j["model_type"] = "gemma";  // a relabelled Gemma without architectures is not taken for Llama
  expect_bad(j, "architectures", {"missing", "field model_type \"gemma\"", "\"llama\""});
  j = base();
  j["model_type"] = "qwen3";  // architectures says Llama, model_type another model: the loaders disagree
  expect_bad(j, "model_type", {"\"llama\"", "LlamaForCausalLM", "got \"qwen3\""});
  j["architectures"] = {"MistralForCausalLM"};
  j["model_type"] = "llama";
  expect_bad(j, "model_type", {"\"mistral\"", "MistralForCausalLM"});
}

TEST(ModelConfig, BiasesAsTransformersReadsThem) {
  json j = base();
  j["attention_bias"] = true;
  j["mlp_bias"] = true;
  ModelConfig c = ModelConfig::from_json(j, "cfg.json");
  EXPECT_TRUE(c.attention_bias);
  EXPECT_TRUE(c.mlp_bias);
  EXPECT_TRUE(ModelConfig::from_json(c.to_json(), "out.json").attention_bias);
  // Mistral's linears have no bias whatever the file says; bias tensors are then refused by the checkpoint check
  j["architectures"] = {"MistralForCausalLM"};
  c = ModelConfig::from_json(j, "cfg.json");
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.mlp_bias);
  EXPECT_FALSE(c.qkv_bias);
  // Qwen2's q, k and v_proj always have biases, its o_proj and MLP none, whatever the file says
  j["architectures"] = {"Qwen2ForCausalLM"};
  j["model_type"] = "qwen2";
  c = ModelConfig::from_json(j, "cfg.json");
  EXPECT_EQ(c.architecture, "Qwen2ForCausalLM");
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.mlp_bias);
  const json out = c.to_json();
  EXPECT_EQ(out["model_type"], "qwen2");
  EXPECT_FALSE(out.contains("attention_bias"));
  EXPECT_TRUE(ModelConfig::from_json(out, "out.json").qkv_bias);
  // model_type alone names it too
  j.erase("architectures");
  EXPECT_EQ(ModelConfig::from_json(j, "cfg.json").architecture, "Qwen2ForCausalLM");
}

TEST(ModelConfig, SlidingWindow) {
  json j = base();
  ModelConfig c = ModelConfig::from_json(j, "cfg.json");
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_NO_THROW(c.check_seq_len(1 << 20));
  j["sliding_window"] = nullptr;  // Mistral v0.2 and later
  EXPECT_EQ(ModelConfig::from_json(j, "cfg.json").sliding_window, 0);
  j["sliding_window"] = 4096;  // Mistral v0.1
  c = ModelConfig::from_json(j, "cfg.json");
  EXPECT_EQ(c.sliding_window, 4096);
  EXPECT_NO_THROW(c.check_seq_len(4096));  // every position still sees the whole sequence
  EXPECT_NO_THROW(c.check_seq_len(2048));
  expect_user_error([&] { c.check_seq_len(4097); },
                    {"cfg.json", "field sliding_window", "--seq-len 4097", "got 4096", "--seq-len 4096 or less"});
  j["use_sliding_window"] = false;  // Qwen2-style switch: the window is off
  c = ModelConfig::from_json(j, "cfg.json");
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_NO_THROW(c.check_seq_len(8192));
  j["use_sliding_window"] = true;
  EXPECT_EQ(ModelConfig::from_json(j, "cfg.json").sliding_window, 4096);
}

TEST(ModelConfigBad, SlidingWindowFields) {
  json j = base();
  j["sliding_window"] = "4096";
  expect_bad(j, "sliding_window", {"positive integer", "got \"4096\""});
  j["sliding_window"] = 0;
  expect_bad(j, "sliding_window", {"positive integer", "got 0"});
  j["sliding_window"] = 64;
  j["use_sliding_window"] = "no";
  expect_bad(j, "use_sliding_window", {"true or false"});
}

TEST(ModelConfigBad, HiddenActNotSilu) {
  json j = base();
  j["hidden_act"] = "gelu";
  expect_bad(j, "hidden_act", {"silu", "got \"gelu\""});
}

TEST(ModelConfigBad, WrongTypesOfOptionalFields) {
  json j = base();
  j["tie_word_embeddings"] = "yes";
  expect_bad(j, "tie_word_embeddings", {"true or false"});
  j = base();
  j["rope_theta"] = -1.0;
  expect_bad(j, "rope_theta", {"positive number"});
  j = base();
  j["rms_norm_eps"] = "1e-5";
  expect_bad(j, "rms_norm_eps", {"positive number"});
  j = base();
  j["torch_dtype"] = 16;
  expect_bad(j, "torch_dtype", {"a string"});
}

TEST(ModelConfigBad, RopeScaling) {
  json j = base();
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  expect_bad(j, "rope_scaling.rope_type", {"llama3", "got \"yarn\""});
  j["rope_scaling"] = {{"factor", 4.0}};
  expect_bad(j, "rope_scaling.rope_type", {"missing"});
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}};
  expect_bad(j, "rope_scaling.high_freq_factor", {"missing"});
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 4.0},
                       {"high_freq_factor", 1.0},
                       {"original_max_position_embeddings", 8192}};
  expect_bad(j, "rope_scaling.high_freq_factor", {"above low_freq_factor"});
  j["rope_scaling"] = {{"type", "linear"}};
  expect_bad(j, "rope_scaling.factor", {"missing"});
  j["rope_scaling"] = "llama3";
  expect_bad(j, "rope_scaling", {"null or an object"});
}

TEST(ModelConfigBad, NotAnObject) {
  expect_user_error([] { ModelConfig::from_json(json::array({1, 2}), "cfg.json"); }, {"cfg.json", "JSON object"});
}

TEST(ModelConfigBad, MissingFile) {
  const std::string dir = scratch_dir("cfg-missing");
  expect_user_error([&] { ModelConfig::load(dir); }, {dir + "/config.json", "not found"});
  expect_user_error([&] { ModelConfig::load(dir + "/nope.json"); }, {"nope.json", "not found"});
}

TEST(ModelConfigBad, FileNotJson) {
  const std::string dir = scratch_dir("cfg-not-json");
  std::ofstream(dir + "/config.json") << "{\"hidden_size\": 64,,}";
  expect_user_error([&] { ModelConfig::load(dir); }, {dir + "/config.json", "not valid JSON"});
}

TEST(ModelConfigBad, LoadNamesTheFile) {
  const std::string dir = scratch_dir("cfg-bad-field");
  json j = base();
  j["vocab_size"] = "512";
  std::ofstream(dir + "/config.json") << j.dump();
  expect_user_error([&] { ModelConfig::load(dir); }, {dir + "/config.json", "field vocab_size", "got \"512\""});
}

}  // namespace
}  // namespace pipequant::io
