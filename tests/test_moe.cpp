// The MoE routing (src/moe.hpp): softmax over the experts, the top k, renormalized weights or not; and the MoE MLP
// on the CPU backend against a plain double computation, with a gated shared expert (Qwen2-MoE).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/backend.hpp"
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

TEST(MoeRouting, WithoutRenormalizationTheWeightsAreTheProbabilities) {
  // Qwen MoE's norm_topk_prob false: the top-k weights keep the softmax over all experts, summing to less than 1
  const std::vector<float> logits = {0.0f, 2.0f, 1.0f, -1.0f, 0.5f};
  const Routing r = route(logits.data(), 1, 5, 3, false);
  EXPECT_EQ(r.expert, (std::vector<int32_t>{1, 2, 4}));
  double z = 0.0;
  for (float l : logits) z += std::exp(static_cast<double>(l));
  EXPECT_NEAR(r.weight[0], std::exp(2.0) / z, 1e-6);
  EXPECT_NEAR(r.weight[1], std::exp(1.0) / z, 1e-6);
  EXPECT_NEAR(r.weight[2], std::exp(0.5) / z, 1e-6);
  EXPECT_LT(r.weight[0] + r.weight[1] + r.weight[2], 0.95f);
  const Routing renormalized = route(logits.data(), 1, 5, 3, true);
  EXPECT_NEAR(renormalized.weight[0] + renormalized.weight[1] + renormalized.weight[2], 1.0, 1e-6);
}

// y = down(silu(gate x) * up x) in double, for weights [inter, hidden], [inter, hidden], [hidden, inter].
std::vector<double> swiglu_ref(const ExpertWeights& w, const float* x) {
  const int64_t inter = w.gate.out, h = w.gate.in;
  const auto g = w.gate.to_f32(), u = w.up.to_f32(), d = w.down.to_f32();
  std::vector<double> a(static_cast<size_t>(inter)), y(static_cast<size_t>(h), 0.0);
  for (int64_t i = 0; i < inter; ++i) {
    double gi = 0.0, ui = 0.0;
    for (int64_t c = 0; c < h; ++c) {
      gi += static_cast<double>(g[static_cast<size_t>(i * h + c)]) * x[c];
      ui += static_cast<double>(u[static_cast<size_t>(i * h + c)]) * x[c];
    }
    a[static_cast<size_t>(i)] = gi / (1.0 + std::exp(-gi)) * ui;
  }
  for (int64_t c = 0; c < h; ++c)
    for (int64_t i = 0; i < inter; ++i)
      y[static_cast<size_t>(c)] +=
          static_cast<double>(d[static_cast<size_t>(c * inter + i)]) * a[static_cast<size_t>(i)];
  return y;
}

// A linear [out, in] of values sin(seed + k): small, non-zero, different per tensor.
Linear sine_linear(int64_t out, int64_t in, double seed) {
  std::vector<float> w(static_cast<size_t>(out * in));
  for (size_t k = 0; k < w.size(); ++k) w[k] = static_cast<float>(std::sin(seed + 0.7 * static_cast<double>(k)));
  return Linear::of(out, in, std::move(w));
}

TEST(MoeRouting, GroupedByExpertInRowOrder) {
  Routing r;
  r.k = 2;
  r.expert = {2, 0, 0, 2, 1, 2};  // rows 0, 1, 2: (2, 0), (0, 2), (1, 2)
  r.weight = {0.6f, 0.4f, 0.7f, 0.3f, 0.5f, 0.5f};
  const ExpertRows g = group_by_expert(r, 4);
  EXPECT_EQ(g.offset, (std::vector<int64_t>{0, 2, 3, 6, 6}));
  EXPECT_EQ(g.row, (std::vector<int32_t>{0, 1, 2, 0, 1, 2}));
  EXPECT_EQ(g.weight, (std::vector<float>{0.4f, 0.7f, 0.5f, 0.6f, 0.3f, 0.5f}));
  EXPECT_EQ(g.count(0), 2);
  EXPECT_EQ(g.count(3), 0);  // an expert no row picked
}

TEST(MoeMlp, RoutedExpertsWithoutRenormalizationPlusTheGatedSharedExpert) {
  io::ModelConfig c;
  c.set_architecture("Qwen2MoeForCausalLM");
  c.hidden_size = 4;
  c.num_experts = 3;
  c.experts_per_token = 2;
  c.expert_intermediate_size = 2;
  c.shared_expert_intermediate_size = 3;
  ASSERT_FALSE(c.norm_topk_prob);
  const int64_t h = 4, rows = 3;
  MoeWeights w;
  w.router = sine_linear(3, h, 0.3).to_f32();
  for (int e = 0; e < 3; ++e)
    w.experts.push_back({sine_linear(2, h, e + 1.0), sine_linear(2, h, e + 2.5), sine_linear(h, 2, e + 4.0)});
  w.shared = SharedExpertWeights{{sine_linear(3, h, 7.0), sine_linear(3, h, 8.0), sine_linear(h, 3, 9.0)},
                                 sine_linear(1, h, 10.0).to_f32()};
  const std::vector<float> x = sine_linear(rows, h, 11.0).to_f32();

  auto backend = kernels::make_cpu_backend(1);
  MoeMlp moe(*backend, c, rows, 1);  // one sample of `rows` rows
  moe.set(w);
  kernels::Buffer<float> xb(*backend, rows * h), yb(*backend, rows * h);
  backend->upload(xb.data(), x.data(), x.size() * sizeof(float));
  moe.forward(xb.data(), yb.data(), rows);
  std::vector<float> got(static_cast<size_t>(rows * h));
  backend->download(got.data(), yb.data(), got.size() * sizeof(float));

  double norm = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data() + r * h;
    std::vector<float> logits(3);
    for (int e = 0; e < 3; ++e)
      for (int64_t k = 0; k < h; ++k)
        logits[static_cast<size_t>(e)] += w.router[static_cast<size_t>(e * h + k)] * xr[k];
    const Routing route_r = route(logits.data(), 1, 3, 2, false);
    std::vector<double> want(static_cast<size_t>(h), 0.0);
    for (int j = 0; j < 2; ++j) {
      const auto y = swiglu_ref(w.experts[static_cast<size_t>(route_r.expert[static_cast<size_t>(j)])], xr);
      for (int64_t k = 0; k < h; ++k)
        want[static_cast<size_t>(k)] += route_r.weight[static_cast<size_t>(j)] * y[static_cast<size_t>(k)];
    }
    double gate = 0.0;
    for (int64_t k = 0; k < h; ++k) gate += static_cast<double>(w.shared->gate[static_cast<size_t>(k)]) * xr[k];
    const auto ys = swiglu_ref(w.shared->mlp, xr);
    for (int64_t k = 0; k < h; ++k) {
      want[static_cast<size_t>(k)] += ys[static_cast<size_t>(k)] / (1.0 + std::exp(-gate));
      // fp32 GEMMs and sums of a few O(1) terms against double: a few ulps of 1
      EXPECT_NEAR(got[static_cast<size_t>(r * h + k)], want[static_cast<size_t>(k)], 1e-5)
          << "row " << r << " col " << k;
      norm += want[static_cast<size_t>(k)] * want[static_cast<size_t>(k)];
    }
  }
  EXPECT_GT(norm, 0.1);  // the outputs are not trivial
}

}  // namespace
}  // namespace pipequant::test
