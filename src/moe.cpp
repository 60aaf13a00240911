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

namespace {

kernels::Buffer<float> uploaded(kernels::Backend& backend, const std::vector<float>& v) {
  kernels::Buffer<float> b(backend, static_cast<int64_t>(v.size()));
  backend.upload(b.data(), v.data(), v.size() * sizeof(float));
  return b;
}

}  // namespace

MoeMlp::MoeMlp(kernels::Backend& backend, const io::ModelConfig& config, int64_t max_rows)
    : backend_(backend), config_(config), max_rows_(max_rows) {
  PQ_ASSERT(config.moe(), "MoeMlp: the config has no experts");
  const int64_t h = config.hidden_size;
  const int64_t inter = std::max(config.expert_intermediate_size, config.shared_expert_intermediate_size);
  logits_ = kernels::Buffer<float>(backend, max_rows * std::max<int64_t>(config.num_experts, 1));
  x_ = kernels::Buffer<float>(backend, max_rows * h);
  g_ = kernels::Buffer<float>(backend, max_rows * inter);
  u_ = kernels::Buffer<float>(backend, max_rows * inter);
  y_ = kernels::Buffer<float>(backend, max_rows * h);
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

void MoeMlp::run_swiglu(const SwiGlu& w, int64_t inter, const float* x, float* y, int64_t n) {
  const int64_t h = config_.hidden_size;
  backend_.linear(x, w[0].data(), g_.data(), n, inter, h);
  backend_.linear(x, w[1].data(), u_.data(), n, inter, h);
  backend_.swiglu(g_.data(), u_.data(), g_.data(), n * inter);
  backend_.linear(g_.data(), w[2].data(), y, n, h, inter);
}

void MoeMlp::add_routed(const float* xn, int64_t rows, std::vector<float>& sum) {
  const int64_t h = config_.hidden_size, experts = config_.num_experts;
  backend_.linear(xn, router_.data(), logits_.data(), rows, experts, h);
  std::vector<float> logits(static_cast<size_t>(rows * experts)), x(static_cast<size_t>(rows * h));
  backend_.download(logits.data(), logits_.data(), logits.size() * sizeof(float));
  backend_.download(x.data(), xn, x.size() * sizeof(float));
  const Routing r = route(logits.data(), rows, experts, config_.experts_per_token, config_.norm_topk_prob);
  std::vector<float> gathered, y;
  for (int64_t e = 0; e < experts; ++e) {  // in expert order, as transformers adds them
    std::vector<int64_t> picked;
    std::vector<float> weight;
    for (int64_t i = 0; i < rows * r.k; ++i)
      if (r.expert[static_cast<size_t>(i)] == e) {
        picked.push_back(i / r.k);
        weight.push_back(r.weight[static_cast<size_t>(i)]);
      }
    if (picked.empty()) continue;
    const auto n = static_cast<int64_t>(picked.size());
    gathered.resize(static_cast<size_t>(n * h));
    for (int64_t j = 0; j < n; ++j)
      std::copy_n(x.begin() + picked[static_cast<size_t>(j)] * h, h, gathered.begin() + j * h);
    backend_.upload(x_.data(), gathered.data(), gathered.size() * sizeof(float));
    run_swiglu(experts_[static_cast<size_t>(e)], config_.expert_intermediate_size, x_.data(), y_.data(), n);
    y.resize(static_cast<size_t>(n * h));
    backend_.download(y.data(), y_.data(), y.size() * sizeof(float));
    for (int64_t j = 0; j < n; ++j) {
      float* s = sum.data() + picked[static_cast<size_t>(j)] * h;
      const float* yj = y.data() + j * h;
      for (int64_t c = 0; c < h; ++c) s[c] += yj[c] * weight[static_cast<size_t>(j)];
    }
  }
}

void MoeMlp::add_shared(const float* xn, int64_t rows, std::vector<float>& sum) {
  const int64_t h = config_.hidden_size;
  run_swiglu(shared_, config_.shared_expert_intermediate_size, xn, y_.data(), rows);
  std::vector<float> y(static_cast<size_t>(rows * h)), scale(static_cast<size_t>(rows), 1.0f);
  backend_.download(y.data(), y_.data(), y.size() * sizeof(float));
  if (shared_gate_.size() > 0) {  // sigmoid(x W_gate^T) [rows, 1]
    backend_.linear(xn, shared_gate_.data(), logits_.data(), rows, 1, h);
    backend_.download(scale.data(), logits_.data(), scale.size() * sizeof(float));
    for (float& v : scale) v = 1.0f / (1.0f + std::exp(-v));
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < h; ++c)
      sum[static_cast<size_t>(r * h + c)] += scale[static_cast<size_t>(r)] * y[static_cast<size_t>(r * h + c)];
}

void MoeMlp::forward(const float* xn, float* out, int64_t rows) {
  PQ_ASSERT(rows <= max_rows_, "MoeMlp::forward: ", rows, " rows, at most ", max_rows_);
  std::vector<float> sum(static_cast<size_t>(rows * config_.hidden_size), 0.0f);
  add_routed(xn, rows, sum);
  if (config_.shared_expert()) add_shared(xn, rows, sum);
  backend_.upload(out, sum.data(), sum.size() * sizeof(float));
}

}  // namespace pipequant
