// The table of backend operations (see backend_ops.hpp): one OpCase per op with its plain reference, the rows,
// the comparison and the benchmark.
#include "tests/backend_ops.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <sstream>

#include "base/error.hpp"
#include "base/numeric.hpp"
#include "kernels/cpu/gptq_reference.hpp"
#include "kernels/cpu/quant_grid.hpp"
#include "tests/test_util.hpp"

namespace pipequant::test {

namespace {

using kernels::Backend;
using kernels::Buffer;
using kernels::HalfFormat;
using kernels::QuantGrid;
using kernels::Trans;

// fp32's unit roundoff: a sum of n terms in fp32, in any order, is within n * kUnitRoundoff * sum |terms| of the
// exact sum (Higham, gamma_n).
inline constexpr double kUnitRoundoff = 0x1p-24;

inline constexpr Tolerance kExact{0.0, 0.0, 1.0, "exact"};

template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

template <typename T>
std::vector<double> as_double(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

template <typename T>
Outputs one_output(const std::string& name, const std::vector<T>& v) {
  return {Output{name, as_double(v), {}, {}}};
}

char trans_letter(Trans t) { return t == Trans::kYes ? 'T' : 'N'; }

// --- dense linear algebra --------------------------------------------------------------------------------------------

// C = alpha op(A) op(B) + beta C with leading dimensions wider than the stored widths: the padding must stay as it
// was. Small integers with power-of-two alpha and beta make every partial sum exact in fp32.
class GemmCase final : public OpCase {
 public:
  GemmCase(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, bool integers)
      : ta_(ta), tb_(tb), m_(m), n_(n), k_(k), integers_(integers) {}
  std::string op() const override { return "gemm"; }
  std::string vars() const override {
    return cat("m=", m_, ",n=", n_, ",k=", k_, ",ta=", trans_letter(ta_), ",tb=", trans_letter(tb_),
               ",data=", integers_ ? "int" : "normal");
  }
  void init() override {
    lda_ = (ta_ == Trans::kNo ? k_ : m_) + 5;
    ldb_ = (tb_ == Trans::kNo ? n_ : k_) + 3;
    ldc_ = n_ + 7;
    const auto a_size = static_cast<size_t>((ta_ == Trans::kNo ? m_ : k_) * lda_);
    const auto b_size = static_cast<size_t>((tb_ == Trans::kNo ? k_ : n_) * ldb_);
    const auto c_size = static_cast<size_t>(m_ * ldc_);
    a_ = integers_ ? small_integers(a_size, -4, 4, 11) : normal(a_size, 1.0f, 21);
    b_ = integers_ ? small_integers(b_size, -4, 4, 12) : normal(b_size, 1.0f, 22);
    c0_ = integers_ ? small_integers(c_size, -8, 8, 13) : normal(c_size, 1.0f, 23);
  }
  Outputs reference() const override {
    std::vector<double> c = as_double(c0_), magnitude(c.size(), 0.0);
    for (int64_t i = 0; i < m_; ++i)
      for (int64_t j = 0; j < n_; ++j) {
        double sum = 0.0, abs_sum = 0.0;
        for (int64_t p = 0; p < k_; ++p) {
          const double a =
              ta_ == Trans::kYes ? a_[static_cast<size_t>(p * lda_ + i)] : a_[static_cast<size_t>(i * lda_ + p)];
          const double b =
              tb_ == Trans::kYes ? b_[static_cast<size_t>(j * ldb_ + p)] : b_[static_cast<size_t>(p * ldb_ + j)];
          sum += a * b;
          abs_sum += std::fabs(a * b);
        }
        const size_t at = static_cast<size_t>(i * ldc_ + j);
        magnitude[at] = std::fabs(kAlpha) * abs_sum + std::fabs(kBeta * c[at]);
        c[at] = kAlpha * sum + kBeta * c[at];
      }
    const Tolerance rounded{0.0, static_cast<double>(k_ + 2) * kUnitRoundoff, 1.0,
                            "fp32 sums of k products and the beta term: <= (k + 2) 2^-24 sum |terms| in any order"};
    return {Output{"c", c, integers_ ? kExact : rounded, magnitude}};
  }
  void setup(Backend& be) override {
    a_dev_ = to_backend(be, a_);
    b_dev_ = to_backend(be, b_);
    c_dev_ = to_backend(be, c0_);
  }
  void run(Backend& be) override {
    be.gemm(ta_, tb_, m_, n_, k_, kAlpha, a_dev_.data(), lda_, b_dev_.data(), ldb_, kBeta, c_dev_.data(), ldc_);
  }
  Outputs outputs(Backend& be) override { return one_output("c", to_host(be, c_dev_)); }
  bool overwrites_inputs() const override { return true; }
  Work work() const override { return {2.0 * static_cast<double>(m_ * n_ * k_), true, "2*m*n*k flops"}; }

 private:
  static constexpr float kAlpha = 0.5f;
  static constexpr float kBeta = -0.25f;
  Trans ta_, tb_;
  int64_t m_, n_, k_, lda_ = 0, ldb_ = 0, ldc_ = 0;
  bool integers_;
  std::vector<float> a_, b_, c0_;
  Buffer<float> a_dev_, b_dev_, c_dev_;
};

// y = x w^T with w in bf16/fp16 and x rounded to the same format; products exact in fp32, sums in fp32.
class LinearHalfCase final : public OpCase {
 public:
  LinearHalfCase(HalfFormat format, int64_t m, int64_t n, int64_t k, bool integers)
      : format_(format), m_(m), n_(n), k_(k), integers_(integers) {}
  std::string op() const override { return "linear_half"; }
  std::string vars() const override {
    return cat("m=", m_, ",n=", n_, ",k=", k_, ",dtype=", bf16() ? "bf16" : "f16",
               ",data=", integers_ ? "int" : "normal");
  }
  void init() override {
    x_ = integers_ ? small_integers(static_cast<size_t>(m_ * k_), -8, 8, 61)
                   : normal(static_cast<size_t>(m_ * k_), 1.0f, 31);
    const auto wf = integers_ ? small_integers(static_cast<size_t>(n_ * k_), -8, 8, 62)
                              : normal(static_cast<size_t>(n_ * k_), 0.05f, 32);
    w_.resize(wf.size());
    for (size_t i = 0; i < w_.size(); ++i) w_[i] = bf16() ? float_to_bf16(wf[i]) : float_to_fp16(wf[i]);
  }
  Outputs reference() const override {
    std::vector<double> y(static_cast<size_t>(m_ * n_)), magnitude(y.size());
    for (int64_t i = 0; i < m_; ++i)
      for (int64_t j = 0; j < n_; ++j) {
        double sum = 0.0, abs_sum = 0.0;
        for (int64_t p = 0; p < k_; ++p) {
          const double x = from_half(to_half(x_[static_cast<size_t>(i * k_ + p)]));
          const double product = x * from_half(w_[static_cast<size_t>(j * k_ + p)]);
          sum += product;
          abs_sum += std::fabs(product);
        }
        y[static_cast<size_t>(i * n_ + j)] = sum;
        magnitude[static_cast<size_t>(i * n_ + j)] = abs_sum;
      }
    const Tolerance rounded{0.0, static_cast<double>(k_) * kUnitRoundoff, 1.0,
                            "16-bit products are exact in fp32; only the fp32 sum of k of them rounds"};
    return {Output{"y", y, integers_ ? kExact : rounded, magnitude}};
  }
  void setup(Backend& be) override {
    x_dev_ = to_backend(be, x_);
    w_dev_ = to_backend(be, w_);
    y_dev_ = Buffer<float>(be, m_ * n_);
  }
  void run(Backend& be) override { be.linear_half(x_dev_.data(), w_dev_.data(), format_, y_dev_.data(), m_, n_, k_); }
  Outputs outputs(Backend& be) override { return one_output("y", to_host(be, y_dev_)); }
  Work work() const override { return {2.0 * static_cast<double>(m_ * n_ * k_), true, "2*m*n*k flops"}; }

 private:
  bool bf16() const { return format_ == HalfFormat::kBF16; }
  uint16_t to_half(float v) const { return bf16() ? float_to_bf16(v) : float_to_fp16(v); }
  double from_half(uint16_t v) const { return bf16() ? bf16_to_float(v) : fp16_to_float(v); }
  HalfFormat format_;
  int64_t m_, n_, k_;
  bool integers_;
  std::vector<float> x_;
  std::vector<uint16_t> w_;
  Buffer<float> x_dev_, y_dev_;
  Buffer<uint16_t> w_dev_;
};

// --- the Llama block forward -------------------------------------------------------------------------------------

class RmsNormCase final : public OpCase {
 public:
  RmsNormCase(int64_t rows, int64_t dim, bool in_place) : rows_(rows), dim_(dim), in_place_(in_place) {}
  std::string op() const override { return "rms_norm"; }
  std::string vars() const override { return cat("rows=", rows_, ",dim=", dim_, in_place_ ? ",in_place" : ""); }
  void init() override {
    x_ = normal(static_cast<size_t>(rows_ * dim_), 2.0f, 31);
    for (int64_t i = 0; i < dim_; ++i) x_[static_cast<size_t>(5 * dim_ + i)] *= 1e-3f;  // a row where eps matters
    weight_ = normal(static_cast<size_t>(dim_), 1.0f, 32);
  }
  Outputs reference() const override {
    std::vector<double> y(x_.size());
    for (int64_t r = 0; r < rows_; ++r) {
      double ss = 0.0;
      for (int64_t i = 0; i < dim_; ++i)
        ss += static_cast<double>(x_[static_cast<size_t>(r * dim_ + i)]) * x_[static_cast<size_t>(r * dim_ + i)];
      const double inv = 1.0 / std::sqrt(ss / static_cast<double>(dim_) + static_cast<double>(kEps));
      for (int64_t i = 0; i < dim_; ++i)
        y[static_cast<size_t>(r * dim_ + i)] =
            static_cast<double>(weight_[static_cast<size_t>(i)]) * x_[static_cast<size_t>(r * dim_ + i)] * inv;
    }
    return {Output{
        "y", y, {0.0, 3e-7, 1.0, "three fp32 roundings (1/rms, x * inv, w * that) after a wide mean: <= 1.5 ulp"}, {}}};
  }
  void setup(Backend& be) override {
    x_dev_ = to_backend(be, x_);
    weight_dev_ = to_backend(be, weight_);
    y_dev_ = Buffer<float>(be, rows_ * dim_);
  }
  void run(Backend& be) override { be.rms_norm(x_dev_.data(), weight_dev_.data(), y(), rows_, dim_, kEps); }
  Outputs outputs(Backend& be) override { return one_output("y", to_host(be, in_place_ ? x_dev_ : y_dev_)); }
  bool overwrites_inputs() const override { return in_place_; }
  Work work() const override {
    return {4.0 * static_cast<double>(2 * rows_ * dim_ + dim_), false, "4*(2*rows*dim + dim) bytes"};
  }

 private:
  static constexpr float kEps = 1e-5f;
  float* y() { return in_place_ ? x_dev_.data() : y_dev_.data(); }
  int64_t rows_, dim_;
  bool in_place_;
  std::vector<float> x_, weight_;
  Buffer<float> x_dev_, weight_dev_, y_dev_;
};

class RopeCase final : public OpCase {
 public:
  RopeCase(int64_t samples, int64_t seq, int64_t heads, int64_t head_dim)
      : samples_(samples), seq_(seq), heads_(heads), head_dim_(head_dim) {}
  std::string op() const override { return "rope"; }
  std::string vars() const override {
    return cat("samples=", samples_, ",seq=", seq_, ",heads=", heads_, ",head_dim=", head_dim_);
  }
  void init() override {
    x_ = normal(static_cast<size_t>(samples_ * seq_ * heads_ * head_dim_), 1.0f, 41);
    inv_freq_ = llama_inv_freq(head_dim_);
  }
  // HF rotate_half: pairs (i, i + half), the position of row r is r % seq; magnitude |x1| + |x2| since the two
  // products may cancel.
  Outputs reference() const override {
    const int64_t half = head_dim_ / 2;
    std::vector<double> y(x_.size()), magnitude(x_.size());
    for (int64_t r = 0; r < samples_ * seq_; ++r)
      for (int64_t h = 0; h < heads_; ++h)
        for (int64_t i = 0; i < half; ++i) {
          const size_t lo = static_cast<size_t>((r * heads_ + h) * head_dim_ + i), hi = lo + static_cast<size_t>(half);
          const double angle = static_cast<double>(r % seq_) * static_cast<double>(inv_freq_[static_cast<size_t>(i)]);
          const double x1 = x_[lo], x2 = x_[hi];
          y[lo] = x1 * std::cos(angle) - x2 * std::sin(angle);
          y[hi] = x2 * std::cos(angle) + x1 * std::sin(angle);
          magnitude[lo] = magnitude[hi] = std::fabs(x1) + std::fabs(x2);
        }
    return {Output{"x",
                   y,
                   {0.0, 3e-7, 1.0, "cos/sin rounded to fp32, two fp32 products and a sum: 3 * 2^-24 of |x1| + |x2|"},
                   magnitude}};
  }
  void setup(Backend& be) override {
    x_dev_ = to_backend(be, x_);
    inv_freq_dev_ = to_backend(be, inv_freq_);
  }
  void run(Backend& be) override { be.rope(x_dev_.data(), samples_, seq_, heads_, head_dim_, inv_freq_dev_.data()); }
  Outputs outputs(Backend& be) override { return one_output("x", to_host(be, x_dev_)); }
  bool overwrites_inputs() const override { return true; }
  Work work() const override {
    return {8.0 * static_cast<double>(x_.size()), false, "8*samples*seq*heads*head_dim bytes"};
  }

 private:
  int64_t samples_, seq_, heads_, head_dim_;
  std::vector<float> x_, inv_freq_;
  Buffer<float> x_dev_, inv_freq_dev_;
};

// Causal grouped-query attention; q is scaled up so that the softmax is peaked (a flat one would hide a wrong key).
class AttentionCase final : public OpCase {
 public:
  AttentionCase(int64_t samples, int64_t seq, int64_t heads, int64_t kv_heads, int64_t head_dim)
      : samples_(samples), seq_(seq), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim) {}
  std::string op() const override { return "attention"; }
  std::string vars() const override {
    return cat("samples=", samples_, ",seq=", seq_, ",heads=", heads_, ",kv_heads=", kv_heads_,
               ",head_dim=", head_dim_);
  }
  void init() override {
    const int64_t tokens = samples_ * seq_;
    q_ = normal(static_cast<size_t>(tokens * heads_ * head_dim_), 3.0f, 51);
    k_ = normal(static_cast<size_t>(tokens * kv_heads_ * head_dim_), 1.0f, 52);
    v_ = normal(static_cast<size_t>(tokens * kv_heads_ * head_dim_), 1.0f, 53);
  }
  Outputs reference() const override {
    std::vector<double> out(q_.size());
    for (int64_t s = 0; s < samples_; ++s)
      for (int64_t h = 0; h < heads_; ++h)
        for (int64_t t = 0; t < seq_; ++t) reference_row(s, h, t, out);
    return {Output{"out",
                   out,
                   {2e-5, 0.0, 1.0,
                    "fp32 scores and fp32 sums of up to seq weighted values (|v| ~ 1): observed <= 4e-6 at seq 4096"},
                   {}}};
  }
  void setup(Backend& be) override {
    q_dev_ = to_backend(be, q_);
    k_dev_ = to_backend(be, k_);
    v_dev_ = to_backend(be, v_);
    out_dev_ = Buffer<float>(be, static_cast<int64_t>(q_.size()));
  }
  void run(Backend& be) override {
    be.attention(q_dev_.data(), k_dev_.data(), v_dev_.data(), out_dev_.data(), samples_, seq_, heads_, kv_heads_,
                 head_dim_);
  }
  Outputs outputs(Backend& be) override { return one_output("out", to_host(be, out_dev_)); }
  Work work() const override {
    const double pairs = static_cast<double>(samples_ * heads_) * static_cast<double>(seq_ * (seq_ + 1) / 2);
    return {4.0 * pairs * static_cast<double>(head_dim_), true, "4*samples*heads*head_dim*seq*(seq+1)/2 flops"};
  }

 private:
  // Row t of head h in sample s: softmax(q k^T / sqrt(d)) v over the keys 0..t, in double.
  void reference_row(int64_t s, int64_t h, int64_t t, std::vector<double>& out) const {
    const int64_t qs = heads_ * head_dim_, kvs = kv_heads_ * head_dim_, kvh = h / (heads_ / kv_heads_);
    const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
    std::vector<double> score(static_cast<size_t>(t + 1));
    for (int64_t j = 0; j <= t; ++j) {
      double d = 0.0;
      for (int64_t e = 0; e < head_dim_; ++e)
        d += static_cast<double>(q_[static_cast<size_t>((s * seq_ + t) * qs + h * head_dim_ + e)]) *
             k_[static_cast<size_t>((s * seq_ + j) * kvs + kvh * head_dim_ + e)];
      score[static_cast<size_t>(j)] = d * scale;
    }
    const double mx = *std::max_element(score.begin(), score.end());
    double denom = 0.0;
    double* o = out.data() + (s * seq_ + t) * qs + h * head_dim_;
    std::fill(o, o + head_dim_, 0.0);
    for (int64_t j = 0; j <= t; ++j) {
      const double p = std::exp(score[static_cast<size_t>(j)] - mx);
      denom += p;
      for (int64_t e = 0; e < head_dim_; ++e)
        o[e] += p * v_[static_cast<size_t>((s * seq_ + j) * kvs + kvh * head_dim_ + e)];
    }
    for (int64_t e = 0; e < head_dim_; ++e) o[e] /= denom;
  }
  int64_t samples_, seq_, heads_, kv_heads_, head_dim_;
  std::vector<float> q_, k_, v_;
  Buffer<float> q_dev_, k_dev_, v_dev_, out_dev_;
};

class SwigluCase final : public OpCase {
 public:
  SwigluCase(int64_t n, bool in_place) : n_(n), in_place_(in_place) {}
  std::string op() const override { return "swiglu"; }
  std::string vars() const override { return cat("n=", n_, in_place_ ? ",in_place" : ""); }
  void init() override {
    gate_ = normal(static_cast<size_t>(n_), 4.0f, 61);
    gate_[0] = -100.0f;  // exp(100) overflows fp32: silu must give -0, not NaN
    gate_[1] = 100.0f;
    gate_[2] = 0.0f;
    up_ = normal(static_cast<size_t>(n_), 1.0f, 62);
  }
  Outputs reference() const override {
    std::vector<double> out(gate_.size());
    for (size_t i = 0; i < out.size(); ++i) {
      const double g = gate_[i];
      out[i] = g / (1.0 + std::exp(-g)) * up_[i];
    }
    return {Output{
        "out", out, {1e-30, 1e-6, 1.0, "a few fp32 roundings and an fp32 exp within 2 ulps: 1e-6 relative"}, {}}};
  }
  void setup(Backend& be) override {
    gate_dev_ = to_backend(be, gate_);
    up_dev_ = to_backend(be, up_);
    out_dev_ = Buffer<float>(be, n_);
  }
  void run(Backend& be) override { be.swiglu(gate_dev_.data(), up_dev_.data(), out(), n_); }
  Outputs outputs(Backend& be) override { return one_output("out", to_host(be, in_place_ ? gate_dev_ : out_dev_)); }
  bool overwrites_inputs() const override { return in_place_; }
  Work work() const override { return {12.0 * static_cast<double>(n_), false, "12*n bytes"}; }

 private:
  float* out() { return in_place_ ? gate_dev_.data() : out_dev_.data(); }
  int64_t n_;
  bool in_place_;
  std::vector<float> gate_, up_;
  Buffer<float> gate_dev_, up_dev_, out_dev_;
};

// y += x (bias = false) or y[rows, n] += bias[n] (bias = true): one correctly rounded fp32 addition per element,
// which the double sum rounded to fp32 reproduces exactly.
class AddCase final : public OpCase {
 public:
  AddCase(int64_t rows, int64_t n, bool bias) : rows_(rows), n_(n), bias_(bias) {}
  std::string op() const override { return bias_ ? "add_bias" : "add"; }
  std::string vars() const override { return cat("rows=", rows_, ",n=", n_); }
  void init() override {
    y_ = normal(static_cast<size_t>(rows_ * n_), 1.0f, 71);
    x_ = normal(static_cast<size_t>(bias_ ? n_ : rows_ * n_), 1.0f, 72);
  }
  Outputs reference() const override {
    std::vector<double> y(y_.size());
    for (size_t i = 0; i < y.size(); ++i) {
      const double x = x_[bias_ ? i % static_cast<size_t>(n_) : i];
      y[i] = static_cast<float>(static_cast<double>(y_[i]) + x);
    }
    return {Output{"y", y, kExact, {}}};
  }
  void setup(Backend& be) override {
    y_dev_ = to_backend(be, y_);
    x_dev_ = to_backend(be, x_);
  }
  void run(Backend& be) override {
    if (bias_)
      be.add_bias(y_dev_.data(), x_dev_.data(), rows_, n_);
    else
      be.add(y_dev_.data(), x_dev_.data(), rows_ * n_);
  }
  Outputs outputs(Backend& be) override { return one_output("y", to_host(be, y_dev_)); }
  bool overwrites_inputs() const override { return true; }
  Work work() const override {
    return {4.0 * static_cast<double>(2 * rows_ * n_ + x_.size()), false, "4*(2*rows*n + |x|) bytes"};
  }

 private:
  int64_t rows_, n_;
  bool bias_;
  std::vector<float> y_, x_;
  Buffer<float> y_dev_, x_dev_;
};

// Sum over rows of -log softmax(logits)[target]; logits + offset tests the max shift (exp(1000) overflows double).
class NllSumCase final : public OpCase {
 public:
  NllSumCase(int64_t rows, int64_t vocab, float offset) : rows_(rows), vocab_(vocab), offset_(offset) {}
  std::string op() const override { return "nll_sum"; }
  std::string vars() const override { return cat("rows=", rows_, ",vocab=", vocab_, ",offset=", offset_); }
  void init() override {
    logits_ = normal(static_cast<size_t>(rows_ * vocab_), 3.0f, 81);
    for (auto& l : logits_) l += offset_;
    targets_.resize(static_cast<size_t>(rows_));
    std::mt19937 rng(82);
    std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(vocab_ - 1));
    for (auto& t : targets_) t = pick(rng);
    targets_[0] = 0;
    targets_[1] = static_cast<int32_t>(vocab_ - 1);
  }
  Outputs reference() const override {
    double total = 0.0;
    for (int64_t r = 0; r < rows_; ++r) {
      const float* l = logits_.data() + r * vocab_;
      const double mx = *std::max_element(l, l + vocab_);
      double se = 0.0;
      for (int64_t i = 0; i < vocab_; ++i) se += std::exp(static_cast<double>(l[i]) - mx);
      total += std::log(se) + mx - l[targets_[static_cast<size_t>(r)]];
    }
    return {Output{
        "nll", {total}, {0.0, 1e-10, 1.0, "double sums of ~1000 exps within an ulp, in other orders: ~1e-13"}, {}}};
  }
  void setup(Backend& be) override {
    logits_dev_ = to_backend(be, logits_);
    targets_dev_ = to_backend(be, targets_);
  }
  void run(Backend& be) override { nll_ = be.nll_sum(logits_dev_.data(), targets_dev_.data(), rows_, vocab_); }
  Outputs outputs(Backend&) override { return {Output{"nll", {nll_}, {}, {}}}; }
  Work work() const override { return {4.0 * static_cast<double>(rows_ * vocab_), false, "4*rows*vocab bytes"}; }

 private:
  int64_t rows_, vocab_;
  float offset_;
  std::vector<float> logits_;
  std::vector<int32_t> targets_;
  Buffer<float> logits_dev_;
  Buffer<int32_t> targets_dev_;
  double nll_ = 0.0;
};

// --- quantization --------------------------------------------------------------------------------------------------

// h[k, k] += x^T x onto a symmetric start (the caller's running sum). Small integers keep every sum exact
// (|sums| <= rows * 9 + 5); k crosses the CPU's 256-wide tiles.
class HessianCase final : public OpCase {
 public:
  HessianCase(int64_t rows, int64_t k, bool integers) : rows_(rows), k_(k), integers_(integers) {}
  std::string op() const override { return "hessian_accumulate"; }
  std::string vars() const override { return cat("rows=", rows_, ",k=", k_, ",data=", integers_ ? "int" : "normal"); }
  void init() override {
    const auto x_size = static_cast<size_t>(rows_ * k_);
    x_ = integers_ ? small_integers(x_size, -3, 3, 91) : normal(x_size, 1.0f, 93);
    h0_ = small_integers(static_cast<size_t>(k_ * k_), -5, 5, 92);
    for (int64_t i = 0; i < k_; ++i)
      for (int64_t j = 0; j < i; ++j) h0_[static_cast<size_t>(i * k_ + j)] = h0_[static_cast<size_t>(j * k_ + i)];
  }
  Outputs reference() const override {
    std::vector<double> h = as_double(h0_), magnitude(h.size());
    for (int64_t i = 0; i < k_; ++i)
      for (int64_t j = i; j < k_; ++j) {
        double sum = 0.0, abs_sum = std::fabs(h[static_cast<size_t>(i * k_ + j)]);
        for (int64_t r = 0; r < rows_; ++r) {
          const double p =
              static_cast<double>(x_[static_cast<size_t>(r * k_ + i)]) * x_[static_cast<size_t>(r * k_ + j)];
          sum += p;
          abs_sum += std::fabs(p);
        }
        h[static_cast<size_t>(i * k_ + j)] = h[static_cast<size_t>(j * k_ + i)] =
            h[static_cast<size_t>(i * k_ + j)] + sum;
        magnitude[static_cast<size_t>(i * k_ + j)] = magnitude[static_cast<size_t>(j * k_ + i)] = abs_sum;
      }
    const Tolerance rounded{0.0, static_cast<double>(rows_ + 1) * kUnitRoundoff, 1.0,
                            "fp32 sums of rows products and the start: <= (rows + 1) 2^-24 sum |terms|"};
    return {Output{"h", h, integers_ ? kExact : rounded, magnitude}};
  }
  void setup(Backend& be) override {
    x_dev_ = to_backend(be, x_);
    h_dev_ = to_backend(be, h0_);
  }
  void run(Backend& be) override { be.hessian_accumulate(x_dev_.data(), rows_, k_, h_dev_.data()); }
  Outputs outputs(Backend& be) override { return one_output("h", to_host(be, h_dev_)); }
  bool overwrites_inputs() const override { return true; }
  Work work() const override {
    return {2.0 * static_cast<double>(rows_) * static_cast<double>(k_ * k_), true, "2*rows*k^2 flops (the GEMM's)"};
  }

 private:
  int64_t rows_, k_;
  bool integers_;
  std::vector<float> x_, h0_;
  Buffer<float> x_dev_, h_dev_;
};

// H = R R^T, R upper, against the double factor of reference::reverse_cholesky; a matrix that is not positive
// definite (kind "indefinite": a negative diagonal entry; "nan": a NaN pair) must be reported as such.
class ReverseCholeskyCase final : public OpCase {
 public:
  ReverseCholeskyCase(int64_t n, const char* kind) : n_(n), kind_(kind) {}
  std::string op() const override { return "reverse_cholesky"; }
  std::string vars() const override { return cat("n=", n_, ",h=", kind_); }
  void init() override {
    h_ = spd_matrix(n_, 6);
    const std::string kind = kind_;
    if (kind == "indefinite") h_[static_cast<size_t>((n_ / 2) * n_ + n_ / 2)] = -5.0f;
    if (kind == "nan")
      h_[static_cast<size_t>(3 * n_ + n_ - 2)] = h_[static_cast<size_t>((n_ - 2) * n_ + 3)] = std::nanf("");
  }
  Outputs reference() const override {
    std::vector<double> r;
    const bool ok = kernels::reference::reverse_cholesky(h_.data(), n_, r);
    Outputs out{Output{"factored", {ok ? 1.0 : 0.0}, kExact, {}}};
    if (ok)
      out.push_back(Output{
          "R",
          r,
          {1e-6, 1e-6, 1.0, "fp32 factor of an SPD matrix with eigenvalues in [1, 7]: observed 1.3e-7 (entries <= 3)"},
          {}});
    return out;
  }
  void setup(Backend& be) override { h_dev_ = to_backend(be, h_); }
  void run(Backend& be) override { factored_ = be.reverse_cholesky(h_dev_.data(), n_); }
  Outputs outputs(Backend& be) override {
    Outputs out{Output{"factored", {factored_ ? 1.0 : 0.0}, {}, {}}};
    if (factored_) out.push_back(Output{"R", as_double(to_host(be, h_dev_)), {}, {}});
    return out;
  }
  bool overwrites_inputs() const override { return true; }
  Work work() const override {
    return {static_cast<double>(n_) * static_cast<double>(n_ * n_) / 3.0, true, "n^3/3 flops"};
  }

 private:
  int64_t n_;
  const char* kind_;
  std::vector<float> h_;
  Buffer<float> h_dev_;
  bool factored_ = false;
};

// Scale and zero per row from min/max (quant_grid.hpp), written with a stride into a table that holds other
// values (which must survive). Rows 1-3: all zero ([-1, 1]), no negative value, a range below fp16's.
class QuantParamsCase final : public OpCase {
 public:
  QuantParamsCase(int64_t rows, int64_t cols, int64_t ld, int64_t stride, QuantGrid grid)
      : rows_(rows), cols_(cols), ld_(ld), stride_(stride), grid_(grid) {}
  std::string op() const override { return "quant_params"; }
  std::string vars() const override {
    return cat("rows=", rows_, ",cols=", cols_, ",ld=", ld_, ",stride=", stride_, ",bits=", grid_.bits,
               grid_.sym ? ",sym" : ",asym");
  }
  void init() override {
    w_ = normal(static_cast<size_t>(rows_ * ld_), 1.0f, 22);
    for (int64_t c = 0; c < ld_; ++c) {
      w_[static_cast<size_t>(1 * ld_ + c)] = 0.0f;
      w_[static_cast<size_t>(2 * ld_ + c)] = std::fabs(w_[static_cast<size_t>(2 * ld_ + c)]);
      w_[static_cast<size_t>(3 * ld_ + c)] = 1e-9f;
    }
  }
  Outputs reference() const override {
    std::vector<double> scale(static_cast<size_t>(rows_ * stride_), kFill), zero(scale);
    for (int64_t r = 0; r < rows_; ++r) {
      const float* x = w_.data() + r * ld_;
      const auto [lo, hi] = std::minmax_element(x, x + cols_);
      const kernels::ScaleZero p = kernels::params_from_range(*lo, *hi, grid_);
      scale[static_cast<size_t>(r * stride_)] = p.scale;
      zero[static_cast<size_t>(r * stride_)] = p.zero;
    }
    return {Output{"scale", scale, kExact, {}}, Output{"zero", zero, kExact, {}}};
  }
  void setup(Backend& be) override {
    w_dev_ = to_backend(be, w_);
    const std::vector<float> fill(static_cast<size_t>(rows_ * stride_), kFill);
    scale_dev_ = to_backend(be, fill);
    zero_dev_ = to_backend(be, fill);
  }
  void run(Backend& be) override {
    be.quant_params(w_dev_.data(), rows_, cols_, ld_, grid_, scale_dev_.data(), zero_dev_.data(), stride_);
  }
  Outputs outputs(Backend& be) override {
    return {Output{"scale", as_double(to_host(be, scale_dev_)), {}, {}},
            Output{"zero", as_double(to_host(be, zero_dev_)), {}, {}}};
  }
  Work work() const override { return {4.0 * static_cast<double>(rows_ * cols_), false, "4*rows*cols bytes read"}; }

 private:
  static constexpr float kFill = -7.0f;
  int64_t rows_, cols_, ld_, stride_;
  QuantGrid grid_;
  std::vector<float> w_;
  Buffer<float> w_dev_, scale_dev_, zero_dev_;
};

// Codes (and dequantized values) from given tables. With power-of-two scales and half-integer multiples of them
// ("ties") every division is exact and every rounding a tie, so round-half-to-even and the clamp both show.
class QuantizeCase final : public OpCase {
 public:
  QuantizeCase(int64_t rows, int64_t cols, int64_t groups, int bits, bool ties, bool with_deq)
      : rows_(rows), cols_(cols), groups_(groups), grid_{bits, false}, ties_(ties), with_deq_(with_deq) {}
  std::string op() const override { return "quantize"; }
  std::string vars() const override {
    return cat("rows=", rows_, ",cols=", cols_, ",groups=", groups_, ",bits=", grid_.bits,
               ",data=", ties_ ? "ties" : "normal", with_deq_ ? ",deq" : "");
  }
  void init() override {
    scales_.resize(static_cast<size_t>(rows_ * groups_));
    zeros_.resize(scales_.size());
    for (int64_t i = 0; i < rows_ * groups_; ++i) {
      scales_[static_cast<size_t>(i)] = std::ldexp(1.0f, static_cast<int>(i % 5) - 3);
      zeros_[static_cast<size_t>(i)] = static_cast<float>(i % 9);
    }
    param_of_.resize(static_cast<size_t>(cols_));
    for (int64_t c = 0; c < cols_; ++c) param_of_[static_cast<size_t>(c)] = static_cast<int32_t>((c * 7) % groups_);
    const auto steps = small_integers(static_cast<size_t>(rows_ * cols_), -25, 25, 23);
    const auto gauss = normal(static_cast<size_t>(rows_ * cols_), 2.0f, 24);
    w_.resize(steps.size());
    for (int64_t r = 0; r < rows_; ++r)
      for (int64_t c = 0; c < cols_; ++c) {
        const size_t i = static_cast<size_t>(r * cols_ + c);
        const float s = scales_[static_cast<size_t>(r * groups_ + param_of_[static_cast<size_t>(c)])];
        w_[i] = ties_ ? (steps[i] + (c % 2 ? 0.5f : 0.0f)) * s : gauss[i];
      }
  }
  Outputs reference() const override {
    std::vector<double> q(w_.size()), deq(w_.size());
    const float maxq = static_cast<float>(grid_.maxq());
    for (int64_t r = 0; r < rows_; ++r)
      for (int64_t c = 0; c < cols_; ++c) {
        const size_t i = static_cast<size_t>(r * cols_ + c),
                     t = static_cast<size_t>(r * groups_ + param_of_[static_cast<size_t>(c)]);
        const float code = kernels::quantize_code(w_[i], scales_[t], zeros_[t], maxq);
        q[i] = code;
        deq[i] = scales_[t] * (code - zeros_[t]);
      }
    Outputs out{Output{"q", q, kExact, {}}};
    if (with_deq_) out.push_back(Output{"deq", deq, kExact, {}});
    return out;
  }
  void setup(Backend& be) override {
    w_dev_ = to_backend(be, w_);
    scales_dev_ = to_backend(be, scales_);
    zeros_dev_ = to_backend(be, zeros_);
    param_of_dev_ = to_backend(be, param_of_);
    q_dev_ = Buffer<uint8_t>(be, rows_ * cols_);
    deq_dev_ = Buffer<float>(be, rows_ * cols_);
  }
  void run(Backend& be) override {
    be.quantize(w_dev_.data(), rows_, cols_, scales_dev_.data(), zeros_dev_.data(), groups_, param_of_dev_.data(),
                grid_, q_dev_.data(), with_deq_ ? deq_dev_.data() : nullptr);
  }
  Outputs outputs(Backend& be) override {
    Outputs out{Output{"q", as_double(to_host(be, q_dev_)), {}, {}}};
    if (with_deq_) out.push_back(Output{"deq", as_double(to_host(be, deq_dev_)), {}, {}});
    return out;
  }
  Work work() const override {
    return {static_cast<double>(rows_ * cols_) * (with_deq_ ? 9.0 : 5.0), false, "rows*cols*(4 + 1 [+ 4 deq]) bytes"};
  }

 private:
  int64_t rows_, cols_, groups_;
  QuantGrid grid_;
  bool ties_, with_deq_;
  std::vector<float> w_, scales_, zeros_;
  std::vector<int32_t> param_of_;
  Buffer<float> w_dev_, scales_dev_, zeros_dev_, deq_dev_;
  Buffer<int32_t> param_of_dev_;
  Buffer<uint8_t> q_dev_;
};

// The GPTQ column loop as the program runs it (Backend::gptq_columns: gptq_block per block, lazy updates by gemm)
// against the readable reference::gptq_columns. The Hessian comes from correlated inputs with outlier channels,
// damped by 1% of its mean diagonal as the program does; R from the double reference factorization.
struct GptqShape {
  int64_t rows, cols;
  int64_t group_size;  // -1: one group per row
  bool dynamic;        // tables computed on the way (else given up front)
  bool permuted;       // static groups under act-order: param_of follows a permutation of the columns
  QuantGrid grid;
  int64_t block;
};

class GptqCase final : public OpCase {
 public:
  explicit GptqCase(GptqShape s) : s_(s) {}
  std::string op() const override { return "gptq_block"; }
  std::string vars() const override {
    return cat("rows=", s_.rows, ",cols=", s_.cols, ",group=", s_.group_size, s_.dynamic ? ",dynamic" : ",up_front",
               s_.permuted ? ",permuted" : "", ",bits=", s_.grid.bits, s_.grid.sym ? ",sym" : ",asym",
               ",block=", s_.block);
  }
  void init() override {
    const int64_t rows = s_.rows, cols = s_.cols;
    w_ = normal(static_cast<size_t>(rows * cols), 0.05f, 24);
    std::vector<float> h = correlated_hessian(2 * cols, cols, 25);
    double mean = 0.0;
    for (int64_t i = 0; i < cols; ++i) mean += h[static_cast<size_t>(i * cols + i)] / static_cast<double>(cols);
    for (int64_t i = 0; i < cols; ++i) h[static_cast<size_t>(i * cols + i)] += static_cast<float>(0.01 * mean);
    std::vector<double> r;
    PQ_ASSERT(kernels::reference::reverse_cholesky(h.data(), cols, r), "GptqCase: test Hessian not SPD");
    r_.assign(r.begin(), r.end());
    groups_ = s_.group_size > 0 ? (cols + s_.group_size - 1) / s_.group_size : 1;
    std::vector<int64_t> column(static_cast<size_t>(cols));  // input column at processing position j
    std::iota(column.begin(), column.end(), int64_t{0});
    if (s_.permuted) std::shuffle(column.begin(), column.end(), std::mt19937(26));
    param_of_.resize(static_cast<size_t>(cols));
    for (int64_t j = 0; j < cols; ++j)
      param_of_[static_cast<size_t>(j)] =
          static_cast<int32_t>(s_.group_size > 0 ? column[static_cast<size_t>(j)] / s_.group_size : 0);
    scales0_.assign(static_cast<size_t>(rows * groups_), 0.0f);
    zeros0_.assign(scales0_.size(), 0.0f);
    if (!s_.dynamic) tables_up_front();
  }
  Outputs reference() const override {
    kernels::reference::GptqColumnsInput in;
    in.rows = s_.rows;
    in.cols = s_.cols;
    in.r = r_.data();
    in.w = w_.data();
    in.scales = scales0_.data();
    in.zeros = zeros0_.data();
    in.groups = groups_;
    in.param_of = param_of_.data();
    in.dynamic_group_size = s_.dynamic ? s_.group_size : 0;
    in.block = s_.block;
    in.grid = s_.grid;
    const kernels::reference::GptqColumnsResult ref = kernels::reference::gptq_columns(in);
    // fp32 against fp64 on well-conditioned problems: a code can differ only where a value lies within rounding
    // noise of a grid midpoint (on the CPU none does in these rows), and the flip then moves the later columns of
    // its row and the ranges of its later dynamic groups
    const Tolerance codes{0.0, 0.0, 0.999, "fp32 vs fp64: a value within rounding noise of a grid midpoint flips"};
    const Tolerance tables = s_.dynamic ? Tolerance{0.0, 0.0, 0.99, "a flipped code moves its row's later ranges"}
                                        : Tolerance{0.0, 0.0, 1.0, "given up front: read, never written"};
    const Tolerance loss{0.0, 1e-3, 1.0, "fp32 sums agree to ~2e-6; each of the <= 0.1% flips moves it far less"};
    return {Output{"codes", as_double(ref.q), codes, {}}, Output{"scales", as_double(ref.scales), tables, {}},
            Output{"zeros", as_double(ref.zeros), tables, {}},
            Output{"loss", {std::accumulate(ref.err2.begin(), ref.err2.end(), 0.0)}, loss, {}}};
  }
  void setup(Backend& be) override {
    const int64_t rows = s_.rows, cols = s_.cols;
    std::vector<float> wc(w_);  // the running weights before the first block: w[:, j] * R[j, j]
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) wc[static_cast<size_t>(r * cols + j)] *= r_[static_cast<size_t>(j * cols + j)];
    r_dev_ = to_backend(be, r_);
    w_dev_ = to_backend(be, w_);
    wc_dev_ = to_backend(be, wc);
    res_dev_ = to_backend(be, std::vector<float>(w_.size(), 0.0f));
    err2_dev_ = to_backend(be, std::vector<float>(static_cast<size_t>(rows), 0.0f));
    q_dev_ = to_backend(be, std::vector<uint8_t>(w_.size(), 0));
    scales_dev_ = to_backend(be, scales0_);
    zeros_dev_ = to_backend(be, zeros0_);
    param_of_dev_ = to_backend(be, param_of_);
  }
  void run(Backend& be) override {
    kernels::GptqBlockArgs a;
    a.rows = s_.rows;
    a.cols = s_.cols;
    a.r = r_dev_.data();
    a.w = w_dev_.data();
    a.wc = wc_dev_.data();
    a.res = res_dev_.data();
    a.err2 = err2_dev_.data();
    a.q = q_dev_.data();
    a.scales = scales_dev_.data();
    a.zeros = zeros_dev_.data();
    a.groups = groups_;
    a.param_of = param_of_dev_.data();
    a.dynamic_group_size = s_.dynamic ? s_.group_size : 0;
    a.grid = s_.grid;
    be.gptq_columns(a, s_.block);
  }
  Outputs outputs(Backend& be) override {
    const std::vector<float> err2 = to_host(be, err2_dev_);
    const double loss = std::accumulate(err2.begin(), err2.end(), 0.0);
    return {Output{"codes", as_double(to_host(be, q_dev_)), {}, {}},
            Output{"scales", as_double(to_host(be, scales_dev_)), {}, {}},
            Output{"zeros", as_double(to_host(be, zeros_dev_)), {}, {}}, Output{"loss", {loss}, {}, {}}};
  }
  bool overwrites_inputs() const override { return true; }
  Work work() const override {
    return {static_cast<double>(s_.rows) * static_cast<double>(s_.cols * s_.cols), true,
            "rows*cols^2 flops (later-column updates: 2 flops for each of rows*cols^2/2)"};
  }

 private:
  // Entry g of each row from the min/max over the columns that param_of sends to g (static groups, or the row).
  void tables_up_front() {
    for (int64_t r = 0; r < s_.rows; ++r) {
      std::vector<float> lo(static_cast<size_t>(groups_), 0.0f), hi(lo);
      for (int64_t j = 0; j < s_.cols; ++j) {
        const size_t g = static_cast<size_t>(param_of_[static_cast<size_t>(j)]);
        lo[g] = std::min(lo[g], w_[static_cast<size_t>(r * s_.cols + j)]);
        hi[g] = std::max(hi[g], w_[static_cast<size_t>(r * s_.cols + j)]);
      }
      for (int64_t g = 0; g < groups_; ++g) {
        const kernels::ScaleZero p =
            kernels::params_from_range(lo[static_cast<size_t>(g)], hi[static_cast<size_t>(g)], s_.grid);
        scales0_[static_cast<size_t>(r * groups_ + g)] = p.scale;
        zeros0_[static_cast<size_t>(r * groups_ + g)] = p.zero;
      }
    }
  }
  GptqShape s_;
  int64_t groups_ = 0;
  std::vector<float> w_, r_, scales0_, zeros0_;
  std::vector<int32_t> param_of_;
  Buffer<float> r_dev_, w_dev_, wc_dev_, res_dev_, err2_dev_, scales_dev_, zeros_dev_;
  Buffer<uint8_t> q_dev_;
  Buffer<int32_t> param_of_dev_;
};

// --- comparison and benchmark ------------------------------------------------------------------------------------

// Fraction of the elements within the tolerance; the first few misses go to `misses`.
double fraction_within(const Output& got, const Output& want, std::string& misses, double& worst) {
  size_t within = 0, shown = 0;
  worst = 0.0;
  for (size_t i = 0; i < want.values.size(); ++i) {
    const double diff = std::fabs(got.values[i] - want.values[i]);
    const double magnitude = want.magnitude.empty() ? std::fabs(want.values[i]) : want.magnitude[i];
    worst = std::max(worst, diff);
    if (diff <= want.tol.atol + want.tol.rtol * magnitude ||
        (std::isnan(got.values[i]) && std::isnan(want.values[i]))) {
      ++within;
    } else if (shown++ < 5) {
      misses += cat("\n  [", i, "] got ", got.values[i], ", want ", want.values[i]);
    }
  }
  return want.values.empty() ? 1.0 : static_cast<double>(within) / static_cast<double>(want.values.size());
}

// Every output against the reference; returns whether all passed (GoogleTest failures for those that did not).
bool compare(const std::string& where, const Outputs& got, const Outputs& want) {
  bool pass = true;
  EXPECT_EQ(got.size(), want.size()) << where << ": number of outputs";
  if (got.size() != want.size()) return false;
  for (size_t o = 0; o < want.size(); ++o) {
    const Output& w = want[o];
    EXPECT_EQ(got[o].name, w.name) << where;
    EXPECT_EQ(got[o].values.size(), w.values.size()) << where << " " << w.name;
    if (got[o].name != w.name || got[o].values.size() != w.values.size()) return false;
    // never compare trivial data: an all-zero reference would let a backend that writes nothing pass
    EXPECT_TRUE(w.values.size() == 1 ||
                std::any_of(w.values.begin(), w.values.end(), [](double v) { return v != 0.0; }))
        << where << " " << w.name << ": the reference is all zero";
    std::string misses;
    double worst = 0.0;
    const double fraction = fraction_within(got[o], w, misses, worst);
    const bool ok = fraction >= w.tol.min_fraction;
    EXPECT_TRUE(ok) << where << " " << w.name << ": " << fraction << " of " << w.values.size() << " values within atol "
                    << w.tol.atol << " + rtol " << w.tol.rtol << " (" << w.tol.why << "), need " << w.tol.min_fraction
                    << "; max |got - want| " << worst << misses;
    pass = pass && ok;
  }
  return pass;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

// One call of the row's op on fresh inputs, timed (setup is not).
double timed_call(OpCase& c, Backend& be) {
  if (c.overwrites_inputs()) c.setup(be);
  be.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  c.run(be);
  be.synchronize();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Calls per row: enough for about 0.2 s of timed work, between 5 and 200.
inline constexpr double kBenchSecondsPerRow = 0.2;

void bench_row(OpCase& c, Backend& be) {
  c.init();
  const Outputs want = c.reference();
  c.setup(be);
  const double warm = timed_call(c, be);
  const int reps = static_cast<int>(std::clamp(kBenchSecondsPerRow / std::max(warm, 1e-7), 5.0, 200.0));
  std::vector<double> times;
  for (int rep = 0; rep < reps; ++rep) times.push_back(timed_call(c, be));
  const bool valid = compare(c.name(), c.outputs(be), want);
  const Work work = c.work();
  const double t = median(times);
  std::printf("%-18s %-68s %5d %12.1f %12.1f %12.1f %9.2f %-7s %s\n", c.op().c_str(), c.vars().c_str(), reps, t * 1e6,
              *std::min_element(times.begin(), times.end()) * 1e6, *std::max_element(times.begin(), times.end()) * 1e6,
              work.amount / t / 1e9, work.flops ? "GFLOP/s" : "GB/s", valid ? "ok" : "WRONG");
  std::fflush(stdout);
}

void print_bench(const std::string& backend_name, Backend& be) {
  auto cases = backend_op_cases();
  std::printf(
      "# pipequant backend ops benchmark: backend %s; per row 1 warm-up call, then 5-200 timed calls (about %g s),\n"
      "# each on fresh inputs; time = median, spread = [min, max]; rate = work / median / 1e9 (GFLOP/s or GB/s);\n"
      "# check = the outputs of the last call against the reference with the row's tolerance\n",
      backend_name.c_str(), kBenchSecondsPerRow);
  std::vector<std::string> ops;  // each op's formula once
  for (const auto& c : cases)
    if (std::find(ops.begin(), ops.end(), c->op()) == ops.end()) {
      ops.push_back(c->op());
      std::printf("#   %-18s work = %s\n", c->op().c_str(), c->work().formula);
    }
  std::printf("%-18s %-68s %5s %12s %12s %12s %9s %-7s %s\n", "op", "vars", "reps", "median(us)", "min(us)", "max(us)",
              "rate", "unit", "check");
  for (const auto& c : cases) bench_row(*c, be);
}

class BenchTest : public ::testing::Test {
 public:
  BenchTest(std::string backend_name, std::function<std::unique_ptr<Backend>()> make_backend)
      : backend_name_(std::move(backend_name)), make_backend_(std::move(make_backend)) {}
  void TestBody() override {
    const std::unique_ptr<Backend> be = make_backend_();
    if (!be) GTEST_SKIP() << "no " << backend_name_ << " device";
    print_bench(backend_name_, *be);
  }

 private:
  std::string backend_name_;
  std::function<std::unique_ptr<Backend>()> make_backend_;
};

}  // namespace

std::vector<std::unique_ptr<OpCase>> backend_op_cases() {
  std::vector<std::unique_ptr<OpCase>> t;
  const auto add = [&t](auto* c) { t.emplace_back(c); };
  for (const bool integers : {true, false})
    for (const Trans ta : {Trans::kNo, Trans::kYes})
      for (const Trans tb : {Trans::kNo, Trans::kYes})
        add(integers ? new GemmCase(ta, tb, 37, 53, 71, true) : new GemmCase(ta, tb, 31, 45, 257, false));
  add(new GemmCase(Trans::kNo, Trans::kNo, 512, 512, 512, false));
  // several tiles of the CPU backend's output grid, ragged at both edges, for every transposition
  for (const Trans ta : {Trans::kNo, Trans::kYes})
    for (const Trans tb : {Trans::kNo, Trans::kYes}) add(new GemmCase(ta, tb, 600, 1100, 70, false));
  for (const HalfFormat f : {HalfFormat::kBF16, HalfFormat::kF16}) {
    add(new LinearHalfCase(f, 96, 80, 128, true));
    add(new LinearHalfCase(f, 37, 29, 300, false));
  }
  add(new LinearHalfCase(HalfFormat::kBF16, 128, 512, 1024, false));

  add(new RmsNormCase(37, 4096, false));
  add(new RmsNormCase(37, 4096, true));
  add(new RopeCase(2, 300, 3, 64));
  add(new RopeCase(3, 17, 4, 128));
  // partial query and key tiles, a single token, GQA, head_dim not a multiple of 32, the 256 maximum, many blocks
  const std::array<std::array<int64_t, 5>, 9> attention_shapes{{{2, 1, 8, 4, 64},
                                                                {2, 7, 8, 4, 64},
                                                                {2, 300, 8, 4, 64},
                                                                {3, 300, 4, 2, 32},
                                                                {1, 70, 6, 3, 96},
                                                                {2, 129, 2, 1, 128},
                                                                {1, 40, 2, 2, 256},
                                                                {1, 33, 4, 4, 8},
                                                                {1, 1024, 2, 1, 64}}};
  for (const auto& [samples, seq, heads, kv_heads, head_dim] : attention_shapes)
    add(new AttentionCase(samples, seq, heads, kv_heads, head_dim));
  add(new SwigluCase(10007, false));
  add(new SwigluCase(10007, true));
  add(new AddCase(33, 515, false));
  add(new AddCase(33, 515, true));
  add(new NllSumCase(57, 1003, 0.0f));
  add(new NllSumCase(50, 1000, 1000.0f));

  for (const int64_t k : {1, 70, 300, 600}) add(new HessianCase(150, k, true));
  add(new HessianCase(300, 333, false));
  add(new HessianCase(512, 384, false));
  add(new ReverseCholeskyCase(150, "spd"));
  add(new ReverseCholeskyCase(384, "spd"));
  add(new ReverseCholeskyCase(40, "indefinite"));
  add(new ReverseCholeskyCase(50, "nan"));
  for (const int bits : {2, 3, 4, 8})
    for (const bool sym : {false, true}) add(new QuantParamsCase(40, 75, 80, 3, QuantGrid{bits, sym}));
  add(new QuantParamsCase(1024, 1024, 1024, 1, QuantGrid{4, false}));
  for (const int bits : {2, 4, 8})
    for (const bool deq : {true, false}) add(new QuantizeCase(30, 64, 4, bits, true, deq));
  add(new QuantizeCase(1024, 1024, 8, 4, false, true));
  // dynamic groups crossing blocks and a ragged last block; tables up front; one group per row; blocks wider than
  // the CUDA kernel's shared-memory tile; 8 bits with blocks of 96; static groups under act-order; two panels of
  // gptq_columns' lazy update (lcm(200, 300) = 600 columns: three blocks, then a ragged panel of one)
  add(new GptqCase({300, 300, 32, true, false, {4, false}, 128}));
  add(new GptqCase({257, 256, 128, false, false, {4, true}, 128}));
  add(new GptqCase({130, 200, -1, false, false, {3, false}, 128}));
  add(new GptqCase({100, 400, 64, true, false, {2, false}, 200}));
  add(new GptqCase({64, 192, 128, true, false, {8, false}, 96}));
  add(new GptqCase({96, 240, 48, false, true, {4, false}, 128}));
  add(new GptqCase({48, 700, 300, true, false, {4, false}, 200}));
  return t;
}

std::string case_param_name(const ::testing::TestParamInfo<size_t>& info) {
  const auto cases = backend_op_cases();
  std::string name = cat(info.param, "_", cases[info.param]->op(), "_", cases[info.param]->vars());
  for (char& ch : name)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return name;
}

Outputs run_case(OpCase& c, Backend& backend) {
  c.init();
  c.setup(backend);
  c.run(backend);
  return c.outputs(backend);
}

void check_case(OpCase& c, Backend& backend) {
  const Outputs got = run_case(c, backend);
  compare(backend.name() + " " + c.name(), got, c.reference());
}

bool register_bench(const std::string& backend_name, std::function<std::unique_ptr<Backend>()> make_backend) {
  const char* requested = std::getenv("PIPEQUANT_BENCH_OPS");
  if (requested == nullptr || *requested == '\0') return false;
  ::testing::RegisterTest(
      "BackendOpsBench", backend_name.c_str(), nullptr, nullptr, __FILE__, __LINE__,
      [backend_name, make_backend]() -> ::testing::Test* { return new BenchTest(backend_name, make_backend); });
  return true;
}

}  // namespace pipequant::test
