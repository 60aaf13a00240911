#pragma once
// The block-by-block driver: quantize a checkpoint (docs/design.md section 2) and evaluate perplexity through the
// same block forward.

#include <cstdint>
#include <string>
#include <vector>

#include "src/options.hpp"
#include "src/report.hpp"

namespace pipequant {

struct EvalResult {
  double perplexity = 0.0;
  double nll_sum = 0.0;
  int64_t predicted = 0;
  int64_t windows = 0;
  double seconds = 0.0;
};

// Both throw UserError for bad inputs; both print progress on rank 0.
std::vector<StageMetrics> run_quantize(const QuantizeOptions& options);
EvalResult run_eval(const EvalOptions& options);

// Logits [tokens.size(), vocab] of one sequence through the original checkpoint (tests, debugging).
std::vector<float> sequence_logits(const std::string& model_dir, const std::vector<int32_t>& tokens,
                                   const RunOptions& run);

}  // namespace pipequant
