#pragma once
// The Mixture-of-Experts MLP of a block, as transformers' MixtralSparseMoeBlock computes it: router logits
// x W_router^T, a softmax over the experts in fp32, the top k per token, their weights renormalized to sum 1, and the
// output sum over those experts of weight * down(silu(gate x) * up x), added in expert order.
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
  // Takes a block's router and experts (uploaded in fp32).
  void set(const MoeWeights& weights);
  // out[rows, hidden] = the MoE MLP of xn[rows, hidden] (both backend memory).
  void forward(const float* xn, float* out, int64_t rows);

 private:
  // y[n, hidden] = expert e of x[n, hidden] (backend memory).
  void run_expert(size_t e, const float* x, float* y, int64_t n);

  kernels::Backend& backend_;
  const io::ModelConfig& config_;
  int64_t max_rows_;
  kernels::Buffer<float> router_;
  std::vector<std::array<kernels::Buffer<float>, 3>> experts_;  // gate, up, down
  kernels::Buffer<float> logits_, x_, g_, u_, y_;               // scratch for max_rows rows
};

}  // namespace pipequant
