// The block forward of the CPU backend against the independent reference: logits of the first 32 tokens of
// the stories260K eval file (float64 reference), and the expected tensor checks of a checkpoint.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "io/npy.hpp"
#include "io/safetensors.hpp"
#include "base/error.hpp"
#include "src/model.hpp"
#include "src/pipeline.hpp"
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

}  // namespace
}  // namespace pipequant
