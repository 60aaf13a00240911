// The quantizer core: the quantization grid, packing, the Fallback names, and GPTQ end to end against the GPTQ
// reference code (IST-DASLab gptq, fasterquant + quant.py): its preparation transcribed here, its column loop the
// readable one in kernels/cpu/gptq_reference.hpp. The backend ops themselves (reverse Cholesky, gptq_block, ...)
// are checked row by row in tests/test_backend_ops.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "base/numeric.hpp"
#include "kernels/backend.hpp"
#include "kernels/cpu/gptq_reference.hpp"
#include "kernels/cpu/quant_grid.hpp"
#include "src/quant.hpp"
#include "tests/test_util.hpp"

namespace pipequant {
namespace {

using kernels::QuantGrid;
using test::correlated_hessian;
using test::low_rank_spd;
using test::normal;

std::unique_ptr<kernels::Backend> cpu() { return kernels::make_cpu_backend(0); }

// ---------------------------------------------------------------------------------------------------------
// The reference

struct RefResult {
  std::vector<int> q;      // codes [rows, cols], natural order
  std::vector<double> wq;  // dequantized [rows, cols]
};

// Table entry of one row (or group) from its min/max, as quant.py find_params does.
void set_entry(const float* x, int64_t n, QuantGrid grid, float& scale, float& zero) {
  const auto [lo, hi] = std::minmax_element(x, x + n);
  const kernels::ScaleZero p = kernels::params_from_range(*lo, *hi, grid);
  scale = p.scale;
  zero = p.zero;
}

// fasterquant(blocksize=128, percdamp, groupsize, actorder, static_groups): per-row parameters from the weights as
// given, dead columns zeroed, static groups from the dead-zeroed weights, act-order, damping, the factor in
// double; then the column loop, reference::gptq_columns.
RefResult ref_gptq(const std::vector<float>& w_in, const std::vector<float>& h_in, int64_t rows, int64_t cols,
                   const QuantConfig& cfg) {
  const QuantGrid grid{cfg.bits, cfg.sym};
  const int64_t gs = cfg.group_size;
  const int64_t groups = gs > 0 ? (cols + gs - 1) / gs : 1;
  std::vector<float> w = w_in, h = h_in;
  const auto at = [cols](int64_t r, int64_t c) { return static_cast<size_t>(r * cols + c); };
  std::vector<float> scales(static_cast<size_t>(rows * groups), 0.0f), zeros(scales);
  if (gs < 0)  // quantizer.find_params(W) runs before the dead columns are zeroed
    for (int64_t r = 0; r < rows; ++r)
      set_entry(&w[at(r, 0)], cols, grid, scales[static_cast<size_t>(r)], zeros[static_cast<size_t>(r)]);
  for (int64_t i = 0; i < cols; ++i)
    if (h[at(i, i)] == 0.0f) {
      h[at(i, i)] = 1.0f;
      for (int64_t r = 0; r < rows; ++r) w[at(r, i)] = 0.0f;
    }
  if (cfg.static_groups)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < groups; ++g)
        set_entry(&w[at(r, g * gs)], std::min(gs, cols - g * gs), grid, scales[static_cast<size_t>(r * groups + g)],
                  zeros[static_cast<size_t>(r * groups + g)]);

  std::vector<int64_t> perm(static_cast<size_t>(cols));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  if (cfg.act_order)
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return h[at(a, a)] > h[at(b, b)]; });
  std::vector<float> wp(w.size()), hp(h.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) wp[at(r, j)] = w[at(r, perm[static_cast<size_t>(j)])];
  for (int64_t a = 0; a < cols; ++a)
    for (int64_t b = 0; b < cols; ++b) hp[at(a, b)] = h[at(perm[static_cast<size_t>(a)], perm[static_cast<size_t>(b)])];
  double mean = 0.0;
  for (int64_t i = 0; i < cols; ++i) mean += hp[at(i, i)];
  mean /= static_cast<double>(cols);
  for (int64_t i = 0; i < cols; ++i) hp[at(i, i)] = static_cast<float>(hp[at(i, i)] + cfg.damp * mean);
  std::vector<double> r64;
  if (!kernels::reference::reverse_cholesky(hp.data(), cols, r64))
    throw std::runtime_error("reference: Cholesky failed");
  const std::vector<float> r(r64.begin(), r64.end());

  std::vector<int32_t> param_of(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j)
    param_of[static_cast<size_t>(j)] =
        static_cast<int32_t>(gs < 0 ? 0 : (cfg.static_groups ? perm[static_cast<size_t>(j)] : j) / gs);
  kernels::reference::GptqColumnsInput in;
  in.rows = rows;
  in.cols = cols;
  in.r = r.data();
  in.w = wp.data();
  in.scales = scales.data();
  in.zeros = zeros.data();
  in.groups = groups;
  in.param_of = param_of.data();
  in.dynamic_group_size = gs > 0 && !cfg.static_groups ? gs : 0;
  in.block = cfg.block_size;
  in.grid = grid;
  const kernels::reference::GptqColumnsResult loop = kernels::reference::gptq_columns(in);

  RefResult out;
  out.q.resize(loop.q.size());
  out.wq.resize(loop.deq.size());
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t j = 0; j < cols; ++j) {
      out.q[at(row, perm[static_cast<size_t>(j)])] = loop.q[at(row, j)];
      out.wq[at(row, perm[static_cast<size_t>(j)])] = loop.deq[at(row, j)];
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
// (a) quantization grid, exact on power-of-two friendly inputs

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
// (b) packing

TEST(QuantizedLinearBytes, EveryFieldSurvivesTheRoundTrip) {
  QuantizedLinear q;
  q.rows = 2;
  q.cols = 3;
  q.groups = 2;
  q.bits = 3;
  q.q = {0, 1, 2, 3, 4, 7};
  q.scales = {0.5f, 0.25f, 1.5f, 2.0f};
  q.zeros = {3.0f, 4.0f, 1.0f, 0.0f};
  q.g_idx = {0, 0, 1};
  q.damp_used = 0.1;
  q.fallback = Fallback::kDamp;
  q.relative_error = 0.0125;
  q.error2 = 3.5;
  q.solve_seconds = 0.75;
  q.log = {"damping raised to 0.1", ""};
  const QuantizedLinear r = QuantizedLinear::from_bytes(q.to_bytes());
  EXPECT_EQ(r.rows, q.rows);
  EXPECT_EQ(r.cols, q.cols);
  EXPECT_EQ(r.groups, q.groups);
  EXPECT_EQ(r.bits, q.bits);
  EXPECT_EQ(r.q, q.q);
  EXPECT_EQ(r.scales, q.scales);
  EXPECT_EQ(r.zeros, q.zeros);
  EXPECT_EQ(r.g_idx, q.g_idx);
  EXPECT_EQ(r.damp_used, q.damp_used);
  EXPECT_EQ(r.fallback, q.fallback);
  EXPECT_EQ(r.relative_error, q.relative_error);
  EXPECT_EQ(r.error2, q.error2);
  EXPECT_EQ(r.solve_seconds, q.solve_seconds);
  EXPECT_EQ(r.log, q.log);
}

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
    std::vector<uint8_t> codes_nk(codes.size());  // the same codes as [n][k]
    for (int64_t i = 0; i < k; ++i)
      for (int64_t c = 0; c < n; ++c) codes_nk[static_cast<size_t>(c * k + i)] = codes[static_cast<size_t>(i * n + c)];
    EXPECT_EQ(pack_columns_of_rows(codes_nk.data(), k, n, bits), cw);
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
    ql.fallback = Fallback::kDamp;
    ql.damp_used = 0.1;
    QuantConfig cfg;
    cfg.bits = bits;
    cfg.group_size = 32;
    const io::PackedLinear p = pack(ql, "mlp.up_proj", cfg);
    EXPECT_EQ(static_cast<int64_t>(p.qweight.size()), (k * bits + 31) / 32 * n);
    EXPECT_EQ(static_cast<int64_t>(p.qzeros.size()), ql.groups * ((n * bits + 31) / 32));
    EXPECT_EQ(p.in_features, k);
    EXPECT_EQ(p.out_features, n);
    EXPECT_EQ(p.fallback, "damp");  // the word the HDF5 output holds
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
  p.g_idx[5] = 0;
  p.fallback = "sometimes";  // not a fallback pipequant writes
  EXPECT_THROW(unpack(p), UserError);
}

TEST(Fallback, NamesAreTheWordsOfTheOutput) {
  EXPECT_STREQ(name(Fallback::kNone), "none");
  EXPECT_STREQ(name(Fallback::kDamp), "damp");
  EXPECT_STREQ(name(Fallback::kRtn), "rtn");
  EXPECT_STREQ(name(Fallback::kCpu), "cpu");
  for (const Fallback f : {Fallback::kNone, Fallback::kDamp, Fallback::kRtn, Fallback::kCpu})
    EXPECT_EQ(fallback_from_name(name(f), "layer"), f);
  try {
    fallback_from_name("gpu", "packed linear mlp.up_proj");
    ADD_FAILURE() << "an unknown fallback word must be a UserError";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("packed linear mlp.up_proj: fallback 'gpu'"), std::string::npos) << e.what();
  }
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
// (c) GPTQ against the reference, and against round-to-nearest

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
    w_ = new std::vector<float>(normal(static_cast<size_t>(kRows * kCols), 0.05f, 21));
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
  EXPECT_EQ(ql.fallback, Fallback::kNone);
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
// (d) dead columns

TEST(Gptq, DeadColumnQuantizesToTheZeroPoint) {
  const int64_t rows = 24, cols = 96, dead = 37;
  const auto w = normal(static_cast<size_t>(rows * cols), 0.05f, 31);
  const auto h = correlated_hessian(600, cols, 32, dead);
  ASSERT_EQ(h[static_cast<size_t>(dead * cols + dead)], 0.0f);
  auto backend = cpu();
  for (bool act : {false, true}) {
    SCOPED_TRACE(act ? "act-order" : "natural order");
    QuantConfig cfg;
    cfg.group_size = 32;
    cfg.act_order = act;
    const QuantizedLinear ql = gptq_quantize(*backend, w.data(), rows, cols, h.data(), cfg, "dead");
    EXPECT_EQ(ql.fallback, Fallback::kNone);
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
// (e) the Hessian fallback chain

bool log_mentions(const QuantizedLinear& ql, const std::string& text) {
  return std::any_of(ql.log.begin(), ql.log.end(),
                     [&](const std::string& l) { return l.find(text) != std::string::npos; });
}

TEST(Gptq, NonFiniteHessianFallsBackToRtn) {
  const int64_t rows = 16, cols = 64;
  const auto w = normal(static_cast<size_t>(rows * cols), 0.05f, 41);
  auto h = low_rank_spd(cols, 16, 42);
  h[static_cast<size_t>(5 * cols + 9)] = std::nanf("");
  auto backend = cpu();
  const QuantizedLinear ql = gptq_quantize(*backend, w.data(), rows, cols, h.data(), QuantConfig{}, "layers.0.q");
  EXPECT_EQ(ql.fallback, Fallback::kRtn);
  ASSERT_FALSE(ql.log.empty());
  EXPECT_TRUE(log_mentions(ql, "layers.0.q"));
  EXPECT_TRUE(log_mentions(ql, "round-to-nearest"));
  const QuantizedLinear rtn = rtn_quantize(*backend, w.data(), rows, cols, nullptr, QuantConfig{});
  EXPECT_EQ(ql.q, rtn.q);
}

TEST(Gptq, NegativeDefiniteHessianExhaustsRetriesThenRtn) {
  const int64_t rows = 16, cols = 64;
  const auto w = normal(static_cast<size_t>(rows * cols), 0.05f, 43);
  auto h = low_rank_spd(cols, 16, 44);
  for (auto& v : h) v = -v;  // damping adds a negative multiple of the identity: never helps
  auto backend = cpu();
  QuantConfig cfg;
  cfg.damp_retries = 3;
  const QuantizedLinear ql = gptq_quantize(*backend, w.data(), rows, cols, h.data(), cfg, "layers.1.down");
  EXPECT_EQ(ql.fallback, Fallback::kRtn);
  EXPECT_EQ(ql.log.size(), 4u);  // three retries, then the fallback
  EXPECT_TRUE(log_mentions(ql, "layers.1.down: Cholesky failed with damp 0.01, retrying with 0.1"));
  EXPECT_TRUE(log_mentions(ql, "falling back to round-to-nearest"));
  EXPECT_EQ(ql.q, rtn_quantize(*backend, w.data(), rows, cols, nullptr, cfg).q);
}

// H = Q diag(lambda) Q^T with eigenvalues in [0.5, 1.5] except one at -0.004: damping 1e-3 * mean(diag) (about
// 1e-3) leaves it negative, 1e-2 makes it positive, so exactly one retry.
std::vector<float> slightly_indefinite_hessian(int64_t cols) {
  const auto a = normal(static_cast<size_t>(cols * cols), 1.0f, 51);
  std::vector<double> qm(a.begin(), a.end());
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
  return h;
}

TEST(Gptq, SlightlyIndefiniteHessianNeedsMoreDamping) {
  const int64_t rows = 16, cols = 64;
  const auto h = slightly_indefinite_hessian(cols);
  const auto w = normal(static_cast<size_t>(rows * cols), 0.05f, 52);
  auto backend = cpu();
  QuantConfig cfg;
  cfg.damp = 1e-3;
  const QuantizedLinear ql = gptq_quantize(*backend, w.data(), rows, cols, h.data(), cfg, "layers.2.o");
  EXPECT_EQ(ql.fallback, Fallback::kDamp);
  EXPECT_NEAR(ql.damp_used, 1e-2, 1e-12);
  ASSERT_EQ(ql.log.size(), 1u);
  EXPECT_EQ(ql.log[0], "layers.2.o: Cholesky failed with damp 0.001, retrying with 0.01");
  EXPECT_TRUE(std::isfinite(ql.relative_error));
}

TEST(Gptq, NonFiniteWeightsAreRejected) {
  const int64_t rows = 4, cols = 32;
  auto w = normal(static_cast<size_t>(rows * cols), 0.05f, 45);
  w[static_cast<size_t>(2 * cols + 7)] = std::numeric_limits<float>::infinity();
  const auto h = low_rank_spd(cols, 8, 46);
  auto backend = cpu();
  EXPECT_THROW(gptq_quantize(*backend, w.data(), rows, cols, h.data(), QuantConfig{}), UserError);
  EXPECT_THROW(rtn_quantize(*backend, w.data(), rows, cols, h.data(), QuantConfig{}), UserError);
}

// ---------------------------------------------------------------------------------------------------------
// (f) determinism

TEST(Gptq, BitIdenticalAcrossRunsAndThreadCounts) {
  // large enough that OpenBLAS and the column loop really split the work between threads
  const int64_t rows = 200, cols = 1100;
  const auto w = normal(static_cast<size_t>(rows * cols), 0.05f, 61);
  const auto h = low_rank_spd(cols, 48, 62);
  QuantConfig cfg;
  cfg.act_order = true;
  cfg.group_size = 128;
  auto run = [&](int threads) {
    auto backend = kernels::make_cpu_backend(threads);  // sets the OpenMP thread count
    return gptq_quantize(*backend, w.data(), rows, cols, h.data(), cfg, "det");
  };
  const QuantizedLinear a = run(2);
  const QuantizedLinear b = run(2);
  const QuantizedLinear c = run(1);
  const QuantizedLinear d = run(1);
  // every BLAS call runs on one thread over a tile grid fixed by the shapes: the factor, the lazy updates and the
  // error's GEMM have the same bits for 1 and 2 threads, and so does the relative error
  for (const QuantizedLinear* x : {&b, &c, &d}) {
    EXPECT_EQ(x->relative_error, a.relative_error);
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
  const auto w = normal(static_cast<size_t>(rows * cols), 0.05f, 61);
  const auto h = correlated_hessian(1000, cols, 62);
  QuantConfig cfg;
  cfg.group_size = 64;
  auto unbounded = cpu();
  const QuantizedLinear want = gptq_quantize(*unbounded, w.data(), rows, cols, h.data(), cfg, "layers.2.up");
  ASSERT_EQ(want.fallback, Fallback::kNone);

  const size_t budget = sizeof(float) * static_cast<size_t>(cols * cols);  // less than H and R together
  auto bounded = kernels::make_cpu_backend(0, budget);
  EXPECT_EQ(bounded->budget_bytes(), budget);
  // without a fallback the solve tries the bounded backend and its allocator refuses
  EXPECT_THROW(gptq_quantize(*bounded, w.data(), rows, cols, h.data(), cfg, "layers.2.up"), UserError);
  EXPECT_EQ(bounded->live_bytes(), 0u);
  bounded->set_host_fallback(kernels::make_cpu_backend(0));
  bounded->reset_peak();
  const QuantizedLinear got = gptq_quantize(*bounded, w.data(), rows, cols, h.data(), cfg, "layers.2.up");
  EXPECT_EQ(got.fallback, Fallback::kCpu);
  ASSERT_FALSE(got.log.empty());
  EXPECT_TRUE(log_mentions(got, "layers.2.up: the solve needs"));
  EXPECT_TRUE(log_mentions(got, "solved on the cpu"));
  EXPECT_EQ(bounded->peak_bytes(), 0u) << "nothing of the solve was allocated on the bounded backend";
  // the solve's working matrices (w, wc, res) went there; R is made in H's own memory on a host backend
  EXPECT_GT(bounded->host_fallback()->peak_bytes(), 3 * sizeof(float) * static_cast<size_t>(rows * cols));
  EXPECT_EQ(got.q, want.q);
  EXPECT_EQ(got.scales, want.scales);
  EXPECT_EQ(got.zeros, want.zeros);
  EXPECT_EQ(got.relative_error, want.relative_error);
  // RTN (the baseline beside every GPTQ layer) moves the same way, silently
  const QuantizedLinear rtn = rtn_quantize(*bounded, w.data(), rows, cols, h.data(), cfg);
  EXPECT_EQ(rtn.fallback, Fallback::kNone);
  EXPECT_EQ(rtn.q, rtn_quantize(*unbounded, w.data(), rows, cols, h.data(), cfg).q);

  // a budget with room for the solve keeps it where it is
  auto roomy = kernels::make_cpu_backend(0, size_t{64} << 20);
  roomy->set_host_fallback(kernels::make_cpu_backend(0));
  const QuantizedLinear stay = gptq_quantize(*roomy, w.data(), rows, cols, h.data(), cfg, "layers.2.up");
  EXPECT_EQ(stay.fallback, Fallback::kNone);
  EXPECT_TRUE(stay.log.empty());
  EXPECT_GT(roomy->peak_bytes(), sizeof(float) * static_cast<size_t>(cols * cols));
  EXPECT_EQ(roomy->host_fallback()->peak_bytes(), 0u);
  EXPECT_EQ(stay.q, want.q);
}

TEST(GptqFallback, ThePlacementCountsWhatTheSolveHoldsAtItsPeak) {
  const int64_t rows = 48, cols = 192;
  const auto w = normal(static_cast<size_t>(rows * cols), 0.05f, 71);
  const auto h = correlated_hessian(800, cols, 72);
  for (const int64_t group : {int64_t{-1}, int64_t{32}}) {
    QuantConfig cfg;
    cfg.group_size = group;
    cfg.block_size = 64;
    auto probe = kernels::make_cpu_backend(0, size_t{1} << 30);
    const size_t need = gptq_solve_bytes(*probe, rows, cols, cfg);
    // a budget of exactly that keeps the solve on the backend, and what it holds at its peak stays within it
    auto exact = kernels::make_cpu_backend(0, need);
    exact->set_host_fallback(kernels::make_cpu_backend(0));
    const QuantizedLinear stay = gptq_quantize(*exact, w.data(), rows, cols, h.data(), cfg, "layers.0.q");
    EXPECT_EQ(stay.fallback, Fallback::kNone) << "group " << group;
    EXPECT_GT(exact->peak_bytes(), 0u);
    EXPECT_LE(exact->peak_bytes(), need) << "group " << group;
    // one byte less and the solve goes to the host fallback, with the same codes
    auto short_by_one = kernels::make_cpu_backend(0, need - 1);
    short_by_one->set_host_fallback(kernels::make_cpu_backend(0));
    const QuantizedLinear moved = gptq_quantize(*short_by_one, w.data(), rows, cols, h.data(), cfg, "layers.0.q");
    EXPECT_EQ(moved.fallback, Fallback::kCpu) << "group " << group;
    EXPECT_EQ(short_by_one->peak_bytes(), 0u);
    EXPECT_EQ(moved.q, stay.q);
  }
  // dynamic groups add the column loop's scratch (a span of block_size + group_size columns, double and float)
  QuantConfig per_row, grouped;
  per_row.block_size = grouped.block_size = 64;
  per_row.group_size = -1;
  grouped.group_size = 32;
  auto cpu_backend = kernels::make_cpu_backend(0);
  const size_t groups_tables = sizeof(float) * 2 * rows * (cols / 32 - 1);  // 6 groups instead of 1, two tables
  EXPECT_EQ(gptq_solve_bytes(*cpu_backend, rows, cols, grouped) - gptq_solve_bytes(*cpu_backend, rows, cols, per_row),
            groups_tables + 12 * 96 * 96);
}

// ---------------------------------------------------------------------------------------------------------
// (g) one factor per linear group: the linears that share a Hessian share its factor

void expect_same_linear(const QuantizedLinear& got, const QuantizedLinear& want) {
  EXPECT_EQ(got.rows, want.rows);
  EXPECT_EQ(got.cols, want.cols);
  EXPECT_EQ(got.groups, want.groups);
  EXPECT_EQ(got.bits, want.bits);
  EXPECT_EQ(got.q, want.q);
  EXPECT_EQ(got.scales, want.scales);
  EXPECT_EQ(got.zeros, want.zeros);
  EXPECT_EQ(got.g_idx, want.g_idx);
  EXPECT_EQ(got.damp_used, want.damp_used);
  EXPECT_EQ(got.fallback, want.fallback);
  EXPECT_EQ(got.log, want.log);
}

// The rows of w [rows, cols] for the baseline terms.
FillRows rows_of(const std::vector<float>& w, int64_t cols) {
  return [&w, cols](int64_t r0, int64_t r1, float* dst) {
    std::copy(w.begin() + r0 * cols, w.begin() + r1 * cols, dst);
  };
}

// A shared-factor solve's error from its own accounting, over tr(W H W^T), against the error gptq_quantize
// measures directly on H: the same quantity up to fp32 rounding in the solve.
void expect_accounted_error(kernels::Backend& backend, const QuantizedLinear& got, const QuantizedLinear& want,
                            const std::vector<float>& w, const std::vector<float>& h, const QuantConfig& cfg) {
  const BaselineTerms t = baseline_terms(backend, rows_of(w, got.cols), got.rows, got.cols, h.data(), cfg);
  ASSERT_GT(t.weight2, 0.0);
  EXPECT_NEAR(got.error2 / t.weight2, want.relative_error, 2e-4 * want.relative_error)
      << "accounted " << got.error2 / t.weight2 << ", measured " << want.relative_error;
}

enum class SharedHessian { kDeadColumn, kSlightlyIndefinite, kNegativeDefinite, kNonFinite };

// One row: a Hessian, the settings, and the fallback the group takes.
struct SharedCase {
  const char* name;
  SharedHessian hessian;
  int64_t group_size;
  bool act_order;
  bool static_groups;
  double damp;
  Fallback fallback;
};

const SharedCase kSharedCases[] = {
    {"natural", SharedHessian::kDeadColumn, 32, false, false, 0.01, Fallback::kNone},
    {"static", SharedHessian::kDeadColumn, 32, false, true, 0.01, Fallback::kNone},
    {"act", SharedHessian::kDeadColumn, 32, true, false, 0.01, Fallback::kNone},
    {"act_static", SharedHessian::kDeadColumn, 32, true, true, 0.01, Fallback::kNone},
    {"perrow_act", SharedHessian::kDeadColumn, -1, true, false, 0.01, Fallback::kNone},
    {"damp_retry_act", SharedHessian::kSlightlyIndefinite, 16, true, false, 1e-3, Fallback::kDamp},
    {"rtn_after_retries", SharedHessian::kNegativeDefinite, 32, true, true, 0.01, Fallback::kRtn},
    {"rtn_non_finite", SharedHessian::kNonFinite, 32, false, false, 0.01, Fallback::kRtn},
};

class SharedFactor : public testing::TestWithParam<SharedCase> {
 protected:
  static constexpr int64_t kCols = 64;
  static constexpr int64_t kDead = 37;  // an input never active in kDeadColumn's calibration data
  static std::vector<float> hessian(SharedHessian kind) {
    switch (kind) {
      case SharedHessian::kDeadColumn:
        return correlated_hessian(600, kCols, 71, kDead);
      case SharedHessian::kSlightlyIndefinite:
        return slightly_indefinite_hessian(kCols);
      case SharedHessian::kNegativeDefinite: {
        auto h = low_rank_spd(kCols, 16, 72);
        for (auto& v : h) v = -v;
        return h;
      }
      case SharedHessian::kNonFinite: {
        auto h = low_rank_spd(kCols, 16, 73);
        h[static_cast<size_t>(5 * kCols + 9)] = std::nanf("");
        return h;
      }
    }
    return {};
  }
};

TEST_P(SharedFactor, EachSolveEqualsGptqQuantizeOfItsLinear) {
  const SharedCase c = GetParam();
  QuantConfig cfg;
  cfg.group_size = c.group_size;
  cfg.act_order = c.act_order;
  cfg.static_groups = c.static_groups;
  cfg.damp = c.damp;
  cfg.damp_retries = 3;
  const auto h = hessian(c.hessian);
  // two linears of one group, q- and k-like: different weights and row counts, one Hessian
  const int64_t rows_q = 48, rows_k = 16;
  const auto wq = normal(static_cast<size_t>(rows_q * kCols), 0.05f, 74);
  const auto wk = normal(static_cast<size_t>(rows_k * kCols), 0.05f, 75);
  auto backend = cpu();

  const GptqFactor factor = factor_hessian(*backend, h, kCols, rows_q, cfg);
  EXPECT_EQ(factor.fallback, c.fallback);
  EXPECT_EQ(factor.backend, backend.get());
  EXPECT_EQ(factor.has_r(), c.fallback != Fallback::kRtn) << "R is held exactly when GPTQ can run";
  const QuantizedLinear q = gptq_solve(factor, wq.data(), rows_q, "layers.0.self_attn.q_proj");
  const QuantizedLinear k = gptq_solve(factor, wk.data(), rows_k, "layers.0.self_attn.k_proj");
  const QuantizedLinear want_q =
      gptq_quantize(*backend, wq.data(), rows_q, kCols, h.data(), cfg, "layers.0.self_attn.q_proj");
  const QuantizedLinear want_k =
      gptq_quantize(*backend, wk.data(), rows_k, kCols, h.data(), cfg, "layers.0.self_attn.k_proj");
  {
    SCOPED_TRACE("q_proj");
    expect_same_linear(q, want_q);
    if (c.fallback != Fallback::kRtn) expect_accounted_error(*backend, q, want_q, wq, h, cfg);
  }
  {
    SCOPED_TRACE("k_proj");
    expect_same_linear(k, want_k);
    if (c.fallback != Fallback::kRtn) expect_accounted_error(*backend, k, want_k, wk, h, cfg);
  }
  // non-trivial: the two linears differ, and each result is a real quantization
  EXPECT_EQ(q.fallback, c.fallback);
  EXPECT_NE(std::vector<uint8_t>(q.q.begin(), q.q.begin() + rows_k * kCols), k.q);
  for (const QuantizedLinear* x : {&q, &k}) {
    if (c.fallback != Fallback::kRtn) {
      EXPECT_GT(x->error2, 0.0);
    }
    EXPECT_TRUE(all_finite(x->dequantize()));
  }
  // the group's fallback lines appear in each linear's log, under its own name
  EXPECT_EQ(q.log.size(), factor.log.size());
  EXPECT_EQ(k.log.size(), factor.log.size());
  for (size_t i = 0; i < factor.log.size(); ++i) {
    EXPECT_EQ(q.log[i], "layers.0.self_attn.q_proj: " + factor.log[i]);
    EXPECT_EQ(k.log[i], "layers.0.self_attn.k_proj: " + factor.log[i]);
  }
  if (c.fallback == Fallback::kNone) {
    EXPECT_TRUE(factor.log.empty());
  }
  if (c.fallback == Fallback::kDamp) {
    EXPECT_NEAR(q.damp_used, 1e-2, 1e-12);
    ASSERT_EQ(k.log.size(), 1u);
    EXPECT_EQ(k.log[0], "layers.0.self_attn.k_proj: Cholesky failed with damp 0.001, retrying with 0.01");
  }
  if (c.fallback == Fallback::kRtn) {
    EXPECT_TRUE(log_mentions(k, "layers.0.self_attn.k_proj"));
    EXPECT_TRUE(log_mentions(k, "round-to-nearest"));
    EXPECT_EQ(k.q, rtn_quantize(*backend, wk.data(), rows_k, kCols, nullptr, cfg).q);
  }
  if (c.hessian == SharedHessian::kDeadColumn) {  // W's dead column is zeroed per linear: its codes are the zeros
    for (const QuantizedLinear* x : {&q, &k}) {
      const int64_t g = x->g_idx[static_cast<size_t>(kDead)];
      for (int64_t r = 0; r < x->rows; ++r) {
        EXPECT_EQ(static_cast<float>(x->q[static_cast<size_t>(r * kCols + kDead)]),
                  x->zeros[static_cast<size_t>(g * x->rows + r)]);
      }
    }
  }
}

std::string shared_case_name(const testing::TestParamInfo<SharedCase>& info) { return info.param.name; }

INSTANTIATE_TEST_SUITE_P(Cases, SharedFactor, testing::ValuesIn(kSharedCases), shared_case_name);

TEST(FactorHessian, SolveChecksItsInputsAgainstTheFactor) {
  const int64_t rows = 16, cols = 64;
  const auto h = low_rank_spd(cols, 16, 81);
  const auto w = normal(static_cast<size_t>((rows + 1) * cols), 0.05f, 82);
  auto backend = cpu();
  const GptqFactor factor = factor_hessian(*backend, h, cols, rows, QuantConfig{});
  EXPECT_THROW(gptq_solve(factor, w.data(), rows + 1, "big"), UserError) << "more rows than placed for";
  EXPECT_THROW(factor_hessian(*backend, h, cols, 0, QuantConfig{}), UserError);
  EXPECT_THROW(factor_hessian(*backend, std::vector<float>(h.begin(), h.end() - 1), cols, rows, QuantConfig{}),
               UserError)
      << "a Hessian of another width";
  EXPECT_NO_THROW(gptq_solve(factor, w.data(), rows, "fits"));
}

TEST(BaselineTerms, FromInputsEqualFromTheirHessian) {
  // H = scale * X^T X, so tr(W H W^T) and RTN's tr(D H D^T) come out the same from X (4 T N K) as from H (4 N K^2),
  // and they add up over token ranges
  const int64_t tokens = 40, rows = 24, cols = 96;
  const auto x = normal(static_cast<size_t>(tokens * cols), 1.0f, 101);
  const auto w = normal(static_cast<size_t>(rows * cols), 0.05f, 102);
  const double scale = 2.0 / static_cast<double>(tokens);
  std::vector<float> h(static_cast<size_t>(cols * cols));
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      double v = 0.0;
      for (int64_t t = 0; t < tokens; ++t) v += static_cast<double>(x[static_cast<size_t>(t * cols + i)]) * x[static_cast<size_t>(t * cols + j)];
      h[static_cast<size_t>(i * cols + j)] = static_cast<float>(scale * v);
    }
  QuantConfig cfg;
  cfg.bits = 3;
  cfg.group_size = 32;
  auto backend = cpu();
  const BaselineTerms from_h = baseline_terms(*backend, rows_of(w, cols), rows, cols, h.data(), cfg);
  BaselineTerms from_x = baseline_terms_from_inputs(*backend, x.data(), 15, rows_of(w, cols), rows, cols, scale, cfg);
  from_x +=
      baseline_terms_from_inputs(*backend, x.data() + 15 * cols, tokens - 15, rows_of(w, cols), rows, cols, scale, cfg);
  EXPECT_NEAR(from_x.weight2, from_h.weight2, 1e-5 * from_h.weight2);
  EXPECT_NEAR(from_x.rtn_error2, from_h.rtn_error2, 1e-5 * from_h.rtn_error2);
  const QuantizedLinear rtn = rtn_quantize(*backend, w.data(), rows, cols, h.data(), cfg);
  EXPECT_NEAR(from_h.rtn_error2 / from_h.weight2, rtn.relative_error, 1e-9 * rtn.relative_error);
  EXPECT_GT(from_h.rtn_error2, 0.0);
}

TEST(FactorHessian, InPlaceRetriesRebuildTheHessianFromItsLowerTriangle) {
  // an H whose Cholesky fails with little damping: the retries in H's own memory give the same R (hence codes)
  // as the device path, which rebuilds the damped H from a separate copy on every try
  const int64_t rows = 16, cols = 64;
  // indefinite: rank 32 of 64 with its ridge (0.1) taken off and 0.003 more, so the null space has eigenvalue
  // -0.003 (diag mean about 1): damping of 1e-3 and less fails, 1e-2 works
  auto h = low_rank_spd(cols, 32, 111);
  for (int64_t i = 0; i < cols; ++i) h[static_cast<size_t>(i * cols + i)] -= 0.103f;
  const auto w = normal(static_cast<size_t>(rows * cols), 0.05f, 112);
  QuantConfig cfg;
  cfg.damp = 1e-7;
  cfg.damp_retries = 6;
  cfg.act_order = true;
  auto backend = cpu();
  const GptqFactor f = factor_hessian(*backend, h, cols, rows, cfg);
  ASSERT_EQ(f.fallback, Fallback::kDamp) << "the case needs at least one retry";
  EXPECT_GT(f.damp_used, cfg.damp);
  // the readable path: a fresh factor made with the damping that worked, no retries
  QuantConfig direct = cfg;
  direct.damp = f.damp_used;
  direct.damp_retries = 0;
  const GptqFactor g = factor_hessian(*backend, h, cols, rows, direct);
  ASSERT_EQ(g.fallback, Fallback::kNone);
  EXPECT_EQ(f.r_host, g.r_host);
  EXPECT_EQ(gptq_solve(f, w.data(), rows, "a").q, gptq_solve(g, w.data(), rows, "b").q);
}

TEST(FactorHessian, PlacementCountsTheFactorHeldThroughEveryErrorCheck) {
  // budgets from "R alone" to "everything at once": wherever factor_hessian puts the factor, the solves that
  // follow while it is held never exceed the budget, and give the unbounded backend's results
  const int64_t rows_q = 32, rows_k = 8, cols = 256;
  const auto wq = normal(static_cast<size_t>(rows_q * cols), 0.05f, 91);
  const auto wk = normal(static_cast<size_t>(rows_k * cols), 0.05f, 92);
  const auto h = correlated_hessian(1000, cols, 93);
  QuantConfig cfg;
  cfg.group_size = 64;
  auto unbounded = cpu();
  const QuantizedLinear want_q = gptq_quantize(*unbounded, wq.data(), rows_q, cols, h.data(), cfg, "q");
  const QuantizedLinear want_k = gptq_quantize(*unbounded, wk.data(), rows_k, cols, h.data(), cfg, "k");
  const size_t r_bytes = sizeof(float) * static_cast<size_t>(cols * cols);
  int stayed = 0, moved = 0;
  for (size_t budget = r_bytes; budget <= 4 * r_bytes; budget += r_bytes / 8) {
    SCOPED_TRACE("budget " + std::to_string(budget));
    auto bounded = kernels::make_cpu_backend(0, budget);
    bounded->set_host_fallback(kernels::make_cpu_backend(0));
    const GptqFactor factor = factor_hessian(*bounded, h, cols, rows_q, cfg);
    const bool on_host = factor.backend == bounded->host_fallback();
    EXPECT_EQ(factor.fallback, on_host ? Fallback::kCpu : Fallback::kNone);
    (on_host ? moved : stayed) += 1;
    QuantizedLinear q, k;
    ASSERT_NO_THROW(q = gptq_solve(factor, wq.data(), rows_q, "q"));
    ASSERT_NO_THROW(k = gptq_solve(factor, wk.data(), rows_k, "k"));
    EXPECT_EQ(q.fallback, factor.fallback);
    if (on_host) {
      EXPECT_TRUE(log_mentions(k, "k: the solve needs"));
    }
    EXPECT_EQ(q.q, want_q.q);
    EXPECT_EQ(k.q, want_k.q);
    EXPECT_EQ(q.scales, want_q.scales);
    EXPECT_EQ(k.error2, want_k.error2);
    EXPECT_EQ(bounded->peak_bytes() > 0, !on_host);
  }
  EXPECT_GT(stayed, 0);
  EXPECT_GT(moved, 0);
}

}  // namespace
}  // namespace pipequant
