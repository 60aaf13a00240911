#pragma once
// The Mixture-of-Experts MLP of a block, as transformers' MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock and
// Qwen2MoeSparseMoeBlock compute it: router logits x W_router^T, a softmax over the experts in fp32, the top k per
// token, their weights renormalized to sum 1 when norm_topk_prob (Mixtral always), and the output sum over those
// experts of weight * down(silu(gate x) * up x), added in expert order; then, with a shared expert (Qwen2-MoE),
// plus sigmoid(x W_shared_gate^T) * shared_expert(x) for every token.
//
// The routing runs on the host (route(), the readable reference); each expert's SwiGLU runs on the backend over the
// rows routed to it, gathered on the host. On a device backend that is a transfer per expert: correct, not fast.

#include <cstdint>
#include <vector>

#include "io/model_config.hpp"
#include "kernels/backend.hpp"
#include "src/model.hpp"

namespace pipequant {

// Each row's experts and weights: expert[r * k + j], weight[r * k + j] for its j-th choice (descending weight, the
// lower expert index first among equal logits).
struct Routing {
  int64_t k = 0;
  std::vector<int32_t> expert;
  std::vector<float> weight;
};

// The routing of `rows` rows from their router logits [rows, experts]: softmax in fp32 (max subtracted), top k,
// weights divided by their sum when `renormalize`.
Routing route(const float* logits, int64_t rows, int64_t experts, int64_t k, bool renormalize);

class MoeMlp {
 public:
  // max_rows: the most rows forward() is given (a micro-batch).
  MoeMlp(kernels::Backend& backend, const io::ModelConfig& config, int64_t max_rows);
  // Takes a block's router, experts and shared expert (uploaded in fp32).
  void set(const MoeWeights& weights);
  // out[rows, hidden] = the MoE MLP of xn[rows, hidden] (both backend memory).
  void forward(const float* xn, float* out, int64_t rows);

 private:
  using SwiGlu =
      std::array<kernels::Buffer<float>, 3>;  // gate [inter, hidden], up [inter, hidden], down [hidden, inter]
  // y[n, hidden] = the SwiGLU MLP w of width inter of x[n, hidden] (backend memory).
  void run_swiglu(const SwiGlu& w, int64_t inter, const float* x, float* y, int64_t n);
  // sum[rows, hidden] (host) += the routed experts' weighted outputs for xn[rows, hidden] (backend memory).
  void add_routed(const float* xn, int64_t rows, std::vector<float>& sum);
  // sum[rows, hidden] (host) += the shared expert's output for xn, scaled by its gate where it has one.
  void add_shared(const float* xn, int64_t rows, std::vector<float>& sum);

  kernels::Backend& backend_;
  const io::ModelConfig& config_;
  int64_t max_rows_;
  kernels::Buffer<float> router_;
  std::vector<SwiGlu> experts_;
  SwiGlu shared_;                                  // the shared expert (config shared_expert())
  kernels::Buffer<float> shared_gate_;             // [1, hidden], empty where the shared expert has no gate
  kernels::Buffer<float> logits_, x_, g_, u_, y_;  // scratch for max_rows rows
};

}  // namespace pipequant
