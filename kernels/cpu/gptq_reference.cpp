// The readable GPTQ column loop and the plain reverse Cholesky (see gptq_reference.hpp).
#include "kernels/cpu/gptq_reference.hpp"

#include <algorithm>
#include <cmath>

#include "base/error.hpp"
#include "kernels/cpu/quant_grid.hpp"

namespace pipequant::kernels::reference {

namespace {

// Hinv = R^-1, upper triangular. H^-1 = R^-T R^-1 = Hinv^T Hinv, so Hinv is the upper Cholesky factor of H^-1
// that the GPTQ paper works with. Column c solves R u = e_c by back substitution.
std::vector<double> upper_inverse(const float* r, int64_t n) {
  std::vector<double> u(static_cast<size_t>(n * n), 0.0);
  const auto at = [n](int64_t i, int64_t j) { return static_cast<size_t>(i * n + j); };
  for (int64_t c = 0; c < n; ++c) {
    u[at(c, c)] = 1.0 / r[at(c, c)];
    for (int64_t i = c - 1; i >= 0; --i) {
      double sum = 0.0;
      for (int64_t t = i + 1; t <= c; ++t) sum += static_cast<double>(r[at(i, t)]) * u[at(t, c)];
      u[at(i, c)] = -sum / r[at(i, i)];
    }
  }
  return u;
}

// The tables the loop starts from: the given entries, or zeros where they are computed on the way.
void start_tables(const GptqColumnsInput& in, GptqColumnsResult& out) {
  const size_t entries = static_cast<size_t>(in.rows * in.groups);
  out.scales.assign(entries, 0.0f);
  out.zeros.assign(entries, 0.0f);
  if (in.scales) std::copy(in.scales, in.scales + entries, out.scales.begin());
  if (in.zeros) std::copy(in.zeros, in.zeros + entries, out.zeros.begin());
}

// Table entry i / size of every row, for the dynamic group that starts at column i: from the min/max of the
// group's columns in w_block, the weights as they stood when i's block began (a group may reach past the block).
void set_group_params(const GptqColumnsInput& in, const std::vector<double>& w_block, int64_t i,
                      GptqColumnsResult& out) {
  const int64_t end = std::min(i + in.dynamic_group_size, in.cols);
  const int64_t g = i / in.dynamic_group_size;
  for (int64_t r = 0; r < in.rows; ++r) {
    const double* row = w_block.data() + r * in.cols;
    const auto [lo, hi] = std::minmax_element(row + i, row + end);
    const ScaleZero p = params_from_range(static_cast<float>(*lo), static_cast<float>(*hi), in.grid);
    out.scales[static_cast<size_t>(r * in.groups + g)] = p.scale;
    out.zeros[static_cast<size_t>(r * in.groups + g)] = p.zero;
  }
}

}  // namespace

bool reverse_cholesky(const float* h, int64_t n, std::vector<double>& r) {
  PQ_ASSERT(h != nullptr && n > 0, "reference::reverse_cholesky: n = ", n);
  r.assign(static_cast<size_t>(n * n), 0.0);
  const auto at = [n](int64_t i, int64_t j) { return static_cast<size_t>(i * n + j); };
  // H = R R^T with R upper gives H[i, j] = sum_{k >= j} R[i, k] R[j, k] for i <= j: column j of R needs only the
  // columns after it, so the columns are computed from the last to the first.
  for (int64_t j = n - 1; j >= 0; --j) {
    double d = h[at(j, j)];
    for (int64_t k = j + 1; k < n; ++k) d -= r[at(j, k)] * r[at(j, k)];
    if (!(d > 0.0) || !std::isfinite(d)) return false;
    r[at(j, j)] = std::sqrt(d);
    for (int64_t i = 0; i < j; ++i) {
      double v = h[at(i, j)];
      for (int64_t k = j + 1; k < n; ++k) v -= r[at(i, k)] * r[at(j, k)];
      r[at(i, j)] = v / r[at(j, j)];
    }
  }
  return std::all_of(r.begin(), r.end(), [](double v) { return std::isfinite(v); });
}

GptqColumnsResult gptq_columns(const GptqColumnsInput& in) {
  PQ_ASSERT(in.rows > 0 && in.cols > 0 && in.groups > 0 && in.dynamic_group_size >= 0 && in.block > 0,
            "reference::gptq_columns: rows ", in.rows, " cols ", in.cols, " groups ", in.groups, " block ", in.block);
  PQ_ASSERT(in.r && in.w && in.param_of, "reference::gptq_columns: null pointer");
  const int64_t rows = in.rows, cols = in.cols;
  const double maxq = in.grid.maxq();
  const std::vector<double> hinv = upper_inverse(in.r, cols);
  std::vector<double> w(in.w, in.w + rows * cols);  // the weights, updated as the loop goes
  std::vector<double> w_block;                      // w as it stood when the current block began

  GptqColumnsResult out;
  out.q.assign(static_cast<size_t>(rows * cols), 0);
  out.deq.assign(static_cast<size_t>(rows * cols), 0.0);
  out.err2.assign(static_cast<size_t>(rows), 0.0);
  start_tables(in, out);

  for (int64_t i = 0; i < cols; ++i) {
    if (i % in.block == 0) w_block = w;
    if (in.dynamic_group_size > 0 && i % in.dynamic_group_size == 0) set_group_params(in, w_block, i, out);
    const double d = hinv[static_cast<size_t>(i * cols + i)];
    for (int64_t r = 0; r < rows; ++r) {
      double* row = w.data() + r * cols;
      const size_t entry = static_cast<size_t>(r * in.groups + in.param_of[i]);
      const double scale = out.scales[entry], zero = out.zeros[entry];
      const double code = std::clamp(std::nearbyint(row[i] / scale) + zero, 0.0, maxq);
      const double deq = scale * (code - zero);
      const double err = (row[i] - deq) / d;
      for (int64_t j = i + 1; j < cols; ++j) row[j] -= err * hinv[static_cast<size_t>(i * cols + j)];
      out.q[static_cast<size_t>(r * cols + i)] = static_cast<uint8_t>(code);
      out.deq[static_cast<size_t>(r * cols + i)] = deq;
      out.err2[static_cast<size_t>(r)] += err * err;
    }
  }
  return out;
}

}  // namespace pipequant::kernels::reference
