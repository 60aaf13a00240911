#pragma once
// `pipequant bench gptq`: times the GPTQ solve on random weights and a correlated SPD Hessian, after a line
// that measures the machine's sgemm rate for scale.

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "kernels/backend.hpp"

namespace pipequant {

// shapes: "OUTxIN" (e.g. "4096x11008"); reps timed solves after one warm-up. Prints one row per shape with
// the median, min and max solve time, GFLOP/s counted as (K^3/3 + 2*N*K^2) / time, and the relative output
// error next to round-to-nearest's. Returns 0 when every result passed its check (finite, no fallback,
// better than RTN), 1 otherwise. Throws UserError for a malformed shape or argument.
// group: the shapes are instead the linears of one group sharing one Hessian (the same IN, e.g. q, k, v); one row
// times them as one gptq_quantize each (H factored per linear) and as one factor_hessian with a gptq_solve each,
// and checks that both give identical results (0) or not (1).
int run_bench_gptq(kernels::Backend& backend, const std::vector<std::string>& shapes, int reps, int bits,
                   int64_t group_size, bool group, std::ostream& os);

// `pipequant bench hessian`: times hessian_accumulate (H += X^T X) for X [tokens, K] at each width and
// prints the rate next to the backend's sgemm rate. Returns 0; throws UserError for a bad argument.
int run_bench_hessian(kernels::Backend& backend, const std::vector<int64_t>& widths, int64_t tokens, int reps,
                      std::ostream& os);

}  // namespace pipequant
