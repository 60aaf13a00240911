#pragma once
// Helpers shared by the unit tests: deterministic test data (Gaussian values, small integers, SPD matrices,
// Llama's RoPE frequencies), comparisons that report the first mismatches, and copies between host vectors and
// backend memory.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/backend.hpp"

namespace pipequant::test {

inline std::vector<float> normal(size_t n, float sigma, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Uniform integers in [lo, hi] as floats: products and sums of a few of them are exact in fp32 (and in bf16/fp16
// for |v| <= 256), so results are exact whatever order a backend sums in.
inline std::vector<float> small_integers(size_t n, int lo, int hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(dist(rng));
  return v;
}

template <typename T>
bool bits_equal(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// Bit-identical vectors; reports the first few mismatches.
template <typename T>
void expect_identical(const std::vector<T>& got, const std::vector<T>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t mismatches = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (!bits_equal(got[i], want[i])) {
      if (mismatches < 5) ADD_FAILURE() << what << "[" << i << "]: got " << +got[i] << ", want " << +want[i];
      ++mismatches;
    }
  EXPECT_EQ(mismatches, 0u) << what << ": " << mismatches << " of " << got.size() << " differ";
}

// Outputs must carry information: all finite, and mostly not zero.
inline void expect_nontrivial(const std::vector<float>& v, const std::string& what) {
  size_t nonzero = 0;
  for (float x : v) {
    ASSERT_TRUE(std::isfinite(x)) << what;
    if (x != 0.0f) ++nonzero;
  }
  EXPECT_GT(nonzero, v.size() / 2) << what << ": mostly zero, the comparison would prove little";
}

template <typename T>
kernels::Buffer<T> to_backend(kernels::Backend& backend, const std::vector<T>& host) {
  kernels::Buffer<T> buffer(backend, static_cast<int64_t>(host.size()));
  backend.upload(buffer.data(), host.data(), sizeof(T) * host.size());
  return buffer;
}

template <typename T>
std::vector<T> to_host(kernels::Backend& backend, const kernels::Buffer<T>& buffer) {
  std::vector<T> host(static_cast<size_t>(buffer.size()));
  backend.download(host.data(), buffer.data(), sizeof(T) * host.size());
  return host;
}

// (1/rows) X^T X + I for X [2n, n] unit normal: symmetric positive definite, eigenvalues in about [1, 7].
inline std::vector<float> spd_matrix(int64_t n, uint32_t seed) {
  const int64_t rows = 2 * n;
  const auto x = normal(static_cast<size_t>(rows * n), 1.0f, seed);
  std::vector<float> h(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0.0;
      for (int64_t r = 0; r < rows; ++r)
        s += double{x[static_cast<size_t>(r * n + i)]} * x[static_cast<size_t>(r * n + j)];
      const float v = static_cast<float>(s / static_cast<double>(rows) + (i == j ? 1.0 : 0.0));
      h[static_cast<size_t>(i * n + j)] = h[static_cast<size_t>(j * n + i)] = v;
    }
  return h;
}

// A cheaper SPD matrix for larger sizes: A A^T / r + 0.1 I, A [k, r] unit normal.
inline std::vector<float> low_rank_spd(int64_t k, int64_t r, uint32_t seed) {
  const auto a = normal(static_cast<size_t>(k * r), 1.0f, seed);
  std::vector<float> h(static_cast<size_t>(k * k));
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      double v = i == j ? 0.1 : 0.0;
      for (int64_t t = 0; t < r; ++t)
        v += static_cast<double>(a[static_cast<size_t>(i * r + t)]) * a[static_cast<size_t>(j * r + t)] /
             static_cast<double>(r);
      h[static_cast<size_t>(i * k + j)] = h[static_cast<size_t>(j * k + i)] = static_cast<float>(v);
    }
  return h;
}

// The Hessian 2/n X^T X of correlated calibration inputs X [tokens, k] (summed in double): a rank-16 signal plus
// noise, with per-channel scales spread over about two orders of magnitude (outlier channels make act-order
// matter). Channel zero_channel (if any) is never active: its row and column of H are 0.
inline std::vector<float> correlated_hessian(int64_t tokens, int64_t k, uint32_t seed, int64_t zero_channel = -1) {
  const int64_t rank = 16;
  const auto z = normal(static_cast<size_t>(tokens * rank), 1.0f, seed);
  const auto b = normal(static_cast<size_t>(rank * k), 1.0f, seed + 1);
  const auto noise = normal(static_cast<size_t>(tokens * k), 0.5f, seed + 2);
  const auto s = normal(static_cast<size_t>(k), 0.8f, seed + 3);
  std::vector<double> x(static_cast<size_t>(tokens * k));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t c = 0; c < k; ++c) {
      double v = noise[static_cast<size_t>(t * k + c)];
      for (int64_t r = 0; r < rank; ++r) v += z[static_cast<size_t>(t * rank + r)] * b[static_cast<size_t>(r * k + c)];
      x[static_cast<size_t>(t * k + c)] = c == zero_channel ? 0.0 : v * std::exp(s[static_cast<size_t>(c)]);
    }
  std::vector<double> hd(static_cast<size_t>(k * k), 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    const double* xt = x.data() + t * k;
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j <= i; ++j) hd[static_cast<size_t>(i * k + j)] += xt[i] * xt[j];
  }
  std::vector<float> h(static_cast<size_t>(k * k));
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      const float v = static_cast<float>(2.0 * hd[static_cast<size_t>(i * k + j)] / static_cast<double>(tokens));
      h[static_cast<size_t>(i * k + j)] = h[static_cast<size_t>(j * k + i)] = v;
    }
  return h;
}

// Llama's RoPE inv_freq for base 10000: 1 / base^(2i / head_dim), i < head_dim / 2.
inline std::vector<float> llama_inv_freq(int64_t head_dim) {
  std::vector<float> f(static_cast<size_t>(head_dim / 2));
  for (int64_t i = 0; i < head_dim / 2; ++i)
    f[static_cast<size_t>(i)] =
        static_cast<float>(1.0 / std::pow(10000.0, static_cast<double>(2 * i) / static_cast<double>(head_dim)));
  return f;
}

}  // namespace pipequant::test
