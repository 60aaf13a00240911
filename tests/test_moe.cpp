// The MoE routing (src/moe.hpp): softmax over the experts, the top k, renormalized weights.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "src/moe.hpp"

namespace pipequant::test {
namespace {

TEST(MoeRouting, TopKOfTheSoftmaxRenormalized) {
  // logits of 2 rows over 4 experts
  const std::vector<float> logits = {1.0f, 3.0f, 2.0f, 0.0f,  //
                                     0.5f, 0.5f, -1.0f, 0.5f};
  const Routing r = route(logits.data(), 2, 4, 2, true);
  ASSERT_EQ(r.k, 2);
  EXPECT_EQ(r.expert, (std::vector<int32_t>{1, 2, 0, 1}));  // ties: the lower index first
  // row 0: softmax of (3, 2) among the chosen, renormalized: e / (e + 1) and 1 / (e + 1)
  const double e = std::exp(1.0);
  EXPECT_NEAR(r.weight[0], e / (e + 1), 1e-6);
  EXPECT_NEAR(r.weight[1], 1 / (e + 1), 1e-6);
  EXPECT_FLOAT_EQ(r.weight[2], 0.5f);
  EXPECT_FLOAT_EQ(r.weight[3], 0.5f);
  // without renormalization the weights are the softmax probabilities themselves
  const Routing raw = route(logits.data(), 2, 4, 2, false);
  const double z = std::exp(1.0) + std::exp(3.0) + std::exp(2.0) + 1.0;
  EXPECT_NEAR(raw.weight[0], std::exp(3.0) / z, 1e-6);
  EXPECT_NEAR(raw.weight[1], std::exp(2.0) / z, 1e-6);
}

TEST(MoeRouting, LargeLogitsDoNotOverflow) {
  const std::vector<float> logits = {1000.0f, 999.0f, -1000.0f};
  const Routing r = route(logits.data(), 1, 3, 1, true);
  EXPECT_EQ(r.expert[0], 0);
  EXPECT_FLOAT_EQ(r.weight[0], 1.0f);
}

}  // namespace
}  // namespace pipequant::test
