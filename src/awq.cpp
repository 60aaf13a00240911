#include "src/awq.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "base/error.hpp"
#include "base/numeric.hpp"

namespace pipequant {

std::vector<float> channel_magnitudes(const std::vector<float>& h, int64_t cols) {
  PQ_ASSERT(static_cast<int64_t>(h.size()) == cols * cols, "channel_magnitudes: H is not [", cols, ", ", cols, "]");
  std::vector<float> m(static_cast<size_t>(cols));
  for (int64_t k = 0; k < cols; ++k)
    m[static_cast<size_t>(k)] = std::sqrt(std::max(0.0f, h[static_cast<size_t>(k * cols + k)]) / 2.0f);
  return m;
}

std::vector<float> awq_scales(const std::vector<float>& magnitudes, double alpha) {
  std::vector<float> s(magnitudes.size());
  float lo = std::numeric_limits<float>::max(), hi = 0.0f;
  for (size_t k = 0; k < s.size(); ++k) {
    s[k] = std::max(static_cast<float>(std::pow(static_cast<double>(magnitudes[k]), alpha)), kAwqMinScale);
    lo = std::min(lo, s[k]);
    hi = std::max(hi, s[k]);
  }
  const float norm = std::sqrt(hi * lo);
  for (float& v : s) v /= norm;
  return s;
}

namespace {

// w [rows, cols] times s per column, into out.
void scale_columns(const float* w, int64_t rows, int64_t cols, const std::vector<float>& s, float* out) {
#pragma omp parallel for schedule(static) if (rows * cols >= (int64_t{1} << 20))
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = w[r * cols + c] * s[static_cast<size_t>(c)];
}

// In place: w [rows, cols] divided by s per column.
void unscale_columns(float* w, int64_t rows, int64_t cols, const std::vector<float>& s) {
#pragma omp parallel for schedule(static) if (rows * cols >= (int64_t{1} << 20))
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) w[r * cols + c] /= s[static_cast<size_t>(c)];
}

// Q(W diag(s)) diag(s)^-1 for w [rows, cols] (host), by round to nearest.
std::vector<float> scaled_rtn(kernels::Backend& backend, const float* w, int64_t rows, int64_t cols,
                              const std::vector<float>& s, const QuantConfig& config) {
  std::vector<float> ws(static_cast<size_t>(rows * cols));
  scale_columns(w, rows, cols, s, ws.data());
  std::vector<float> wq = rtn_quantize(backend, ws.data(), rows, cols, nullptr, config).dequantize();
  unscale_columns(wq.data(), rows, cols, s);
  return wq;
}

// The rows of a linear the search measures, fp32 [rows, cols], and what their error counts for: rows / measured,
// so that each linear weighs in with all its rows (q_proj has 16x the rows of k_proj in a 405B model).
struct MeasuredRows {
  std::vector<float> w;
  double weight = 1.0;
};

// All rows of each linear while the group's rows fit max_floats, else as many evenly spaced ones as fit, the same
// share of every linear's rows (the same on every rank), held for the whole search.
std::vector<MeasuredRows> search_rows(const std::vector<AwqLinear>& linears, int64_t cols, int64_t max_floats) {
  int64_t total = 0;
  for (const AwqLinear& lin : linears) total += lin.rows;
  const double share = std::min(1.0, static_cast<double>(max_floats) / static_cast<double>(total * cols));
  std::vector<MeasuredRows> out;
  for (const AwqLinear& lin : linears) {
    const int64_t keep = std::clamp<int64_t>(static_cast<int64_t>(share * static_cast<double>(lin.rows)), 1, lin.rows);
    std::vector<float> w(static_cast<size_t>(keep * cols));
    if (keep == lin.rows)
      lin.rows_f32(0, lin.rows, w.data());
    else
      for (int64_t i = 0; i < keep; ++i) {
        const int64_t r = i * lin.rows / keep;
        lin.rows_f32(r, r + 1, w.data() + i * cols);
      }
    out.push_back({std::move(w), static_cast<double>(lin.rows) / static_cast<double>(keep)});
  }
  return out;
}

// The summed tr(D H D^T) over the measured rows for the scales s, a chunk of rows at a time.
double scaled_rtn_error2(kernels::Backend& backend, const std::vector<MeasuredRows>& rows, int64_t cols,
                         const std::vector<float>& s, const float* hb, const QuantConfig& config) {
  double e2 = 0.0;
  const int64_t chunk = std::max<int64_t>(1, kErrorChunkFloats / (2 * cols));
  for (const auto& [w, weight] : rows) {
    const int64_t n = static_cast<int64_t>(w.size()) / cols;
    double part = 0.0;
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t m = std::min(chunk, n - r0);
      const float* wr = w.data() + r0 * cols;
      const std::vector<float> wq = scaled_rtn(backend, wr, m, cols, s, config);
      part += output_error2(backend, wr, wq.data(), m, cols, hb);
    }
    e2 += weight * part;
  }
  return e2;
}

}  // namespace

AwqScaleChoice search_awq_scales(kernels::Backend& backend, const std::vector<AwqLinear>& linears, int64_t cols,
                                 const std::vector<float>& magnitudes, const float* h_backend,
                                 const QuantConfig& config, int64_t max_floats) {
  PQ_ASSERT(static_cast<int64_t>(magnitudes.size()) == cols && !linears.empty(), "search_awq_scales: bad arguments");
  AwqScaleChoice best;
  const std::vector<MeasuredRows> rows = search_rows(linears, cols, max_floats);
  for (int i = 0; i <= kAwqScaleGrid; ++i) {
    const double alpha = static_cast<double>(i) / kAwqScaleGrid;
    std::vector<float> s = awq_scales(magnitudes, alpha);
    const double e2 = scaled_rtn_error2(backend, rows, cols, s, h_backend, config);
    if (i == 0) best.rtn_error2 = e2;
    if (i == 0 || e2 < best.error2) {  // ties keep the smaller exponent
      best.grid = i;
      best.alpha = alpha;
      best.error2 = e2;
      best.scales = std::move(s);
    }
  }
  return best;
}

namespace {

// The column ranges of the natural groups of `cols` inputs.
std::vector<std::pair<int64_t, int64_t>> natural_groups(int64_t cols, int64_t group_size) {
  std::vector<std::pair<int64_t, int64_t>> g;
  const int64_t size = group_size > 0 ? group_size : cols;
  for (int64_t c0 = 0; c0 < cols; c0 += size) g.emplace_back(c0, std::min(cols, c0 + size));
  return g;
}

// ws [rows, cols] with each (row, group) clamped to +-ratio x its largest magnitude, into out.
void clamp_groups(const float* ws, int64_t rows, int64_t cols, const std::vector<std::pair<int64_t, int64_t>>& groups,
                  float ratio, float* out) {
#pragma omp parallel for schedule(static) if (rows * cols >= (int64_t{1} << 20))
  for (int64_t r = 0; r < rows; ++r)
    for (const auto& [c0, c1] : groups) {
      const float* in = ws + r * cols;
      float top = 0.0f;
      for (int64_t c = c0; c < c1; ++c) top = std::max(top, std::fabs(in[c]));
      const float limit = top * ratio;
      for (int64_t c = c0; c < c1; ++c) out[r * cols + c] = std::clamp(in[c], -limit, limit);
    }
}

// d_g H_gg d_g^T for d [cols] (one row of D, unscaled coordinates) and the group's columns [c0, c1).
double group_error2(const float* d, const float* h, int64_t cols, int64_t c0, int64_t c1) {
  double e = 0.0;
  for (int64_t i = c0; i < c1; ++i) {
    if (d[i] == 0.0f) continue;
    double hd = 0.0;
    for (int64_t j = c0; j < c1; ++j) hd += static_cast<double>(h[i * cols + j]) * d[j];
    e += static_cast<double>(d[i]) * hd;
  }
  return e;
}

// Copies (row r, group g) of `from` into `to` (same shape): codes over the group's columns, scale and zero.
void take_group(const QuantizedLinear& from, QuantizedLinear& to, int64_t r, int64_t g, int64_t c0, int64_t c1) {
  const int64_t cols = from.cols;
  std::copy(from.q.begin() + r * cols + c0, from.q.begin() + r * cols + c1, to.q.begin() + r * cols + c0);
  const auto t = static_cast<size_t>(g * from.rows + r);
  to.scales[t] = from.scales[t];
  to.zeros[t] = from.zeros[t];
}

}  // namespace

AwqQuantized awq_quantize(kernels::Backend& backend, const float* w, int64_t rows, int64_t cols,
                          const std::vector<float>& scales, const float* h_host, const float* h_backend, bool clip,
                          const QuantConfig& config) {
  PQ_ASSERT(w && h_host && rows > 0 && static_cast<int64_t>(scales.size()) == cols, "awq_quantize: bad arguments");
  const auto groups = natural_groups(cols, config.group_size);
  const int steps = clip ? kAwqClipSteps : 1;
  std::vector<float> ws(static_cast<size_t>(rows * cols)), wc(clip ? ws.size() : 0), d(wc.size());
  scale_columns(w, rows, cols, scales, ws.data());
  AwqQuantized out;
  std::vector<double> best(static_cast<size_t>(rows) * groups.size(), std::numeric_limits<double>::infinity());
  std::vector<float> chosen(best.size(), 1.0f);
  for (int i = 0; i < steps; ++i) {
    const float ratio = 1.0f - static_cast<float>(i) / (2.0f * kAwqClipSteps);
    if (i > 0) clamp_groups(ws.data(), rows, cols, groups, ratio, wc.data());  // ratio 1 clamps nothing
    QuantizedLinear q = rtn_quantize(backend, i > 0 ? wc.data() : ws.data(), rows, cols, nullptr, config);
    if (i == 0) out.q = q;
    if (steps == 1) break;
    const std::vector<float> wq = q.dequantize();
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      float* dr = d.data() + r * cols;
      for (int64_t c = 0; c < cols; ++c)
        dr[c] = w[r * cols + c] - wq[static_cast<size_t>(r * cols + c)] / scales[static_cast<size_t>(c)];
      for (size_t g = 0; g < groups.size(); ++g) {
        const double e = group_error2(dr, h_host, cols, groups[g].first, groups[g].second);
        const size_t at = static_cast<size_t>(r) * groups.size() + g;
        if (e < best[at]) {  // ties keep the larger ratio (the less clipped)
          best[at] = e;
          chosen[at] = ratio;
          if (i > 0) take_group(q, out.q, r, static_cast<int64_t>(g), groups[g].first, groups[g].second);
        }
      }
    }
  }
  for (const float c : chosen) out.clip_sum += c;
  out.clip_count = static_cast<int64_t>(chosen.size());
  std::vector<float> wq = out.q.dequantize();
  unscale_columns(wq.data(), rows, cols, scales);
  out.error2 = output_error2(backend, w, wq.data(), rows, cols, h_backend);
  return out;
}

void divide_rows(QuantizedLinear& q, const std::vector<float>& s) {
  PQ_ASSERT(static_cast<int64_t>(s.size()) == q.rows, "divide_rows: ", s.size(), " scales for ", q.rows, " rows");
  for (int64_t g = 0; g < q.groups; ++g)
    for (int64_t r = 0; r < q.rows; ++r) {
      float& v = q.scales[static_cast<size_t>(g * q.rows + r)];
      v = round_to_fp16(v / s[static_cast<size_t>(r)]);
    }
}

}  // namespace pipequant
