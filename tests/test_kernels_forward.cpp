// Properties of the CPU backend's forward ops and Hessian that the rest of the program relies on, beyond matching
// the reference (each op against its plain double loop is a row of the table in tests/backend_ops.cpp): causality,
// softmax weights summing to one, RoPE at position 0 being the identity and a rotation elsewhere, in-place calls
// giving the out-of-place bits, the loss's max shift, the Hessian accumulating and staying symmetric, and results
// that do not depend on the thread count.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.hpp"
#include "tests/test_util.hpp"

namespace pipequant::test {
namespace {

using kernels::Backend;

// The CPU backend works on host memory, so std::vector storage is backend memory.
std::unique_ptr<Backend> cpu(int threads = 2) { return kernels::make_cpu_backend(threads); }

// --- rope --------------------------------------------------------------------------------------------------------

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

// Row 0 of every sample sees only key 0: its output is exactly v[0] of its kv head (weight exp(0) = 1, denominator 1).
TEST(KernelsForward, AttentionFirstRowIsItsValue) {
  auto be = cpu();
  const AttentionShape sh{2, 7, 8, 4, 64};
  const auto in = attention_inputs(sh, 51);
  const auto out = run_attention(*be, in, sh);
  expect_nontrivial(out, "attention");
  for (int64_t s = 0; s < sh.samples; ++s)
    for (int64_t h = 0; h < sh.heads; ++h)
      for (int64_t e = 0; e < sh.head_dim; ++e)
        ASSERT_EQ(out[static_cast<size_t>(s * sh.seq * sh.heads * sh.head_dim + h * sh.head_dim + e)],
                  in.v[static_cast<size_t>(s * sh.seq * sh.kv_heads * sh.head_dim +
                                           h / (sh.heads / sh.kv_heads) * sh.head_dim + e)])
            << "sample " << s << " head " << h;
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

// --- in place, loss, Hessian -------------------------------------------------------------------------------------

// rms_norm and swiglu may write their output over their input; the result is the out-of-place one, bit for bit.
TEST(KernelsForward, InPlaceGivesTheOutOfPlaceBits) {
  auto be = cpu();
  const int64_t rows = 37, dim = 1000;
  const auto x = normal(static_cast<size_t>(rows * dim), 2.0f, 31);
  const auto w = normal(static_cast<size_t>(dim), 1.0f, 32);
  std::vector<float> y(x.size());
  be->rms_norm(x.data(), w.data(), y.data(), rows, dim, 1e-5f);
  auto x_inplace = x;
  be->rms_norm(x_inplace.data(), w.data(), x_inplace.data(), rows, dim, 1e-5f);
  expect_nontrivial(y, "rms_norm");
  expect_identical(x_inplace, y, "rms_norm in place");

  const auto up = normal(x.size(), 1.0f, 62);
  std::vector<float> out(x.size());
  be->swiglu(x.data(), up.data(), out.data(), rows * dim);
  auto gate = x;
  be->swiglu(gate.data(), up.data(), gate.data(), rows * dim);
  expect_nontrivial(out, "swiglu");
  expect_identical(gate, out, "swiglu in place");
}

// Equal logits give every row exactly -log(1 / vocab), even far from 0, where exp without the max shift overflows.
TEST(KernelsForward, NllSumShiftsByTheMax) {
  auto be = cpu();
  const int64_t rows = 57, vocab = 1003;
  std::vector<int32_t> targets(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) targets[static_cast<size_t>(r)] = static_cast<int32_t>((r * 37) % vocab);
  const std::vector<float> flat(static_cast<size_t>(rows * vocab), 1234.5f);
  const double uniform = be->nll_sum(flat.data(), targets.data(), rows, vocab);
  EXPECT_NEAR(uniform, static_cast<double>(rows) * std::log(static_cast<double>(vocab)), 1e-10);
}

// h += x^T x accumulates (a second call adds the same exact integers again), writes both triangles with identical
// bits, and gives the same bits when rerun.
TEST(KernelsForward, HessianAccumulatesSymmetrically) {
  auto be = cpu();
  const int64_t rows = 150, k = 300;  // k crosses the backend's 256-wide tiles
  const auto x = small_integers(static_cast<size_t>(rows * k), -3, 3, 91);
  std::vector<float> once(static_cast<size_t>(k * k), 0.0f);
  be->hessian_accumulate(x.data(), rows, k, once.data());
  auto twice = once;
  be->hessian_accumulate(x.data(), rows, k, twice.data());
  expect_nontrivial(once, "hessian");
  for (size_t i = 0; i < once.size(); ++i) ASSERT_EQ(twice[i], 2.0f * once[i]) << "element " << i;

  const auto g = normal(static_cast<size_t>(rows * k), 1.0f, 93);
  std::vector<float> h(static_cast<size_t>(k * k), 0.0f), h2(h);
  be->hessian_accumulate(g.data(), rows, k, h.data());
  be->hessian_accumulate(g.data(), rows, k, h2.data());
  expect_identical(h2, h, "hessian rerun");
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < i; ++j)
      ASSERT_TRUE(bits_equal(h[static_cast<size_t>(i * k + j)], h[static_cast<size_t>(j * k + i)]))
          << "not symmetric at " << i << "," << j;
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
}  // namespace pipequant::test
