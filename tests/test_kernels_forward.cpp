// The CPU backend's forward ops (kernels/cpu/cpu_forward.cpp) and its gemm, each against a plain double-precision
// loop written here: exact where the inputs make it exact (small integers, power-of-two scales, the same float
// formula), otherwise a named tolerance with its reason. Also the properties the rest of the program relies on:
// causality, softmax weights summing to one, RoPE at position 0 being the identity, results that do not depend
// on the thread count.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/backend.hpp"
#include "base/numeric.hpp"

namespace pipequant::kernels {
namespace {

// --- helpers -----------------------------------------------------------------------------------------------------

// The CPU backend works on host memory, so std::vector storage is backend memory.
std::unique_ptr<Backend> cpu(int threads = 2) { return make_cpu_backend(threads); }

std::vector<float> normal(size_t n, float sigma, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

std::vector<float> small_integers(size_t n, int lo, int hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(dist(rng));
  return v;
}

bool bits_equal(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

// Bit-identical vectors; reports the first few mismatches.
void expect_identical(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t mismatches = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (!bits_equal(got[i], want[i])) {
      if (mismatches < 5) ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", want " << want[i];
      ++mismatches;
    }
  EXPECT_EQ(mismatches, 0u) << what;
}

// Outputs must carry information: not all zero, and all finite.
void expect_nontrivial(const std::vector<float>& v, const std::string& what) {
  size_t nonzero = 0;
  for (float x : v) {
    ASSERT_TRUE(std::isfinite(x)) << what;
    if (x != 0.0f) ++nonzero;
  }
  EXPECT_GT(nonzero, v.size() / 2) << what << ": mostly zero";
}

// Llama's inv_freq for base 10000: 1 / base^(2i / head_dim), i < head_dim / 2.
std::vector<float> llama_inv_freq(int64_t head_dim) {
  std::vector<float> f(static_cast<size_t>(head_dim / 2));
  for (int64_t i = 0; i < head_dim / 2; ++i)
    f[static_cast<size_t>(i)] =
        static_cast<float>(1.0 / std::pow(10000.0, static_cast<double>(2 * i) / static_cast<double>(head_dim)));
  return f;
}

// --- gemm --------------------------------------------------------------------------------------------------------

// C = alpha op(A) op(B) + beta C in double, row-major with leading dimensions.
void gemm_reference(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const std::vector<float>& a,
                    int64_t lda, const std::vector<float>& b, int64_t ldb, double beta, std::vector<double>& c,
                    int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0.0;
      for (int64_t p = 0; p < k; ++p) {
        const double av = ta ? a[static_cast<size_t>(p * lda + i)] : a[static_cast<size_t>(i * lda + p)];
        const double bv = tb ? b[static_cast<size_t>(j * ldb + p)] : b[static_cast<size_t>(p * ldb + j)];
        s += av * bv;
      }
      c[static_cast<size_t>(i * ldc + j)] = alpha * s + beta * c[static_cast<size_t>(i * ldc + j)];
    }
}

struct GemmCase {
  bool ta, tb;
};

// All four transpose combinations, leading dimensions wider than the stored widths (the padding must stay
// untouched), m, n, k all different so a swapped dimension cannot pass.
TEST(KernelsForward, GemmMatchesNaiveLoopAllTransposes) {
  auto be = cpu();
  const int64_t m = 13, n = 17, k = 29;
  for (const GemmCase tc :
       {GemmCase{false, false}, GemmCase{false, true}, GemmCase{true, false}, GemmCase{true, true}}) {
    SCOPED_TRACE(std::string("ta=") + (tc.ta ? "T" : "N") + " tb=" + (tc.tb ? "T" : "N"));
    const int64_t a_rows = tc.ta ? k : m, a_cols = tc.ta ? m : k;
    const int64_t b_rows = tc.tb ? n : k, b_cols = tc.tb ? k : n;
    const int64_t lda = a_cols + 5, ldb = b_cols + 3, ldc = n + 7;
    // Small integers with power-of-two alpha/beta: every product and partial sum (|.| <= 29 * 16 + 8) is an exact
    // float, so the result is exact whatever order BLAS sums in.
    const auto a = small_integers(static_cast<size_t>(a_rows * lda), -4, 4, 11);
    const auto b = small_integers(static_cast<size_t>(b_rows * ldb), -4, 4, 12);
    auto c = small_integers(static_cast<size_t>(m * ldc), -8, 8, 13);
    std::vector<double> want(c.begin(), c.end());
    gemm_reference(tc.ta, tc.tb, m, n, k, 0.5, a, lda, b, ldb, -0.25, want, ldc);
    const auto c_before = c;
    be->gemm(tc.ta ? Trans::kYes : Trans::kNo, tc.tb ? Trans::kYes : Trans::kNo, m, n, k, 0.5f, a.data(), lda, b.data(),
             ldb, -0.25f, c.data(), ldc);
    int64_t nonzero = 0;
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        const size_t at = static_cast<size_t>(i * ldc + j);
        ASSERT_EQ(static_cast<double>(c[at]), want[at]) << "c[" << i << "," << j << "]";
        nonzero += c[at] != 0.0f;
      }
      for (int64_t j = n; j < ldc; ++j)
        ASSERT_TRUE(bits_equal(c[static_cast<size_t>(i * ldc + j)], c_before[static_cast<size_t>(i * ldc + j)]))
            << "padding c[" << i << "," << j << "] was written";
    }
    EXPECT_GT(nonzero, m * n / 2);
  }
}

// The same on Gaussian data, where rounding happens.
TEST(KernelsForward, GemmMatchesNaiveLoopOnRandomData) {
  auto be = cpu();
  const int64_t m = 31, n = 45, k = 257;
  for (const GemmCase tc :
       {GemmCase{false, false}, GemmCase{false, true}, GemmCase{true, false}, GemmCase{true, true}}) {
    SCOPED_TRACE(std::string("ta=") + (tc.ta ? "T" : "N") + " tb=" + (tc.tb ? "T" : "N"));
    const int64_t lda = (tc.ta ? m : k) + 4, ldb = (tc.tb ? k : n) + 9, ldc = n + 2;
    const auto a = normal(static_cast<size_t>((tc.ta ? k : m) * lda), 1.0f, 21);
    const auto b = normal(static_cast<size_t>((tc.tb ? n : k) * ldb), 1.0f, 22);
    std::vector<float> c(static_cast<size_t>(m * ldc), 0.0f);
    std::vector<double> want(c.size(), 0.0);
    gemm_reference(tc.ta, tc.tb, m, n, k, 1.0, a, lda, b, ldb, 0.0, want, ldc);
    be->gemm(tc.ta ? Trans::kYes : Trans::kNo, tc.tb ? Trans::kYes : Trans::kNo, m, n, k, 1.0f, a.data(), lda, b.data(),
             ldb, 0.0f, c.data(), ldc);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const size_t at = static_cast<size_t>(i * ldc + j);
        // fp32 accumulation of 257 unit-variance products: error well under 257 * 2^-24 * sqrt(257) (~2.5e-4) of the
        // |terms| scale (~16); 1e-4 absolute is 40x the typical error and catches any wrong element
        EXPECT_NEAR(c[at], want[at], 1e-4) << "c[" << i << "," << j << "]";
      }
  }
}

// --- rms_norm ----------------------------------------------------------------------------------------------------

// --- linear_half ---------------------------------------------------------------------------------------------------

// The 16-bit GEMM: x rounded to the format (to nearest even), w given in it, products exact, sums in fp32. Against
// a double loop over the same rounded values: the only difference is the order and width of the sums.
TEST(KernelsForward, LinearHalfMatchesDoubleReferenceOfRoundedInputs) {
  auto be = cpu();
  const int64_t m = 37, n = 29, k = 300;
  const auto x = normal(static_cast<size_t>(m * k), 1.0f, 31);
  const auto wf = normal(static_cast<size_t>(n * k), 0.05f, 32);
  for (const HalfFormat format : {HalfFormat::kBF16, HalfFormat::kF16}) {
    const bool bf16 = format == HalfFormat::kBF16;
    SCOPED_TRACE(bf16 ? "bf16" : "fp16");
    std::vector<uint16_t> w(wf.size());
    for (size_t i = 0; i < w.size(); ++i) w[i] = bf16 ? float_to_bf16(wf[i]) : float_to_fp16(wf[i]);
    std::vector<float> y(static_cast<size_t>(m * n));
    be->linear_half(x.data(), w.data(), format, y.data(), m, n, k);
    double worst = 0.0, scale = 0.0, moved = 0.0;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0.0, full = 0.0;
        for (int64_t p = 0; p < k; ++p) {
          const float xv = x[static_cast<size_t>(i * k + p)];
          const double xr = bf16 ? bf16_to_float(float_to_bf16(xv)) : fp16_to_float(float_to_fp16(xv));
          const uint16_t wb = w[static_cast<size_t>(j * k + p)];
          const double wr = bf16 ? bf16_to_float(wb) : fp16_to_float(wb);
          s += xr * wr;
          full += static_cast<double>(xv) * wr;
        }
        worst = std::max(worst, std::fabs(y[static_cast<size_t>(i * n + j)] - s));
        scale = std::max(scale, std::fabs(s));
        moved = std::max(moved, std::fabs(full - s));
      }
    // fp32 sums of 300 terms of size ~0.05: a few ulps of the largest partial sums
    EXPECT_LE(worst, 1e-5 * scale) << "max |y - reference| " << worst << " for outputs up to " << scale;
    // and the input rounding is real: without it the result moves by far more than the tolerance
    EXPECT_GT(moved, 1e-4 * scale);
  }
}

// Small integers are exact in both formats and every sum stays exact in fp32: the result is exact.
TEST(KernelsForward, LinearHalfOfSmallIntegersIsExact) {
  auto be = cpu();
  const int64_t m = 9, n = 11, k = 64;
  const auto x = small_integers(static_cast<size_t>(m * k), -8, 8, 33);
  const auto wf = small_integers(static_cast<size_t>(n * k), -8, 8, 34);
  for (const HalfFormat format : {HalfFormat::kBF16, HalfFormat::kF16}) {
    std::vector<uint16_t> w(wf.size());
    for (size_t i = 0; i < w.size(); ++i)
      w[i] = format == HalfFormat::kBF16 ? float_to_bf16(wf[i]) : float_to_fp16(wf[i]);
    std::vector<float> y(static_cast<size_t>(m * n)), want(static_cast<size_t>(m * n));
    be->linear_half(x.data(), w.data(), format, y.data(), m, n, k);
    be->linear(x.data(), wf.data(), want.data(), m, n, k);
    expect_identical(y, want, format == HalfFormat::kBF16 ? "bf16" : "fp16");
    expect_nontrivial(y, "linear_half");
  }
}

TEST(KernelsForward, RmsNormMatchesDoubleReference) {
  auto be = cpu();
  const int64_t rows = 37, dim = 4096;
  const float eps = 1e-5f;
  auto x = normal(static_cast<size_t>(rows * dim), 2.0f, 31);
  for (int64_t i = 0; i < dim; ++i) x[static_cast<size_t>(5 * dim + i)] *= 1e-3f;  // a row where eps matters
  const auto w = normal(static_cast<size_t>(dim), 1.0f, 32);
  std::vector<float> y(x.size());
  be->rms_norm(x.data(), w.data(), y.data(), rows, dim, eps);
  expect_nontrivial(y, "rms_norm");
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0.0;
    for (int64_t i = 0; i < dim; ++i)
      ss += static_cast<double>(x[static_cast<size_t>(r * dim + i)]) * x[static_cast<size_t>(r * dim + i)];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(dim) + static_cast<double>(eps));
    for (int64_t i = 0; i < dim; ++i) {
      const size_t at = static_cast<size_t>(r * dim + i);
      const double want = static_cast<double>(w[static_cast<size_t>(i)]) * x[at] * inv;
      // three fp32 roundings (inv, x * inv, w * that) after a double mean: <= 1.5 ulp = 1.8e-7 relative; 3e-7 bound
      ASSERT_NEAR(y[at], want, 3e-7 * std::fabs(want) + 1e-30) << "row " << r << " col " << i;
    }
  }
  // y may alias x
  auto x_inplace = x;
  be->rms_norm(x_inplace.data(), w.data(), x_inplace.data(), rows, dim, eps);
  expect_identical(x_inplace, y, "rms_norm in place");
}

// --- rope --------------------------------------------------------------------------------------------------------

TEST(KernelsForward, RopeMatchesDoubleReference) {
  auto be = cpu();
  const int64_t samples = 2, seq = 300, heads = 3, head_dim = 64, half = head_dim / 2;
  const auto inv_freq = llama_inv_freq(head_dim);
  const auto x0 = normal(static_cast<size_t>(samples * seq * heads * head_dim), 1.0f, 41);
  auto x = x0;
  be->rope(x.data(), samples, seq, heads, head_dim, inv_freq.data());
  expect_nontrivial(x, "rope");
  for (int64_t r = 0; r < samples * seq; ++r) {
    const double pos = static_cast<double>(r % seq);  // every sample starts at position 0
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < half; ++i) {
        const size_t lo = static_cast<size_t>((r * heads + h) * head_dim + i), hi = lo + static_cast<size_t>(half);
        const double angle = pos * static_cast<double>(inv_freq[static_cast<size_t>(i)]);
        const double x1 = x0[lo], x2 = x0[hi];
        const double want_lo = x1 * std::cos(angle) - x2 * std::sin(angle);
        const double want_hi = x2 * std::cos(angle) + x1 * std::sin(angle);
        // cos/sin rounded to fp32, two fp32 products and a sum: each term off by <= 1 ulp of (|x1| + |x2|), and the
        // sum may cancel, so the bound is absolute in (|x1| + |x2|): 3 * 2^-24 ~ 1.8e-7, rounded up to 3e-7
        const double tol = 3e-7 * (std::fabs(x1) + std::fabs(x2));
        ASSERT_NEAR(x[lo], want_lo, tol) << "row " << r << " head " << h << " i " << i;
        ASSERT_NEAR(x[hi], want_hi, tol) << "row " << r << " head " << h << " i " << i;
      }
  }
}

TEST(KernelsForward, RopeAtPositionZeroIsIdentityAndPreservesNorms) {
  auto be = cpu();
  const int64_t samples = 3, seq = 17, heads = 4, head_dim = 128, half = head_dim / 2;
  const auto inv_freq = llama_inv_freq(head_dim);
  const auto x0 = normal(static_cast<size_t>(samples * seq * heads * head_dim), 1.5f, 42);
  auto x = x0;
  be->rope(x.data(), samples, seq, heads, head_dim, inv_freq.data());
  const int64_t row_width = heads * head_dim;
  size_t changed = 0;
  for (int64_t r = 0; r < samples * seq; ++r)
    for (int64_t e = 0; e < row_width; ++e) {
      const size_t at = static_cast<size_t>(r * row_width + e);
      if (r % seq == 0) {
        // cos 0 = 1 and sin 0 = 0 exactly, so position 0 (of every sample) is bit-for-bit the input
        ASSERT_TRUE(bits_equal(x[at], x0[at])) << "row " << r << " element " << e;
      } else {
        changed += !bits_equal(x[at], x0[at]);
      }
    }
  EXPECT_GT(changed, static_cast<size_t>(samples * (seq - 1) * row_width / 2)) << "rope left most rows unchanged";
  // a rotation: every (i, i + half) pair keeps its length
  for (int64_t r = 0; r < samples * seq; ++r)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < half; ++i) {
        const size_t lo = static_cast<size_t>((r * heads + h) * head_dim + i), hi = lo + static_cast<size_t>(half);
        const double before = std::hypot(static_cast<double>(x0[lo]), static_cast<double>(x0[hi]));
        const double after = std::hypot(static_cast<double>(x[lo]), static_cast<double>(x[hi]));
        // fp32 cos/sin (cos^2 + sin^2 = 1 to ~1 ulp) and fp32 products: a few ulp of the pair length; 5e-7 relative
        ASSERT_NEAR(after, before, 5e-7 * before + 1e-30) << "row " << r << " head " << h << " pair " << i;
      }
}

// --- attention ---------------------------------------------------------------------------------------------------

struct AttentionShape {
  int64_t samples, seq, heads, kv_heads, head_dim;
};

// One query row's output [head_dim] in double: causal softmax(q k^T / sqrt(d)) v over keys 0..t.
std::vector<double> attention_row_reference(const std::vector<float>& q, const std::vector<float>& k,
                                            const std::vector<float>& v, const AttentionShape& sh, int64_t s, int64_t h,
                                            int64_t t) {
  const int64_t qs = sh.heads * sh.head_dim, kvs = sh.kv_heads * sh.head_dim;
  const int64_t kvh = h / (sh.heads / sh.kv_heads);
  const double scale = 1.0 / std::sqrt(static_cast<double>(sh.head_dim));
  std::vector<double> score(static_cast<size_t>(t + 1));
  double mx = -INFINITY;
  for (int64_t j = 0; j <= t; ++j) {
    double d = 0.0;
    for (int64_t e = 0; e < sh.head_dim; ++e)
      d += static_cast<double>(q[static_cast<size_t>((s * sh.seq + t) * qs + h * sh.head_dim + e)]) *
           k[static_cast<size_t>((s * sh.seq + j) * kvs + kvh * sh.head_dim + e)];
    score[static_cast<size_t>(j)] = d * scale;
    mx = std::max(mx, d * scale);
  }
  double denom = 0.0;
  std::vector<double> out(static_cast<size_t>(sh.head_dim), 0.0);
  for (int64_t j = 0; j <= t; ++j) {
    const double p = std::exp(score[static_cast<size_t>(j)] - mx);
    denom += p;
    for (int64_t e = 0; e < sh.head_dim; ++e)
      out[static_cast<size_t>(e)] += p * v[static_cast<size_t>((s * sh.seq + j) * kvs + kvh * sh.head_dim + e)];
  }
  for (auto& o : out) o /= denom;
  return out;
}

struct AttentionInputs {
  std::vector<float> q, k, v;
};

// q is scaled up so that the softmax is peaked (a flat softmax would hide a wrong key), k and v unit normal.
AttentionInputs attention_inputs(const AttentionShape& sh, uint32_t seed) {
  const size_t qn = static_cast<size_t>(sh.samples * sh.seq * sh.heads * sh.head_dim);
  const size_t kvn = static_cast<size_t>(sh.samples * sh.seq * sh.kv_heads * sh.head_dim);
  return {normal(qn, 3.0f, seed), normal(kvn, 1.0f, seed + 1), normal(kvn, 1.0f, seed + 2)};
}

std::vector<float> run_attention(Backend& be, const AttentionInputs& in, const AttentionShape& sh) {
  std::vector<float> out(in.q.size(), NAN);  // NaN: a row the kernel forgets to write fails every check
  be.attention(in.q.data(), in.k.data(), in.v.data(), out.data(), sh.samples, sh.seq, sh.heads, sh.kv_heads,
               sh.head_dim);
  return out;
}

// fp32 scores (64-term dot products of size up to ~3 * 8 before the 1/8 scale: ~1e-6 error in a score, i.e. ~1e-6
// relative in a softmax weight) and fp32 accumulation of up to seq weighted values (|v| ~ 1): observed <= 4e-6 at
// seq 4096; 2e-5 leaves a 5x margin, while a wrong key, head or mask is off by O(0.1).
inline constexpr double kAttentionTolerance = 2e-5;

void check_rows(const std::vector<float>& got, const AttentionInputs& in, const AttentionShape& sh,
                const std::vector<int64_t>& rows) {
  const int64_t qs = sh.heads * sh.head_dim;
  for (int64_t s = 0; s < sh.samples; ++s)
    for (int64_t h = 0; h < sh.heads; ++h)
      for (const int64_t t : rows) {
        const auto want = attention_row_reference(in.q, in.k, in.v, sh, s, h, t);
        for (int64_t e = 0; e < sh.head_dim; ++e) {
          const float g = got[static_cast<size_t>((s * sh.seq + t) * qs + h * sh.head_dim + e)];
          ASSERT_NEAR(g, want[static_cast<size_t>(e)], kAttentionTolerance)
              << "sample " << s << " head " << h << " row " << t << " element " << e;
        }
      }
}

TEST(KernelsForward, AttentionMatchesDoubleReferenceGqa) {
  auto be = cpu();
  for (const AttentionShape sh :
       {AttentionShape{2, 1, 8, 4, 64}, AttentionShape{2, 7, 8, 4, 64}, AttentionShape{2, 300, 8, 4, 64},
        AttentionShape{3, 1, 4, 2, 32}, AttentionShape{3, 7, 4, 2, 32}, AttentionShape{3, 300, 4, 2, 32}}) {
    SCOPED_TRACE("samples " + std::to_string(sh.samples) + " seq " + std::to_string(sh.seq) + " heads " +
                 std::to_string(sh.heads) + "/" + std::to_string(sh.kv_heads) + " head_dim " +
                 std::to_string(sh.head_dim));
    const auto in = attention_inputs(sh, 51);
    const auto out = run_attention(*be, in, sh);
    expect_nontrivial(out, "attention");
    std::vector<int64_t> rows(static_cast<size_t>(sh.seq));
    for (int64_t t = 0; t < sh.seq; ++t) rows[static_cast<size_t>(t)] = t;
    check_rows(out, in, sh, rows);
    // row 0 sees only key 0: its output is exactly v[0] of its kv head (weight exp(0) = 1, denominator 1)
    for (int64_t h = 0; h < sh.heads; ++h)
      for (int64_t e = 0; e < sh.head_dim; ++e)
        ASSERT_EQ(out[static_cast<size_t>(h * sh.head_dim + e)],
                  in.v[static_cast<size_t>(h / (sh.heads / sh.kv_heads) * sh.head_dim + e)])
            << "head " << h;
  }
}

// Long sequences use the blocked path with many 64-row query blocks; checked on rows at and around block edges.
TEST(KernelsForward, AttentionLongSequence) {
  auto be = cpu();
  const AttentionShape sh{1, 4096, 2, 1, 64};
  const auto in = attention_inputs(sh, 52);
  const auto out = run_attention(*be, in, sh);
  expect_nontrivial(out, "attention seq 4096");
  check_rows(out, in, sh, {0, 1, 63, 64, 65, 127, 128, 1000, 2047, 2048, 4031, 4032, 4094, 4095});
}

TEST(KernelsForward, AttentionIsCausal) {
  auto be = cpu();
  for (const AttentionShape sh : {AttentionShape{2, 7, 8, 4, 64}, AttentionShape{2, 300, 4, 2, 32}}) {
    SCOPED_TRACE("seq " + std::to_string(sh.seq));
    const auto in = attention_inputs(sh, 53);
    const auto out = run_attention(*be, in, sh);
    // change key and value at position tc of sample 0 (every kv head)
    const int64_t tc = sh.seq / 2 + 1, kvs = sh.kv_heads * sh.head_dim, qs = sh.heads * sh.head_dim;
    auto changed = in;
    for (int64_t e = 0; e < kvs; ++e) {
      changed.k[static_cast<size_t>(tc * kvs + e)] += 5.0f;
      changed.v[static_cast<size_t>(tc * kvs + e)] -= 3.0f;
    }
    const auto out2 = run_attention(*be, changed, sh);
    size_t differ_from_tc = 0;
    for (int64_t s = 0; s < sh.samples; ++s)
      for (int64_t t = 0; t < sh.seq; ++t)
        for (int64_t e = 0; e < qs; ++e) {
          const size_t at = static_cast<size_t>((s * sh.seq + t) * qs + e);
          if (s == 0 && t >= tc) {
            differ_from_tc += !bits_equal(out[at], out2[at]);
          } else {
            // earlier rows and other samples never read position tc: bit-for-bit the same (masked weights are
            // exact zeros)
            ASSERT_TRUE(bits_equal(out[at], out2[at])) << "sample " << s << " row " << t << " element " << e;
          }
        }
    // and the rows that do see position tc did change: the test would pass vacuously otherwise
    EXPECT_GT(differ_from_tc, static_cast<size_t>((sh.seq - tc) * qs / 2));
  }
}

TEST(KernelsForward, AttentionWeightsSumToOne) {
  auto be = cpu();
  const AttentionShape sh{2, 300, 8, 4, 64};
  auto in = attention_inputs(sh, 54);
  std::fill(in.v.begin(), in.v.end(), 1.0f);
  const auto out = run_attention(*be, in, sh);
  for (size_t i = 0; i < out.size(); ++i)
    // fp32 sum of up to 300 weights in [0, 1] divided by their double sum: <= 300 * 2^-24 ~ 1.8e-5 relative; 2e-5
    ASSERT_NEAR(out[i], 1.0, 2e-5) << "element " << i;
}

// --- elementwise -------------------------------------------------------------------------------------------------

TEST(KernelsForward, SwigluExactAgainstSameFloatFormula) {
  auto be = cpu();
  const int64_t n = 10007;
  auto gate = normal(static_cast<size_t>(n), 4.0f, 61);
  gate[0] = -100.0f;  // exp(100) overflows to inf: silu must give -0, not NaN
  gate[1] = 100.0f;
  gate[2] = 0.0f;
  const auto up = normal(static_cast<size_t>(n), 1.0f, 62);
  std::vector<float> want(static_cast<size_t>(n));
  for (size_t i = 0; i < want.size(); ++i) want[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  std::vector<float> out(static_cast<size_t>(n));
  be->swiglu(gate.data(), up.data(), out.data(), n);
  expect_nontrivial(out, "swiglu");
  expect_identical(out, want, "swiglu");
  // and against the double formula: a handful of fp32 roundings, exp within 1 ulp -> 1e-6 relative
  for (size_t i = 0; i < out.size(); ++i) {
    const double g = gate[i];
    const double w = g / (1.0 + std::exp(-g)) * up[i];
    ASSERT_NEAR(out[i], w, 1e-6 * std::fabs(w) + 1e-30) << "element " << i;
  }
  // out may alias gate
  be->swiglu(gate.data(), up.data(), gate.data(), n);
  expect_identical(gate, want, "swiglu in place");
}

TEST(KernelsForward, AddAndAddBiasExact) {
  auto be = cpu();
  const int64_t rows = 33, n = 515;
  const auto x = normal(static_cast<size_t>(rows * n), 1.0f, 71);
  const auto y0 = normal(static_cast<size_t>(rows * n), 1.0f, 72);
  const auto bias = normal(static_cast<size_t>(n), 1.0f, 73);
  auto y = y0;
  be->add(y.data(), x.data(), rows * n);
  std::vector<float> want(y0.size());
  for (size_t i = 0; i < want.size(); ++i) want[i] = y0[i] + x[i];
  expect_nontrivial(y, "add");
  expect_identical(y, want, "add");  // one fp32 addition per element: exact against the same addition
  y = y0;
  be->add_bias(y.data(), bias.data(), rows, n);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i)
      want[static_cast<size_t>(r * n + i)] = y0[static_cast<size_t>(r * n + i)] + bias[static_cast<size_t>(i)];
  expect_identical(y, want, "add_bias");
}

// --- loss --------------------------------------------------------------------------------------------------------

TEST(KernelsForward, NllSumMatchesDoubleReference) {
  auto be = cpu();
  const int64_t rows = 57, vocab = 1003;
  const auto logits = normal(static_cast<size_t>(rows * vocab), 3.0f, 81);
  std::vector<int32_t> targets(static_cast<size_t>(rows));
  std::mt19937 rng(82);
  std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(vocab - 1));
  for (auto& t : targets) t = pick(rng);
  targets[0] = 0;
  targets[1] = static_cast<int32_t>(vocab - 1);
  // reference without the max shift (logits ~ N(0, 3) cannot overflow exp in double), summed in double
  double want = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    double se = 0.0;
    for (int64_t i = 0; i < vocab; ++i) se += std::exp(static_cast<double>(logits[static_cast<size_t>(r * vocab + i)]));
    want += std::log(se) - logits[static_cast<size_t>(r * vocab + targets[static_cast<size_t>(r)])];
  }
  const double got = be->nll_sum(logits.data(), targets.data(), rows, vocab);
  EXPECT_GT(got, 0.0);
  // both sides are double sums of the same ~1000 terms in different orders: ~1e-15 relative; 1e-12 bound
  EXPECT_NEAR(got, want, 1e-12 * std::fabs(want));
  // equal logits: every row is exactly -log(1 / vocab), even far from 0 (the max shift must hold)
  const std::vector<float> flat(static_cast<size_t>(rows * vocab), 1234.5f);
  const double uniform = be->nll_sum(flat.data(), targets.data(), rows, vocab);
  EXPECT_NEAR(uniform, static_cast<double>(rows) * std::log(static_cast<double>(vocab)), 1e-10);
  // large logits would overflow exp without the shift
  auto shifted = logits;
  for (auto& l : shifted) l += 1000.0f;
  const double got_shifted = be->nll_sum(shifted.data(), targets.data(), rows, vocab);
  // adding 1000 to fp32 logits of size ~10 rounds each to 2^-14 (6e-5): per row the nll moves by < 1.2e-4
  EXPECT_NEAR(got_shifted, want, 1.2e-4 * static_cast<double>(rows));
}

// --- hessian -----------------------------------------------------------------------------------------------------

// h += x^T x for k inside one tile and across several tiles (k = 300, 600: the backend works in 256-wide tiles),
// not multiples of the tile; small integers make it exact (|sums| <= 150 * 9 + 5).
TEST(KernelsForward, HessianAccumulateExactOnSmallIntegers) {
  auto be = cpu();
  for (const int64_t k : {1, 70, 300, 600}) {
    SCOPED_TRACE("k " + std::to_string(k));
    const int64_t rows = 150;
    const auto x = small_integers(static_cast<size_t>(rows * k), -3, 3, 91);
    // a symmetric starting h, as the caller's running sum is
    auto h = small_integers(static_cast<size_t>(k * k), -5, 5, 92);
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < i; ++j) h[static_cast<size_t>(i * k + j)] = h[static_cast<size_t>(j * k + i)];
    std::vector<float> xtx(h.size());  // x^T x, exact in double and in float
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) {
        double s = 0.0;
        for (int64_t r = 0; r < rows; ++r)
          s += static_cast<double>(x[static_cast<size_t>(r * k + i)]) * x[static_cast<size_t>(r * k + j)];
        xtx[static_cast<size_t>(i * k + j)] = static_cast<float>(s);
      }
    const auto h0 = h;
    std::vector<float> once(h.size()), twice(h.size());
    for (size_t i = 0; i < h.size(); ++i) {
      once[i] = h0[i] + xtx[i];
      twice[i] = h0[i] + 2.0f * xtx[i];
    }
    be->hessian_accumulate(x.data(), rows, k, h.data());
    expect_nontrivial(h, "hessian");
    expect_identical(h, once, "hessian (full matrix, both triangles)");
    // accumulating again adds the same x^T x
    be->hessian_accumulate(x.data(), rows, k, h.data());
    expect_identical(h, twice, "hessian accumulated twice");
  }
}

TEST(KernelsForward, HessianAccumulateOnRandomDataIsSymmetricAndClose) {
  auto be = cpu();
  const int64_t rows = 300, k = 333;
  const auto x = normal(static_cast<size_t>(rows * k), 1.0f, 93);
  std::vector<float> h(static_cast<size_t>(k * k), 0.0f);
  be->hessian_accumulate(x.data(), rows, k, h.data());
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) {
      double s = 0.0, abs_sum = 0.0;
      for (int64_t r = 0; r < rows; ++r) {
        const double p = static_cast<double>(x[static_cast<size_t>(r * k + i)]) * x[static_cast<size_t>(r * k + j)];
        s += p;
        abs_sum += std::fabs(p);
      }
      // fp32 accumulation of 300 products: |error| <= 300 * 2^-24 * sum |products| in the worst case; 2e-5 of it
      ASSERT_NEAR(h[static_cast<size_t>(i * k + j)], s, 2e-5 * abs_sum) << "h[" << i << "," << j << "]";
      ASSERT_TRUE(bits_equal(h[static_cast<size_t>(i * k + j)], h[static_cast<size_t>(j * k + i)]))
          << "not symmetric at " << i << "," << j;
    }
  // deterministic: same inputs, same bits
  std::vector<float> h2(h.size(), 0.0f);
  be->hessian_accumulate(x.data(), rows, k, h2.data());
  expect_identical(h2, h, "hessian rerun");
}

// --- thread count ------------------------------------------------------------------------------------------------

// Every op parallelizes over independent outputs only, so 1 and 2 threads give the same bits.
TEST(KernelsForward, ResultsDoNotDependOnThreadCount) {
  const AttentionShape sh{2, 150, 4, 2, 64};
  const auto in = attention_inputs(sh, 101);
  const int64_t rows = sh.samples * sh.seq, dim = 520;  // hessian: 3 x 3 tiles
  const auto x = normal(static_cast<size_t>(rows * dim), 1.0f, 102);
  const auto w = normal(static_cast<size_t>(dim), 1.0f, 103);
  std::vector<int32_t> targets(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) targets[static_cast<size_t>(r)] = static_cast<int32_t>((r * 37) % dim);
  const auto inv_freq = llama_inv_freq(sh.head_dim);

  struct Results {
    std::vector<float> attn, norm, roped, hess;
    double nll;
  };
  auto run_all = [&](int threads) {
    auto be = cpu(threads);
    Results res;
    res.attn = run_attention(*be, in, sh);
    res.norm.resize(x.size());
    be->rms_norm(x.data(), w.data(), res.norm.data(), rows, dim, 1e-6f);
    res.roped = in.q;
    be->rope(res.roped.data(), sh.samples, sh.seq, sh.heads, sh.head_dim, inv_freq.data());
    res.hess.assign(static_cast<size_t>(dim * dim), 0.0f);
    be->hessian_accumulate(x.data(), rows, dim, res.hess.data());
    res.nll = be->nll_sum(x.data(), targets.data(), rows, dim);
    return res;
  };
  const Results one = run_all(1);
  const Results two = run_all(2);
  expect_identical(two.attn, one.attn, "attention");
  expect_identical(two.norm, one.norm, "rms_norm");
  expect_identical(two.roped, one.roped, "rope");
  expect_identical(two.hess, one.hess, "hessian");
  EXPECT_EQ(std::memcmp(&two.nll, &one.nll, sizeof(double)), 0) << two.nll << " vs " << one.nll;
}

}  // namespace
}  // namespace pipequant::kernels
