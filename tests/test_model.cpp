// The block forward of the CPU backend against the independent reference: logits of the first 32 tokens of
// the stories260K eval file (float64 reference), every bias added, and the tensor checks of a checkpoint (what
// is needed is there, and nothing the forward would ignore).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "io/npy.hpp"
#include "io/safetensors.hpp"
#include "base/error.hpp"
#include "src/model.hpp"
#include "src/pipeline.hpp"
#include "src/synth.hpp"
#include "tests/testdata.hpp"

namespace pipequant {
namespace {

TEST(Model, Stories260KLogitsMatchReference) {
  const io::TokenFile tokens = io::read_tokens(testing::testdata("text/tinystories_eval.tok512.npy"));
  const io::NpyArray ref = io::read_npy(testing::testdata("stories260K/reference_logits_eval_first32.npy"));
  ASSERT_EQ(ref.descr, "<f4");
  ASSERT_EQ(ref.shape, (std::vector<int64_t>{32, 512}));
  std::vector<float> want(32 * 512);
  std::memcpy(want.data(), ref.data.data(), want.size() * 4);
  const std::vector<int32_t> first(tokens.ids.begin(), tokens.ids.begin() + 32);
  const std::vector<float> got = sequence_logits(testing::testdata("stories260K"), first, RunOptions{});
  ASSERT_EQ(got.size(), want.size());
  double max_diff = 0.0, max_abs = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    max_diff = std::max(max_diff, static_cast<double>(std::fabs(got[i] - want[i])));
    max_abs = std::max(max_abs, static_cast<double>(std::fabs(want[i])));
  }
  std::printf("max |logit - reference| = %.3e over %zu logits (max |logit| %.2f)\n", max_diff, got.size(), max_abs);
  EXPECT_GT(max_abs, 1.0);      // the logits are not trivial
  EXPECT_LE(max_diff, 1e-4);    // the bound; fp32 forward vs float64 reference
}

TEST(Model, RopeInvFreqLlama3Scaling) {
  io::ModelConfig c;
  c.head_dim = 128;
  c.rope_theta = 500000.0;
  const auto plain = rope_inv_freq(c);
  EXPECT_FLOAT_EQ(plain[0], 1.0f);
  EXPECT_NEAR(plain[1], std::pow(500000.0, -2.0 / 128.0), 1e-6);  // float result
  c.rope_scaling.type = "llama3";
  c.rope_scaling.factor = 8.0;
  c.rope_scaling.low_freq_factor = 1.0;
  c.rope_scaling.high_freq_factor = 4.0;
  c.rope_scaling.original_max_position_embeddings = 8192;
  const auto scaled = rope_inv_freq(c);
  EXPECT_FLOAT_EQ(scaled[0], plain[0]);             // short wavelengths are kept
  EXPECT_NEAR(scaled[63] / (plain[63] / 8.0f), 1.0, 1e-6);  // long wavelengths are divided by the factor
}

TEST(Model, ValidateCheckpointNamesMissingTensor) {
  const io::Checkpoint ckpt = io::Checkpoint::open(testing::testdata("stories260K"));
  io::ModelConfig c = io::ModelConfig::load(testing::testdata("stories260K"));
  EXPECT_NO_THROW(validate_checkpoint(ckpt, c));
  c.num_layers = 6;  // one block more than the checkpoint holds
  try {
    validate_checkpoint(ckpt, c);
    FAIL() << "expected UserError";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.5."), std::string::npos) << e.what();
  }
  c.num_layers = 5;
  c.intermediate_size = 128;  // shapes no longer match
  try {
    validate_checkpoint(ckpt, c);
    FAIL() << "expected UserError";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("expected [128, 64]"), std::string::npos) << e.what();
  }
}

TEST(Model, SharedCheckpointsValidate) {
  for (const char* name : {"stories260K", "tiny-llama-6L"}) {
    const io::Checkpoint ckpt = io::Checkpoint::open(testing::testdata(name));
    EXPECT_NO_THROW(validate_checkpoint(ckpt, io::ModelConfig::load(testing::testdata(name)))) << name;
  }
}

// The options of a small fp32 synthetic checkpoint (2 blocks, hidden 32, 4 heads of 8, 2 KV heads, intermediate 48,
// vocab 64) in a fresh directory.
SynthOptions small_options(const std::string& name) {
  SynthOptions o;
  o.out_dir = testing::scratch_dir(name);
  o.hidden_size = 32;
  o.intermediate_size = 48;
  o.num_layers = 2;
  o.num_heads = 4;
  o.num_kv_heads = 2;
  o.vocab_size = 64;
  o.dtype = "fp32";
  o.seed = 5;
  return o;
}

std::string small_synth(const std::string& name, bool attention_bias, bool mlp_bias) {
  SynthOptions o = small_options(name);
  o.attention_bias = attention_bias;
  o.mlp_bias = mlp_bias;
  write_synthetic_checkpoint(o);
  return o.out_dir;
}

// A copy of checkpoint directory `src` (config.json and one safetensors file) with tensor `drop` left out and
// tensor `add` (F32, shape `shape`, values 0.5) added; either may be empty.
std::string edited_copy(const std::string& src, const std::string& name, const std::string& drop,
                        const std::string& add, const std::vector<int64_t>& shape = {}) {
  const std::string dir = testing::scratch_dir(name);
  std::filesystem::copy_file(src + "/config.json", dir + "/config.json");
  const io::Checkpoint ckpt = io::Checkpoint::open(src);
  std::vector<io::TensorToWrite> tensors;
  for (const auto& n : ckpt.names()) {
    if (n == drop) continue;
    const auto& info = ckpt.info(n);
    const auto raw = ckpt.raw(n);
    tensors.push_back({n, info.dtype, info.shape, std::vector<std::byte>(raw.begin(), raw.end())});
  }
  if (!add.empty()) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    std::vector<float> v(static_cast<size_t>(n), 0.5f);
    std::vector<std::byte> bytes(v.size() * 4);
    std::memcpy(bytes.data(), v.data(), bytes.size());
    tensors.push_back({add, io::DType::kF32, shape, std::move(bytes)});
  }
  io::write_safetensors(dir + "/model.safetensors", tensors);
  return dir;
}

void expect_refused(const std::string& dir, const io::ModelConfig& c, const std::vector<std::string>& parts) {
  const io::Checkpoint ckpt = io::Checkpoint::open(dir);
  testing::expect_user_error([&] { validate_checkpoint(ckpt, c); }, parts);
}

TEST(Model, ValidateCheckpointRefusesTensorsTheBlockDoesNotUse) {
  const std::string plain = small_synth("unused-plain", false, false);
  const io::ModelConfig c = io::ModelConfig::load(plain);
  EXPECT_NO_THROW(validate_checkpoint(io::Checkpoint::open(plain), c));

  // Qwen3 relabelled as Llama: per-head q_norm the forward would ignore
  std::string d = edited_copy(plain, "unused-qnorm", "", "model.layers.1.self_attn.q_norm.weight", {8});
  expect_refused(d, c, {d, "model.layers.1.self_attn.q_norm.weight", "not used", c.path});
  // a bias the config does not announce
  d = edited_copy(plain, "unused-obias", "", "model.layers.0.self_attn.o_proj.bias", {32});
  expect_refused(d, c, {"model.layers.0.self_attn.o_proj.bias", "field attention_bias", c.path});
  d = edited_copy(plain, "unused-downbias", "", "model.layers.1.mlp.down_proj.bias", {32});
  expect_refused(d, c, {"model.layers.1.mlp.down_proj.bias", "field mlp_bias"});
  // top-level tensors of another model, and block names that are not model.layers.<digits>.
  d = edited_copy(plain, "unused-top", "", "model.rotary_emb.scale", {4});
  expect_refused(d, c, {"model.rotary_emb.scale", "not a tensor of the Llama model", "model.embed_tokens.weight"});
  d = edited_copy(plain, "unused-badblock", "", "model.layers.x1.mlp.gate_proj.weight", {48, 32});
  expect_refused(d, c, {"model.layers.x1.mlp.gate_proj.weight", "not a tensor"});
  // old checkpoints' RoPE buffer is harmless: the forward computes the frequencies from the config
  d = edited_copy(plain, "unused-invfreq", "", "model.layers.1.self_attn.rotary_emb.inv_freq", {4});
  EXPECT_NO_THROW(validate_checkpoint(io::Checkpoint::open(d), c));
}

TEST(Model, ValidateCheckpointQwenMoeBlocks) {
  SynthOptions o = small_options("qwen2-moe");
  o.architecture = "Qwen2MoeForCausalLM";
  o.num_experts = 2;
  o.experts_per_token = 1;
  o.moe_intermediate_size = 16;
  o.shared_expert_intermediate_size = 24;
  o.mlp_only_layers = {0};
  write_synthetic_checkpoint(o);
  const std::string& moe = o.out_dir;
  const io::ModelConfig c = io::ModelConfig::load(moe);
  EXPECT_NO_THROW(validate_checkpoint(io::Checkpoint::open(moe), c));
  // an MoE block needs its router, every expert and the shared expert with its gate
  std::string d = edited_copy(moe, "moe-no-shared", "model.layers.1.mlp.shared_expert_gate.weight", "");
  expect_refused(d, c, {"model.layers.1.mlp.shared_expert_gate.weight", "missing", "[1, 32]"});
  d = edited_copy(moe, "moe-no-expert", "model.layers.1.mlp.experts.1.up_proj.weight", "");
  expect_refused(d, c, {"model.layers.1.mlp.experts.1.up_proj.weight", "missing", "[16, 32]"});
  // experts in the dense block 0 (mlp_only_layers), a dense MLP in the MoE block 1: neither would be read
  d = edited_copy(moe, "moe-expert-in-dense", "", "model.layers.0.mlp.experts.0.gate_proj.weight", {16, 32});
  expect_refused(d, c, {"model.layers.0.mlp.experts.0.gate_proj.weight", "not used by block 0", "mlp gate/up/down"});
  d = edited_copy(moe, "moe-dense-in-moe", "", "model.layers.1.mlp.gate_proj.weight", {48, 32});
  expect_refused(
      d, c,
      {"model.layers.1.mlp.gate_proj.weight", "not used by block 1", "the router mlp.gate", "mlp.shared_expert_gate"});
  // Qwen2-MoE's o_proj has no bias
  d = edited_copy(moe, "moe-obias", "", "model.layers.1.self_attn.o_proj.bias", {32});
  expect_refused(d, c, {"model.layers.1.self_attn.o_proj.bias", "Qwen2MoeForCausalLM", "q, k and v_proj only"});
}

TEST(Model, ValidateCheckpointBiases) {
  const std::string biased = small_synth("biases-all", true, true);
  io::ModelConfig c = io::ModelConfig::load(biased);
  ASSERT_TRUE(c.attention_bias && c.mlp_bias);
  EXPECT_NO_THROW(validate_checkpoint(io::Checkpoint::open(biased), c));
  // o_proj's bias is one of the attention biases (as in transformers' LlamaAttention)
  std::string d = edited_copy(biased, "biases-no-o", "model.layers.1.self_attn.o_proj.bias", "");
  expect_refused(d, c, {"model.layers.1.self_attn.o_proj.bias", "missing", "[32]"});
  // a wrong shape
  d = edited_copy(biased, "biases-wrong-shape", "model.layers.0.mlp.up_proj.bias", "model.layers.0.mlp.up_proj.bias",
                  {32});
  expect_refused(d, c, {"model.layers.0.mlp.up_proj.bias", "expected [48]"});
  // biases in a checkpoint whose config names Mistral, which has none
  c.architecture = "MistralForCausalLM";
  c.attention_bias = c.mlp_bias = false;
  expect_refused(biased, c, {biased, "model.layers.0.", ".bias", "MistralForCausalLM"});
}

// Every one of the seven linears adds its bias: zeroing any one of them changes the block's output.
TEST(Model, BlockForwardAddsEveryBias) {
  const std::string dir = small_synth("biases-forward", true, true);
  const io::ModelConfig c = io::ModelConfig::load(dir);
  const io::Checkpoint ckpt = io::Checkpoint::open(dir);
  const BlockWeights block = checkpoint_source(ckpt, c)->load_block(1);
  for (const auto& l : block.linears) ASSERT_EQ(static_cast<int64_t>(l.bias.size()), l.out);
  auto backend = kernels::make_cpu_backend(1);
  const int64_t seq = 6;
  BlockRunner runner(*backend, c, seq, 1);
  std::vector<float> x(static_cast<size_t>(seq * c.hidden_size));
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(std::sin(0.37 * static_cast<double>(i)));
  const auto output = [&](const BlockWeights& b) {
    runner.set_block(b);
    std::vector<float> out(x.size());
    backend->download(out.data(), runner.forward(x.data(), 1, Until::kOutput), out.size() * sizeof(float));
    return out;
  };
  const std::vector<float> full = output(block);
  for (int i = 0; i < kLinearCount; ++i) {
    BlockWeights without = block;
    auto& bias = without.linears[static_cast<size_t>(i)].bias;
    std::fill(bias.begin(), bias.end(), 0.0f);
    const std::vector<float> got = output(without);
    double max_diff = 0.0;
    for (size_t k = 0; k < got.size(); ++k)
      max_diff = std::max(max_diff, static_cast<double>(std::fabs(got[k] - full[k])));
    // the biases have std 0.1; one of them moves the output by far more than fp32 rounding (1e-6)
    EXPECT_GT(max_diff, 1e-3) << kLinears[static_cast<size_t>(i)].module << ".bias is not added";
  }
  // and the same block without biases at all is the one with zero biases
  BlockWeights zero = block, none = block;
  for (size_t i = 0; i < zero.linears.size(); ++i) {
    std::fill(zero.linears[i].bias.begin(), zero.linears[i].bias.end(), 0.0f);
    none.linears[i].bias.clear();
  }
  EXPECT_EQ(output(zero), output(none));
}

}  // namespace
}  // namespace pipequant
