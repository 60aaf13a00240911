#include "src/moe.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "base/error.hpp"

namespace pipequant {

Routing route(const float* logits, int64_t rows, int64_t experts, int64_t k, bool renormalize) {
  PQ_ASSERT(k > 0 && k <= experts, "route: top ", k, " of ", experts, " experts");
  Routing r;
  r.k = k;
  r.expert.resize(static_cast<size_t>(rows * k));
  r.weight.resize(static_cast<size_t>(rows * k));
  std::vector<float> p(static_cast<size_t>(experts));
  std::vector<int32_t> order(static_cast<size_t>(experts));
  for (int64_t row = 0; row < rows; ++row) {
    const float* l = logits + row * experts;
    const float m = *std::max_element(l, l + experts);
    float sum = 0.0f;
    for (int64_t e = 0; e < experts; ++e) sum += p[static_cast<size_t>(e)] = std::exp(l[e] - m);
    for (float& v : p) v /= sum;
    std::iota(order.begin(), order.end(), 0);
    // the k largest, the lower index first among equals (deterministic)
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return p[static_cast<size_t>(a)] > p[static_cast<size_t>(b)] || (p[static_cast<size_t>(a)] == p[static_cast<size_t>(b)] && a < b);
    });
    float chosen = 0.0f;
    for (int64_t j = 0; j < k; ++j) chosen += p[static_cast<size_t>(order[static_cast<size_t>(j)])];
    for (int64_t j = 0; j < k; ++j) {
      const auto at = static_cast<size_t>(row * k + j);
      r.expert[at] = order[static_cast<size_t>(j)];
      r.weight[at] = renormalize ? p[static_cast<size_t>(r.expert[at])] / chosen : p[static_cast<size_t>(r.expert[at])];
    }
  }
  return r;
}

ExpertRows group_by_expert(const Routing& r, int64_t experts) {
  ExpertRows g;
  g.offset.assign(static_cast<size_t>(experts + 1), 0);
  for (const int32_t e : r.expert) ++g.offset[static_cast<size_t>(e + 1)];
  for (int64_t e = 0; e < experts; ++e) g.offset[static_cast<size_t>(e + 1)] += g.offset[static_cast<size_t>(e)];
  g.row.resize(r.expert.size());
  g.weight.resize(r.expert.size());
  std::vector<int64_t> next(g.offset.begin(), g.offset.end() - 1);
  for (size_t i = 0; i < r.expert.size(); ++i) {  // rows in increasing order within each expert
    const auto at = static_cast<size_t>(next[static_cast<size_t>(r.expert[i])]++);
    g.row[at] = static_cast<int32_t>(static_cast<int64_t>(i) / r.k);
    g.weight[at] = r.weight[i];
  }
  return g;
}

namespace {

kernels::Buffer<float> uploaded(kernels::Backend& backend, const std::vector<float>& v) {
  kernels::Buffer<float> b(backend, static_cast<int64_t>(v.size()));
  backend.upload(b.data(), v.data(), v.size() * sizeof(float));
  return b;
}

}  // namespace

MoeMlp::MoeMlp(kernels::Backend& backend, const io::ModelConfig& config, int64_t seq, int64_t micro_batch)
    : backend_(backend), config_(config), seq_(seq), max_rows_(seq * micro_batch) {
  PQ_ASSERT(config.moe(), "MoeMlp: the config has no experts");
  const int64_t h = config.hidden_size;
  const int64_t inter = std::max(config.expert_intermediate_size, config.shared_expert_intermediate_size);
  logits_ = kernels::Buffer<float>(backend, seq * std::max<int64_t>(config.num_experts, 1));
  x_ = kernels::Buffer<float>(backend, seq * h);
  g_ = kernels::Buffer<float>(backend, seq * inter);
  u_ = kernels::Buffer<float>(backend, seq * inter);
  y_ = kernels::Buffer<float>(backend, seq * h);
}

namespace {

std::array<kernels::Buffer<float>, 3> uploaded_swiglu(kernels::Backend& backend, const ExpertWeights& e) {
  return {uploaded(backend, e.gate.to_f32()), uploaded(backend, e.up.to_f32()), uploaded(backend, e.down.to_f32())};
}

}  // namespace

void MoeMlp::set(const MoeWeights& weights) {
  PQ_ASSERT(static_cast<int64_t>(weights.experts.size()) == config_.num_experts &&
                static_cast<int64_t>(weights.router.size()) == config_.num_experts * config_.hidden_size,
            "MoeMlp::set: ", weights.experts.size(), " experts and a router of ", weights.router.size(), " values");
  PQ_ASSERT(weights.shared.has_value() == config_.shared_expert(), "MoeMlp::set: a shared expert ",
            weights.shared ? "given" : "missing", " (config shared_expert_intermediate_size ",
            config_.shared_expert_intermediate_size, ")");
  router_ = uploaded(backend_, weights.router);
  experts_.clear();
  for (const ExpertWeights& e : weights.experts) experts_.push_back(uploaded_swiglu(backend_, e));
  if (weights.shared) {
    shared_ = uploaded_swiglu(backend_, weights.shared->mlp);
    shared_gate_ = weights.shared->gate.empty() ? kernels::Buffer<float>() : uploaded(backend_, weights.shared->gate);
  }
}

const MoeMlp::SwiGlu& MoeMlp::swiglu_of(int64_t e) const {
  PQ_ASSERT(e >= 0 && e <= config_.num_experts && (e < config_.num_experts || config_.shared_expert()),
            "MoeMlp: expert ", e, " of ", config_.num_experts);
  return e == config_.num_experts ? shared_ : experts_[static_cast<size_t>(e)];
}

int64_t MoeMlp::width_of(int64_t e) const {
  return e == config_.num_experts ? config_.shared_expert_intermediate_size : config_.expert_intermediate_size;
}

void MoeMlp::set_expert_linear(int64_t e, int which, const Linear& w) {
  PQ_ASSERT(which >= 0 && which < 3, "set_expert_linear: linear ", which);
  swiglu_of(e);  // checks e
  kernels::Buffer<float>& b =
      (e == config_.num_experts ? shared_ : experts_[static_cast<size_t>(e)])[static_cast<size_t>(which)];
  PQ_ASSERT(b.size() == w.out * w.in, "set_expert_linear: ", w.out, " x ", w.in, " for ", b.size(), " values");
  const std::vector<float> f = w.to_f32();
  backend_.upload(b.data(), f.data(), f.size() * sizeof(float));
}

void MoeMlp::expert_hidden(int64_t e, const float* x, float* y, int64_t n) {
  PQ_ASSERT(n <= seq_, "MoeMlp::expert_hidden: ", n, " rows, at most ", seq_);
  const int64_t h = config_.hidden_size, inter = width_of(e);
  const SwiGlu& w = swiglu_of(e);
  backend_.linear(x, w[0].data(), y, n, inter, h);
  backend_.linear(x, w[1].data(), u_.data(), n, inter, h);
  backend_.swiglu(y, u_.data(), y, n * inter);
}

void MoeMlp::run_expert(int64_t e, const float* x, float* y, int64_t n) {
  expert_hidden(e, x, g_.data(), n);
  backend_.linear(g_.data(), swiglu_of(e)[2].data(), y, n, config_.hidden_size, width_of(e));
}

Routing MoeMlp::route_rows(const float* xn, int64_t rows) {
  PQ_ASSERT(rows <= seq_, "MoeMlp::route_rows: ", rows, " rows, at most ", seq_);
  const int64_t experts = config_.num_experts;
  backend_.linear(xn, router_.data(), logits_.data(), rows, experts, config_.hidden_size);
  std::vector<float> logits(static_cast<size_t>(rows * experts));
  backend_.download(logits.data(), logits_.data(), logits.size() * sizeof(float));
  return route(logits.data(), rows, experts, config_.experts_per_token, config_.norm_topk_prob);
}

void MoeMlp::mix_sample(const float* xn_host, const float* xn, float* out, int64_t rows) {
  const int64_t h = config_.hidden_size, experts = config_.num_experts;
  const ExpertRows g = group_by_expert(route_rows(xn, rows), experts);
  std::fill(out, out + rows * h, 0.0f);
  std::vector<float> gathered, y;
  for (int64_t e = 0; e < experts; ++e) {  // in expert order, as transformers adds them
    const int64_t n = g.count(e), first = g.offset[static_cast<size_t>(e)];
    if (n == 0) continue;
    gathered.resize(static_cast<size_t>(n * h));
    for (int64_t j = 0; j < n; ++j)
      std::copy_n(xn_host + g.row[static_cast<size_t>(first + j)] * h, h, gathered.begin() + j * h);
    backend_.upload(x_.data(), gathered.data(), gathered.size() * sizeof(float));
    run_expert(e, x_.data(), y_.data(), n);
    y.resize(static_cast<size_t>(n * h));
    backend_.download(y.data(), y_.data(), y.size() * sizeof(float));
    for (int64_t j = 0; j < n; ++j) {
      float* s = out + g.row[static_cast<size_t>(first + j)] * h;
      const float* yj = y.data() + j * h;
      const float w = g.weight[static_cast<size_t>(first + j)];
      for (int64_t c = 0; c < h; ++c) s[c] += yj[c] * w;
    }
  }
  if (config_.shared_expert()) add_shared(xn, rows, out);
}

void MoeMlp::add_shared(const float* xn, int64_t rows, float* out) {
  const int64_t h = config_.hidden_size;
  run_expert(config_.num_experts, xn, y_.data(), rows);
  std::vector<float> y(static_cast<size_t>(rows * h)), scale(static_cast<size_t>(rows), 1.0f);
  backend_.download(y.data(), y_.data(), y.size() * sizeof(float));
  if (shared_gate_.size() > 0) {  // sigmoid(x W_gate^T) [rows, 1]
    backend_.linear(xn, shared_gate_.data(), logits_.data(), rows, 1, h);
    backend_.download(scale.data(), logits_.data(), scale.size() * sizeof(float));
    for (float& v : scale) v = 1.0f / (1.0f + std::exp(-v));
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < h; ++c) out[r * h + c] += scale[static_cast<size_t>(r)] * y[static_cast<size_t>(r * h + c)];
}

void MoeMlp::forward(const float* xn, float* out, int64_t rows) {
  PQ_ASSERT(rows <= max_rows_, "MoeMlp::forward: ", rows, " rows, at most ", max_rows_);
  const int64_t h = config_.hidden_size;
  std::vector<float> x(static_cast<size_t>(rows * h)), sum(static_cast<size_t>(rows * h));
  backend_.download(x.data(), xn, x.size() * sizeof(float));
  for (int64_t r0 = 0; r0 < rows; r0 += seq_) {
    const int64_t n = std::min(seq_, rows - r0);
    mix_sample(x.data() + r0 * h, xn + r0 * h, sum.data() + r0 * h, n);
  }
  backend_.upload(out, sum.data(), sum.size() * sizeof(float));
}

}  // namespace pipequant
