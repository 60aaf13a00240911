#pragma once
// The Mixture-of-Experts MLP of a block, as transformers' MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock and
// Qwen2MoeSparseMoeBlock compute it: router logits x W_router^T, a softmax over the experts in fp32, the top k per
// token, their weights renormalized to sum 1 when norm_topk_prob (Mixtral always), and the output sum over those
// experts of weight * down(silu(gate x) * up x), added in expert order; then, with a shared expert (Qwen2-MoE),
// plus sigmoid(x W_shared_gate^T) * shared_expert(x) for every token.
//
// The routing runs on the host (route(), the readable reference); each expert's SwiGLU runs on the backend over the
// rows routed to it, gathered on the host, one sample at a time (so that no bit depends on the micro-batch). On a
// device backend that is a transfer per expert and sample: correct, not fast.

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

// A routing grouped by expert: expert e took rows row[offset[e]] .. row[offset[e + 1] - 1] (increasing), with
// weights weight[...] alike.
struct ExpertRows {
  std::vector<int64_t> offset;  // [experts + 1]
  std::vector<int32_t> row;
  std::vector<float> weight;
  int64_t count(int64_t e) const { return offset[static_cast<size_t>(e + 1)] - offset[static_cast<size_t>(e)]; }
};
ExpertRows group_by_expert(const Routing& routing, int64_t experts);

class MoeMlp {
 public:
  // Micro-batches of up to micro_batch samples of seq rows each.
  MoeMlp(kernels::Backend& backend, const io::ModelConfig& config, int64_t seq, int64_t micro_batch);
  // Takes a block's router, experts and shared expert (uploaded in fp32).
  void set(const MoeWeights& weights);
  // Replaces linear `which` (0 gate, 1 up, 2 down) of expert e (after it was quantized); e = num_experts: the
  // shared expert's.
  void set_expert_linear(int64_t e, int which, const Linear& w);
  // out[rows, hidden] = the MoE MLP of xn[rows, hidden] (both backend memory), one sample (seq rows) at a time.
  void forward(const float* xn, float* out, int64_t rows);
  // The routing of one sample's rows xn[rows, hidden] (backend memory, rows <= seq).
  Routing route_rows(const float* xn, int64_t rows);
  // y[n, width] = silu(gate x) * up x of expert e (num_experts: the shared expert) for x[n, hidden], n <= seq
  // (backend memory): its down_proj's inputs.
  void expert_hidden(int64_t e, const float* x, float* y, int64_t n);

 private:
  using SwiGlu = std::array<kernels::Buffer<float>, 3>;  // gate [inter, hidden], up [inter, hidden], down [hidden, inter]
  const SwiGlu& swiglu_of(int64_t e) const;             // e = num_experts: the shared expert
  int64_t width_of(int64_t e) const;
  // y[n, hidden] = expert e of x[n, hidden] (backend memory).
  void run_expert(int64_t e, const float* x, float* y, int64_t n);
  // out[rows, hidden] (host) = the MoE MLP of one sample's xn[rows, hidden] (host and backend copies).
  void mix_sample(const float* xn_host, const float* xn, float* out, int64_t rows);
  // out[rows, hidden] (host) += the shared expert's output for xn, scaled by its gate where it has one.
  void add_shared(const float* xn, int64_t rows, float* out);

  kernels::Backend& backend_;
  const io::ModelConfig& config_;
  int64_t seq_;
  int64_t max_rows_;
  kernels::Buffer<float> router_;
  std::vector<SwiGlu> experts_;
  SwiGlu shared_;                                  // the shared expert (config shared_expert())
  kernels::Buffer<float> shared_gate_;             // [1, hidden], empty where the shared expert has no gate
  kernels::Buffer<float> logits_, x_, g_, u_, y_;  // scratch for one sample's rows
};

}  // namespace pipequant
