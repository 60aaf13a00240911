// The CUDA backend against the CPU backend (the specification) on the same inputs: exact where the inputs make
// it exact (small integers, power-of-two scales, the same float operations on both sides), a named tolerance
// with its reason otherwise; and run-to-run determinism on the device. Every test skips (not passes) where no
// CUDA device is visible; CTest label `gpu`.
#include <gtest/gtest.h>

#include "kernels/backend.hpp"

#ifdef PIPEQUANT_HAVE_CUDA

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "base/numeric.hpp"

namespace pipequant::kernels {
namespace {

#define SKIP_WITHOUT_CUDA() \
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device"

// --- helpers -----------------------------------------------------------------------------------------------------

template <typename T>
Buffer<T> to_backend(Backend& backend, const std::vector<T>& host) {
  Buffer<T> buffer(backend, static_cast<int64_t>(host.size()));
  backend.upload(buffer.data(), host.data(), sizeof(T) * host.size());
  return buffer;
}

template <typename T>
std::vector<T> to_host(Backend& backend, const Buffer<T>& buffer) {
  std::vector<T> host(static_cast<size_t>(buffer.size()));
  backend.download(host.data(), buffer.data(), sizeof(T) * host.size());
  return host;
}

std::unique_ptr<Backend> cpu() { return make_cpu_backend(2); }
std::unique_ptr<Backend> gpu() { return make_cuda_backend(0, 0); }

std::vector<float> small_integers(size_t n, int lo, int hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(dist(rng));
  return v;
}

std::vector<float> normal(size_t n, float sigma, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

template <typename T>
bool bits_equal(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// Bit-identical vectors; prints the first mismatches.
template <typename T>
void expect_identical(const std::vector<T>& got, const std::vector<T>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t mismatches = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!bits_equal(got[i], want[i])) {
      if (mismatches < 5) ADD_FAILURE() << what << "[" << i << "]: got " << +got[i] << ", want " << +want[i];
      ++mismatches;
    }
  }
  EXPECT_EQ(mismatches, 0u) << what << ": " << mismatches << " of " << got.size() << " differ";
}

// max |got - want| <= atol + rtol * |want| elementwise.
void expect_close(const std::vector<float>& got, const std::vector<float>& want, double atol, double rtol,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double worst = 0.0;
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(got[i]) - want[i]);
    worst = std::max(worst, diff);
    if (!(diff <= atol + rtol * std::fabs(static_cast<double>(want[i])))) {
      if (bad < 5) ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", want " << want[i];
      ++bad;
    }
  }
  std::printf("%s: max |cuda - cpu| = %.3e over %zu values\n", what.c_str(), worst, got.size());
  EXPECT_EQ(bad, 0u) << what;
}

void expect_nontrivial(const std::vector<float>& v, const std::string& what) {
  const bool any = std::any_of(v.begin(), v.end(), [](float x) { return x != 0.0f; });
  EXPECT_TRUE(any) << what << " is all zero: the comparison would prove nothing";
}

// Runs `op` on both backends; it uploads its inputs, runs and returns its outputs downloaded.
template <typename Op>
auto on_both(Op op) {
  auto c = cpu();
  auto g = gpu();
  return std::make_pair(op(*c), op(*g));
}

// --- memory ------------------------------------------------------------------------------------------------------

TEST(CudaBackend, TransfersRoundTripThroughStaging) {
  SKIP_WITHOUT_CUDA();
  auto g = gpu();
  EXPECT_EQ(g->name(), "cuda");
  // 40 MiB: several staging chunks and a ragged last one; and a few bytes
  for (const size_t count : {size_t{10} * 1024 * 1024 + 3, size_t{7}}) {
    std::vector<float> host = normal(count, 1.0f, 11);
    Buffer<float> d(*g, static_cast<int64_t>(count));
    g->upload(d.data(), host.data(), count * sizeof(float));
    std::vector<float> back(count, 0.0f);
    g->download(back.data(), d.data(), count * sizeof(float));
    expect_identical(back, host, "round trip of " + std::to_string(count) + " floats");
  }
}

TEST(CudaBackend, BudgetIsEnforcedAndPeakTracked) {
  SKIP_WITHOUT_CUDA();
  const size_t budget = size_t{256} << 20;
  auto g = make_cuda_backend(0, budget);
  g->reset_peak();
  const size_t base = g->peak_bytes();  // library workspace and status word
  {
    Buffer<uint8_t> a(*g, int64_t{64} << 20);
    Buffer<uint8_t> b(*g, int64_t{32} << 20);
    EXPECT_EQ(g->peak_bytes(), base + (size_t{96} << 20));
  }
  EXPECT_EQ(g->peak_bytes(), base + (size_t{96} << 20));  // a high-water mark
  g->reset_peak();
  EXPECT_EQ(g->peak_bytes(), base);
  try {
    Buffer<uint8_t> too_big(*g, static_cast<int64_t>(budget));
    FAIL() << "allocating the whole budget on top of live memory must fail";
  } catch (const UserError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(std::to_string(budget)), std::string::npos) << message;  // names the budget
    EXPECT_NE(message.find("budget"), std::string::npos) << message;
  }
  EXPECT_EQ(g->peak_bytes(), base);  // the refused request left nothing behind
}

TEST(CudaBackend, BadDeviceIsAUserError) {
  SKIP_WITHOUT_CUDA();
  EXPECT_THROW(make_cuda_backend(cuda_device_count(), 0), UserError);
}

// --- dense linear algebra ----------------------------------------------------------------------------------------

TEST(CudaBackend, GemmOfSmallIntegersIsExact) {
  SKIP_WITHOUT_CUDA();
  const int64_t m = 37, n = 53, k = 71;
  for (const Trans ta : {Trans::kNo, Trans::kYes})
    for (const Trans tb : {Trans::kNo, Trans::kYes}) {
      // padded leading dimensions; integer products and sums stay far below 2^24, alpha/beta are powers of two
      const int64_t lda = (ta == Trans::kNo ? k : m) + 3;
      const int64_t ldb = (tb == Trans::kNo ? n : k) + 5;
      const int64_t ldc = n + 2;
      const auto a = small_integers(static_cast<size_t>((ta == Trans::kNo ? m : k) * lda), -4, 4, 1);
      const auto b = small_integers(static_cast<size_t>((tb == Trans::kNo ? k : n) * ldb), -4, 4, 2);
      const auto c0 = small_integers(static_cast<size_t>(m * ldc), -8, 8, 3);
      const auto [want, got] = on_both([&](Backend& be) {
        auto da = to_backend(be, a);
        auto db = to_backend(be, b);
        auto dc = to_backend(be, c0);
        be.gemm(ta, tb, m, n, k, 2.0f, da.data(), lda, db.data(), ldb, 0.5f, dc.data(), ldc);
        return to_host(be, dc);
      });
      expect_nontrivial(want, "gemm");
      expect_identical(
          got, want,
          std::string("gemm ta=") + (ta == Trans::kYes ? "T" : "N") + " tb=" + (tb == Trans::kYes ? "T" : "N"));
    }
}

// 16-bit tensor-core GEMM with fp32 accumulation: small integers are exact in bf16/fp16 and every partial sum is an
// exact float, so cuBLAS's order cannot matter; then Gaussian data against the CPU within fp32 summation noise.
TEST(CudaBackend, LinearHalfMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  for (const HalfFormat format : {HalfFormat::kBF16, HalfFormat::kF16}) {
    const bool bf16 = format == HalfFormat::kBF16;
    for (const bool integers : {true, false}) {
      const int64_t m = integers ? 96 : 333, n = integers ? 80 : 256, k = integers ? 128 : 1000;
      const auto x = integers ? small_integers(static_cast<size_t>(m * k), -8, 8, 61)
                              : normal(static_cast<size_t>(m * k), 1.0f, 61);
      const auto wf = integers ? small_integers(static_cast<size_t>(n * k), -8, 8, 62)
                               : normal(static_cast<size_t>(n * k), 0.05f, 62);
      std::vector<uint16_t> w(wf.size());
      for (size_t i = 0; i < w.size(); ++i) w[i] = bf16 ? float_to_bf16(wf[i]) : float_to_fp16(wf[i]);
      const auto [c, g] = on_both([&](Backend& be) {
        auto xb = to_backend(be, x);
        auto wb = to_backend(be, w);
        Buffer<float> yb(be, m * n);
        be.linear_half(xb.data(), wb.data(), format, yb.data(), m, n, k);
        return to_host(be, yb);
      });
      const std::string what = std::string("linear_half ") + (bf16 ? "bf16" : "fp16") + (integers ? " integers" : "");
      expect_nontrivial(c, what);
      if (integers)
        expect_identical(g, c, what);
      else  // sums of 1000 products of size ~0.05 in fp32, in two different orders
        expect_close(g, c, 1e-5, 1e-4, what);
    }
  }
}

TEST(CudaBackend, HessianOfSmallIntegersIsExact) {
  SKIP_WITHOUT_CUDA();
  const int64_t rows = 300, k = 70;
  const auto x1 = small_integers(static_cast<size_t>(rows * k), -3, 3, 4);
  const auto x2 = small_integers(static_cast<size_t>(rows * k), -3, 3, 5);
  std::vector<float> h0(static_cast<size_t>(k * k));  // a symmetric start: h += accumulates
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) h0[static_cast<size_t>(i * k + j)] = static_cast<float>((i * j) % 7);
  const auto [want, got] = on_both([&](Backend& be) {
    auto dx1 = to_backend(be, x1);
    auto dx2 = to_backend(be, x2);
    auto dh = to_backend(be, h0);
    be.hessian_accumulate(dx1.data(), rows, k, dh.data());
    be.hessian_accumulate(dx2.data(), rows, k, dh.data());
    return to_host(be, dh);
  });
  expect_nontrivial(want, "hessian");
  expect_identical(got, want, "hessian_accumulate");
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < i; ++j)
      ASSERT_EQ(got[static_cast<size_t>(i * k + j)], got[static_cast<size_t>(j * k + i)])
          << "symmetric at " << i << "," << j;
}

// SPD test matrix: (1/rows) X^T X + I, X [rows, n] normal.
std::vector<float> spd_matrix(int64_t n, uint32_t seed) {
  const int64_t rows = 2 * n;
  const auto x = normal(static_cast<size_t>(rows * n), 1.0f, seed);
  std::vector<float> h(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (int64_t r = 0; r < rows; ++r)
        s += double{x[static_cast<size_t>(r * n + i)]} * x[static_cast<size_t>(r * n + j)];
      h[static_cast<size_t>(i * n + j)] = static_cast<float>(s / static_cast<double>(rows) + (i == j ? 1.0 : 0.0));
    }
  return h;
}

TEST(CudaBackend, ReverseCholeskyMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const int64_t n = 150;
  const auto h = spd_matrix(n, 6);
  bool ok_cpu = false, ok_gpu = false;
  auto c = cpu();
  auto g = gpu();
  auto run = [&](Backend& be, bool& ok) {
    auto dh = to_backend(be, h);
    ok = be.reverse_cholesky(dh.data(), n);
    return to_host(be, dh);
  };
  const auto want = run(*c, ok_cpu);
  const auto got = run(*g, ok_gpu);
  ASSERT_TRUE(ok_cpu);
  ASSERT_TRUE(ok_gpu);
  // Tolerance: LAPACK and cuSOLVER block the factorization differently; H is well conditioned (eigenvalues in
  // about [1, 7]), so the factors agree to a few hundred fp32 ulps of their largest entry.
  expect_close(got, want, 2e-5, 2e-5, "reverse_cholesky R");
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j)
      ASSERT_EQ(got[static_cast<size_t>(i * n + j)], 0.0f) << "lower at " << i << "," << j;
  // R R^T reproduces H
  double worst = 0.0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (int64_t t = std::max(i, j); t < n; ++t)
        s += double{got[static_cast<size_t>(i * n + t)]} * got[static_cast<size_t>(j * n + t)];
      worst = std::max(worst, std::fabs(s - h[static_cast<size_t>(i * n + j)]));
    }
  EXPECT_LE(worst, 1e-4) << "R R^T vs H";
}

TEST(CudaBackend, ReverseCholeskyReportsFailure) {
  SKIP_WITHOUT_CUDA();
  const int64_t n = 40;
  auto h = spd_matrix(n, 7);
  h[static_cast<size_t>(20 * n + 20)] = -5.0f;  // not positive definite
  const auto [ok_cpu, ok_gpu] = on_both([&](Backend& be) {
    auto dh = to_backend(be, h);
    return be.reverse_cholesky(dh.data(), n);
  });
  EXPECT_FALSE(ok_cpu);
  EXPECT_FALSE(ok_gpu);
  // and the backend stays usable afterwards
  auto g = gpu();
  const auto good = spd_matrix(n, 8);
  auto dh = to_backend(*g, good);
  EXPECT_TRUE(g->reverse_cholesky(dh.data(), n));
}

// --- the block forward -------------------------------------------------------------------------------------------

TEST(CudaBackend, RmsNormMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const int64_t rows = 33, dim = 1000;
  const auto x = normal(static_cast<size_t>(rows * dim), 2.0f, 9);
  const auto w = normal(static_cast<size_t>(dim), 1.0f, 10);
  for (const bool in_place : {false, true}) {
    const auto [want, got] = on_both([&](Backend& be) {
      auto dx = to_backend(be, x);
      auto dw = to_backend(be, w);
      Buffer<float> dy(be, rows * dim);
      float* y = in_place ? dx.data() : dy.data();
      be.rms_norm(dx.data(), dw.data(), y, rows, dim, 1e-5f);
      return in_place ? to_host(be, dx) : to_host(be, dy);
    });
    expect_nontrivial(want, "rms_norm");
    // Tolerance: the same operations, but the double sum of squares is added in a different order, which can
    // move the float 1/rms by one ulp in rare rows.
    expect_close(got, want, 1e-7, 3e-7, in_place ? "rms_norm in place" : "rms_norm");
  }
}

std::vector<float> inv_freq(int64_t head_dim) {
  std::vector<float> f(static_cast<size_t>(head_dim / 2));
  for (int64_t i = 0; i < head_dim / 2; ++i)
    f[static_cast<size_t>(i)] =
        static_cast<float>(std::pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim)));
  return f;
}

TEST(CudaBackend, RopeMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const int64_t samples = 2, seq = 300, heads = 3, head_dim = 16;
  const auto x = normal(static_cast<size_t>(samples * seq * heads * head_dim), 1.0f, 12);
  const auto f = inv_freq(head_dim);
  const auto [want, got] = on_both([&](Backend& be) {
    auto dx = to_backend(be, x);
    auto df = to_backend(be, f);
    be.rope(dx.data(), samples, seq, heads, head_dim, df.data());
    return to_host(be, dx);
  });
  expect_nontrivial(want, "rope");
  // Tolerance: cos/sin are the same double values rounded to float on both sides; x1 c - x2 s may be fused on
  // one side and not the other: about one ulp of |x|.
  expect_close(got, want, 2e-6, 1e-6, "rope");
}

TEST(CudaBackend, AttentionMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  struct Shape {
    int64_t samples, seq, heads, kv_heads, head_dim;
  };
  // tiles: partial query and key tiles, a single token, GQA, head_dim not a multiple of 32, the 256 maximum
  for (const Shape s : {Shape{2, 100, 4, 2, 64}, Shape{1, 1, 2, 2, 64}, Shape{1, 70, 6, 3, 96},
                        Shape{2, 129, 2, 1, 128}, Shape{1, 40, 2, 2, 256}, Shape{1, 33, 4, 4, 8}}) {
    const int64_t tokens = s.samples * s.seq;
    const auto q = normal(static_cast<size_t>(tokens * s.heads * s.head_dim), 1.0f, 13);
    const auto k = normal(static_cast<size_t>(tokens * s.kv_heads * s.head_dim), 1.0f, 14);
    const auto v = normal(static_cast<size_t>(tokens * s.kv_heads * s.head_dim), 1.0f, 15);
    const auto [want, got] = on_both([&](Backend& be) {
      auto dq = to_backend(be, q);
      auto dk = to_backend(be, k);
      auto dv = to_backend(be, v);
      Buffer<float> out(be, tokens * s.heads * s.head_dim);
      be.attention(dq.data(), dk.data(), dv.data(), out.data(), s.samples, s.seq, s.heads, s.kv_heads, s.head_dim);
      return to_host(be, out);
    });
    expect_nontrivial(want, "attention");
    // Tolerance: online softmax (rescaled per 32-key tile) against the CPU's softmax; fp32 sums in a different
    // order over at most a few hundred O(1) terms.
    expect_close(got, want, 2e-5, 1e-4,
                 "attention seq " + std::to_string(s.seq) + " head_dim " + std::to_string(s.head_dim));
  }
}

TEST(CudaBackend, SwigluMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const int64_t n = 10000;
  const auto gate = normal(static_cast<size_t>(n), 3.0f, 16);
  const auto up = normal(static_cast<size_t>(n), 1.0f, 17);
  for (const bool in_place : {false, true}) {
    const auto [want, got] = on_both([&](Backend& be) {
      auto dg = to_backend(be, gate);
      auto du = to_backend(be, up);
      Buffer<float> out(be, n);
      float* o = in_place ? dg.data() : out.data();
      be.swiglu(dg.data(), du.data(), o, n);
      return in_place ? to_host(be, dg) : to_host(be, out);
    });
    expect_nontrivial(want, "swiglu");
    // Tolerance: the same formula, but CUDA's expf and glibc's expf may differ by up to 2 ulps.
    expect_close(got, want, 1e-7, 1e-6, in_place ? "swiglu in place" : "swiglu");
  }
}

TEST(CudaBackend, AddAndAddBiasAreExact) {
  SKIP_WITHOUT_CUDA();
  const int64_t rows = 17, n = 301;
  const auto y0 = normal(static_cast<size_t>(rows * n), 1.0f, 18);
  const auto x = normal(static_cast<size_t>(rows * n), 1.0f, 19);
  const auto bias = normal(static_cast<size_t>(n), 1.0f, 20);
  const auto [want, got] = on_both([&](Backend& be) {
    auto dy = to_backend(be, y0);
    auto dx = to_backend(be, x);
    auto db = to_backend(be, bias);
    be.add(dy.data(), dx.data(), rows * n);
    be.add_bias(dy.data(), db.data(), rows, n);
    return to_host(be, dy);
  });
  expect_nontrivial(want, "add");
  expect_identical(got, want, "add + add_bias");  // one correctly rounded addition per step on both sides
}

TEST(CudaBackend, NllSumMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const int64_t rows = 50, vocab = 1000;
  const auto logits = normal(static_cast<size_t>(rows * vocab), 4.0f, 21);
  std::vector<int32_t> targets(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) targets[static_cast<size_t>(r)] = static_cast<int32_t>((r * 97) % vocab);
  const auto [want, got] = on_both([&](Backend& be) {
    auto dl = to_backend(be, logits);
    auto dt = to_backend(be, targets);
    return be.nll_sum(dl.data(), dt.data(), rows, vocab);
  });
  EXPECT_GT(want, 1.0);
  // Tolerance: double exponentials (1 ulp apart between CUDA and glibc) summed in a different order.
  EXPECT_NEAR(got, want, 1e-10 * std::fabs(want));
}

// --- quantization ------------------------------------------------------------------------------------------------

TEST(CudaBackend, QuantParamsAreExact) {
  SKIP_WITHOUT_CUDA();
  const int64_t rows = 40, cols = 75, ld = 80, stride = 3;
  auto w = normal(static_cast<size_t>(rows * ld), 1.0f, 22);
  for (int64_t c = 0; c < ld; ++c) {
    w[static_cast<size_t>(1 * ld + c)] = 0.0f;                                           // all-zero row: [-1, 1]
    w[static_cast<size_t>(2 * ld + c)] = std::fabs(w[static_cast<size_t>(2 * ld + c)]);  // no negative value
    w[static_cast<size_t>(3 * ld + c)] = 1e-9f;                                          // a scale below fp16's range
  }
  for (const int bits : {2, 3, 4, 8})
    for (const bool sym : {false, true}) {
      const QuantGrid grid{bits, sym};
      const auto [want, got] = on_both([&](Backend& be) {
        auto dw = to_backend(be, w);
        Buffer<float> scale(be, rows * stride), zero(be, rows * stride);
        const std::vector<float> fill(static_cast<size_t>(rows * stride), -7.0f);
        be.upload(scale.data(), fill.data(), fill.size() * sizeof(float));
        be.upload(zero.data(), fill.data(), fill.size() * sizeof(float));
        be.quant_params(dw.data(), rows, cols, ld, grid, scale.data(), zero.data(), stride);
        return std::make_pair(to_host(be, scale), to_host(be, zero));
      });
      const std::string what = "quant_params bits " + std::to_string(bits) + (sym ? " sym" : " asym");
      expect_nontrivial(want.first, what);
      expect_identical(got.first, want.first, what + " scale");
      expect_identical(got.second, want.second, what + " zero");
    }
}

TEST(CudaBackend, QuantizeIsExact) {
  SKIP_WITHOUT_CUDA();
  const int64_t rows = 30, cols = 64, groups = 4;
  // power-of-two scales and half-integer multiples of them: every division is exact and every rounding a tie,
  // so round-half-to-even and the clamp are both exercised
  std::vector<float> scales(static_cast<size_t>(rows * groups)), zeros(static_cast<size_t>(rows * groups));
  for (int64_t i = 0; i < rows * groups; ++i) {
    scales[static_cast<size_t>(i)] = std::ldexp(1.0f, static_cast<int>(i % 5) - 3);
    zeros[static_cast<size_t>(i)] = static_cast<float>(i % 9);
  }
  std::vector<int32_t> param_of(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) param_of[static_cast<size_t>(c)] = static_cast<int32_t>((c * 7) % groups);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  const auto steps = small_integers(w.size(), -25, 25, 23);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const size_t i = static_cast<size_t>(r * cols + c);
      const float s = scales[static_cast<size_t>(r * groups + param_of[static_cast<size_t>(c)])];
      w[i] = (steps[i] + (c % 2 ? 0.5f : 0.0f)) * s;
    }
  for (const int bits : {2, 4, 8})
    for (const bool with_deq : {true, false}) {
      const QuantGrid grid{bits, false};
      const auto [want, got] = on_both([&](Backend& be) {
        auto dw = to_backend(be, w);
        auto ds = to_backend(be, scales);
        auto dz = to_backend(be, zeros);
        auto dp = to_backend(be, param_of);
        Buffer<uint8_t> q(be, rows * cols);
        Buffer<float> deq(be, rows * cols);
        be.quantize(dw.data(), rows, cols, ds.data(), dz.data(), groups, dp.data(), grid, q.data(),
                    with_deq ? deq.data() : nullptr);
        return std::make_pair(to_host(be, q), with_deq ? to_host(be, deq) : std::vector<float>{});
      });
      const std::string what = "quantize bits " + std::to_string(bits);
      expect_identical(got.first, want.first, what + " codes");
      expect_identical(got.second, want.second, what + " deq");
      EXPECT_TRUE(std::any_of(want.first.begin(), want.first.end(), [](uint8_t v) { return v != 0; })) << what;
    }
}

// --- GPTQ --------------------------------------------------------------------------------------------------------

struct GptqProblem {
  int64_t rows = 0, cols = 0, groups = 0;
  std::vector<float> w;        // [rows, cols]
  std::vector<float> r;        // R [cols, cols] from the CPU backend, shared by both runs
  std::vector<float> scales0;  // initial tables [rows, groups]
  std::vector<float> zeros0;
  std::vector<int32_t> param_of;  // [cols]
  int64_t dynamic_group_size = 0;
  QuantGrid grid;
};

struct GptqResult {
  std::vector<uint8_t> q;
  std::vector<float> scales, zeros, err2, res;
};

// rows x cols weights with a Hessian from correlated inputs; groups of group_size (dynamic or given up front).
GptqProblem make_gptq_problem(int64_t rows, int64_t cols, int64_t group_size, bool dynamic, QuantGrid grid,
                              uint32_t seed) {
  GptqProblem p;
  p.rows = rows;
  p.cols = cols;
  p.grid = grid;
  p.w = normal(static_cast<size_t>(rows * cols), 0.05f, seed);
  // inputs with a shared component, so that H has real off-diagonal structure
  const int64_t tokens = 2 * cols;
  const auto base = normal(static_cast<size_t>(tokens), 1.0f, seed + 1);
  auto x = normal(static_cast<size_t>(tokens * cols), 1.0f, seed + 2);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t c = 0; c < cols; ++c) x[static_cast<size_t>(t * cols + c)] += 0.7f * base[static_cast<size_t>(t)];
  std::vector<float> h(static_cast<size_t>(cols * cols));
  double diag_mean = 0.0;
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      double s = 0.0;
      for (int64_t t = 0; t < tokens; ++t)
        s += double{x[static_cast<size_t>(t * cols + i)]} * x[static_cast<size_t>(t * cols + j)];
      h[static_cast<size_t>(i * cols + j)] = static_cast<float>(2.0 * s / static_cast<double>(tokens));
      if (i == j) diag_mean += 2.0 * s / static_cast<double>(tokens) / static_cast<double>(cols);
    }
  for (int64_t i = 0; i < cols; ++i) h[static_cast<size_t>(i * cols + i)] += static_cast<float>(0.01 * diag_mean);
  auto c = cpu();
  auto dh = to_backend(*c, h);
  PQ_ASSERT(c->reverse_cholesky(dh.data(), cols), "test Hessian not SPD");
  p.r = to_host(*c, dh);

  p.groups = group_size > 0 ? (cols + group_size - 1) / group_size : 1;
  p.param_of.resize(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j)
    p.param_of[static_cast<size_t>(j)] = static_cast<int32_t>(group_size > 0 ? j / group_size : 0);
  p.scales0.assign(static_cast<size_t>(rows * p.groups), 0.0f);
  p.zeros0.assign(static_cast<size_t>(rows * p.groups), 0.0f);
  if (dynamic) {
    p.dynamic_group_size = group_size;
  } else {
    auto dw = to_backend(*c, p.w);
    auto ds = to_backend(*c, p.scales0);
    auto dz = to_backend(*c, p.zeros0);
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t c0 = group_size > 0 ? g * group_size : 0;
      const int64_t width = group_size > 0 ? std::min(group_size, cols - c0) : cols;
      c->quant_params(dw.data() + c0, rows, width, cols, grid, ds.data() + g, dz.data() + g, p.groups);
    }
    p.scales0 = to_host(*c, ds);
    p.zeros0 = to_host(*c, dz);
  }
  return p;
}

// The column loop as the GPTQ driver runs it: gptq_block per block, then the lazy update of the later columns
// with the backend's GEMM.
GptqResult run_gptq(Backend& be, const GptqProblem& p, int64_t block) {
  const int64_t rows = p.rows, cols = p.cols;
  std::vector<float> wc(p.w);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) wc[static_cast<size_t>(r * cols + j)] *= p.r[static_cast<size_t>(j * cols + j)];
  auto dr = to_backend(be, p.r);
  auto dw = to_backend(be, p.w);
  auto dwc = to_backend(be, wc);
  auto dres = to_backend(be, std::vector<float>(static_cast<size_t>(rows * cols), 0.0f));
  auto derr = to_backend(be, std::vector<float>(static_cast<size_t>(rows), 0.0f));
  auto dq = to_backend(be, std::vector<uint8_t>(static_cast<size_t>(rows * cols), 0));
  auto ds = to_backend(be, p.scales0);
  auto dz = to_backend(be, p.zeros0);
  auto dp = to_backend(be, p.param_of);
  GptqBlockArgs a;
  a.rows = rows;
  a.cols = cols;
  a.r = dr.data();
  a.w = dw.data();
  a.wc = dwc.data();
  a.res = dres.data();
  a.err2 = derr.data();
  a.q = dq.data();
  a.scales = ds.data();
  a.zeros = dz.data();
  a.groups = p.groups;
  a.param_of = dp.data();
  a.dynamic_group_size = p.dynamic_group_size;
  a.grid = p.grid;
  for (int64_t b0 = 0; b0 < cols; b0 += block) {
    const int64_t b1 = std::min(b0 + block, cols);
    a.begin = b0;
    a.end = b1;
    be.gptq_block(a);
    if (b1 < cols)
      be.gemm(Trans::kNo, Trans::kNo, rows, cols - b1, b1 - b0, 1.0f, dres.data() + b0, cols,
              dr.data() + b0 * cols + b1, cols, 1.0f, dwc.data() + b1, cols);
  }
  return GptqResult{to_host(be, dq), to_host(be, ds), to_host(be, dz), to_host(be, derr), to_host(be, dres)};
}

template <typename T>
double fraction_equal(const std::vector<T>& a, const std::vector<T>& b) {
  size_t same = 0;
  for (size_t i = 0; i < a.size(); ++i) same += bits_equal(a[i], b[i]) ? 1 : 0;
  return a.empty() ? 1.0 : static_cast<double>(same) / static_cast<double>(a.size());
}

TEST(CudaBackend, GptqBlockMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  struct Case {
    const char* name;
    int64_t rows, cols, group_size;
    bool dynamic;
    QuantGrid grid;
    int64_t block;
  };
  const Case cases[] = {
      {"4-bit asym, dynamic groups of 32, blocks of 128, ragged last block", 300, 300, 32, true, {4, false}, 128},
      {"4-bit sym, groups of 128 up front", 257, 256, 128, false, {4, true}, 128},
      {"3-bit asym, one group per row", 130, 200, -1, false, {3, false}, 128},
      {"2-bit asym, dynamic groups of 64, blocks of 200 (untiled kernel)", 100, 400, 64, true, {2, false}, 200},
      {"8-bit asym, dynamic groups of 128, blocks of 96", 64, 192, 128, true, {8, false}, 96},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    const GptqProblem p = make_gptq_problem(k.rows, k.cols, k.group_size, k.dynamic, k.grid, 24);
    auto c = cpu();
    auto g = gpu();
    const GptqResult want = run_gptq(*c, p, k.block);
    const GptqResult got = run_gptq(*g, p, k.block);
    EXPECT_TRUE(std::any_of(want.q.begin(), want.q.end(), [](uint8_t v) { return v != 0; }));
    // Codes: the same float operations in the same order; only the lazy-update GEMMs (cuBLAS vs OpenBLAS) and
    // FMA contraction choices differ, which can move a value across a rounding boundary now and then.
    const double codes = fraction_equal(got.q, want.q);
    std::printf("%s: %.5f of codes identical, %.5f of scales\n", k.name, codes,
                fraction_equal(got.scales, want.scales));
    EXPECT_GE(codes, 0.999);
    // Tables: a few hundred entries in the small cases, so at least one differing entry is allowed (a dynamic
    // group's range can sit within an ulp of an fp16 rounding boundary).
    const auto allowed = [](size_t n) { return static_cast<double>(std::max<size_t>(1, n / 1000)); };
    EXPECT_LE((1.0 - fraction_equal(got.scales, want.scales)) * static_cast<double>(want.scales.size()),
              allowed(want.scales.size()) + 0.5);
    EXPECT_LE((1.0 - fraction_equal(got.zeros, want.zeros)) * static_cast<double>(want.zeros.size()),
              allowed(want.zeros.size()) + 0.5);
    // The loss: a sum of squares of the propagated error; a flipped code changes its row's loss a little.
    double loss_cpu = 0.0, loss_gpu = 0.0;
    for (size_t i = 0; i < want.err2.size(); ++i) {
      loss_cpu += want.err2[i];
      loss_gpu += got.err2[i];
    }
    EXPECT_GT(loss_cpu, 0.0);
    EXPECT_NEAR(loss_gpu, loss_cpu, 1e-3 * loss_cpu);
  }
}

TEST(CudaBackend, GptqSingleBlockFromIdenticalInputs) {
  SKIP_WITHOUT_CUDA();
  // One call, no GEMM in between: every input is bit-identical, so the only possible difference is FMA
  // contraction in the CPU's compiled loop.
  const GptqProblem p = make_gptq_problem(500, 128, 32, true, {4, false}, 25);
  const auto [want, got] = on_both([&](Backend& be) { return run_gptq(be, p, 128); });
  const double codes = fraction_equal(got.q, want.q);
  std::printf("single block: %.5f of codes identical, %.5f of residuals\n", codes, fraction_equal(got.res, want.res));
  EXPECT_GE(codes, 0.999);
  expect_close(got.err2, want.err2, 1e-7, 1e-3, "gptq err2");
}

// --- determinism -------------------------------------------------------------------------------------------------

TEST(CudaBackend, RunToRunBitIdentical) {
  SKIP_WITHOUT_CUDA();
  auto g = gpu();
  // a little of everything whose result depends on a reduction order
  const auto once = [&]() {
    std::vector<float> out;
    const auto append = [&out](const std::vector<float>& v) { out.insert(out.end(), v.begin(), v.end()); };
    const int64_t m = 96, n = 80, k = 300;
    const auto a = normal(static_cast<size_t>(m * k), 1.0f, 30);
    const auto b = normal(static_cast<size_t>(k * n), 1.0f, 31);
    {
      auto da = to_backend(*g, a);
      auto db = to_backend(*g, b);
      Buffer<float> dc(*g, m * n);
      g->gemm(Trans::kNo, Trans::kNo, m, n, k, 1.0f, da.data(), k, db.data(), n, 0.0f, dc.data(), n);
      append(to_host(*g, dc));
      auto dh = to_backend(*g, std::vector<float>(static_cast<size_t>(k * k), 0.0f));
      g->hessian_accumulate(da.data(), m, k, dh.data());
      append(to_host(*g, dh));
      g->rms_norm(da.data(), db.data(), da.data(), m, k, 1e-6f);
      append(to_host(*g, da));
    }
    {
      const int64_t seq = 150, heads = 4, kvh = 2, hd = 64;
      const auto q = normal(static_cast<size_t>(seq * heads * hd), 1.0f, 32);
      const auto kv = normal(static_cast<size_t>(seq * kvh * hd), 1.0f, 33);
      auto dq = to_backend(*g, q);
      auto dk = to_backend(*g, kv);
      Buffer<float> o(*g, seq * heads * hd);
      g->attention(dq.data(), dk.data(), dk.data(), o.data(), 1, seq, heads, kvh, hd);
      append(to_host(*g, o));
      std::vector<int32_t> t(static_cast<size_t>(seq));
      for (int64_t i = 0; i < seq; ++i) t[static_cast<size_t>(i)] = static_cast<int32_t>(i % (heads * hd));
      auto dt = to_backend(*g, t);
      out.push_back(static_cast<float>(g->nll_sum(dq.data(), dt.data(), seq, heads * hd)));
    }
    {
      const GptqProblem p = make_gptq_problem(200, 256, 64, true, {4, false}, 34);
      const GptqResult r = run_gptq(*g, p, 128);
      for (const uint8_t v : r.q) out.push_back(v);
      append(r.err2);
      append(r.scales);
      const auto h = spd_matrix(100, 35);
      auto dh = to_backend(*g, h);
      EXPECT_TRUE(g->reverse_cholesky(dh.data(), 100));
      append(to_host(*g, dh));
    }
    return out;
  };
  const auto first = once();
  const auto second = once();
  expect_nontrivial(first, "determinism probe");
  expect_identical(second, first, "second run vs first");
}

}  // namespace
}  // namespace pipequant::kernels

#else  // no CUDA backend in this build

TEST(CudaBackend, NotBuilt) { GTEST_SKIP() << "this build has no CUDA backend"; }

#endif
