// The quantizer core: reverse Cholesky, the quantization grid, packing, and GPTQ against a plain
// double-precision transcription of the reference algorithm (IST-DASLab gptq, fasterquant + quant.py).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/backend.hpp"
#include "base/error.hpp"
#include "base/numeric.hpp"
#include "src/quant.hpp"

namespace pipequant {
namespace {

using kernels::QuantGrid;
using Matrix = std::vector<double>;  // row-major

std::unique_ptr<kernels::Backend> cpu() { return kernels::make_cpu_backend(0); }

// ---------------------------------------------------------------------------------------------------------
// Test data

std::vector<float> random_normal(int64_t count, uint64_t seed, float sigma = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, sigma);
  std::vector<float> v(static_cast<size_t>(count));
  for (auto& x : v) x = normal(rng);
  return v;
}

// Correlated calibration inputs X [tokens, k]: a rank-16 signal plus noise, with per-channel scales spread
// over about two orders of magnitude (outlier channels make act-order matter). H = 2/n X^T X, summed in double.
std::vector<float> correlated_hessian(int64_t tokens, int64_t k, uint64_t seed, int64_t zero_channel = -1) {
  const int64_t rank = 16;
  const auto z = random_normal(tokens * rank, seed);
  const auto b = random_normal(rank * k, seed + 1);
  const auto noise = random_normal(tokens * k, seed + 2, 0.5f);
  const auto s = random_normal(k, seed + 3, 0.8f);
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
      h[static_cast<size_t>(i * k + j)] = v;
      h[static_cast<size_t>(j * k + i)] = v;
    }
  return h;
}

// A cheaper SPD matrix for larger sizes: H = A A^T / r + 0.1 I, A [k, r].
std::vector<float> low_rank_spd(int64_t k, int64_t r, uint64_t seed) {
  const auto a = random_normal(k * r, seed);
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

// ---------------------------------------------------------------------------------------------------------
// The reference, transcribed in double precision with plain loops.

struct RefParams {
  double scale;
  double zero;
};

// quant.py find_params (weight=True, no mse), with the scale rounded to fp16 like the stored output.
RefParams ref_find_params(const double* x, int64_t n, int bits, bool sym) {
  const double maxq = (1 << bits) - 1;
  double xmin = 0.0, xmax = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    xmin = std::min(xmin, x[i]);
    xmax = std::max(xmax, x[i]);
  }
  if (sym) {
    xmax = std::max(std::fabs(xmin), xmax);
    if (xmin < 0) xmin = -xmax;
  }
  if (xmin == 0 && xmax == 0) {
    xmin = -1;
    xmax = 1;
  }
  double scale = round_to_fp16(static_cast<float>((xmax - xmin) / maxq));
  if (scale == 0) scale = std::ldexp(1.0, -14);
  double zero = sym ? static_cast<double>(((1 << bits)) / 2) : std::nearbyint(-xmin / scale);
  zero = std::clamp(zero, 0.0, maxq);
  return {scale, zero};
}

double ref_code(double x, RefParams p, int bits) {
  return std::clamp(std::nearbyint(x / p.scale) + p.zero, 0.0, static_cast<double>((1 << bits) - 1));
}

// Lower Cholesky factor of a [n, n] in place; false if not positive definite.
bool ref_cholesky_lower(Matrix& a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    double d = a[static_cast<size_t>(j * n + j)];
    for (int64_t k = 0; k < j; ++k) d -= a[static_cast<size_t>(j * n + k)] * a[static_cast<size_t>(j * n + k)];
    if (!(d > 0)) return false;
    d = std::sqrt(d);
    a[static_cast<size_t>(j * n + j)] = d;
    for (int64_t i = j + 1; i < n; ++i) {
      double v = a[static_cast<size_t>(i * n + j)];
      for (int64_t k = 0; k < j; ++k) v -= a[static_cast<size_t>(i * n + k)] * a[static_cast<size_t>(j * n + k)];
      a[static_cast<size_t>(i * n + j)] = v / d;
    }
    for (int64_t i = 0; i < j; ++i) a[static_cast<size_t>(i * n + j)] = 0.0;
  }
  return true;
}

// torch.cholesky_inverse: (L L^T)^-1 from the lower factor L.
Matrix ref_cholesky_inverse(const Matrix& l, int64_t n) {
  Matrix li(static_cast<size_t>(n * n), 0.0);  // L^-1, lower
  for (int64_t c = 0; c < n; ++c)
    for (int64_t i = c; i < n; ++i) {
      double v = i == c ? 1.0 : 0.0;
      for (int64_t k = c; k < i; ++k) v -= l[static_cast<size_t>(i * n + k)] * li[static_cast<size_t>(k * n + c)];
      li[static_cast<size_t>(i * n + c)] = v / l[static_cast<size_t>(i * n + i)];
    }
  Matrix inv(static_cast<size_t>(n * n), 0.0);  // L^-T L^-1
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double v = 0.0;
      for (int64_t k = std::max(i, j); k < n; ++k)
        v += li[static_cast<size_t>(k * n + i)] * li[static_cast<size_t>(k * n + j)];
      inv[static_cast<size_t>(i * n + j)] = v;
    }
  return inv;
}

struct RefResult {
  std::vector<int> q;      // codes [rows, cols], natural order
  std::vector<double> wq;  // dequantized [rows, cols]
};

// fasterquant(blocksize=128, percdamp, groupsize, actorder, static_groups) line by line.
RefResult ref_gptq(const std::vector<float>& w_in, const std::vector<float>& h_in, int64_t rows, int64_t cols,
                   const QuantConfig& cfg) {
  const int64_t gs = cfg.group_size;
  const int bits = cfg.bits;
  Matrix w(w_in.begin(), w_in.end());
  Matrix h(h_in.begin(), h_in.end());
  auto W = [&](int64_t r, int64_t c) -> double& { return w[static_cast<size_t>(r * cols + c)]; };

  std::vector<RefParams> row_params(static_cast<size_t>(rows));  // quantizer.find_params(W) before dead columns
  for (int64_t r = 0; r < rows; ++r)
    row_params[static_cast<size_t>(r)] = ref_find_params(&W(r, 0), cols, bits, cfg.sym);

  for (int64_t i = 0; i < cols; ++i)
    if (h[static_cast<size_t>(i * cols + i)] == 0) {
      h[static_cast<size_t>(i * cols + i)] = 1;
      for (int64_t r = 0; r < rows; ++r) W(r, i) = 0;
    }

  std::vector<std::vector<RefParams>> static_params;  // [group][row]
  if (cfg.static_groups)
    for (int64_t g0 = 0; g0 < cols; g0 += gs) {
      std::vector<RefParams> p(static_cast<size_t>(rows));
      for (int64_t r = 0; r < rows; ++r)
        p[static_cast<size_t>(r)] = ref_find_params(&W(r, g0), std::min(gs, cols - g0), bits, cfg.sym);
      static_params.push_back(p);
    }

  std::vector<int64_t> perm(static_cast<size_t>(cols));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  if (cfg.act_order) {
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) {
      return h[static_cast<size_t>(a * cols + a)] > h[static_cast<size_t>(b * cols + b)];
    });
    Matrix wp(w.size()), hp(h.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) wp[static_cast<size_t>(r * cols + j)] = W(r, perm[static_cast<size_t>(j)]);
    for (int64_t a = 0; a < cols; ++a)
      for (int64_t b = 0; b < cols; ++b)
        hp[static_cast<size_t>(a * cols + b)] =
            h[static_cast<size_t>(perm[static_cast<size_t>(a)] * cols + perm[static_cast<size_t>(b)])];
    w = wp;
    h = hp;
  }

  double mean = 0;
  for (int64_t i = 0; i < cols; ++i) mean += h[static_cast<size_t>(i * cols + i)];
  mean /= static_cast<double>(cols);
  for (int64_t i = 0; i < cols; ++i) h[static_cast<size_t>(i * cols + i)] += cfg.damp * mean;
  if (!ref_cholesky_lower(h, cols)) throw std::runtime_error("reference: Cholesky failed");
  Matrix u = ref_cholesky_inverse(h, cols);
  if (!ref_cholesky_lower(u, cols)) throw std::runtime_error("reference: Cholesky of the inverse failed");
  // upper factor: U = L^T
  Matrix hinv(u.size(), 0.0);
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = i; j < cols; ++j) hinv[static_cast<size_t>(i * cols + j)] = u[static_cast<size_t>(j * cols + i)];
  auto U = [&](int64_t i, int64_t j) { return hinv[static_cast<size_t>(i * cols + j)]; };

  std::vector<int> qp(static_cast<size_t>(rows * cols));
  Matrix wqp(static_cast<size_t>(rows * cols));
  std::vector<RefParams> cur = row_params;
  const int64_t blocksize = 128;
  for (int64_t i1 = 0; i1 < cols; i1 += blocksize) {
    const int64_t i2 = std::min(i1 + blocksize, cols);
    const int64_t count = i2 - i1;
    Matrix w1(static_cast<size_t>(rows * count)), err1(static_cast<size_t>(rows * count));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < count; ++i) w1[static_cast<size_t>(r * count + i)] = W(r, i1 + i);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t col = i1 + i;
      if (gs != -1) {
        if (!cfg.static_groups) {
          if (col % gs == 0)
            for (int64_t r = 0; r < rows; ++r)
              cur[static_cast<size_t>(r)] = ref_find_params(&W(r, col), std::min(gs, cols - col), bits, cfg.sym);
        } else {
          const int64_t idx = cfg.act_order ? perm[static_cast<size_t>(col)] : col;
          cur = static_params[static_cast<size_t>(idx / gs)];
        }
      }
      const double d = U(col, col);
      for (int64_t r = 0; r < rows; ++r) {
        const double x = w1[static_cast<size_t>(r * count + i)];
        const RefParams p = cur[static_cast<size_t>(r)];
        const double code = ref_code(x, p, bits);
        const double q = p.scale * (code - p.zero);
        qp[static_cast<size_t>(r * cols + col)] = static_cast<int>(code);
        wqp[static_cast<size_t>(r * cols + col)] = q;
        const double e = (x - q) / d;
        for (int64_t k = i; k < count; ++k) w1[static_cast<size_t>(r * count + k)] -= e * U(col, i1 + k);
        err1[static_cast<size_t>(r * count + i)] = e;
      }
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = i2; c < cols; ++c) {
        double v = 0;
        for (int64_t i = 0; i < count; ++i) v += err1[static_cast<size_t>(r * count + i)] * U(i1 + i, c);
        W(r, c) -= v;
      }
  }
  RefResult out;
  out.q.resize(qp.size());
  out.wq.resize(wqp.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) {
      out.q[static_cast<size_t>(r * cols + perm[static_cast<size_t>(j)])] = qp[static_cast<size_t>(r * cols + j)];
      out.wq[static_cast<size_t>(r * cols + perm[static_cast<size_t>(j)])] = wqp[static_cast<size_t>(r * cols + j)];
    }
  return out;
}

// tr(D H D^T) / tr(W H W^T) in double.
double ref_relative_error(const std::vector<float>& w, const std::vector<double>& wq, const std::vector<float>& h,
                          int64_t rows, int64_t cols) {
  double num = 0, den = 0;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> d(static_cast<size_t>(cols));
    for (int64_t c = 0; c < cols; ++c)
      d[static_cast<size_t>(c)] = w[static_cast<size_t>(r * cols + c)] - wq[static_cast<size_t>(r * cols + c)];
    for (int64_t i = 0; i < cols; ++i)
      for (int64_t j = 0; j < cols; ++j) {
        const double hij = h[static_cast<size_t>(i * cols + j)];
        num += d[static_cast<size_t>(i)] * hij * d[static_cast<size_t>(j)];
        den += static_cast<double>(w[static_cast<size_t>(r * cols + i)]) * hij * w[static_cast<size_t>(r * cols + j)];
      }
  }
  return num / den;
}

bool all_finite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

// ---------------------------------------------------------------------------------------------------------
// (a) reverse Cholesky

TEST(ReverseCholesky, UpperFactorReproducesH) {
  auto backend = cpu();
  const int64_t n = 200;
  const auto h = low_rank_spd(n, 64, 11);
  std::vector<float> r = h;
  ASSERT_TRUE(backend->reverse_cholesky(r.data(), n));
  double max_h = 0, max_diff = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      if (j < i) {
        EXPECT_EQ(r[static_cast<size_t>(i * n + j)], 0.0f) << "lower triangle at " << i << "," << j;
      }
      double v = 0;  // (R R^T)[i, j] = sum_k R[i, k] R[j, k], k >= max(i, j)
      for (int64_t k = std::max(i, j); k < n; ++k)
        v += static_cast<double>(r[static_cast<size_t>(i * n + k)]) * r[static_cast<size_t>(j * n + k)];
      max_h = std::max(max_h, std::fabs(static_cast<double>(h[static_cast<size_t>(i * n + j)])));
      max_diff = std::max(max_diff, std::fabs(v - h[static_cast<size_t>(i * n + j)]));
    }
  for (int64_t i = 0; i < n; ++i) EXPECT_GT(r[static_cast<size_t>(i * n + i)], 0.0f);
  // fp32 factorization of a matrix with condition ~ 1e2: backward error a few ulps times n
  EXPECT_LT(max_diff / max_h, 1e-4);
  EXPECT_GT(max_h, 0.5);  // non-trivial input
}

TEST(ReverseCholesky, FailsOnIndefiniteAndNonFinite) {
  auto backend = cpu();
  const int64_t n = 50;
  auto h = low_rank_spd(n, 16, 12);
  h[static_cast<size_t>(17 * n + 17)] = -1.0f;  // a negative diagonal entry: not positive definite
  EXPECT_FALSE(backend->reverse_cholesky(h.data(), n));
  auto g = low_rank_spd(n, 16, 13);
  g[static_cast<size_t>(3 * n + 40)] = g[static_cast<size_t>(40 * n + 3)] = std::nanf("");
  EXPECT_FALSE(backend->reverse_cholesky(g.data(), n));
}

// ---------------------------------------------------------------------------------------------------------
// (b) quantization grid, exact on power-of-two friendly inputs

TEST(QuantGrid, IntegersAt4BitAsymAreTheirOwnCodes) {
  auto backend = cpu();
  std::vector<float> w(16);
  std::iota(w.begin(), w.end(), 0.0f);
  float scale = 0, zero = -1;
  backend->quant_params(w.data(), 1, 16, 16, QuantGrid{4, false}, &scale, &zero, 1);
  EXPECT_EQ(scale, 1.0f);
  EXPECT_EQ(zero, 0.0f);
  std::vector<int32_t> param_of(16, 0);
  std::vector<uint8_t> q(16);
  std::vector<float> deq(16);
  backend->quantize(w.data(), 1, 16, &scale, &zero, 1, param_of.data(), QuantGrid{4, false}, q.data(), deq.data());
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(q[static_cast<size_t>(i)], i);
    EXPECT_EQ(deq[static_cast<size_t>(i)], static_cast<float>(i));
  }
}

TEST(QuantGrid, SymmetricRangeRoundsHalfToEvenAndClamps) {
  auto backend = cpu();
  // range [-7.5, 7.5] -> scale 15 / 15 = 1, zero (15 + 1) / 2 = 8
  const std::vector<float> w = {-7.5f, 7.5f, 0.0f, 2.5f, -2.5f, 3.5f, 1.0f, -3.0f};
  float scale = 0, zero = 0;
  backend->quant_params(w.data(), 1, 8, 8, QuantGrid{4, true}, &scale, &zero, 1);
  EXPECT_EQ(scale, 1.0f);
  EXPECT_EQ(zero, 8.0f);
  std::vector<int32_t> param_of(8, 0);
  std::vector<uint8_t> q(8);
  backend->quantize(w.data(), 1, 8, &scale, &zero, 1, param_of.data(), QuantGrid{4, true}, q.data(), nullptr);
  // -7.5 -> -8 (even) + 8 = 0; 7.5 -> 8 + 8 = 16 -> clamped to 15; 2.5 -> 2; -2.5 -> -2; 3.5 -> 4
  const std::vector<uint8_t> expect = {0, 15, 8, 10, 6, 12, 9, 5};
  EXPECT_EQ(q, expect);
}

TEST(QuantGrid, ScaleIsFp16AndDegenerateRowsAreHandled) {
  auto backend = cpu();
  // rows [3, 4]: [0 .. 1] at 2-bit (scale 1/3 -> fp16), all zero, a range too small for fp16, all negative
  std::vector<float> w = {0.0f, 1.0f,  0.5f, 0.25f,  //
                          0.0f, 0.0f,  0.0f, 0.0f,   //
                          0.0f, 1e-9f, 0.0f, 0.0f};
  std::vector<float> scale(3), zero(3);
  backend->quant_params(w.data(), 3, 4, 4, QuantGrid{2, false}, scale.data(), zero.data(), 1);
  EXPECT_EQ(scale[0], round_to_fp16(1.0f / 3.0f));
  EXPECT_NE(scale[0], 1.0f / 3.0f);  // the rounding is real
  EXPECT_EQ(zero[0], 0.0f);
  EXPECT_EQ(scale[1], round_to_fp16(2.0f / 3.0f));  // [-1, 1]
  EXPECT_EQ(zero[1], std::nearbyint(1.0f / scale[1]));
  EXPECT_EQ(scale[2], std::ldexp(1.0f, -14));  // rounds to 0 in fp16 -> smallest normal
  EXPECT_EQ(zero[2], 0.0f);
  for (float s : scale) EXPECT_EQ(s, round_to_fp16(s));

  // strided output, as the group tables use: row r's entry at r * stride
  const std::vector<float> neg = {-4.0f, -2.0f, -1.0f, -3.0f};
  std::vector<float> table(6, -1.0f);
  backend->quant_params(neg.data(), 1, 4, 4, QuantGrid{2, false}, &table[1], &table[4], 3);
  EXPECT_EQ(table[1], round_to_fp16(4.0f / 3.0f));
  EXPECT_EQ(table[4], 3.0f);  // round(4 / 1.333) = 3, clamped to maxq 3
  EXPECT_EQ(table[0], -1.0f);
  EXPECT_EQ(table[2], -1.0f);
}

// ---------------------------------------------------------------------------------------------------------
// (c) packing

TEST(Pack, ThreeBitStreamStraddlesWords) {
  // one output column, codes along K: 12 codes of 3 bits = 36 bits = 2 words; code 10 (value 3) straddles
  const std::vector<uint8_t> codes = {1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 6};
  const auto words = pack_columns(codes.data(), 12, 1, 3);
  ASSERT_EQ(words.size(), 2u);
  EXPECT_EQ(words[0], static_cast<int32_t>(0xd11f58d1u));  // bits 30, 31 hold the low bits of code 10
  EXPECT_EQ(words[1], 0xc);                                // bit 0: its high bit (0); bits 1-3: code 11 = 6
  EXPECT_EQ(unpack_columns(words.data(), 12, 1, 3), codes);
  // the same stream along N
  const auto row_words = pack_rows(codes.data(), 1, 12, 3);
  EXPECT_EQ(row_words, words);
  // 4-bit: eight codes per word, lowest first
  const std::vector<uint8_t> nibbles = {1, 2, 3, 4, 5, 6, 7, 15};
  EXPECT_EQ(pack_rows(nibbles.data(), 1, 8, 4)[0], static_cast<int32_t>(0xf7654321u));
}

TEST(Pack, RoundTripAllWidthsRaggedShapes) {
  const int64_t k = 172, n = 33;  // neither a multiple of 32
  std::mt19937 rng(5);
  for (int bits : {2, 3, 4, 8}) {
    SCOPED_TRACE("bits " + std::to_string(bits));
    std::uniform_int_distribution<int> code(0, (1 << bits) - 1);
    std::vector<uint8_t> codes(static_cast<size_t>(k * n));
    for (auto& c : codes) c = static_cast<uint8_t>(code(rng));
    const auto cw = pack_columns(codes.data(), k, n, bits);
    EXPECT_EQ(static_cast<int64_t>(cw.size()), (k * bits + 31) / 32 * n);
    EXPECT_EQ(unpack_columns(cw.data(), k, n, bits), codes);
    const auto rw = pack_rows(codes.data(), k, n, bits);
    EXPECT_EQ(static_cast<int64_t>(rw.size()), k * ((n * bits + 31) / 32));
    EXPECT_EQ(unpack_rows(rw.data(), k, n, bits), codes);
    // code k of column c sits at bits [k*bits, (k+1)*bits) of column c's stream
    const int64_t probe_k = 101, probe_c = 17;
    const int64_t bit = probe_k * bits;
    const uint64_t lo = static_cast<uint32_t>(cw[static_cast<size_t>((bit / 32) * n + probe_c)]);
    const uint64_t hi = bit / 32 + 1 < (k * bits + 31) / 32
                            ? static_cast<uint32_t>(cw[static_cast<size_t>((bit / 32 + 1) * n + probe_c)])
                            : 0;
    EXPECT_EQ(((lo | (hi << 32)) >> (bit % 32)) & ((1u << bits) - 1),
              codes[static_cast<size_t>(probe_k * n + probe_c)]);

    // the whole packed linear, with a ragged last group
    QuantizedLinear ql;
    ql.rows = n;
    ql.cols = k;
    ql.bits = bits;
    ql.groups = (k + 31) / 32;
    ql.q.resize(static_cast<size_t>(n * k));
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < k; ++c) ql.q[static_cast<size_t>(r * k + c)] = codes[static_cast<size_t>(c * n + r)];
    ql.g_idx.resize(static_cast<size_t>(k));
    for (int64_t c = 0; c < k; ++c) ql.g_idx[static_cast<size_t>(c)] = static_cast<int32_t>((k - 1 - c) / 32);
    for (int64_t i = 0; i < ql.groups * n; ++i) {
      ql.scales.push_back(round_to_fp16(0.001f * static_cast<float>(i + 1)));
      ql.zeros.push_back(static_cast<float>(code(rng)));
    }
    ql.relative_error = 0.0125;
    ql.fallback = "damp";
    ql.damp_used = 0.1;
    QuantConfig cfg;
    cfg.bits = bits;
    cfg.group_size = 32;
    const io::PackedLinear p = pack(ql, "mlp.up_proj", cfg);
    EXPECT_EQ(static_cast<int64_t>(p.qweight.size()), (k * bits + 31) / 32 * n);
    EXPECT_EQ(static_cast<int64_t>(p.qzeros.size()), ql.groups * ((n * bits + 31) / 32));
    EXPECT_EQ(p.in_features, k);
    EXPECT_EQ(p.out_features, n);
    EXPECT_EQ(p.fallback, "damp");
    EXPECT_EQ(p.scales[0], float_to_fp16(ql.scales[0]));
    const QuantizedLinear back = unpack(p);
    EXPECT_EQ(back.q, ql.q);
    EXPECT_EQ(back.scales, ql.scales);
    EXPECT_EQ(back.zeros, ql.zeros);
    EXPECT_EQ(back.g_idx, ql.g_idx);
    EXPECT_EQ(back.dequantize(), ql.dequantize());
  }
}

TEST(Pack, UnpackRejectsWrongSizes) {
  io::PackedLinear p;
  p.module = "self_attn.q_proj";
  p.in_features = 64;
  p.out_features = 8;
  p.groups = 1;
  p.bits = 4;
  p.qweight.assign(7 * 8, 0);  // needs 8 x 8
  p.qzeros.assign(1, 0);
  p.scales.assign(8, 0x3c00);
  p.g_idx.assign(64, 0);
  EXPECT_THROW(unpack(p), UserError);
  p.qweight.assign(8 * 8, 0);
  EXPECT_NO_THROW(unpack(p));
  p.g_idx[5] = 1;  // only group 0 exists
  EXPECT_THROW(unpack(p), UserError);
}

TEST(QuantConfig, Validate) {
  QuantConfig c;
  EXPECT_NO_THROW(validate(c));
  c.bits = 5;
  EXPECT_THROW(validate(c), UserError);
  c = QuantConfig{};
  c.group_size = 0;
  EXPECT_THROW(validate(c), UserError);
  c = QuantConfig{};
  c.damp = 0.0;
  EXPECT_THROW(validate(c), UserError);
  c.damp = 1.5;
  EXPECT_THROW(validate(c), UserError);
  c = QuantConfig{};
  c.group_size = -1;
  c.act_order = true;
  c.static_groups = true;
  EXPECT_THROW(validate(c), UserError);
  c.act_order = false;  // static groups without act-order: allowed
  EXPECT_NO_THROW(validate(c));
}

// ---------------------------------------------------------------------------------------------------------
// (d, e) GPTQ against the reference, and against round-to-nearest

enum class Order { kNatural, kStatic, kAct, kActStatic };

struct GptqCase {
  int64_t group_size;
  Order order;
  bool sym;
  int bits;
};

std::string case_name(const testing::TestParamInfo<GptqCase>& info) {
  const GptqCase& c = info.param;
  const char* order[] = {"natural", "static", "act", "actstatic"};
  return (c.group_size < 0 ? std::string("perrow") : "g" + std::to_string(c.group_size)) + "_" +
         order[static_cast<int>(c.order)] + "_" + (c.sym ? "sym" : "asym") + "_" + std::to_string(c.bits) + "bit";
}

std::vector<GptqCase> gptq_cases() {
  std::vector<GptqCase> cases;
  // 200: groups that cross the 128-column blocks
  for (int64_t gs : {int64_t{-1}, int64_t{32}, int64_t{128}, int64_t{200}})
    for (Order order : {Order::kNatural, Order::kStatic, Order::kAct, Order::kActStatic})
      for (bool sym : {false, true})
        for (int bits : {3, 4}) {
          if (gs < 0 && (order == Order::kStatic || order == Order::kActStatic)) continue;
          cases.push_back({gs, order, sym, bits});
        }
  return cases;
}

class GptqReference : public testing::TestWithParam<GptqCase> {
 protected:
  // enough rows that the relative error averages over the few codes that fp32 rounding (which differs between
  // OpenBLAS's AVX2 and AVX-512 kernels) flips against the fp64 reference: with 48 rows one 3-bit case moved 1.1%
  static constexpr int64_t kRows = 192;
  static constexpr int64_t kCols = 300;  // 300 % 32 != 0 and 300 % 128 != 0: ragged last group and block
  static void SetUpTestSuite() {
    w_ = new std::vector<float>(random_normal(kRows * kCols, 21, 0.05f));
    h_ = new std::vector<float>(correlated_hessian(2000, kCols, 22));
  }
  static void TearDownTestSuite() {
    delete w_;
    delete h_;
  }
  static std::vector<float>* w_;
  static std::vector<float>* h_;
};
std::vector<float>* GptqReference::w_ = nullptr;
std::vector<float>* GptqReference::h_ = nullptr;

TEST_P(GptqReference, MatchesReferenceAndBeatsRtn) {
  const GptqCase c = GetParam();
  QuantConfig cfg;
  cfg.bits = c.bits;
  cfg.group_size = c.group_size;
  cfg.sym = c.sym;
  cfg.act_order = c.order == Order::kAct || c.order == Order::kActStatic;
  cfg.static_groups = c.order == Order::kStatic || c.order == Order::kActStatic;
  auto backend = cpu();
  const QuantizedLinear ql = gptq_quantize(*backend, w_->data(), kRows, kCols, h_->data(), cfg, "test");
  EXPECT_EQ(ql.fallback, "none");
  EXPECT_TRUE(ql.log.empty());
  ASSERT_EQ(static_cast<int64_t>(ql.q.size()), kRows * kCols);
  const int64_t groups = c.group_size > 0 ? (kCols + c.group_size - 1) / c.group_size : 1;
  EXPECT_EQ(ql.groups, groups);

  const RefResult ref = ref_gptq(*w_, *h_, kRows, kCols, cfg);
  int64_t same = 0;
  for (size_t i = 0; i < ql.q.size(); ++i) same += ql.q[i] == ref.q[i];
  const double agree = static_cast<double>(same) / static_cast<double>(ql.q.size());
  // fp32 against fp64: a code differs only where a value lies within rounding noise of a grid midpoint, and
  // such a flip perturbs the later columns of its row a little
  EXPECT_GE(agree, 0.99) << "codes equal to the reference";
  const double ref_err = ref_relative_error(*w_, ref.wq, *h_, kRows, kCols);
  EXPECT_NEAR(ql.relative_error, ref_err, 0.01 * ref_err);
  EXPECT_GT(ql.relative_error, 0.0);

  // g_idx: the natural group with static groups (and without groups: 0), the processing position's group
  // with dynamic groups; every group is used
  std::vector<int64_t> used(static_cast<size_t>(groups), 0);
  for (int64_t k = 0; k < kCols; ++k) {
    const int32_t g = ql.g_idx[static_cast<size_t>(k)];
    ASSERT_TRUE(g >= 0 && g < groups);
    ++used[static_cast<size_t>(g)];
    if (c.group_size < 0) {
      EXPECT_EQ(g, 0);
    } else if (cfg.static_groups || !cfg.act_order) {
      EXPECT_EQ(g, k / c.group_size);
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t expect = c.group_size > 0 ? std::min(c.group_size, kCols - g * c.group_size) : kCols;
    EXPECT_EQ(used[static_cast<size_t>(g)], expect) << "columns of group " << g;
  }

  const QuantizedLinear rtn = rtn_quantize(*backend, w_->data(), kRows, kCols, h_->data(), cfg);
  EXPECT_LT(ql.relative_error, rtn.relative_error) << "GPTQ must beat round-to-nearest";
  // the stored parameters are consistent with the codes
  const auto wq = ql.dequantize();
  EXPECT_TRUE(all_finite(wq));
  for (float s : ql.scales) EXPECT_EQ(s, round_to_fp16(s));
}

INSTANTIATE_TEST_SUITE_P(Settings, GptqReference, testing::ValuesIn(gptq_cases()), case_name);

// ---------------------------------------------------------------------------------------------------------
// (f) dead columns

TEST(Gptq, DeadColumnQuantizesToTheZeroPoint) {
  const int64_t rows = 24, cols = 96, dead = 37;
  const auto w = random_normal(rows * cols, 31, 0.05f);
  const auto h = correlated_hessian(600, cols, 32, dead);
  ASSERT_EQ(h[static_cast<size_t>(dead * cols + dead)], 0.0f);
  auto backend = cpu();
  for (bool act : {false, true}) {
    SCOPED_TRACE(act ? "act-order" : "natural order");
    QuantConfig cfg;
    cfg.group_size = 32;
    cfg.act_order = act;
    const QuantizedLinear ql = gptq_quantize(*backend, w.data(), rows, cols, h.data(), cfg, "dead");
    EXPECT_EQ(ql.fallback, "none");
    EXPECT_TRUE(std::isfinite(ql.relative_error));
    EXPECT_GT(ql.relative_error, 0.0);
    const int64_t g = ql.g_idx[static_cast<size_t>(dead)];
    for (int64_t r = 0; r < rows; ++r) {
      const float zero = ql.zeros[static_cast<size_t>(g * rows + r)];
      EXPECT_EQ(static_cast<float>(ql.q[static_cast<size_t>(r * cols + dead)]), zero) << "row " << r;
    }
    EXPECT_TRUE(all_finite(ql.dequantize()));
    EXPECT_TRUE(all_finite(ql.scales));
  }
}

// ---------------------------------------------------------------------------------------------------------
// (g) the Hessian fallback chain

bool log_mentions(const QuantizedLinear& ql, const std::string& text) {
  return std::any_of(ql.log.begin(), ql.log.end(),
                     [&](const std::string& l) { return l.find(text) != std::string::npos; });
}

TEST(Gptq, NonFiniteHessianFallsBackToRtn) {
  const int64_t rows = 16, cols = 64;
  const auto w = random_normal(rows * cols, 41, 0.05f);
  auto h = low_rank_spd(cols, 16, 42);
  h[static_cast<size_t>(5 * cols + 9)] = std::nanf("");
  auto backend = cpu();
  const QuantizedLinear ql = gptq_quantize(*backend, w.data(), rows, cols, h.data(), QuantConfig{}, "layers.0.q");
  EXPECT_EQ(ql.fallback, "rtn");
  ASSERT_FALSE(ql.log.empty());
  EXPECT_TRUE(log_mentions(ql, "layers.0.q"));
  EXPECT_TRUE(log_mentions(ql, "round-to-nearest"));
  const QuantizedLinear rtn = rtn_quantize(*backend, w.data(), rows, cols, nullptr, QuantConfig{});
  EXPECT_EQ(ql.q, rtn.q);
}

TEST(Gptq, NegativeDefiniteHessianExhaustsRetriesThenRtn) {
  const int64_t rows = 16, cols = 64;
  const auto w = random_normal(rows * cols, 43, 0.05f);
  auto h = low_rank_spd(cols, 16, 44);
  for (auto& v : h) v = -v;  // damping adds a negative multiple of the identity: never helps
  auto backend = cpu();
  QuantConfig cfg;
  cfg.damp_retries = 3;
  const QuantizedLinear ql = gptq_quantize(*backend, w.data(), rows, cols, h.data(), cfg, "layers.1.down");
  EXPECT_EQ(ql.fallback, "rtn");
  EXPECT_EQ(ql.log.size(), 4u);  // three retries, then the fallback
  EXPECT_TRUE(log_mentions(ql, "layers.1.down: Cholesky failed with damp 0.01, retrying with 0.1"));
  EXPECT_TRUE(log_mentions(ql, "falling back to round-to-nearest"));
  EXPECT_EQ(ql.q, rtn_quantize(*backend, w.data(), rows, cols, nullptr, cfg).q);
}

TEST(Gptq, SlightlyIndefiniteHessianNeedsMoreDamping) {
  // H = Q diag(lambda) Q^T with eigenvalues in [0.5, 1.5] except one at -0.004: damping 1e-3 * mean(diag)
  // (about 1e-3) leaves it negative, 1e-2 makes it positive, so exactly one retry
  const int64_t rows = 16, cols = 64;
  const auto a = random_normal(cols * cols, 51);
  Matrix qm(a.begin(), a.end());
  for (int64_t i = 0; i < cols; ++i) {  // Gram-Schmidt on the rows
    for (int64_t p = 0; p < i; ++p) {
      double d = 0;
      for (int64_t c = 0; c < cols; ++c)
        d += qm[static_cast<size_t>(i * cols + c)] * qm[static_cast<size_t>(p * cols + c)];
      for (int64_t c = 0; c < cols; ++c)
        qm[static_cast<size_t>(i * cols + c)] -= d * qm[static_cast<size_t>(p * cols + c)];
    }
    double norm = 0;
    for (int64_t c = 0; c < cols; ++c)
      norm += qm[static_cast<size_t>(i * cols + c)] * qm[static_cast<size_t>(i * cols + c)];
    for (int64_t c = 0; c < cols; ++c) qm[static_cast<size_t>(i * cols + c)] /= std::sqrt(norm);
  }
  std::vector<double> lambda(static_cast<size_t>(cols));
  for (int64_t i = 0; i < cols; ++i)
    lambda[static_cast<size_t>(i)] = 0.5 + static_cast<double>(i) / static_cast<double>(cols);
  lambda[0] = -0.004;
  std::vector<float> h(static_cast<size_t>(cols * cols));
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      double v = 0;
      for (int64_t e = 0; e < cols; ++e)
        v += qm[static_cast<size_t>(e * cols + i)] * lambda[static_cast<size_t>(e)] *
             qm[static_cast<size_t>(e * cols + j)];
      h[static_cast<size_t>(i * cols + j)] = static_cast<float>(v);
    }
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = 0; j < i; ++j) h[static_cast<size_t>(i * cols + j)] = h[static_cast<size_t>(j * cols + i)];

  const auto w = random_normal(rows * cols, 52, 0.05f);
  auto backend = cpu();
  QuantConfig cfg;
  cfg.damp = 1e-3;
  const QuantizedLinear ql = gptq_quantize(*backend, w.data(), rows, cols, h.data(), cfg, "layers.2.o");
  EXPECT_EQ(ql.fallback, "damp");
  EXPECT_NEAR(ql.damp_used, 1e-2, 1e-12);
  ASSERT_EQ(ql.log.size(), 1u);
  EXPECT_EQ(ql.log[0], "layers.2.o: Cholesky failed with damp 0.001, retrying with 0.01");
  EXPECT_TRUE(std::isfinite(ql.relative_error));
}

TEST(Gptq, NonFiniteWeightsAreRejected) {
  const int64_t rows = 4, cols = 32;
  auto w = random_normal(rows * cols, 45, 0.05f);
  w[static_cast<size_t>(2 * cols + 7)] = std::numeric_limits<float>::infinity();
  const auto h = low_rank_spd(cols, 8, 46);
  auto backend = cpu();
  EXPECT_THROW(gptq_quantize(*backend, w.data(), rows, cols, h.data(), QuantConfig{}), UserError);
  EXPECT_THROW(rtn_quantize(*backend, w.data(), rows, cols, h.data(), QuantConfig{}), UserError);
}

// ---------------------------------------------------------------------------------------------------------
// (h) determinism

TEST(Gptq, BitIdenticalAcrossRunsAndThreadCounts) {
  // large enough that OpenBLAS and the column loop really split the work between threads
  const int64_t rows = 200, cols = 1100;
  const auto w = random_normal(rows * cols, 61, 0.05f);
  const auto h = low_rank_spd(cols, 48, 62);
  QuantConfig cfg;
  cfg.act_order = true;
  cfg.group_size = 128;
  auto run = [&](int threads) {
    auto backend = kernels::make_cpu_backend(threads);  // sets the OpenMP and OpenBLAS thread counts
    return gptq_quantize(*backend, w.data(), rows, cols, h.data(), cfg, "det");
  };
  const QuantizedLinear a = run(2);
  const QuantizedLinear b = run(2);
  const QuantizedLinear c = run(1);
  const QuantizedLinear d = run(1);
  EXPECT_EQ(b.relative_error, a.relative_error);
  EXPECT_EQ(d.relative_error, c.relative_error);
  // OpenBLAS partitions sgemm/spotrf by thread count, so the last bits of the factor, the lazy updates and
  // the error's GEMM can differ between 1 and 2 threads; the column loop itself is thread-count invariant
  EXPECT_NEAR(c.relative_error, a.relative_error, 1e-6 * a.relative_error);
  for (const QuantizedLinear* x : {&b, &c, &d}) {
    EXPECT_EQ(x->q, a.q);
    EXPECT_EQ(x->scales, a.scales);
    EXPECT_EQ(x->zeros, a.zeros);
    EXPECT_EQ(x->g_idx, a.g_idx);
  }
  EXPECT_GT(a.relative_error, 0.0);
  // non-trivial: many distinct codes
  std::vector<int> histogram(16, 0);
  for (uint8_t q : a.q) ++histogram[q];
  EXPECT_GT(std::count_if(histogram.begin(), histogram.end(), [](int n) { return n > 0; }), 10);
}

TEST(Gptq, SolveThatDoesNotFitTheBudgetRunsOnTheHostFallback) {
  // a backend whose budget holds the weights but not R [cols, cols] with the working matrices: the solve
  // moves to its host fallback, says so, and gives the same result as on an unbounded backend
  const int64_t rows = 32, cols = 256;
  const auto w = random_normal(rows * cols, 61, 0.05f);
  const auto h = correlated_hessian(1000, cols, 62);
  QuantConfig cfg;
  cfg.group_size = 64;
  auto unbounded = cpu();
  const QuantizedLinear want = gptq_quantize(*unbounded, w.data(), rows, cols, h.data(), cfg, "layers.2.up");
  ASSERT_EQ(want.fallback, "none");

  const size_t budget = sizeof(float) * static_cast<size_t>(cols * cols);  // less than H and R together
  auto bounded = kernels::make_cpu_backend(0, budget);
  EXPECT_EQ(bounded->budget_bytes(), budget);
  // without a fallback the solve tries the bounded backend and its allocator refuses
  EXPECT_THROW(gptq_quantize(*bounded, w.data(), rows, cols, h.data(), cfg, "layers.2.up"), UserError);
  EXPECT_EQ(bounded->live_bytes(), 0u);
  bounded->set_host_fallback(kernels::make_cpu_backend(0));
  bounded->reset_peak();
  const QuantizedLinear got = gptq_quantize(*bounded, w.data(), rows, cols, h.data(), cfg, "layers.2.up");
  EXPECT_EQ(got.fallback, "cpu");
  ASSERT_FALSE(got.log.empty());
  EXPECT_TRUE(log_mentions(got, "layers.2.up: the solve needs"));
  EXPECT_TRUE(log_mentions(got, "solved on the cpu"));
  EXPECT_EQ(bounded->peak_bytes(), 0u) << "nothing of the solve was allocated on the bounded backend";
  EXPECT_GT(bounded->host_fallback()->peak_bytes(), budget);
  EXPECT_EQ(got.q, want.q);
  EXPECT_EQ(got.scales, want.scales);
  EXPECT_EQ(got.zeros, want.zeros);
  EXPECT_EQ(got.relative_error, want.relative_error);
  // RTN (the baseline beside every GPTQ layer) moves the same way, silently
  const QuantizedLinear rtn = rtn_quantize(*bounded, w.data(), rows, cols, h.data(), cfg);
  EXPECT_EQ(rtn.fallback, "none");
  EXPECT_EQ(rtn.q, rtn_quantize(*unbounded, w.data(), rows, cols, h.data(), cfg).q);

  // a budget with room for the solve keeps it where it is
  auto roomy = kernels::make_cpu_backend(0, size_t{64} << 20);
  roomy->set_host_fallback(kernels::make_cpu_backend(0));
  const QuantizedLinear stay = gptq_quantize(*roomy, w.data(), rows, cols, h.data(), cfg, "layers.2.up");
  EXPECT_EQ(stay.fallback, "none");
  EXPECT_TRUE(stay.log.empty());
  EXPECT_GT(roomy->peak_bytes(), sizeof(float) * static_cast<size_t>(cols * cols));
  EXPECT_EQ(roomy->host_fallback()->peak_bytes(), 0u);
  EXPECT_EQ(stay.q, want.q);
}

}  // namespace
}  // namespace pipequant
