// Synthetic checkpoints and token files: shapes, config, determinism, value ranges; the checkpoint passes
// the same validation as a real one and runs through the forward pass.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>

#include "io/model_config.hpp"
#include "io/npy.hpp"
#include "io/safetensors.hpp"
#include "base/error.hpp"
#include "src/model.hpp"
#include "src/pipeline.hpp"
#include "src/synth.hpp"
#include "testdata.hpp"

namespace pipequant {
namespace {

SynthOptions small(const std::string& dir, uint64_t seed) {
  SynthOptions o;
  o.out_dir = dir;
  o.hidden_size = 64;
  o.intermediate_size = 96;
  o.num_layers = 2;
  o.num_heads = 4;
  o.num_kv_heads = 2;
  o.vocab_size = 100;
  o.dtype = "bf16";
  o.seed = seed;
  return o;
}

std::string bytes_of(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// The forward pass of the checkpoint in dir (vocabulary 100) gives finite, non-degenerate logits.
void expect_sane_logits(const std::string& dir) {
  const std::vector<int32_t> ids{1, 5, 9, 42, 99, 3};
  const auto logits = sequence_logits(dir, ids, RunOptions{});
  ASSERT_EQ(logits.size(), ids.size() * 100);
  EXPECT_TRUE(std::all_of(logits.begin(), logits.end(), [](float v) { return std::isfinite(v); }));
  EXPECT_NE(*std::max_element(logits.begin(), logits.end()), *std::min_element(logits.begin(), logits.end()));
}

TEST(Synth, CheckpointHasLlamaLayoutAndValidates) {
  const std::string dir = testing::scratch_dir("synth-a");
  write_synthetic_checkpoint(small(dir, 7));
  const io::ModelConfig c = io::ModelConfig::load(dir);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_FALSE(c.tie_word_embeddings);
  const io::Checkpoint ckpt = io::Checkpoint::open(dir);
  EXPECT_NO_THROW(validate_checkpoint(ckpt, c));
  EXPECT_EQ(ckpt.info("model.layers.1.self_attn.k_proj.weight").shape, (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(ckpt.info("model.layers.0.mlp.down_proj.weight").shape, (std::vector<int64_t>{64, 96}));
  EXPECT_EQ(ckpt.info("lm_head.weight").shape, (std::vector<int64_t>{100, 64}));
  EXPECT_EQ(ckpt.info("model.embed_tokens.weight").dtype, io::DType::kBF16);

  // weights are finite, not constant, of a scale that keeps activations sane
  const auto w = ckpt.read_f32("model.layers.0.self_attn.q_proj.weight");
  double sum2 = 0.0;
  for (float v : w) {
    ASSERT_TRUE(std::isfinite(v));
    sum2 += static_cast<double>(v) * v;
  }
  const double rms = std::sqrt(sum2 / static_cast<double>(w.size()));
  EXPECT_GT(rms, 1e-3);
  EXPECT_LT(rms, 1.0);

  expect_sane_logits(dir);
}

TEST(Synth, SameSeedSameBytesOtherSeedOtherWeights) {
  const std::string a = testing::scratch_dir("synth-seed-a"), b = testing::scratch_dir("synth-seed-b"),
                    c = testing::scratch_dir("synth-seed-c");
  write_synthetic_checkpoint(small(a, 11));
  write_synthetic_checkpoint(small(b, 11));
  write_synthetic_checkpoint(small(c, 12));
  EXPECT_EQ(bytes_of(a + "/model.safetensors"), bytes_of(b + "/model.safetensors"));
  EXPECT_NE(bytes_of(a + "/model.safetensors"), bytes_of(c + "/model.safetensors"));
}

TEST(Synth, TiedEmbeddingsWriteNoLmHead) {
  const std::string dir = testing::scratch_dir("synth-tied");
  SynthOptions o = small(dir, 3);
  o.tie_word_embeddings = true;
  o.dtype = "fp16";
  write_synthetic_checkpoint(o);
  const io::Checkpoint ckpt = io::Checkpoint::open(dir);
  EXPECT_FALSE(ckpt.has("lm_head.weight"));
  EXPECT_TRUE(io::ModelConfig::load(dir).tie_word_embeddings);
  EXPECT_EQ(ckpt.info("model.norm.weight").dtype, io::DType::kF16);
}

TEST(Synth, BiasesAreAddedLastAndLeaveTheWeightsAsTheyWere) {
  const std::string plain = testing::scratch_dir("synth-nobias"), biased = testing::scratch_dir("synth-bias");
  write_synthetic_checkpoint(small(plain, 9));
  SynthOptions o = small(biased, 9);
  o.attention_bias = true;
  o.mlp_bias = true;
  write_synthetic_checkpoint(o);
  const io::ModelConfig c = io::ModelConfig::load(biased);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_TRUE(c.mlp_bias);
  const io::Checkpoint a = io::Checkpoint::open(plain), b = io::Checkpoint::open(biased);
  EXPECT_NO_THROW(validate_checkpoint(b, c));
  EXPECT_EQ(b.names().size(), a.names().size() + 2 * 7);
  for (const auto& name : a.names()) EXPECT_EQ(a.read_f32(name), b.read_f32(name)) << name;
  const std::map<std::string, int64_t> widths = {
      {"self_attn.q_proj", 64}, {"self_attn.k_proj", 32}, {"self_attn.v_proj", 32}, {"self_attn.o_proj", 64},
      {"mlp.gate_proj", 96},    {"mlp.up_proj", 96},      {"mlp.down_proj", 64}};
  for (const auto& [module, out] : widths) {
    const std::string name = "model.layers.1." + module + ".bias";
    ASSERT_TRUE(b.has(name)) << name;
    EXPECT_EQ(b.info(name).shape, (std::vector<int64_t>{out}));
    const auto v = b.read_f32(name);
    double sum2 = 0.0;
    for (float x : v) sum2 += static_cast<double>(x) * x;
    const double rms = std::sqrt(sum2 / static_cast<double>(v.size()));
    EXPECT_GT(rms, 0.03) << name;  // non-zero, std 0.1
    EXPECT_LT(rms, 0.3) << name;
  }
  EXPECT_NE(b.read_f32("model.layers.0.self_attn.o_proj.bias"), b.read_f32("model.layers.1.self_attn.o_proj.bias"));

  // only one kind asked for: only those tensors
  const std::string mlp_only = testing::scratch_dir("synth-mlpbias");
  o = small(mlp_only, 9);
  o.mlp_bias = true;
  write_synthetic_checkpoint(o);
  const io::Checkpoint m = io::Checkpoint::open(mlp_only);
  EXPECT_TRUE(m.has("model.layers.0.mlp.down_proj.bias"));
  EXPECT_FALSE(m.has("model.layers.0.self_attn.q_proj.bias"));
  EXPECT_NO_THROW(validate_checkpoint(m, io::ModelConfig::load(mlp_only)));
}

SynthOptions qwen_moe(const std::string& dir, const std::string& architecture) {
  SynthOptions o = small(dir, 13);
  o.architecture = architecture;
  o.num_layers = 3;
  o.num_experts = 4;
  o.experts_per_token = 2;
  o.moe_intermediate_size = 32;
  o.mlp_only_layers = {1};
  if (architecture == "Qwen2MoeForCausalLM") o.shared_expert_intermediate_size = 48;
  return o;
}

TEST(Synth, QwenMoeCheckpointsHaveTheirExpertsAndValidate) {
  for (const std::string architecture : {"Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"}) {
    const std::string dir = testing::scratch_dir("synth-" + architecture);
    write_synthetic_checkpoint(qwen_moe(dir, architecture));
    const io::ModelConfig c = io::ModelConfig::load(dir);
    EXPECT_EQ(c.architecture, architecture);
    EXPECT_EQ(c.num_experts, 4);
    EXPECT_EQ(c.expert_intermediate_size, 32);
    EXPECT_EQ(c.mlp_only_layers, (std::vector<int64_t>{1}));
    EXPECT_FALSE(c.norm_topk_prob);
    const io::Checkpoint ckpt = io::Checkpoint::open(dir);
    EXPECT_NO_THROW(validate_checkpoint(ckpt, c)) << architecture;
    // blocks 0 and 2 have experts, block 1 (mlp_only_layers) the dense MLP
    EXPECT_EQ(ckpt.info("model.layers.0.mlp.gate.weight").shape, (std::vector<int64_t>{4, 64}));
    EXPECT_EQ(ckpt.info("model.layers.2.mlp.experts.3.down_proj.weight").shape, (std::vector<int64_t>{64, 32}));
    EXPECT_EQ(ckpt.info("model.layers.1.mlp.up_proj.weight").shape, (std::vector<int64_t>{96, 64}));
    EXPECT_FALSE(ckpt.has("model.layers.0.mlp.up_proj.weight"));
    EXPECT_FALSE(ckpt.has("model.layers.1.mlp.gate.weight"));
    const bool qwen2 = architecture == "Qwen2MoeForCausalLM";
    EXPECT_EQ(ckpt.has("model.layers.0.mlp.shared_expert.up_proj.weight"), qwen2);
    EXPECT_EQ(ckpt.has("model.layers.2.mlp.shared_expert_gate.weight"), qwen2);
    EXPECT_EQ(ckpt.has("model.layers.1.self_attn.q_proj.bias"), qwen2);
    EXPECT_EQ(ckpt.has("model.layers.1.self_attn.q_norm.weight"), !qwen2);
    if (qwen2) {
      EXPECT_EQ(ckpt.info("model.layers.0.mlp.shared_expert.down_proj.weight").shape, (std::vector<int64_t>{64, 48}));
    }
    // the experts differ from one another
    EXPECT_NE(ckpt.read_f32("model.layers.0.mlp.experts.0.gate_proj.weight"),
              ckpt.read_f32("model.layers.0.mlp.experts.1.gate_proj.weight"));
    expect_sane_logits(dir);
  }
}

TEST(Synth, ExpertOptionsBelongToTheirArchitectures) {
  const std::string dir = testing::scratch_dir("synth-moe-bad");
  SynthOptions o = small(dir, 1);
  o.num_experts = 4;  // Llama has no experts
  testing::expect_user_error([&] { write_synthetic_checkpoint(o); }, {"--num-experts", "LlamaForCausalLM"});
  o = qwen_moe(dir, "Qwen3MoeForCausalLM");
  o.shared_expert_intermediate_size = 16;
  testing::expect_user_error([&] { write_synthetic_checkpoint(o); },
                             {"--shared-expert-intermediate-size", "Qwen3MoeForCausalLM"});
  o = qwen_moe(dir, "Qwen2MoeForCausalLM");
  o.shared_expert_intermediate_size = 0;
  testing::expect_user_error([&] { write_synthetic_checkpoint(o); }, {"--shared-expert-intermediate-size"});
  o = qwen_moe(dir, "Qwen3MoeForCausalLM");
  o.experts_per_token = 5;
  testing::expect_user_error([&] { write_synthetic_checkpoint(o); }, {"--experts-per-token 5", "--num-experts 4"});
  o = qwen_moe(dir, "Qwen3MoeForCausalLM");
  o.mlp_only_layers = {3};
  testing::expect_user_error([&] { write_synthetic_checkpoint(o); }, {"--mlp-only-layers", "3", "[0, 3)"});
  o = qwen_moe(dir, "MixtralForCausalLM");  // Mixtral's experts are as wide as --intermediate-size
  testing::expect_user_error([&] { write_synthetic_checkpoint(o); }, {"--moe-intermediate-size", "Mixtral"});
  o.moe_intermediate_size = 0;
  o.mlp_only_layers.clear();
  write_synthetic_checkpoint(o);
  const io::ModelConfig c = io::ModelConfig::load(dir);
  EXPECT_EQ(c.expert_intermediate_size, 96);
  EXPECT_NO_THROW(validate_checkpoint(io::Checkpoint::open(dir), c));
  EXPECT_TRUE(io::Checkpoint::open(dir).has("model.layers.2.block_sparse_moe.experts.3.w2.weight"));
}

TEST(Synth, BadOptionsNameTheField) {
  const std::string dir = testing::scratch_dir("synth-bad");
  SynthOptions o = small(dir, 1);
  o.num_heads = 5;  // 64 is not a multiple of 5
  EXPECT_THROW(write_synthetic_checkpoint(o), UserError);
  o = small(dir, 1);
  o.num_kv_heads = 3;  // 4 query heads are not a multiple of 3
  EXPECT_THROW(write_synthetic_checkpoint(o), UserError);
  o = small(dir, 1);
  o.dtype = "int8";
  try {
    write_synthetic_checkpoint(o);
    FAIL() << "expected UserError";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("int8"), std::string::npos) << e.what();
  }
}

TEST(Synth, TokensAreInRangeDeterministicAndSkewed) {
  const std::string dir = testing::scratch_dir("synth-tokens");
  write_synthetic_tokens(dir + "/a.npy", 20000, 300, 4);
  write_synthetic_tokens(dir + "/b.npy", 20000, 300, 4);
  EXPECT_EQ(bytes_of(dir + "/a.npy"), bytes_of(dir + "/b.npy"));
  const io::TokenFile t = io::read_tokens(dir + "/a.npy");
  ASSERT_EQ(t.ids.size(), 20000u);
  std::map<int32_t, int> counts;
  for (int32_t id : t.ids) {
    ASSERT_GE(id, 0);
    ASSERT_LT(id, 300);
    ++counts[id];
  }
  int most = 0;
  for (const auto& [id, n] : counts) most = std::max(most, n);
  // p(rank 0) = 1 / H(300, 1.1) ~ 0.19: far above the uniform 1/300
  EXPECT_GT(most, 20000 / 300 * 10);
  EXPECT_GT(counts.size(), 150u);  // the tail is drawn too
}

}  // namespace
}  // namespace pipequant
