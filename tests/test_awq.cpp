// AWQ's parts (src/awq.hpp): the activation magnitudes, the scales, the scale search against a direct computation
// of the output error, the clip search, and folding a scale into a quantized linear's rows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "base/numeric.hpp"
#include "kernels/backend.hpp"
#include "src/awq.hpp"
#include "src/quant.hpp"
#include "tests/test_util.hpp"

namespace pipequant {
namespace {

using test::normal;

std::unique_ptr<kernels::Backend> cpu() { return kernels::make_cpu_backend(0); }

// Inputs x [tokens, cols] whose channel k has magnitude about gain[k], and H = (2/n) x^T x.
struct Inputs {
  std::vector<float> x, h;
  int64_t tokens = 0, cols = 0;
};
Inputs inputs_with_gains(int64_t tokens, const std::vector<float>& gain, uint32_t seed) {
  Inputs in;
  in.tokens = tokens;
  in.cols = static_cast<int64_t>(gain.size());
  in.x = normal(static_cast<size_t>(tokens * in.cols), 1.0f, seed);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t k = 0; k < in.cols; ++k) in.x[static_cast<size_t>(t * in.cols + k)] *= gain[static_cast<size_t>(k)];
  in.h.assign(static_cast<size_t>(in.cols * in.cols), 0.0f);
  for (int64_t i = 0; i < in.cols; ++i)
    for (int64_t j = 0; j < in.cols; ++j) {
      double s = 0.0;
      for (int64_t t = 0; t < tokens; ++t)
        s += static_cast<double>(in.x[static_cast<size_t>(t * in.cols + i)]) * in.x[static_cast<size_t>(t * in.cols + j)];
      in.h[static_cast<size_t>(i * in.cols + j)] = static_cast<float>(2.0 * s / static_cast<double>(tokens));
    }
  return in;
}

// ||(W - Wq) x^T||^2 scaled like H, straight from the inputs.
double direct_error2(const std::vector<float>& w, const std::vector<float>& wq, int64_t rows, const Inputs& in) {
  double e = 0.0;
  for (int64_t t = 0; t < in.tokens; ++t)
    for (int64_t r = 0; r < rows; ++r) {
      double y = 0.0;
      for (int64_t k = 0; k < in.cols; ++k)
        y += (static_cast<double>(w[static_cast<size_t>(r * in.cols + k)]) - wq[static_cast<size_t>(r * in.cols + k)]) *
             in.x[static_cast<size_t>(t * in.cols + k)];
      e += y * y;
    }
  return 2.0 * e / static_cast<double>(in.tokens);
}

std::vector<float> outlier_gains(int64_t cols) {
  std::vector<float> gain(static_cast<size_t>(cols), 1.0f);
  for (int64_t k = 0; k < cols; k += 16) gain[static_cast<size_t>(k)] = 20.0f;  // the salient channels AWQ protects
  return gain;
}

TEST(AwqScales, NormalizedAndOneAtAlphaZero) {
  const std::vector<float> m = {0.5f, 2.0f, 8.0f, 0.0f};
  const auto s0 = awq_scales(m, 0.0);
  for (float v : s0) EXPECT_EQ(v, 1.0f);
  const auto s = awq_scales(m, 0.5);
  const float lo = *std::min_element(s.begin(), s.end()), hi = *std::max_element(s.begin(), s.end());
  EXPECT_NEAR(std::sqrt(lo * hi), 1.0f, 1e-6f);
  EXPECT_NEAR(s[2] / s[1], 2.0f, 1e-5f);                  // sqrt(8 / 2)
  EXPECT_NEAR(s[3] / s[0], kAwqMinScale / std::sqrt(0.5f), 1e-6f);  // a dead channel takes the floor
}

TEST(ChannelMagnitudes, RootMeanSquareFromTheHessian) {
  const Inputs in = inputs_with_gains(100, {1.0f, 3.0f, 0.5f, 0.0f, 7.0f}, 11);
  const auto m = channel_magnitudes(in.h, in.cols);
  for (int64_t k = 0; k < in.cols; ++k) {
    double want = 0.0;
    for (int64_t t = 0; t < in.tokens; ++t) want += std::pow(in.x[static_cast<size_t>(t * in.cols + k)], 2.0);
    want = std::sqrt(want / static_cast<double>(in.tokens));
    EXPECT_NEAR(m[static_cast<size_t>(k)], want, 1e-5 * want + 1e-12) << "channel " << k;
  }
  EXPECT_EQ(m[3], 0.0f);
}

TEST(AwqSearch, ErrorsMatchTheInputsAndBeatRoundToNearest) {
  auto backend = cpu();
  const int64_t rows = 24, cols = 64, tokens = 200;
  const Inputs in = inputs_with_gains(tokens, outlier_gains(cols), 3);
  const auto w = normal(static_cast<size_t>(rows * cols), 0.1f, 4);
  const std::vector<float> magnitudes = channel_magnitudes(in.h, cols);
  QuantConfig cfg;
  cfg.method = Method::kAwq;
  cfg.bits = 3;
  cfg.group_size = 32;
  const FillRows fill = [&](int64_t r0, int64_t r1, float* dst) {
    std::copy(w.begin() + r0 * cols, w.begin() + r1 * cols, dst);
  };
  const AwqScaleChoice c = search_awq_scales(*backend, {{fill, rows}}, cols, magnitudes, in.h.data(), cfg);

  // alpha 0 is round to nearest, measured directly on the inputs
  const auto rtn = rtn_quantize(*backend, w.data(), rows, cols, nullptr, cfg).dequantize();
  EXPECT_NEAR(c.rtn_error2, direct_error2(w, rtn, rows, in), 1e-4 * c.rtn_error2);
  // the outlier channels make scaling pay: an exponent above 0 wins, with a clearly smaller error
  EXPECT_GT(c.alpha, 0.0);
  EXPECT_LT(c.error2, 0.9 * c.rtn_error2);
  // the chosen scales' error, measured directly: Q(W diag(s)) diag(s)^-1
  const AwqQuantized q = awq_quantize(*backend, w.data(), rows, cols, c.scales, in.h.data(), in.h.data(), false, cfg);
  std::vector<float> wq = q.q.dequantize();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k) wq[static_cast<size_t>(r * cols + k)] /= c.scales[static_cast<size_t>(k)];
  const double direct = direct_error2(w, wq, rows, in);
  EXPECT_NEAR(c.error2, direct, 1e-4 * direct);
  EXPECT_NEAR(q.error2, direct, 1e-4 * direct);
}

TEST(AwqSearch, MeasuresEvenlySpacedRowsBeyondItsBudget) {
  auto backend = cpu();
  constexpr int64_t rows = 30, cols = 64;
  const Inputs in = inputs_with_gains(120, outlier_gains(cols), 12);
  const std::vector<float> magnitudes = channel_magnitudes(in.h, cols);
  const auto w = normal(static_cast<size_t>(rows * cols), 0.1f, 13);
  std::vector<float> every_third;  // rows 0, 3, ..., 27: what a budget of 10 rows measures
  for (int64_t r = 0; r < rows; r += 3) every_third.insert(every_third.end(), w.begin() + r * cols, w.begin() + (r + 1) * cols);
  QuantConfig cfg;
  cfg.bits = 3;
  cfg.group_size = 16;
  const auto fill_from = [](const std::vector<float>& m) {
    return FillRows([&m](int64_t r0, int64_t r1, float* dst) {
      std::copy(m.begin() + r0 * cols, m.begin() + r1 * cols, dst);
    });
  };
  const auto sampled = search_awq_scales(*backend, {{fill_from(w), rows}}, cols, magnitudes, in.h.data(), cfg, 10 * cols);
  const auto direct = search_awq_scales(*backend, {{fill_from(every_third), 10}}, cols, magnitudes, in.h.data(), cfg);
  EXPECT_EQ(sampled.alpha, direct.alpha);
  EXPECT_EQ(sampled.error2, 3.0 * direct.error2);  // the 10 measured rows stand for all 30
  EXPECT_EQ(sampled.rtn_error2, 3.0 * direct.rtn_error2);
  const auto all = search_awq_scales(*backend, {{fill_from(w), rows}}, cols, magnitudes, in.h.data(), cfg);
  EXPECT_NEAR(sampled.rtn_error2, all.rtn_error2, 0.25 * all.rtn_error2);  // an estimate of the whole
}

TEST(AwqQuantize, UnitScalesWithoutClipAreRoundToNearest) {
  auto backend = cpu();
  const int64_t rows = 9, cols = 40;  // a ragged last group of 8
  const Inputs in = inputs_with_gains(50, std::vector<float>(static_cast<size_t>(cols), 1.0f), 5);
  const auto w = normal(static_cast<size_t>(rows * cols), 1.0f, 6);
  QuantConfig cfg;
  cfg.bits = 4;
  cfg.group_size = 16;
  const auto rtn = rtn_quantize(*backend, w.data(), rows, cols, nullptr, cfg);
  const auto a = awq_quantize(*backend, w.data(), rows, cols, std::vector<float>(static_cast<size_t>(cols), 1.0f),
                              in.h.data(), in.h.data(), false, cfg);
  test::expect_identical(a.q.q, rtn.q, "codes");
  test::expect_identical(a.q.scales, rtn.scales, "scales");
  test::expect_identical(a.q.zeros, rtn.zeros, "zeros");
  EXPECT_EQ(a.clip_sum, static_cast<double>(a.clip_count));  // every ratio 1
}

TEST(AwqQuantize, ClippingLowersTheErrorOfHeavyTailedWeights) {
  auto backend = cpu();
  const int64_t rows = 32, cols = 64;
  const Inputs in = inputs_with_gains(300, std::vector<float>(static_cast<size_t>(cols), 1.0f), 7);
  auto w = normal(static_cast<size_t>(rows * cols), 0.05f, 8);
  for (size_t i = 0; i < w.size(); i += 37) w[i] *= 12.0f;  // a few large weights stretch the min/max grid
  QuantConfig cfg;
  cfg.bits = 3;
  cfg.group_size = 32;
  const std::vector<float> ones(static_cast<size_t>(cols), 1.0f);
  const auto plain = awq_quantize(*backend, w.data(), rows, cols, ones, in.h.data(), in.h.data(), false, cfg);
  const auto clipped = awq_quantize(*backend, w.data(), rows, cols, ones, in.h.data(), in.h.data(), true, cfg);
  EXPECT_LT(clipped.clip_sum / clipped.clip_count, 1.0);  // some groups were clipped
  EXPECT_GE(clipped.clip_sum / clipped.clip_count, 0.55);
  EXPECT_LT(clipped.error2, plain.error2);
  EXPECT_NEAR(clipped.error2, direct_error2(w, clipped.q.dequantize(), rows, in), 1e-4 * clipped.error2);
}

TEST(AwqFold, DividingRowsScalesTheDequantizedRows) {
  auto backend = cpu();
  const int64_t rows = 6, cols = 32;
  const auto w = normal(static_cast<size_t>(rows * cols), 1.0f, 9);
  QuantConfig cfg;
  cfg.group_size = 8;
  QuantizedLinear q = rtn_quantize(*backend, w.data(), rows, cols, nullptr, cfg);
  const auto before = q.dequantize();
  const std::vector<float> s = {1.0f, 2.0f, 0.5f, 3.0f, 0.25f, 1.5f};
  divide_rows(q, s);
  const auto after = q.dequantize();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k) {
      const float want = before[static_cast<size_t>(r * cols + k)] / s[static_cast<size_t>(r)];
      EXPECT_NEAR(after[static_cast<size_t>(r * cols + k)], want, 1e-3f * std::fabs(want) + 1e-7f);  // fp16 scales
    }
  for (float v : q.scales) EXPECT_EQ(v, round_to_fp16(v));
}

}  // namespace
}  // namespace pipequant
