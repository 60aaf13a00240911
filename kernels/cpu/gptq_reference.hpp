#pragma once
// The readable GPTQ: the column loop of the GPTQ paper (Frantar et al. 2022, Algorithm 1) in double precision,
// one column at a time with every later column updated right away: no tiles, no lanes, no lazy batches. It is
// the specification that CpuBackend::gptq_block (fp32, 16-lane tiles, lazy block updates) and the CUDA kernel
// are tested against; beside it, the plain Cholesky factorization that reverse_cholesky is tested against.
// Written to be read, not to be fast: O(rows * cols^2) in double with plain loops.

#include <cstdint>
#include <vector>

#include "kernels/backend.hpp"

namespace pipequant::kernels::reference {

// H = R R^T with R upper triangular, in double: the plain version of Backend::reverse_cholesky. h [n, n] is
// symmetric (its upper triangle is read); r is resized to [n, n] and gets R with a zero lower triangle.
// Returns false when H is not positive definite or holds a non-finite value.
bool reverse_cholesky(const float* h, int64_t n, std::vector<double>& r);

// The column loop's inputs, as the fast path takes them (GptqBlockArgs), for all columns at once. Columns are in
// processing order: act-order and static groups are the caller's permutation and its param_of.
struct GptqColumnsInput {
  int64_t rows = 0;                   // out_features
  int64_t cols = 0;                   // in_features
  const float* r = nullptr;           // R [cols, cols], upper triangular, H_damped = R R^T (reverse_cholesky's)
  const float* w = nullptr;           // weights [rows, cols] (dead columns zeroed)
  const float* scales = nullptr;      // scale table [rows, groups] given up front; null: all 0
  const float* zeros = nullptr;       // zero table [rows, groups] given up front; null: all 0
  int64_t groups = 0;                 // columns of the tables
  const int32_t* param_of = nullptr;  // [cols]: the table entry that quantizes the column at position j
  int64_t dynamic_group_size = 0;     // > 0: entry j / size is computed when position j starts a group, from the
                                      //      weights as they stood when j's block began; 0: the tables are given
  int64_t block = 128;                // the block of Backend::gptq_columns: only the dynamic group parameters see it
  QuantGrid grid;
};

struct GptqColumnsResult {
  std::vector<uint8_t> q;     // codes [rows, cols]
  std::vector<double> deq;    // scale * (q - zero) [rows, cols]
  std::vector<float> scales;  // the tables as used [rows, groups]
  std::vector<float> zeros;
  std::vector<double> err2;  // per row: sum over the columns of err^2 (the GPTQ loss, as GptqBlockArgs::err2)
};

// For each column i in order: quantize it with its table entry, err = (w_i - q_i) / Hinv[i, i], and
// w_j -= err * Hinv[i, j] for every later column j, where Hinv = R^-1 is the upper Cholesky factor of H^-1.
// A dynamic group's parameters come from the weights as they stood at the start of the block that holds the
// group's first column, not from the current ones: the GPTQ reference code (IST-DASLab fasterquant) reads them
// from its W, which its lazy batches bring up to date only at block ends, and the fast path keeps that.
GptqColumnsResult gptq_columns(const GptqColumnsInput& in);

}  // namespace pipequant::kernels::reference
